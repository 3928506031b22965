"""Training settings per environment that reach their published or measured targets here."""

from __future__ import annotations

from dataclasses import replace

from fedcomm.clients.ppo import PPOConfig
from fedcomm.clients.team import TeamConfig
from fedcomm.server.config import FederationConfig
from fedcomm.train import TrainConfig

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


# Federated runs: the centralized preset with the channel noise as is and no further DP on the
# feedback (noiseless, and clipped far above any gradient seen: the gradient the centralized
# trainer uses), so that the two are compared like with like. speaker_listener trains for 5M
# steps: the `fedcomm simulate` default, which fits in ten minutes here.
FEDERATED_STEPS = {"speaker_listener": 5_000_000}
UNCLIPPED = 1e6


def federation_preset(env: str) -> FederationConfig:
    """The federated run of ``env``: the centralized preset, federated with FedAvg."""
    train = preset(env)
    train.env_steps = FEDERATED_STEPS.get(env, train.env_steps)
    train.team = replace(train.team, feedback_noise_multiplier=0.0, feedback_clip=UNCLIPPED)
    return FederationConfig(train=train)


def preset(env: str) -> TrainConfig:
    """A fresh copy of the preset for ``env`` (a generic one for environments without)."""
    base = PRESETS.get(env, TrainConfig(env=env))
    return replace(base, env_kwargs=dict(base.env_kwargs), team=replace(base.team),
                   ppo=replace(base.ppo))
