"""The server's own strategy (``make_strategy(...).aggregate_train``) given honest replies and
one faulty one: each fault is contained, with a one-line reason naming the agent; weights are
the server's; the robust rules per key group; client-level DP's clip, noise, ledgers and report.
Replies are built here, as an agent's would be; no agent trains."""

from __future__ import annotations

import re

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from fedcomm.config import FederationConfig, TeamConfig, TrainConfig
from fedcomm.privacy.audit import audit
from fedcomm.privacy.ledger import read_ledger, verify_chain
from fedcomm.protocol.round import ARRAYS, METRICS, TrainReply, key_group
from fedcomm.server.client_dp import REPORT, ledger_paths, write_report
from fedcomm.server.layout import initial_arrays
from fedcomm.server.strategy import make_strategy, screen_of

SMALL = {"n_sensors": 1, "n_processors": 1, "n_actuators": 1}
SEVEN = {"n_sensors": 5, "n_processors": 1, "n_actuators": 1}
TRAIN = TrainConfig(env="factory", env_kwargs=SMALL, num_envs=16, team=TeamConfig(hidden=16))
STEPS = 16 * 25  # one episode batch


def fed_of(**change: object) -> FederationConfig:
    base = {"train": TRAIN, "batches_per_round": 1, **change}
    return FederationConfig(**base)


@pytest.fixture(autouse=True)
def server_identity():
    """Messages are made by a server task: the test plays the ServerApp's part."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID


class Grid:
    def __init__(self, n: int) -> None:
        self.n = n

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.n + 1))


class Round:
    """The strategy of one run, its global module, and replies to this round's messages."""

    def __init__(self, fed: FederationConfig, run_dir=None, strategy=None) -> None:
        self.fed = fed
        self.n = fed.spec.n_agents
        self.initial = {k: v.numpy() for k, v in initial_arrays(fed).items()}
        self.strategy = strategy or make_strategy(fed, self.n, run_dir=run_dir)
        self.glob = ArrayRecord({k: Array(v) for k, v in self.initial.items()})
        self.rnd = 0

    def send(self) -> list[Message]:
        self.rnd += 1
        config = ConfigRecord({"server_round": self.rnd})
        self.messages = list(self.strategy.configure_train(self.rnd, self.glob, config,
                                                           Grid(self.n)))
        self.messages.sort(key=lambda m: m.metadata.dst_node_id)
        return self.messages

    def honest(self, agent: int, delta: float = 0.01) -> dict[str, np.ndarray]:
        """What ``agent`` trained: the global module moved by ``delta`` (its own type's
        networks too, with aggregate_private)."""
        kind = self.fed.spec.types[self.fed.spec.type_of_agent[agent]].name
        mine = {k: v for k, v in self.glob.items()
                if k.startswith("comm.") or k.startswith(f"type.{kind}.")}
        return {k: (v.numpy() + np.float32(delta)).astype(v.numpy().dtype)
                for k, v in mine.items()}

    def reply(self, node: int, arrays: dict[str, np.ndarray], agent: int | None = None,
              **change: object) -> Message:
        fields = {"agent": node - 1 if agent is None else agent, "env_steps": STEPS,
                  "batches": len(self.fed.batches_in(self.rnd)), "silent_batches": 0,
                  "epsilon": 1.0, "restored_round": self.rnd - 1, "return_mean": -3.0}
        metrics = TrainReply(**{**fields, **change}).to_record()
        msg = self.messages[node - 1]
        content = RecordDict({ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                              METRICS: metrics})
        return Message(content, reply_to=msg)

    def aggregate(self, replies: list[Message]) -> tuple[dict[str, np.ndarray], list[str]]:
        screened = screen_of(self.strategy).screen(self.rnd, list(replies))
        arrays, _ = self.strategy.aggregate_train(self.rnd, screened.accepted)
        if arrays is not None:
            self.glob = arrays
        return {k: v.numpy() for k, v in self.glob.items()}, screened.rejected


def honest_mean(run: Round, agents: list[int], delta: float = 0.01) -> dict[str, np.ndarray]:
    parts = [run.honest(a, delta) for a in agents]
    return {k: np.mean([p[k] for p in parts], axis=0) for k in parts[0]}


def assert_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray], tol: float = 1e-6):
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, atol=tol, err_msg=k)


def scaled(arrays: dict[str, np.ndarray], value: float) -> dict[str, np.ndarray]:
    return {k: np.full_like(v, value) for k, v in arrays.items()}


# -- the four replies, against the strategy itself -------------------------------------
FAULTS = {
    "claims 1e12 steps and sends -5": (lambda a: scaled(a, -5.0), {"env_steps": 10**12},
                                       r"actuator_0 \(node 3\): claims 1000000000000 environment "
                                       r"steps; the server scheduled 1 batches of 400 steps, 0 "
                                       "of them silent: 400"),
    "sends NaN": (lambda a: scaled(a, np.nan), {},
                  r"actuator_0 \(node 3\): comm\.\S+ is not finite \(\d+ NaN, 0 infinite\)"),
    "sends 1e30": (lambda a: scaled(a, 1e30), {},
                   r"actuator_0 \(node 3\): its update's L2 norm 3\.678e\+31 exceeds "
                   "max_update_norm 10$"),
    "sends a wrong shape": (lambda a: {**a, "comm.graph": np.zeros((7, 7), np.float32)}, {},
                            r"actuator_0 \(node 3\): comm\.graph is float32\[7, 7\]; the "
                            r"global module's is float32\[3, 3\]$"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_each_faulty_reply_is_refused_naming_the_agent_and_the_mean_is_the_honest_ones(fault):
    make, change, reason = FAULTS[fault]
    run = Round(fed_of(max_update_norm=10.0))
    run.send()
    bad = run.reply(3, make(run.honest(2)), **change)
    want = honest_mean(run, [0, 1])
    got, rejected = run.aggregate([run.reply(1, run.honest(0)), run.reply(2, run.honest(1)),
                                   bad])
    assert len(rejected) == 1 and re.match(reason, rejected[0]), rejected
    assert_close(got, want)
    assert all(np.isfinite(v).all() for v in got.values())


def test_a_reply_is_weighed_by_the_batches_the_server_scheduled_less_its_silent_ones():
    run = Round(fed_of(batches_per_round=2))
    run.send()
    got, rejected = run.aggregate([
        run.reply(1, run.honest(0, 0.0), env_steps=2 * STEPS),
        run.reply(2, run.honest(1, 0.3), env_steps=STEPS, silent_batches=1),
        run.reply(3, run.honest(2, 0.3), env_steps=2 * STEPS, silent_batches=-5)])  # as 0
    assert rejected == []
    # weights 2 : 1 (one silent batch) : 2, whatever the replies said
    want = {k: (2 * v + 1 * (v + 0.3) + 2 * (v + 0.3)) / 5 for k, v in run.initial.items()
            if k.startswith("comm.")}
    assert_close(got, want, 1e-6)


def test_an_agent_silent_in_every_batch_weighs_nothing_whatever_it_sends():
    run = Round(fed_of())
    run.send()
    want = honest_mean(run, [0, 1])
    got, rejected = run.aggregate([
        run.reply(1, run.honest(0)), run.reply(2, run.honest(1)),
        run.reply(3, scaled(run.honest(2), 1e6), env_steps=0, silent_batches=1)])
    assert rejected == []
    assert_close(got, want)


def test_replies_for_another_agent_or_another_round_are_refused():
    run = Round(fed_of(aggregate_private=True))
    run.send()
    run.aggregate([run.reply(i + 1, run.honest(i)) for i in range(3)])  # binds the nodes
    run.send()
    sensor = run.honest(0)
    cases = [
        (run.reply(3, run.honest(1), agent=1),  # the actuator's node answers as the processor
         "node 3 answers as processor_0, but it is actuator_0"),
        (run.reply(3, {**run.honest(2), **{k: v for k, v in sensor.items()
                                            if k.startswith("type.sensor.")}}),
         "actuator_0 (node 3): a actuator replies with the networks of sensor"),
        (run.reply(3, run.honest(2), batches=3), "actuator_0 (node 3): replies for 3 batches; "
                                                 "round 2 has 1"),
        (run.reply(3, run.honest(2), restored_round=2),
         "actuator_0 (node 3): continued from round 2, not from one before round 2"),
        (run.reply(3, {k: v for k, v in run.honest(2).items() if k != "comm.graph"}),
         "actuator_0 (node 3): lacks 1 of its"),
        (run.reply(3, run.honest(2), agent=7), "node 3: answers as agent 7"),
    ]
    for bad, reason in cases:
        screened = screen_of(run.strategy).screen(run.rnd, [run.reply(1, run.honest(0)),
                                                             run.reply(2, run.honest(1)), bad])
        assert len(screened.accepted) == 2, reason
        assert len(screened.rejected) == 1 and screened.rejected[0].startswith(reason), \
            (reason, screened.rejected)


def test_two_nodes_answering_as_one_new_agent_are_both_refused():
    run = Round(fed_of())
    run.send()
    screened = screen_of(run.strategy).screen(1, [run.reply(1, run.honest(0)),
                                                  run.reply(2, run.honest(0), agent=0),
                                                  run.reply(3, run.honest(2))])
    assert screened.rejected == ["sensor_0: nodes 1, 2 all answer as it; none is counted"]
    assert len(screened.accepted) == 1


# -- robust rules per key group ----------------------------------------------------------------
@pytest.mark.parametrize("rule", ["median", "trimmed_mean", "krum", "multikrum"])
def test_in_a_group_of_three_each_robust_rule_keeps_1e30_out_without_a_norm_bound(rule):
    run = Round(fed_of(aggregation=rule))
    run.send()
    got, rejected = run.aggregate([run.reply(1, run.honest(0, 0.01)),
                                   run.reply(2, run.honest(1, 0.02)),
                                   run.reply(3, scaled(run.honest(2), 1e30))])
    assert rejected == []
    for k, v in run.initial.items():  # within the honest agents' values
        assert np.all(got[k] >= v + 0.01 - 1e-6) and np.all(got[k] <= v + 0.02 + 1e-6), k


def test_bulyan_needs_seven_and_then_keeps_one_faulty_agent_out():
    with pytest.raises(ValueError, match=r"bulyan withstands 1 faulty agent.* at least 7; "
                                         r"comm\.\w+ is carried by 3 agents"):
        make_strategy(fed_of(aggregation="bulyan"), 3)
    run = Round(fed_of(aggregation="bulyan", train=TrainConfig(
        env="factory", env_kwargs=SEVEN, num_envs=16, team=TeamConfig(hidden=16))))
    run.send()
    replies = [run.reply(i + 1, run.honest(i, 0.01 * (i + 1))) for i in range(6)]
    got, rejected = run.aggregate([*replies, run.reply(7, scaled(run.honest(6), 1e30))])
    assert rejected == []
    for k, v in run.initial.items():
        assert np.all(np.abs(got[k] - v) <= 0.06 + 1e-6), k


def test_a_group_of_two_median_is_the_mean_and_the_other_rules_are_refused():
    two = TrainConfig(env="speaker_listener", num_envs=16, team=TeamConfig(hidden=16))
    run = Round(fed_of(train=two, aggregation="median"))
    run.send()
    want = honest_mean(run, [0], 0.5)
    got, _ = run.aggregate([run.reply(1, run.honest(0, 0.0)), run.reply(2, run.honest(1, 1.0))])
    assert_close(got, want)
    for rule in ("trimmed_mean", "krum", "multikrum"):
        with pytest.raises(ValueError, match="carried by 2 agents"):
            make_strategy(fed_of(train=two, aggregation=rule), 2)


def test_a_group_with_too_few_replies_for_its_rule_keeps_its_value():
    run = Round(fed_of(aggregation="trimmed_mean"))
    run.send()
    got, _ = run.aggregate([run.reply(1, run.honest(0)), run.reply(2, run.honest(1))])
    assert sorted(run.strategy.held) == sorted({key_group(k) for k in run.initial})
    assert_close(got, run.initial)


def test_the_default_is_fedavg_unchanged():
    run = Round(fed_of())
    run.send()
    got, rejected = run.aggregate([run.reply(i + 1, run.honest(i, 0.1 * i)) for i in range(3)])
    assert rejected == [] and list(got) == list(run.initial)
    assert_close(got, {k: v + np.float32(0.1) for k, v in run.initial.items()})


# -- client-level DP ---------------------------------------------------------------------------
def test_client_dp_clips_each_update_noises_the_mean_and_charges_every_agent(tmp_path):
    fed = fed_of(client_dp_noise=0.5, client_dp_clip=0.1)
    run = Round(fed, run_dir=tmp_path)
    run.strategy.generator.manual_seed(0)
    for _ in range(2):
        run.send()
        sent = {k: v.numpy().copy() for k, v in run.glob.items()}
        got, rejected = run.aggregate([run.reply(1, run.honest(0, 0.0)),
                                       run.reply(2, run.honest(1, 0.0)),
                                       run.reply(3, scaled(run.honest(2), 1e30))])
        assert rejected == []
        diff = np.concatenate([(got[k] - sent[k]).ravel() for k in sent])
        # the 1e30 reply moves the mean by at most C / 3; the noise has std sigma C / 3
        std = 0.5 * 0.1 / 3
        assert np.linalg.norm(diff) <= 0.1 / 3 + 4 * std * np.sqrt(diff.size)
        assert abs(np.std(diff) - std) < 0.15 * std
    for path in ledger_paths(tmp_path, fed).values():
        entries = read_ledger(path)
        assert verify_chain(entries) == []
        assert [(e["round"], e["mechanism"], e["unit"], e["sensitivity"]) for e in entries] == \
            [(1, "client_update", "history", 0.2), (2, "client_update", "history", 0.2)]
    report = write_report(tmp_path, fed)
    assert set(report["agents"]) == set(fed.spec.agent_ids)
    assert 0 < float(report["agents"]["sensor_0"]["composed"]["epsilon"]) < float("inf")
    assert audit(tmp_path / REPORT).ok


def test_client_dp_refuses_what_would_break_its_guarantee():
    for change in ({"strategy": "fedadam"}, {"aggregation": "median"},
                   {"aggregate_private": True}, {"max_update_norm": 1.0}):
        with pytest.raises(ValueError, match=r"client-level DP|clip bounds"):
            make_strategy(fed_of(client_dp_noise=1.0, **change), 3, run_dir=".")
