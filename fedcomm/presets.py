"""Training settings per environment that reach their published or measured targets here.

Each environment has a CPU preset and a GPU preset. The GPU preset steps 4x the environments per
episode batch and splits the batch into 4x the minibatches: the minibatch size and the gradient
steps per environment step stay the CPU preset's. On speaker_listener it is about 1M steps behind
the CPU preset early on and level from 6M steps; 8x (4096 environments in 32 minibatches)
needed 1.7x the steps to reach -9.0, since each batch's policy moves a bounded distance
(BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

from fedcomm.config import FederationConfig, PPOConfig, TeamConfig, TrainConfig

Kind = Literal["cpu", "gpu"]

PRESETS: dict[str, TrainConfig] = {
    "speaker_listener": TrainConfig(
        env="speaker_listener", num_envs=512, env_steps=15_000_000,
        ppo=PPOConfig(lr=3e-3)),
    # Low noise: at sigma 0.5 a norm-1 vector in 16 dims carries about 2.6 bits, less than a
    # processor must send about two machines' orders (log2 9 = 3.2 bits).
    "factory": TrainConfig(
        env="factory", num_envs=512, env_steps=2_500_000, team=TeamConfig(noise_multiplier=0.2),
        ppo=PPOConfig(lr=3e-3)),
    "platoon": TrainConfig(
        env="platoon", num_envs=512, env_steps=5_000_000, ppo=PPOConfig(lr=3e-3)),
}

# What the GPU preset changes: environments per batch, minibatches, learning rate.
GPU_PRESETS: dict[str, dict] = {
    "speaker_listener": {"num_envs": 2048, "minibatches": 16, "lr": 3e-3},
    "factory": {"num_envs": 2048, "minibatches": 16, "lr": 3e-3},
    "platoon": {"num_envs": 2048, "minibatches": 16, "lr": 3e-3},
}


# Federated runs: the centralized preset with the channel noise as is and no further DP on the
# feedback (noiseless, and clipped far above any gradient seen: the gradient the centralized
# trainer uses), so that the two are compared like with like. speaker_listener trains for 5M
# steps: the `fedcomm simulate` default, which fits in ten minutes here.
FEDERATED_STEPS = {"speaker_listener": 5_000_000}
UNCLIPPED = 1e6
PRIVATE_FEEDBACK_CLIP = 0.05  # the feedback clip where a budget calibrates the feedback noise


def preset_kind(choice: str, device: str) -> Kind:
    """``auto``: the GPU preset where the run's device is a GPU, else the CPU preset."""
    if choice in ("cpu", "gpu"):
        return choice  # type: ignore[return-value]
    if choice != "auto":
        raise ValueError(f"preset must be auto, cpu or gpu, got {choice!r}")
    from fedcomm.device import resolve_device

    return "gpu" if resolve_device(device).type == "cuda" else "cpu"


def federation_preset(env: str, kind: Kind = "cpu") -> FederationConfig:
    """The federated run of ``env``: the centralized preset, federated with FedAvg."""
    train = preset(env, kind)
    train.env_steps = FEDERATED_STEPS.get(env, train.env_steps)
    train.team = replace(train.team, feedback_noise_multiplier=0.0, feedback_clip=UNCLIPPED)
    return FederationConfig(train=train)


def preset(env: str, kind: Kind = "cpu") -> TrainConfig:
    """A fresh copy of the ``kind`` preset for ``env`` (a generic one for environments
    without)."""
    base = PRESETS.get(env, TrainConfig(env=env))
    cfg = replace(base, env_kwargs=dict(base.env_kwargs), team=replace(base.team),
                  ppo=replace(base.ppo))
    if kind == "gpu":
        gpu = GPU_PRESETS.get(env, {"num_envs": 4 * cfg.num_envs,
                                    "minibatches": 4 * cfg.ppo.minibatches, "lr": cfg.ppo.lr})
        cfg = replace(cfg, num_envs=gpu["num_envs"],
                      ppo=replace(cfg.ppo, minibatches=gpu["minibatches"], lr=gpu["lr"]))
    return cfg
