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
from fedcomm.sim.registry import SITES

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
# Heterogeneous teams keep the shared module per agent: averaged over the factory's 7 agents
# of 3 roles it closed 27% of the gap at 614k steps, kept per agent 37%, and 94.9% and 92.7%
# at 2.5M (seeds 0, 1; BENCHMARKS.md). Nothing of it is released. The platoon, of 3 roles too,
# keeps it per agent as well.
FEDERATED_SHARE = {"factory": "none", "platoon": "none"}
# Without a global graph no route is pruned, and under the platoon's one-sender bandwidth the
# trucks' and cars' vectors, which know nothing of the emergency vehicle, take its slot: kept
# per agent with every route allowed, the platoon closed 16% and 54% of the gap at 5M steps
# (seeds 0, 1); with only the emergency vehicle's routes, which the centralized graph keeps
# strongest, 85.7% and 85.0%, where the centralized trainer closed 66.4% and 62.7%.
FEDERATED_ROUTES = {"platoon": "emergency>truck,emergency>car"}
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


def _private_speaker_listener(fed: FederationConfig) -> FederationConfig:
    """Composed epsilon 8 per episode, every release counted (replace-one, delta 1e-5): the
    goal sent once per episode as one of 4 codewords under randomized response, only on the
    route that needs it; the speaker learns its code from the team reward and a private
    decoder that recalls the goal from its release (``recall``), under DP-SGD; the listener
    releases nothing and shares only what it uses; the ``say`` action, a channel through
    the environment that no mechanism covers, muted. The recall error weighs 10: at 1 the
    code formed early in five runs of six and not in the sixth (15% of the gap at 2M steps),
    since the code's own policy gradient and entropy outweighed it (BENCHMARKS.md). Two sites
    federate: the speakers' whole models, already under DP-SGD, are averaged
    across the sites, so every site's listener learns one code (cross-play), while each
    listener keeps its own networks and releases nothing. 16 batches per round pay a
    deployment's fixed cost per round (Flower's per-message process and polling, about 5 s)
    half as often as 8."""
    t = fed.train
    train = replace(
        t, env_steps=2_000_000, env_kwargs={**t.env_kwargs, "say": False, SITES: 2},
        team=replace(t.team, channel="discrete", symbols=4, release_every=25, accumulate=True,
                     routes="speaker>listener", feedback=False, recall=True),
        ppo=replace(t.ppo, recall_coef=10.0),
        privacy=replace(t.privacy, epsilon=8.0, update_statistics=True,
                        update_shared_share=0.5, update_value_share=0.3))
    return replace(fed, share="senders", aggregate_private=True, batches_per_round=16,
                   train=train)


# The private federated runs: where an environment has one, it is the federated default
# (``fedcomm simulate``, ``fedcomm deploy local``) and ``--non-private`` runs the other.
PRIVATE_FEDERATED = {"speaker_listener": _private_speaker_listener}


def federation_preset(env: str, kind: Kind = "cpu", private: bool = False) -> FederationConfig:
    """The federated run of ``env``: the centralized preset, federated with FedAvg (for
    heterogeneous teams, no part of the shared module averaged: ``FEDERATED_SHARE``, and where
    no global graph prunes, the routes that carry something: ``FEDERATED_ROUTES``); with
    ``private``, the environment's private design where it has one."""
    train = preset(env, kind)
    train.env_steps = FEDERATED_STEPS.get(env, train.env_steps)
    train.team = replace(train.team, feedback_noise_multiplier=0.0, feedback_clip=UNCLIPPED,
                         routes=FEDERATED_ROUTES.get(env, train.team.routes))
    fed = FederationConfig(train=train, share=FEDERATED_SHARE.get(env, "all"))
    return PRIVATE_FEDERATED[env](fed) if private and env in PRIVATE_FEDERATED else fed


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


PRESET_ENVIRONMENTS = (*PRESETS, "mpe2:<name>")
"""The environments whose presets a command's help states: the ports, and any mpe2 one (the
generic preset)."""


def variants(env: str, federated: bool) -> dict[str, TrainConfig | FederationConfig]:
    """The presets a run of ``env`` may start from, by what selects them: ``default`` (the CPU
    preset, a federated run's private one where ``env`` has it), ``the GPU preset`` and, for a
    federated run of an environment with a private default, ``--non-private``."""
    if not federated:
        return {"default": preset(env), "the GPU preset": preset(env, "gpu")}
    private = env in PRIVATE_FEDERATED
    found: dict[str, TrainConfig | FederationConfig] = {
        "default": federation_preset(env, private=private),
        "the GPU preset": federation_preset(env, "gpu", private=private)}
    if private:
        found["--non-private"] = federation_preset(env)
    return found
