"""One faulty agent in a federated run on Flower's simulation engine (real Ray, real gRPC to
the simulator process), as ``fedcomm simulate`` runs it: the actuator's ClientApp is defined
here, trains honestly through the simulator, and then replies, round by round, NaN, 1e30, an
array of the wrong shape, a claim of 10^12 environment steps, a reply as another agent (signed
with its own key, the only one it holds), and another type's networks, all against the default
options. With ``on_agent_failure="continue"`` each such reply is a failed agent
named in the round's metrics and the global module is exactly the mean of the honest agents'
replies; with ``"stop"`` the run stops naming it, its checkpoint and every ledger intact, and
``fedcomm simulate --resume`` (honest agents) continues it to the end."""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedcomm.clients.app import make_client_app
from fedcomm.clients.policy import PrivacyPolicy
from fedcomm.commands.privacy import server_record
from fedcomm.config import FederationConfig, TeamConfig, TrainConfig
from fedcomm.modes.processes import SimProcess
from fedcomm.modes.simulation import (
    _quiet_flower,
    backend_config,
    complete_run,
    more_engine_threads,
    simulate,
)
from fedcomm.privacy.audit import audit
from fedcomm.privacy.ledger import read_ledger, verify_chain
from fedcomm.protocol.auth import read_tokens
from fedcomm.protocol.round import ARRAYS, CONFIG, METRICS, PROOF, WEIGHT_KEY, Proof, key_group
from fedcomm.releases.account import LEDGER
from fedcomm.server.app import make_server_app
from fedcomm.server.checkpoint import load_checkpoint
from fedcomm.server.federation import FederationError
from tests.harness.processes import assert_nothing_left
from tests.harness.replies import signed_reply
from tests.harness.secrets import AgentSecrets

pytestmark = pytest.mark.integration  # Flower's simulation engine (Ray) and a simulator process

FAULTY = 2  # the actuator's partition (and agent index)
FAULTS = {2: "nan", 3: "huge", 4: "shape", 5: "steps", 6: "agent", 7: "type"}
REASONS = {  # what each round's metrics say of the actuator's reply
    2: r"actuator_0 \(node \d+\): comm\.\S+ is not finite \(\d+ NaN, 0 infinite\)",
    3: r"actuator_0 \(node \d+\): comm\.\S+ moved 1e\+30, further than an honest agent's "
       r"optimizer can in 1 batches \(\S+\)",
    4: r"actuator_0 \(node \d+\): comm\.graph is float32\[7, 7\]; the global module's is "
       r"float32\[3, 3\]",
    5: r"actuator_0 \(node \d+\): claims 1000000000000 environment steps; the server "
       r"scheduled 1 batches of 400 steps, 0 of them silent: 400",
    6: r"node \d+: its reply is not signed with processor_0's key; not counted",
    7: r"actuator_0 \(node \d+\): a actuator replies with the networks of processor",
}


def fed_of(rounds: int, **change: object) -> FederationConfig:
    train = TrainConfig(env="factory", num_envs=16, env_steps=rounds * 16 * 25,
                        env_kwargs={"n_sensors": 1, "n_processors": 1, "n_actuators": 1},
                        eval_every=0, eval_episodes=16, device="cpu",
                        team=TeamConfig(hidden=16))
    return FederationConfig(train=train, batches_per_round=1, round_timeout=300.0, **change)


def corrupt(reply: Message, msg: Message, fault: str, key: str) -> Message:
    """The honest ``reply`` made faulty, signed with the faulty agent's own ``key``."""
    arrays = {k: v.numpy() for k, v in reply.content[ARRAYS].items()}
    metrics = MetricRecord(dict(reply.content[METRICS]))
    if fault == "nan":
        arrays = {k: np.full_like(v, np.nan) for k, v in arrays.items()}
    elif fault == "huge":
        arrays = {k: np.full_like(v, 1e30) for k, v in arrays.items()}
    elif fault == "shape":
        arrays["comm.graph"] = np.zeros((7, 7), np.float32)
    elif fault == "steps":
        metrics["env_steps"] = metrics[WEIGHT_KEY] = 10**12
    proof = Proof.from_record(reply.content[PROOF])
    if fault == "agent":  # it answers as the processor, whose key it does not hold
        metrics["agent"] = 1
        proof = replace(proof, agent_id="processor_0")
    elif fault == "type":
        arrays = {k.replace("type.actuator.", "type.processor."): v for k, v in arrays.items()}
    content = RecordDict({ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          METRICS: metrics})
    return signed_reply(content, msg, proof.agent_id, key, proof.ledger_entries,
                        proof.ledger_hash)


def faulty_client_app(defaults: dict, faults: dict[int, str], record: str,
                      key: str) -> ClientApp:
    """Every agent the real ClientApp; the actuator's replies then made faulty by round. Each
    agent writes what it was sent and what it replied honestly to ``record``."""
    honest = make_client_app(defaults)
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        rnd = int(msg.content[CONFIG]["server_round"])
        part = int(context.node_config["partition-id"])
        np.savez(f"{record}/sent-r{rnd}-a{part}.npz",
                 **{k: v.numpy() for k, v in msg.content[ARRAYS].items()})
        reply = honest(msg, context)
        if reply.has_error():
            return reply
        np.savez(f"{record}/reply-r{rnd}-a{part}.npz",
                 **{k: v.numpy() for k, v in reply.content[ARRAYS].items()})
        fault = faults.get(rnd) if part == FAULTY else None
        return corrupt(reply, msg, fault, key) if fault else reply

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return honest(msg, context)

    return app


def run(fed: FederationConfig, run_dir: Path, faults: dict[int, str]) -> object:
    """The ServerApp and the ClientApps on Flower's simulation engine, as ``fedcomm simulate``
    starts them; returns the ServerApp's result (or the FederationError that ended it)."""
    import ray
    from flwr.simulation import run_simulation

    run_dir.mkdir(parents=True, exist_ok=True)
    record = run_dir.parent / f"{run_dir.name}-record"
    record.mkdir(exist_ok=True)
    secrets = AgentSecrets.write(run_dir, fed.spec.agent_ids)
    tokens, keys = secrets.token_file, secrets.key_file
    actuator_key = read_tokens(keys)[fed.spec.agent_ids[FAULTY]]
    results: list = []
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    with SimProcess(fed, tokens, run_dir / "sim.log") as sim:
        defaults = secrets.node_settings(sim.address, PrivacyPolicy.of_run(fed),
                                         run_dir / "agents")
        n = fed.spec.n_agents
        try:
            with more_engine_threads(n), _quiet_flower(False):
                run_simulation(server_app=make_server_app(fed, run_dir, False, results,
                                                          keys=keys),
                               client_app=faulty_client_app(defaults, faults, str(record),
                                                            actuator_key),
                               num_supernodes=n,
                               backend_config=backend_config(n, torch.device("cpu")))
        finally:
            if ray.is_initialized():
                ray.shutdown()
    assert len(results) == 1, results
    return results[0]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def recorded(record: Path, kind: str, rnd: int, agent: int) -> dict[str, np.ndarray]:
    with np.load(record / f"{kind}-r{rnd}-a{agent}.npz") as f:
        return dict(f)


def honest_mean(record: Path, rnd: int, agents: list[int]) -> dict[str, np.ndarray]:
    """Each key's mean over the agents in ``agents`` whose reply carries it; the module sent
    where none does."""
    sent = recorded(record, "sent", rnd, 0)
    replies = [recorded(record, "reply", rnd, a) for a in agents]
    return {k: np.mean([r[k] for r in replies if k in r], axis=0)
            if any(k in r for r in replies) else v for k, v in sent.items()}


def assert_ledgers_intact(run_dir: Path, fed: FederationConfig) -> None:
    for agent in fed.spec.agent_ids:
        entries = read_ledger(run_dir / "agents" / agent / LEDGER)
        assert entries and verify_chain(entries) == [], agent


def test_a_faulty_agent_is_left_out_of_every_round_it_replies_wrongly(tmp_path: Path):
    rounds = 8
    fed = fed_of(rounds, on_agent_failure="continue", aggregate_private=True)
    out = tmp_path / "run"
    result = run(fed, out, FAULTS)
    assert not isinstance(result, FederationError), result
    rows = metrics(out)
    assert [r["round"] for r in rows] == list(range(1, rounds + 1))
    for row in rows:
        rnd = row["round"]
        if rnd in FAULTS:
            assert (row["agents"], row["failures"]) == (2, 1), row
            assert re.fullmatch(f"{REASONS[rnd]}.*", row["failed"][0]), (rnd, row["failed"])
        else:
            assert (row["agents"], row["failures"]) == (3, 0) and "failed" not in row, row
        assert row["env_steps"] == rnd * 400  # the server's count, whatever was claimed
    # The global module after each round is exactly the honest replies' mean.
    record = tmp_path / "run-record"
    ckpt = load_checkpoint(out)
    assert ckpt.round == rounds
    for rnd in range(1, rounds + 1):
        agents = [0, 1] if rnd in FAULTS else [0, 1, 2]
        after = (recorded(record, "sent", rnd + 1, 0) if rnd < rounds else ckpt.arrays)
        want = honest_mean(record, rnd, agents)
        assert set(after) == set(want)
        for k, v in want.items():
            assert np.isfinite(after[k]).all(), (rnd, k)
            np.testing.assert_allclose(after[k], v, atol=1e-6, err_msg=f"round {rnd}: {k}")
        if rnd in FAULTS:  # nobody sent the actuator's networks: they are kept as they were
            sent = recorded(record, "sent", rnd, 0)
            assert all(np.array_equal(after[k], sent[k]) for k in sent
                       if key_group(k) == "type.actuator")
    # Checkpoint, ledgers and the privacy report are whole; the run finishes as simulate does.
    assert_ledgers_intact(out, fed)
    complete_run(out, fed)
    agents, anchors = server_record(out)
    assert audit(out, agents=agents, anchors=anchors).ok
    assert (out / "team.pt").exists()
    assert_nothing_left(out)


def test_with_stop_the_run_stops_naming_the_agent_and_resume_continues(tmp_path: Path):
    rounds = 3
    fed = fed_of(rounds, on_agent_failure="stop")
    out = tmp_path / "run"
    result = run(fed, out, {2: "nan"})
    assert isinstance(result, FederationError)
    assert re.fullmatch(r"round 2: " + REASONS[2], str(result)), str(result)
    assert load_checkpoint(out).round == 1
    assert [r["round"] for r in metrics(out)] == [1]
    assert_ledgers_intact(out, fed)
    assert_nothing_left(out)

    resumed = simulate(fed, out, progress=False)  # fedcomm simulate --resume, honest agents
    assert [r["round"] for r in resumed.metrics] == [1, 2, 3]
    ckpt = load_checkpoint(out)
    assert ckpt.round == rounds and ckpt.env_steps == rounds * 400
    assert all(np.isfinite(v).all() for v in ckpt.arrays.values())
    assert_ledgers_intact(out, fed)
    agents, anchors = server_record(out)
    assert audit(out, agents=agents, anchors=anchors).ok
    assert_nothing_left(out)
