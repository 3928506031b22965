"""Gap closed against the number of sites at a fixed client-level epsilon: the curve that tells
how many parties a privacy level needs. Reads finished ``fedcomm simulate`` runs (each a run
directory), groups them by whether the agents added client-level noise, and writes a table
and a plot.

    fedcomm simulate --sites 8 --secure-aggregation --no-aggregate-private \\
        --client-dp-epsilon 2 --client-dp-clip 0.01 --out runs/cl-8
    ...
    python benchmarks/client_level_dp.py --out runs/client-level runs/cl-8 runs/cl-32 ...

Writes ``results.json`` and ``client_level_dp.png`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read(run: Path) -> dict:
    config = json.loads((run / "config.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    report = run / "client_dp_report.json"
    epsilon = None
    if report.exists():
        agents = json.loads(report.read_text())["agents"].values()
        epsilon = max(float(a["composed"]["epsilon"]) for a in agents)
    sites = config["train"]["env_kwargs"].get("sites", 1)
    return {"run": str(run), "sites": sites, "seed": config["train"]["seed"],
            "client_dp_noise": config.get("client_dp_noise", 0.0),
            "client_level_epsilon": epsilon, "gap_closed": summary["gap_closed"],
            "per_episode_epsilon": summary["privacy"]["composed"],
            "wall_time_s": summary["wall_time_s"]}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for noisy, label in ((False, "secure aggregation, no client-level DP"),
                         (True, "client-level DP (agents' Skellam noise)")):
        mine = sorted((r for r in rows if (r["client_level_epsilon"] is not None) == noisy),
                      key=lambda r: r["sites"])
        if mine:
            eps = {round(r["client_level_epsilon"], 2) for r in mine} if noisy else set()
            ax.plot([r["sites"] for r in mine], [100 * r["gap_closed"] for r in mine], "o-",
                    label=label + (f", epsilon {', '.join(map(str, sorted(eps)))}" if eps
                                   else ""))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sites (speakers in the cohort)")
    ax.set_ylabel("gap closed (%)")
    ax.axhline(80, color="grey", lw=0.5, ls="--")
    ax.legend(fontsize=8)
    ax.set_title("speaker_listener, greedy evaluation")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("runs", type=Path, nargs="+")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [read(r) for r in args.runs]
    for r in rows:
        print(json.dumps(r))
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    plot(rows, args.out / "client_level_dp.png")


if __name__ == "__main__":
    main()
