"""What a finished run says about itself (``summary.json``): one type for every mode.

The centralized trainer and a federated run (simulated or deployed) write the same summary:
the trained team's greedy return against the scripted baselines and the share of the
no_comm -> oracle gap it closes, what training cost, the graph it learned, the communication
importance it measured, and what it spent in privacy. Fields a mode does not have are left out
of the file.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

import torch

from fedcomm.baselines import EvalResult, baseline_summary
from fedcomm.jsonfile import number

Mode = Literal["centralized", "federated"]


@dataclass
class RunSummary:
    """A finished run's figures.

    Parameters
    ----------
    env, mode
        The environment and how it was trained.
    final, baselines
        The trained team's greedy evaluation (``None`` on a server whose private agents keep
        their returns: whoever runs every party adds it, ``with_final``), and each scripted
        team's.
    missing_baselines, gap_closed
        The scripted teams the environment lacks, and the share of the no_comm -> oracle gap
        closed (``None`` where either is missing or they score the same).
    ceiling_gap_closed, of_ceiling
        Where the run's channel has a ceiling (``baselines["ceiling"]``, a DP ceiling where the
        run is private): the share of the no_comm -> oracle gap the ceiling closes, and the
        share of the no_comm -> ceiling gap the trained team closes.
    env_steps, train_time_s, wall_time_s, env_steps_per_s, agent_steps_per_s
        What training took: environment steps, seconds in training (evaluations excluded),
        seconds in all, and the rates.
    agent_types, route_strength, kept_routes
        The learned communication graph, sender type by receiver type.
    iterations
        Centralized: episode batches trained.
    rounds, strategy, batches_per_round, round_time, aggregated
        Federated: rounds done, the aggregation, the median seconds of each part of a round
        (rounds after the first), and what the server averaged among whom, in words.
    silent_batches
        Federated: per agent that stayed silent (its privacy budget spent), the training
        batches in which it did.
    device, importance, privacy, stopped
        Where it ran; each sender type's counterfactual importance to each receiver type;
        the privacy report's figures (``releases.report.report_summary``); why training
        stopped early, if it did.
    ledgers
        Federated: each agent's ledger (entries, last hash) as its last reply stated it,
        after the final evaluation: what an audit requires each ledger to extend.
    """

    env: str
    mode: Mode
    final: EvalResult | None
    baselines: dict[str, EvalResult]
    missing_baselines: list[str]
    gap_closed: float | None
    env_steps: int
    train_time_s: float
    wall_time_s: float
    env_steps_per_s: float
    agent_steps_per_s: float
    agent_types: list[str]
    route_strength: list[list[float]]
    kept_routes: list[list[bool]]
    iterations: int | None = None
    rounds: int | None = None
    strategy: str | None = None
    batches_per_round: int | None = None
    round_time: dict[str, float | None] | None = None
    aggregated: str | None = None
    silent_batches: dict[str, int] | None = None
    device: str | None = None
    importance: list[list[float]] | None = None
    privacy: dict[str, Any] | None = None
    stopped: str | None = None
    ceiling_gap_closed: float | None = None
    of_ceiling: float | None = None
    ledgers: dict[str, list] | None = None

    @classmethod
    def of(cls, *, final: EvalResult | None, baselines: dict[str, EvalResult],
           env_steps: int, train_time_s: float, n_agents: int, route_strength: torch.Tensor,
           prune_threshold: float, **rest: Any) -> RunSummary:
        """A summary with what follows from the figures computed: the gap closed, the rates
        and the kept routes."""
        rate = env_steps / max(train_time_s, 1e-9)
        summary = cls(final=None, baselines=baselines, missing_baselines=[], gap_closed=None,
                      env_steps=env_steps, train_time_s=train_time_s, env_steps_per_s=rate,
                      agent_steps_per_s=rate * n_agents,
                      route_strength=route_strength.tolist(),
                      kept_routes=(route_strength > prune_threshold).tolist(), **rest)
        return summary.with_final(final)

    def with_final(self, final: EvalResult | None) -> RunSummary:
        """The summary with the trained team's evaluation ``final`` and the gaps it closes."""
        gap = baseline_summary(final, self.baselines)
        return replace(self, final=final, missing_baselines=gap["missing_baselines"],
                       gap_closed=gap["gap_closed"],
                       ceiling_gap_closed=gap.get("ceiling_gap_closed"),
                       of_ceiling=gap.get("of_ceiling"))

    @property
    def private(self) -> bool:
        """Whether what the run released holds a finite composed epsilon (a DP guarantee, if
        perhaps a weak one); a run that released nothing holds one trivially, a run without a
        privacy report (an old one) is not taken for private."""
        return self.privacy is not None and number(self.privacy["composed"]) < math.inf

    @property
    def released_nothing(self) -> bool:
        """Whether no agent released anything through a privacy mechanism (every ledger is
        empty)."""
        return self.privacy is not None and not self.privacy.get("epsilon")

    def utility(self) -> dict[str, float]:
        """The gap closed, and against the channel's ceiling, for the privacy report."""
        return {k: v for k, v in (("gap_closed", self.gap_closed),
                                  ("ceiling_gap_closed", self.ceiling_gap_closed),
                                  ("of_ceiling", self.of_ceiling)) if v is not None}

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if v is not None}
        out["gap_closed"] = self.gap_closed  # stated even where undefined
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunSummary:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        final = d.get("final")
        return cls(**{**d, "final": None if final is None else EvalResult.from_dict(final),
                      "baselines": {k: EvalResult.from_dict(v)
                                    for k, v in d["baselines"].items()}})


@dataclass
class RunResult:
    """A finished run: where it is and what it says about itself."""

    run_dir: Path
    summary: RunSummary
    metrics: list[dict[str, Any]]

    @property
    def final(self) -> EvalResult | None:
        return self.summary.final

    @property
    def baselines(self) -> dict[str, EvalResult]:
        return self.summary.baselines
