"""``fedcomm report`` and ``fedcomm audit``: a run's privacy report, rendered and verified.

``report_command`` and ``audit_command`` do the work and print it, so that they can be tested on
real ledgers without a process; the audit's accountants (dp-accounting) load only when an
audit runs.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedcomm.commands.options import parser_of
from fedcomm.commands.output import console
from fedcomm.privacy.ledger import LedgerError, group_key, read_ledger
from fedcomm.privacy.page import render_html
from fedcomm.privacy.report import HTML_NAME, REPORT_NAME, decode_eps, load_report

if TYPE_CHECKING:
    from fedcomm.privacy.audit import AuditResult
    from fedcomm.privacy.canary import CanaryAudit


def add(sub: argparse._SubParsersAction) -> None:
    p = parser_of(sub, "report", help="render a run's privacy report again",
                  description="Write privacy_report.html from a run's privacy_report.json.")
    p.add_argument("run_dir", type=Path)
    p.set_defaults(func=run_report)
    p = parser_of(sub, "audit", help="verify a run's privacy report independently",
                  description="Check the ledgers' hash chains against the report, every "
                  "entry against the run config, every epsilon recomputed with Google's "
                  "dp-accounting, and the budgets. Exit code 0: all of it verifies; 1: "
                  "something did not verify (the problems are listed); 2: there is no report "
                  "to read at that path.")
    p.add_argument("path", type=Path, metavar="REPORT_OR_RUN_DIR")
    p.add_argument("--empirical", action="store_true",
                   help="also run a one-run canary audit of the message mechanism")
    p.set_defaults(func=run_audit)


def run_report(args: argparse.Namespace) -> int:
    console.print(f"privacy report: {report_command(args.run_dir)}")
    return 0


def run_audit(args: argparse.Namespace) -> int:
    from fedcomm.releases.report import CLIENT_LEVEL_REPORT
    from fedcomm.releases.schedule import composition_of_config

    folder = args.path if args.path.is_dir() else args.path.parent
    agents, anchors = server_record(folder)
    code = audit_command(args.path, args.empirical, console,
                         composition=composition_of_config, agents=agents, anchors=anchors)
    client_level = folder / CLIENT_LEVEL_REPORT  # a run's client-level DP, audited with it
    if args.path.is_dir() and client_level.is_file():
        code = max(code, audit_command(client_level, False, console,
                                       agents=_charged_client_level(folder, agents)))
    return code


def _charged_client_level(folder: Path, agents: list[str] | None) -> list[str] | None:
    """The agents a run's client-level ledgers must hold: every agent where the server
    charged them, the members of a cohort where the agents did (secure aggregation)."""
    from fedcomm.config import FederationConfig
    from fedcomm.jsonfile import read_json
    from fedcomm.releases.cohorts import cohorts

    fed = FederationConfig.from_dict(read_json(folder / "config.json"))
    if agents is None or not fed.secure_aggregation:
        return agents
    return [fed.spec.agent_ids[i] for cohort in cohorts(fed) for i in cohort]


def server_record(folder: Path) -> tuple[list[str] | None, dict[str, list] | None]:
    """What a federated run's server recorded in ``folder``: the run's agents (its
    ``config.json``) and every anchor of each agent's ledger (each ``metrics.jsonl`` row's and
    the final evaluation's in ``summary.json``). ``(None, None)`` for a run without a server
    (the centralized trainer's)."""
    from fedcomm.config import FederationConfig
    from fedcomm.jsonfile import read_json

    config = folder / "config.json"
    if not config.exists() or read_json(config).get("mode") != "federated":
        return None, None
    fed = FederationConfig.from_dict(read_json(config))
    anchors: dict[str, list] = {}
    rows = []
    metrics = folder / "metrics.jsonl"
    if metrics.exists():
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    summary = folder / "summary.json"
    if summary.exists():
        rows.append(read_json(summary))
    for row in rows:
        for agent, (entries, last) in (row.get("ledgers") or {}).items():
            anchors.setdefault(agent, []).append((int(entries), str(last)))
    return list(fed.spec.agent_ids), anchors


MESSAGE = "message"
MAX_NORMALS = 50_000_000
"""Largest ``canaries * releases_per_unit`` simulated as separate draws (400 MB of floats)."""


def report_command(run_dir: Path) -> Path:
    """Re-render ``privacy_report.html`` from the run's ``privacy_report.json``; its path.

    The page is derived, so re-rendering (after a change to the page, or on another machine)
    never touches the JSON the audit verifies.
    """
    run_dir = Path(run_dir)
    source = run_dir / REPORT_NAME
    if not source.is_file():
        raise FileNotFoundError(
            f"no privacy report in {run_dir}: {source} does not exist (a run writes it when "
            "privacy accounting is on)")
    return render_html(load_report(source), run_dir / HTML_NAME)


def audit_command(path: Path, empirical: bool, console: Console, *, canaries: int = 100_000,
                  seed: int | None = None,
                  composition: Callable[[Mapping[str, Any]], str] | None = None,
                  agents: Sequence[str] | None = None,
                  anchors: Mapping[str, Sequence[tuple[int, str]]] | None = None) -> int:
    """Audit the report at ``path`` (the file or its run folder) and print the outcome.

    With ``empirical`` also run the canary audit of the message mechanism as the report
    configures it (``canaries`` of them); ``composition``, ``agents`` and ``anchors`` as in
    :func:`.audit.audit`. Returns 0 only if every check passes, else 1; raises
    ``FileNotFoundError`` (exit code 2) where there is no report to read.
    """
    path = Path(path)
    report_path = path / REPORT_NAME if path.is_dir() else path
    if not report_path.is_file():
        raise FileNotFoundError(
            f"no privacy report at {report_path}: give a run directory (one that holds "
            f"{REPORT_NAME}) or the report itself")
    console.print(f"Privacy audit of [bold]{escape(str(report_path))}[/bold]")
    from fedcomm.privacy.audit import audit

    result = audit(report_path, composition=composition, agents=agents, anchors=anchors)
    problems = [(f.where, f.message) for f in result.failures]
    try:
        report: dict[str, Any] | None = load_report(report_path)
    except (OSError, ValueError):
        report = None  # the audit has named the problem
    if report is not None and result.independent:
        console.print(_independent_table(report, result))
    if empirical:
        problems += _empirical(report, report_path, console, canaries, seed)
    if problems:
        table = Table(title="Problems", title_justify="left")
        table.add_column("where", style="bold red", overflow="fold")
        table.add_column("problem", overflow="fold")
        for where, message in problems:
            table.add_row(escape(where), escape(message))
        console.print(table)
        console.print(f"[bold red]FAILED ({len(problems)} problem"
                      f"{'' if len(problems) == 1 else 's'})[/bold red]")
        return 1
    console.print("[bold green]verified[/bold green]")
    return 0


def _eps(value: Any) -> str:
    """An epsilon as printed: ``∞`` for a report's ``"inf"`` or a recomputed ``math.inf``."""
    try:
        eps = math.inf if value == math.inf else decode_eps(value)
    except ValueError:
        return repr(value)
    return "∞" if eps == math.inf else f"{eps:.6f}"


def _independent_table(report: Mapping[str, Any], result: AuditResult) -> Table:
    table = Table(title="Independent recomputation (dp-accounting PLD, from the raw ledgers)",
                  title_justify="left")
    for column in ("agent", "mechanism", "relation", "reported epsilon", "independent epsilon"):
        table.add_column(column, justify="right" if "epsilon" in column else "left")
    for agent, values in result.independent.items():
        section = report["agents"].get(agent, {})
        for key, value in values.items():
            claim = section.get(key if key == "composed" else "mechanisms", {})
            if key != "composed":
                claim = claim.get(key, {})
            table.add_row(escape(agent), escape(key), escape(str(claim.get("relation", ""))),
                          _eps(claim.get("epsilon")), _eps(value))
    return table


def _empirical(report: Mapping[str, Any] | None, report_path: Path, console: Console,
               canaries: int, seed: int | None) -> list[tuple[str, str]]:
    """Run the canary audit of the message mechanism; the problems it finds."""
    from fedcomm.privacy.canary import empirical_audit, empirical_response_audit

    where = f"{report_path.name}:empirical"
    if report is None:
        return [(where, "no readable report to configure the empirical audit from")]
    try:
        setup = message_setup(report, report_path.parent)
    except (KeyError, TypeError, ValueError) as exc:
        return [(where, f"cannot configure the empirical audit: {exc}")]
    guesses = min(1000, canaries // 4)
    if setup.get("kind") == "randomized_response":
        found = empirical_response_audit(
            setup["epsilon"], setup["symbols"], releases_per_unit=setup["releases_per_unit"],
            canaries=canaries, k_plus=guesses, k_minus=guesses, seed=seed)
        described = (f"randomized response eps={setup['epsilon']:g} over {setup['symbols']} "
                     "symbols")
        return _judged(found, setup, described, canaries, console, where)
    sigma, per_unit = setup["noise_multiplier"], setup["releases_per_unit"]
    if sigma > 0 and canaries * per_unit > MAX_NORMALS:
        # T unsampled releases of sigma sum to one of sigma / sqrt(T): same scores up to
        # scale, so the same guesses and bound, without T * canaries normal draws.
        sigma, per_unit = sigma / math.sqrt(per_unit), 1
    found: CanaryAudit = empirical_audit(
        sigma, clip=setup["clip"], relation=setup["relation"], releases_per_unit=per_unit,
        delta=report["run"]["delta"], canaries=canaries, k_plus=guesses, k_minus=guesses,
        seed=seed)
    described = f"sigma={setup['noise_multiplier']:g}, C={setup['clip']:g}, {setup['relation']}"
    return _judged(found, setup, described, canaries, console, where)


def _judged(found: CanaryAudit, setup: Mapping[str, Any], described: str, canaries: int,
            console: Console, where: str) -> list[tuple[str, str]]:
    claimed = setup["claimed_epsilon"]
    console.print(
        f"Empirical canary audit of {MESSAGE!r} ({described}, {setup['releases_per_unit']} "
        f"releases per unit from the {setup['source']}, {canaries} canaries, {found.correct}/"
        f"{found.guesses} guesses right): {found.confidence_text} lower bound "
        f"{found.epsilon_lower_bound:.4f}, claimed epsilon {_eps(claimed)} "
        f"(exact epsilon of this configuration {_eps(found.claimed_epsilon)})")
    if found.epsilon_lower_bound > claimed:
        return [(where, f"the {found.confidence_text} empirical lower bound "
                        f"{found.epsilon_lower_bound:.4f} exceeds the claimed epsilon "
                        f"{_eps(claimed)} of {MESSAGE!r}: the mechanism leaks more than it "
                        "claims")]
    return []


def message_setup(report: Mapping[str, Any], report_dir: Path) -> dict[str, Any]:
    """The message mechanism as the report configures it, for :func:`empirical_audit`.

    The weakest configuration: the smallest declared noise multiplier (a schedule declares
    several) and the most releases that compose in one unit. That count comes from the
    ledgers, since the report states only run totals; a report whose ledgers cannot be read
    falls back to the largest count per ledger entry of its per-agent mechanism entries.
    The claimed epsilon is the largest any agent's report states for the mechanism.
    """
    run = report["run"]
    declared = run["mechanisms"].get(MESSAGE)
    agents = {agent: section["mechanisms"][MESSAGE]
              for agent, section in report["agents"].items()
              if MESSAGE in section["mechanisms"]}
    if declared is None or not agents:
        raise ValueError(f"the report has no {MESSAGE!r} mechanism with releases")
    parameters = [p for m in agents.values() for p in m["parameters"]]

    def weakest(key: str, pick: Any) -> float:
        value = declared.get(key)
        if value is None:
            return pick(p[key] for p in parameters)
        return pick(value) if isinstance(value, list) else value

    try:
        per_unit, source = _ledger_count(report, report_dir), "ledgers"
    except (OSError, LedgerError, KeyError) as exc:
        per_unit = max(math.ceil(p["count"] / p["releases"]) for p in parameters)
        source = f"report (ledgers unreadable: {exc})"
    claimed = max(decode_eps(m["epsilon"]) for m in agents.values())
    if declared.get("kind") == "randomized_response":
        return {"kind": "randomized_response", "epsilon": float(weakest("epsilon", max)),
                "symbols": int(weakest("symbols", min)), "releases_per_unit": per_unit,
                "source": source, "claimed_epsilon": claimed}
    return {
        "noise_multiplier": float(weakest("noise_multiplier", min)),
        "clip": float(weakest("clip", max)),
        "relation": declared.get("relation", run["relation"]),
        "releases_per_unit": per_unit,
        "source": source,
        "claimed_epsilon": max(decode_eps(m["epsilon"]) for m in agents.values()),
    }


def _ledger_count(report: Mapping[str, Any], report_dir: Path) -> int:
    """Most message releases (with multiplicity) composing in one unit, over all agents."""
    most = 0
    for section in report["agents"].values():
        units: dict[Any, int] = {}
        for entry in read_ledger(report_dir / section["ledger"]["path"]):
            if entry["mechanism"] == MESSAGE:
                key = group_key(report["run"]["unit"], report["run"].get("composition", "batch"),
                                entry["batch"])
                units[key] = units.get(key, 0) + entry["count"]
        most = max(most, *units.values(), 0)
    if most == 0:
        raise KeyError(f"no {MESSAGE!r} entries in the ledgers")
    return most
