"""Independent re-verification of a privacy report.

:func:`audit` trusts nothing in the report that it can recompute. It checks

1. the report's schema and that ``run.config_hash`` is the hash of ``run.config``;
2. each ledger (found relative to the report's folder): its hash chain, and that its entry
   count and final hash are the ones the report states; where the caller names the run's
   agents, that every one of them has a section and a ledger; where it gives the anchors the
   server recorded (each ledger's length and last hash as the agent's replies stated them),
   that each ledger extends every one of them: a ledger cut, re-hashed or deleted after the
   fact, with a report rebuilt from it, fails here;
3. every ledger entry against the run: agent, config hash, unit, that its mechanism is
   declared and its parameters and relation are the declared ones, that its parameters are
   valid, that its sensitivity is at least what its relation requires of the clip norm, and
   that its randomness came from the agent's secure source (``noise``), not from a seeded
   stream that whoever knows the seed reproduces;
4. every epsilon, recomputed *from the raw ledger entries* with an independent accountant:
   dp-accounting's privacy loss distributions (built as its ``PLDAccountant`` builds them,
   each self-composed by its entries' count) from ``std = noise_multiplier * clip`` and the
   entry's sensitivity (``ADD_OR_REMOVE_ONE`` with
   ``z = std / sensitivity``; ``REPLACE_ONE`` with ``z = std / (sensitivity / 2)`` when a
   replace-one composition holds Poisson-sampled releases). A reported epsilon below that
   value by more than the tolerance (``rel_tol * value + abs_tol``) is an under-claim and
   fails;
5. every number of each agent's section, recomputed with the report's own accountant: a
   difference above ``2e-6`` (the rounding) fails and names the field;
6. that no agent exceeds its budget and that the verdict follows from the agents.

Infinity: the report states +inf as ``"inf"`` (see :mod:`.report`) and is read as strict JSON,
so an ``Infinity`` or ``NaN`` literal fails. A release without noise recomputes to ``inf``; a
claim of ``inf`` is never an under-claim, a finite claim for it always is, and an infinite
budget is never exceeded. Step 5 compares ``"inf"`` only with ``"inf"``, so replacing it with
a number (or a number with it) fails like any other edit.

Each failure names where it is: ``file:line:field`` for a ledger, ``file:dotted.path`` for
the report.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dp_accounting
from dp_accounting.pld import privacy_loss_distribution as PLD
from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

from .accountants.exact import gdp_epsilon
from .events import RELATION_FACTOR, GaussianRelease
from .ledger import (
    KIND_FIELDS,
    LedgerError,
    config_hash,
    group_key,
    kind_of,
    read_ledger,
    release_from_entry,
    verify_chain,
)
from .report import (
    REPORT_NAME,
    SCHEMA,
    agent_section,
    decode_eps,
    load_report,
    run_info_from_report,
    verdict,
)

REL_TOL = 1e-2
ABS_TOL = 1e-3
AGREEMENT_TOL = 2e-6


@dataclass(frozen=True)
class AuditFailure:
    """One failed check and where it is (``file:line:field`` or ``file:dotted.path``)."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class AuditResult:
    """Outcome of :func:`audit`; ``ok`` is true when there are no failures.

    ``independent`` holds the recomputed PLD epsilons, by agent, of each mechanism and of the
    composition (key ``"composed"``); ``math.inf`` for releases without noise.
    """

    failures: list[AuditFailure] = field(default_factory=list)
    independent: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failures

    def fail(self, where: str, message: str) -> None:
        self.failures.append(AuditFailure(where, message))


def independent_epsilon(entries: Sequence[Mapping[str, Any]], relation: str, delta: float,
                        value_discretization_interval: float = 1e-3) -> float:
    """Epsilon of the composition of raw ledger ``entries`` under ``relation`` by dp-accounting.

    Entries recorded under another relation are rescaled to ``relation`` (their sensitivity
    times 2 from add/remove to replace-one, times 1/2 the other way).
    """
    groups: dict[tuple[float, float], int] = {}
    responses: dict[tuple[float, int], int] = {}
    skellams = [e for e in entries if kind_of(e) == "skellam"]
    if skellams:
        if len(skellams) < len(entries):
            raise ValueError("a ledger mixes Skellam releases with others: no accountant "
                             "here composes both")
        return _skellam_epsilon(skellams, relation, delta)
    for e in entries:
        if kind_of(e) == "randomized_response":
            key = (float(e["epsilon"]), int(e["symbols"]))
            responses[key] = responses.get(key, 0) + e["count"]
            continue
        std = e["noise_multiplier"] * e["clip"]
        if std == 0:
            return math.inf
        sensitivity = e["sensitivity"] * RELATION_FACTOR[relation] / RELATION_FACTOR[e["relation"]]
        key = (std / sensitivity, e["sample_rate"])
        groups[key] = groups.get(key, 0) + e["count"]
    if not groups and not responses:
        return 0.0
    return _pld_epsilon(tuple(sorted(groups.items())), tuple(sorted(responses.items())),
                        relation, delta, value_discretization_interval)


def _skellam_epsilon(entries: Sequence[Mapping[str, Any]], relation: str, delta: float
                     ) -> float:
    """Skellam releases by their Rényi DP (Agarwal, Kairouz and Liu 2021, Theorem 3.5, written
    out here again), converted by dp-accounting's RDP conversion."""
    orders = list(range(2, 257))
    total = [0.0] * len(orders)
    for e in entries:
        scale = RELATION_FACTOR[relation] / RELATION_FACTOR[e["relation"]]
        mu, d1 = float(e["variance"]), float(e["l1_sensitivity"]) * scale
        d2sq = (float(e["l2_sensitivity"]) * scale) ** 2
        if mu == 0:
            return math.inf
        for i, a in enumerate(orders):
            extra = min(((2 * a - 1) * d2sq + 6 * d1) / (4 * mu * mu), 3 * d1 / (2 * mu))
            total[i] += e["count"] * (a * d2sq / (2 * mu) + extra)
    return float(compute_epsilon(orders, total, delta)[0])


@functools.lru_cache(maxsize=1024)
def _pld_epsilon(groups: tuple[tuple[tuple[float, float], int], ...],
                 responses: tuple[tuple[tuple[float, int], int], ...], relation: str,
                 delta: float, interval: float) -> float:
    NR = dp_accounting.NeighboringRelation
    # Randomized response is dp-accounting's under REPLACE_ONE (pure epsilon: either relation)
    replace = relation == "replace_one" and (any(q < 1 for (_, q), _ in groups)
                                             or bool(responses))
    # The grid scales with a rough estimate of epsilon (never coarser than 1e-4 of it): a
    # fixed 1e-3 grid over a run's vectors of epsilon in the thousands would not fit in memory.
    mu = math.sqrt(sum(n / z**2 if q == 1 else n * q**2 * math.expm1(min(1 / z**2, 700))
                       for (z, q), n in groups) + sum(n * eps**2 for (eps, _), n in responses))
    interval = max(interval, 1e-4 * gdp_epsilon(mu, delta))
    # The PLDs dp-accounting's PLDAccountant builds for these events, each self-composed here:
    # its accountant (0.6) drops a randomized response's count, composing it once.
    neighbours = NR.REPLACE_ONE if replace else NR.ADD_OR_REMOVE_ONE
    plds = []
    for (z, q), count in groups:
        # Under REPLACE_ONE dp-accounting's noise multiplier is std / (sensitivity / 2).
        noise = 2 * z if replace else z
        if q < 1:
            plds.append(PLD.from_gaussian_mechanism(
                standard_deviation=noise, sampling_prob=q, neighboring_relation=neighbours,
                value_discretization_interval=interval).self_compose(count))
        else:
            plds.append(PLD.from_gaussian_mechanism(
                standard_deviation=noise / math.sqrt(count), neighboring_relation=neighbours,
                value_discretization_interval=interval))
    for (eps, k), count in responses:
        plds.append(PLD.from_randomized_response(
            noise_parameter=k / (math.exp(eps) + k - 1), num_buckets=k,
            neighboring_relation=neighbours,
            value_discretization_interval=interval).self_compose(count))
    return functools.reduce(lambda a, b: a.compose(b), plds).get_epsilon_for_delta(delta)


def _load(path: Path | str) -> tuple[Path, dict[str, Any] | None, AuditResult]:
    path = Path(path)
    if path.is_dir():
        path = path / REPORT_NAME
    result = AuditResult()
    try:
        report = load_report(path)
    except (OSError, ValueError) as exc:
        result.fail(path.name, f"cannot read the report: {exc}")
        return path, None, result
    if not isinstance(report, dict) or report.get("schema") != SCHEMA:
        result.fail(f"{path.name}:schema", f"expected schema {SCHEMA!r}")
        return path, None, result
    return path, report, result


def audit(report_path: Path | str, *, rel_tol: float = REL_TOL, abs_tol: float = ABS_TOL,
          composition: Callable[[Mapping[str, Any]], str] | None = None,
          agents: Sequence[str] | None = None,
          anchors: Mapping[str, Sequence[tuple[int, str]]] | None = None) -> AuditResult:
    """Re-verify the report at ``report_path`` (the file, or the run folder holding it).

    ``composition`` derives from the run's configuration which releases compose for a unit
    (``"batch"`` or ``"all"``, :data:`~fedcomm.privacy.ledger.Composition`); the report's claim
    must be that one. It is the caller's, who knows how the configured agents train.
    ``agents`` are the run's agents, each of which must have a ledger; ``anchors`` what the
    server recorded of each agent's ledger, ``(entries, last hash)``, which it must extend
    (an agent of ``agents`` with no anchor fails).
    """
    path, report, result = _load(report_path)
    if report is None:
        return result
    name = path.name
    run_agents = agents
    try:
        run = report["run"]
        info = run_info_from_report(report)
        agents = report["agents"]
    except (KeyError, TypeError, ValueError) as exc:
        result.fail(f"{name}:run", f"malformed report: {exc!r}")
        return result
    if config_hash(run["config"]) != run["config_hash"]:
        result.fail(f"{name}:run.config_hash", "is not the hash of run.config")
    if composition is not None:
        try:
            expected = composition(run["config"])
        except (KeyError, TypeError, ValueError) as exc:
            result.fail(f"{name}:run.config", f"cannot tell how its agents train: {exc!r}")
        else:
            if info.composition != expected:
                result.fail(f"{name}:run.composition",
                            f"claims {info.composition!r}, the run's configuration gives "
                            f"{expected!r}")
    for agent, section in agents.items():
        _audit_agent(result, path, agent, section, report, info, rel_tol, abs_tol)
    for agent in run_agents or ():
        if agent not in agents:
            result.fail(f"{name}:agents.{agent}", "missing: the run's agent has no ledger in "
                        "the report (deleted?)")
    if anchors is not None:
        for agent in run_agents or sorted(anchors):
            _check_anchors(result, path, agents.get(agent), agent, anchors.get(agent, ()))
    expected = verdict(agents)
    if report.get("verdict") != expected:
        result.fail(f"{name}:verdict",
                    f"is {report.get('verdict')!r}, the agents give {expected!r}")
    return result


def _audit_agent(result: AuditResult, path: Path, agent: str, section: Mapping[str, Any],
                 report: Mapping[str, Any], info: Any, rel_tol: float, abs_tol: float) -> None:
    name, run = path.name, report["run"]
    here = f"{name}:agents.{agent}"
    ledger_rel = section["ledger"]["path"]
    try:
        entries = read_ledger(path.parent / ledger_rel)
    except (OSError, LedgerError) as exc:
        result.fail(ledger_rel, f"cannot read the ledger: {exc}")
        return
    for problem in verify_chain(entries):
        line, _, message = problem.partition(": ")
        result.fail(f"{ledger_rel}:{line.removeprefix('line ')}", message)
    final = entries[-1]["hash"] if entries else None
    if section["ledger"]["entries"] != len(entries):
        result.fail(f"{here}.ledger.entries",
                    f"report says {section['ledger']['entries']}, the ledger has {len(entries)}")
    if section["ledger"]["final_hash"] != final:
        result.fail(f"{here}.ledger.final_hash", "is not the hash of the ledger's last entry")
    valid = all([_check_entry(result, ledger_rel, n, e, agent, run)
                 for n, e in enumerate(entries, 1)])
    if not valid:
        return
    _check_independent(result, here, agent, entries, section, run, rel_tol, abs_tol)
    budget = info.budget_for(agent)  # decoded by run_info_from_report: "inf" is math.inf
    rebuilt = agent_section(entries, info, budget, run.get("curve_points", 50))
    for where, message in _diff(section, {**rebuilt, "ledger": section["ledger"]}, here):
        result.fail(where, message)
    spent = decode_eps(rebuilt["composed"]["epsilon"])
    if spent > budget:  # never true for an infinite budget
        result.fail(f"{here}.composed.epsilon", f"{spent} exceeds the budget {budget}")


def _check_anchors(result: AuditResult, path: Path, section: Mapping[str, Any] | None,
                   agent: str, anchors: Sequence[tuple[int, str]]) -> None:
    """The agent's ledger extends every anchor the server recorded of it."""
    where = f"{path.name}:agents.{agent}.ledger"
    if not anchors:
        result.fail(where, "the server recorded no anchor of this agent's ledger")
        return
    if section is None:
        return  # already failed as missing
    try:
        entries = read_ledger(path.parent / section["ledger"]["path"])
    except (OSError, LedgerError, KeyError, TypeError) as exc:
        result.fail(where, f"cannot read the ledger: {exc}")
        return
    for count, last in anchors:
        if len(entries) < count or (count and entries[count - 1].get("hash") != last):
            result.fail(where, f"does not extend what the server recorded ({count} entries "
                        f"ending in {str(last)[:12]}; the ledger has {len(entries)}): cut or "
                        "rewritten after the fact")
            return


def _check_entry(result: AuditResult, ledger: str, number: int, e: Mapping[str, Any],
                 agent: str, run: Mapping[str, Any]) -> bool:
    at = f"{ledger}:{number}"
    before = len(result.failures)
    try:
        release = release_from_entry(e)
    except (KeyError, TypeError, ValueError) as exc:
        result.fail(at, f"invalid release: {exc}")
        return False
    expected = {"agent": agent, "config_hash": run["config_hash"], "unit": run["unit"]}
    for key, value in expected.items():
        if e.get(key) != value:
            result.fail(f"{at}:{key}", f"is {e.get(key)!r}, the run says {value!r}")
    if e.get("noise") != "secure":
        result.fail(f"{at}:noise", f"is {e.get('noise')!r}: the release's randomness came from "
                    "a seeded stream that anyone who knows the seed reproduces; no guarantee "
                    "holds")
    declared = run["mechanisms"].get(e["mechanism"])
    if declared is None:
        result.fail(f"{at}:mechanism", f"{e['mechanism']!r} is not declared in the run")
        return False
    relation = declared.get("relation", run["relation"])
    if e["relation"] != relation:
        result.fail(f"{at}:relation", f"is {e['relation']!r}, declared {relation!r}")
    kind = kind_of(e)
    if declared.get("kind", "gaussian") != kind:
        result.fail(f"{at}:kind", f"is {kind!r}, declared {declared.get('kind', 'gaussian')!r}")
    for key in KIND_FIELDS.get(kind, ()):
        if key in declared:
            allowed = declared[key] if isinstance(declared[key], list) else [declared[key]]
            if not any(_close(e[key], a) for a in allowed):
                result.fail(f"{at}:{key}", f"is {e[key]!r}, declared {declared[key]!r}")
    if not isinstance(release, GaussianRelease):
        return len(result.failures) == before
    minimum = RELATION_FACTOR[release.relation] * release.clip
    if release.sensitivity < minimum * (1 - 1e-12):
        result.fail(f"{at}:sensitivity", f"{release.sensitivity!r} is below "
                    f"{minimum!r}, the least a {release.relation} release can have")
    return len(result.failures) == before


def _check_independent(result: AuditResult, here: str, agent: str,
                       entries: Sequence[Mapping[str, Any]], section: Mapping[str, Any],
                       run: Mapping[str, Any], rel_tol: float, abs_tol: float) -> None:
    def worst(selected: list[Mapping[str, Any]], relation: str) -> float:
        groups: dict[Any, list[Mapping[str, Any]]] = {}
        for e in selected:
            key = group_key(run["unit"], run.get("composition", "batch"), e["batch"])
            groups.setdefault(key, []).append(e)
        return max((independent_epsilon(g, relation, run["delta"]) for g in groups.values()),
                   default=0.0)

    values = result.independent.setdefault(agent, {})
    claims = [("composed", entries, run["relation"], section["composed"])]
    for mech, reported in section["mechanisms"].items():
        mine = [e for e in entries if e["mechanism"] == mech]
        claims.append((mech, mine, reported["relation"], reported))
    for key, selected, relation, reported in claims:
        value = worst(list(selected), relation)
        values[key] = value
        field_path = f"{here}.composed" if key == "composed" else f"{here}.mechanisms.{key}"
        try:
            claimed = decode_eps(reported.get("epsilon"))
        except ValueError as exc:
            result.fail(f"{field_path}.epsilon", str(exc))
            continue
        if _under_claim(claimed, value, rel_tol, abs_tol):
            result.fail(f"{field_path}.epsilon", f"under-claim: reported "
                        f"{reported.get('epsilon')!r}, independent PLD gives {value:.6f}")


def _under_claim(claimed: float, value: float, rel_tol: float, abs_tol: float) -> bool:
    """Whether ``claimed`` is below the independent ``value`` beyond the tolerance.

    Spelled out for infinity: the tolerance ``inf - inf`` is NaN, which compares false and
    would let a finite claim for a noise-free release pass.
    """
    if claimed == math.inf:
        return False
    if value == math.inf:
        return True
    return claimed < value - (rel_tol * value + abs_tol)


def _close(value: Any, allowed: Any) -> bool:
    numbers = (int, float)
    return (isinstance(value, numbers) and isinstance(allowed, numbers)
            and math.isclose(value, allowed, rel_tol=1e-12))


def _diff(reported: Any, expected: Any, where: str) -> list[tuple[str, str]]:
    """Differences between a reported and a recomputed JSON value, by dotted path."""
    if isinstance(expected, Mapping):
        if not isinstance(reported, Mapping):
            return [(where, "is not an object")]
        out = [(f"{where}.{k}", "missing") for k in expected if k not in reported]
        out += [(f"{where}.{k}", "unexpected field") for k in reported if k not in expected]
        for k in expected:
            if k in reported:
                out += _diff(reported[k], expected[k], f"{where}.{k}")
        return out
    if isinstance(expected, list):
        if not isinstance(reported, list) or len(reported) != len(expected):
            return [(where, f"has {_len(reported)} items, recomputed {len(expected)}")]
        out = []
        for i, (r, x) in enumerate(zip(reported, expected)):
            out += _diff(r, x, f"{where}[{i}]")
        return out
    numbers = (int, float)
    if (isinstance(expected, numbers) and not isinstance(expected, bool)
            and isinstance(reported, numbers) and not isinstance(reported, bool)):
        if abs(reported - expected) <= AGREEMENT_TOL:
            return []
    elif reported == expected:
        return []
    return [(where, f"reported {reported!r}, recomputed {expected!r}")]


def _len(value: Any) -> str:
    return str(len(value)) if isinstance(value, list) else "no"

