"""Training settings per environment that reach their published or measured targets here.

Each environment has a CPU preset and a GPU preset. The GPU preset steps 4x the environments per
episode batch and splits the batch into 4x the minibatches: the minibatch size and the gradient
steps per environment step stay the CPU preset's. On speaker_listener it is about 1M steps behind
the CPU preset early on and level from 6M steps; 8x (4096 environments in 32 minibatches)
needed 1.7x the steps to reach -9.0, since each batch's policy moves a bounded distance
(BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
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


@dataclass(frozen=True)
class PrivateDesign:
    """What ``--epsilon E`` sets in an environment's private default, for budgets from
    ``epsilon`` up to the next row's (``design_for``); flags given with it still override
    each value.

    Parameters
    ----------
    epsilon
        The smallest budget the row is for.
    update_share
        DP-SGD's share of the budget; ``None``: the default split (randomized response 2,
        DP-SGD 1); 0: no DP-SGD, the agents that release do not train
        (``PrivacyConfig.update_share``).
    symbols, num_envs, env_steps
        Codewords, episodes per batch, environment steps.
    """

    epsilon: float
    update_share: float | None
    symbols: int
    num_envs: int
    env_steps: int

    def describe(self) -> str:
        if self.update_share is None:
            split = "randomized response 2 : DP-SGD 1"
        elif self.update_share == 0:
            split = "all to randomized response, no DP-SGD (the speakers do not train)"
        else:
            split = f"{self.update_share:g} of it to DP-SGD"
        return (f"the goal as one of {self.symbols} codewords, the budget {split}, the code "
                f"formed on public observations (--code-warmup {CODE_WARMUP}), "
                f"{self.num_envs:,} episodes per batch, {self.env_steps:,} steps")


CODE_WARMUP = 600  # steps: by then every seed's code tells the goals apart (tests/test_warmup.py)
DEFAULT_EPSILON = 8.0
# speaker_listener's private designs by budget, measured on seeds never used to choose them
# (BENCHMARKS.md, "Small budgets on every seed"). At 8 the default split keeps DP-SGD, so the
# speakers learn from the reward and the server averages what they learn; below, every share
# of the budget DP-SGD takes lowers what the message can carry (the DP ceiling) and buys the
# speaker nothing its public code does not already say, so all of it goes to the message, and
# the listener, which releases nothing, gets more episodes to learn to read a noisier channel.
PRIVATE_DESIGNS: dict[str, tuple[PrivateDesign, ...]] = {
    "speaker_listener": (
        PrivateDesign(6.0, None, 4, 512, 2_000_000),
        PrivateDesign(3.0, 0.0, 3, 1024, 3_000_000),
        PrivateDesign(1.5, 0.0, 3, 1024, 5_000_000),
        PrivateDesign(0.0, 0.0, 3, 1024, 6_000_000),
    ),
}


def design_for(env: str, epsilon: float) -> PrivateDesign:
    """The row of ``env``'s design table for budget ``epsilon``."""
    return next(d for d in PRIVATE_DESIGNS[env] if epsilon >= d.epsilon)


def _private_speaker_listener(fed: FederationConfig,
                              epsilon: float = DEFAULT_EPSILON) -> FederationConfig:
    """Composed ``epsilon`` per episode (8 by default), every release counted (replace-one,
    delta 1e-5): the goal sent once per episode as a codeword under randomized response,
    only on the route that needs it, by a speaker whose code is formed before training on
    public observations (``code_warmup``) and kept by a private decoder that recalls the goal
    from its release (``recall``, weighed 10); the listener releases nothing and shares only
    what it uses; the ``say`` action, a channel through the environment that no mechanism
    covers, muted. The rest follows the budget (``PRIVATE_DESIGNS``). Two sites federate:
    where the speakers train (under DP-SGD), their whole models are averaged across the
    sites, so every site's listener learns one code (cross-play), while each listener keeps
    its own networks. 16 batches per round pay a deployment's fixed cost per round (Flower's
    per-message process and polling, about 5 s) half as often as 8."""
    t, design = fed.train, design_for("speaker_listener", epsilon)
    # DP-SGD's settings (they matter where it has a share: a row's, or --update-share's): the
    # advantages centred by a released statistic, the clip split by networks
    privacy = replace(t.privacy, epsilon=epsilon, update_share=design.update_share,
                      update_statistics=True, update_shared_share=0.5, update_value_share=0.3)
    train = replace(
        t, env_steps=design.env_steps, num_envs=max(design.num_envs, t.num_envs),
        env_kwargs={**t.env_kwargs, "say": False, SITES: 2},
        team=replace(t.team, channel="discrete", symbols=design.symbols, release_every=25,
                     accumulate=True, routes="speaker>listener", feedback=False, recall=True,
                     code_warmup=CODE_WARMUP),
        ppo=replace(t.ppo, recall_coef=10.0), privacy=privacy)
    return replace(fed, share="senders", aggregate_private=True, batches_per_round=16,
                   train=train)


# The private federated runs: where an environment has one, it is the federated default
# (``fedcomm simulate``, ``fedcomm deploy local``) and ``--non-private`` runs the other.
PRIVATE_FEDERATED = {"speaker_listener": _private_speaker_listener}


def federation_preset(env: str, kind: Kind = "cpu", private: bool = False,
                      epsilon: float | None = None) -> FederationConfig:
    """The federated run of ``env``: the centralized preset, federated with FedAvg (for
    heterogeneous teams, no part of the shared module averaged: ``FEDERATED_SHARE``, and where
    no global graph prunes, the routes that carry something: ``FEDERATED_ROUTES``); with
    ``private``, the environment's private design where it has one, for budget ``epsilon``
    (default: its default budget)."""
    train = preset(env, kind)
    train.env_steps = FEDERATED_STEPS.get(env, train.env_steps)
    train.team = replace(train.team, feedback_noise_multiplier=0.0, feedback_clip=UNCLIPPED,
                         routes=FEDERATED_ROUTES.get(env, train.team.routes))
    fed = FederationConfig(train=train, share=FEDERATED_SHARE.get(env, "all"))
    if not (private and env in PRIVATE_FEDERATED):
        return fed
    return PRIVATE_FEDERATED[env](fed, DEFAULT_EPSILON if epsilon is None else epsilon)


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
