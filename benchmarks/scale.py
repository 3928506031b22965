"""How a simulation's cost grows with its agents: ``fedcomm simulate --sites N`` for several
``N``, each a few rounds, one after another on this machine.

For each run it samples, every second, the memory of every process of the run (the command and
all its descendants: the ServerApp's driver, the simulator, Ray's processes and its actors),
and reads the run's rounds from ``metrics.jsonl`` and the agents' journals:

- peak resident memory of all the processes together: the sum of their RSS (shared pages
  counted in each process) and of their PSS (shared pages split among the processes sharing
  them, what the processes cost together);
- round time (median over the rounds after the first), and per agent-batch: a round's time
  over its agents times its episode batches;
- Flower's share of a round: the round's time outside the agents' handlers (per wave, the
  slowest agent's handler and start-up, ``server.waves.agents_time``), over the round's time;
- start-up: from launching the command to the end of round 1, less a later round's time
  (Ray, the actors, the simulator, the first messages).

    python benchmarks/scale.py --out runs/bench-scale --sites 1 8 32 128 -- \\
        --num-envs 128 --batches-per-round 4 --env-steps 38400 --eval-episodes 128
    python benchmarks/scale.py --out runs/bench-scale --analyze --sites 1 8 32 128 \\
        --before runs/bench-scale-before/results.json   # another build's runs beside them

Writes ``results.json`` and ``scale.png`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from fedcomm.config import FederationConfig
from fedcomm.modes.simulation import agent_journals, operator_view
from fedcomm.rundir import RunDir

PAGE = os.sysconf("SC_PAGE_SIZE")


def descendants(root: int) -> list[int]:
    """``root`` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def memory(pids: list[int]) -> tuple[int, int]:
    """The RSS and the PSS of ``pids`` together, in bytes."""
    rss = pss = 0
    for pid in pids:
        try:
            rss += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
                    break
        except (OSError, ValueError, IndexError):
            continue
    return rss, pss


class Sampler(threading.Thread):
    """Peak memory of a process tree, sampled every ``period`` seconds."""

    def __init__(self, root: int, period: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.root, self.period = root, period
        self.peak_rss = self.peak_pss = self.peak_processes = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.period):
            pids = descendants(self.root)
            rss, pss = memory(pids)
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self.peak_processes = max(self.peak_processes, len(pids))


def run(out: Path, sites: int, options: list[str]) -> dict:
    """One ``fedcomm simulate --sites N``, measured."""
    path = out / f"sites-{sites}"
    if (path / "measured.json").exists():
        return json.loads((path / "measured.json").read_text())
    command = [sys.executable, "-m", "fedcomm", "simulate", "--sites", str(sites), *options,
               "--out", str(path), "--quiet"]
    t0 = time.monotonic()
    proc = subprocess.Popen(command)
    sampler = Sampler(proc.pid)
    sampler.start()
    metrics, first_round = path / "metrics.jsonl", None
    while proc.poll() is None:
        if first_round is None and metrics.exists() and metrics.stat().st_size:
            first_round = time.monotonic() - t0
        time.sleep(0.2)
    sampler.done.set()
    if proc.returncode:
        raise SystemExit(f"{' '.join(command)} failed ({proc.returncode})")
    fed = FederationConfig.from_json((path / "config.json").read_text())
    rows, _ = operator_view(RunDir(path).metrics(), agent_journals(path, fed), 0,
                            fed.spec)
    later = rows[1:] or rows
    round_s = statistics.median(r["round_time_s"] for r in later)
    flower = statistics.median(r["flower_s"] / r["round_time_s"] for r in later)
    result = {"sites": sites, "agents": fed.spec.n_agents, "rounds": len(rows),
              "batches_per_round": fed.batches_per_round, "waves": rows[-1].get("waves", 1),
              "peak_rss_gib": sampler.peak_rss / 2**30, "peak_pss_gib": sampler.peak_pss / 2**30,
              "peak_processes": sampler.peak_processes, "round_s": round_s,
              "per_agent_batch_s": round_s / (fed.spec.n_agents * fed.batches_per_round),
              "flower_share": flower, "startup_s": (first_round or 0.0) - round_s,
              "wall_s": time.monotonic() - t0}
    (path / "measured.json").write_text(json.dumps(result, indent=2))
    return result


def plot(results: list[dict], path: Path, title: str, before: list[dict] | None = None
         ) -> None:
    """Memory, time per agent-batch, start-up and Flower's share against the agents; with
    ``before``, the same runs measured on another build (one actor per agent) beside them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agents = [r["agents"] for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].plot(agents, [r["peak_pss_gib"] for r in results], "o-", label="PSS (shared split)")
    axes[0].plot(agents, [r["peak_rss_gib"] for r in results], "s--", label="RSS (summed)")
    if before:
        axes[0].plot([r["agents"] for r in before], [r["peak_pss_gib"] for r in before], "x:",
                     color="gray", label="PSS, one actor per agent")
    axes[0].set(title="peak memory of all processes", ylabel="GiB")
    axes[0].legend()
    axes[1].plot(agents, [1000 * r["per_agent_batch_s"] for r in results], "o-", label="waves")
    if before:
        axes[1].plot([r["agents"] for r in before],
                     [1000 * r["per_agent_batch_s"] for r in before], "x:", color="gray",
                     label="one actor per agent")
        axes[1].legend()
    axes[1].set(title="round time per agent-batch", ylabel="ms", ylim=(0, None))
    axes[2].plot(agents, [r["startup_s"] for r in results], "o-", label="start-up")
    axes[2].plot(agents, [100 * r["flower_share"] for r in results], "s--",
                 label="Flower's share of a round (%)")
    axes[2].set(title="start-up (s) and Flower's share", ylim=(0, None))
    axes[2].legend()
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("agents")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-scale"))
    parser.add_argument("--sites", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--analyze", action="store_true", help="only read the runs there")
    parser.add_argument("--before", type=Path, help="results.json of the same runs on another "
                        "build, drawn beside them")
    parser.add_argument("--title", default="fedcomm simulate --sites N, this machine")
    parser.add_argument("options", nargs="*", help="options of every run, after --")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for n in args.sites:
        if args.analyze:
            results.append(json.loads((args.out / f"sites-{n}" / "measured.json").read_text()))
        else:
            results.append(run(args.out, n, args.options))
    print("| sites | agents | waves | peak PSS (GiB) | peak RSS (GiB) | processes | round (s) "
          "| per agent-batch (ms) | Flower's share | start-up (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['sites']} | {r['agents']} | {r['waves']} | {r['peak_pss_gib']:.2f} | "
              f"{r['peak_rss_gib']:.2f} | {r['peak_processes']} | {r['round_s']:.1f} | "
              f"{1000 * r['per_agent_batch_s']:.0f} | {100 * r['flower_share']:.0f}% | "
              f"{r['startup_s']:.1f} |")
    if len(results) > 1:
        a, b = results[0], results[-1]
        per_agent = (b["peak_pss_gib"] - a["peak_pss_gib"]) * 1024 / (b["agents"] - a["agents"])
        print(f"\nmemory per added agent (PSS, {a['agents']} -> {b['agents']}): "
              f"{per_agent:.1f} MiB")
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    before = json.loads(args.before.read_text()) if args.before else None
    plot(results, args.out / "scale.png", args.title, before)


if __name__ == "__main__":
    main()
