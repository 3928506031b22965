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
          "budget": {"epsilon": eps, "delta": float},
          "mechanisms": {
            name: {"relation", "unit", "sampling": "none" | "poisson",
                   "accountant", "delta", "epsilon": eps, "releases" (ledger entries),
                   "count" (releases counted with multiplicity),
                   "parameters": [{"noise_multiplier", "clip", "sensitivity", "sample_rate",
                                   "releases", "count"}],
                   "epsilon_over_rounds": [{"round", "epsilon": eps}]}
          },
          "composed": {"relation", "epsilon": eps, "delta", "budget": eps, "remaining": eps,
                       "within_budget", "epsilon_over_rounds": [{"round", "epsilon": eps}]}
        }
      },
      "verdict": {"within_budget": bool, "agents_over_budget": [agent, ...]}
    }

``eps`` is a non-negative number or the string ``"inf"``: strict JSON has no infinity, and
both occur in practice: a release without noise (noise multiplier 0) has epsilon ``inf``, and
an agent without a cap has budget ``inf``. Its remaining budget is then ``"inf"`` too (never
NaN), and an infinite budget is never exceeded. :func:`encode_eps` and :func:`decode_eps`
convert. Nothing in the report is NaN, and a +inf anywhere else (say in ``RunInfo.extra``)
is written as ``"inf"`` as well.

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

from fedcomm.jsonfile import INF, read_json, to_json

from .accountants import DEFAULT_ACCOUNTANT, Accountant, make_accountant
from .budget import PrivacyBudget, remaining_budget
from .events import GaussianRelease, Relation, check_relation, merge
from .ledger import (
    COMPOSITIONS,
    KIND_FIELDS,
    UNITS,
    Composition,
    LedgerError,
    Unit,
    config_hash,
    group_key,
    kind_of,
    read_ledger,
    release_from_entry,
    verify_chain,
)

SCHEMA = "fedcomm.privacy_report/1"
REPORT_NAME = "privacy_report.json"
HTML_NAME = "privacy_report.html"
ROUNDING = "epsilon rounded up to 1e-6; remaining budget rounded down to 1e-6"


def encode_eps(value: float) -> float | str:
    """``value`` as the report states it: ``"inf"`` for +inf, since JSON has no infinity."""
    if value == math.inf:
        return INF
    if not math.isfinite(value):
        raise ValueError(f"a report cannot state {value!r}")
    return value


def decode_eps(value: Any) -> float:
    """The number a report field states (``"inf"`` is +inf); ``ValueError`` for anything else.

    Strict, so that an audit reading an edited report fails instead of guessing.
    """
    if value == INF:
        return math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value):
        raise ValueError(f"expected a number or {INF!r}, got {value!r}")
    return float(value)


def strict_json(obj: Any, where: str = "report") -> Any:
    """``obj`` with every +inf float replaced by ``"inf"``; ``ValueError`` naming a NaN or -inf.

    Applied to the whole report so that the dictionary :func:`build_report` returns is the
    one a reader gets back from the file, whatever ``RunInfo.extra`` holds.
    """
    return to_json(obj, nan=False, where=where)


def load_report(path: Path | str) -> dict[str, Any]:
    """Read a report file as strict JSON (``Infinity``/``NaN`` literals are refused)."""
    return read_json(path)


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
        Epsilon budget: one number for every agent, or a mapping agent -> epsilon;
        ``math.inf`` for an agent that is not capped.
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
    accountant: str | Accountant = DEFAULT_ACCOUNTANT
    unit: Unit = "episode"
    relation: Relation = "replace_one"
    composition: Composition = "batch"
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


def _groups(items: Sequence[tuple[dict, GaussianRelease]], unit: Unit,
            composition: Composition) -> dict[int | None, list[tuple[dict, GaussianRelease]]]:
    groups: dict[int | None, list[tuple[dict, GaussianRelease]]] = {}
    for entry, release in items:
        groups.setdefault(group_key(unit, composition, entry["batch"]), []).append(
            (entry, release))
    return groups


def _thin(rounds: list[int], points: int) -> list[int]:
    if len(rounds) <= points:
        return rounds
    step = (len(rounds) - 1) / (points - 1)
    return sorted({rounds[math.floor(i * step)] for i in range(points - 1)} | {rounds[-1]})


def epsilon_curve(items: Sequence[tuple[dict, GaussianRelease]], unit: Unit,
                  epsilon: Callable[[list[GaussianRelease]], float],
                  points: int, composition: Composition = "batch") -> list[dict[str, Any]]:
    """Spent epsilon after each round: the largest over groups of the releases so far.

    Values are floats (possibly ``inf``); :func:`agent_section` encodes them for JSON.
    """
    groups = _groups(items, unit, composition)
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
    """The ``budget``, ``mechanisms`` and ``composed`` parts of one agent's report, as JSON.

    Infinite values are already encoded (:func:`encode_eps`), so the audit can compare this
    with a report read back from its file.
    """
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
        curve = epsilon_curve(mine, run.unit, eps, curve_points, run.composition)
        parameters: dict[tuple, dict[str, Any]] = {}
        for e, _ in mine:
            fields = KIND_FIELDS[kind_of(e)]
            key = (kind_of(e), *(e[f] for f in fields))
            kind = {} if key[0] == "gaussian" else {"kind": key[0]}
            p = parameters.setdefault(key, {**kind, **dict(zip(fields, key[1:])),
                                            "releases": 0, "count": 0})
            p["releases"] += 1
            p["count"] += e["count"]
        mechanisms[name] = {
            "relation": relation, "unit": run.unit,
            "sampling": "poisson" if any(r.sampled for _, r in mine) else "none",
            "accountant": acc.describe(), "delta": run.delta,
            "epsilon": encode_eps(curve[-1]["epsilon"]), "releases": len(mine),
            "count": sum(e["count"] for e, _ in mine),
            "parameters": list(parameters.values()), "epsilon_over_rounds": _encoded(curve),
        }
    curve = (epsilon_curve(items, run.unit, composed_eps, curve_points, run.composition)
             if items else [])
    eps = curve[-1]["epsilon"] if curve else 0.0
    return {
        "budget": {"epsilon": encode_eps(budget), "delta": run.delta},
        "mechanisms": mechanisms,
        "composed": {
            "relation": run.relation, "epsilon": encode_eps(eps), "delta": run.delta,
            "budget": encode_eps(budget), "remaining": encode_eps(remaining_budget(budget, eps)),
            "within_budget": eps <= budget, "epsilon_over_rounds": _encoded(curve),
        },
    }


def _encoded(curve: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**p, "epsilon": encode_eps(p["epsilon"])} for p in curve]


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
    if run.composition not in COMPOSITIONS:
        raise ValueError(f"composition must be one of {COMPOSITIONS}, got {run.composition!r}")
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
    return strict_json({
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run": {
            "config": dict(run.config), "config_hash": config_hash(run.config),
            "accountant": accountant.describe(), "delta": run.delta, "unit": run.unit,
            "composition": run.composition, "relation": run.relation,
            "mechanisms": {k: dict(v) for k, v in run.mechanisms.items()},
            "curve_points": curve_points, "rounding": ROUNDING, **dict(run.extra),
        },
        "agents": agents,
        "verdict": verdict(agents),
    })


def write_report(report: Mapping[str, Any], path: Path | str) -> Path:
    """Write ``report`` as strict JSON to ``path`` (a folder gets ``privacy_report.json``).

    A +inf left as a float (a report assembled by hand) is written as ``"inf"``; NaN raises.
    """
    path = Path(path)
    if path.is_dir():
        path = path / REPORT_NAME
    text = json.dumps(strict_json(report), indent=2, sort_keys=True, allow_nan=False)
    path.write_text(text + "\n")
    return path


def run_info_from_report(report: Mapping[str, Any]) -> RunInfo:
    """The :class:`RunInfo` a report was built with (``"inf"`` budgets back to ``math.inf``)."""
    run = report["run"]
    options = {k: v for k, v in run["accountant"].items() if k != "name"}
    budget = {}
    for agent, section in report["agents"].items():
        try:
            budget[agent] = decode_eps(section["budget"]["epsilon"])
        except ValueError as exc:
            raise ValueError(f"agents.{agent}.budget.epsilon: {exc}") from None
    return RunInfo(
        config=run["config"], delta=run["delta"], budget=budget,
        mechanisms=run["mechanisms"],
        accountant=make_accountant(run["accountant"]["name"], **options),
        unit=run["unit"], relation=run["relation"], composition=run.get("composition", "batch"),
        extra={k: v for k, v in run.items() if k not in _RUN_FIELDS})


_RUN_FIELDS = frozenset({"config", "config_hash", "accountant", "delta", "unit", "composition",
                         "relation", "mechanisms", "curve_points", "rounding"})


# --- HTML -----------------------------------------------------------------------------------

_UNIT_WORDS = {
    ("episode", "batch"): (
        "one episode of the agent's experience (its observations and actions in one episode). "
        "Every episode is used in one training batch, and every network that shapes a release "
        "(the sender's feature network, GRU and encoder for vectors; the receiver's networks "
        "for feedback) trains on it only under DP-SGD, so later releases depend on it only "
        "through DP-SGD's output: the releases that compose are those of its batch, the "
        "vectors, the feedback and the DP-SGD steps."),
    ("episode", "all"): (
        "one episode of the agent's experience (its observations and actions in one episode). "
        "The networks that shape the releases train on it without DP-SGD, so every later "
        "release can depend on it (a vector's mean can move anywhere in the clip ball): every "
        "release of the run composes, and the figure is that of all of them."),
    ("history", "batch"): "the agent's whole history: all its releases over the run compose.",
    ("history", "all"): "the agent's whole history: all its releases over the run compose.",
}
_RELATION_WORDS = {
    "replace_one": ("replace-one: the guarantee compares two histories that differ in one unit "
                    "replaced by any other; a clipped value can move by twice the clip norm."),
    "add_remove": ("add/remove: the guarantee compares two histories that differ by one unit "
                   "present or absent."),
}


def _assumptions(run: Mapping[str, Any]) -> list[str]:
    return [
        f"Privacy unit: {_UNIT_WORDS[run['unit'], run.get('composition', 'batch')]}",
        f"Neighbouring relation: {_RELATION_WORDS[run['relation']]} Mechanisms accounted "
        "under another relation alone (DP-SGD under add/remove, as Opacus does) are "
        "re-analysed under this one for the composed figure.",
        "Protected: the unit's data, against everyone who sees the released values: peers "
        "receiving message vectors and feedback, and the server, which sees only the "
        "shared module trained with DP-SGD. Each release was written to the agent's "
        "hash-chained ledger before it left the agent.",
        "Not covered: what a peer can infer through the shared environment itself (it acts "
        "in the same world and observes the agent's actions and their effects); the "
        "simulator, which sees the world state and keys every episode's randomness with its "
        "own secret; data that never passes through a recorded mechanism (listed below where "
        "an agent sent any to the server).",
        "The unit is the agent's whole history, so the guarantee covers all it contributes."
        if run["unit"] == "history" else
        "No guarantee beyond the unit: a person or agent behind many episodes is protected "
        "only through group privacy, which multiplies epsilon.",
        f"Accountant: {run['accountant']['name']}; every epsilon is at delta = {run['delta']:g}"
        f" and is an upper bound ({run['rounding']}).",
        *([("One budget split over the mechanisms, each calibrated to its epsilon alone: "
            + ", ".join(f"{k} {v:.3f}" for k, v in run["split"].items())
            + "; together they compose to at most the budget.")] if run.get("split") else []),
    ]


def _eps_text(value: Any) -> str:
    eps = decode_eps(value)
    return "∞" if eps == math.inf else f"{eps:.6f}"


def _plot(agent: str, section: Mapping[str, Any]) -> tuple[str, list[str]]:
    """PNG (base64) of epsilon over rounds, and notes on what it leaves out.

    Infinite points cannot be drawn on a linear axis, so they are left out and named.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    notes: list[str] = []

    def finite(name: str, curve: list[Mapping[str, Any]]) -> tuple[list[int], list[float], str]:
        points = [(p["round"], decode_eps(p["epsilon"])) for p in curve]
        shown = [(r, v) for r, v in points if v != math.inf]
        left_out = [r for r, v in points if v == math.inf]
        if not left_out:
            return [r for r, _ in shown], [v for _, v in shown], ""
        notes.append(f"{name}: epsilon is ∞ (a release without noise) from round "
                     f"{left_out[0]}; those {len(left_out)} point(s) are not plotted.")
        return [r for r, _ in shown], [v for _, v in shown], ", ∞ not plotted"

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for name, mech in section["mechanisms"].items():
        rounds, values, tail = finite(name, mech["epsilon_over_rounds"])
        ax.plot(rounds, values, marker=".", label=f"{name} ({mech['relation']}{tail})")
    comp = section["composed"]
    rounds, values, tail = finite("composed", comp["epsilon_over_rounds"])
    ax.plot(rounds, values, color="black", linewidth=2,
            label=f"composed ({comp['relation']}{tail})")
    budget = decode_eps(comp["budget"])
    if budget == math.inf:
        notes.append("No budget line: the budget is ∞ (no budget).")
    else:
        ax.axhline(budget, color="red", linestyle="--", label="budget")
    ax.set(xlabel="round", ylabel="epsilon", title=f"agent {agent}")
    ax.legend(fontsize="small")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode(), notes


def _parameters_text(p: Mapping[str, Any]) -> str:
    if p.get("kind") == "randomized_response":
        return f"randomized response eps={p['epsilon']:g} K={p['symbols']} x{p['count']}"
    return (f"sigma={p['noise_multiplier']:g} C={p['clip']:g} Delta={p['sensitivity']:g} "
            f"q={p['sample_rate']:g} x{p['count']}")


def _table(rows: list[list[Any]], header: list[str]) -> str:
    cells = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"


def _unbounded(report: Mapping[str, Any]) -> list[str]:
    """A warning naming agents with infinite epsilon: "within budget" alone would hide it."""
    agents = [a for a, s in report["agents"].items()
              if decode_eps(s["composed"]["epsilon"]) == math.inf]
    if not agents:
        return []
    return ["<p class='bad'>Epsilon is ∞ (a mechanism adds no noise, so there is no "
            "privacy guarantee) for: " + html.escape(", ".join(agents)) + "</p>"]


def _silent(run: Mapping[str, Any]) -> list[str]:
    """A warning naming agents that stayed silent: their budget refused those batches."""
    silent = run.get("silent_batches") or {}
    if not silent:
        return []
    return ["<p class='bad'>Silent (the budget refused their releases, so they released "
            "nothing and did not train): " + html.escape(", ".join(
                f"{a} in {n} training batches" for a, n in silent.items())) + "</p>"]


RELEASE_WORDS = {
    "known": "a count or identity the server already knows",
    "ledger": "post-processing of the agent's ledger (public parameters and counts)",
    "dp": "post-processing of DP-SGD steps in the agent's ledger",
    "clear": "in the clear: no mechanism covers it",
}
"""How the server learns each kind of field an agent sends it (``run.released``)."""


def _released(run: Mapping[str, Any]) -> list[str]:
    """What the agents sent the server besides their releases to peers, field by field."""
    released = run.get("released")
    if released is None:
        return []
    rows = [[name, RELEASE_WORDS.get(kind, kind)] for name, kind in sorted(released.items())]
    clear = sorted(name for name, kind in released.items() if kind == "clear")
    note = (f"<p class='bad'>Sent in the clear, outside every figure above: "
            f"{html.escape(', '.join(clear))}.</p>" if clear else
            "<p>Every field sent to the server is a count, post-processing of the ledger or a "
            "DP release: nothing outside the figures above.</p>")
    return ["<h2>What the agents sent the server</h2>",
            _table(rows, ["field", "how the server learns it"]), note]


def _utility(run: Mapping[str, Any]) -> list[str]:
    """What the run's privacy left of its team's coordination: the gap closed, and against the
    DP ceiling (a scripted team through the same mechanism, schedule and budget)."""
    u = run.get("utility") or {}
    if u.get("gap_closed") is None:
        return []
    text = f"The trained team closed {u['gap_closed']:.1%} of the no-communication -> oracle gap"
    if u.get("of_ceiling") is not None and u.get("ceiling_gap_closed") is not None:
        text += (f"; the DP ceiling at these mechanisms closes {u['ceiling_gap_closed']:.1%}, "
                 f"and the team {u['of_ceiling']:.1%} of the no-communication -> ceiling gap")
    return [f"<p>{html.escape(text)}.</p>"]


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
        *_unbounded(report),
        f"<p>Schema {e(report['schema'])}, created {e(report['created'])}, run configuration "
        f"hash <code>{e(run['config_hash'])}</code>.</p>",
        *_silent(run),
        *_utility(run),
        *_released(run),
        "<h2>Assumptions</h2><ul>"
        + "".join(f"<li>{e(text)}</li>" for text in _assumptions(run)) + "</ul>",
    ]
    for agent, section in report["agents"].items():
        comp, ledger = section["composed"], section["ledger"]
        parts.append(f"<h2>Agent {e(agent)}</h2>")
        image, notes = _plot(agent, section)
        parts.append(f"<img alt='epsilon over rounds' src='data:image/png;base64,{image}'>")
        if notes:
            parts.append("<p><small>" + e(" ".join(notes)) + "</small></p>")
        rows = [[name, m["relation"], m["sampling"], m["releases"], m["count"],
                 "; ".join(_parameters_text(p) for p in m["parameters"]),
                 _eps_text(m["epsilon"]) + (" (no noise: no guarantee)"
                                            if decode_eps(m["epsilon"]) == math.inf else "")]
                for name, m in section["mechanisms"].items()]
        rows.append(["composed", comp["relation"], "", "", "", "", _eps_text(comp["epsilon"])])
        parts.append(_table(rows, ["mechanism", "relation", "sampling", "ledger entries",
                                   "releases", "parameters", f"epsilon (delta={run['delta']:g})"]))
        if decode_eps(comp["budget"]) == math.inf:
            budget = f"No budget (∞), spent {_eps_text(comp['epsilon'])}, remaining ∞"
            status = "not capped"
        else:
            budget = (f"Budget {_eps_text(comp['budget'])}, spent {_eps_text(comp['epsilon'])}, "
                      f"remaining {_eps_text(comp['remaining'])}")
            status = "within budget" if comp["within_budget"] else "OVER BUDGET"
        parts.append(
            f"<p>{budget}: <span class='{'ok' if comp['within_budget'] else 'bad'}'>"
            f"{status}</span>. Ledger "
            f"<code>{e(ledger['path'])}</code>, {ledger['entries']} entries, final hash "
            f"<code>{e(str(ledger['final_hash']))}</code>.</p>")
    parts.append("</body></html>")
    path = Path(path)
    path.write_text("\n".join(parts))
    return path
