"""The checks every message an agent sends the simulator passes before any of it is used.

Each check is a pure function: a message, and what it must agree with (the environment's spec,
the round's terms, the sender's last sequence number), in; the decoded tensor or the checked
value out, or a ``ProtocolError`` carrying the status the offender's call is answered with.
Tensors pass ``protocol/codec.py``'s checks (dtype, shape, byte length, finiteness) and, where
they are releases, a norm bound that the declared DP parameters imply: a release that was not
clipped and noised as declared is refused rather than routed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import torch
from google.protobuf.message import Message
from torch import Tensor

from fedcomm.protocol.codec import ProtocolError, check_norms, decode, invalid
from fedcomm.protocol.v1 import joint_env_pb2 as pb
from fedcomm.sim.base import EnvSpec

FAILED = grpc.StatusCode.FAILED_PRECONDITION


@dataclass(frozen=True, eq=False)
class Terms:
    """What every agent of a round agrees on: its first joiner declares them, every later
    joiner must declare the same, so that all see one graph, one batch and one mechanism."""

    routes: Tensor  # [K, K] bool, routes[sender_type, receiver_type]: the graph kept
    comm_dim: int
    seed: int | None  # the batch's public label (sim/episodes.py); None: labelled by its round
    vector_dp: pb.DpParams
    feedback_dp: pb.DpParams
    release_every: int = 1  # vectors at steps 0, k, 2k, ...

    def releases_at(self, step: int) -> bool:
        return step % self.release_every == 0


# -- headers -----------------------------------------------------------------------------------
def check_header(header: pb.Header, agent_id: str, run_id: str, round_number: int | None = None,
                 step: int | None = None) -> None:
    """The header comes from the authenticated agent, in this run (and round and step, where
    given): an agent can speak only as itself, and only about the present."""
    if header.sender != agent_id:
        raise ProtocolError(grpc.StatusCode.PERMISSION_DENIED,
                            f"{agent_id} cannot speak as {header.sender!r}")
    if header.run_id != run_id:
        raise ProtocolError(FAILED, f"run {header.run_id!r} is not this simulator's run "
                                    f"{run_id!r}")
    if round_number is not None and header.round != round_number:
        raise invalid(f"message for round {header.round} during round {round_number}")
    if step is not None and header.step != step:
        raise invalid(f"message for step {header.step} during step {step}")


def next_seq(header: pb.Header, last: int) -> int:
    """The header's sequence number, which must follow ``last``: replays and gaps are refused."""
    if header.seq != last + 1:
        what = "replayed" if header.seq <= last else "out of order"
        raise invalid(f"sequence number {header.seq} is {what}: expected {last + 1}")
    return header.seq


def check_join_seq(header: pb.Header) -> None:
    """A join opens the agent's sequence for the round."""
    if header.seq != 1:
        raise invalid(f"a join carries sequence number 1, got {header.seq}")


# -- DP parameters -----------------------------------------------------------------------------
def check_dp(dp: pb.DpParams, what: str) -> None:
    """Parameters a mechanism can have: without them no norm bound holds. A discrete release
    (``rr_epsilon > 0``) is a one-hot of ``symbols >= 2`` codewords, of norm 1, with no
    Gaussian noise."""
    if not (math.isfinite(dp.clip_norm) and dp.clip_norm > 0
            and math.isfinite(dp.noise_multiplier) and dp.noise_multiplier >= 0):
        raise invalid(f"{what}: clip norm must be positive and noise multiplier "
                      f"non-negative, got {dp.clip_norm}, {dp.noise_multiplier}")
    if not (math.isfinite(dp.rr_epsilon) and dp.rr_epsilon >= 0):
        raise invalid(f"{what}: rr_epsilon must be finite and non-negative, got "
                      f"{dp.rr_epsilon}")
    if dp.rr_epsilon > 0 and (dp.symbols < 2 or dp.clip_norm != 1 or dp.noise_multiplier):
        raise invalid(f"{what}: randomized response needs at least 2 symbols, clip norm 1 and "
                      f"no Gaussian noise, got {dp.symbols}, {dp.clip_norm}, "
                      f"{dp.noise_multiplier}")


def _mechanism(dp: pb.DpParams) -> str:
    if dp.rr_epsilon > 0:
        return f"randomized response over {dp.symbols} symbols at epsilon {dp.rr_epsilon:g}"
    return f"clip {dp.clip_norm:g}, noise multiplier {dp.noise_multiplier:g}"


def same_dp(got: pb.DpParams, agreed: pb.DpParams, what: str) -> None:
    """Every release of a round uses the mechanism its agents agreed on."""
    fields = ("clip_norm", "noise_multiplier", "rr_epsilon", "symbols")
    if all(getattr(got, f) == getattr(agreed, f) for f in fields):
        return
    if not (got.rr_epsilon or agreed.rr_epsilon):
        raise invalid(f"{what} declares clip {got.clip_norm:g}, noise multiplier "
                      f"{got.noise_multiplier:g}; the round agreed on {agreed.clip_norm:g}, "
                      f"{agreed.noise_multiplier:g}")
    raise invalid(f"{what} declares {_mechanism(got)}; the round agreed on "
                  f"{_mechanism(agreed)}")


# -- joins -------------------------------------------------------------------------------------
def join_terms(request: pb.JoinRequest, spec: EnvSpec, index: int,
               max_comm_dim: int) -> Terms:
    """The terms a join declares, once its declarations match agent ``index`` of ``spec`` and
    its ``comm_dim`` fits the simulator's ``max_comm_dim`` (which sizes its message limit)."""
    kind = spec.types[spec.type_of_agent[index]]
    declared = (request.agent_type, request.obs_dim, request.n_actions)
    if declared != (kind.name, kind.obs_dim, kind.n_actions):
        raise invalid(f"{spec.agent_ids[index]} is a {kind.name} with observations of "
                      f"{kind.obs_dim} and {kind.n_actions} actions; the join declares "
                      f"{declared}")
    if request.comm_dim < 1:
        raise invalid("comm_dim must be positive")
    if request.comm_dim > max_comm_dim:
        raise invalid(f"comm_dim {request.comm_dim} exceeds the simulator's largest, "
                      f"{max_comm_dim} (fedcomm sim serve --comm-dim)")
    check_dp(request.vector_dp, "vector_dp")
    check_dp(request.feedback_dp, "feedback_dp")
    if request.feedback_dp.rr_epsilon:
        raise invalid("feedback_dp: feedback is a Gaussian release")
    if request.vector_dp.rr_epsilon and request.vector_dp.symbols != request.comm_dim:
        raise invalid(f"a discrete channel's vectors are one-hot rows of its "
                      f"{request.vector_dp.symbols} symbols, not of comm_dim "
                      f"{request.comm_dim}")
    k = len(spec.types)
    routes = decode(request.routes, "routes", pb.BOOL, (k, k))
    seed = request.seed if request.HasField("seed") else None
    return Terms(routes, request.comm_dim, seed, request.vector_dp, request.feedback_dp,
                 max(1, request.release_every))


def same_terms(declared: Terms, agreed: Terms) -> None:
    """A later joiner declares the terms the round's first joiner set."""
    if not torch.equal(declared.routes, agreed.routes):
        raise invalid("routes differ from those the round's first agent declared")
    if declared.seed != agreed.seed:
        def show(x: int | None) -> str:
            return "no seed" if x is None else f"seed {x}"

        raise invalid(f"{show(declared.seed)} declared; the round's first agent declared "
                      f"{show(agreed.seed)}")
    if declared.comm_dim != agreed.comm_dim:
        raise invalid(f"comm_dim {declared.comm_dim}, the round uses {agreed.comm_dim}")
    same_dp(declared.vector_dp, agreed.vector_dp, "vector_dp")
    same_dp(declared.feedback_dp, agreed.feedback_dp, "feedback_dp")
    if declared.release_every != agreed.release_every:
        raise invalid(f"a release every {declared.release_every} steps declared; the round "
                      f"releases every {agreed.release_every}")


def check_round_number(number: int) -> None:
    """Rounds are uint32 on the wire: the round after this one needs a number too."""
    if number >= 2**32 - 1:
        raise invalid(f"round {number} leaves no number for the round after it")


# -- the step loop -----------------------------------------------------------------------------
def frame_body(frame: pb.AgentFrame, kind: str, t: int) -> Message:
    """The ``kind`` ("vector" or "action") message the step loop waits for at step ``t``."""
    body = frame.WhichOneof("body")
    if body != kind:
        article = "an" if kind[0] in "aeiou" else "a"
        raise invalid(f"expected {article} {kind} at step {t}, got {body or 'an empty frame'}")
    return getattr(frame, kind)


def check_vector(msg: pb.KnowledgeVector, terms: Terms, num_envs: int, agent_type: int,
                 silent: bool, step: int = 0) -> Tensor:
    """The agent's knowledge vector ``[B, comm_dim]``: zeros where it releases nothing.

    An agent that joined silent, whose type keeps no outgoing route, or at a step its schedule
    skips, sends no vector: a release nobody receives would still spend its budget. Every
    other agent sends one; on a discrete channel it is a one-hot row per environment.
    """
    same_dp(msg.dp, terms.vector_dp, "the vector")
    routed = bool(terms.routes[agent_type].any())
    speaks = not silent and routed and terms.releases_at(step)
    if msg.HasField("vector") != speaks:
        raise invalid("the agent joined silent: send no vector" if silent else
                      "every route from this agent's type is pruned: send no vector"
                      if not routed else
                      f"the schedule releases every {terms.release_every} steps: send no "
                      f"vector at step {step}" if not speaks else
                      "the knowledge vector is missing")
    if not speaks:  # nothing released, nothing routed
        return torch.zeros(num_envs, terms.comm_dim)
    vector = decode(msg.vector, "vector", pb.FLOAT32, (num_envs, terms.comm_dim))
    check_norms(vector, "vector", msg.dp, row_dims=1)
    if msg.dp.rr_epsilon and not bool(((vector == 0) | (vector == 1)).all()
                                       & (vector.sum(dim=1) == 1).all()):
        raise invalid("a discrete channel's vector is a one-hot row per environment")
    return vector


def check_action(msg: pb.Action, num_envs: int, n_actions: int) -> Tensor:
    """The agent's actions ``[B]``, each one of its ``n_actions`` (checked on the host, so the
    environment never steps with an index out of range)."""
    action = decode(msg.action, "action", pb.INT64, (num_envs,))
    if action.numel() and (int(action.min()) < 0 or int(action.max()) >= n_actions):
        raise invalid(f"actions must lie in [0, {n_actions})")
    return action


# -- feedback ----------------------------------------------------------------------------------
def check_feedback(request: pb.FeedbackRequest, receiver: int, agent_ids: Sequence[str],
                   terms: Terms, delivered: Tensor, silent: bool, episode_length: int,
                   num_envs: int) -> tuple[list[int], Tensor]:
    """The senders a receiver's feedback is for, and its gradients ``[S, T, B, comm_dim]``.

    Parameters
    ----------
    request
        The receiver's feedback.
    receiver
        Its agent index.
    agent_ids
        Every agent, in index order.
    terms
        The round's terms: ``feedback_dp`` and ``comm_dim``.
    delivered
        ``[receiver, sender]`` bool: whether any vector of the sender reached the receiver this
        round. Feedback goes only to senders that were heard, so nothing else leaks through it.
    silent
        The receiver joined silent: it releases nothing, feedback included.
    episode_length, num_envs
        ``T`` and ``B`` of the episode batch.
    """
    same_dp(request.dp, terms.feedback_dp, "the feedback")
    senders = list(request.senders)
    if senders and silent:
        raise invalid("the agent joined silent: send feedback for no sender")
    if len(set(senders)) != len(senders):
        raise invalid("a sender appears twice in the feedback")
    n = len(agent_ids)
    for s in senders:
        if s >= n or not delivered[receiver, s]:
            name = agent_ids[s] if s < n else f"#{s}"
            raise invalid(f"feedback for {name}, whose vectors never reached "
                          f"{agent_ids[receiver]}")
    shape = (len(senders), episode_length, num_envs, terms.comm_dim)
    grads = decode(request.grads, "feedback", pb.FLOAT32, shape)
    check_norms(grads.permute(0, 2, 1, 3), "feedback", request.dp, row_dims=2)
    return senders, grads
