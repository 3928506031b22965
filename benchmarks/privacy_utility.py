"""Privacy against utility: federated speaker_listener at several message epsilons per episode.

Each point is one ``fedcomm simulate`` run of the default preset whose channel noise is
calibrated to the target epsilon for one episode's vectors (replace-one, delta 1e-5, RDP),
``inf`` meaning no channel noise. Runs already present under ``--out`` are reused. Prints a
table (return, gap closed, the epsilon the run's own report states) and writes a plot.

    python benchmarks/privacy_utility.py --epsilons 1 4 8 inf --out runs/pu --recurrent
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
    run_dir = out / f"eps-{eps:g}"
    if (run_dir / "summary.json").exists():
        return run_dir
    noise = ["--noise", "0"] if math.isinf(eps) else ["--message-epsilon", f"{eps:g}"]
    cmd = [sys.executable, "-m", "fedcomm", "simulate", "--env", "speaker_listener",
           *noise, "--quiet", "--out", str(run_dir), *extra]
    print(" ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)
    return run_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1, 4, 8, math.inf])
    parser.add_argument("--out", type=Path, default=Path("runs/privacy-utility"))
    parser.add_argument("--plot", type=Path, default=Path("privacy_utility.png"))
    args, extra = parser.parse_known_args()  # the rest goes to fedcomm simulate
    args.extra = extra

    rows = []
    for eps in args.epsilons:
        run_dir = run(eps, args.out, args.extra)
        summary = json.loads((run_dir / "summary.json").read_text())
        config = json.loads((run_dir / "config.json").read_text())
        claimed = summary["privacy"]["epsilon"].get("message")
        rows.append((eps, config["train"]["team"]["noise_multiplier"], summary, claimed))

    print("| target epsilon per episode | noise multiplier | reported epsilon (message) "
          "| return (1024 episodes) | gap closed |")
    print("|---|---|---|---|---|")
    for eps, sigma, s, claimed in rows:
        reported = "inf" if claimed is None else f"{float(claimed):.3f}"
        print(f"| {eps:g} | {sigma:.3f} | {reported} | {s['final']['return_mean']:.2f} "
              f"± {s['final']['return_se']:.2f} | {100 * s['gap_closed']:.1f}% |")

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    finite = [r for r in rows if math.isfinite(r[0])]
    ax.errorbar([r[0] for r in finite], [r[2]["final"]["return_mean"] for r in finite],
                yerr=[r[2]["final"]["return_se"] for r in finite], fmt="o-",
                label="federated, channel noise calibrated")
    for eps, _, s, _ in rows:
        if math.isinf(eps):
            ax.axhline(s["final"]["return_mean"], color="tab:blue", ls=":",
                       label=f"no channel noise {s['final']['return_mean']:.2f}")
    base = rows[0][2]["baselines"]
    for name, style in (("no_comm", "--"), ("oracle", "-.")):
        ax.axhline(base[name]["return_mean"], color="gray", ls=style, lw=1,
                   label=f"{name} {base[name]['return_mean']:.2f}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("message epsilon per episode (replace-one, delta 1e-5)")
    ax.set_ylabel("return per agent")
    ax.set_title("speaker_listener: privacy against utility")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
