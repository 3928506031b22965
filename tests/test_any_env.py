"""Any environment the registry accepts trains, evaluates, saves and plots end to end, with the
scripted baselines it has; nothing trained is lost to a failure after training."""

import json
from dataclasses import replace

import pytest

from fedcomm.baselines import EvalResult, baseline_summary, evaluate_baselines, evaluate_scripted
from fedcomm.commands import main
from fedcomm.config import TrainConfig
from fedcomm.learning.evaluate import muted_types
from fedcomm.models.team import load_team
from fedcomm.modes import centralized as train_module
from fedcomm.modes.centralized import train
from fedcomm.sim.base import EnvSpec
from fedcomm.sim.registry import make_env

MPE2_TINY = ["--num-envs", "8", "--env-steps", "800", "--eval-episodes", "16", "--quiet"]


def test_an_mpe2_environment_without_scripted_teams_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--env", "mpe2:simple_reference_v3", "--out", str(out),
                 *MPE2_TINY]) == 0
    for name in ("summary.json", "team.pt", "learning_curve.png"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["baselines"]) == {"random"}
    assert summary["baselines"]["random"]["episodes"] == 16
    assert summary["gap_closed"] is None
    assert summary["missing_baselines"] == ["no_comm", "oracle"]
    err = " ".join(capsys.readouterr().err.split())  # undo the console's line wrapping
    assert ("gap closed: n/a (mpe2:simple_reference_v3 has no scripted no_comm/oracle team)"
            in err)

    assert main(["eval", str(out), "--episodes", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["episodes"] == 8


def test_a_muted_run_plays_the_original_mpe2_environment_as_readme_writes(tmp_path, capsys):
    """The default private run mutes the speaker's say: `fedcomm eval RUN --env mpe2:...`
    mutes it there too (and says so on stderr), and an explicit --env-opt mute= is kept."""
    out = tmp_path / "run"
    assert main(["train", "--env", "speaker_listener", "--env-opt", "say=false", "--out",
                 str(out), *MPE2_TINY]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--env", "mpe2:simple_speaker_listener_v4", "--episodes",
                 "4", "--json"]) == 0
    got = capsys.readouterr()
    assert json.loads(got.out)["episodes"] == 4
    assert "muting speaker as the run did (--env-opt mute=speaker)" in got.err
    assert main(["eval", str(out), "--env", "mpe2:simple_speaker_listener_v4", "--env-opt",
                 "mute=listener", "--episodes", "4"]) == 2
    assert "does not match mpe2:simple_speaker_listener_v4" in capsys.readouterr().err


def muted(spec: EnvSpec, name: str) -> EnvSpec:
    return replace(spec, types=tuple(replace(t, n_actions=1) if t.name == name else t
                                     for t in spec.types))


def test_muted_types_are_the_only_difference_they_name():
    port = make_env("speaker_listener", 1).spec
    assert muted_types(muted(port, "speaker"), port) == ["speaker"]
    assert muted_types(port, port) == []
    assert muted_types(muted(port, "speaker"), make_env("factory", 1).spec) == []
    other = replace(port, types=(replace(port.types[0], obs_dim=7), port.types[1]))
    assert muted_types(muted(other, "speaker"), port) == []


def test_a_failed_final_evaluation_leaves_the_trained_team_on_disk(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(train_module, "evaluate_team", fail)
    cfg = TrainConfig(env="factory", num_envs=8, env_steps=400, eval_every=0, eval_episodes=10)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        train(cfg, tmp_path, progress=False)
    assert load_team(tmp_path).spec.name == "factory"


def test_baselines_are_those_an_environment_has():
    port = evaluate_baselines("factory", 8)
    assert list(port) == ["random", "no_comm", "oracle"]
    assert baseline_summary(EvalResult(0.0, 0.0, 8), port)["missing_baselines"] == []
    assert list(evaluate_baselines("mpe2:simple_reference_v3", 2)) == ["random"]
    with pytest.raises(ValueError, match="no scripted 'oracle' team; it has random"):
        evaluate_scripted("mpe2:simple_reference_v3", "oracle", 2)


def test_gap_closed_is_null_where_it_is_undefined():
    def res(x: float) -> EvalResult:
        return EvalResult(x, 0.0, 10)

    assert baseline_summary(res(2.0), {"random": res(0), "no_comm": res(1), "oracle": res(3)}
                            )["gap_closed"] == 0.5
    assert baseline_summary(res(2.0), {"no_comm": res(1), "oracle": res(1)})["gap_closed"] is None
    only_random = baseline_summary(res(2.0), {"random": res(0)})
    assert only_random["gap_closed"] is None
    assert only_random["missing_baselines"] == ["no_comm", "oracle"]
