"""The ``fedcomm`` command: one module per command, each its parser and its run."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rich.markup import escape

from fedcomm.commands import agent, deploy, evaluate, privacy, sim, simulate, train, worker
from fedcomm.commands.flags import Parser
from fedcomm.commands.options import check_args, federation_config_from_args, train_config_from_args
from fedcomm.commands.output import console

COMMANDS = (train, simulate, evaluate, deploy, sim, agent, worker, privacy)

__all__ = ["build_parser", "federation_config_from_args", "main", "train_config_from_args"]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="fedcomm", allow_abbrev=False,
                    description="Heterogeneous agents that learn to communicate, each a private "
                    "federated party.")
    parser.add_argument("--version", action="version",
                        version=f"fedcomm {__import__('fedcomm').__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command: exit code 2 and one ``error:`` line for anything refused, before the
    command starts where it can be known then."""
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        return args.func(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        console.print(f"[red]error:[/] {escape(str(e))}", soft_wrap=True, highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
