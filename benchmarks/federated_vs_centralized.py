"""Federated against centralized: greedy evaluation curves of finished runs, side by side.

The runs must be of the same environment and preset and evaluate on the same fixed seeds
(``fedcomm train`` and ``fedcomm simulate`` both do); several runs of each, one per seed, are
paired in the order given. The table gives each run's evaluations with the gap they close
(no-communication -> oracle, the baselines in ``summary.json``) and, per seed, the federated
run's final gap closure as a share of the centralized one's; the plot draws every curve
against environment steps and against training time.

    python benchmarks/federated_vs_centralized.py --federated runs/f0 runs/f1 \\
        --centralized runs/c0 runs/c1 --out docs/figures/x.png
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

COLORS = {"federated": "tab:blue", "centralized": "tab:orange"}


def load(run_dir: Path) -> tuple[list[dict], dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    evals = [r for r in rows if r.get("eval_return") is not None]
    final = {"env_steps": rows[-1]["env_steps"], "train_time_s": rows[-1]["train_time_s"],
             "eval_return": summary["final"]["return_mean"], "final": True}
    if not evals or evals[-1]["env_steps"] != final["env_steps"]:
        evals.append(final)
    return evals, summary


def gap(value: float, summary: dict) -> float:
    low = summary["baselines"]["no_comm"]["return_mean"]
    high = summary["baselines"]["oracle"]["return_mean"]
    return 100 * (value - low) / (high - low)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--federated", type=Path, nargs="+", required=True)
    parser.add_argument("--centralized", type=Path, nargs="+", required=True)
    parser.add_argument("--out", type=Path, default=Path("federated_vs_centralized.png"))
    args = parser.parse_args()
    if len(args.federated) != len(args.centralized):
        parser.error("give as many centralized runs as federated ones (one per seed)")

    runs = {"federated": [load(d) for d in args.federated],
            "centralized": [load(d) for d in args.centralized]}
    print("| run | env steps | training time (s) | eval return | gap closed |")
    print("|---|---|---|---|---|")
    for name, seeds in runs.items():
        for path, (evals, summary) in zip(getattr(args, name), seeds, strict=True):
            for r in evals:
                label = f"{name} {path.name}" + (
                    f" (final, {summary['final']['episodes']} episodes)" if r.get("final")
                    else "")
                print(f"| {label} | {r['env_steps'] / 1e6:.2f}M | {r['train_time_s']:.0f} | "
                      f"{r['eval_return']:.2f} | {gap(r['eval_return'], summary):.1f}% |")
    ratios = []
    for (_, fed), (_, cen) in zip(runs["federated"], runs["centralized"], strict=True):
        ratios.append(gap(fed["final"]["return_mean"], fed)
                      / gap(cen["final"]["return_mean"], cen))
    print("\nfederated gap closure / centralized gap closure, per seed: "
          + ", ".join(f"{100 * r:.1f}%" for r in ratios)
          + f"; of the means: {100 * _of_means(runs):.1f}%")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for name, seeds in runs.items():
        for i, (evals, _) in enumerate(seeds):
            for ax, x in zip(axes, ("env_steps", "train_time_s"), strict=True):
                ax.plot([r[x] for r in evals], [r["eval_return"] for r in evals], "o-", ms=3,
                        color=COLORS[name], alpha=1.0 if i == 0 else 0.6,
                        label=f"{name} ({len(seeds)} seeds)" if i == 0 else None)
    summary = runs["centralized"][0][1]
    for ax in axes:
        for base, style in (("no_comm", "--"), ("oracle", "-.")):
            value = summary["baselines"][base]["return_mean"]
            ax.axhline(value, color="gray", ls=style, lw=1, label=f"{base} {value:.2f}")
        ax.grid(alpha=0.3)
    axes[0].set_xlabel("environment steps")
    axes[1].set_xlabel("training time (s, this machine)")
    axes[0].set_ylabel("greedy evaluation return per agent")
    axes[1].legend(loc="lower right", fontsize=8)
    share = json.loads((args.federated[0] / "config.json").read_text()).get("share", "all")
    fig.suptitle(f"{summary['env']}: federated (--share {share}) against centralized")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"plot: {args.out}")


def _of_means(runs: dict[str, list[tuple[list[dict], dict]]]) -> float:
    """The mean federated gap closure over the mean centralized one."""
    means = {name: statistics.mean(gap(s["final"]["return_mean"], s) for _, s in seeds)
             for name, seeds in runs.items()}
    return means["federated"] / means["centralized"]


if __name__ == "__main__":
    main()
