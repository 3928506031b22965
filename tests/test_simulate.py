"""``fedcomm simulate`` end to end, as a user runs it: real Ray, real gRPC on loopback, the
ServerApp and one ClientApp per agent; then Ctrl-C in the middle of a run and ``--resume``."""

from __future__ import annotations

import json
import signal
import time

import numpy as np
import pytest
import torch

from fedcomm.clients.state import StateStore
from fedcomm.commands import main
from fedcomm.config import FederationConfig
from fedcomm.server.checkpoint import load_checkpoint
from fedcomm.server.layout import initial_arrays
from tests.harness.processes import (
    ROUND_STEPS,
    SMALL,
    assert_nothing_left,
    rounds_in,
    simulate,
)

pytestmark = pytest.mark.integration  # every test runs fedcomm simulate


def test_simulate_three_agents_of_three_types_for_two_rounds(tmp_path, capsys):
    out = tmp_path / "run"
    proc = simulate(*SMALL, "--env-steps", str(2 * ROUND_STEPS), "--out", str(out))
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log
    assert "gap closed" in log and "Traceback" not in log

    for name in ("config.json", "metrics.jsonl", "summary.json", "checkpoint.pt", "team.pt",
                 "learning_curve.png"):
        assert (out / name).stat().st_size > 0, name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert [r["env_steps"] for r in rows] == [ROUND_STEPS, 2 * ROUND_STEPS]
    for row in rows:
        assert row["agents"] == 3 and row["failures"] == 0
        assert row["round_time_s"] > 0 and "return_mean" in row
        # the slowest agent's time, and of each phase the slowest agent's
        assert row["client_s"] >= max(row["rollout_s"], row["feedback_s"], row["update_s"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "federated" and summary["rounds"] == 2
    assert set(summary["baselines"]) == {"random", "no_comm", "oracle", "ceiling"}
    assert summary["final"]["episodes"] == 64
    assert load_checkpoint(out).round == 2
    # Each agent kept its own private state; the team file is assembled from them.
    for agent in ("sensor_0", "processor_0", "actuator_0"):
        assert list((out / "agents" / agent).glob("state-r*.pt"))
    config = json.loads((out / "config.json").read_text())
    assert config["mode"] == "federated" and config["train"]["env"] == "factory"

    capsys.readouterr()
    assert main(["eval", str(out), "--episodes", "20", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["episodes"] == 20
    assert_nothing_left(out)


def test_with_share_none_the_server_averages_nothing_and_each_agent_keeps_its_copy(
        tmp_path, capsys):
    out = tmp_path / "run"
    proc = simulate(*SMALL, "--share", "none", "--env-steps", str(2 * ROUND_STEPS),
                    "--out", str(out))
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log
    fed = FederationConfig.from_dict(json.loads((out / "config.json").read_text()))
    assert fed.share == "none"
    initial = initial_arrays(fed)
    ckpt = load_checkpoint(out)
    assert ckpt.round == 2
    for k, v in ckpt.arrays.items():  # nothing came back to aggregate
        np.testing.assert_array_equal(v, initial[k].numpy(), err_msg=k)
    copies = [StateStore(out / "agents" / a, {}).load(2).state["comm"]
              for a in ("sensor_0", "processor_0", "actuator_0")]
    for key in copies[0]:  # each trained its own copy: no two agents' are alike
        assert not torch.equal(copies[0][key], copies[1][key]) or "graph" in key, key
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["episodes"] == 64 and "importance" not in summary
    assert not (out / "team.pt").exists()  # one team cannot hold three copies
    capsys.readouterr()
    assert main(["eval", str(out), "--episodes", "20"]) == 2
    assert "kept copies of the shared module that no one team holds" in capsys.readouterr().err
    assert_nothing_left(out)


def test_an_interrupted_simulation_resumes_without_repeating_or_losing_a_round(tmp_path):
    out = tmp_path / "run"
    rounds = 6
    proc = simulate(*SMALL, "--env-steps", str(rounds * ROUND_STEPS), "--out", str(out))
    deadline = time.monotonic() + 240
    while (ckpt := load_checkpoint(out) if (out / "checkpoint.pt").exists() else None) is None \
            or ckpt.round < 2:
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "no round completed"
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, log
    assert "interrupted" in log and "Traceback" not in log
    assert_nothing_left(out)
    stopped = load_checkpoint(out).round
    assert 2 <= stopped < rounds
    assert rounds_in(out) == list(range(1, stopped + 1))
    global_before = load_checkpoint(out).arrays

    resumed = simulate("--resume", str(out), "--quiet")
    log, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, log
    assert rounds_in(out) == list(range(1, rounds + 1))  # none repeated, none lost
    ckpt = load_checkpoint(out)
    assert ckpt.round == rounds and ckpt.env_steps == rounds * ROUND_STEPS
    assert any(not torch.equal(torch.from_numpy(ckpt.arrays[k]), torch.from_numpy(v))
               for k, v in global_before.items())  # it went on training from the checkpoint
    assert_nothing_left(out)

