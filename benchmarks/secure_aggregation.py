"""What secure aggregation costs: the same ``fedcomm simulate`` run, plain and with
``--secure-aggregation`` (and with the agents' client-level noise), side by side at several
numbers of agents, one run at a time on this machine.

Per run it reads ``metrics.jsonl``: the round time (median over the rounds after the first),
the SecAgg+ stages' seconds within it, and the bytes of the round's messages as Flower's
protocol serialises them: the train messages and replies (a plain round's updates travel in
the replies; a secure round's replies carry none) and SecAgg+'s four stages (keys, encrypted
shares, masked vectors, unmasking shares).

    python benchmarks/secure_aggregation.py --out runs/bench-secure --sites 4 16 64 -- \\
        --num-envs 128 --batches-per-round 4 --env-steps 38400 --eval-episodes 128

Writes ``results.json`` and ``secure_aggregation.png`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = {"plain": [], "secure": ["--secure-aggregation"],
         "secure+dp": ["--secure-aggregation", "--client-dp-noise", "8", "--client-dp-clip", "1"]}


def run(out: Path, sites: int, mode: str, options: list[str]) -> dict:
    """One run; its figures."""
    folder = out / f"{mode}-{sites}"
    cmd = [sys.executable, "-m", "fedcomm", "simulate", "--sites", str(sites), "--quiet",
           "--out", str(folder), *MODES[mode], *options]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").open()]
    later = [r for r in rows if r["round"] > 1] or rows

    def median(key: str) -> float:
        return statistics.median(float(r.get(key, 0.0)) for r in later)

    return {"sites": sites, "agents": 2 * sites, "mode": mode, "wall_s": wall,
            "round_s": median("round_time_s") + median("aggregate_s"),
            "secure_s": median("secure_s"),
            "bytes": median("bytes_sent") + median("bytes_received")
            + median("secure_bytes_sent") + median("secure_bytes_received"),
            "secure_bytes": median("secure_bytes_sent") + median("secure_bytes_received")}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in MODES:
        mine = [r for r in results if r["mode"] == mode]
        if not mine:
            continue
        agents = [r["agents"] for r in mine]
        left.plot(agents, [r["round_s"] for r in mine], "o-", label=mode)
        right.plot(agents, [r["bytes"] / 2**20 for r in mine], "o-", label=mode)
    for ax, label in ((left, "round time (s)"), (right, "bytes on the wire per round (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("agents (2 per site; the speakers are one cohort)")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle("secure aggregation (Flower's SecAgg+) against a plain round")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--sites", type=int, nargs="+", default=[4, 16, 64])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("options", nargs=argparse.REMAINDER, help="-- then fedcomm simulate flags")
    args = p.parse_args()
    options = [o for o in args.options if o != "--"]
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for sites in args.sites:
        for mode in args.modes:  # side by side at each size
            results.append(run(args.out, sites, mode, options))
            print(json.dumps(results[-1]), flush=True)
            (args.out / "results.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / "secure_aggregation.png")


if __name__ == "__main__":
    main()
