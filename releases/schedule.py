"""Who releases what: the parts of the shared module and the routes each agent uses and sends,
what one agent releases in an episode batch, and what of it composes for a privacy unit.

The shared module has a sender's part (the encoder) and a receiver's parts (the gates, the
decoder and the route graph). Which of them an agent uses follows from the routes its type may
send and receive on; which it sends the server follows from ``FederationConfig.share``. The
agents decide what they train and release from this, and the server what each reply must
carry: both read it here.

Before a batch an agent knows everything it will release in it: ``T`` knowledge vectors per
episode if a kept route leaves its type towards another agent (randomized-response codewords
or Gaussian vectors, on the team's schedule), one feedback gradient per episode for each agent
whose vectors can reach it, and the DP-SGD steps of its update. This module says what those
are, how DP-SGD is set, and which of them compose for one unit given how the agent trains; the
run's plan (``releases.plan``), each agent's account (``releases.account``) and the audit all
read it from here.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from fedcomm.config import PPOConfig, TeamConfig, TrainConfig
from fedcomm.privacy.config import PrivacyConfig
from fedcomm.privacy.events import (
    GaussianRelease,
    RandomizedResponse,
    Relation,
    Release,
    gaussian_release,
)
from fedcomm.privacy.ledger import Composition, composes_every_release
from fedcomm.sim.base import EnvSpec

Training = Literal["dp_sgd", "plain", "none"]


@dataclass(frozen=True)
class DpSgd:
    """DP-SGD settings of a party's update (``learning/dpsgd.py``)."""

    noise_multiplier: float
    clip: float
    sample_rate: float
    # Shares of the squared clip for parts clipped apart: "shared" (the shared module),
    # "value" (the value networks), "recall" (recall decoders); the other private networks
    # get the rest.
    clip_shares: dict[str, float] = field(default_factory=dict)
    statistics: bool = False  # one more step releases the batch's statistics


def composition_for(training: Training) -> Composition:
    """Which releases compose for an episode, given how the agent trains.

    Every network of an agent shapes a release: its feature network, GRU and encoder its
    vectors; its gate, decoder, policy and (through the advantages) value networks the feedback
    it sends and the update. DP-SGD (``learning/dpsgd.py``) trains all of them, so under it, and
    without training, an episode's own batch is what composes; plain PPO trains them on the
    episode without DP, so every later release depends on it and all compose.
    """
    return "all" if training == "plain" else "batch"


def training_of(config: Mapping[str, Any]) -> Training:
    """How a run's agents train, from its configuration (``config.json``, a report's)."""
    if "training" in config:  # fedcomm agent
        return config["training"]
    if "batches_per_round" in config:  # federated
        privacy = config["train"]["privacy"]
        if privacy.get("update_share") == 0:  # the agents that release do not train
            return "none"
        return "dp_sgd" if privacy.get("update_noise_multiplier") is not None else "plain"
    return "plain"  # the centralized trainer: PPO on every network


def composition_of_config(config: Mapping[str, Any]) -> Composition:
    return composition_for(training_of(config))


def dp_steps(cfg: PPOConfig, sample_rate: float, statistics: bool = False) -> int:
    """DP-SGD steps of one update, known before it runs (the ledger is written first): an
    epoch is ``round(1 / sample_rate)`` steps, so each episode is sampled once per epoch in
    expectation, as each is once per epoch of ``ppo_update``; with ``statistics``, one more,
    which releases the batch's statistics (``learning.dpsgd.released_statistics``)."""
    check_sample_rate(sample_rate)
    return cfg.epochs * max(1, round(1 / sample_rate)) + int(statistics)


def check_sample_rate(sample_rate: float) -> None:
    if not 0 < sample_rate <= 1:
        raise ValueError(f"the sample rate must be in (0, 1], got {sample_rate}")


def update_sample_rate(cfg: PrivacyConfig, ppo: PPOConfig) -> float:
    return cfg.update_sample_rate or 1.0 / ppo.minibatches


def update_dp(cfg: PrivacyConfig, ppo: PPOConfig) -> DpSgd | None:
    """The DP-SGD settings of a federated agent's update, if it is private."""
    if cfg.update_noise_multiplier is None:
        return None
    shares = {"shared": cfg.update_shared_share, "value": cfg.update_value_share,
              "recall": cfg.update_recall_share}
    return DpSgd(cfg.update_noise_multiplier, cfg.update_clip, update_sample_rate(cfg, ppo),
                 {k: w for k, w in shares.items() if w is not None}, cfg.update_statistics)


def update_releases(cfg: PrivacyConfig, ppo: PPOConfig, dp_sgd: bool | None = None
                    ) -> list[GaussianRelease]:
    """What one batch's update releases to the server: DP-SGD steps, each a Poisson-sampled
    Gaussian release; without DP-SGD, one release without noise (epsilon infinite).
    ``dp_sgd`` (default: whether ``cfg`` sets DP-SGD's noise) asks for DP-SGD's steps before
    their noise is calibrated: then they carry none."""
    if dp_sgd is None:
        dp_sgd = cfg.update_noise_multiplier is not None
    if not dp_sgd:
        return [gaussian_release("update", 0.0, ppo.max_grad_norm, relation=cfg.relation)]
    rate = update_sample_rate(cfg, ppo)
    return [gaussian_release("update", cfg.update_noise_multiplier or 0.0, cfg.update_clip,
                             relation=cfg.relation, sample_rate=rate,
                             count=dp_steps(ppo, rate, cfg.update_statistics))]


def message_release(team: TeamConfig, relation: Relation, count: int) -> Release:
    """``count`` vectors of the team's channel: Gaussian, or randomized codewords."""
    if team.channel == "discrete":
        return RandomizedResponse("message", team.rr_epsilon, team.symbols, count, relation)
    return gaussian_release("message", team.noise_multiplier, team.clip, relation=relation,
                            count=count)


def for_unit(releases: Sequence[Release], unit: str, composition: Composition,
             episodes: int) -> list[Release]:
    """What one batch's releases cost one unit.

    Where the unit's batch is what composes (an episode under DP-SGD) a batch's releases
    count per episode, as they are recorded. Where every release composes (the unit is the
    agent's whole history, or an episode trained on without DP) every one of the batch's
    ``episodes`` episodes releases its vectors and feedback as a function of the unit, so
    each counts ``episodes`` times, and each DP-SGD step sums the clipped gradients of all of
    them: sensitivity ``episodes`` times the clip, no sampling.
    """
    if not composes_every_release(unit, composition):
        return list(releases)
    out: list[Release] = []
    for r in releases:
        if isinstance(r, GaussianRelease) and r.sampled:
            out.append(gaussian_release(r.mechanism, r.noise_multiplier, r.clip,
                                        relation=r.relation, count=r.count,
                                        contributions=episodes))
        else:
            out.append(r.with_count(r.count * episodes))
    return out


def batch_releases(spec: EnvSpec, team: TeamConfig, relation: Relation, routes: Tensor,
                   index: int, extra: Sequence[GaussianRelease] = ()) -> list[GaussianRelease]:
    """Everything agent ``index`` releases in one episode batch under ``routes``: its
    scheduled vectors per episode if they reach another agent, one feedback gradient per
    episode for each agent whose vectors reach it, and ``extra`` (its DP-SGD steps)."""
    reach, reached_by = peers(spec, routes, index)
    out: list[Release] = []
    if reach:
        out.append(message_release(team, relation, team.releases_per_episode(
            spec.episode_length)))
    if reached_by and team.feedback:
        out.append(gaussian_release("feedback", team.feedback_noise_multiplier,
                                    team.feedback_clip, relation=relation, count=reached_by))
    return out + list(extra)


def releases_anything(spec: EnvSpec, team: TeamConfig, share: str, routes: Tensor,
                      index: int) -> bool:
    """Whether agent ``index`` releases anything its networks shape: vectors, feedback, or
    parts of the shared module. One that does not needs no DP-SGD."""
    reach, reached_by = peers(spec, routes, index)
    return bool(reach or (reached_by and team.feedback)
                or shared_parts(spec, share, routes, index))


def declared_mechanisms(team: TeamConfig, cfg: PrivacyConfig, ppo: PPOConfig | None = None,
                        composition: Composition = "batch") -> dict[str, dict[str, Any]]:
    """What the run declares about each mechanism: the audit checks every entry against it."""
    message = ({"kind": "randomized_response", "epsilon": team.rr_epsilon,
                "symbols": team.symbols} if team.channel == "discrete" else
               {"noise_multiplier": team.noise_multiplier, "clip": team.clip})
    out = {"message": message,
           "feedback": {"noise_multiplier": team.feedback_noise_multiplier,
                        "clip": team.feedback_clip}}
    if ppo is not None:
        if cfg.update_noise_multiplier is None:
            out["update"] = {"noise_multiplier": 0.0, "clip": ppo.max_grad_norm}
        else:
            out["update"] = {"noise_multiplier": cfg.update_noise_multiplier,
                             "clip": cfg.update_clip,
                             "sample_rate": 1.0 if composes_every_release(cfg.unit, composition)
                             else update_sample_rate(cfg, ppo)}  # see for_unit
    return out


SENDER_PARTS = ("encoder",)
RECEIVER_PARTS = ("gate_state", "gate_message", "decoder", "graph")


def uses(spec: EnvSpec, routes: Tensor, index: int) -> tuple[str, ...]:
    """The parts of the shared module agent ``index`` uses: the encoder if its vectors reach
    someone, the receiving parts if vectors reach it."""
    reach, reached_by = peers(spec, routes, index)
    return (SENDER_PARTS if reach else ()) + (RECEIVER_PARTS if reached_by else ())


def shared_parts(spec: EnvSpec, share: str, routes: Tensor, index: int) -> tuple[str, ...]:
    """The parts of the shared module agent ``index`` sends to the server: all of them, or
    (``share="used"``) those it uses that another agent uses too: the encoder if its vectors
    reach someone and another agent's do, the receiving parts if vectors reach it and another
    agent; with ``share="role"`` the same among the agents of its type (its type's copy); with
    ``share="senders"`` only the encoder, among the senders (receivers keep their own parts)."""
    if share == "all":
        return SENDER_PARTS + RECEIVER_PARTS
    if share == "none":
        return ()
    kind = spec.type_of_agent[index]
    among = [i for i in range(spec.n_agents)
             if share != "role" or spec.type_of_agent[i] == kind]
    reaches = reach_matrix(spec, routes)
    sends, hears = reaches.any(dim=1), reaches.any(dim=0)
    reach, reached_by = bool(sends[index]), bool(hears[index])
    senders, receivers = int(sends[among].sum()), int(hears[among].sum())
    return ((SENDER_PARTS if reach and senders > 1 else ())
            + (RECEIVER_PARTS if reached_by and receivers > 1 and share != "senders"
               else ()))


def averages_private(spec: EnvSpec, share: str, aggregate_private: bool, routes: Tensor,
                     index: int) -> bool:
    """Whether agent ``index`` sends the server its type's private networks: with
    ``aggregate_private`` every agent does, except with ``share="senders"``, where only the
    senders that share their encoder do (a sender's whole model is averaged, and a receiver
    still releases no network), and with ``share="none"``, where none does."""
    if not aggregate_private or share == "none":
        return False
    return share != "senders" or bool(shared_parts(spec, share, routes, index))


def sends_to_server(spec: EnvSpec, share: str, aggregate_private: bool, routes: Tensor,
                    index: int) -> bool:
    """Whether agent ``index`` sends the server any of its networks: parts of the shared
    module (``shared_parts``) or its type's private networks (``averages_private``)."""
    return (averages_private(spec, share, aggregate_private, routes, index)
            or bool(shared_parts(spec, share, routes, index)))


def peers(spec: EnvSpec, routes: Tensor, index: int) -> tuple[int, int]:
    """How many other agents ``index``'s vectors can reach, and how many can reach it."""
    reaches = reach_matrix(spec, routes)
    return int(reaches[index].sum()), int(reaches[:, index].sum())


def reach_matrix(spec: EnvSpec, routes: Tensor) -> Tensor:
    """``[N, N]`` bool: agent ``i``'s vectors can reach agent ``j`` (a route from ``i``'s type
    to ``j``'s, ``j`` another agent of ``i``'s site). Kept for the last few runs' routes: a run
    of many sites asks it of every agent."""
    routes = routes.detach().cpu().to(torch.bool)
    return _reach_matrix(spec, tuple(routes.shape), tuple(routes.flatten().tolist()))


@functools.lru_cache(maxsize=8)
def _reach_matrix(spec: EnvSpec, shape: tuple[int, ...], flat: tuple[bool, ...]) -> Tensor:
    routes = torch.tensor(flat, dtype=torch.bool).reshape(shape)
    types = torch.tensor(spec.type_of_agent)
    out = routes[types][:, types] & ~torch.eye(spec.n_agents, dtype=torch.bool)
    if spec.sites > 1:  # vectors stay within their site
        sites = torch.tensor(spec.site_of_agent)
        out &= sites[:, None] == sites[None, :]
    return out


def initial_routes(train: TrainConfig) -> Tensor:
    """The routes of the first round: all of them, unless the team does not communicate or
    starts with every route below the pruning threshold."""
    keep = (train.team.communicate
            and 1 / (1 + math.exp(-train.team.graph_init)) > train.team.prune_threshold)
    return torch.tensor(train.team.allowed_routes(train.spec)) & keep
