"""The run's privacy report: ``privacy_report.json`` and a page a person reads.

Schema ``fedcomm.privacy_report/1`` (all epsilons rounded up to 1e-6, remaining budgets down)::

    {
      "schema": "fedcomm.privacy_report/1",
      "created": ISO-8601 time,
      "run": {
        "config": {...}, "config_hash": sha256 of the canonical JSON of "config",
        "accountant": {"name": "rdp" | "pld" | "prv" | "exact", ...options},
        "delta": float, "unit": "episode" | "history", "relation": "replace_one" | "add_remove",
        "mechanisms": {name: declared parameters: noise_multiplier, clip, sensitivity,
                       sample_rate (a number, or a list of allowed numbers), relation},
        "rounding": str
      },
      "agents": {
        agent: {
          "ledger": {"path": relative to the report's folder, "entries": int,
                     "final_hash": str},
          "budget": {"epsilon": float, "delta": float},
          "mechanisms": {
            name: {"relation", "unit", "sampling": "none" | "poisson",
                   "accountant", "delta", "epsilon", "releases" (ledger entries),
                   "count" (releases counted with multiplicity),
                   "parameters": [{"noise_multiplier", "clip", "sensitivity", "sample_rate",
                                   "releases", "count"}],
                   "epsilon_over_rounds": [{"round", "epsilon"}]}
          },
          "composed": {"relation", "epsilon", "delta", "budget", "remaining",
                       "within_budget", "epsilon_over_rounds": [{"round", "epsilon"}]}
        }
      },
      "verdict": {"within_budget": bool, "agents_over_budget": [agent, ...]}
    }

Semantics: per mechanism, epsilon is that mechanism's releases alone under its own relation;
"composed" is all of an agent's releases under the run's relation. For the unit "episode" the
releases of one batch compose and the figure is the largest over batches; for "history" all
releases compose. ``epsilon_over_rounds`` gives the figure after each round (at most
``curve_points`` rounds, always the last); its last point equals ``epsilon``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .accountants import Accountant, make_accountant
from .budget import PrivacyBudget, floor_eps
from .events import GaussianRelease, Relation, check_relation, merge
from .ledger import (
    UNITS,
    LedgerError,
    Unit,
    config_hash,
    read_ledger,
    release_from_entry,
    verify_chain,
)

SCHEMA = "fedcomm.privacy_report/1"
REPORT_NAME = "privacy_report.json"
ROUNDING = "epsilon rounded up to 1e-6; remaining budget rounded down to 1e-6"


@dataclass(frozen=True)
class RunInfo:
    """What the report states about the run besides the ledgers.

    Parameters
    ----------
    config
        The run configuration (JSON values); its hash must match every ledger entry.
    delta
        Delta of every reported epsilon.
    budget
        Epsilon budget: one number for every agent, or a mapping agent -> epsilon.
    mechanisms
        Declared parameters per mechanism, checked against every entry by the audit: any of
        ``noise_multiplier``, ``clip``, ``sensitivity``, ``sample_rate`` (a number, or a list
        of allowed numbers for a schedule) and ``relation`` (default: ``relation``).
    accountant
        Accountant name or instance.
    unit, relation
        Privacy unit and neighbouring relation of the composed guarantee.
    """

    config: Mapping[str, Any]
    delta: float
    budget: float | Mapping[str, float]
    mechanisms: Mapping[str, Mapping[str, Any]]
    accountant: str | Accountant = "rdp"
    unit: Unit = "episode"
    relation: Relation = "replace_one"
    extra: Mapping[str, Any] = field(default_factory=dict)

    def budget_for(self, agent: str) -> float:
        """Epsilon budget of ``agent``."""
        if isinstance(self.budget, Mapping):
            return float(self.budget[agent])
        return float(self.budget)


class _Cached:
    """Epsilon of a release sequence, cached by its merged form (identical batches share)."""

    def __init__(self, fn: Callable[[list[GaussianRelease]], float]) -> None:
        self.fn, self.cache = fn, {}

    def __call__(self, releases: list[GaussianRelease]) -> float:
        key = tuple(sorted(merge(releases), key=repr))
        if key not in self.cache:
            self.cache[key] = self.fn(releases)
        return self.cache[key]


def _groups(items: Sequence[tuple[dict, GaussianRelease]], unit: str
            ) -> dict[int | None, list[tuple[dict, GaussianRelease]]]:
    groups: dict[int | None, list[tuple[dict, GaussianRelease]]] = {}
    for entry, release in items:
        groups.setdefault(entry["batch"] if unit == "episode" else None, []).append(
            (entry, release))
    return groups


def _thin(rounds: list[int], points: int) -> list[int]:
    if len(rounds) <= points:
        return rounds
    step = (len(rounds) - 1) / (points - 1)
    return sorted({rounds[math.floor(i * step)] for i in range(points - 1)} | {rounds[-1]})


def epsilon_curve(items: Sequence[tuple[dict, GaussianRelease]], unit: str,
                  epsilon: Callable[[list[GaussianRelease]], float],
                  points: int) -> list[dict[str, Any]]:
    """Spent epsilon after each round: the largest over groups of the releases so far."""
    groups = _groups(items, unit)
    rounds = sorted({entry["round"] for entry, _ in items})
    curve = []
    for r in _thin(rounds, points):
        spent = 0.0
        for group in groups.values():
            releases = [rel for entry, rel in group if entry["round"] <= r]
            if releases:
                spent = max(spent, epsilon(releases))
        curve.append({"round": r, "epsilon": spent})
    return curve


def agent_section(entries: Sequence[dict[str, Any]], run: RunInfo, budget: float,
                  curve_points: int = 50) -> dict[str, Any]:
    """The ``mechanisms`` and ``composed`` parts of one agent's report from its entries."""
    pb = PrivacyBudget(budget, run.delta, run.accountant, run.relation)
    acc = pb.accountant
    assert isinstance(acc, Accountant)
    items = [(e, release_from_entry(e)) for e in entries]
    composed_eps = _Cached(pb.epsilon_of)
    mechanisms = {}
    for name in sorted({e["mechanism"] for e in entries}):
        mine = [(e, r) for e, r in items if e["mechanism"] == name]
        relations = {r.relation for _, r in mine}
        relation = relations.pop() if len(relations) == 1 else run.relation
        eps = _Cached(lambda rs, rel=relation: acc.epsilon([r.as_relation(rel) for r in rs],
                                                          run.delta))
        curve = epsilon_curve(mine, run.unit, eps, curve_points)
        parameters: dict[tuple, dict[str, Any]] = {}
        for e, _ in mine:
            key = (e["noise_multiplier"], e["clip"], e["sensitivity"], e["sample_rate"])
            p = parameters.setdefault(key, dict(zip(
                ("noise_multiplier", "clip", "sensitivity", "sample_rate"), key),
                releases=0, count=0))
            p["releases"] += 1
            p["count"] += e["count"]
        mechanisms[name] = {
            "relation": relation, "unit": run.unit,
            "sampling": "poisson" if any(r.sampled for _, r in mine) else "none",
            "accountant": acc.describe(), "delta": run.delta,
            "epsilon": curve[-1]["epsilon"], "releases": len(mine),
            "count": sum(e["count"] for e, _ in mine),
            "parameters": list(parameters.values()), "epsilon_over_rounds": curve,
        }
    curve = epsilon_curve(items, run.unit, composed_eps, curve_points) if items else []
    eps = curve[-1]["epsilon"] if curve else 0.0
    return {
        "budget": {"epsilon": budget, "delta": run.delta},
        "mechanisms": mechanisms,
        "composed": {
            "relation": run.relation, "epsilon": eps, "delta": run.delta, "budget": budget,
            "remaining": floor_eps(max(budget - eps, 0.0)), "within_budget": eps <= budget,
            "epsilon_over_rounds": curve,
        },
    }


def verdict(agents: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Whether every agent stayed within its budget."""
    over = sorted(a for a, s in agents.items() if not s["composed"]["within_budget"])
    return {"within_budget": not over, "agents_over_budget": over}


def build_report(ledgers: Mapping[str, Path | str], run: RunInfo, report_dir: Path | str,
                 curve_points: int = 50) -> dict[str, Any]:
    """Build the report from each agent's ledger (``agent -> path``).

    ``report_dir`` is where the report will be written: ledger paths are stored relative to
    it. Raises :class:`~fedcomm.privacy.ledger.LedgerError` if a ledger's chain is broken.
    """
    if run.unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {run.unit!r}")
    check_relation(run.relation)
    if curve_points < 2:
        raise ValueError("curve_points must be at least 2")
    accountant = make_accountant(run.accountant)
    run = replace(run, accountant=accountant)
    agents = {}
    for agent, path in sorted(ledgers.items()):
        entries = read_ledger(path)
        problems = verify_chain(entries)
        if problems:
            raise LedgerError(f"{path}: " + "; ".join(problems))
        section = agent_section(entries, run, run.budget_for(agent), curve_points)
        agents[agent] = {
            "ledger": {"path": os.path.relpath(path, report_dir), "entries": len(entries),
                       "final_hash": entries[-1]["hash"] if entries else None},
            **section,
        }
    return {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run": {
            "config": dict(run.config), "config_hash": config_hash(run.config),
            "accountant": accountant.describe(), "delta": run.delta, "unit": run.unit,
            "relation": run.relation,
            "mechanisms": {k: dict(v) for k, v in run.mechanisms.items()},
            "curve_points": curve_points, "rounding": ROUNDING, **dict(run.extra),
        },
        "agents": agents,
        "verdict": verdict(agents),
    }


def write_report(report: Mapping[str, Any], path: Path | str) -> Path:
    """Write ``report`` as JSON to ``path`` (a folder gets ``privacy_report.json``)."""
    path = Path(path)
    if path.is_dir():
        path = path / REPORT_NAME
    path.write_text(json.dumps(report, indent=2, sort_keys=True, allow_nan=False) + "\n")
    return path


def run_info_from_report(report: Mapping[str, Any]) -> RunInfo:
    """The :class:`RunInfo` a report was built with."""
    run = report["run"]
    options = {k: v for k, v in run["accountant"].items() if k != "name"}
    return RunInfo(
        config=run["config"], delta=run["delta"],
        budget={a: s["budget"]["epsilon"] for a, s in report["agents"].items()},
        mechanisms=run["mechanisms"],
        accountant=make_accountant(run["accountant"]["name"], **options),
        unit=run["unit"], relation=run["relation"])


# --- HTML -----------------------------------------------------------------------------------

_UNIT_WORDS = {
    "episode": ("one episode of the agent's experience (its observations and actions in one "
                "episode). Every episode is used in one training batch, so the releases that "
                "compose are those of that batch: the message vectors, the feedback and the "
                "DP-SGD steps of the batch."),
    "history": "the agent's whole history: all its releases over the run compose.",
}
_RELATION_WORDS = {
    "replace_one": ("replace-one: the guarantee compares two histories that differ in one unit "
                    "replaced by any other; a clipped value can move by twice the clip norm."),
    "add_remove": ("add/remove: the guarantee compares two histories that differ by one unit "
                   "present or absent."),
}


def _assumptions(run: Mapping[str, Any]) -> list[str]:
    return [
        f"Privacy unit: {_UNIT_WORDS[run['unit']]}",
        f"Neighbouring relation: {_RELATION_WORDS[run['relation']]} Mechanisms accounted "
        "under another relation alone (DP-SGD under add/remove, as Opacus does) are "
        "re-analysed under this one for the composed figure.",
        "Protected: the unit's data, against everyone who sees the released values: peers "
        "receiving message vectors and feedback, and the server, which sees only the "
        "shared module trained with DP-SGD. Each release was written to the agent's "
        "hash-chained ledger before it left the agent.",
        "Not covered: what a peer can infer through the shared environment itself (it acts "
        "in the same world and observes the agent's actions and their effects); the "
        "simulator, which sees the world state; data that never passes through a recorded "
        "mechanism.",
        "The unit is the agent's whole history, so the guarantee covers all it contributes."
        if run["unit"] == "history" else
        "No guarantee beyond the unit: a person or agent behind many episodes is protected "
        "only through group privacy, which multiplies epsilon.",
        f"Accountant: {run['accountant']['name']}; every epsilon is at delta = {run['delta']:g}"
        f" and is an upper bound ({run['rounding']}).",
    ]


def _plot(agent: str, section: Mapping[str, Any]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for name, mech in section["mechanisms"].items():
        curve = mech["epsilon_over_rounds"]
        ax.plot([p["round"] for p in curve], [p["epsilon"] for p in curve], marker=".",
                label=f"{name} ({mech['relation']})")
    comp = section["composed"]
    curve = comp["epsilon_over_rounds"]
    ax.plot([p["round"] for p in curve], [p["epsilon"] for p in curve], color="black",
            linewidth=2, label=f"composed ({comp['relation']})")
    ax.axhline(comp["budget"], color="red", linestyle="--", label="budget")
    ax.set(xlabel="round", ylabel="epsilon", title=f"agent {agent}")
    ax.legend(fontsize="small")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def _table(rows: list[list[Any]], header: list[str]) -> str:
    cells = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"


def render_html(report: Mapping[str, Any], path: Path | str) -> Path:
    """Write a self-contained HTML page for ``report``: verdict, assumptions, plots, tables."""
    e = html.escape
    run = report["run"]
    ok = report["verdict"]["within_budget"]
    over = ", ".join(report["verdict"]["agents_over_budget"])
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>Privacy report</title><style>"
        "body{font-family:sans-serif;max-width:60em;margin:auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #999;padding:2px 6px}.ok{color:green}.bad{color:red}"
        "</style></head><body><h1>Privacy report</h1>",
        f"<p class='{'ok' if ok else 'bad'}'><b>Verdict: "
        + e("every agent is within its budget" if ok else f"over budget: {over}")
        + "</b></p>",
        f"<p>Schema {e(report['schema'])}, created {e(report['created'])}, run configuration "
        f"hash <code>{e(run['config_hash'])}</code>.</p>",
        "<h2>Assumptions</h2><ul>"
        + "".join(f"<li>{e(text)}</li>" for text in _assumptions(run)) + "</ul>",
    ]
    for agent, section in report["agents"].items():
        comp, ledger = section["composed"], section["ledger"]
        parts.append(f"<h2>Agent {e(agent)}</h2>")
        parts.append(f"<img alt='epsilon over rounds' src='data:image/png;base64,"
                     f"{_plot(agent, section)}'>")
        rows = [[name, m["relation"], m["sampling"], m["releases"], m["count"],
                 "; ".join(f"sigma={p['noise_multiplier']:g} C={p['clip']:g} "
                           f"Delta={p['sensitivity']:g} q={p['sample_rate']:g} x{p['count']}"
                           for p in m["parameters"]),
                 f"{m['epsilon']:.6f}"] for name, m in section["mechanisms"].items()]
        rows.append(["composed", comp["relation"], "", "", "", "", f"{comp['epsilon']:.6f}"])
        parts.append(_table(rows, ["mechanism", "relation", "sampling", "ledger entries",
                                   "releases", "parameters", f"epsilon (delta={run['delta']:g})"]))
        parts.append(
            f"<p>Budget {comp['budget']:.6f}, spent {comp['epsilon']:.6f}, remaining "
            f"{comp['remaining']:.6f}: <span class='{'ok' if comp['within_budget'] else 'bad'}'>"
            f"{'within budget' if comp['within_budget'] else 'OVER BUDGET'}</span>. Ledger "
            f"<code>{e(ledger['path'])}</code>, {ledger['entries']} entries, final hash "
            f"<code>{e(str(ledger['final_hash']))}</code>.</p>")
    parts.append("</body></html>")
    path = Path(path)
    path.write_text("\n".join(parts))
    return path
