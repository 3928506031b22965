"""A resumed run: a finished one spends nothing; a round started and not committed runs again
on fresh episodes, never silent for the releases of its first attempt. Every party is the real
one (tests/harness/grids.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from fedcomm.clients.agent import LABELS
from fedcomm.commands import main
from fedcomm.modes.simulation import complete_run
from fedcomm.privacy.ledger import read_ledger
from fedcomm.releases.account import LEDGER
from tests.harness.grids import FederatedRun, private_default

pytestmark = pytest.mark.integration  # every party of a run, the simulator on loopback


@pytest.fixture(autouse=True, scope="module")
def server_identity():
    """Messages are made by a server task: the test plays the ServerApp's part."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID


def test_a_round_started_and_not_committed_runs_again_on_fresh_episodes(tmp_path: Path):
    fed = private_default()  # two rounds of one batch
    run = FederatedRun(fed, tmp_path)
    try:
        first = run.federation()
        replies = first.train_round(1)
        first.commit(1, first.aggregate(1, replies))
        first.train_round(2)  # the speaker released round 2's batch; then the server stopped
        result = run.federation().run_rounds()  # the operator resumes
    finally:
        run.close()
    assert result.summary.rounds == 2
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert not any(r.get("silent") for r in rows), rows
    entries = read_ledger(tmp_path / "agents" / "speaker_0" / LEDGER)
    trained = [(e["round"], e["batch"]) for e in entries
               if e["round"] == 2 and e["batch"] < LABELS]  # not the final evaluation's
    batches = sorted({b for _, b in trained})
    assert len(batches) == 2, trained  # two attempts at round 2, each its own episodes


def test_resuming_a_finished_run_says_so_and_runs_and_spends_nothing(tmp_path: Path, capsys):
    fed = private_default()
    run = FederatedRun(fed, tmp_path)
    try:
        run.federation().run_rounds()
        complete_run(tmp_path, fed)
    finally:
        run.close()
    ledger = tmp_path / "agents" / "speaker_0" / LEDGER
    kept = {p: p.read_bytes() for p in (ledger, tmp_path / "summary.json",
                                        tmp_path / "team.pt", tmp_path / "metrics.jsonl")}
    capsys.readouterr()
    assert main(["simulate", "--resume", str(tmp_path)]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert f"{tmp_path} is finished (2 of 2 rounds)" in err and "nothing to resume" in err
    assert {p: p.read_bytes() for p in kept} == kept  # nothing run, nothing spent
