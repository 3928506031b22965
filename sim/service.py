"""The simulator as a gRPC service: the joint environment and the router, for remote agents.

A round is one episode batch (``sim/rounds.py``) of one site (``Lane``): each site of a run
(``sim.sites``) steps its own copy of the environment with its own agents, in its own rounds,
so that sites need not run at the same time (a simulation runs them in waves) and a site's
agents see only their site (its agents numbered from 0, ``EnvSpec.site``). Agents ``Join`` it
(a barrier with a timeout), open their ``Step`` stream, and the round's driver runs the step
loop: each agent's own observation down, its knowledge vector up, the vectors the graph lets
through down, its action up, then one step of all ``B`` environments. After the batch,
``Feedback`` collects each receiver's DIAL gradients and returns to each sender the sum over
its receivers.

Every call is authenticated before anything it sends is read (``sim/serve.py``) and again here,
where a method must not rely on how it was registered; every message is checked before use
(``sim/validation.py``: headers, sequence numbers, declared DP parameters, delivery, and
``protocol/codec.py``'s tensor checks); a violation is answered with a precise status on the
offender's call. An agent that breaks the protocol, leaves or stays silent past the step timeout
ends the batch for everyone: the others get an ``EpisodeEnd`` marked truncated with the reason,
and the service goes on serving the next round.

What is bounded and why: ``sim/limits.py``; how each batch's seed is kept from the agents:
``sim/episodes.py``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import grpc
import torch
from google.protobuf.message import DecodeError
from torch import Tensor

from fedcomm.device import resolve_device
from fedcomm.protocol.auth import claimed_identity, token_matches
from fedcomm.protocol.codec import ProtocolError, encode, invalid
from fedcomm.protocol.v1 import joint_env_pb2 as pb
from fedcomm.protocol.v1 import joint_env_pb2_grpc as pb_grpc
from fedcomm.sim.base import EnvSpec, VecEnv
from fedcomm.sim.episodes import KEY_BYTES, check_key, episode_seed
from fedcomm.sim.limits import DEFAULT_MAX_COMM_DIM, INBOX_FRAMES, message_limit
from fedcomm.sim.registry import make_env
from fedcomm.sim.rounds import Phase, Round, Slot, round_to_join
from fedcomm.sim.router import delivery_mask
from fedcomm.sim.sites import site_seed
from fedcomm.sim.validation import (
    FAILED,
    check_action,
    check_feedback,
    check_header,
    check_join_seq,
    check_vector,
    frame_body,
    join_terms,
)

log = logging.getLogger("fedcomm.sim")

SIM = "sim"
SHOWN_ID_CHARS = 64  # of an unknown agent id, in the refusal


@dataclass
class SimConfig:
    env: str = "factory"
    env_kwargs: dict = field(default_factory=dict)
    num_envs: int = 256
    seed: int = 0  # a batch whose agents declare no label is labelled seed + its round
    run_id: str = "fedcomm"
    tokens: dict[str, str] = field(default_factory=dict)
    # Keys every batch's seed (sim/episodes.py); never sent, never shown.
    episode_key: bytes = field(default_factory=lambda: secrets.token_bytes(KEY_BYTES),
                               repr=False)
    max_comm_dim: int = DEFAULT_MAX_COMM_DIM  # the largest a join may declare; sizes messages
    join_timeout: float = 60.0  # seconds for every agent of a round to join and open its stream
    step_timeout: float = 30.0  # seconds for every agent to answer within one phase of a step
    feedback_timeout: float = 60.0
    device: str = "auto"  # where the environment steps (fedcomm.device); the wire is the host's


class _Left:
    """Marker in an agent's inbox: its stream ended."""

    def __init__(self, why: str) -> None:
        self.why = why


class Truncate(Exception):
    """Raised inside the driver to end the episode batch early, with the reason."""

    def __init__(self, reason: str, offender: Slot | None = None,
                 error: ProtocolError | None = None) -> None:
        super().__init__(reason)
        self.reason, self.offender, self.error = reason, offender, error


@dataclass
class Lane:
    """One site: its copy of the environment, its agents (``spec``, numbered from 0) and its
    rounds. Without sites the one lane is the whole environment."""

    site: int
    env: VecEnv
    spec: EnvSpec
    round: Round | None = None
    started: int = -1  # the last round whose episode batch started: never joined again

    def __post_init__(self) -> None:
        self.type_of_agent = torch.tensor(self.spec.type_of_agent)

    def episode_seed(self, batch_seed: int) -> int:
        """This site's episodes of a batch seeded ``batch_seed`` (``sim.sites.site_seed``: the
        same as the sites stepped as one would draw)."""
        return batch_seed if self.spec.ids is None else site_seed(batch_seed, self.site)


class JointEnvironmentService(pb_grpc.JointEnvironmentServicer):
    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        check_key(cfg.episode_key)
        self.env = make_env(cfg.env, cfg.num_envs, resolve_device(cfg.device), **cfg.env_kwargs)
        self.spec = self.env.spec
        missing = set(self.spec.agent_ids) - set(cfg.tokens)
        if missing:
            raise ValueError(f"no token for agents {sorted(missing)}")
        if cfg.max_comm_dim < 1:
            raise ValueError("max_comm_dim must be positive")
        envs = getattr(self.env, "envs", (self.env,))  # a run of sites: each site's copy
        self.lanes = [Lane(s, env, self.spec.site(s)) for s, env in enumerate(envs)]
        # every agent id: its site's lane and its index there
        self.seats = {a: (lane, i) for lane in self.lanes
                      for i, a in enumerate(lane.spec.agent_ids)}
        self.max_message_bytes = message_limit(self.lanes[0].spec, cfg.num_envs,
                                               cfg.max_comm_dim)

    @property
    def round(self) -> Round | None:
        """The first site's latest round (without sites, the environment's)."""
        return self.lanes[0].round

    def authenticate(self, context: grpc.aio.ServicerContext) -> tuple[Lane, int]:
        """The site of the agent whose token the call presents, and its index there;
        UNAUTHENTICATED for any call that does not present one agent of this run with its
        token, whatever its metadata holds."""
        try:
            agent_id, token = claimed_identity(_metadata(context))
        except ValueError as e:
            raise ProtocolError(grpc.StatusCode.UNAUTHENTICATED, str(e)) from None
        if agent_id not in self.seats:  # named, not listed: the caller is nobody yet
            raise ProtocolError(grpc.StatusCode.UNAUTHENTICATED,
                                f"no agent {_shown(agent_id)} in this run")
        if not token_matches(self.cfg.tokens[agent_id], token):
            raise ProtocolError(grpc.StatusCode.UNAUTHENTICATED, f"wrong token for {agent_id}")
        return self.seats[agent_id]

    def _header(self, round_number: int, step: int) -> pb.Header:
        return pb.Header(run_id=self.cfg.run_id, round=round_number, step=step, sender=SIM)

    # -- Describe --------------------------------------------------------------------------
    async def Describe(self, request: pb.DescribeRequest, context) -> pb.SimInfo:
        try:
            lane, _ = self.authenticate(context)
        except ProtocolError as e:
            await context.abort(e.code, e.message)
        spec = lane.spec
        return pb.SimInfo(
            run_id=self.cfg.run_id, env=spec.name, num_envs=self.cfg.num_envs,
            episode_length=spec.episode_length, bandwidth=spec.bandwidth or 0,
            agents=_agent_infos(spec), agent_types=[t.name for t in spec.types],
            round=lane.started + 1, max_message_bytes=self.max_message_bytes)

    # -- Join ------------------------------------------------------------------------------
    async def Join(self, request: pb.JoinRequest, context) -> pb.JoinReply:
        try:
            lane, index = self.authenticate(context)
            check_header(request.header, lane.spec.agent_ids[index], self.cfg.run_id)
            check_join_seq(request.header)
            terms = join_terms(request, lane.spec, index, self.cfg.max_comm_dim)
            rnd = lane.round = round_to_join(lane.round, lane.started, request.header.round,
                                             lane.spec.agent_ids, joiner=index)
            if rnd.admit(index, terms, request.silent):
                lane.started = rnd.number
                rnd.start(asyncio.get_running_loop().create_task(self._drive(lane, rnd)))
        except ProtocolError as e:
            await context.abort(e.code, e.message)
        try:
            await asyncio.wait_for(rnd.joined.wait(), self.cfg.join_timeout)
        except asyncio.TimeoutError:  # not yet TimeoutError on Python 3.10
            rnd.time_out_joins(self.cfg.join_timeout)
        except asyncio.CancelledError:  # the caller left
            rnd.leave(index)
            raise
        if rnd.failure is not None:
            await context.abort(rnd.failure_code, rnd.failure)
        return pb.JoinReply(header=self._header(rnd.number, 0), agent_index=index,
                            agents=_agent_infos(lane.spec), num_envs=self.cfg.num_envs,
                            episode_length=lane.spec.episode_length,
                            bandwidth=lane.spec.bandwidth or 0)

    # -- Step ------------------------------------------------------------------------------
    async def Step(self, request_iterator, context) -> None:
        try:
            lane, index = self.authenticate(context)
            rnd = lane.round
            slot = rnd.slots.get(index) if rnd is not None else None
            if rnd is None or rnd.phase is not Phase.RUNNING or slot is None:
                raise ProtocolError(FAILED, f"{lane.spec.agent_ids[index]} has no running round "
                                            "to step: join first")
            if slot.streaming.is_set():
                raise ProtocolError(grpc.StatusCode.ALREADY_EXISTS,
                                    f"{slot.agent_id} already has a step stream")
        except ProtocolError as e:
            await context.abort(e.code, e.message)
        slot.streaming.set()
        reader = asyncio.get_running_loop().create_task(self._read(request_iterator, slot))
        try:
            while True:
                item = await slot.outbox.get()
                if item is None:
                    return
                if isinstance(item, ProtocolError):
                    await context.abort(item.code, item.message)
                await context.write(item)
        finally:
            reader.cancel()
            slot.end(_Left("its step stream closed"))

    @staticmethod
    async def _read(request_iterator, slot: Slot) -> None:
        """Hand the agent's frames to the driver; one that sends ahead of the simulator's
        answers is cut off, not buffered."""
        try:
            async for frame in request_iterator:
                if not slot.take(frame):
                    slot.overflow(ProtocolError(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"more than {INBOX_FRAMES} frames sent ahead of the simulator's answers"))
                    return
            slot.end(_Left("it closed its step stream"))
        except asyncio.CancelledError:
            raise
        except DecodeError as e:  # the sender broke the protocol: its call gets the status
            slot.end(invalid(f"cannot parse the frame: {e}"))
        except Exception as e:  # any other failure ends the stream
            slot.end(_Left(f"its stream failed: {e}"))

    # -- the driver: one episode batch ----------------------------------------------------
    async def _drive(self, lane: Lane, rnd: Round) -> None:
        t, env, spec = 0, lane.env, lane.spec
        try:
            await self._await_streams(rnd)
            obs = env.reset(lane.episode_seed(episode_seed(
                self.cfg.episode_key, self.cfg.run_id, rnd.terms.seed,
                self.cfg.seed + rnd.number)))
            obs = [o.cpu() for o in obs]  # one transfer per step from an accelerator
            reward: Tensor | None = None
            for t in range(spec.episode_length):
                self._send_observations(lane, rnd, t, obs, reward)
                vectors = await self._gather(lane, rnd, t, "vector")
                self._route(lane, rnd, t,
                            torch.stack([vectors[i] for i in sorted(vectors)], dim=1))
                actions = await self._gather(lane, rnd, t, "action")
                flat = torch.stack([actions[i] for i in sorted(actions)], dim=1)
                flat = flat.to(env.device)  # checked on the host (check_action)
                step = env.step(list(flat.split([k.count for k in spec.types], 1)))
                obs, reward = [o.cpu() for o in step.obs], step.reward.cpu()
            for slot in rnd.slots.values():
                end = pb.EpisodeEnd(header=self._header(rnd.number, t + 1),
                                    reward=encode(reward[:, slot.index].contiguous()))
                slot.outbox.put_nowait(pb.SimFrame(end=end))
                slot.outbox.put_nowait(None)
            rnd.finish_episode()
            log.info("site %d round %d: episode batch done", lane.site, rnd.number)
        except Truncate as e:
            self._truncate(rnd, t, e)
        except Exception as e:  # never leave agents hanging on an internal error
            log.exception("round %d: internal error", rnd.number)
            self._truncate(rnd, t, Truncate(f"simulator error: {e}"))

    async def _await_streams(self, rnd: Round) -> None:
        waits = [s.streaming.wait() for s in rnd.slots.values()]
        try:
            await asyncio.wait_for(asyncio.gather(*waits), self.cfg.join_timeout)
        except asyncio.TimeoutError:
            missing = [s.agent_id for s in rnd.slots.values() if not s.streaming.is_set()]
            raise Truncate(f"{', '.join(missing)} never opened a step stream") from None

    def _send_observations(self, lane: Lane, rnd: Round, t: int, obs: list[Tensor],
                           reward: Tensor | None) -> None:
        starts = lane.spec.type_starts()
        for slot in rnd.slots.values():
            k = lane.spec.type_of_agent[slot.index]
            mine = obs[k][:, slot.index - starts[k]].contiguous()
            msg = pb.Observation(header=self._header(rnd.number, t), obs=encode(mine))
            if reward is not None:
                msg.reward.CopyFrom(encode(reward[:, slot.index].contiguous()))
            slot.outbox.put_nowait(pb.SimFrame(observation=msg))

    async def _gather(self, lane: Lane, rnd: Round, t: int, kind: str) -> dict[int, Tensor]:
        """Every agent's frame of this phase, checked; ends the batch on the first failure."""
        deadline = time.monotonic() + self.cfg.step_timeout
        out = {}
        for slot in rnd.slots.values():
            try:
                item = await asyncio.wait_for(slot.inbox.get(),
                                              max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise Truncate(f"{slot.agent_id} did not answer within "
                               f"{self.cfg.step_timeout:g} s at step {t}") from None
            if isinstance(item, _Left):
                raise Truncate(f"{slot.agent_id} left at step {t}: {item.why}")
            try:
                if isinstance(item, ProtocolError):  # the frame did not parse
                    raise item
                out[slot.index] = self._check_frame(lane, rnd, slot, t, kind, item)
            except ProtocolError as e:
                raise Truncate(f"{slot.agent_id} sent an invalid message at step {t}: "
                               f"{e.message}", slot, e) from None
        return out

    def _check_frame(self, lane: Lane, rnd: Round, slot: Slot, t: int, kind: str,
                     frame: pb.AgentFrame) -> Tensor:
        msg = frame_body(frame, kind, t)
        check_header(msg.header, slot.agent_id, self.cfg.run_id, rnd.number, t)
        slot.next_seq(msg.header)
        k = lane.spec.type_of_agent[slot.index]
        if kind == "vector":
            return check_vector(msg, rnd.terms, self.cfg.num_envs, k, slot.index in rnd.silent,
                                t)
        return check_action(msg, self.cfg.num_envs, lane.spec.types[k].n_actions)

    def _route(self, lane: Lane, rnd: Round, t: int, vectors: Tensor) -> None:
        """Send each agent the vectors its routes carry; pruned routes are not sent at all."""
        silent = torch.full((lane.spec.n_agents,), not rnd.terms.releases_at(t))
        silent[list(rnd.silent)] = True  # and at a step the schedule skips, everyone is
        mask = delivery_mask(lane.type_of_agent, rnd.terms.routes, vectors, lane.spec.bandwidth,
                             silent)
        mask = mask.expand(self.cfg.num_envs, -1, -1)  # [B, receiver, sender]
        reaches = mask.any(dim=0)
        rnd.record_delivery(reaches)
        for slot in rnd.slots.values():
            senders = reaches[slot.index].nonzero().flatten()
            routed = pb.RoutedVectors(
                header=self._header(rnd.number, t), senders=senders.tolist(),
                vectors=encode(vectors.index_select(1, senders).transpose(0, 1).contiguous()),
                delivered=encode(mask[:, slot.index].index_select(1, senders).T.contiguous()))
            slot.outbox.put_nowait(pb.SimFrame(routed=routed))

    def _truncate(self, rnd: Round, t: int, e: Truncate) -> None:
        log.warning("round %d truncated: %s", rnd.number, e.reason)
        rnd.fail(e.reason)
        for slot in rnd.slots.values():
            if slot is e.offender and e.error is not None:
                slot.outbox.put_nowait(e.error)
                continue
            end = pb.EpisodeEnd(header=self._header(rnd.number, t), truncated=True,
                                reason=e.reason)
            slot.outbox.put_nowait(pb.SimFrame(end=end))
            slot.outbox.put_nowait(None)

    # -- Feedback --------------------------------------------------------------------------
    async def Feedback(self, request: pb.FeedbackRequest, context) -> pb.FeedbackReply:
        t = self.spec.episode_length
        try:
            lane, index = self.authenticate(context)
            rnd = lane.round
            if rnd is None or rnd.phase is not Phase.FEEDBACK or index not in rnd.slots:
                raise ProtocolError(FAILED, "no episode batch is waiting for feedback from "
                                            f"{lane.spec.agent_ids[index]}")
            slot = rnd.slots[index]
            check_header(request.header, slot.agent_id, self.cfg.run_id, rnd.number, t)
            slot.next_seq(request.header)
            rnd.check_feedback_pending(index)
            senders, grads = check_feedback(request, index, lane.spec.agent_ids, rnd.terms,
                                            rnd.delivered, index in rnd.silent, t,
                                            self.cfg.num_envs)
            if rnd.record_feedback(index, senders, grads):
                log.info("site %d round %d: feedback exchanged", lane.site, rnd.number)
        except ProtocolError as e:
            await context.abort(e.code, e.message)
        try:
            await asyncio.wait_for(rnd.feedback_done.wait(), self.cfg.feedback_timeout)
        except asyncio.TimeoutError:
            rnd.time_out_feedback()
        if rnd.feedback_sums is None:
            await context.abort(rnd.failure_code, rnd.failure or "feedback did not complete")
        receivers = int(rnd.delivered[:, index].sum())
        return pb.FeedbackReply(header=self._header(rnd.number, t),
                                grad=encode(rnd.feedback_sums[index]), receivers=receivers)


def _agent_infos(spec: EnvSpec) -> list[pb.AgentInfo]:
    return [pb.AgentInfo(agent_id=a, agent_type=spec.types[k].name, index=i)
            for i, (a, k) in enumerate(zip(spec.agent_ids, spec.type_of_agent))]


def _metadata(context: grpc.aio.ServicerContext) -> Iterable[tuple[str, str | bytes]]:
    """The call's metadata; reading it may fail on bytes gRPC cannot decode."""
    try:
        return tuple(context.invocation_metadata() or ())
    except Exception as e:
        raise ValueError(f"unreadable call metadata: {e}") from None


def _shown(agent_id: str) -> str:
    """An unknown agent id as a refusal names it: quoted, and cut short."""
    if len(agent_id) <= SHOWN_ID_CHARS:
        return repr(agent_id)
    return f"{agent_id[:SHOWN_ID_CHARS]!r}..."
