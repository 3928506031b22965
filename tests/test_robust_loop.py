"""The server's round loop with a reply its checks refuse, and with client-level DP, against
the grid of tests/test_federation_loop.py whose nodes answer at once (no agent trains)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MessageType, RecordDict

from fedcomm.privacy.audit import audit
from fedcomm.protocol.round import ARRAYS, METRICS
from fedcomm.server.checkpoint import load_checkpoint
from fedcomm.server.client_dp import REPORT, ledger_paths
from fedcomm.server.federation import FederationError
from tests.test_federation_loop import (  # noqa: F401
    answer,
    federation,
    server_identity,
    trains,
)


def sends_nan(node: int, msg: Message) -> Message:
    """Trains, then replies NaN everywhere."""
    reply = trains(node, msg)
    if msg.metadata.message_type != MessageType.TRAIN:
        return reply
    arrays = {k: Array(np.full_like(v.numpy(), np.nan)) for k, v in reply.content[ARRAYS].items()}
    return answer(node, msg, RecordDict({ARRAYS: ArrayRecord(arrays),
                                         METRICS: reply.content[METRICS]}))


def test_a_refused_reply_stops_the_run_naming_the_agent_and_nothing_is_committed(tmp_path):
    with pytest.raises(FederationError, match=r"round 1: listener_0 \(node 2\): comm\.\S+ is "
                                              r"not finite"):
        federation(tmp_path, {1: trains, 2: sends_nan}).run_rounds()
    assert load_checkpoint(tmp_path) is None


def test_with_continue_the_round_goes_on_without_the_refused_reply(tmp_path: Path):
    result = federation(tmp_path, {1: trains, 2: sends_nan},
                        on_agent_failure="continue").run_rounds()
    assert [(m["agents"], m["failures"]) for m in result.metrics] == [(1, 1), (1, 1)]
    assert all("is not finite" in m["failed"][0] for m in result.metrics)
    ckpt = load_checkpoint(tmp_path)
    assert all(np.isfinite(v).all() for v in ckpt.arrays.values())


def test_client_dp_through_the_loop_charges_every_agent_and_reports(tmp_path: Path):
    run = federation(tmp_path, {1: trains, 2: trains}, client_dp_noise=2.0, client_dp_clip=0.5)
    result = run.run_rounds()
    assert [m["round"] for m in result.metrics] == [1, 2]
    for path in ledger_paths(tmp_path, run.fed).values():
        lines = path.read_text().splitlines()
        assert [json.loads(line)["round"] for line in lines] == [1, 2]
    report = json.loads((tmp_path / REPORT).read_text())
    assert report["run"]["unit"] == "history" and report["run"]["relation"] == "replace_one"
    assert audit(tmp_path / REPORT).ok
    # the agents returned what they were sent: the global module moved by the noise alone
    assert load_checkpoint(tmp_path).round == 2
