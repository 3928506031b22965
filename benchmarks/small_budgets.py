"""Small budgets on every seed: finished ``fedcomm simulate --epsilon E --seed S`` runs, each
evaluated greedily on many held-out episodes with ``fedcomm eval`` (the scripted teams and the
run's DP ceiling on the very same episodes, so that their spread cancels from the shares) and
on the original mpe2 environment; a table per budget and a plot.

    fedcomm simulate --epsilon 4 --seed 21 --out runs/small/e4-s21
    ...
    python benchmarks/small_budgets.py --out runs/small/results runs/small/e*-s*

Writes ``results.json`` and ``small_budgets.png`` in ``--out``. A run's mpe2 gap is measured
against the port's scripted teams on the port's episodes of the same evaluation seed (mpe2
has no scripted no_comm or oracle team).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

MPE2 = "mpe2:simple_speaker_listener_v4"


def evaluate(run: Path, episodes: int, seed: int, env: str | None = None) -> dict:
    """``fedcomm eval RUN --json`` as a user runs it."""
    cmd = [sys.executable, "-m", "fedcomm", "eval", str(run), "--episodes", str(episodes),
           "--seed", str(seed), "--json", *(["--env", env] if env else [])]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def read(run: Path, episodes: int, mpe2_episodes: int, seed: int) -> dict:
    config = json.loads((run / "config.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    port = evaluate(run, episodes, seed)
    row = {"run": str(run), "epsilon": config["train"]["privacy"]["epsilon"],
           "seed": config["train"]["seed"], "composed": summary["privacy"]["composed"],
           "train_s": summary["train_time_s"], "return": port["return_mean"],
           "gap_closed": port["gap_closed"], "of_ceiling": port["of_ceiling"],
           "ceiling_gap_closed": port["ceiling_gap_closed"],
           "in_run_gap_closed": summary["gap_closed"]}
    if mpe2_episodes:
        mpe2 = evaluate(run, mpe2_episodes, seed, MPE2)
        low, high = (port["baselines"][k]["return_mean"] for k in ("no_comm", "oracle"))
        ceiling = port["baselines"]["ceiling"]["return_mean"]
        row |= {"mpe2_return": mpe2["return_mean"], "mpe2_se": mpe2["return_se"],
                "mpe2_gap_closed": (mpe2["return_mean"] - low) / (high - low),
                "mpe2_of_ceiling": (mpe2["return_mean"] - low) / (ceiling - low)}
    return row


def table(rows: list[dict]) -> str:
    lines = ["| budget | seed | composed | gap closed | of the ceiling's gap | ceiling | "
             "mpe2 return | mpe2 gap closed (of the ceiling's) | training s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (-r["epsilon"], r["seed"])):
        mpe2 = (f"{r['mpe2_return']:.2f} ± {r['mpe2_se']:.2f} | {r['mpe2_gap_closed']:.1%} "
                f"({r['mpe2_of_ceiling']:.1%})" if "mpe2_return" in r else "| ")
        lines.append(f"| {r['epsilon']:g} | {r['seed']} | {r['composed']:.4g} | "
                     f"{r['gap_closed']:.1%} | {r['of_ceiling']:.1%} | "
                     f"{r['ceiling_gap_closed']:.1%} | {mpe2} | {r['train_s']:.0f} |")
    lines += ["", "| budget | runs | gap closed: min / median / max | of the ceiling's gap: "
              "min / median / max |", "|---|---|---|---|"]
    for eps in sorted({r["epsilon"] for r in rows}, reverse=True):
        mine = [r for r in rows if r["epsilon"] == eps]
        gap = sorted(r["gap_closed"] for r in mine)
        top = sorted(r["of_ceiling"] for r in mine)
        lines.append(f"| {eps:g} | {len(mine)} | {gap[0]:.1%} / {statistics.median(gap):.1%} / "
                     f"{gap[-1]:.1%} | {top[0]:.1%} / {statistics.median(top):.1%} / "
                     f"{top[-1]:.1%} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({r["epsilon"] for r in rows})
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    ceilings = [statistics.mean(r["ceiling_gap_closed"] for r in rows if r["epsilon"] == e)
                for e in budgets]
    left.plot(budgets, [100 * c for c in ceilings], "k--", label="DP ceiling")
    for key, marker, name in (("gap_closed", "o", "port"), ("mpe2_gap_closed", "x", "mpe2")):
        pts = [(r["epsilon"], 100 * r[key]) for r in rows if key in r]
        if pts:
            left.scatter(*zip(*pts), marker=marker, label=f"each seed ({name})")
    left.set(xscale="log", xlabel="composed epsilon per episode", ylabel="gap closed (%)",
             xticks=budgets, xticklabels=[f"{b:g}" for b in budgets])
    left.legend()
    pts = [(r["epsilon"], 100 * r["of_ceiling"]) for r in rows]
    right.scatter(*zip(*pts))
    right.axhline(90, color="grey", linestyle=":", label="90% of the ceiling's gap")
    right.set(xscale="log", xlabel="composed epsilon per episode",
              ylabel="of the DP ceiling's gap (%)", xticks=budgets,
              xticklabels=[f"{b:g}" for b in budgets])
    right.legend()
    for ax in (left, right):
        ax.minorticks_off()
    fig.suptitle("fedcomm simulate --epsilon E alone, held-out seeds (greedy, paired episodes)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--episodes", type=int, default=50_000, help="per site, on the port")
    p.add_argument("--mpe2-episodes", type=int, default=1000, help="per site; 0: none")
    p.add_argument("--seed", type=int, default=3, help="the evaluation episodes' seed")
    args = p.parse_args()
    rows = [read(run, args.episodes, args.mpe2_episodes, args.seed) for run in args.runs
            if (run / "summary.json").exists()]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    plot(rows, args.out / "small_budgets.png")
    print(table(rows))


if __name__ == "__main__":
    main()
