"""Environments by name: the ports, and ``mpe2:<name>`` for any original mpe2 environment."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fedcomm.sim.base import VecEnv
from fedcomm.sim.factory import Factory
from fedcomm.sim.platoon import Platoon
from fedcomm.sim.speaker_listener import SpeakerListener

ENVIRONMENTS: dict[str, Callable[..., VecEnv]] = {
    "speaker_listener": SpeakerListener,
    "factory": Factory,
    "platoon": Platoon,
}

MPE2_PREFIX = "mpe2:"


def make_env(name: str, num_envs: int, device: str | torch.device = "cpu", **kwargs) -> VecEnv:
    if num_envs < 1:
        raise ValueError("num_envs must be at least 1")
    if name.startswith(MPE2_PREFIX):
        from fedcomm.sim.mpe2_adapter import Mpe2Env  # imports pygame: only when asked for

        return Mpe2Env(name[len(MPE2_PREFIX):], num_envs, device, **kwargs)
    if name not in ENVIRONMENTS:
        known = ", ".join([*ENVIRONMENTS, "mpe2:<name>"])
        raise ValueError(f"unknown environment {name!r}; known: {known}")
    try:
        return ENVIRONMENTS[name](num_envs, device, **kwargs)
    except TypeError as e:
        raise ValueError(f"bad options for {name!r}: {e}") from e
