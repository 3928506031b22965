"""Environments by name: the ports, and ``mpe2:<name>`` for any original mpe2 environment."""

from __future__ import annotations

import difflib
from typing import Any

import torch

from fedcomm.sim.base import EnvOption, VecEnv, shown
from fedcomm.sim.factory import Factory
from fedcomm.sim.platoon import Platoon
from fedcomm.sim.speaker_listener import SpeakerListener

ENVIRONMENTS: dict[str, type[VecEnv]] = {
    "speaker_listener": SpeakerListener,
    "factory": Factory,
    "platoon": Platoon,
}

MPE2_PREFIX = "mpe2:"
MPE2_ANY = "mpe2:<name>"


def env_class(name: str) -> type[VecEnv]:
    """The class of environment ``name``; ``ValueError`` naming the known ones."""
    if name.startswith(MPE2_PREFIX) and len(name) > len(MPE2_PREFIX):
        from fedcomm.sim.mpe2_adapter import Mpe2Env  # mpe2 itself loads when one is built

        return Mpe2Env
    if name not in ENVIRONMENTS:
        known = ", ".join([*ENVIRONMENTS, MPE2_ANY])
        raise ValueError(f"unknown environment {name!r}; known: {known}")
    return ENVIRONMENTS[name]


def describe_options(name: str) -> str:
    """Environment ``name``'s options as one types them: ``KEY=N, KEY=true|false``."""
    options = env_class(name).options
    return ", ".join(f"{key}={option.metavar}" for key, option in options.items()) or "none"


# Options of every environment: how many copies run as sites (``sim.sites``), and each site's
# own options over the run's (a list of objects, one per site from the first).
SITES, SITE_OPTIONS = "sites", "site_options"


def one_site(kwargs: dict[str, Any], site: int) -> dict[str, Any]:
    """The options of site ``site`` alone, from a run's (``sites``, ``site_options``)."""
    own = kwargs.get(SITE_OPTIONS) or []
    return {**{k: v for k, v in kwargs.items() if k not in (SITES, SITE_OPTIONS)},
            **(own[site] if site < len(own) else {})}


def check_env_options(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` as environment ``name`` takes them, or ``ValueError`` saying which option is
    wrong and what it accepts: checked against the environment's declared options, before
    anything is built."""
    cls = env_class(name)
    checked: dict[str, Any] = {}
    if SITES in kwargs:
        checked[SITES] = EnvOption(int, 1, "sites", low=1, high=4096).check(SITES, kwargs[SITES])
    if SITE_OPTIONS in kwargs:
        per_site = kwargs[SITE_OPTIONS]
        if not (isinstance(per_site, list) and all(isinstance(o, dict) for o in per_site)):
            raise ValueError(f"{SITE_OPTIONS} must be a list of objects, one per site")
        if len(per_site) > checked.get(SITES, 1):
            raise ValueError(f"options for {len(per_site)} sites, but the run has "
                             f"{checked.get(SITES, 1)}")
        checked[SITE_OPTIONS] = [check_env_options(name, {k: v for k, v in o.items()
                                                          if k not in (SITES, SITE_OPTIONS)})
                                 for o in per_site]
    for key, value in kwargs.items():
        if key in (SITES, SITE_OPTIONS):
            continue
        option = cls.options.get(key)
        if option is None:
            raise ValueError(unknown_option(name, cls, key, value))
        try:
            checked[key] = option.check(key, value)
        except ValueError as e:
            raise ValueError(f"{name} option {e}") from None
    return checked


def unknown_option(name: str, cls: type[VecEnv], key: str, value: Any) -> str:
    text = f"{name} has no option {key!r}"
    if key in cls.instead:
        text += f"; use {cls.instead[key]}"
    else:
        close = difflib.get_close_matches(key, list(cls.options), n=1)
        if close:
            text += f"; did you mean {close[0]}={shown(value)}?"
    return text + f" (its options: {describe_options(name)})"


def make_env(name: str, num_envs: int, device: str | torch.device = "cpu", **kwargs) -> VecEnv:
    """``num_envs`` episodes of environment ``name`` with options ``kwargs``; with
    ``sites=N``, ``N`` copies of it as one (``sim.sites``), each site ``num_envs`` episodes."""
    if num_envs < 1:
        raise ValueError("num_envs must be at least 1")
    kwargs = check_env_options(name, kwargs)
    sites, per_site = kwargs.pop(SITES, 1), kwargs.pop(SITE_OPTIONS, None)
    if sites > 1:
        from fedcomm.sim.sites import Sites, site_options

        return Sites([_make(name, num_envs, device, own)
                      for own in site_options(sites, kwargs, per_site)])
    if per_site:
        kwargs = {**kwargs, **per_site[0]}
    return _make(name, num_envs, device, kwargs)


def _make(name: str, num_envs: int, device: str | torch.device, kwargs: dict) -> VecEnv:
    if name.startswith(MPE2_PREFIX):
        from fedcomm.sim.mpe2_adapter import Mpe2Env  # imports mpe2: only when asked for

        return Mpe2Env(name[len(MPE2_PREFIX):], num_envs, device, **kwargs)
    return ENVIRONMENTS[name](num_envs, device, **kwargs)
