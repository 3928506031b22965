"""Sites: ``N`` copies of one joint environment, stepped as one, each with its own agents.

Federated learning pays where many parties of the same kind each hold a little private
experience: ``N`` factories, ``N`` speaker/listener pairs. ``Sites`` runs ``N`` copies of an
environment, each with its own episodes and, for non-IID sites, its own options (a goal
distribution, fault rates). To every other part of fedcomm it is one environment whose types
have ``N`` times the agents, numbered type by type and, within a type, site by site
(``EnvSpec.site_of_agent``); the router delivers vectors only within a site
(``sim.router.delivery_mask``), so the sites share nothing but what the server aggregates.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from fedcomm.sim.base import Actions, EnvSpec, Obs, Step, VecEnv


def site_seed(seed: int, site: int) -> int:
    """Site ``site``'s episode seed for a batch seeded ``seed``: independent of the others'."""
    digest = hashlib.sha256(f"{seed}/{site}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class Sites(VecEnv):
    """``envs``, one per site, of the same environment (the same agent types and horizon)."""

    def __init__(self, envs: Sequence[VecEnv]) -> None:
        if len(envs) < 2:
            raise ValueError("sites need at least two environments")
        first = envs[0]
        for env in envs[1:]:
            if (env.spec.types, env.spec.episode_length) != (first.spec.types,
                                                            first.spec.episode_length):
                raise ValueError(f"every site must have the same agents and horizon: "
                                 f"{first.spec.to_dict()} against {env.spec.to_dict()}")
        self.envs = tuple(envs)
        self.n = len(envs)
        self.num_envs, self.device = first.num_envs, first.device
        self.scripted_teams = first.scripted_teams
        self.channel_persists = first.channel_persists
        base = first.spec
        self.spec = EnvSpec(base.name, tuple(replace(t, count=t.count * self.n)
                                             for t in base.types),
                            base.episode_length, base.bandwidth, sites=self.n)
        self._site_types = base.types

    # -- between the sites' agents and the whole's -----------------------------------------
    def _join(self, per_site: Sequence[Sequence[Tensor]]) -> list[Tensor]:
        """Each site's per-type tensors ``[B, count, ...]`` -> the whole's
        ``[B, N * count, ...]``."""
        return [torch.cat([site[k] for site in per_site], dim=1)
                for k in range(len(self._site_types))]

    def _split(self, per_type: Sequence[Tensor]) -> list[list[Tensor]]:
        """The whole's per-type tensors -> each site's."""
        chunks = [x.chunk(self.n, dim=1) for x in per_type]
        return [[chunk[s] for chunk in chunks] for s in range(self.n)]

    def _join_rewards(self, rewards: Sequence[Tensor]) -> Tensor:
        """Each site's ``[B, n_site]`` rewards (its agent order) -> ``[B, N * n_site]``."""
        counts = [t.count for t in self._site_types]
        per_type = [r.split(counts, dim=1) for r in rewards]
        return torch.cat(self._join(per_type), dim=1)

    def site_agent(self, site: int, local: int) -> int:
        """The whole's index of agent ``local`` (its site's agent order) of site ``site``."""
        counts = [t.count for t in self._site_types]
        k, start = 0, 0
        while local >= start + counts[k]:
            start += counts[k]
            k += 1
        return sum(counts[:k]) * self.n + site * counts[k] + (local - start)

    # -- the environment -------------------------------------------------------------------
    def reset(self, seed: int | None = None) -> Obs:
        return self._join([env.reset(None if seed is None else site_seed(seed, s))
                           for s, env in enumerate(self.envs)])

    def step(self, actions: Actions) -> Step:
        # the whole's shapes here; each site's environment checks its own actions' range
        if [tuple(a.shape) for a in actions] != [(self.num_envs, t.count)
                                                 for t in self.spec.types]:
            self.check_actions(actions)  # raises, naming what is wrong
        steps = [env.step(a) for env, a in zip(self.envs, self._split(actions))]
        return Step(self._join([s.obs for s in steps]),
                    self._join_rewards([s.reward for s in steps]), steps[0].done)

    def oracle_actions(self) -> Actions:
        return self._join([env.oracle_actions() for env in self.envs])

    def no_comm_actions(self, obs: Obs) -> Actions:
        return self._join([env.no_comm_actions(o) for env, o in zip(self.envs, self._split(obs))])

    def random_actions(self, generator: torch.Generator | None = None) -> Actions:
        return self._join([env.random_actions(generator) for env in self.envs])

    def channel_symbols(self) -> dict[int, tuple[Tensor, int]]:
        return {self.site_agent(s, i): symbol for s, env in enumerate(self.envs)
                for i, symbol in env.channel_symbols().items()}

    def channel_actions(self, posteriors: dict[int, Tensor], obs: Obs) -> Actions:
        return self._join([
            env.channel_actions({i: posteriors[self.site_agent(s, i)]
                                 for i in env.channel_symbols()}, o)
            for s, (env, o) in enumerate(zip(self.envs, self._split(obs)))])


def site_options(sites: int, options: Mapping[str, Any],
                 per_site: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """Each site's environment options: the run's, with each site's own over them."""
    per_site = list(per_site or [])  # checked: at most one per site (sim.registry)
    per_site += [{}] * (sites - len(per_site))
    return [{**options, **own} for own in per_site]
