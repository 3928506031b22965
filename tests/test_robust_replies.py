"""The server's own strategy (``make_strategy(...).aggregate_train``) given honest replies and
one faulty one: each fault is contained, with a one-line reason naming the agent; weights are
the server's; the robust rules per key group; client-level DP's clip, noise, ledgers and report.
Replies are built here, as an agent's would be; no agent trains."""

from __future__ import annotations

import re

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp.strategy import FedAdam, FedAvgM
from flwr.supercore.task_identity import TaskIdentity

from fedcomm.config import FederationConfig, TeamConfig, TrainConfig
from fedcomm.privacy.audit import audit
from fedcomm.privacy.ledger import read_ledger, verify_chain
from fedcomm.protocol.round import ARRAYS, METRICS, WEIGHT_KEY, TrainReply, key_group
from fedcomm.server.client_dp import REPORT, ledger_paths, write_report
from fedcomm.server.layout import initial_arrays
from fedcomm.server.strategy import make_strategy, screen_of
from tests.harness.replies import agent_keys, pushed, signed_reply

SMALL = {"n_sensors": 1, "n_processors": 1, "n_actuators": 1}
SEVEN = {"n_sensors": 5, "n_processors": 1, "n_actuators": 1}
TRAIN = TrainConfig(env="factory", env_kwargs=SMALL, num_envs=16, team=TeamConfig(hidden=16))
STEPS = 16 * 25  # one episode batch
KEYS = agent_keys(["sensor_0", "processor_0", "actuator_0", "speaker_0", "listener_0"])


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
    """The strategy of one run, its global module, and replies to this round's messages, each
    signed as its agent's ClientApp signs it."""

    def __init__(self, fed: FederationConfig, run_dir=None, strategy=None) -> None:
        self.fed = fed
        self.n = fed.spec.n_agents
        self.keys = agent_keys(fed.spec.agent_ids)
        self.initial = {k: v.numpy() for k, v in initial_arrays(fed).items()}
        self.strategy = strategy or make_strategy(fed, self.n, self.keys, run_dir=run_dir)
        self.glob = ArrayRecord({k: Array(v) for k, v in self.initial.items()})
        self.rnd = 0
        self.entries = dict.fromkeys(fed.spec.agent_ids, 0)  # each agent's ledger length

    def send(self) -> list[Message]:
        self.rnd += 1
        config = ConfigRecord({"server_round": self.rnd})
        self.messages = pushed(list(self.strategy.configure_train(self.rnd, self.glob, config,
                                                                  Grid(self.n))))
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
              signer: int | None = None, to: Message | None = None, entries: int | None = None,
              **change: object) -> Message:
        """Node ``node``'s reply (to its message of this round, or ``to``), speaking for
        ``agent`` (default: the node's own, ``node - 1``) and signed with the key of
        ``signer`` (default: the agent it speaks for)."""
        agent = node - 1 if agent is None else agent
        fields = {"agent": agent, "env_steps": STEPS,
                  "batches": len(self.fed.batches_in(self.rnd)), "silent_batches": 0,
                  "epsilon": 1.0, "restored_round": self.rnd - 1, "return_mean": -3.0}
        metrics = TrainReply(**{**fields, **change}).to_record()
        content = RecordDict({ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                              METRICS: metrics})
        ids = self.fed.spec.agent_ids
        name = ids[agent] if 0 <= agent < len(ids) else ids[node - 1]
        key = self.keys[name if signer is None else ids[signer]]
        msg = signed_reply(content, to or self.messages[node - 1], name, key,
                           self.rnd if entries is None else entries, f"{self.rnd:064x}")
        msg.metadata.__dict__["_src_node_id"] = node
        return msg

    def aggregate(self, replies: list[Message]) -> tuple[dict[str, np.ndarray], list[str]]:
        """The strategy's round, as the round loop runs it: it screens the replies and
        aggregates those it accepts; the screen says which it refused."""
        arrays, _ = self.strategy.aggregate_train(self.rnd, list(replies))
        if arrays is not None:
            self.glob = arrays
        return ({k: v.numpy() for k, v in self.glob.items()},
                screen_of(self.strategy).last.rejected)


def honest_mean(run: Round, agents: list[int], delta: float = 0.01) -> dict[str, np.ndarray]:
    parts = [run.honest(a, delta) for a in agents]
    return {k: np.mean([p[k] for p in parts], axis=0) for k in parts[0]}


def assert_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray], tol: float = 1e-6):
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, atol=tol, err_msg=k)


def scaled(arrays: dict[str, np.ndarray], value: float) -> dict[str, np.ndarray]:
    return {k: np.full_like(v, value) for k, v in arrays.items()}


# -- faulty replies against the default options ------------------------------------------------
MOVED = r"{who}: comm\.\S+ moved {moved}, further than an honest agent's optimizer"
FAULTS = {
    "claims 1e12 steps and sends -5": (lambda a: scaled(a, -5.0), {"env_steps": 10**12},
                                       r"{who}: claims 1000000000000 environment steps; the "
                                       r"server scheduled 1 batches of 400 steps, 0 of them "
                                       "silent: 400"),
    "claims -1e12 steps": (lambda a: a, {"env_steps": -10**12},
                           r"{who}: claims -1000000000000 environment steps"),
    "claims 0 steps but trained": (lambda a: a, {"env_steps": 0},
                                   r"{who}: claims 0 environment steps"),
    "sends NaN": (lambda a: scaled(a, np.nan), {},
                  r"{who}: comm\.\S+ is not finite \(\d+ NaN, 0 infinite\)"),
    "sends inf": (lambda a: scaled(a, np.inf), {},
                  r"{who}: comm\.\S+ is not finite \(0 NaN, \d+ infinite\)"),
    "sends 1e30": (lambda a: scaled(a, 1e30), {}, MOVED.replace("{moved}", r"1e\+30")),
    "sends 1e6": (lambda a: scaled(a, 1e6), {}, MOVED.replace("{moved}", r"1e\+06")),
    "sends a wrong shape": (lambda a: {**a, "comm.graph": np.zeros((7, 7), np.float32)}, {},
                            r"{who}: comm\.graph is float32\[7, 7\]; the global module's is "
                            r"float32\[\d, \d\]$"),
}
TEAMS = {"factory, share all": TRAIN,
         "speaker_listener, share all": TrainConfig(env="speaker_listener", num_envs=16,
                                                    team=TeamConfig(hidden=16))}


@pytest.mark.parametrize("team", list(TEAMS))
@pytest.mark.parametrize("fault", list(FAULTS))
def test_each_faulty_reply_is_refused_naming_the_agent_and_the_mean_is_the_honest_ones(
        fault, team):
    make, change, reason = FAULTS[fault]
    run = Round(fed_of(train=TEAMS[team]))  # the default options: no bound set by hand
    run.send()
    n = run.n
    bad = run.reply(n, make(run.honest(n - 1)), **change)
    want = honest_mean(run, list(range(n - 1)))
    got, rejected = run.aggregate([*(run.reply(i + 1, run.honest(i)) for i in range(n - 1)),
                                   bad])
    who = re.escape(f"{run.fed.spec.agent_ids[n - 1]} (node {n})")
    assert len(rejected) == 1 and re.match(reason.replace("{who}", who), rejected[0]), rejected
    assert_close(got, want)
    assert all(np.isfinite(v).all() for v in got.values())


def test_the_default_bound_is_what_an_honest_optimizer_can_move_and_no_less():
    """An update at the bound of Adam's steps passes; one just past it does not; and a
    reply far larger than its peers' in a part three agents carry is refused."""
    run = Round(fed_of())
    run.send()
    reach = screen_of(run.strategy).step_bound(1)
    assert 0 < reach < 1  # lr 1e-3, 16 steps of one batch, Adam's 7.27: 0.116
    screened = screen_of(run.strategy).screen(run.rnd, [
        run.reply(1, run.honest(0, 0.9 * reach)), run.reply(2, run.honest(1, 0.9 * reach)),
        run.reply(3, run.honest(2, 0.9 * reach))])
    assert screened.rejected == [] and len(screened.accepted) == 3
    assert screened.reach == pytest.approx(0.9, rel=1e-3)  # what the round's metrics state
    assert screened.median_ratio == pytest.approx(1.0)
    run.send()
    screened = screen_of(run.strategy).screen(run.rnd, [
        run.reply(1, run.honest(0, 0.001)), run.reply(2, run.honest(1, 0.001)),
        run.reply(3, run.honest(2, 1.01 * reach))])
    assert len(screened.rejected) == 1 and "further than an honest agent's optimizer" in \
        screened.rejected[0]
    run.send()
    screened = screen_of(run.strategy).screen(run.rnd, [
        run.reply(1, run.honest(0, 0.001)), run.reply(2, run.honest(1, 0.001)),
        run.reply(3, run.honest(2, 0.5 * reach))])
    assert len(screened.rejected) == 1 and "times the round's median" in screened.rejected[0]


def test_a_reply_is_weighed_by_the_batches_the_server_scheduled_less_its_silent_ones():
    run = Round(fed_of(batches_per_round=2))
    run.send()
    got, rejected = run.aggregate([
        run.reply(1, run.honest(0, 0.0), env_steps=2 * STEPS),
        run.reply(2, run.honest(1, 0.03), env_steps=STEPS, silent_batches=1),
        run.reply(3, run.honest(2, 0.03), env_steps=2 * STEPS, silent_batches=-5)])  # as 0
    assert rejected == []
    # weights 2 : 1 (one silent batch) : 2, whatever the replies said
    want = {k: (2 * v + 1 * (v + 0.03) + 2 * (v + 0.03)) / 5 for k, v in run.initial.items()
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


def test_replies_for_another_agent_round_part_or_message_are_refused_alone():
    run = Round(fed_of(aggregate_private=True))
    run.send()
    first = run.reply(3, run.honest(2))
    run.aggregate([run.reply(1, run.honest(0)), run.reply(2, run.honest(1)), first])
    run.send()
    sensor = run.honest(0)
    cases = [
        # the actuator's node answers as the processor, which it holds no key of
        (run.reply(3, run.honest(1), agent=1, signer=2),
         "node 3: its reply is not signed with processor_0's key"),
        (run.reply(3, {**run.honest(2), **{k: v for k, v in sensor.items()
                                            if k.startswith("type.sensor.")}}),
         "actuator_0 (node 3): a actuator replies with the networks of sensor"),
        (run.reply(3, run.honest(2), batches=3), "actuator_0 (node 3): replies for 3 batches; "
                                                 "round 2 has 1"),
        (run.reply(3, run.honest(2), restored_round=2),
         "actuator_0 (node 3): continued from round 2, not from one before round 2"),
        (run.reply(3, {k: v for k, v in run.honest(2).items() if k != "comm.graph"}),
         "actuator_0 (node 3): lacks 1 of its"),
        (run.reply(3, run.honest(2), agent=7), "node 3: its metrics speak for agent 7"),
        (first, "node 3: its reply answers no message of this round"),  # a replay of round 1
        (run.reply(3, run.honest(2), to=run.messages[0]),
         "node 3: answers the message sent to node 1"),
        (run.reply(3, run.honest(2), entries=0), "actuator_0 (node 3): its ledger holds 0"),
    ]
    for bad, reason in cases:
        screened = screen_of(run.strategy).screen(run.rnd, [run.reply(1, run.honest(0)),
                                                             run.reply(2, run.honest(1)), bad])
        assert len(screened.accepted) == 2, reason
        assert len(screened.rejected) == 1 and screened.rejected[0].startswith(reason), \
            (reason, screened.rejected)


def test_a_node_answering_as_another_agent_or_twice_leaves_the_honest_replies_counted():
    run = Round(fed_of())
    run.send()
    impostor = run.reply(2, run.honest(0), agent=0, signer=1)  # node 2 claims the sensor
    screened = screen_of(run.strategy).screen(1, [run.reply(1, run.honest(0)), impostor,
                                                  run.reply(3, run.honest(2))])
    assert screened.rejected == ["node 2: its reply is not signed with sensor_0's key; "
                                 "not counted"]
    assert len(screened.accepted) == 2
    run.send()
    again = run.reply(1, run.honest(0))
    screened = screen_of(run.strategy).screen(2, [again, run.reply(2, run.honest(1)),
                                                  run.reply(1, run.honest(0)),
                                                  run.reply(3, run.honest(2))])
    assert screened.rejected == ["node 1: a second reply to one message"]
    assert len(screened.accepted) == 3


def test_arrays_of_a_part_the_agent_does_not_carry_are_refused():
    two = TrainConfig(env="speaker_listener", num_envs=16,
                      team=TeamConfig(hidden=16, routes="speaker>listener"))
    run = Round(fed_of(train=two, share="used"))  # each part has one user: nobody sends any
    run.send()
    screened = screen_of(run.strategy).screen(run.rnd, [
        run.reply(1, {}), run.reply(2, {k: v for k, v in run.honest(1).items()
                                         if k.startswith("comm.decoder")})])
    assert len(screened.accepted) == 1
    assert screened.rejected[0].startswith("listener_0 (node 2): carries arrays of parts it "
                                           "does not send: comm.decoder")


# -- robust rules per key group ----------------------------------------------------------------
@pytest.mark.parametrize("rule", ["median", "trimmed_mean", "krum", "multikrum"])
def test_in_a_group_of_three_each_robust_rule_keeps_an_outlier_out_that_the_bounds_pass(rule):
    run = Round(fed_of(aggregation=rule))
    run.send()
    got, rejected = run.aggregate([run.reply(1, run.honest(0, 0.01)),
                                   run.reply(2, run.honest(1, 0.02)),
                                   run.reply(3, run.honest(2, 0.1))])  # 5x the median
    assert rejected == []
    for k, v in run.initial.items():  # within the honest agents' values
        assert np.all(got[k] >= v + 0.01 - 1e-6) and np.all(got[k] <= v + 0.02 + 1e-6), k


def test_bulyan_needs_seven_and_then_keeps_one_faulty_agent_out():
    with pytest.raises(ValueError, match=r"bulyan withstands 1 faulty agent.* at least 7; "
                                         r"comm\.\w+ is carried by 3 agents"):
        make_strategy(fed_of(aggregation="bulyan"), 3, KEYS)
    run = Round(fed_of(aggregation="bulyan", train=TrainConfig(
        env="factory", env_kwargs=SEVEN, num_envs=16, team=TeamConfig(hidden=16))))
    run.send()
    replies = [run.reply(i + 1, run.honest(i, 0.01 * (i + 1))) for i in range(6)]
    got, rejected = run.aggregate([*replies, run.reply(7, run.honest(6, 0.11))])
    assert rejected == []
    for k, v in run.initial.items():
        assert np.all(np.abs(got[k] - v) <= 0.06 + 1e-6), k


def test_a_group_of_two_median_is_the_mean_and_the_other_rules_are_refused():
    two = TrainConfig(env="speaker_listener", num_envs=16, team=TeamConfig(hidden=16))
    run = Round(fed_of(train=two, aggregation="median"))
    run.send()
    want = honest_mean(run, [0], 0.05)
    got, _ = run.aggregate([run.reply(1, run.honest(0, 0.0)), run.reply(2, run.honest(1, 0.1))])
    assert_close(got, want)
    for rule in ("trimmed_mean", "krum", "multikrum"):
        with pytest.raises(ValueError, match="carried by 2 agents"):
            make_strategy(fed_of(train=two, aggregation=rule), 2, KEYS)


def test_a_group_with_too_few_replies_for_its_rule_keeps_its_value():
    run = Round(fed_of(aggregation="trimmed_mean"))
    run.send()
    got, _ = run.aggregate([run.reply(1, run.honest(0)), run.reply(2, run.honest(1))])
    assert sorted(run.strategy.held) == sorted({key_group(k) for k in run.initial})
    assert_close(got, run.initial)


def test_the_default_is_fedavg_unchanged():
    run = Round(fed_of())
    run.send()
    got, rejected = run.aggregate([run.reply(i + 1, run.honest(i, 0.05 * i)) for i in range(3)])
    assert rejected == [] and list(got) == list(run.initial)
    assert_close(got, {k: v + np.float32(0.05) for k, v in run.initial.items()})


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
                                       run.reply(3, run.honest(2, 0.1))])
        assert rejected == []
        diff = np.concatenate([(got[k] - sent[k]).ravel() for k in sent])
        # the large reply moves the mean by at most C / 3; the noise has std sigma C / 3
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
            make_strategy(fed_of(client_dp_noise=1.0, **change), 3, KEYS, run_dir=".")


# -- server steps: Flower's own FedAvgM and FedAdam over the grouped average -------------------
@pytest.mark.parametrize("strategy", ["fedavgm", "fedadam"])
def test_the_server_step_is_flowers_own_on_the_grouped_average(strategy):
    """Every agent carries every part here, so the grouped average is FedAvg's: the module
    after each round is what Flower's FedAvgM or FedAdam makes of the same replies."""
    change = ({"server_lr": 1.0, "server_momentum": 0.9} if strategy == "fedavgm"
              else {"server_lr": 0.01})
    run = Round(fed_of(strategy=strategy, **change))
    common = {"fraction_train": 1.0, "fraction_evaluate": 0.0, "min_train_nodes": 3,
              "min_available_nodes": 3, "weighted_by_key": WEIGHT_KEY}
    flower = (FedAvgM(server_learning_rate=1.0, server_momentum=0.9, **common)
              if strategy == "fedavgm" else FedAdam(eta=0.01, eta_l=TRAIN.ppo.lr, **common))
    theirs = run.glob
    for _ in range(3):
        run.send()
        asked = pushed(sorted(flower.configure_train(run.rnd, theirs, ConfigRecord({}),
                                                     Grid(3)),
                              key=lambda m: m.metadata.dst_node_id))
        updates = [run.honest(i, 0.01 * (i + 1)) for i in range(3)]
        got, rejected = run.aggregate([run.reply(i + 1, u) for i, u in enumerate(updates)])
        assert rejected == []
        replies = [Message(RecordDict({ARRAYS: ArrayRecord({k: Array(v) for k, v in u.items()}),
                                       METRICS: MetricRecord({WEIGHT_KEY: STEPS})}),
                           reply_to=asked[i]) for i, u in enumerate(updates)]
        theirs, _ = flower.aggregate_train(run.rnd, replies)
        assert_close(got, {k: v.numpy() for k, v in theirs.items()}, 1e-6)
        assert all(v.dtype == run.initial[k].dtype for k, v in got.items())  # float32 kept
