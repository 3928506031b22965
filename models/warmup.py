"""A discrete channel's code formed before training, from public observations only.

Under a small budget a sender's code can settle on giving two things it sees one codeword, a
fixed point the reward seldom leaves: a codeword that says nothing gives neither side a
gradient (BENCHMARKS.md, "Small budgets"). The recall objective (``TeamConfig.recall``) needs
only what a sender sees, not what happened in an episode, so it can be trained before any
episode exists: on the observations the environment starts from under a public seed, each
sender's features, encoder and recall decoder learn a code that tells apart what it sees.
No agent's data is read, so nothing is released or accounted, and every party computes the
same warmed-up team (``Team.initial`` calls ``warm_up_code``): the server's initial module is
the agents'. Training then refines the code under its privacy mechanisms, or leaves it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fedcomm.sim.base import EnvSpec, Obs

if TYPE_CHECKING:
    from fedcomm.models.team import Team

WARMUP_SEED = 2_000_000_007  # public: neither a training batch's seed nor an evaluation one
WARMUP_EPISODES = 256
WARMUP_LR = 1e-2
# The code's logits are read at this scale, not ``TeamConfig.code_scale`` (3): a softmax of
# standardised logits scaled by 3 is nearly one-hot from the start, its gradient nearly zero,
# and codes stay where they began (often one codeword for everything).
WARMUP_SCALE = 1.0


def public_observations(spec: EnvSpec, episodes: int = WARMUP_EPISODES,
                        seed: int = WARMUP_SEED) -> Obs:
    """Per agent type ``[1, episodes, count, obs_dim]``: the first observations of
    ``episodes`` episodes of ``spec``'s environment at its default options, reset with the
    public ``seed`` (a run of several sites draws each site's agents their own episodes)."""
    from fedcomm.sim.registry import make_env  # the environments load on first use

    env = make_env(spec.name, episodes * spec.sites)
    base, obs = env.spec.types, env.reset(seed)
    out = []
    for kind, own, o in zip(spec.types, base, obs):
        if own.obs_dim != kind.obs_dim:
            raise ValueError(f"the public observations of {spec.name!r} have {own.obs_dim} "
                             f"features for {kind.name!r}, the run's agents {kind.obs_dim}")
        out.append(o.reshape(episodes, kind.count, kind.obs_dim)[None])
    return out


def warm_up_code(team: Team, steps: int, lr: float = WARMUP_LR,
                 scale: float = WARMUP_SCALE) -> list[float]:
    """``steps`` Adam steps of ``team``'s senders on their recall error alone, over public
    observations (``public_observations``); returns the error before and after. The team's
    other networks get no gradient and are left as they were."""
    if team.recall is None:
        raise ValueError("a code warm-up trains the senders' recall decoders: it needs "
                         "recall (--recall) on a discrete channel")
    obs = [o.to(team.local_index.device) for o in public_observations(team.spec)]
    params = [p for p in team.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    errors = []
    for step in range(steps + 1):
        probs = code_probs(team, obs, scale)
        error = codeword_recall_error(team, obs, probs)
        if step in (0, steps):
            errors.append(error.item())
        if step == steps:
            break
        optimizer.zero_grad(set_to_none=True)
        error.backward()
        optimizer.step()
    for p in params:
        p.grad = None
    return errors


def code_probs(team: Team, obs: Obs, scale: float) -> Tensor:
    """``[T, B, n_local, K]`` each local sender's codeword distribution, its logits read at
    ``scale`` (no randomized response: the warm-up releases nothing)."""
    encoded = team.comm.encode(team.encode_steps(obs), team.local_types)
    logits = team.channel.code_logits(encoded) * (scale / team.cfg.code_scale)
    return torch.softmax(logits, dim=-1).unflatten(0, obs[0].shape[:2])


def codeword_recall_error(team: Team, obs: Obs, probs: Tensor) -> Tensor:
    """The senders' recall error with each one's decoder reading every codeword it may
    release, in expectation over the release ``probs`` (``[1, B, n_local, K]``; ``obs`` per
    type ``[1, B, count, obs_dim]``). From the release distribution alone (``Team.
    recall_error``) a code whose likely codewords coincide for two things it sees can still
    be recalled, by probabilities that differ slightly; from the codeword, it cannot."""
    k, total = probs.shape[-1], probs.new_zeros(())
    for net, o, p, s in zip(team.recall, obs, probs.split(team.counts, dim=2),
                            team.speakers().split(team.counts)):
        each = net(torch.eye(k, device=p.device)[:, None].expand(-1, o.shape[2], -1))
        gaps = (each - o[0][:, None]).pow(2).mean(dim=-1)  # [B, K, count]
        error = (gaps * p[0].transpose(-1, -2)).sum(dim=1)  # [B, count]
        total = total + (error.mean(dim=0) * s.to(error.dtype)).sum()
    return total
