"""A sweep of ``fedcomm simulate`` (or ``train``) settings over seeds: one table, one plot.

Each ``--run NAME=FLAGS`` is a setting; every setting runs once per ``--seeds`` seed, under
``--out/<name>/seed-<s>``, and runs already there are reused. Flags after ``--`` go to every
run. The table gives, per setting, the mean over seeds of the final greedy return (1024
episodes on the baselines' seeds), the gap closed (no-communication -> oracle) per seed, the
composed epsilon per unit the run's report states, and the training time; the plot draws each
setting's evaluation returns against environment steps (mean over seeds, each seed faint).

    python benchmarks/sweep.py --out runs/dpsgd --seeds 0 1 \\
        --run "no DP-SGD=" --run "update epsilon 2=--update-epsilon 2" -- --env-steps 2500000
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def setting(text: str) -> tuple[str, list[str]]:
    name, sep, flags = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=FLAGS, got {text!r}")
    return name, shlex.split(flags)


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def run(command: str, flags: list[str], out: Path) -> Path:
    if (out / "summary.json").exists():
        return out
    cmd = [sys.executable, "-m", "fedcomm", command, *flags, "--quiet", "--out", str(out)]
    print(" ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)
    return out


def curve(run_dir: Path) -> list[tuple[int, float]]:
    """Evaluation returns against environment steps, the final evaluation last."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    points = [(r["env_steps"], r["eval_return"]) for r in rows if r.get("eval_return") is not None]
    return [*points, (summary["env_steps"], summary["final"]["return_mean"])]


def composed(summary: dict) -> str:
    value = (summary.get("privacy") or {}).get("composed")
    return "inf" if value in ("inf", None) else f"{float(value):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=setting, action="append", required=True,
                        metavar="NAME=FLAGS")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--command", default="simulate", choices=["simulate", "train"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--plot", type=Path, help="write the curves here")
    parser.add_argument("--title", default="")
    args, common = parser.parse_known_args()
    common = [c for c in common if c != "--"]

    results: dict[str, list[tuple[dict, list[tuple[int, float]]]]] = {}
    for name, flags in args.run:
        for seed in args.seeds:
            run_dir = run(args.command, [*common, *flags, "--seed", str(seed)],
                          args.out / slug(name) / f"seed-{seed}")
            summary = json.loads((run_dir / "summary.json").read_text())
            results.setdefault(name, []).append((summary, curve(run_dir)))

    print("| setting | composed epsilon per unit | final return (mean over seeds) | "
          "gap closed per seed | training s |")
    print("|---|---|---|---|---|")
    for name, runs in results.items():
        finals = [s["final"]["return_mean"] for s, _ in runs]
        gaps = ", ".join(f"{100 * s['gap_closed']:.1f}%" for s, _ in runs)
        eps = ", ".join(sorted({composed(s) for s, _ in runs}))
        time_s = statistics.fmean(s["train_time_s"] for s, _ in runs)
        print(f"| {name} | {eps} | {statistics.fmean(finals):.2f} | {gaps} | {time_s:.0f} |")

    if args.plot:
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        baselines = next(iter(results.values()))[0][0]["baselines"]
        for i, (name, runs) in enumerate(results.items()):
            color = f"C{i}"
            for _, points in runs:
                ax.plot(*zip(*points), color=color, alpha=0.25, lw=1)
            common_steps = sorted(set.intersection(*(set(s for s, _ in p) for _, p in runs)))
            mean = [statistics.fmean(dict(p)[s] for _, p in runs) for s in common_steps]
            ax.plot(common_steps, mean, "o-", color=color, ms=3, label=name)
        for base, style in (("no_comm", "--"), ("oracle", "-.")):
            if base in baselines:
                ax.axhline(baselines[base]["return_mean"], color="gray", ls=style, lw=1,
                           label=f"{base} {baselines[base]['return_mean']:.2f}")
        ax.set(xlabel="environment steps", ylabel="greedy return per agent", title=args.title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
