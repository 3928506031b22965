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
    averages_private,
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


CLIENT_LEVEL_REPORT = "client_dp_report.json"


def write_client_level_report(run_dir: Path, fed: FederationConfig,
                              ledgers: Mapping[str, Path],
                              releases: Sequence[Any] = ()) -> dict[str, Any]:
    """``client_dp_report.json`` (and ``.html``): each agent's client-level epsilon of the
    aggregated module over its whole participation (unit ``history``, replace-one), from
    ``ledgers``: the server's (server-side client-level DP) or the agents' own (distributed,
    under secure aggregation: Skellam releases, which only the RDP accountant composes, each
    cohort's declared as ``releases``)."""
    from fedcomm.privacy.page import render_html
    from fedcomm.privacy.report import RunInfo, build_report, write_report

    privacy, clip = fed.train.privacy, fed.client_dp_clip
    declared: dict[str, Any] = {"noise_multiplier": fed.client_dp_noise, "clip": clip}
    if fed.secure_aggregation:
        declared |= {"kind": "skellam", "added_by": "agents, each a share for the threshold"}
        for key in ("variance", "l2_sensitivity", "l1_sensitivity"):  # each cohort's release
            if releases:
                declared[key] = [float(getattr(r, key)) for r in releases]
        mechanism, accountant = "each agent's update with its share of Skellam noise, summed " \
            "under SecAgg+", "rdp"
    else:
        declared |= {"sensitivity": 2 * clip}
        mechanism, accountant = "client-level DP of the shared module on the server", \
            privacy.accountant
    run = RunInfo(config=fed.to_dict(), delta=privacy.delta, budget=math.inf,
                  mechanisms={"client_update": declared}, accountant=accountant,
                  unit="history", relation="replace_one", composition="all",
                  extra={"mechanism": mechanism})
    report = build_report({a: p for a, p in ledgers.items() if p.exists()}, run, run_dir)
    path = write_report(report, Path(run_dir) / CLIENT_LEVEL_REPORT)
    render_html(report, path.with_suffix(".html"))
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


def server_text(fed: FederationConfig) -> str:
    """What the server of ``fed`` does with the agents' networks, in words: aggregates nothing,
    or which parts among whom, by which strategy and rule."""
    groups = aggregation_groups(fed)
    routes = initial_routes(fed.train)
    private = [i for i in range(fed.spec.n_agents)
               if averages_private(fed.spec, fed.share, fed.aggregate_private, routes, i)]
    if not groups and not private:
        return "server aggregates nothing"
    whole = (*SENDER_PARTS, *RECEIVER_PARTS)
    if fed.share == "role" and all(parts == whole for parts, _ in groups):
        text = ("each type's copy of the shared module among its agents: "
                + ", ".join(who for _, who in groups))
    else:
        text = "; ".join(f"{'the whole shared module' if parts == whole else ', '.join(parts)}"
                         f"{' (its type copy)' if fed.share == 'role' else ''} among {who}"
                         for parts, who in groups)
    if private:
        text += (("; " if text else "") + f"the private networks of {_who(fed, private)}"
                 " (each type's among its own)")
    rule = fed.strategy if fed.aggregation == "mean" else f"{fed.strategy}, {fed.aggregation}"
    noise = (f", client-level DP noise {fed.client_dp_noise:g}" if fed.client_dp_noise else "")
    secure = ", SecAgg+: sums only" if fed.secure_aggregation else ""
    return f"server aggregates ({rule}{noise}{secure}) {text}"


def aggregation_groups(fed: FederationConfig) -> list[tuple[tuple[str, ...], str]]:
    """The parts of the shared module the server aggregates together, and among whom, in
    words (``"8 speakers"``, ``"all 7 agents"``): one group per set of agents that send the
    same parts (with ``share="role"``, per type: each type's copy)."""
    routes = initial_routes(fed.train)
    spec = fed.spec
    senders: dict[tuple[str, int | None], list[int]] = {}
    for i in range(spec.n_agents):
        kind = spec.type_of_agent[i] if fed.share == "role" else None
        for part in shared_parts(spec, fed.share, routes, i):
            senders.setdefault((part, kind), []).append(i)
    groups: dict[tuple[int, ...], list[str]] = {}
    for (part, _), agents in senders.items():
        groups.setdefault(tuple(agents), []).append(part)
    order = (*SENDER_PARTS, *RECEIVER_PARTS)
    return [(tuple(sorted(parts, key=order.index)), _who(fed, list(agents)))
            for agents, parts in groups.items()]


def _who(fed: FederationConfig, agents: list[int]) -> str:
    spec = fed.spec
    if len(agents) == spec.n_agents:
        return f"all {len(agents)} agents"
    counts: dict[str, int] = {}
    for i in agents:
        name = spec.types[spec.type_of_agent[i]].name
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{n} {name}{'s' if n > 1 else ''}" for name, n in counts.items())
