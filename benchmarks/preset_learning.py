"""Learning per environment step and wall time to a target: the GPU preset against the CPU one.

Each preset trains an environment for the same environment steps from the same seeds, with a
greedy evaluation (1000 episodes) about every million steps. The table gives the evaluation
return at matched steps (mean over seeds) and, per run, the environment steps and seconds of
training at which the evaluation first reached each target. Learning per step does not depend on
the device, so the comparison runs anywhere; the seconds are the device's.

    python benchmarks/preset_learning.py --device cuda --presets cpu gpu --seeds 0 1 2
    python benchmarks/preset_learning.py --device cpu --presets gpu --json gpu-on-cpu.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace

import torch
from rich.console import Console
from rich.table import Table

from fedcomm.modes.centralized import train
from fedcomm.presets import preset
from fedcomm.rundir import RunDir
from fedcomm.sim.registry import make_env

EVAL_EVERY_STEPS = 1_000_000


def run(env: str, kind: str, seed: int, env_steps: int, device: str) -> dict:
    cfg = replace(preset(env, kind), seed=seed, env_steps=env_steps, device=device)
    per_iteration = cfg.num_envs * make_env(env, 1, **cfg.env_kwargs).spec.episode_length
    cfg.eval_every = max(1, round(EVAL_EVERY_STEPS / per_iteration))
    with tempfile.TemporaryDirectory() as out:
        result = train(cfg, out, progress=True)
        curve = [(r["env_steps"], r["train_time_s"], r["eval_return"])
                 for r in RunDir(out).metrics() if "eval_return" in r]
    curve.append((result.summary.env_steps, result.summary.train_time_s,
                  result.final.return_mean))
    return {"preset": kind, "seed": seed, "num_envs": cfg.num_envs,
            "minibatches": cfg.ppo.minibatches, "lr": cfg.ppo.lr, "curve": curve,
            "device": result.summary.device,
            "env_steps_per_s": result.summary.env_steps_per_s}


def first_reaching(curve: list, target: float) -> tuple[int, float] | None:
    """(environment steps, seconds of training) of the first evaluation at or above target."""
    return next(((steps, secs) for steps, secs, ret in curve if ret >= target), None)


def plot(runs: list[dict], env: str, targets: list[float], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    colors, labelled = {"cpu": "C0", "gpu": "C1"}, set()
    for r in runs:  # one line per run, one legend entry per preset
        steps, _, returns = zip(*r["curve"])
        label = None
        if r["preset"] not in labelled:
            labelled.add(r["preset"])
            label = f"{r['preset']} preset: {r['num_envs']} envs x {r['minibatches']} minibatches"
        ax.plot([s / 1e6 for s in steps], returns, marker=".", color=colors[r["preset"]],
                label=label)
    for t in targets:
        ax.axhline(t, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("environment steps (millions)")
    ax.set_ylabel("greedy return, 1000 episodes")
    ax.set_title(f"{env}: learning per environment step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="speaker_listener")
    parser.add_argument("--presets", nargs="+", default=["cpu", "gpu"], choices=["cpu", "gpu"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--env-steps", type=int, default=10_000_000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--targets", nargs="+", type=float, default=[-9.0, -8.0])
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--json", help="write every run's curve here")
    parser.add_argument("--plot", help="draw the curves to this image")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = [run(args.env, kind, seed, args.env_steps, args.device)
            for kind in args.presets for seed in args.seeds]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=2)
    if args.plot:
        plot(runs, args.env, args.targets, args.plot)

    console = Console(width=140)
    table = Table(title=f"{args.env}: greedy return (1000 episodes) at matched environment "
                        f"steps, mean over seeds {args.seeds}")
    table.add_column("env steps", justify="right")
    for kind in args.presets:
        table.add_column(f"{kind} preset", justify="right")
    marks = sorted({round(s / EVAL_EVERY_STEPS) for r in runs for s, _, _ in r["curve"]})
    for mark in marks:
        cells = []
        for kind in args.presets:
            values = [ret for r in runs if r["preset"] == kind for s, _, ret in r["curve"]
                      if round(s / EVAL_EVERY_STEPS) == mark]
            cells.append(f"{sum(values) / len(values):.2f}" if values else "")
        table.add_row(f"{mark}M", *cells)
    console.print(table)
    reach = Table(title="first evaluation at or above each target: env steps, training seconds")
    for col in ("preset", "seed", "envs x minibatches", "device", "env-steps/s",
                *(f"{t:g}" for t in args.targets)):
        reach.add_column(col, justify="right")
    for r in runs:
        hits = [first_reaching(r["curve"], t) for t in args.targets]
        reach.add_row(r["preset"], str(r["seed"]), f"{r['num_envs']} x {r['minibatches']}",
                      r["device"], f"{r['env_steps_per_s']:,.0f}",
                      *("not reached" if h is None else f"{h[0] / 1e6:.1f}M, {h[1]:.0f} s"
                        for h in hits))
    console.print(reach)


if __name__ == "__main__":
    main()
