"""Federated against centralized: greedy evaluation curves of two finished runs, side by side.

Both runs must be of the same environment and preset and evaluate on the same fixed seeds
(``fedcomm train`` and ``fedcomm simulate`` both do). The table gives each run's evaluations
with the gap they close (no-communication -> oracle, the baselines in ``summary.json``); the
plot draws both curves against environment steps and against training time.

    python benchmarks/federated_vs_centralized.py runs/fed runs/central --out docs/figures/x.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


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
    parser.add_argument("federated", type=Path)
    parser.add_argument("centralized", type=Path)
    parser.add_argument("--out", type=Path, default=Path("federated_vs_centralized.png"))
    args = parser.parse_args()

    runs = {"federated": load(args.federated), "centralized": load(args.centralized)}
    print("| run | env steps | training time (s) | eval return | gap closed |")
    print("|---|---|---|---|---|")
    for name, (evals, summary) in runs.items():
        for r in evals:
            label = f"{name} (final, {summary['final']['episodes']} episodes)" if r.get(
                "final") else name
            print(f"| {label} | {r['env_steps'] / 1e6:.2f}M | {r['train_time_s']:.0f} | "
                  f"{r['eval_return']:.2f} | {gap(r['eval_return'], summary):.1f}% |")
    fed_final = runs["federated"][1]["final"]["return_mean"]
    cen_final = runs["centralized"][1]["final"]["return_mean"]
    ratio = gap(fed_final, runs["federated"][1]) / gap(cen_final, runs["centralized"][1])
    print(f"\nfederated gap closure / centralized gap closure: {100 * ratio:.1f}%")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for name, (evals, _) in runs.items():
        for ax, x in zip(axes, ("env_steps", "train_time_s"), strict=True):
            ax.plot([r[x] for r in evals], [r["eval_return"] for r in evals], "o-", ms=3,
                    label=name)
    summary = runs["centralized"][1]
    for ax in axes:
        for base, style in (("no_comm", "--"), ("oracle", "-.")):
            value = summary["baselines"][base]["return_mean"]
            ax.axhline(value, color="gray", ls=style, lw=1, label=f"{base} {value:.2f}")
        ax.grid(alpha=0.3)
    axes[0].set_xlabel("environment steps")
    axes[1].set_xlabel("training time (s, this machine)")
    axes[0].set_ylabel("greedy evaluation return per agent")
    axes[1].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"{summary['env']}: federated ({runs['federated'][1].get('strategy', '')}) "
                 "against centralized")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
