"""``fedcomm train``: the centralized reference trainer."""

from __future__ import annotations

import argparse

from fedcomm.commands.options import add_training, default_out, parser_of, train_config_from_args
from fedcomm.commands.output import console, print_result


def add(sub: argparse._SubParsersAction) -> None:
    p = parser_of(sub, "train", help="centralized reference trainer (all agents, one graph)",
                  description="Train every agent in one process with PPO and gradients "
                  "through the channel; write a run directory with metrics, summary, "
                  "checkpoint and plots.")
    add_training(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fedcomm.modes.centralized import train
    from fedcomm.releases.plan import plan_of

    cfg = train_config_from_args(args)
    planned = plan_of(cfg)  # before anything is written: exit 2, one line
    out = args.out or default_out(cfg.env)
    console.print(f"[bold]fedcomm train[/] {cfg.env} -> {out}")
    result = train(cfg, out, progress=not args.quiet, plan=planned)
    print_result(f"{cfg.env}: mean return per agent over {cfg.eval_episodes} episodes",
                 result.summary)
    console.print(f"run directory: {result.run_dir}")
    return 0
