"""The ``fedcomm`` command."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console(stderr=True)


def _key_value(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.replace("-", "_"), json.loads(value)
    except json.JSONDecodeError:
        return key.replace("-", "_"), value


def _default_out(env: str) -> Path:
    return Path("runs") / f"{env.replace(':', '-')}-{time.strftime('%Y%m%d-%H%M%S')}"


# -- fedcomm train ----------------------------------------------------------------------------
def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="centralized reference trainer (all agents, one graph)",
                       description="Train every agent in one process with PPO and gradients "
                       "through the channel; write a run directory with metrics, summary, "
                       "checkpoint and plots.")
    p.add_argument("--env", default="factory",
                   help="factory, speaker_listener, platoon (default: %(default)s, 3 agent types)")
    p.add_argument("--env-opt", type=_key_value, action="append", default=[], metavar="K=V",
                   help="environment option, e.g. --env-opt n_actuators=4 (repeatable)")
    p.add_argument("--out", type=Path, help="run directory (default: runs/<env>-<time>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-envs", type=int, help="parallel environments per iteration")
    p.add_argument("--env-steps", type=int, help="training budget in environment steps")
    p.add_argument("--time-budget", type=float, help="stop after this many seconds of training")
    p.add_argument("--noise", type=float, help="channel noise multiplier sigma (std = sigma*C)")
    p.add_argument("--clip", type=float, help="clip norm C of every knowledge vector")
    p.add_argument("--no-comm", action="store_true", help="deliver no vectors (ablation)")
    p.add_argument("--recurrent", action="store_true", help="give each agent a GRU state")
    p.add_argument("--encoder", choices=["mlp", "superposition"])
    p.add_argument("--hidden", type=int)
    p.add_argument("--comm-dim", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--epochs", type=int)
    p.add_argument("--minibatches", type=int)
    p.add_argument("--eval-episodes", type=int)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_train)


def train_config_from_args(args: argparse.Namespace):
    from fedcomm.presets import preset

    cfg = preset(args.env)
    if args.env_opt:
        cfg.env_kwargs = {**cfg.env_kwargs, **dict(args.env_opt)}
    top = {"seed": args.seed, "num_envs": args.num_envs, "env_steps": args.env_steps,
           "time_budget": args.time_budget, "eval_episodes": args.eval_episodes}
    team = {"noise_multiplier": args.noise, "clip": args.clip, "encoder": args.encoder,
            "hidden": args.hidden, "comm_dim": args.comm_dim}
    ppo = {"lr": args.lr, "epochs": args.epochs, "minibatches": args.minibatches}
    if args.no_comm:
        team["communicate"] = False
    if args.recurrent:
        team["recurrent"] = True

    def given(d: dict) -> dict:
        return {k: v for k, v in d.items() if v is not None}

    return replace(cfg, **given(top), team=replace(cfg.team, **given(team)),
                   ppo=replace(cfg.ppo, **given(ppo)))


def _run_train(args: argparse.Namespace) -> int:
    from fedcomm.train import train

    cfg = train_config_from_args(args)
    out = args.out or _default_out(cfg.env)
    console.print(f"[bold]fedcomm train[/] {cfg.env} -> {out}")
    result = train(cfg, out, progress=not args.quiet)
    table = Table(title=f"{cfg.env}: mean return per agent over {cfg.eval_episodes} episodes")
    table.add_column("team")
    table.add_column("return", justify="right")
    table.add_column("± s.e.", justify="right")
    for name, res in [("trained", result.final), *result.baselines.items()]:
        table.add_row(name, f"{res.return_mean:.3f}", f"{res.return_se:.3f}")
    console.print(table)
    s = result.summary
    console.print(f"gap closed (no_comm -> oracle): {s['gap_closed']:.1%}; "
                  f"{s['env_steps']:,} env steps in {s['train_time_s']:.0f} s "
                  f"({s['agent_steps_per_s']:,.0f} agent-steps/s)")
    console.print(f"run directory: {result.run_dir}")
    return 0


# -- fedcomm eval -----------------------------------------------------------------------------
def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a trained run on an environment",
                       description="Evaluate a run's checkpoint (greedy actions, channel noise "
                       "on). --env mpe2:<name> runs the original mpe2 environment.")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--env", help="environment (default: the one the run trained on)")
    p.add_argument("--env-opt", type=_key_value, action="append", default=[], metavar="K=V")
    p.add_argument("--episodes", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from fedcomm.evaluate import evaluate_team
    from fedcomm.runs import load_team

    team = load_team(args.run_dir)
    config = json.loads((args.run_dir / "config.json").read_text())
    env = args.env or config["env"]
    env_kwargs = dict(args.env_opt) if args.env else {**config["env_kwargs"], **dict(args.env_opt)}
    batch = 100 if env.startswith("mpe2:") else 1000
    result = evaluate_team(team, env, args.episodes, args.seed, batch=batch, env_kwargs=env_kwargs)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        console.print(f"{env}: return {result.return_mean:.3f} ± {result.return_se:.3f} "
                      f"(s.e., {result.episodes} episodes)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedcomm", description=__doc__)
    parser.add_argument("--version", action="version",
                        version=f"fedcomm {__import__('fedcomm').__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_eval(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        console.print(f"[red]error:[/] {e}", soft_wrap=True, highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
