"""The server's round loop against a grid whose nodes answer as the test says: the failure
policy, rounds that fail in a row, a failed evaluation, nodes that never answer, and the
committed rounds of a run that goes well. No agent trains: each node replies at once."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import Error, Message, MessageType, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.supercore.task_identity import TaskIdentity
from rich.console import Console

from fedcomm.config import FederationConfig, TeamConfig, TrainConfig
from fedcomm.protocol.round import ARRAYS, METRICS, EvaluateReply, TrainReply
from fedcomm.server.checkpoint import load_checkpoint
from fedcomm.server.federation import Federation, FederationError
from tests.harness.grids import Answer, Grid
from tests.harness.replies import agent_keys, signed_reply

B = 4
FED = FederationConfig(
    train=TrainConfig(env="speaker_listener", num_envs=B, env_steps=4 * B * 25,
                      eval_episodes=B, team=TeamConfig(hidden=8, comm_dim=4)),
    batches_per_round=2, round_timeout=5.0, node_timeout=5.0)

KEYS = agent_keys(FED.spec.agent_ids)


def answer(node: int, msg: Message, content: RecordDict) -> Message:
    """``content`` signed as node ``node``'s agent (agent ``node - 1``)."""
    agent = FED.spec.agent_ids[node - 1]
    return signed_reply(content, msg, agent, KEYS[agent])


def trains(node: int, msg: Message) -> Message:
    """An agent that trained both batches of the round and returns the module it was sent."""
    if msg.metadata.message_type == MessageType.EVALUATE:
        reply = EvaluateReply(node - 1, B, [-10.0 - node] * B).to_record()
        return answer(node, msg, RecordDict({METRICS: reply}))
    reply = TrainReply(agent=node - 1, env_steps=2 * B * 25, batches=2, silent_batches=0,
                       epsilon=1.0, restored_round=0, return_mean=-20.0,
                       timings={"client_s": 0.01})
    return answer(node, msg, RecordDict({ARRAYS: msg.content[ARRAYS],
                                         METRICS: reply.to_record()}))


def fails(node: int, msg: Message) -> Message:
    return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"agent {node}: broken"),
                   reply_to=msg)


@pytest.fixture(autouse=True)
def server_identity():
    """Messages are made by a server task: the test plays the ServerApp's part."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID


def federation(tmp_path: Path, answers: dict[int, Answer], **change: object) -> Federation:
    fed = FederationConfig(**{**FED.to_dict(), **change})
    return Federation(Grid(answers), fed, tmp_path, KEYS, progress=False,
                      console=Console(quiet=True))


def test_a_run_that_goes_well_commits_every_round(tmp_path: Path):
    result = federation(tmp_path, {1: trains, 2: trains}).run_rounds()
    assert [m["round"] for m in result.metrics] == [1, 2]
    assert [m["env_steps"] for m in result.metrics] == [2 * B * 25, 4 * B * 25]
    assert all(m["agents"] == 2 and m["failures"] == 0 for m in result.metrics)
    assert load_checkpoint(tmp_path).round == 2
    # the final evaluation averages each episode over the agents: -11 and -12
    assert result.final.return_mean == pytest.approx(-11.5) and result.final.episodes == B


def test_a_failed_agent_stops_the_run_naming_it_and_nothing_is_committed(tmp_path: Path):
    with pytest.raises(FederationError, match=r"round 1: agent 2: broken"):
        federation(tmp_path, {1: trains, 2: fails}).run_rounds()
    assert load_checkpoint(tmp_path) is None


def test_with_continue_a_round_goes_on_without_the_failed_agent(tmp_path: Path):
    def cannot_train(node: int, msg: Message) -> Message:
        return (fails if msg.metadata.message_type == MessageType.TRAIN else trains)(node, msg)

    result = federation(tmp_path, {1: trains, 2: cannot_train},
                        on_agent_failure="continue").run_rounds()
    assert [(m["agents"], m["failures"]) for m in result.metrics] == [(1, 1), (1, 1)]


def test_rounds_failing_in_a_row_stop_the_run_after_max_failed_rounds(tmp_path: Path):
    run = federation(tmp_path, {1: fails, 2: fails}, on_agent_failure="continue",
                     max_failed_rounds=3)
    with pytest.raises(FederationError, match=r"3 rounds in a row failed; the last: round 1:"):
        run.run_rounds()
    assert sum(m.metadata.message_type == MessageType.TRAIN for m in run.grid.sent) == 3 * 2
    assert load_checkpoint(tmp_path) is None


def test_a_round_that_fails_once_is_run_again_and_the_count_starts_over(tmp_path: Path):
    attempts: dict[tuple[int, int], int] = {}

    def first_attempt_fails(node: int, msg: Message) -> Message:
        key = (node, int(msg.content["config"]["server_round"]))
        attempts[key] = attempts.get(key, 0) + 1
        first = attempts[key] == 1 and msg.metadata.message_type == MessageType.TRAIN
        return (fails if first else trains)(node, msg)

    run = federation(tmp_path, {1: first_attempt_fails, 2: first_attempt_fails},
                     on_agent_failure="continue", max_failed_rounds=2)
    result = run.run_rounds()  # two failed rounds, but never two in a row
    assert [m["round"] for m in result.metrics] == [1, 2]
    trained = [m.content["config"]["server_round"] for m in run.grid.sent
               if m.metadata.message_type == MessageType.TRAIN]
    assert trained == [1, 1, 1, 1, 2, 2, 2, 2]


def test_a_node_that_never_answers_is_named_with_the_timeout(tmp_path: Path):
    with pytest.raises(FederationError, match=r"node 2 did not answer within 0.3 s"):
        federation(tmp_path, {1: trains, 2: lambda node, msg: None},
                   round_timeout=0.3).run_rounds()


def test_a_failed_evaluation_stops_the_run_with_its_reason(tmp_path: Path):
    def trains_but_cannot_evaluate(node: int, msg: Message) -> Message:
        if msg.metadata.message_type == MessageType.EVALUATE:
            return fails(node, msg)
        return trains(node, msg)

    run = federation(tmp_path, {1: trains, 2: trains_but_cannot_evaluate})
    with pytest.raises(FederationError, match=r"evaluation failed: agent 2: broken"):
        run.run_rounds()
    assert load_checkpoint(tmp_path).round == 2  # the trained rounds stay committed


def test_with_continue_a_failed_evaluation_leaves_the_run_without_a_result(tmp_path: Path):
    def trains_but_cannot_evaluate(node: int, msg: Message) -> Message:
        if msg.metadata.message_type == MessageType.EVALUATE:
            return fails(node, msg)
        return trains(node, msg)

    run = federation(tmp_path, {1: trains, 2: trains_but_cannot_evaluate},
                     on_agent_failure="continue", eval_every=1)
    result = run.run_rounds()
    assert [m["round"] for m in result.metrics] == [1, 2]
    assert "agent 2: broken" in result.metrics[0]["eval_failed"]
    assert result.final is None and result.summary.gap_closed is None


def test_a_resumed_run_continues_after_its_checkpoint(tmp_path: Path):
    def stops_in_round_2(node: int, msg: Message) -> Message:
        if msg.content["config"]["server_round"] == 2:
            return fails(node, msg)
        return trains(node, msg)

    with pytest.raises(FederationError):
        federation(tmp_path, {1: stops_in_round_2, 2: trains}).run_rounds()
    assert load_checkpoint(tmp_path).round == 1
    resumed = federation(tmp_path, {1: trains, 2: trains})
    result = resumed.run_rounds()
    assert [m["round"] for m in result.metrics] == [1, 2]
    trained = [m.content["config"]["server_round"] for m in resumed.grid.sent
               if m.metadata.message_type == MessageType.TRAIN]
    assert trained == [2, 2]  # round 1 is not run again
