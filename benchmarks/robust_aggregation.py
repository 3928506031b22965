"""Cost of the server's reply checks and of each aggregation option, per round.

At each environment's federated preset (speaker_listener: 2 agents, factory: 7), the server's
own strategy (``make_strategy``) aggregates one round of honest replies: each agent's copy of
the shared module, moved from the global module by a small random update, weighted by the
round's environment steps. What is timed is what the ServerApp does with a round's replies:
the checks (``ReplyScreen.screen``, in ``train_round``) and ``aggregate_train`` (which checks
them again before aggregating; client-level DP also writes every agent's ledger line, fsync
included). "today" is the strategy without checks, as before them. Medians over repeats;
replies are built before the clock starts.

    python benchmarks/robust_aggregation.py [--envs speaker_listener factory] [--repeats 50]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from dataclasses import replace

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity
from rich.console import Console
from rich.table import Table

from fedcomm.config import FederationConfig
from fedcomm.presets import federation_preset
from fedcomm.protocol.round import ARRAYS, METRICS, TrainReply
from fedcomm.server.layout import initial_arrays
from fedcomm.server.strategy import make_strategy, screen_of

OPTIONS: dict[str, dict] = {
    "today (no checks)": {},
    "mean + checks (default)": {},
    "mean + checks + max_update_norm": {"max_update_norm": 10.0},
    "median": {"aggregation": "median"},
    "trimmed_mean": {"aggregation": "trimmed_mean"},
    "krum": {"aggregation": "krum"},
    "multikrum": {"aggregation": "multikrum"},
    "bulyan": {"aggregation": "bulyan"},
    "client-level DP": {"client_dp_noise": 1.0, "client_dp_clip": 1.0},
}


class Grid:
    def __init__(self, n: int) -> None:
        self.n = n

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.n + 1))


def replies(fed: FederationConfig, messages: list[Message], glob: dict[str, np.ndarray],
            rng: np.random.Generator) -> list[Message]:
    """One honest reply per agent: the global module plus a small update."""
    batches = len(fed.batches_in(1))
    out = []
    for i, msg in enumerate(messages):
        arrays = {k: Array((v + rng.normal(0, 1e-3, v.shape)).astype(v.dtype))
                  for k, v in glob.items()}
        metrics = TrainReply(agent=i, env_steps=batches * fed.train.batch_steps,
                             batches=batches, silent_batches=0, epsilon=1.0, restored_round=0,
                             return_mean=-1.0).to_record()
        out.append(Message(RecordDict({ARRAYS: ArrayRecord(arrays), METRICS: metrics}),
                           reply_to=msg))
    return out


def measure(fed: FederationConfig, checks: bool, repeats: int) -> dict[str, float]:
    n = fed.spec.n_agents
    initial = initial_arrays(fed)
    glob = {k: v.numpy() for k, v in initial.items()}
    rng = np.random.default_rng(0)
    screen_s, aggregate_s = [], []
    with tempfile.TemporaryDirectory() as run_dir:
        strategy = make_strategy(fed, n, initial, run_dir)
        if not checks:
            strategy.screen = None
        record = ArrayRecord({k: Array(v) for k, v in glob.items()})
        for _ in range(repeats):
            messages = sorted(strategy.configure_train(1, record, ConfigRecord({}), Grid(n)),
                              key=lambda m: m.metadata.dst_node_id)
            got = replies(fed, messages, glob, rng)
            t0 = time.perf_counter()
            if checks:
                got = screen_of(strategy).screen(1, got).accepted
            t1 = time.perf_counter()
            arrays, _ = strategy.aggregate_train(1, got)
            t2 = time.perf_counter()
            assert arrays is not None and len(got) == n
            screen_s.append(t1 - t0)
            aggregate_s.append(t2 - t1)
    return {"screen_s": statistics.median(screen_s),
            "aggregate_s": statistics.median(aggregate_s),
            "total_s": statistics.median(a + b for a, b in zip(screen_s, aggregate_s))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", nargs="+", default=["speaker_listener", "factory"])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.ERROR)  # each strategy logs every call
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    results = []
    for env in args.envs:
        base = federation_preset(env)
        params = sum(v.numel() for v in initial_arrays(base).values())
        for name, change in OPTIONS.items():
            fed = replace(base, **change)
            try:
                row = measure(fed, not name.startswith("today"), args.repeats)
            except ValueError:  # the option cannot work with this few agents
                row = {"refused": "refused: too few agents per group"}
            results.append({"env": env, "agents": base.spec.n_agents, "parameters": params,
                            "option": name, **row})
    if args.json:
        print(json.dumps(results, indent=2))
        return
    table = Table(title=f"aggregation per round, median of {args.repeats}")
    for col in ("env (agents, parameters)", "option", "checks s", "aggregate_train s",
                "total s"):
        table.add_column(col)
    for r in results:
        where = f"{r['env']} ({r['agents']}, {r['parameters']:,})"
        if "refused" in r:
            table.add_row(where, r["option"], r["refused"], "", "")
            continue
        table.add_row(where, r["option"], f"{r['screen_s']:.4f}", f"{r['aggregate_s']:.4f}",
                      f"{r['total_s']:.4f}")
    Console().print(table)


if __name__ == "__main__":
    main()
