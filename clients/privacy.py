"""One agent's privacy accounting: what a batch releases, checked and written down first.

Before an episode batch an agent knows everything it will release in it: ``T`` knowledge
vectors per episode if a kept route leaves its type towards another agent, one feedback
gradient per episode for each agent whose vectors can reach it, and the DP-SGD steps of its
update. All of them are checked against the budget and written to the agent's ledger (fsync'd,
hash-chained) before the batch starts, so a crash can over-count a release but never
under-count one. An agent whose next batch would exceed its budget releases nothing more.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from fedcomm.config import PPOConfig, TeamConfig
from fedcomm.models.parts import peers, shared_parts
from fedcomm.privacy.budget import BudgetExhausted, PrivacyAccount, PrivacyBudget, Spent
from fedcomm.privacy.config import PrivacyConfig
from fedcomm.privacy.events import (
    GaussianRelease,
    RandomizedResponse,
    Relation,
    Release,
    gaussian_release,
)
from fedcomm.privacy.ledger import Composition, Ledger, composes_every_release, config_hash
from fedcomm.privacy.noise import secure_generator
from fedcomm.sim.base import EnvSpec

LEDGER = "ledger.jsonl"
Training = Literal["dp_sgd", "plain", "none"]


@dataclass(frozen=True)
class DpSgd:
    """DP-SGD settings of a party's update (``clients/dpsgd.py``)."""

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
    it sends and the update. DP-SGD (``clients/dpsgd.py``) trains all of them, so under it, and
    without training, an episode's own batch is what composes; plain PPO trains them on the
    episode without DP, so every later release depends on it and all compose.
    """
    return "all" if training == "plain" else "batch"


def training_of(config: Mapping[str, Any]) -> Training:
    """How a run's agents train, from its configuration (``config.json``, a report's)."""
    if "training" in config:  # fedcomm agent
        return config["training"]
    if "batches_per_round" in config:  # federated
        dp = config["train"]["privacy"].get("update_noise_multiplier") is not None
        return "dp_sgd" if dp else "plain"
    return "plain"  # the centralized trainer: PPO on every network


def composition_of_config(config: Mapping[str, Any]) -> Composition:
    return composition_for(training_of(config))


def dp_steps(cfg: PPOConfig, sample_rate: float, statistics: bool = False) -> int:
    """DP-SGD steps of one update, known before it runs (the ledger is written first): an
    epoch is ``round(1 / sample_rate)`` steps, so each episode is sampled once per epoch in
    expectation, as each is once per epoch of ``ppo_update``; with ``statistics``, one more,
    which releases the batch's statistics (``clients.dpsgd.released_statistics``)."""
    check_sample_rate(sample_rate)
    return cfg.epochs * max(1, round(1 / sample_rate)) + int(statistics)


def check_sample_rate(sample_rate: float) -> None:
    if not 0 < sample_rate <= 1:
        raise ValueError(f"the sample rate must be in (0, 1], got {sample_rate}")


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


def update_releases(cfg: PrivacyConfig, ppo: PPOConfig) -> list[GaussianRelease]:
    """What one batch's update releases to the server: DP-SGD steps, each a Poisson-sampled
    Gaussian release; without DP-SGD, one release without noise (epsilon infinite)."""
    dp = update_dp(cfg, ppo)
    if dp is None:
        return [gaussian_release("update", 0.0, ppo.max_grad_norm, relation=cfg.relation)]
    return [gaussian_release("update", dp.noise_multiplier, dp.clip, relation=cfg.relation,
                             sample_rate=dp.sample_rate,
                             count=dp_steps(ppo, dp.sample_rate, dp.statistics))]


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


class AgentPrivacy:
    """The ledger, the odometer and the noise source of one agent.

    Parameters
    ----------
    agent, index
        The agent's id and its index in ``spec``.
    team
        The channel settings (noise multipliers and clip norms of vectors and feedback).
    cfg
        The run's privacy settings.
    ledger_path
        The agent's ledger; an existing one is verified and continued.
    run_config
        The run configuration every ledger entry is bound to by its hash.
    device
        Where the noise is drawn: the device the agent's vectors are on.
    composition
        Which of its releases compose for a unit (``composition_for`` its training).
    episodes
        Episodes per batch: what each release counts for the unit (``for_unit``).
    seeded_noise
        Draw the noise from the agent's seeded stream instead of its secure source: test
        randomness, marked in every ledger entry (``fedcomm audit`` fails such a run).
    """

    def __init__(self, agent: str, index: int, spec: EnvSpec, team: TeamConfig,
                 cfg: PrivacyConfig, ledger_path: Path, run_config: dict[str, Any],
                 device: str | torch.device = "cpu", composition: Composition = "batch",
                 episodes: int = 1, seeded_noise: bool = False) -> None:
        self.agent, self.index, self.spec, self.team, self.cfg = agent, index, spec, team, cfg
        self.composition, self.episodes = composition, episodes
        self.ledger = Ledger(ledger_path, agent, config_hash(run_config),
                             noise="seeded" if seeded_noise else "secure")
        budget = PrivacyBudget(cfg.budget, cfg.delta, cfg.accountant, cfg.relation)
        self.account = PrivacyAccount.from_ledger(self.ledger.entries, budget, cfg.unit, agent,
                                                  composition)
        self.noise = None if seeded_noise else secure_generator(device=device)

    def batch_releases(self, routes: Tensor, extra: Sequence[GaussianRelease] = ()
                       ) -> list[GaussianRelease]:
        """Everything the agent releases in one episode batch under ``routes``, plus ``extra``
        (its DP-SGD steps), as they cost one unit."""
        releases = batch_releases(self.spec, self.team, self.cfg.relation, routes, self.index,
                                  extra)
        return for_unit(releases, self.cfg.unit, self.composition, self.episodes)

    @property
    def next_batch(self) -> int:
        """The batch number after the last one in the ledger (0 for an empty ledger)."""
        entries = self.ledger.entries
        return entries[-1]["batch"] + 1 if entries else 0

    def allows(self, releases: Sequence[GaussianRelease], *, batch: int) -> bool:
        """Whether the budget allows ``releases``; ``False``: the agent must stay silent
        (``on_budget_spent="stop"`` raises instead). Nothing is written."""
        try:
            self.account.check(releases, batch=batch)
        except BudgetExhausted:
            if self.cfg.on_budget_spent == "stop":
                raise
            return False
        return True

    def charge(self, releases: Sequence[GaussianRelease], *, round: int, batch: int) -> None:
        """Write ``releases`` before they happen (raises BudgetExhausted if not allowed)."""
        if releases:
            self.account.spend(self.ledger, releases, round=round, batch=batch)

    def spent(self) -> Spent:
        return self.account.spent()

    def close(self) -> None:
        self.ledger.close()


def write_run_report(run_dir: Path, run_config: dict[str, Any], team: TeamConfig,
                     cfg: PrivacyConfig, ledgers: dict[str, Path],
                     mechanisms: Sequence[str] = ("message", "feedback", "update"),
                     ppo: PPOConfig | None = None,
                     extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``privacy_report.json`` and ``privacy_report.html`` of a finished (or stopped) run;
    ``extra`` adds to what the report states about the run (its silent batches)."""
    from fedcomm.privacy.report import RunInfo, build_report, render_html, write_report

    composition = composition_of_config(run_config)
    declared = declared_mechanisms(team, cfg, ppo or PPOConfig(), composition)
    stated = {"split": cfg.split} if cfg.split else {}
    run = RunInfo(config=run_config, delta=cfg.delta, budget=cfg.budget,
                  mechanisms={k: declared[k] for k in mechanisms}, accountant=cfg.accountant,
                  unit=cfg.unit, relation=cfg.relation,
                  composition=composition, extra={**stated, **(extra or {})})
    report = build_report({a: p for a, p in ledgers.items() if p.exists()}, run, run_dir)
    write_report(report, run_dir)
    render_html(report, run_dir / "privacy_report.html")
    return report


def report_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The figures a run's summary states: the largest epsilon over agents, per mechanism and
    composed, with the unit, relation and delta they hold for."""
    run, agents = report["run"], report["agents"].values()
    per_mechanism: dict[str, float] = {}
    for agent in agents:
        for name, section in agent["mechanisms"].items():
            per_mechanism[name] = max(per_mechanism.get(name, 0.0), float(section["epsilon"]))
    budgets = [float(a["budget"]["epsilon"]) for a in agents]
    return {"unit": run["unit"], "composition": run.get("composition", "batch"),
            "relation": run["relation"], "delta": run["delta"], "epsilon": per_mechanism,
            "budget": min(budgets, default=math.inf), "split": run.get("split"),
            "composed": max((float(a["composed"]["epsilon"]) for a in agents), default=0.0),
            "within_budget": report["verdict"]["within_budget"]}
