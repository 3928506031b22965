"""The private default tried as an adversarial peer and a curious server would: what they can
recover from everything public, what the server may make an agent do, what leaves an agent,
and what a tampered ledger does to the audit. Every party is the real one
(tests/harness/grids.py)."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, MessageType, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

import fedcomm.learning.dpsgd as dpsgd
from fedcomm.clients.agent import global_arrays
from fedcomm.clients.policy import PrivacyPolicy
from fedcomm.commands.privacy import server_record
from fedcomm.models.team import Team
from fedcomm.modes.simulation import check_ledgers_extend, complete_run, released_fields
from fedcomm.privacy.audit import audit
from fedcomm.privacy.ledger import GENESIS, entry_hash, read_ledger
from fedcomm.protocol.round import (
    ARRAYS,
    METRICS,
    PROOF,
    TrainInstruction,
    arrays_release,
    release_of,
)
from fedcomm.protocol.v1 import joint_env_pb2 as pb
from fedcomm.releases.account import LEDGER
from fedcomm.releases.report import write_run_report
from fedcomm.releases.schedule import composition_of_config
from fedcomm.server.federation import FederationError
from fedcomm.sim.registry import make_env
from fedcomm.sim.service import JointEnvironmentService
from tests.harness.grids import B, FederatedRun, private_default

pytestmark = pytest.mark.integration  # every party of a run, the simulator on loopback


@pytest.fixture(autouse=True, scope="module")
def server_identity():
    """Messages are made by a server task: the test plays the ServerApp's part."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID


class Watched(JointEnvironmentService):
    """The simulator, noting each batch's label (what its agents declared) and the goals it
    drew: the truth a peer tries to recover."""

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.joins: list[pb.JoinRequest] = []
        self.goals: list[torch.Tensor] = []
        reset = self.env.reset

        def watched_reset(seed=None):
            obs = reset(seed)
            self.goals.append(self.env.goal.clone())
            return obs

        self.env.reset = watched_reset

    async def Join(self, request, context):
        self.joins.append(request)
        return await super().Join(request, context)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> tuple[FederatedRun, Path]:
    """The private default, run once to its end: two rounds, the final evaluation, the report."""
    fed = private_default()
    run = FederatedRun(fed, tmp_path_factory.mktemp("default"), service=Watched)
    try:
        run.federation().run_rounds()
        complete_run(run.run_dir, fed)
    finally:
        run.close()
    return run, run.run_dir


# -- what a peer recovers from everything public --------------------------------------------------
def test_a_peer_with_the_config_its_stream_and_the_servers_messages_guesses_goals_by_chance(
        default_run):
    run, _ = default_run
    labels = sorted({j.seed for j in run.service.joins})
    assert len(labels) == len(run.service.goals) == 3  # two training batches, one evaluation
    by_label = {}
    for join in run.service.joins:  # the batches in the order they ran
        by_label.setdefault(join.seed, len(by_label))
    hits = total = 0
    for label, index in by_label.items():
        # the peer knows the label (it declared it itself) and the run's whole configuration
        guess = make_env("speaker_listener", B, **run.fed.train.env_kwargs)
        guess.reset(label)
        hits += int((guess.goal == run.service.goals[index]).sum())
        total += B
    keep = math.exp(run.fed.train.team.rr_epsilon)
    posterior = keep / (keep + run.fed.train.team.symbols - 1)  # randomized response's best
    accuracy = hits / total
    assert accuracy < 0.45 < posterior, accuracy  # chance is 1/3 (3 landmarks); was 100%


def test_each_dp_sgd_sample_is_no_better_predicted_from_public_state_than_by_chance(
        tmp_path, monkeypatch):
    """Two runs from the same public state and the same episodes (an attacker's replica of an
    agent): their DP-SGD samples agree no more than independent ones do."""
    drawn: list[list[torch.Tensor]] = [[], []]
    which = {"run": 0}
    sample = dpsgd.poisson_sample

    def recorded(b, rate, generator):
        mask = sample(b, rate, generator)
        drawn[which["run"]].append(mask.clone())
        return mask

    monkeypatch.setattr(dpsgd, "poisson_sample", recorded)
    fed = replace(private_default(), batches_per_round=2)
    for twin in (0, 1):
        which["run"] = twin
        run = FederatedRun(fed, tmp_path / str(twin))
        try:
            federation = run.federation()
            federation.train_round(1)
        finally:
            run.close()
    first, second = drawn
    assert len(first) == len(second) > 30  # two batches of the speaker's DP-SGD steps
    same = sum(bool(torch.equal(a, b)) for a, b in zip(first, second))
    agree = torch.stack([a == b for a, b in zip(first, second)]).float().mean().item()
    rate = first[0].float().mean().item()
    chance = 0.25**2 + 0.75**2  # sample rate 1/4: two independent draws agree this often
    assert same == 0, f"{same} of {len(first)} samples predicted exactly (was: all)"
    assert abs(agree - chance) < 0.05, (agree, chance, rate)


# -- what the server may make an agent do -------------------------------------------------------
BELOW = {
    "non-private": (["--non-private"], "train.privacy.relation|plans epsilon inf|no DP-SGD"),
    "a larger budget": (["--epsilon", "16"], "update_noise_multiplier is 1.7.*at least 3.17"),
    "no DP-SGD": (None, "update_noise_multiplier is unset"),
}


@pytest.mark.parametrize("case", list(BELOW))
def test_a_config_below_the_agents_policy_is_refused_and_the_run_stops_with_its_line(
        tmp_path, case):
    flags, reason = BELOW[case]
    agents_run = private_default()
    if flags is None:
        sent = replace(agents_run, train=replace(agents_run.train, privacy=replace(
            agents_run.train.privacy, update_noise_multiplier=None)))
    else:
        sent = private_default(*flags)
    run = FederatedRun(agents_run, tmp_path, service=Watched, join_timeout=3.0)
    try:
        with pytest.raises(FederationError, match=r"round 1: .*speaker_0 refuses the round: "
                                                  r".*(" + reason + ")") as stopped:
            run.federation(sent).run_rounds()
    finally:
        run.close()
    # The speaker, whose data the config would expose, released nothing, not even a join; an
    # agent that releases nothing under it (the listener, without feedback) may join and wait.
    refusing = {a for a in agents_run.spec.agent_ids if f"{a} refuses" in str(stopped.value)}
    assert "speaker_0" in refusing
    assert not refusing & {j.header.sender for j in run.service.joins}
    for agent in agents_run.spec.agent_ids:
        ledger = tmp_path / "agents" / agent / LEDGER
        assert not ledger.exists() or read_ledger(ledger) == []


def test_seeded_noise_cannot_travel_in_a_config_and_a_node_of_seeded_noise_fails_the_audit(
        tmp_path, default_run):
    fed = private_default()
    run = FederatedRun(fed, tmp_path / "seeded", service=Watched,
                       policy=replace(PrivacyPolicy.of_run(fed), seeded_noise=True))
    try:
        # a server that asks for seeded noise: no agent can even read such a configuration
        config = json.loads(fed.to_json())
        config["train"]["privacy"]["seeded_noise"] = True
        todo = TrainInstruction(json.dumps(config), 1).to_record()
        team = Team.initial(fed.spec, fed.train.team, fed.train.seed)
        msg = Message(RecordDict({"arrays": ArrayRecord(global_arrays(team)), "config": todo}),
                      dst_node_id=1, message_type=MessageType.TRAIN)
        context = Context(run_id=1, node_id=1, node_config={"partition-id": 0},
                          state=RecordDict(), run_config={})
        reply = run.grid.app(msg, context)
        assert reply.has_error()
        assert "unknown setting train.privacy.seeded_noise" in reply.error.reason
        assert run.service.joins == []
        # a node set to seeded noise (test randomness) runs, but its ledger says so
        run.federation().run_rounds()
        complete_run(run.run_dir, fed)
    finally:
        run.close()
    agents, anchors = server_record(run.run_dir)
    result = audit(run.run_dir, composition=composition_of_config, agents=agents,
                   anchors=anchors)
    assert not result.ok
    assert any(f.where.endswith(":noise") and "seeded stream" in f.message
               for f in result.failures)


# -- what leaves an agent ----------------------------------------------------------------------
def test_every_field_the_private_default_sends_the_server_is_a_count_the_ledger_or_dp(
        default_run):
    run, run_dir = default_run
    replies = run.grid.replies
    kinds = {m.metadata.message_type for m in replies}
    assert kinds == {MessageType.TRAIN, MessageType.EVALUATE} and len(replies) == 2 * 2 + 2
    dp_sgd = run.fed.train.privacy.update_noise_multiplier is not None
    for msg in replies:
        assert not msg.has_error(), msg.error
        content = msg.content
        assert set(content.keys()) <= {ARRAYS, METRICS, PROOF}
        for name in [*content[METRICS].keys(), *content[PROOF].keys()]:
            assert release_of(name) != "clear", f"{name} leaves the agent in the clear"
        if ARRAYS in content and len(content[ARRAYS]):
            assert arrays_release(dp_sgd) == "dp"
    report = json.loads((run_dir / "privacy_report.json").read_text())
    released = report["run"]["released"]
    assert released == released_fields(
        [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()],
        run.fed)
    assert "clear" not in released.values() and {"epsilon", "ledger_hash"} <= set(released)
    # what the agents kept to themselves, the operator of every party reads from their journals
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final"]["episodes"] == B and summary["gap_closed"] is not None


# -- the anchored ledger -------------------------------------------------------------------------
def tampered(run_dir: Path, tmp_path: Path, change) -> Path:
    """A copy of the run whose ledgers ``change`` edits, with its report rebuilt from them."""
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    fed = private_default()
    change(copy)
    ledgers = {a: copy / "agents" / a / LEDGER for a in fed.spec.agent_ids}
    write_run_report(copy, fed.to_dict(), fed.train.team, fed.train.privacy, ledgers,
                     ppo=fed.train.ppo)
    return copy


def cut_tail(run: Path) -> None:
    path = run / "agents" / "speaker_0" / LEDGER
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))


def rehash(run: Path) -> None:
    path = run / "agents" / "speaker_0" / LEDGER
    entries, prev = read_ledger(path), GENESIS
    for entry in entries:
        if entry["mechanism"] == "message":
            entry["epsilon"] = entry["epsilon"] / 2  # claim half of what was spent
        entry["prev"] = prev
        entry["hash"] = prev = entry_hash(entry)
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))


def delete_listener(run: Path) -> None:
    (run / "agents" / "listener_0" / LEDGER).unlink()


@pytest.mark.parametrize("change,where", [(cut_tail, "speaker_0.ledger"),
                                          (rehash, "speaker_0.ledger"),
                                          (delete_listener, "agents.listener_0")])
def test_the_audit_fails_a_ledger_cut_rehashed_or_deleted_after_the_fact(
        default_run, tmp_path, change, where):
    _, run_dir = default_run
    agents, anchors = server_record(run_dir)
    assert audit(run_dir, composition=composition_of_config, agents=agents,
                 anchors=anchors).ok
    copy = tampered(run_dir, tmp_path, change)
    agents, anchors = server_record(copy)
    result = audit(copy, composition=composition_of_config, agents=agents, anchors=anchors)
    assert not result.ok
    assert any(where in f.where for f in result.failures), result.failures


def test_a_resumed_run_refuses_a_truncated_ledger(default_run, tmp_path):
    _, run_dir = default_run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    check_ledgers_extend(copy, private_default())  # as the server recorded it: fine
    cut_tail(copy)
    # the checkpoint's anchor is the last round's; the final evaluation's entries follow it
    path = copy / "agents" / "speaker_0" / LEDGER
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:len(lines) // 2]))
    with pytest.raises(ValueError, match=r"cannot resume: speaker_0's ledger .* does not "
                                         r"extend the \d+ the server recorded"):
        check_ledgers_extend(copy, private_default())
