"""Evaluation of a trained team: greedy episodes on any environment with the same spec.

Trained teams act greedily and their vectors carry the channel noise they were trained with:
the privacy mechanism is part of execution, not only of training.
"""

from __future__ import annotations

import torch

from fedcomm.baselines import EvalResult, batches
from fedcomm.learning.rollout import collect
from fedcomm.learning.transport import LocalTransport
from fedcomm.models.team import Team
from fedcomm.sim.base import EnvSpec
from fedcomm.sim.registry import make_env


def check_compatible(trained: EnvSpec, target: EnvSpec) -> None:
    """A team runs on another environment only if agents, observations and actions line up."""
    if trained.types != target.types:
        def show(spec: EnvSpec) -> str:
            return ", ".join(f"{t.count} {t.name} (obs {t.obs_dim}, actions {t.n_actions})"
                             for t in spec.types)

        raise ValueError(f"the team was trained on {trained.name} [{show(trained)}], which does "
                         f"not match {target.name} [{show(target)}]")


def muted_types(trained: EnvSpec, target: EnvSpec) -> list[str]:
    """The agent types a team was trained with muted (one action) that ``target`` lets act:
    what ``mute`` must name for the team to play it. Empty where nothing else differs but
    that, or where something else differs too."""
    if len(trained.types) != len(target.types):
        return []
    muted = []
    for mine, theirs in zip(trained.types, target.types):
        same = (mine.name, mine.count, mine.obs_dim) == (theirs.name, theirs.count,
                                                         theirs.obs_dim)
        if not same:
            return []
        if mine.n_actions == 1 and theirs.n_actions > 1:
            muted.append(mine.name)
        elif mine.n_actions != theirs.n_actions:
            return []
    return muted


def evaluate_team(team: Team, env_name: str, episodes: int, seed: int = 0,
                  batch: int = 1000, env_kwargs: dict | None = None,
                  greedy: bool = True) -> EvalResult:
    """The team's returns on ``env_name``, played on the device the team is on."""
    device = team.local_index.device
    returns = []
    generator = torch.Generator(device).manual_seed(seed)
    was_training = team.training
    team.eval()
    for i, n in enumerate(batches(episodes, batch)):
        env = make_env(env_name, n, device, **(env_kwargs or {}))
        check_compatible(team.spec, env.spec)
        returns.append(collect(team, LocalTransport(env), seed=seed + i * batch,
                               generator=generator, greedy=greedy).episode_return())
    team.train(was_training)
    return EvalResult.of(torch.cat(returns))
