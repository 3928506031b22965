"""What ``simulate`` and ``deploy local`` share: a federated run from flags or a run directory,
its failures and Ctrl-C, and its result."""

from __future__ import annotations

import argparse
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from fedcomm.commands.options import default_out, federation_config_from_args, given_flags
from fedcomm.commands.output import console, design_lines, print_result, rounds_text
from fedcomm.config import FederationConfig
from fedcomm.releases.plan import PrivacyPlan
from fedcomm.summary import RunResult


def exit_if_stranded(code: int) -> None:
    """Exit now if threads of the simulation engine outlived it.

    After an interrupted run Flower's message threads stay blocked on Ray actors that are
    already gone, and the interpreter would wait for them at exit forever. Everything of the
    run is on disk and every process it started is stopped by then.
    """
    if any(t.is_alive() and not t.daemon for t in threading.enumerate()
           if t is not threading.main_thread()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def config_and_out(args: argparse.Namespace, command: str) -> tuple[FederationConfig, Path]:
    """The run's configuration and directory: from the flags, or a resumed run's own."""
    if args.resume:
        ignored = [*given_flags(args), *(["--out"] if args.out else []),
                   *(["--env-opt"] if args.env_opt else []),
                   *(["--sites"] if args.sites is not None else []),
                   *(["--site-opt"] if args.site_opt else []),
                   *(["--non-private"] if getattr(args, "non_private", False) else [])]
        if ignored:
            raise ValueError(f"--resume continues {args.resume} with its own config.json: "
                             f"{', '.join(ignored)} would not be taken; leave "
                             f"{'it' if len(ignored) == 1 else 'them'} out, or start a new run")
        config = args.resume / "config.json"
        if not config.exists():
            raise FileNotFoundError(f"no config.json in {args.resume}: is it a run directory "
                                    f"of fedcomm {command}?")
        return FederationConfig.from_json(config.read_text()), args.resume
    fed = federation_config_from_args(args)
    return fed, args.out or default_out(fed.train.env)


def finished(out: Path, fed: FederationConfig) -> bool:
    """Whether the run to resume is finished: then say so, and run and spend nothing (its
    result stays as it was)."""
    from fedcomm.rundir import SUMMARY, RunDir

    run = RunDir(out)
    if not run.finished():
        return False
    summary = run.summary()
    console.print(f"{out} is finished ({summary.rounds} of {fed.rounds} rounds): "
                  f"nothing to resume, nothing spent; its result is {out / SUMMARY}",
                  highlight=False, soft_wrap=True)
    return True


def rounds_done(out: Path) -> int:
    """The rounds a run to resume has committed (its checkpoint's), 0 without one."""
    from fedcomm.server.checkpoint import load_checkpoint

    ckpt = load_checkpoint(out)
    return ckpt.round if ckpt is not None else 0


def run_federated(args: argparse.Namespace, command: str,
                  run: Callable[[FederationConfig, Path, PrivacyPlan], RunResult]) -> int:
    """A federated run, simulated or deployed: ``run(fed, out, plan)`` returns its result."""
    from fedcomm.releases.plan import plan_of
    from fedcomm.releases.report import server_text
    from fedcomm.server.federation import FederationError

    fed, out = config_and_out(args, command)
    if args.resume and finished(out, fed):
        return 0
    planned = plan_of(fed)  # once, before anything starts: exit 2
    console.print(f"[bold]fedcomm {command}[/] {fed.train.env}, {fed.spec.n_agents} agents, "
                  f"{rounds_text(fed, rounds_done(out) if args.resume else 0)}; "
                  f"{server_text(fed)} -> {out}")
    console.print(planned.headline(), highlight=False)
    if not args.resume:
        private_default = not getattr(args, "non_private", False)
        for line in design_lines(fed, private_default):
            console.print(line, highlight=False, soft_wrap=True)
    try:
        result = run(fed, out, planned)
    except FederationError as e:  # a deployment's failures too
        console.print(f"[red]error:[/] {e}", soft_wrap=True, highlight=False)
        console.print(f"the run directory keeps every committed round: continue it with "
                      f"fedcomm {command} --resume {out}", highlight=False)
        exit_if_stranded(1)
        return 1
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/]: continue with fedcomm {command} --resume {out}",
                      highlight=False)
        exit_if_stranded(130)
        return 130
    batches = sum(len(fed.batches_in(r)) for r in range(1, (result.summary.rounds or 0) + 1))
    print_result(f"{fed.train.env}: federated, mean return per agent", result.summary,
                 batches=batches or None)
    console.print(f"run directory: {result.run_dir}")
    return 0
