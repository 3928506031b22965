"""What a run will release, worked out once before it starts: what composes for one privacy unit
of each agent, the epsilon of it, and a run that cannot fit its budget refused.

The plan is that of the agent that releases the most, with every route kept (pruning only
removes releases): per episode batch its vectors, its feedback and its update (DP-SGD steps in a
federated run; without DP-SGD one release without noise, epsilon infinite). What composes for
one unit follows from how the agents train (``composition_for``): an episode's own batch
under DP-SGD, every release of the run under plain PPO (then also the vectors of the
evaluation episodes played through the simulator). ``PrivacyPlan.of`` computes it once; the
command line prints its headline and hands it to the run.

``calibrate`` sets the noise multipliers first: each mechanism with a target epsilon gets the
least noise that meets it alone; one budget ``epsilon`` is split over the mechanisms in use
(weights in ``DEFAULT_WEIGHTS``, a mechanism's target fixing its own) and turns DP-SGD on in a
federated run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from fedcomm.config import FederationConfig, TrainConfig
from fedcomm.presets import PRIVATE_FEEDBACK_CLIP, UNCLIPPED
from fedcomm.privacy.accountants import make_accountant
from fedcomm.privacy.budget import PrivacyBudget, mechanism_epsilons
from fedcomm.privacy.calibrate import Mechanism, search_epsilon, smallest_noise, split_budget
from fedcomm.privacy.events import GaussianRelease, gaussian_release
from fedcomm.privacy.ledger import Composition, composes_every_release
from fedcomm.releases.schedule import (
    Training,
    batch_releases,
    composition_for,
    for_unit,
    initial_routes,
    message_release,
    releases_anything,
    sends_to_server,
    update_releases,
    update_sample_rate,
)


@dataclass(frozen=True)
class Schedule:
    """How many episode batches a run's agents train on, and play for evaluation through the
    simulator (a federated run's evaluations release vectors; the centralized trainer's
    happen in process and release nothing)."""

    federated: bool
    train_batches: int
    eval_batches: int = 0
    share: str = "all"  # FederationConfig.share: which parts of the shared module agents send
    aggregate_private: bool = False  # FederationConfig.aggregate_private: private networks too

    @classmethod
    def of(cls, cfg: TrainConfig | FederationConfig) -> Schedule:
        if isinstance(cfg, TrainConfig):
            return cls(False, max(1, cfg.env_steps // cfg.batch_steps))
        per_evaluation = math.ceil(cfg.train.eval_episodes / cfg.train.num_envs)
        interval = cfg.eval_interval
        periodic = (cfg.rounds - 1) // interval if interval else 0
        return cls(True, cfg.total_batches, per_evaluation * (periodic + 1), cfg.share,
                   cfg.aggregate_private)


def training(train: TrainConfig, schedule: Schedule) -> Training:
    """How the planned run's agents that release train: DP-SGD where a federated update is
    private; not at all where a federated run gives DP-SGD no share (``update_share`` 0)."""
    if schedule.federated and not train.privacy.trains_releasing_agents:
        return "none"
    private = schedule.federated and train.privacy.update_noise_multiplier is not None
    return "dp_sgd" if private else "plain"


def unit_releases(train: TrainConfig, schedule: Schedule, index: int,
                  how: Training | None = None) -> list[GaussianRelease]:
    """What composes for one unit of agent ``index`` in the planned run, whose agents train
    ``how`` (default: as ``train`` says; the calibration asks for DP-SGD before its noise is
    known, and gets DP-SGD's steps without noise)."""
    how = how or training(train, schedule)
    routes = initial_routes(train)
    extra = []
    if schedule.federated:  # as the agent decides (clients.agent.FederatedAgent)
        sends = sends_to_server(train.spec, schedule.share, schedule.aggregate_private,
                                routes, index)
        private = sends or releases_anything(train.spec, train.team, schedule.share, routes,
                                             index)
        dp = how == "dp_sgd"
        if how != "none" and ((dp and private) or (not dp and sends)):
            extra = update_releases(train.privacy, train.ppo, dp)
    batch = batch_releases(train.spec, train.team, train.privacy.relation, routes, index, extra)
    if not schedule.federated:  # one process: only the vectors cross between agents
        batch = [r for r in batch if r.mechanism == "message"]
    composition = composition_for(how)
    if not composes_every_release(train.privacy.unit, composition):
        return batch
    batch = for_unit(batch, train.privacy.unit, composition, train.num_envs)
    messages = [r for r in batch if r.mechanism == "message"]
    return ([r.with_count(r.count * schedule.train_batches) for r in batch]
            + [r.with_count(r.count * schedule.eval_batches) for r in messages
               if schedule.eval_batches])


@dataclass(frozen=True)
class PrivacyPlan:
    """The planned run's epsilon for one unit: per mechanism alone and composed, each the
    largest over agents, against the cap."""

    unit: str
    composition: Composition
    relation: str
    delta: float
    budget: float
    epsilon: dict[str, float]
    composed: float
    training: Training = "dp_sgd"  # how the agents that release train

    @classmethod
    def of(cls, train: TrainConfig, schedule: Schedule) -> PrivacyPlan:
        """The plan of a run that trains ``train`` on ``schedule``, worked out once before
        anything starts: ``ValueError`` with one line (what to set) where the run cannot fit
        its budget, or trains positive signalling under DP-SGD without a released marginal."""
        cfg = train.privacy
        how = training(train, schedule)
        if train.ppo.signal_coef and how == "dp_sgd" and not cfg.update_statistics:
            raise ValueError("positive signalling (--signal-coef) links the episodes of a "
                             "minibatch, so DP-SGD trains with it only on a released codeword "
                             "marginal: add --update-statistics, or set --signal-coef 0")
        budget = PrivacyBudget(cfg.budget, cfg.delta, cfg.accountant, cfg.relation)
        per_mechanism: dict[str, float] = {}
        composed = 0.0
        # agents that release the same (one type's across sites) are accounted once
        distinct = {tuple(r): r for r in (unit_releases(train, schedule, index, how)
                                          for index in range(train.spec.n_agents))}
        for releases in distinct.values():
            composed = max(composed, budget.epsilon_of(releases))
            for name, eps in mechanism_epsilons(releases, budget).items():
                per_mechanism[name] = max(per_mechanism.get(name, 0.0), eps)
        planned = cls(cfg.unit, composition_for(how), cfg.relation, cfg.delta, cfg.budget,
                      per_mechanism, composed, how)
        if not planned.fits:
            raise ValueError(planned.refusal())
        return planned

    @property
    def fits(self) -> bool:
        return self.composed <= self.budget

    def describe(self) -> str:
        """The unit and what composes for it, in words."""
        if self.unit == "history":
            return "per agent's whole history"
        if self.composition == "batch" and self.training == "none":
            return "per episode (its batch's releases; the agents that release do not train)"
        if self.composition == "batch":
            return "per episode (its batch's releases; later ones are post-processing of DP-SGD)"
        return ("per episode, every release of the run composing (the networks that shape the "
                "releases train on it without DP-SGD)")

    def headline(self) -> str:
        """One line: what the run will spend for one unit, per mechanism and composed."""
        mechanisms = ", ".join(f"{k} {_eps(v)}" for k, v in self.epsilon.items())
        return (f"privacy plan {self.describe()}, {self.relation.replace('_', '-')}, delta "
                f"{self.delta:g}: {mechanisms or 'no releases'}; composed {_eps(self.composed)}")

    def refusal(self) -> str:
        mechanisms = ", ".join(f"{k} {_eps(v)}" for k, v in self.epsilon.items())
        advice = ("set --epsilon to split one budget over every mechanism (it turns DP-SGD on)"
                  if self.composed == math.inf else
                  "set --epsilon to calibrate every mechanism to the budget, raise "
                  "--epsilon-budget, or train fewer --env-steps")
        return (f"this run cannot fit its privacy budget {self.budget:g} {self.describe()}: "
                f"planned {mechanisms}; composed {_eps(self.composed)}; {advice}")


def plan_of(cfg: TrainConfig | FederationConfig) -> PrivacyPlan:
    """The plan of a centralized or federated run (``PrivacyPlan.of`` its schedule)."""
    train = cfg if isinstance(cfg, TrainConfig) else cfg.train
    return PrivacyPlan.of(train, Schedule.of(cfg))


def _eps(value: float) -> str:
    return "inf (no noise)" if value == math.inf else f"{value:.3g}"


DEFAULT_WEIGHTS = {"message": 0.5, "feedback": 0.25, "update": 0.25}
"""How one budget is split: each mechanism's own epsilon in proportion to its weight, scaled
until all of them compose to the budget."""


def calibrate(train: TrainConfig, schedule: Schedule) -> TrainConfig:
    """``train`` with the noise of every mechanism that has a target (or a part of
    ``epsilon``) calibrated, and ``privacy.split`` stating each one's epsilon alone."""
    cfg = train.privacy
    targets = {"message": cfg.message_epsilon, "feedback": cfg.feedback_epsilon,
               "update": cfg.update_target}
    if cfg.epsilon is None and all(t is None for t in targets.values()):
        return train
    # a calibrated update is DP-SGD's: then the episode's own batch is what composes
    dp_sgd = schedule.federated and (cfg.update_noise_multiplier is not None
                                     or cfg.epsilon is not None or cfg.update_target is not None)
    how: Training = ("dp_sgd" if dp_sgd and cfg.trains_releasing_agents
                     else training(train, schedule))
    if (train.team.feedback_clip >= UNCLIPPED
            and (cfg.epsilon is not None or cfg.feedback_epsilon is not None)):
        train = replace(train, team=replace(train.team, feedback_clip=PRIVATE_FEEDBACK_CLIP))
    per_agent = [unit_releases(train, schedule, i, how) for i in range(train.spec.n_agents)]
    mechanisms = _mechanisms(train, per_agent, how, targets)
    if cfg.epsilon is not None:
        calibrated_names = {m.name for m in mechanisms}
        parties = [sorted({r.mechanism for r in releases} & calibrated_names)
                   for releases in per_agent]
        split = split_budget(cfg.epsilon, cfg.delta, mechanisms, cfg.accountant, cfg.relation,
                             together=[p for p in parties if p])
        noise, stated = split.noise, split.epsilon
    else:
        acc = make_accountant(cfg.accountant)
        chosen = [m for m in mechanisms if m.target is not None]
        noise = {m.name: smallest_noise(lambda s, m=m: search_epsilon(
            m.releases(s), cfg.delta, acc, cfg.relation), m.target) for m in chosen}
        # stated by the run's accountant, which is what its report states
        stated = {m.name: _alone(train, m, noise[m.name]) for m in chosen}
    team, privacy = train.team, train.privacy
    if "message" in noise and team.channel == "discrete":
        team = replace(team, rr_epsilon=1 / noise["message"])
    elif "message" in noise:
        team = replace(team, noise_multiplier=noise["message"])
    if "feedback" in noise:
        team = replace(team, feedback_noise_multiplier=noise["feedback"])
    if "update" in noise:
        privacy = replace(privacy, update_noise_multiplier=noise["update"])
    return replace(train, team=team, privacy=replace(privacy, split=stated))


def _alone(train: TrainConfig, m: Mechanism, sigma: float) -> float:
    budget = PrivacyBudget(math.inf, train.privacy.delta, train.privacy.accountant,
                           train.privacy.relation)
    return budget.epsilon_of(m.releases(sigma))


def _mechanisms(train: TrainConfig, per_agent: list[list[GaussianRelease]], how: Training,
                targets: dict[str, float | None]) -> list[Mechanism]:
    """The mechanisms the planned run uses (``per_agent``: what composes for each agent's
    unit), each as what composes of it for the unit of the agent that releases most of it, at
    a noise multiplier."""
    cfg = train.privacy
    counts: dict[str, int] = {}
    for releases in per_agent:
        mine: dict[str, int] = {}
        for r in releases:
            mine[r.mechanism] = mine.get(r.mechanism, 0) + r.count
        for name, n in mine.items():
            counts[name] = max(counts.get(name, 0), n)
    q = update_sample_rate(cfg, train.ppo)
    make = {  # for randomized response the "noise" is 1 / epsilon per release
        "message": lambda s, n: [message_release(
            replace(train.team, noise_multiplier=s, rr_epsilon=1 / max(s, 1e-12)),
            cfg.relation, n)],
        "feedback": lambda s, n: [gaussian_release("feedback", s, train.team.feedback_clip,
                                                   relation=cfg.relation, count=n)],
        "update": lambda s, n: for_unit([gaussian_release(
            "update", s, cfg.update_clip, relation=cfg.relation, sample_rate=q,
            count=n)], cfg.unit, composition_for(how), train.num_envs),
    }
    out = []
    for name, count in counts.items():
        if name == "update" and how != "dp_sgd":
            continue  # plain PPO: nothing to calibrate (its epsilon is infinite)
        out.append(Mechanism(name, lambda s, name=name, count=count: make[name](s, count),
                             DEFAULT_WEIGHTS[name], targets[name]))
    return out
