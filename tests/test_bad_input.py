"""What a new user meets who types a bad value: every command refuses it before anything starts,
is written or spent, with one line naming the flag and what it accepts, exit code 2 and no
traceback; an unknown flag shows the usage of the subcommand it was given to.

The cases run ``fedcomm.commands.main`` in this process (a refusal comes before anything heavy
starts, so they take milliseconds each), in a fresh folder that must stay empty: no run
directory, no ledger, no key. A few run the real console command as a process.
"""

from __future__ import annotations

import inspect
import math
import subprocess
from pathlib import Path

import pytest

from fedcomm.commands import main
from fedcomm.commands.flags import FED, FEEDBACK_FLAGS, FLAGS, TRAIN, Flag, Number
from fedcomm.sim.mpe2_adapter import Mpe2Env
from fedcomm.sim.registry import ENVIRONMENTS
from tests.harness.processes import FEDCOMM

MPE2_SL = "mpe2:simple_speaker_listener_v4"


def refused(argv: list[str], capsys: pytest.CaptureFixture) -> list[str]:
    """Run ``fedcomm ARGV``; its stderr's lines, once checked to be a refusal: exit code 2, no
    traceback, nothing on stdout, and exactly one ``error:`` line, the last (before it, at most
    the usage of the command that was given the argument)."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2, (argv, out, err)
    assert "Traceback" not in out + err and out == "", (argv, out, err)
    lines = err.splitlines()
    assert lines and lines[-1].startswith("error: "), (argv, err)
    assert sum("error:" in line for line in lines) == 1, (argv, err)
    before = lines[:-1]
    assert not before or (before[0].startswith("usage: fedcomm ")
                          and all(line.startswith(" ") for line in before[1:])), (argv, err)
    return lines


def error_line(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    """The one line of a refused value: nothing else on stderr, not even the usage."""
    lines = refused(argv, capsys)
    assert len(lines) == 1, (argv, lines)
    return lines[0]


@pytest.fixture
def empty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder that is the working directory too, so that anything a command would write
    where it was not asked to (``runs/``, a ledger) shows up in it."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


# (command line, the flag its error names, what else the line says)
BAD_VALUES = [
    (["simulate", "--env-steps", "-100"], "--env-steps", "an integer >= 1"),
    (["simulate", "--env-steps", "0"], "--env-steps", "an integer >= 1"),
    (["simulate", "--env-steps", "100"], "--env-steps", "give at least 12800"),
    (["simulate", "--num-envs", "0"], "--num-envs", "an integer >= 1"),
    (["simulate", "--num-envs", "2.5"], "--num-envs", "an integer >= 1"),
    (["simulate", "--num-envs", "many"], "--num-envs", "an integer >= 1"),
    (["simulate", "--eval-episodes", "0"], "--eval-episodes", "an integer >= 1"),
    (["simulate", "--epsilon", "0"], "--epsilon", "a finite number > 0"),
    (["simulate", "--epsilon", "-1"], "--epsilon", "a finite number > 0"),
    (["simulate", "--epsilon", "nan"], "--epsilon", "a finite number > 0"),
    (["simulate", "--epsilon", "1e-9"], "--epsilon", "too small for this run"),
    (["simulate", "--delta", "1"], "--delta", "in (0, 1)"),
    (["simulate", "--seed", "-1"], "--seed", "from 0 to 4294967295"),
    (["simulate", "--server-momentum", "1"], "--server-momentum", "in [0, 1)"),
    (["simulate", "--agent-max-epsilon", "0"], "--agent-max-epsilon", "> 0, or inf"),
    (["train", "--env", "factory", "--env-opt", "n_actuator=4"], "--env-opt",
     "did you mean n_actuators=4?"),
    (["train", "--env", MPE2_SL, "--env-opt", "say=false"], "--env-opt", "use mute=speaker"),
    (["simulate", "--env", "factory", "--env-opt", "n_actuators=0"], "--env-opt",
     "n_actuators=0: expected an integer >= 1"),
    (["simulate", "--env-opt", "say=no"], "--env-opt", "expected true or false"),
    (["simulate", "--env", "platoon", "--env-opt", "bandwidth=0"], "--env-opt",
     "an integer >= 1 or null"),
    (["simulate", "--env", "warehouse"], "--env", "known: speaker_listener, factory"),
    (["simulate", "--minibatches", "32", "--num-envs", "16"], "--minibatches",
     "at most --num-envs"),
    (["simulate", "--non-private", "--release-every", "5"], "--release-every",
     "--accumulate"),
    (["simulate", "--channel", "gaussian"], "--recall", "--non-private"),
    (["simulate", "--routes", "speaker>nobody"], "--routes", "speaker, listener"),
    (["simulate", "--device", "tpu", "--preset", "cpu"], "--device", "auto, cpu, cuda"),
    (["simulate", "--env", "factory", "--share", "all", "--aggregation", "krum",
      "--faulty-agents", "5"], "--faulty-agents", "krum"),
    (["simulate", "--secure-aggregation"], "--secure-aggregation", "at least 3"),
    (["simulate", "--sites", "3", "--secure-aggregation", "--aggregation", "median"],
     "--secure-aggregation", "aggregation median needs every agent's update"),
    (["simulate", "--sites", "3", "--secure-aggregation", "--max-update-norm", "2"],
     "--max-update-norm", "each agent clips its own to --client-dp-clip"),
    (["simulate", "--update-shared-share", "0.6", "--update-value-share", "0.5"],
     "--update-value-share", "sum below 1"),
    (["simulate", "--resume", "runs/old", "--env-steps", "100000"], "--resume",
     "--env-steps, --out would not be taken"),
    (["deploy", "local", "--resume", "runs/old", "--non-private"], "--resume",
     "--out, --non-private would not be taken"),
    (["deploy", "local", "--num-envs", "0"], "--num-envs", "an integer >= 1"),
    (["deploy", "local", "--env", "factory", "--env-opt", "fault_prob=2"], "--env-opt",
     "from 0 to 1"),
    (["eval", "run", "--episodes", "0"], "--episodes", "an integer >= 1"),
    (["eval", "run", "--env", "factory", "--env-opt", "n_actuator=4"], "--env-opt",
     "n_actuators"),
    (["sim", "serve", "--tokens", "tokens.json", "--num-envs", "0"], "--num-envs", ">= 1"),
    (["sim", "serve", "--tokens", "tokens.json", "--port", "70000"], "--port",
     "from 0 to 65535"),
    (["sim", "serve", "--tokens", "tokens.json", "--step-timeout", "0"], "--step-timeout",
     "> 0"),
    (["sim", "serve", "--tokens", "tokens.json", "--episode-key", "episode.key", "--env",
      "factory", "--env-opt", "n_actuator=4"], "--env-opt", "n_actuators"),
    (["sim", "tokens", "--env", "factory", "--env-opt", "n_sensors=0", "--out", "t.json"],
     "--env-opt", ">= 1"),
    (["deploy", "secrets", "--env", MPE2_SL, "--env-opt", "max_cycles=0", "--out", "s"],
     "--env-opt", ">= 1"),
    (["agent", "--sim", "127.0.0.1:1", "--agent-id", "a", "--token", "t", "--checkpoint",
      "team.pt", "--rounds", "0"], "--rounds", ">= 1"),
    (["agent", "--sim", "127.0.0.1:1", "--agent-id", "a", "--token", "t", "--checkpoint",
      "team.pt", "--connect-timeout", "-1"], "--connect-timeout", ">= 0"),
    (["agent", "--sim", "127.0.0.1:1", "--agent-id", "a", "--token", "t", "--checkpoint",
      "team.pt", "--epsilon-budget", "0"], "--epsilon-budget", "> 0"),
]


@pytest.mark.parametrize(("argv", "flag", "says"), BAD_VALUES,
                         ids=[" ".join(argv) for argv, _, _ in BAD_VALUES])
def test_a_bad_value_is_one_line_naming_the_flag_and_nothing_is_written(
        argv: list[str], flag: str, says: str, empty: Path,
        capsys: pytest.CaptureFixture) -> None:
    out = ["--out", "run"] if argv[0] in ("simulate", "train") or argv[:2] == ["deploy",
                                                                               "local"] else []
    line = error_line([*argv, *out], capsys)
    assert flag in line and says in line, line
    assert list(empty.iterdir()) == [], "a refused command wrote something"


def outside(number: Number) -> list[str]:
    """Values just outside what ``number`` accepts, and the ones no flag accepts."""
    values = ["nan", "x"]
    if math.isfinite(number.low):
        values.append(f"{number.low:g}" if number.low_open else f"{number.low - 1:g}")
    if math.isfinite(number.high):
        values.append(f"{number.high:g}" if number.high_open else f"{number.high + 1:g}")
    if not number.inf:
        values.append("inf")
    if number.integer:
        values.append("1.5")
    return values


NUMERIC = [(root, flag) for root in (TRAIN, FED) for flag in FLAGS[root]
           if isinstance(flag.options.get("type"), Number)]


@pytest.mark.parametrize(("root", "flag"), NUMERIC, ids=[f.names[0] for _, f in NUMERIC])
def test_every_numeric_flag_refuses_what_is_outside_its_range(root: str, flag: Flag,
                                                              empty: Path,
                                                              capsys: pytest.CaptureFixture
                                                              ) -> None:
    number = flag.options["type"]
    assert math.isfinite(number.low), f"{flag.names[0]} has no lower bound"
    for command in (["simulate"], ["train"]) if root == TRAIN else (["simulate"],):
        if command == ["train"] and flag in FEEDBACK_FLAGS:  # federated only
            continue
        for value in outside(number):
            line = error_line([*command, flag.names[0], value, "--out", "run"], capsys)
            assert f"argument {flag.names[0]}" in line and str(number) in line, line
    assert list(empty.iterdir()) == []


UNKNOWN = [
    (["simulate", "--bogus"], "usage: fedcomm simulate", None),
    (["train", "--num-env", "4"], "usage: fedcomm train", "--num-envs"),
    (["deploy", "local", "--epsilom", "4"], "usage: fedcomm deploy local", "--epsilon"),
    (["sim", "serve", "--tokens", "t.json", "--bogus"], "usage: fedcomm sim serve", None),
    (["eval", "run", "--episode", "3"], "usage: fedcomm eval", "--episodes"),
]


@pytest.mark.parametrize(("argv", "usage", "closest"), UNKNOWN,
                         ids=[" ".join(argv) for argv, _, _ in UNKNOWN])
def test_an_unknown_flag_shows_the_usage_of_its_subcommand(argv: list[str], usage: str,
                                                           closest: str | None, empty: Path,
                                                           capsys: pytest.CaptureFixture
                                                           ) -> None:
    lines = refused(argv, capsys)
    assert lines[0].startswith(usage), lines[0]
    assert "unrecognized arguments" in lines[-1] and argv[-1] in lines[-1]
    assert (f"did you mean {closest}?" in lines[-1]) if closest else "did you" not in lines[-1]
    assert list(empty.iterdir()) == []


@pytest.mark.parametrize("cls", [*ENVIRONMENTS.values(), Mpe2Env], ids=lambda c: c.__name__)
def test_every_environment_declares_exactly_the_options_it_takes(cls: type) -> None:
    """``--env-opt`` is checked against the declarations: they must be the constructor's
    keyword arguments, with its defaults."""
    parameters = dict(inspect.signature(cls.__init__).parameters)
    for name in ("self", "env_name", "num_envs", "device"):
        parameters.pop(name, None)
    assert list(cls.options) == list(parameters)
    for key, option in cls.options.items():
        default = parameters[key].default
        assert option.default == default, key
        if default not in (None, ()):
            assert option.check(key, default) == default, key


@pytest.mark.integration  # three processes of the console command, a few seconds each
@pytest.mark.parametrize(("argv", "flag"), [
    (["simulate", "--num-envs", "0"], "--num-envs"),
    (["train", "--env", "factory", "--env-opt", "n_actuator=4"], "--env-opt"),
    (["train", "--env", MPE2_SL, "--env-opt", "say=false"], "--env-opt"),
    (["simulate", "--eval-episodes", "0"], "--eval-episodes"),
])
def test_the_console_command_refuses_before_it_starts(argv: list[str], flag: str,
                                                      tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.run([*FEDCOMM, *argv, "--out", str(out)], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"error: argument {flag}: "), line
    assert list(tmp_path.iterdir()) == []
