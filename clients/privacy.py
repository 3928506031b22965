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
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fedcomm.clients.party import DpSgd
from fedcomm.config import PPOConfig, TeamConfig
from fedcomm.privacy.budget import BudgetExhausted, PrivacyAccount, PrivacyBudget, Spent
from fedcomm.privacy.calibrate import noise_for_epsilon
from fedcomm.privacy.config import PrivacyConfig
from fedcomm.privacy.events import GaussianRelease, gaussian_release
from fedcomm.privacy.ledger import Ledger, config_hash
from fedcomm.privacy.noise import secure_generator
from fedcomm.sim.base import EnvSpec

LEDGER = "ledger.jsonl"


def message_noise(cfg: PrivacyConfig, spec: EnvSpec) -> float:
    """The smallest noise multiplier whose ``T`` vectors per episode cost ``message_epsilon``."""
    assert cfg.message_epsilon is not None
    return noise_for_epsilon(cfg.message_epsilon, cfg.delta, count=spec.episode_length,
                             relation=cfg.relation, accountant=cfg.accountant)


def calibrated(team: TeamConfig, ppo: PPOConfig, cfg: PrivacyConfig, spec: EnvSpec
               ) -> tuple[TeamConfig, PrivacyConfig]:
    """The channel and update noise multipliers that meet the configured target epsilons.

    Feedback is calibrated for an agent that every other agent's vectors reach (``N - 1``
    releases per episode), the update for one batch's DP-SGD steps.
    """
    def noise(target: float, **release: float) -> float:
        return noise_for_epsilon(target, cfg.delta, relation=cfg.relation,
                                 accountant=cfg.accountant, **release)

    if cfg.message_epsilon is not None:
        team = replace(team, noise_multiplier=message_noise(cfg, spec))
    if cfg.feedback_epsilon is not None:
        team = replace(team, feedback_noise_multiplier=noise(cfg.feedback_epsilon,
                                                             count=spec.n_agents - 1))
    if cfg.update_epsilon is not None:
        from fedcomm.clients.dpsgd import dp_steps

        q = update_sample_rate(cfg, ppo)
        cfg = replace(cfg, update_noise_multiplier=noise(
            cfg.update_epsilon, sample_rate=q, count=dp_steps(ppo, q)))
    return team, cfg


def declared_mechanisms(team: TeamConfig, cfg: PrivacyConfig, ppo: PPOConfig | None = None
                        ) -> dict[str, dict[str, Any]]:
    """What the run declares about each mechanism: the audit checks every entry against it."""
    out = {"message": {"noise_multiplier": team.noise_multiplier, "clip": team.clip},
           "feedback": {"noise_multiplier": team.feedback_noise_multiplier,
                        "clip": team.feedback_clip}}
    if ppo is not None:
        if cfg.update_noise_multiplier is None:
            out["update"] = {"noise_multiplier": 0.0, "clip": ppo.max_grad_norm}
        else:
            out["update"] = {"noise_multiplier": cfg.update_noise_multiplier,
                             "clip": cfg.update_clip,
                             "sample_rate": update_sample_rate(cfg, ppo)}
    return out


def update_sample_rate(cfg: PrivacyConfig, ppo: PPOConfig) -> float:
    return cfg.update_sample_rate or 1.0 / ppo.minibatches


def update_dp(cfg: PrivacyConfig, ppo: PPOConfig) -> DpSgd | None:
    """The DP-SGD settings of a federated agent's update, if it is private."""
    if cfg.update_noise_multiplier is None:
        return None
    return DpSgd(cfg.update_noise_multiplier, cfg.update_clip, update_sample_rate(cfg, ppo))


def update_releases(cfg: PrivacyConfig, ppo: PPOConfig) -> list[GaussianRelease]:
    """What one batch's update releases to the server: DP-SGD steps, each a Poisson-sampled
    Gaussian release; without DP-SGD, one release without noise (epsilon infinite)."""
    dp = update_dp(cfg, ppo)
    if dp is None:
        return [gaussian_release("update", 0.0, ppo.max_grad_norm, relation=cfg.relation)]
    from fedcomm.clients.dpsgd import dp_steps

    return [gaussian_release("update", dp.noise_multiplier, dp.clip, relation=cfg.relation,
                             sample_rate=dp.sample_rate, count=dp_steps(ppo, dp.sample_rate))]


def peers(spec: EnvSpec, routes: Tensor, index: int) -> tuple[int, int]:
    """How many other agents ``index``'s vectors can reach, and how many can reach it."""
    routes = routes.cpu()
    types = torch.tensor(spec.type_of_agent)
    others = torch.arange(spec.n_agents) != index
    k = spec.type_of_agent[index]
    reach = int((routes[k, types] & others).sum())
    reached_by = int((routes[types, k] & others).sum())
    return reach, reached_by


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
    """

    def __init__(self, agent: str, index: int, spec: EnvSpec, team: TeamConfig,
                 cfg: PrivacyConfig, ledger_path: Path, run_config: dict[str, Any],
                 device: str | torch.device = "cpu") -> None:
        self.agent, self.index, self.spec, self.team, self.cfg = agent, index, spec, team, cfg
        ledger_path.parent.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(ledger_path, agent, config_hash(run_config))
        budget = PrivacyBudget(cfg.epsilon_budget or math.inf, cfg.delta, cfg.accountant,
                               cfg.relation)
        self.account = PrivacyAccount.from_ledger(self.ledger.entries, budget, cfg.unit, agent)
        self.noise = None if cfg.seeded_noise else secure_generator(device=device)

    def batch_releases(self, routes: Tensor, extra: Sequence[GaussianRelease] = ()
                       ) -> list[GaussianRelease]:
        """Everything the agent releases in one episode batch under ``routes``, plus ``extra``
        (its DP-SGD steps)."""
        reach, reached_by = peers(self.spec, routes, self.index)
        out = []
        if reach:
            out.append(gaussian_release("message", self.team.noise_multiplier, self.team.clip,
                                        relation=self.cfg.relation,
                                        count=self.spec.episode_length))
        if reached_by:
            out.append(gaussian_release("feedback", self.team.feedback_noise_multiplier,
                                        self.team.feedback_clip, relation=self.cfg.relation,
                                        count=reached_by))
        return out + list(extra)

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
                     ppo: PPOConfig | None = None) -> dict[str, Any]:
    """``privacy_report.json`` and ``privacy_report.html`` of a finished (or stopped) run."""
    from fedcomm.privacy.report import RunInfo, build_report, render_html, write_report

    declared = declared_mechanisms(team, cfg, ppo or PPOConfig())
    run = RunInfo(config=run_config, delta=cfg.delta, budget=cfg.epsilon_budget or math.inf,
                  mechanisms={k: declared[k] for k in mechanisms}, accountant=cfg.accountant,
                  unit=cfg.unit, relation=cfg.relation)
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
    return {"unit": run["unit"], "relation": run["relation"], "delta": run["delta"],
            "epsilon": per_mechanism,
            "composed": max((float(a["composed"]["epsilon"]) for a in agents), default=0.0),
            "within_budget": report["verdict"]["within_budget"]}
