"""``fedcomm report`` and ``fedcomm audit``: a run's privacy report, rendered and verified."""

from __future__ import annotations

import argparse
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
    from fedcomm.clients.privacy import composition_of_config
    from fedcomm.privacy.commands import audit_command

    return audit_command(args.path, args.empirical, console,
                         composition=composition_of_config)
