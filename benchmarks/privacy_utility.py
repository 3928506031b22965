"""Privacy against utility: federated designs at several composed budgets (``--epsilon``),
each beside its DP ceiling.

Each point is ``fedcomm simulate --epsilon E`` of a design over seeds: one budget per privacy
unit, split over the mechanisms and calibrated before the first round, so the composed
epsilon the run's own report states holds for the unit and relation it names. ``inf`` is the
design from the non-private preset (``--non-private``). A design is ``NAME=FLAGS`` (default:
the private preset as it is); ``--non-private`` in its flags starts it from the Gaussian
preset at every budget. Flags after ``--`` go to every run. Runs already present under
``--out/<design>/eps-<E>/seed-<S>`` are reused. Prints a table (the gap closed per seed, the
run's DP ceiling, the share of the no-comm -> ceiling gap) and writes a plot.

    python benchmarks/privacy_utility.py --epsilons 1 2 4 8 --seeds 0 1 --out runs/pu \\
        --design "discrete (default)=" --design "Gaussian=--non-private --accumulate" \\
        -- --env-steps 2000000
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import matplotlib
from sweep import setting, slug  # benchmarks/sweep.py: NAME=FLAGS and its folder name

from fedcomm.baselines import EvalResult, baseline_summary

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def run(flags: list[str], eps: float, seed: int, out: Path) -> dict:
    """One simulate run's summary at budget ``eps`` (``inf``: non-private), reused if there."""
    run_dir = out / f"eps-{eps:g}" / f"seed-{seed}"
    if not (run_dir / "summary.json").exists():
        budget = ["--non-private"] if math.isinf(eps) else ["--epsilon", f"{eps:g}"]
        cmd = [sys.executable, "-m", "fedcomm", "simulate", *flags, *budget, "--seed",
               str(seed), "--quiet", "--out", str(run_dir)]
        print(" ".join(cmd[2:]), flush=True)
        subprocess.run(cmd, check=True)
    return json.loads((run_dir / "summary.json").read_text())


def composed(summaries: list[dict]) -> str:
    """The largest composed epsilon the runs' reports state, ``inf`` where one is not DP."""
    values = [(s.get("privacy") or {}).get("composed") for s in summaries]
    if any(v is None or v == "inf" for v in values):
        return "inf"
    return f"{max(float(v) for v in values):.3f}"


def split(summary: dict) -> str:
    eps = (summary.get("privacy") or {}).get("epsilon", {})
    return ", ".join(f"{k} {v if isinstance(v, str) else f'{v:.2f}'}" for k, v in eps.items())


def shares(summary: dict) -> dict:
    """The gap closed, and against the ceiling, recomputed from the run's own returns."""
    final = EvalResult.from_dict(summary["final"])
    return baseline_summary(final, {k: EvalResult.from_dict(v)
                                    for k, v in summary["baselines"].items()})


def percent(values: list[float | None]) -> str:
    return " / ".join("n/a" if v is None else f"{100 * v:.1f}%" for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--design", type=setting, action="append", metavar="NAME=FLAGS")
    parser.add_argument("--out", type=Path, default=Path("runs/privacy-utility"))
    parser.add_argument("--plot", type=Path, default=Path("privacy_utility.png"))
    parser.add_argument("simulate", nargs=argparse.REMAINDER,
                        help="after --: arguments for every fedcomm simulate")
    args = parser.parse_args()
    common = [a for a in args.simulate if a != "--"]
    designs = args.design or [("default", [])]

    results = {name: {eps: [run([*flags, *common], eps, seed, args.out / slug(name))
                            for seed in args.seeds] for eps in args.epsilons}
               for name, flags in designs}

    print("| design | budget | composed (report) | per mechanism | return (mean) "
          "| gap closed per seed | DP ceiling's gap | of the ceiling's gap |")
    print("|---|---|---|---|---|---|---|---|")
    for name, by_eps in results.items():
        for eps, runs in by_eps.items():
            mean = statistics.mean(s["final"]["return_mean"] for s in runs)
            print(f"| {name} | {eps:g} | {composed(runs)} | {split(runs[0])} | {mean:.2f} | "
                  f"{percent([shares(s)['gap_closed'] for s in runs])} | "
                  f"{percent([shares(runs[0]).get('ceiling_gap_closed')])} | "
                  f"{percent([shares(s).get('of_ceiling') for s in runs])} |")

    seeds = f"mean of {len(args.seeds)} seeds" if len(args.seeds) > 1 else "one seed"
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, (name, by_eps) in enumerate(results.items()):
        color = f"C{i}"
        finite = [(e, runs) for e, runs in by_eps.items() if math.isfinite(e)]
        ax.plot([e for e, _ in finite],
                [statistics.mean(s["final"]["return_mean"] for s in runs) for _, runs in finite],
                "o-", color=color, label=f"{name}: trained ({seeds})")
        for e, runs in finite:
            ax.plot([e] * len(runs), [s["final"]["return_mean"] for s in runs], ".",
                    color=color, alpha=0.4)
        ceiling = [(e, runs[0]["baselines"]["ceiling"]["return_mean"]) for e, runs in finite
                   if "ceiling" in runs[0]["baselines"]]
        if ceiling:
            ax.plot(*zip(*ceiling), "x--", color=color, alpha=0.7, label=f"{name}: DP ceiling")
        for e, runs in by_eps.items():
            if math.isinf(e):
                ax.axhline(statistics.mean(s["final"]["return_mean"] for s in runs),
                           color=color, ls=":", label=f"{name}: non-private")
    base = next(iter(next(iter(results.values())).values()))[0]["baselines"]
    for name, style in (("no_comm", "--"), ("oracle", "-.")):
        ax.axhline(base[name]["return_mean"], color="gray", ls=style, lw=1,
                   label=f"{name} {base[name]['return_mean']:.2f}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("composed epsilon per episode (replace-one, delta 1e-5, every release)")
    ax.set_ylabel("return per agent (greedy)")
    ax.set_title("privacy against utility")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
