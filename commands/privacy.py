"""``fedcomm report`` and ``fedcomm audit``: a run's privacy report, rendered and verified."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedcomm.commands.options import parser_of
from fedcomm.commands.output import console


def add(sub: argparse._SubParsersAction) -> None:
    p = parser_of(sub, "report", help="render a run's privacy report again",
                  description="Write privacy_report.html from a run's privacy_report.json.")
    p.add_argument("run_dir", type=Path)
    p.set_defaults(func=run_report)
    p = parser_of(sub, "audit", help="verify a run's privacy report independently",
                  description="Check the ledgers' hash chains against the report, every "
                  "entry against the run config, every epsilon recomputed with Google's "
                  "dp-accounting, and the budgets. Exit 0 only if all of it verifies.")
    p.add_argument("path", type=Path, metavar="REPORT_OR_RUN_DIR")
    p.add_argument("--empirical", action="store_true",
                   help="also run a one-run canary audit of the message mechanism")
    p.set_defaults(func=run_audit)


def run_report(args: argparse.Namespace) -> int:
    from fedcomm.privacy.commands import report_command

    console.print(f"privacy report: {report_command(args.run_dir)}")
    return 0


def run_audit(args: argparse.Namespace) -> int:
    from fedcomm.privacy.commands import audit_command
    from fedcomm.releases.schedule import composition_of_config

    folder = args.path if args.path.is_dir() else args.path.parent
    agents, anchors = server_record(folder)
    return audit_command(args.path, args.empirical, console,
                         composition=composition_of_config, agents=agents, anchors=anchors)


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
