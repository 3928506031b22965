"""``fedcomm train``: the centralized reference trainer."""

from __future__ import annotations

import argparse

from fedcomm.commands.flags import FlagError
from fedcomm.commands.options import add_training, default_out, parser_of, train_config_from_args
from fedcomm.commands.output import console, plural, print_result, steps_text


def add(sub: argparse._SubParsersAction) -> None:
    p = parser_of(sub, "train", help="centralized reference trainer (all agents, one graph)",
                  description="Train every agent in one process with PPO and gradients "
                  "through the channel; write a run directory with metrics, summary, "
                  "checkpoint and plots.")
    add_training(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fedcomm.device import resolve_device
    from fedcomm.modes.centralized import train
    from fedcomm.releases.plan import plan_of

    cfg = train_config_from_args(args)
    try:  # this process trains: its device must exist before anything is written
        resolve_device(cfg.device)
    except ValueError as e:
        raise FlagError("--device", str(e)) from None
    planned = plan_of(cfg)  # before anything is written: exit 2, one line
    out = args.out or default_out(cfg.env)
    batches = max(1, cfg.env_steps // cfg.batch_steps)  # as the trainer counts them
    limit = f", at most {cfg.time_budget:g} s of training" if cfg.time_budget else ""
    console.print(f"[bold]fedcomm train[/] {cfg.env}: "
                  f"{plural(batches, 'episode batch', 'episode batches')} "
                  f"({steps_text(cfg, batches)}){limit}; one process, no server -> {out}")
    result = train(cfg, out, progress=not args.quiet, plan=planned)
    print_result(f"{cfg.env}: centralized, mean return per agent", result.summary)
    console.print(f"run directory: {result.run_dir}")
    return 0
