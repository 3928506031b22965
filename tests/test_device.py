"""``--device``: every tensor of a rollout on one device, a step loop that never waits for it,
GPU presets, checkpoints that load anywhere.

The CPU tests cover the code a GPU runs: ``DeviceDiscipline`` counts, on the CPU, the calls that
would make the loop wait for an accelerator. The tests marked ``cuda`` run the same paths on a
GPU and are reported as skipped where torch sees none.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fedcomm.commands import build_parser, main, train_config_from_args
from fedcomm.config import PPOConfig, TeamConfig, TrainConfig
from fedcomm.device import resolve_device
from fedcomm.learning.evaluate import evaluate_team
from fedcomm.learning.feedback import privatize, receiver_feedback
from fedcomm.learning.importance import communication_importance
from fedcomm.learning.ppo import ValueNorm, compute_targets, make_optimizer, ppo_update
from fedcomm.learning.rollout import collect, party_rollout
from fedcomm.learning.transport import LocalTransport
from fedcomm.models.team import Team, load_team
from fedcomm.modes.centralized import train
from fedcomm.presets import PRESETS, preset
from fedcomm.protocol.auth import generate_tokens, write_tokens
from fedcomm.sim.base import VecEnv
from fedcomm.sim.factory import factory_spec
from fedcomm.sim.registry import make_env
from tests.device_checks import DeviceDiscipline
from tests.harness.processes import fedcomm

CUDA = torch.cuda.is_available()
NEEDS_GPU = [pytest.mark.cuda,
             pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: torch sees none")]


def cuda(test: Callable) -> Callable:
    for mark in NEEDS_GPU:
        test = mark(test)
    return test


TEAMS = {  # each environment with the model variants whose steps differ
    "speaker_listener": TeamConfig(),
    "factory": TeamConfig(encoder="superposition"),
    "platoon": TeamConfig(recurrent=True, accumulate=True),
}


def test_device_names() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if CUDA else "cpu")
    for bad in ("gpu", "cuda:x", "mps", ""):
        with pytest.raises(ValueError, match="auto, cpu, cuda or cuda:N"):
            resolve_device(bad)
    if CUDA:
        with pytest.raises(ValueError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
    else:
        with pytest.raises(ValueError, match=r"sees no CUDA device.*--device cpu"):
            resolve_device("cuda")


def test_cli_refuses_a_missing_gpu(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    if CUDA:
        pytest.skip("torch sees a GPU here")
    for argv in (["train", "--device", "cuda", "--out", str(tmp_path / "t")],
                 ["eval", str(tmp_path), "--device", "cuda:1"],
                 ["train", "--device", "tpu", "--out", str(tmp_path / "t")]):
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 3 and "sees no CUDA device" in err and "'tpu'" in err
    assert not (tmp_path / "t").exists()


def _discipline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Take the accelerator's path on the CPU: the environments skip the range check, which
    reads the actions on the host (the simulator service checks them before they move)."""
    monkeypatch.setattr(VecEnv, "checks_action_range", property(lambda self: False))


@pytest.mark.integration  # 5-30 s per environment
@pytest.mark.parametrize("env_name", sorted(TEAMS))
def test_step_loop_never_waits_for_the_device(env_name: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    _discipline(monkeypatch)
    env = make_env(env_name, 16, "cpu")
    torch.manual_seed(0)
    team = Team(env.spec, TEAMS[env_name])
    generator = torch.Generator("cpu").manual_seed(0)
    with DeviceDiscipline() as checks:
        rollout = collect(team, LocalTransport(env), seed=1, generator=generator)
    assert checks.syncs == [] and checks.undeviced == []
    value_norm, optimizer = ValueNorm(env.spec.n_agents), make_optimizer(team.parameters(), 1e-3)
    with DeviceDiscipline() as checks:  # the update too: fused Adam, no per-minibatch reads
        targets = compute_targets(rollout, PPOConfig(), value_norm)
        ppo_update(team, optimizer, rollout, PPOConfig(minibatches=2), targets, generator)
    assert checks.syncs == [] and checks.undeviced == []


@pytest.mark.integration  # about 20 s
def test_a_partys_feedback_and_the_importance_stay_on_the_device(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """What a federated party does after its rollout (feedback, clipping and noise, the update
    with received feedback) and the importance measurement at the end of training."""
    _discipline(monkeypatch)
    env = make_env("factory", 8, "cpu")
    torch.manual_seed(0)
    whole = Team(env.spec)
    generator = torch.Generator("cpu").manual_seed(0)
    rollout = collect(whole, LocalTransport(env), seed=1, generator=generator)
    party = whole.subteam([6])  # an actuator: it hears sensors and processors
    mine = party_rollout(whole, rollout, 6)
    value_norm, optimizer = ValueNorm(1), make_optimizer(party.parameters(), 1e-3)
    cfg = PPOConfig(minibatches=2)
    with DeviceDiscipline() as checks:
        targets = compute_targets(mine, cfg, value_norm)
        sent = privatize(receiver_feedback(party, mine, targets, cfg), 1.0, 0.5, generator)
        ppo_update(party, optimizer, mine, cfg, targets, generator, feedback=sent[:, :, [6]])
        communication_importance(whole, rollout)
    assert checks.syncs == [] and checks.undeviced == []


def test_discipline_catches_what_it_looks_for() -> None:
    """The checks above could not pass by seeing nothing."""
    x = torch.arange(4.0, device="cpu")
    with DeviceDiscipline() as checks:
        x.sum().item()
        _ = x[x > 1]
        torch.zeros(3)
        int(x.max())
    assert checks.syncs == ["aten._local_scalar_dense.default", "aten.index.Tensor",
                            "aten._local_scalar_dense.default"]
    assert checks.undeviced == ["zeros"]


def test_gpu_presets_keep_the_learning_per_step() -> None:
    """More environments per batch, the same minibatch size and gradient steps per step."""
    for env in PRESETS:
        cpu, gpu = preset(env, "cpu"), preset(env, "gpu")
        assert gpu.num_envs >= 4 * cpu.num_envs
        assert gpu.num_envs // gpu.ppo.minibatches == cpu.num_envs // cpu.ppo.minibatches
        assert gpu.ppo.epochs == cpu.ppo.epochs and gpu.env_steps == cpu.env_steps
        assert replace(gpu, num_envs=cpu.num_envs, ppo=cpu.ppo) == cpu


def test_preset_choice() -> None:
    def cfg(*argv: str) -> TrainConfig:
        return train_config_from_args(build_parser().parse_args(
            ["train", "--env", "speaker_listener", *argv]))

    assert cfg("--preset", "gpu").num_envs == 2048
    assert cfg("--preset", "gpu").ppo.minibatches == 16
    assert cfg("--device", "cpu").num_envs == 512  # auto: the CPU preset on the CPU
    # Options still win over either preset: 1000 is no preset's value, so an ignored flag
    # would leave 512 or 2048.
    assert 1000 not in {preset(env, kind).num_envs for env in PRESETS for kind in ("cpu", "gpu")}
    for kind in ("cpu", "gpu"):
        assert cfg("--preset", kind, "--num-envs", "1000").num_envs == 1000
        assert cfg("--preset", kind, "--minibatches", "5").ppo.minibatches == 5
    assert cfg().num_envs == (2048 if CUDA else 512)
    assert cfg("--device", "cpu").device == "cpu"


def test_simulation_shares_one_gpu_among_the_agents() -> None:
    from fedcomm.modes.simulation import backend_config  # Flower: not needed by the other tests

    gpu = backend_config(3, torch.device("cuda"))
    assert gpu["client_resources"]["num_gpus"] * 3 <= gpu["init_args"]["num_gpus"] == 1
    assert gpu["init_args"]["num_cpus"] == 3
    cpu = backend_config(3, torch.device("cpu"))
    assert cpu["client_resources"]["num_gpus"] == cpu["init_args"]["num_gpus"] == 0


def test_checkpoints_load_onto_any_device(tmp_path: Path) -> None:
    Team(make_env("factory", 4).spec).save(tmp_path / "team.pt")
    loaded = load_team(tmp_path, "meta")
    assert {p.device.type for p in loaded.parameters()} == {"meta"}


# -- on a GPU ---------------------------------------------------------------------------------
@cuda
@pytest.mark.parametrize("env_name", sorted(TEAMS))
def test_gpu_step_loop_is_asynchronous(env_name: str) -> None:
    """CUDA's own sync detector: any synchronising call in the loop raises."""
    env = make_env(env_name, 64, "cuda")
    team = Team(env.spec, TEAMS[env_name]).cuda()
    generator = torch.Generator("cuda").manual_seed(0)
    transport = LocalTransport(env)
    collect(team, transport, seed=0, generator=generator)  # warm-up: lazy initialisation
    torch.cuda.set_sync_debug_mode("error")
    try:
        rollout = collect(team, transport, seed=1, generator=generator)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    tensors = [*rollout.obs, *rollout.actions, rollout.noise, rollout.rewards, rollout.values]
    assert {t.device.type for t in tensors} == {"cuda"}


@pytest.mark.integration  # trains 3M steps
@cuda
def test_gpu_training_checkpoint_evaluates_the_same_on_the_cpu(tmp_path: Path) -> None:
    cfg = replace(preset("speaker_listener", "gpu"), env_steps=3_000_000, device="cuda",
                  eval_every=0)
    result = train(cfg, tmp_path / "run", progress=False)
    assert result.summary.device.startswith("cuda")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["device"] == "cuda"
    on_cpu = evaluate_team(load_team(tmp_path / "run"), "speaker_listener", 1000, seed=5)
    on_gpu = evaluate_team(load_team(tmp_path / "run", "cuda"), "speaker_listener", 1000,
                           seed=5)
    se = (on_cpu.return_se**2 + on_gpu.return_se**2) ** 0.5
    assert abs(on_cpu.return_mean - on_gpu.return_mean) < 3 * se
    assert on_gpu.return_mean > result.baselines["no_comm"].return_mean  # it learned


@pytest.mark.integration  # simulator and agent processes
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=NEEDS_GPU)])
def test_agents_and_simulator_on_a_device(device: str, tmp_path: Path, sim_process) -> None:
    """``fedcomm sim serve --device`` and one ``fedcomm agent --device`` per agent: two
    training rounds over gRPC, each party's tensors on its device, the wire on the host."""
    options = {"n_sensors": 1, "n_processors": 1, "n_actuators": 1, "episode_length": 3}
    spec = factory_spec(**options)
    torch.manual_seed(0)
    Team(spec, TeamConfig(hidden=8, comm_dim=4)).save(tmp_path / "team.pt")
    write_tokens(tmp_path / "tokens.json", generate_tokens(spec.agent_ids))
    address = sim_process("--env", "factory", *(a for k, v in options.items()
                                                 for a in ("--env-opt", f"{k}={v}")),
                          "--num-envs", "32", "--tokens", str(tmp_path / "tokens.json"),
                          "--device", device)
    agents = [fedcomm("agent", "--sim", address, "--agent-id", agent, "--device", device,
                      "--tokens", str(tmp_path / "tokens.json"), "--rounds", "2",
                      "--checkpoint", str(tmp_path / "team.pt"),
                      "--ledger", str(tmp_path / f"{agent}.ledger.jsonl"),
                      "--save", str(tmp_path / f"{agent}.pt"))
              for agent in spec.agent_ids]
    outputs = [proc.communicate(timeout=120)[0] for proc in agents]
    assert [proc.returncode for proc in agents] == [0, 0, 0], outputs
    assert all(out.count("round") == 2 for out in outputs), outputs
    trained = load_team(tmp_path / f"{spec.agent_ids[0]}.pt").state_dict()
    before = load_team(tmp_path / "team.pt").subteam([0]).state_dict()
    assert any(not torch.equal(trained[k], before[k]) for k in before)  # it trained
