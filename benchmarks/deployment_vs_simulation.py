"""Round time of the same run simulated (Flower's simulation engine, Ray) and deployed
(``fedcomm deploy local``: SuperLink, SuperNodes and simulator as processes, TLS on).

Runs both, one after the other, with the same options, then prints the median of every part
of a round over the rounds after the first (which starts Ray's actors or the first processes),
and the deployment's round time over the simulation's.

    python benchmarks/deployment_vs_simulation.py --out runs/bench-deploy -- \\
        --env speaker_listener --env-steps 512000

``start_s`` is a ClientApp process's start-up before it handles its message (in deployment
every message has a fresh process; in simulation the actors live through the run);
``flower_s`` is the rest of the round outside the agents: delivery through the SuperLink,
SuperNode polling, and aggregation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from fedcomm.config import FederationConfig
from fedcomm.modes.simulation import agent_journals, operator_view
from fedcomm.rundir import RunDir

PARTS = ("round_time_s", "flower_s", "start_s", "client_s", "restore_s", "rollout_s",
         "feedback_s", "update_s", "persist_s", "aggregate_s")


def run(command: list[str], out: Path, options: list[str]) -> dict[str, float]:
    if not (out / "summary.json").exists():
        subprocess.run([sys.executable, "-m", "fedcomm", *command, *options, "--out",
                        str(out), "--quiet"], check=True)
    # A private agent keeps its phases from the server: they are read from its journal, as
    # the operator of every party sees them (modes.simulation.operator_view).
    fed = FederationConfig.from_json((out / "config.json").read_text())
    rows, _ = operator_view(RunDir(out).metrics(), agent_journals(out, fed), 0,
                            fed.spec)
    later = rows[1:] or rows
    return {k: statistics.median(r[k] for r in later) for k in PARTS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-deploy"))
    parser.add_argument("options", nargs="*", help="options of both runs, after --")
    args = parser.parse_args()
    simulated = run(["simulate"], args.out / "simulate", args.options)
    deployed = run(["deploy", "local"], args.out / "deploy", args.options)
    print("| part of a round (median, s) | simulation | deployment |")
    print("|---|---|---|")
    for k in PARTS:
        print(f"| {k} | {simulated[k]:.3f} | {deployed[k]:.3f} |")
    ratio = deployed["round_time_s"] / simulated["round_time_s"]
    print(f"\ndeployment round / simulation round: {ratio:.2f}x")
    (args.out / "comparison.json").write_text(json.dumps(
        {"simulation": simulated, "deployment": deployed, "ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
