"""The interface every joint environment implements.

Environments are batched: one object steps ``num_envs`` independent episodes as tensors with the
batch dimension first. Episodes have a fixed horizon and start together, so a rollout is one
``reset`` followed by ``episode_length`` calls to ``step`` (an "episode batch").

Agents are grouped by type. Agents of one type share observation and action spaces and are
numbered contiguously, so "agent index" order is type order: per-type tensors concatenated along
the agent dimension give the global agent order.
"""

from __future__ import annotations

import json
import math
import secrets
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any, ClassVar

import torch
from torch import Tensor


@dataclass(frozen=True)
class AgentType:
    """A kind of agent: how many there are, what each observes, how many actions it has."""

    name: str
    count: int
    obs_dim: int
    n_actions: int


@dataclass(frozen=True)
class EnvSpec:
    """Static description of a joint environment, enough to build the agents' models."""

    name: str
    types: tuple[AgentType, ...]
    episode_length: int
    # At most this many senders per environment and step get their vector delivered (None: all).
    bandwidth: int | None = None
    # Copies of the joint environment (``sim.sites``): each type's agents are numbered site by
    # site, ``count // sites`` to a site, and vectors stay within their site.
    sites: int = 1
    # The agents' ids where they are not the default ones: one site of many seen on its own
    # (``site``), whose agents keep their run-wide ids. Not part of the spec's dict.
    ids: tuple[str, ...] | None = None

    @property
    def n_agents(self) -> int:
        return sum(t.count for t in self.types)

    @cached_property
    def agent_ids(self) -> tuple[str, ...]:
        """``speaker_0``; with sites, ``s3.speaker_0``: the site, then the id within it."""
        if self.ids is not None:
            return self.ids
        if self.sites == 1:
            return tuple(f"{t.name}_{i}" for t in self.types for i in range(t.count))
        return tuple(f"s{i // (t.count // self.sites)}.{t.name}_{i % (t.count // self.sites)}"
                     for t in self.types for i in range(t.count))

    @cached_property
    def site_of_agent(self) -> tuple[int, ...]:
        """The site of each agent, in agent order."""
        return tuple(i // (t.count // self.sites) for t in self.types for i in range(t.count))

    @cached_property
    def type_of_agent(self) -> tuple[int, ...]:
        """Type index of each agent, in agent order."""
        return tuple(k for k, t in enumerate(self.types) for _ in range(t.count))

    @property
    def site_size(self) -> int:
        """The agents of one site (every site has the same)."""
        return self.n_agents // self.sites

    def site_members(self, site: int) -> tuple[int, ...]:
        """The agents of site ``site``, in its own agent order (type by type)."""
        return tuple(i for i, s in enumerate(self.site_of_agent) if s == site)

    def site(self, site: int) -> EnvSpec:
        """Site ``site`` as an environment of its own: one copy's agents (``site_members``,
        numbered from 0 in that order) under their run-wide ids. Vectors never leave a site,
        so its agents and the simulator's copy of it need nothing of the other sites."""
        if not 0 <= site < self.sites:
            raise ValueError(f"no site {site}: {self.name} has sites 0..{self.sites - 1}")
        if self.sites == 1:
            return self
        types = tuple(replace(t, count=t.count // self.sites) for t in self.types)
        return EnvSpec(self.name, types, self.episode_length, self.bandwidth,
                       ids=tuple(self.agent_ids[i] for i in self.site_members(site)))

    def type_starts(self) -> tuple[int, ...]:
        """Agent index of each type's first agent."""
        starts, s = [], 0
        for t in self.types:
            starts.append(s)
            s += t.count
        return tuple(starts)

    def select(self, per_type: list[Tensor], agents: tuple[int, ...], dim: int = 1
               ) -> list[Tensor]:
        """Keep only ``agents``' entries of per-type tensors (agent axis ``dim``), dropping the
        types none of them has. This is how each party gets its own observations, nothing else.
        """
        starts = self.type_starts()
        out = []
        for k, x in enumerate(per_type):
            rows = [i - starts[k] for i in agents if self.type_of_agent[i] == k]
            if rows:
                index = torch.tensor(rows, device=x.device)
                out.append(x if len(rows) == x.shape[dim] else x.index_select(dim, index))
        return out

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "types": [vars(t) for t in self.types],
            "episode_length": self.episode_length,
            "bandwidth": self.bandwidth,
            **({"sites": self.sites} if self.sites > 1 else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> EnvSpec:
        return cls(
            name=d["name"],
            types=tuple(AgentType(**t) for t in d["types"]),
            episode_length=int(d["episode_length"]),
            bandwidth=d.get("bandwidth"),
            sites=int(d.get("sites", 1)),
        )


@dataclass(frozen=True)
class EnvOption:
    """One option an environment takes (``--env-opt KEY=VALUE``): its kind and range, declared
    beside the environment so that a bad one is refused by name, with what to type, before
    anything is built. ``low`` and ``high`` bound a number (inclusive); ``null`` accepts
    ``null`` (for example, no limit); ``many`` accepts a list of ``kind`` too."""

    kind: type  # bool, int, float or str
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    null: bool = False
    many: bool = False

    @property
    def metavar(self) -> str:
        """What to type after ``KEY=``: ``N``, ``X``, ``true|false``, ``NAME``."""
        name = {bool: "true|false", int: "N", float: "X"}.get(self.kind, "NAME")
        return f"{name}[,{name}...]" if self.many else name

    def accepts(self) -> str:
        """The values it takes, in words."""
        if self.kind is bool:
            text = "true or false"
        elif self.kind in (int, float):
            text = "an integer" if self.kind is int else "a number"
            if self.low is not None and self.high is not None:
                text += f" from {self.low:g} to {self.high:g}"
            elif self.low is not None:
                text += f" >= {self.low:g}"
            elif self.high is not None:
                text += f" <= {self.high:g}"
        else:
            text = "a name"
        if self.many:
            text += " or a list of them (comma-separated or JSON)"
        return text + (" or null" if self.null else "")

    def check(self, key: str, value: Any) -> Any:
        """``value`` as the environment takes it, or ``ValueError`` saying what it accepts."""
        if value is None and self.null:
            return None
        if self.many:
            items = ([_typed(item) for item in value.split(",")] if isinstance(value, str)
                     else value)
            if isinstance(items, list) and items:
                return [self._one(key, value, item) for item in items]
        return self._one(key, value, value)

    def _one(self, key: str, given: Any, value: Any) -> Any:
        ok = isinstance(value, self.kind) and not (self.kind is not bool
                                                  and isinstance(value, bool))
        if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if ok and self.kind in (int, float):
            ok = (math.isfinite(value) and (self.low is None or value >= self.low)
                  and (self.high is None or value <= self.high))
        if ok and self.kind is str:
            ok = bool(value.strip())
        if not ok:
            raise ValueError(f"{key}={shown(given)}: expected {self.accepts()}")
        return value


def _typed(text: str) -> Any:
    """One item of a comma-separated option as JSON reads it (``0.8``, ``true``), else the
    text (a name)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def shown(value: Any) -> str:
    """An option's value as it would be typed: a name bare, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


Obs = list[Tensor]
"""Observations, one tensor per agent type, each ``[B, count, obs_dim]``."""

Actions = list[Tensor]
"""Actions, one integer tensor per agent type, each ``[B, count]``."""


@dataclass
class Step:
    obs: Obs
    reward: Tensor  # [B, n_agents]
    done: bool  # the episode batch has reached its horizon


class VecEnv(ABC):
    """A batch of ``num_envs`` episodes of one joint environment."""

    spec: EnvSpec
    num_envs: int
    device: torch.device
    # The scripted reference teams this environment can play: the baselines a run reports.
    # ``random`` needs nothing of the environment; the other two need its rules.
    scripted_teams: ClassVar[tuple[str, ...]] = ("random", "no_comm", "oracle")
    # The keyword arguments of ``__init__`` after ``num_envs`` and ``device``, declared (what
    # ``--env-opt`` may set); ``tests/test_bad_input.py`` checks they match the signature.
    options: ClassVar[Mapping[str, EnvOption]] = {}
    # For an option another environment has and this one lacks: what to type instead.
    instead: ClassVar[Mapping[str, str]] = {}
    # The option non-IID sites draw per site from a named distribution (``--site-dist``), and
    # its length: a weight per category (None: nothing to draw).
    site_distribution: ClassVar[tuple[str, int] | None] = None

    @abstractmethod
    def reset(self, seed: int | None = None) -> Obs:
        """Start a new episode batch; with a seed, the batch is reproducible."""

    @abstractmethod
    def step(self, actions: Actions) -> Step:
        """Advance every episode by one step."""

    @abstractmethod
    def oracle_actions(self) -> Actions:
        """A scripted team that sees the full state: the upper reference."""

    @abstractmethod
    def no_comm_actions(self, obs: Obs) -> Actions:
        """A scripted team in which each agent acts on its own observation only."""

    def scripted_actions(self, policy: str, obs: Obs,
                         generator: torch.Generator | None = None) -> Actions:
        """A scripted reference team's actions: one of ``scripted_teams``."""
        if policy not in self.scripted_teams:
            raise ValueError(f"{self.spec.name} has no scripted {policy!r} team; it has "
                             f"{', '.join(self.scripted_teams)}")
        if policy == "oracle":
            return self.oracle_actions()
        if policy == "no_comm":
            return self.no_comm_actions(obs)
        if policy == "random":
            return self.random_actions(generator)
        raise ValueError(f"no scripted team {policy!r}: use oracle, no_comm or random")

    # -- the DP ceiling: a scripted team that communicates through a mechanism ------------------
    def channel_symbols(self) -> dict[int, tuple[Tensor, int]]:
        """What the scripted senders would tell their receivers this step: for each sending
        agent, ``([B] symbol, number of values)``; empty where the environment has no scripted
        channel team."""
        return {}

    #: Whether a sender's symbol holds for the whole episode (a receiver's posterior
    #: accumulates over releases) or is drawn afresh each step.
    channel_persists: ClassVar[bool] = False

    def channel_actions(self, posteriors: dict[int, Tensor], obs: Obs) -> Actions:
        """The scripted receivers' Bayes actions given each sender's posterior ``[B, values]``
        over its symbol (the oracle's with the posteriors in place of the truth)."""
        raise NotImplementedError(f"{self.spec.name} has no scripted channel team")

    def random_actions(self, generator: torch.Generator | None = None) -> Actions:
        return [
            torch.randint(t.n_actions, (self.num_envs, t.count), generator=generator,
                          device=self.device)
            for t in self.spec.types
        ]

    @property
    def checks_action_range(self) -> bool:
        """Whether ``step`` checks the actions' range: on the host, where it is free. On an
        accelerator it would make every step wait for the device; actions from outside the
        process reach an environment through the simulator service, which checks them on the
        host before they move."""
        return self.device.type == "cpu"

    def check_actions(self, actions: Actions) -> None:
        """Fail loudly on actions of the wrong shape or range, before they corrupt the state."""
        if len(actions) != len(self.spec.types):
            raise ValueError(f"expected actions for {len(self.spec.types)} agent types, "
                             f"got {len(actions)}")
        for t, a in zip(self.spec.types, actions):
            if a.shape != (self.num_envs, t.count):
                raise ValueError(f"actions for {t.name!r}: expected shape "
                                 f"{(self.num_envs, t.count)}, got {tuple(a.shape)}")
            if (self.checks_action_range and a.numel()
                    and (int(a.min()) < 0 or int(a.max()) >= t.n_actions)):
                raise ValueError(f"actions for {t.name!r} must lie in [0, {t.n_actions})")


def one_hot(index: Tensor, n: int) -> Tensor:
    """``float32`` one-hot rows of ``index`` (values in ``[0, n)``). Unlike
    ``torch.nn.functional.one_hot`` it never reads the indices on the host to check their range,
    on any device, so the step loop can be checked for host reads on the CPU."""
    return (index[..., None] == torch.arange(n, device=index.device)).to(torch.float32)


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """An environment's own random stream; unseeded, it draws no number from torch's global
    generator, which the process's model initialisation may be relying on."""
    g = torch.Generator(device=device)
    g.manual_seed(seed if seed is not None else secrets.randbits(62))
    return g
