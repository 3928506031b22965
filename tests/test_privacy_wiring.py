"""Privacy where the agents release: the noise they add, the ledger written before a release,
its survival of a kill, and a trained run's report and audit."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedcomm.commands import main
from fedcomm.config import PPOConfig, TeamConfig, TrainConfig
from fedcomm.learning.feedback import privatize
from fedcomm.models.team import Team
from fedcomm.privacy.audit import audit
from fedcomm.privacy.config import PrivacyConfig
from fedcomm.privacy.ledger import read_ledger
from fedcomm.releases.account import LEDGER, AgentPrivacy
from fedcomm.releases.plan import Schedule, calibrate
from fedcomm.releases.schedule import update_releases
from fedcomm.sim.registry import make_env

SPEC = make_env("factory", 1, n_sensors=1, n_processors=1, n_actuators=1).spec
ALL_ROUTES = torch.ones(3, 3, dtype=torch.bool)


def relative_error(a: float, b: float) -> float:
    return abs(a - b) / b


def test_released_vectors_carry_the_declared_noise_and_never_exceed_the_clip_before_it():
    cfg = TeamConfig(hidden=16, comm_dim=16, clip=0.7, noise_multiplier=0.8)
    team = Team(SPEC, cfg).subteam([0])
    feats = 50 * torch.randn(4096, 1, cfg.hidden)  # far beyond the clip
    clean = team.speak(feats)
    released = clean + team.channel.draw(clean, torch.Generator().manual_seed(1))
    assert clean.norm(dim=-1).max() <= cfg.clip * (1 + 1e-6)
    noise = released - clean
    # 65,536 coordinates: the sample variance is within 3% of its mean with overwhelming odds
    assert relative_error(noise.var().item(), (0.8 * 0.7) ** 2) < 0.03
    assert abs(noise.mean().item()) < 4 * 0.56 / math.sqrt(noise.numel())


def test_released_feedback_carries_the_declared_noise_and_each_episode_is_clipped():
    grads = 10 * torch.randn(25, 512, 3, 8)  # [T, B, senders, D]
    clipped = privatize(grads, 0.5, 0.0)
    per_episode = clipped.permute(1, 2, 0, 3).flatten(2).norm(dim=-1)  # [B, senders]
    assert per_episode.max() <= 0.5 * (1 + 1e-6)
    sent = privatize(grads, 0.5, 1.3, torch.Generator().manual_seed(2))
    assert relative_error((sent - clipped).var().item(), (1.3 * 0.5) ** 2) < 0.03


def test_outside_tests_the_noise_comes_from_a_cryptographically_seeded_stream(tmp_path):
    def agent(seeded: bool, name: str) -> AgentPrivacy:
        return AgentPrivacy("sensor_0", 0, SPEC, TeamConfig(), PrivacyConfig(),
                            tmp_path / name / LEDGER, {"run": 1}, seeded_noise=seeded)

    one, two = agent(False, "a"), agent(False, "b")
    assert one.noise is not None and one.noise.initial_seed() != two.noise.initial_seed()
    assert one.ledger.noise == "secure"
    seeded = agent(True, "c")
    assert seeded.noise is None and seeded.ledger.noise == "seeded"  # the party's own stream


FACTORY_1 = {"n_sensors": 1, "n_processors": 1, "n_actuators": 1}


def calibrated(privacy: PrivacyConfig, federated: bool = True, batches: int = 10
               ) -> TrainConfig:
    train = TrainConfig(env="factory", env_kwargs=FACTORY_1, privacy=privacy)
    return calibrate(train, Schedule(federated, batches))


def test_under_dp_sgd_the_calibrated_vectors_of_one_episode_cost_at_most_the_target(tmp_path):
    train = calibrated(PrivacyConfig(message_epsilon=8.0, update_epsilon=4.0))
    privacy = AgentPrivacy("sensor_0", 0, SPEC, train.team, train.privacy, tmp_path / LEDGER,
                           {"run": 1})
    messages = [r for r in privacy.batch_releases(ALL_ROUTES) if r.mechanism == "message"]
    assert messages[0].count == SPEC.episode_length
    spent = privacy.account.budget.epsilon_of(messages)
    assert 7.9 < spent <= 8.0 and train.privacy.split["message"] == pytest.approx(spent)


def test_an_update_share_fixes_dp_sgd_at_that_fraction_of_the_budget():
    shared = calibrated(PrivacyConfig(epsilon=4.0, update_share=0.2))
    fixed = calibrated(PrivacyConfig(epsilon=4.0, update_epsilon=0.8))
    assert shared.privacy.split == fixed.privacy.split
    assert shared.privacy.split["update"] == pytest.approx(0.8, abs=1e-3)
    assert shared.privacy.update_noise_multiplier == fixed.privacy.update_noise_multiplier


@pytest.mark.parametrize("kwargs", [{"update_share": 0.2},
                                    {"epsilon": 4.0, "update_share": 0.2, "update_epsilon": 1.0},
                                    {"epsilon": 4.0, "update_share": 1.0}])
def test_an_update_share_needs_a_budget_of_which_it_is_a_fraction(kwargs):
    with pytest.raises(ValueError, match="update_share"):
        PrivacyConfig(**kwargs)


def test_without_dp_sgd_the_target_covers_every_vector_of_the_run(tmp_path):
    """Plain PPO trains the sender's networks on every episode: all later vectors of every
    episode depend on it, so the target is calibrated for all the run's vectors."""
    under_dp = calibrated(PrivacyConfig(message_epsilon=8.0, update_epsilon=4.0))
    plain = calibrated(PrivacyConfig(message_epsilon=8.0), batches=10)
    privacy = AgentPrivacy("sensor_0", 0, SPEC, plain.team, plain.privacy, tmp_path / LEDGER,
                           {"run": 1}, composition="all", episodes=plain.num_envs)
    message = next(r for r in privacy.batch_releases(ALL_ROUTES) if r.mechanism == "message")
    assert message.count == SPEC.episode_length * plain.num_envs  # every episode's vectors
    budget = privacy.account.budget
    assert 7.9 < budget.epsilon_of([message.with_count(10 * message.count)]) <= 8.0
    one_episode = budget.epsilon_of([message.with_count(SPEC.episode_length)])
    assert one_episode < 0.1  # one episode's share of the run's
    assert plain.team.noise_multiplier > 50 * under_dp.team.noise_multiplier


KILLED_AFTER_WRITING = """
import os, signal, sys, torch
from pathlib import Path
from fedcomm.releases.account import AgentPrivacy
from fedcomm.models.team import TeamConfig
from fedcomm.privacy.config import PrivacyConfig
from fedcomm.sim.registry import make_env
spec = make_env("factory", 1, n_sensors=1, n_processors=1, n_actuators=1).spec
privacy = AgentPrivacy("sensor_0", 0, spec, TeamConfig(), PrivacyConfig(unit="history"),
                       Path(sys.argv[1]), {"run": 1})
releases = privacy.batch_releases(torch.ones(3, 3, dtype=torch.bool))
assert privacy.allows(releases, batch=0)
privacy.charge(releases, round=1, batch=0)
os.kill(os.getpid(), signal.SIGKILL)  # after the ledger write, before anything is sent
"""


@pytest.mark.integration  # a Python process
def test_an_agent_killed_between_ledger_write_and_send_still_counts_the_release(tmp_path):
    ledger = tmp_path / LEDGER
    proc = subprocess.run([sys.executable, "-c", KILLED_AFTER_WRITING, str(ledger)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    restarted = AgentPrivacy("sensor_0", 0, SPEC, TeamConfig(), PrivacyConfig(unit="history"),
                             ledger, {"run": 1})
    written = [e["mechanism"] for e in restarted.ledger.entries]
    assert written == ["message", "feedback"]
    assert restarted.spent().composed > 0
    # and the next batch composes with it
    before = restarted.spent().composed
    restarted.charge(restarted.batch_releases(ALL_ROUTES), round=2, batch=1)
    assert restarted.spent().composed > before


@pytest.fixture
def trained_run(tmp_path: Path) -> Path:
    out = tmp_path / "run"
    args = ["train", "--env", "factory", "--env-opt", "n_sensors=1", "--env-opt",
            "n_processors=1", "--env-opt", "n_actuators=1", "--num-envs", "16", "--env-steps",
            str(3 * 16 * 25), "--eval-episodes", "16", "--hidden", "16", "--quiet",
            "--message-epsilon", "8", "--out", str(out)]
    assert main(args) == 0
    return out


@pytest.mark.integration  # trains: about 30 s
def test_a_trained_run_reports_its_privacy_and_the_report_audits(trained_run, capsys):
    report = json.loads((trained_run / "privacy_report.json").read_text())
    assert (trained_run / "privacy_report.html").stat().st_size > 0
    for agent in SPEC.agent_ids:
        section = report["agents"][agent]
        assert section["ledger"]["entries"] == 3  # one message release per iteration
        assert 7.9 < float(section["mechanisms"]["message"]["epsilon"]) <= 8.0
    summary = json.loads((trained_run / "summary.json").read_text())
    assert summary["privacy"]["epsilon"]["message"] <= 8.0
    assert audit(trained_run).ok
    capsys.readouterr()
    assert main(["audit", str(trained_run)]) == 0
    assert "verified" in "".join(capsys.readouterr())
    os.remove(trained_run / "privacy_report.html")
    assert main(["report", str(trained_run)]) == 0
    assert (trained_run / "privacy_report.html").exists()


@pytest.mark.integration  # trains: about 15 s
def test_a_tampered_ledger_fails_the_audit_and_the_audit_says_where(trained_run, capsys):
    ledger = trained_run / "agents" / "processor_0" / LEDGER
    lines = ledger.read_text().splitlines()
    entry = json.loads(lines[1])
    lines[1] = json.dumps(replace_value(entry, "noise_multiplier", 99.0))
    ledger.write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    assert main(["audit", str(trained_run)]) == 1
    out = "".join(capsys.readouterr())
    assert "processor_0" in out and "FAILED" in out
    assert read_ledger(trained_run / "agents" / "sensor_0" / LEDGER)  # the others untouched


def replace_value(entry: dict, key: str, value: object) -> dict:
    return {**entry, key: value}


def test_a_run_that_cannot_fit_its_budget_is_refused_before_anything_is_written(tmp_path,
                                                                                capsys):
    out = tmp_path / "run"
    args = ["train", "--env", "factory", "--env-opt", "n_sensors=1", "--env-opt",
            "n_processors=1", "--env-opt", "n_actuators=1", "--num-envs", "16", "--env-steps",
            str(6 * 16 * 25), "--quiet", "--noise-multiplier", "3", "--privacy-unit",
            "history", "--epsilon-budget", "7", "--out", str(out)]
    assert main(args) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1
    assert lines[0].startswith("error: this run cannot fit its privacy budget 7")
    assert "planned message" in "".join(lines) and "--epsilon" in "".join(lines)
    assert not out.exists()


def test_every_mechanism_can_be_set_by_a_target_epsilon_and_costs_at_most_that(tmp_path):
    train = calibrated(PrivacyConfig(message_epsilon=8.0, feedback_epsilon=2.0,
                                     update_epsilon=3.0))
    team, cfg, ppo = train.team, train.privacy, PPOConfig()
    privacy = AgentPrivacy("actuator_0", 2, SPEC, team, cfg, tmp_path / LEDGER, {"run": 1})
    releases = privacy.batch_releases(ALL_ROUTES, update_releases(cfg, ppo))
    by_mechanism = {r.mechanism: r for r in releases}
    assert by_mechanism["feedback"].count == SPEC.n_agents - 1  # every other agent reaches it
    assert by_mechanism["update"].sample_rate == 1 / ppo.minibatches
    for name, target in (("message", 8.0), ("feedback", 2.0), ("update", 3.0)):
        spent = privacy.account.budget.epsilon_of([by_mechanism[name]])
        assert 0.98 * target < spent <= target, name


def test_a_noise_multiplier_and_a_target_epsilon_for_the_same_mechanism_are_refused(capsys):
    assert main(["train", "--noise", "0.5", "--message-epsilon", "8", "--quiet"]) == 2
    assert "give --noise-multiplier or --message-epsilon, not both" in "".join(capsys.readouterr())


@pytest.mark.parametrize("flags", [["simulate", "--update-noise", "2"],  # the default's budget
                                   ["simulate", "--non-private", "--epsilon", "8", "--noise",
                                    "0.5"],
                                   ["train", "--epsilon", "8", "--noise", "0.5"]])
def test_a_noise_multiplier_under_one_budget_is_refused_not_replaced(flags, capsys):
    assert main([*flags, "--quiet"]) == 2
    err = "".join(capsys.readouterr())
    assert "one budget calibrates every mechanism" in err and "to fix its share" in err
