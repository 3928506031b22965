"""Every epsilon a federated run states holds for its unit, through ``fedcomm simulate`` as a
user runs it (real Ray, real gRPC): vectors calibrated per batch are not stated per episode
when plain PPO trains the networks that shape them; under DP-SGD their episode's batch is what
composes; one budget ``--epsilon`` is split, calibrated, stated and verified by the audit; the
private default states composed epsilon 8 per episode and the gap against its DP ceiling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fedcomm.commands import main
from fedcomm.privacy.audit import audit, independent_epsilon
from fedcomm.privacy.calibrate import noise_for_epsilon
from fedcomm.privacy.ledger import read_ledger
from fedcomm.privacy.report import build_report, run_info_from_report, write_report
from fedcomm.releases.account import LEDGER
from fedcomm.releases.schedule import composition_of_config

pytestmark = pytest.mark.integration  # every test runs `fedcomm simulate`

SMALL = ["--env", "speaker_listener", "--num-envs", "16", "--env-steps", str(4 * 16 * 25),
         "--batches-per-round", "2", "--eval-episodes", "16", "--hidden", "16", "--quiet"]
AGENTS = ("speaker_0", "listener_0")
PER_BATCH_8 = noise_for_epsilon(8.0, 1e-5, count=25)  # one episode's 25 vectors: epsilon 8


def simulate(out: Path, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "fedcomm", "simulate", *SMALL, *args,
                           "--out", str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "400"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def messages(run: Path, agent: str) -> list[dict]:
    return [e for e in read_ledger(run / "agents" / agent / LEDGER)
            if e["mechanism"] == "message"]


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory) -> tuple[Path, str]:
    """Vectors whose noise costs epsilon 8 per batch, every network trained by plain PPO."""
    out = tmp_path_factory.mktemp("plain") / "run"
    return out, simulate(out, "--non-private", "--noise-multiplier", str(PER_BATCH_8))


def test_without_dp_sgd_a_per_batch_vector_epsilon_is_not_stated_per_episode(plain_run):
    out, log = plain_run
    report = json.loads((out / "privacy_report.json").read_text())
    assert report["run"]["composition"] == "all"
    for agent in AGENTS:
        stated = float(report["agents"][agent]["mechanisms"]["message"]["epsilon"])
        entries = messages(out, agent)
        # every vector of every episode of a batch depends on the unit: 25 x 16 per batch
        assert {e["count"] for e in entries} == {25 * 16}
        one_episode = independent_epsilon([{**entries[0], "count": 25}], "replace_one", 1e-5)
        assert one_episode == pytest.approx(8.0, abs=0.05)
        # every vector of the run composes: 4 training batches and the evaluation's
        assert len(entries) > 4 and stated >= independent_epsilon(entries, "replace_one", 1e-5)
        assert stated > 20 * one_episode
        assert report["agents"][agent]["composed"]["epsilon"] == "inf"  # a plain update
    summary = json.loads((out / "summary.json").read_text())
    assert summary["privacy"]["composition"] == "all"
    assert summary["privacy"]["epsilon"]["message"] > 160
    assert "every release of the run composing" in log and "epsilon 8 " not in log
    assert main(["audit", str(out)]) == 0


def test_the_audit_refuses_a_per_batch_claim_for_a_run_without_dp_sgd(plain_run, tmp_path):
    out, _ = plain_run
    report = json.loads((out / "privacy_report.json").read_text())
    claimed = replace(run_info_from_report(report), composition="batch")
    forged = build_report({a: out / "agents" / a / LEDGER for a in AGENTS}, claimed, out)
    write_report(forged, tmp_path / "privacy_report.json")
    for agent in AGENTS:  # the forged report's figures are those of one batch
        forged_epsilon = float(forged["agents"][agent]["mechanisms"]["message"]["epsilon"])
        first = [e for e in messages(out, agent) if e["batch"] == 1]
        assert forged_epsilon == pytest.approx(
            independent_epsilon(first, "replace_one", 1e-5), rel=0.02)
        assert forged_epsilon < float(report["agents"][agent]["mechanisms"]["message"]["epsilon"])
    (tmp_path / "agents").symlink_to(out / "agents")
    result = audit(tmp_path, composition=composition_of_config)
    assert any(f.where.endswith("run.composition") for f in result.failures), result.failures


def test_one_budget_under_dp_sgd_is_split_stated_per_episode_and_verified(tmp_path, capsys):
    out = tmp_path / "run"
    log = simulate(out, "--non-private", "--epsilon", "8", "--message-epsilon", "6")
    config = json.loads((out / "config.json").read_text())["train"]["privacy"]
    assert config["update_noise_multiplier"] is not None  # --epsilon turned DP-SGD on
    assert set(config["split"]) == {"message", "feedback", "update"}
    assert config["split"]["message"] == pytest.approx(6.0, abs=0.01)
    report = json.loads((out / "privacy_report.json").read_text())
    assert report["run"]["composition"] == "batch" and report["run"]["split"] == config["split"]
    for agent in AGENTS:
        section = report["agents"][agent]
        assert 5.95 < float(section["mechanisms"]["message"]["epsilon"]) <= 6.0 + 1e-6
        assert float(section["composed"]["epsilon"]) <= 8.0 and section["composed"][
            "within_budget"]
        # what composes is one batch: the first batch's releases alone give the same figure
        first = [e for e in read_ledger(out / "agents" / agent / LEDGER) if e["batch"] == 1]
        assert independent_epsilon(first, "replace_one", 1e-5) <= 8.0 + 1e-2
    summary = json.loads((out / "summary.json").read_text())["privacy"]
    assert summary["composed"] <= 8.0 and summary["budget"] == 8.0
    assert "each alone" in log and "of budget 8" in log
    capsys.readouterr()
    assert main(["audit", str(out)]) == 0
    assert "verified" in capsys.readouterr().err


def test_the_private_default_covers_every_release_within_8_per_episode(tmp_path, capsys):
    out = tmp_path / "run"
    log = simulate(out, "--eval-episodes", "256")  # the federated default, shrunk
    config = json.loads((out / "config.json").read_text())
    team, privacy = config["train"]["team"], config["train"]["privacy"]
    assert (team["channel"], team["feedback"], team["recall"]) == ("discrete", False, True)
    assert config["train"]["ppo"]["recall_coef"] == 10.0
    assert (config["share"], config["aggregate_private"]) == ("senders", True)
    assert config["train"]["env_kwargs"]["say"] is False  # no release outside the mechanisms
    assert config["train"]["env_kwargs"]["sites"] == 2
    assert privacy["epsilon"] == 8.0 and set(privacy["split"]) == {"message", "update"}
    report = json.loads((out / "privacy_report.json").read_text())
    assert report["run"]["composition"] == "batch"
    for site in ("s0", "s1"):  # the speakers' whole models averaged, under DP-SGD
        for agent in (f"{site}.{a}" for a in AGENTS):
            composed = report["agents"][agent]["composed"]
            assert float(composed["epsilon"]) <= 8.0 and composed["within_budget"]
        rr = [e for e in messages(out, f"{site}.speaker_0")]
        assert rr and all(e["kind"] == "randomized_response" for e in rr)
        assert not messages(out, f"{site}.listener_0")  # the listener releases no vector
        assert float(report["agents"][f"{site}.listener_0"]["composed"]["epsilon"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["privacy"]["composed"] <= 8.0 and summary["privacy"]["budget"] == 8.0
    assert "ceiling" in summary["baselines"] and summary["of_ceiling"] is not None
    assert summary["ceiling_gap_closed"] > 0.9  # randomized response at 5.33 carries the goal
    assert "composed epsilon 8 of budget 8" in log and "DP ceiling" in log
    assert "privacy plan per episode" in log and "message 5.33, update 2.67; composed 8" in log
    assert report["run"]["utility"]["of_ceiling"] == pytest.approx(summary["of_ceiling"])
    assert "DP ceiling" in (out / "privacy_report.html").read_text()
    capsys.readouterr()
    assert main(["audit", str(out)]) == 0
    assert "verified" in capsys.readouterr().err


def test_a_small_budget_goes_to_the_message_and_the_speakers_train_on_nothing(tmp_path, capsys):
    """``--epsilon 2`` alone: the design table gives DP-SGD no share, so every release is a
    codeword under randomized response at 2 and the speakers' networks stay the public
    warm-up's (the server averages identical copies); the listeners, which release nothing,
    train. The plan, the report and the audit state one episode's releases."""
    from fedcomm.config import FederationConfig
    from fedcomm.models.team import Team

    out = tmp_path / "run"
    log = simulate(out, "--epsilon", "2")
    assert "the agents that release do not train" in log and "message 2; composed 2" in log
    assert "design for epsilon 2" in log and "DP ceiling of this design" in log
    fed = FederationConfig.from_json((out / "config.json").read_text())
    privacy = fed.train.privacy
    assert privacy.update_share == 0 and privacy.update_noise_multiplier is None
    assert fed.train.team.symbols == 3 and fed.train.team.code_warmup > 0
    assert privacy.split == pytest.approx({"message": 2.0}, abs=1e-3)
    for site in ("s0", "s1"):
        entries = read_ledger(out / "agents" / f"{site}.speaker_0" / LEDGER)
        assert entries and {e["mechanism"] for e in entries} == {"message"}
        assert not read_ledger(out / "agents" / f"{site}.listener_0" / LEDGER)
    report = json.loads((out / "privacy_report.json").read_text())
    assert report["run"]["composition"] == "batch"
    assert max(float(a["composed"]["epsilon"]) for a in report["agents"].values()) <= 2.0
    # the speakers' networks are the server's initial module (the first speaker's initial,
    # warmed-up networks, averaged with identical copies ever since); the listeners' are not
    first = {"speaker_0": "s0.speaker_0", "listener_0": "s0.listener_0"}
    for agent in ("s0.speaker_0", "s1.speaker_0", "s0.listener_0"):
        index = fed.spec.agent_ids.index(first[agent.split(".")[1]])
        start = Team.initial(fed.spec, fed.train.team, fed.train.seed, [index]).in_own_site()
        saved = max((out / "agents" / agent).glob("state-r*.pt"))
        final = torch.load(saved, weights_only=True)["team"]
        same = all(torch.equal(v, start.private_state()[k]) for k, v in final.items())
        assert same == agent.endswith("speaker_0"), agent
    capsys.readouterr()
    assert main(["audit", str(out)]) == 0
    assert "verified" in capsys.readouterr().err
