"""The centralized trainer and the command line: run directories, evaluation, learning."""

import json

import pytest

from fedcomm.baselines import EVAL_SEED, evaluate_scripted
from fedcomm.commands import main
from fedcomm.config import TrainConfig
from fedcomm.learning.evaluate import evaluate_team
from fedcomm.models.team import load_team
from fedcomm.modes.centralized import train

TINY = ["--env-steps", "2000", "--num-envs", "16", "--eval-episodes", "20", "--quiet"]


def test_train_writes_a_complete_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--env", "speaker_listener", "--out", str(out), *TINY]) == 0
    for name in ("config.json", "metrics.jsonl", "summary.json", "team.pt",
                 "learning_curve.png"):
        assert (out / name).stat().st_size > 0, name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and all({"iteration", "env_steps", "return_mean"} <= set(r) for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["baselines"]) == {"random", "no_comm", "oracle", "ceiling"}
    assert summary["final"]["episodes"] == 20
    config = json.loads((out / "config.json").read_text())
    assert TrainConfig.from_dict(config).num_envs == 16

    capsys.readouterr()
    assert main(["eval", str(out), "--episodes", "30", "--seed", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["episodes"] == 30 and {"return_mean", "return_se", "episodes"} <= set(result)
    # the scripted teams on the very episodes the team played: the same seeds and batches
    assert {b["episodes"] for b in result["baselines"].values()} == {30}
    low, high = (result["baselines"][k]["return_mean"] for k in ("no_comm", "oracle"))
    assert result["gap_closed"] == pytest.approx((result["return_mean"] - low) / (high - low))


def test_a_loaded_checkpoint_acts_like_the_trained_team(tmp_path):
    cfg = TrainConfig(env="factory", num_envs=8, env_steps=400, eval_episodes=10)
    result = train(cfg, tmp_path, progress=False)
    team = load_team(tmp_path)
    # Same seed, same weights: the same episodes, channel noise and actions, to the bit.
    assert evaluate_team(team, "factory", 10, seed=EVAL_SEED) == result.final


def test_eval_refuses_an_environment_the_team_cannot_play(tmp_path, capsys):
    main(["train", "--env", "speaker_listener", "--out", str(tmp_path), *TINY])
    capsys.readouterr()
    assert main(["eval", str(tmp_path), "--env", "factory", "--episodes", "5"]) == 2
    assert "does not match factory" in capsys.readouterr().err


def test_command_line_errors_are_clear(tmp_path, capsys):
    assert main(["train", "--env", "warehouse", "--out", str(tmp_path), *TINY]) == 2
    assert "unknown environment 'warehouse'" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nothing")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--env-opt", "no_equals_sign"])


def final_returns(communicate: bool, seeds: tuple[int, ...], base) -> list[float]:
    returns = []
    for seed in seeds:
        cfg = TrainConfig(env="factory", env_kwargs=SMALL_FACTORY, num_envs=256,
                          env_steps=LEARN_STEPS, seed=seed, eval_every=0, eval_episodes=500)
        cfg.team.noise_multiplier, cfg.team.communicate = 0.2, communicate
        cfg.ppo.lr = 3e-3
        returns.append(train(cfg, base / f"{communicate}-{seed}", progress=False)
                       .final.return_mean)
    return returns


SMALL_FACTORY = {"n_sensors": 1, "n_processors": 1, "n_actuators": 2, "n_products": 2}
LEARN_STEPS = 200_000


@pytest.mark.integration  # trains: about 45 s
def test_communication_is_learned_and_the_ablation_cannot_learn_it(tmp_path):
    """Seed-averaged: the trained team beats the best no-communication team by a wide margin;
    the same trainer with the channel cut does not."""
    no_comm = evaluate_scripted("factory", "no_comm", 500, env_kwargs=SMALL_FACTORY).return_mean
    oracle = evaluate_scripted("factory", "oracle", 500, env_kwargs=SMALL_FACTORY).return_mean
    with_comm = sum(final_returns(True, (0, 1), tmp_path)) / 2
    without = sum(final_returns(False, (0, 1), tmp_path)) / 2
    gap = oracle - no_comm
    assert with_comm > no_comm + 0.5 * gap, (with_comm, no_comm, oracle)
    assert without < no_comm + 0.1 * gap, (without, no_comm, oracle)
