"""Privacy against utility: federated runs at several composed budgets (``--epsilon``).

Each point is one ``fedcomm simulate --epsilon E`` run: the one budget per privacy unit,
split over the mechanisms and calibrated before the first round, so the composed epsilon the
run's own report states holds for the unit and relation it names. ``inf`` is the same run
without ``--epsilon`` (the default's channel noise, no DP-SGD). Arguments after the
benchmark's own go to ``fedcomm simulate`` (a design: ``--channel discrete --share used``...).
Runs already present under ``--out`` are reused. Prints a table and writes a plot.

    python benchmarks/privacy_utility.py --epsilons 8 32 inf --out runs/pu -- --env-steps 2500000
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def run(eps: float, out: Path, extra: list[str]) -> Path:
    """One simulate run at budget ``eps`` (``inf``: no ``--epsilon``), reused if present."""
    run_dir = out / f"eps-{eps:g}"
    if (run_dir / "summary.json").exists():
        return run_dir
    budget = [] if math.isinf(eps) else ["--epsilon", f"{eps:g}"]
    cmd = [sys.executable, "-m", "fedcomm", "simulate", *budget, "--quiet",
           "--out", str(run_dir), *extra]
    print(" ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)
    return run_dir


def composed(summary: dict) -> str:
    """The composed epsilon the run's report states, ``inf`` where a mechanism is not DP."""
    value = summary.get("privacy", {}).get("composed")
    return "inf" if value is None or value == "inf" else f"{float(value):.3f}"


def split(summary: dict) -> str:
    eps = summary.get("privacy", {}).get("epsilon", {})
    return ", ".join(f"{k} {v if isinstance(v, str) else f'{v:.2f}'}" for k, v in eps.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[8, 32, math.inf])
    parser.add_argument("--out", type=Path, default=Path("runs/privacy-utility"))
    parser.add_argument("--plot", type=Path, default=Path("privacy_utility.png"))
    parser.add_argument("simulate", nargs=argparse.REMAINDER,
                        help="after --: arguments for fedcomm simulate")
    args = parser.parse_args()
    extra = [a for a in args.simulate if a != "--"]

    rows = [(eps, json.loads((run(eps, args.out, extra) / "summary.json").read_text()))
            for eps in args.epsilons]

    print("| budget (--epsilon) | composed epsilon (report) | per mechanism "
          "| return (greedy eval) | gap closed |")
    print("|---|---|---|---|---|")
    for eps, s in rows:
        print(f"| {eps:g} | {composed(s)} | {split(s)} | {s['final']['return_mean']:.2f} "
              f"± {s['final']['return_se']:.2f} | {100 * s['gap_closed']:.1f}% |")

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    finite = [(e, s) for e, s in rows if math.isfinite(e)]
    ax.errorbar([e for e, _ in finite], [s["final"]["return_mean"] for _, s in finite],
                yerr=[s["final"]["return_se"] for _, s in finite], fmt="o-",
                label="federated, --epsilon (composed per unit)")
    for eps, s in rows:
        if math.isinf(eps):
            ax.axhline(s["final"]["return_mean"], color="tab:blue", ls=":",
                       label=f"without --epsilon {s['final']['return_mean']:.2f}")
    base = rows[0][1]["baselines"]
    for name, style in (("no_comm", "--"), ("oracle", "-.")):
        ax.axhline(base[name]["return_mean"], color="gray", ls=style, lw=1,
                   label=f"{name} {base[name]['return_mean']:.2f}")
    ax.set_xscale("log", base=2)
    unit = rows[0][1].get("privacy", {}).get("unit", "episode")
    ax.set_xlabel(f"composed epsilon per {unit} (replace-one, delta 1e-5)")
    ax.set_ylabel("return per agent")
    ax.set_title("privacy against utility")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
