"""Cost of the server's reply checks and of each aggregation option, per round, and of what an agent
adds to each reply.

At each environment's federated preset with every part of the shared module sent (``--share
all``; speaker_listener: 2 agents, factory: 7), the server's own strategy (``make_strategy``)
aggregates one round of honest replies: each agent's copy of the shared module, moved from the
global module by a small random update, weighted by the round's environment steps, signed as its
ClientApp signs it. What is timed is what the ServerApp does with a round's replies: the checks
(``ReplyScreen.screen``; of them, the signatures alone) and ``aggregate_train``, which screens
and aggregates (client-level DP also writes every agent's ledger line, fsync included);
"aggregate" is its time less the screen's. "no checks" is the strategy's ``aggregate_accepted``
alone. Per reply, an agent signs it (``protocol.signing.seal``), checks the round's
configuration against its policy (``clients.policy``; the first time, then cached) and writes
its journal line (at the environment's default, ``fedcomm simulate --env ENV``: private for
speaker_listener). Medians over repeats; replies are built before the clock starts.

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
from uuid import uuid4

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity
from rich.console import Console
from rich.table import Table

from fedcomm.clients.journal import Journal
from fedcomm.clients.policy import PrivacyPolicy, planned_epsilon
from fedcomm.commands import build_parser, federation_config_from_args
from fedcomm.config import FederationConfig
from fedcomm.presets import federation_preset
from fedcomm.protocol.auth import generate_tokens
from fedcomm.protocol.round import ARRAYS, METRICS, PROOF, Proof, TrainReply
from fedcomm.protocol.signing import SIGNATURE, signature, verifies
from fedcomm.server.layout import initial_arrays
from fedcomm.server.strategy import make_strategy, screen_of

OPTIONS: dict[str, dict] = {
    "no checks": {},
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
            rng: np.random.Generator, keys: dict[str, str]) -> tuple[list[Message], list[float]]:
    """One honest reply per agent, the global module plus a small update, signed; and the
    seconds each signature took."""
    batches = len(fed.batches_in(1))
    out, seal_s = [], []
    for i, msg in enumerate(messages):
        agent = fed.spec.agent_ids[i]
        arrays = {k: Array((v + rng.normal(0, 1e-3, v.shape)).astype(v.dtype))
                  for k, v in glob.items()}
        metrics = TrainReply(agent=i, env_steps=batches * fed.train.batch_steps,
                             batches=batches, silent_batches=0, epsilon=1.0,
                             restored_round=0).to_record()
        content = RecordDict({ARRAYS: ArrayRecord(arrays), METRICS: metrics,
                              PROOF: Proof(agent, 1, "0" * 64).to_record()})
        t0 = time.perf_counter()
        content[PROOF][SIGNATURE] = signature(keys[agent], msg.metadata.message_id, agent,
                                              content)
        seal_s.append(time.perf_counter() - t0)
        reply = Message(content, reply_to=msg)
        reply.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
        out.append(reply)
    return out, seal_s


def measure(fed: FederationConfig, checks: bool, repeats: int) -> dict[str, float]:
    n = fed.spec.n_agents
    initial = initial_arrays(fed)
    glob = {k: v.numpy() for k, v in initial.items()}
    rng = np.random.default_rng(0)
    keys = generate_tokens(fed.spec.agent_ids)
    screen_s, verify_s, total_s, seal_s = [], [], [], []
    with tempfile.TemporaryDirectory() as run_dir:
        strategy = make_strategy(fed, n, keys, initial, run_dir)
        screen = screen_of(strategy)
        record = ArrayRecord({k: Array(v) for k, v in glob.items()})

        def round_replies() -> list[Message]:
            messages = sorted(strategy.configure_train(1, record, ConfigRecord({}), Grid(n)),
                              key=lambda m: m.metadata.dst_node_id)
            for msg in messages:
                msg.metadata.__dict__["_message_id"] = str(uuid4())  # as the grid pushes it
            got, sealed = replies(fed, messages, glob, rng, keys)
            seal_s.extend(sealed)
            return got

        for _ in range(repeats):
            got = round_replies()
            t0 = time.perf_counter()
            for m in got:
                proof = m.content[PROOF]
                assert verifies(keys[proof["agent_id"]], m.metadata.reply_to_message_id,
                                proof["agent_id"], m.content, proof[SIGNATURE])
            t1 = time.perf_counter()
            assert len(screen.screen(1, got).accepted) == n
            t2 = time.perf_counter()
            verify_s.append(t1 - t0)
            screen_s.append(t2 - t1)
            got = round_replies()  # a fresh round: the screen takes each message once
            t0 = time.perf_counter()
            if checks:
                arrays, _ = strategy.aggregate_train(1, got)
            else:
                arrays, _ = strategy.aggregate_accepted(1, got)
            total_s.append(time.perf_counter() - t0)
            assert arrays is not None
    screened = statistics.median(screen_s) if checks else 0.0
    total = statistics.median(total_s)
    return {"screen_s": screened,
            "verify_s": statistics.median(verify_s) if checks else 0.0,
            "aggregate_s": max(total - screened, 0.0),
            "total_s": total,
            "seal_s": statistics.median(seal_s)}


def agent_costs(fed: FederationConfig, repeats: int) -> dict[str, float]:
    """What an agent adds to a round: its policy check (the first, uncached, and then) and
    its journal line."""
    policy = PrivacyPolicy.of_run(fed)
    planned_epsilon.cache_clear()
    t0 = time.perf_counter()
    policy.check(fed, 0)
    first = time.perf_counter() - t0
    cached, journal = [], []
    with tempfile.TemporaryDirectory() as folder:
        log = Journal(folder)
        for r in range(repeats):
            t0 = time.perf_counter()
            policy.check(fed, 0)
            t1 = time.perf_counter()
            log.train(r, -1.0, {"rollout_s": 1.0}, {"loss": 0.1})
            journal.append(time.perf_counter() - t1)
            cached.append(t1 - t0)
    return {"policy_first_s": first, "policy_s": statistics.median(cached),
            "journal_s": statistics.median(journal)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", nargs="+", default=["speaker_listener", "factory"])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.ERROR)  # each strategy logs every call
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    results = []
    agents = []
    for env in args.envs:
        base = replace(federation_preset(env), share="all")
        params = sum(v.numel() for v in initial_arrays(base).values())
        run = federation_config_from_args(build_parser().parse_args(["simulate", "--env", env]))
        agents.append({"env": env, **agent_costs(run, args.repeats)})
        for name, change in OPTIONS.items():
            fed = replace(base, **change)
            try:
                row = measure(fed, name != "no checks", args.repeats)
            except ValueError:  # the option cannot work with this few agents
                row = {"refused": "refused: too few agents per group"}
            results.append({"env": env, "agents": base.spec.n_agents, "parameters": params,
                            "option": name, **row})
    if args.json:
        print(json.dumps({"server": results, "agent": agents}, indent=2))
        return
    table = Table(title=f"aggregation per round, median of {args.repeats}")
    for col in ("env (agents, parameters)", "option", "checks s", "of them signatures s",
                "aggregate_train s", "total s"):
        table.add_column(col)
    for r in results:
        where = f"{r['env']} ({r['agents']}, {r['parameters']:,})"
        if "refused" in r:
            table.add_row(where, r["option"], r["refused"], "", "", "")
            continue
        table.add_row(where, r["option"], f"{r['screen_s']:.4f}", f"{r['verify_s']:.4f}",
                      f"{r['aggregate_s']:.4f}", f"{r['total_s']:.4f}")
    Console().print(table)
    per_agent = Table(title="what an agent adds to a reply, seconds")
    for col in ("env", "sign the reply", "policy check, first", "policy check, then",
                "journal line"):
        per_agent.add_column(col)
    seals = {r["env"]: r["seal_s"] for r in results if "seal_s" in r}
    for a in agents:
        per_agent.add_row(a["env"], f"{seals[a['env']]:.5f}", f"{a['policy_first_s']:.3f}",
                          f"{a['policy_s']:.6f}", f"{a['journal_s']:.5f}")
    Console().print(per_agent)


if __name__ == "__main__":
    main()
