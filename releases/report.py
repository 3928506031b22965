"""A finished run's privacy report, from every agent's ledger: what the run states and sums up.

The library builds a report (``privacy.report``), renders it (``privacy.page``) and audits it;
this module says what a fedcomm run declares in it (its mechanisms and their parameters, the
unit and what composes for it, the budget's split, the fields the agents sent the server) and
what a run's summary states of it; and what the server of a federated run aggregates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedcomm.config import FederationConfig, PPOConfig, TeamConfig
from fedcomm.privacy.config import PrivacyConfig
from fedcomm.releases.schedule import (
    RECEIVER_PARTS,
    SENDER_PARTS,
    composition_of_config,
    declared_mechanisms,
    initial_routes,
    shared_parts,
)


def write_run_report(run_dir: Path, run_config: dict[str, Any], team: TeamConfig,
                     cfg: PrivacyConfig, ledgers: dict[str, Path],
                     mechanisms: Sequence[str] = ("message", "feedback", "update"),
                     ppo: PPOConfig | None = None,
                     extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``privacy_report.json`` and ``privacy_report.html`` of a finished (or stopped) run;
    ``extra`` adds to what the report states about the run (its silent batches)."""
    from fedcomm.privacy.page import render_html
    from fedcomm.privacy.report import RunInfo, build_report, write_report

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


def aggregated_parts(fed: FederationConfig) -> list[str]:
    """The networks the server of ``fed`` aggregates: the parts of the shared module any agent
    sends it (``releases.schedule.shared_parts``), and each type's private networks with
    ``aggregate_private``; empty where it aggregates nothing."""
    routes = initial_routes(fed.train)
    sent = {part for i in range(fed.spec.n_agents)
            for part in shared_parts(fed.spec, fed.share, routes, i)}
    parts = [part for part in (*SENDER_PARTS, *RECEIVER_PARTS) if part in sent]
    return parts + (["private networks"] if fed.aggregate_private else [])


def server_text(fed: FederationConfig) -> str:
    """What the server of ``fed`` does with the agents' networks, in words: aggregates nothing,
    or which parts by which strategy and rule."""
    parts = aggregated_parts(fed)
    if not parts:
        return "server aggregates nothing"
    if parts[:len(SENDER_PARTS) + len(RECEIVER_PARTS)] == [*SENDER_PARTS, *RECEIVER_PARTS]:
        parts = ["the whole shared module", *parts[len(SENDER_PARTS) + len(RECEIVER_PARTS):]]
    rule = fed.strategy if fed.aggregation == "mean" else f"{fed.strategy}, {fed.aggregation}"
    noise = (f", client-level DP noise {fed.client_dp_noise:g}" if fed.client_dp_noise else "")
    return f"server aggregates ({rule}{noise}) {', '.join(parts)}"
