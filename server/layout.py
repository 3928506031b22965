"""What the server knows of the arrays each agent replies with, from the run's own models.

The global module of round 1 is the initial team's shared module (``comm.*``; with
``share="role"`` one copy of it per type, ``role.<name>.*``) and, when the run averages them,
each type's private networks (``type.<name>.*``). An agent replies with exactly
the parts of the shared module it sends (every part with ``share="all"``; with ``"used"`` those
it shares with another agent, ``releases.schedule.shared_parts``; none with ``"none"``) and, with
``aggregate_private``, its own type's networks (``releases.schedule.averages_private``): the
same keys, shapes and dtypes as the global module's, whatever it trained. The server builds
this from ``fedcomm.models`` (never from the agents' code), so a reply can be checked against
it, key by key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from fedcomm.config import FederationConfig
from fedcomm.models.team import Team
from fedcomm.protocol.round import TYPE, key_group, module_arrays, shared_prefix
from fedcomm.releases.schedule import averages_private, initial_routes, shared_parts


def initial_arrays(fed: FederationConfig) -> dict[str, torch.Tensor]:
    """The global module of round 1: the run's initial team's shared module (and, when the run
    averages them, each type's private networks as its first agent starts with them)."""
    spec, train = fed.spec, fed.train
    team = Team.initial(spec, train.team, train.seed)
    routes = initial_routes(train)
    private = {}
    for k, kind in enumerate(spec.types):
        first = spec.type_of_agent.index(k)
        if averages_private(spec, fed.share, fed.aggregate_private, routes, first):
            private[kind.name] = team.subteam([first]).type_state()
    if fed.share != "role":
        return module_arrays(team.shared_state(), private)
    arrays = module_arrays({}, private)
    for kind in spec.types:
        arrays |= module_arrays(team.shared_state(), role=kind.name)
    return arrays


@dataclass(frozen=True)
class ArraySpec:
    """The shape and dtype one array of a reply must have."""

    shape: tuple[int, ...]
    dtype: np.dtype


@dataclass(frozen=True)
class ReplyLayout:
    """Per agent index, the arrays its reply carries (in the global module's order)."""

    agents: tuple[dict[str, ArraySpec], ...]
    type_names: tuple[str, ...]  # each agent's type name, by index

    @classmethod
    def of(cls, fed: FederationConfig, arrays: Mapping[str, object]) -> ReplyLayout:
        """The layout of a run whose global module is ``arrays`` (any round's: the keys,
        shapes and dtypes never change)."""
        spec = fed.spec
        specs = {k: ArraySpec(tuple(np.shape(v)), _dtype(v)) for k, v in arrays.items()}
        names = tuple(spec.types[k].name for k in spec.type_of_agent)
        routes = initial_routes(fed.train)
        agents = []
        for index, name in enumerate(names):
            prefix = shared_prefix(name if fed.share == "role" else None)
            parts = set(shared_parts(spec, fed.share, routes, index))
            own = f"{TYPE}{name}." if averages_private(
                spec, fed.share, fed.aggregate_private, routes, index) else None
            agents.append({k: s for k, s in specs.items()
                           if (k.startswith(prefix)
                               and k[len(prefix):].partition(".")[0] in parts)
                           or (own is not None and k.startswith(own))})
        return cls(tuple(agents), names)

    def carriers(self) -> dict[str, int]:
        """How many agents may carry each key group."""
        out: dict[str, int] = {}
        for expected in self.agents:
            for group in {key_group(k) for k in expected}:
                out[group] = out.get(group, 0) + 1
        return out


def _dtype(value: object) -> np.dtype:
    if isinstance(value, torch.Tensor):
        return torch.empty((), dtype=value.dtype).numpy().dtype
    dtype = getattr(value, "dtype", None)
    return np.dtype(dtype) if dtype is not None else np.asarray(value).dtype
