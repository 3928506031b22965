"""The run's privacy report, ``privacy_report.json``: built from the ledgers, written, read back.

The page a person reads (``privacy_report.html``) is rendered from it by :mod:`.page`.

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
