"""``--sites``, ``--site-opt`` and ``--site-dist``: copies of the environment as sites, each its
own agents and episodes, and each site's own options (non-IID sites), as environment options
(``sim.registry.SITES``, ``SITE_OPTIONS``) checked before anything starts."""

from __future__ import annotations

import argparse
import math
from typing import Any

from fedcomm.commands.flags import TRAIN, FlagError, key_value

SITE_FLAGS = ("sites", "site_opt", "site_dist")  # the flags that set a run's sites


def add_sites(p: argparse.ArgumentParser, federated: bool = False) -> None:
    """``--sites`` and ``--site-opt``: copies of the environment, each its own agents; a
    ``federated`` command's default is its federated preset's (``preset_sites``)."""
    p.add_argument("--sites", type=int, metavar="N",
                   help="run N copies of the environment as sites, each its own agents "
                   "(ids s0.speaker_0, ...) and episodes; vectors stay within a site, "
                   "--env-steps count per site "
                   f"({_sites_default_text() if federated else 'default: 1'})")
    p.set_defaults(federated_sites=federated)
    p.add_argument("--site-opt", type=site_key_value, action="append", default=[],
                   metavar="S/KEY=VALUE",
                   help="an environment option of site S only, over --env-opt (repeatable; "
                   "non-IID sites: speaker_listener's goal_weights, the factory's fault_prob)")
    p.add_argument("--site-dist", metavar="dirichlet/ALPHA",
                   help="non-IID sites drawn from a named distribution: each site's goal "
                   "distribution (speaker_listener's goal_weights) from Dirichlet(ALPHA) with "
                   "the run's seed; the drawn values are in config.json")


def preset_sites(args: argparse.Namespace) -> int:
    """The sites a run of ``args`` has without ``--sites``: its federated preset's (private
    unless ``--non-private``) for a federated command, else 1."""
    if not getattr(args, "federated_sites", False):
        return 1
    from fedcomm.presets import PRIVATE_FEDERATED, federation_preset
    from fedcomm.sim.registry import SITES

    private = not getattr(args, "non_private", False) and args.env in PRIVATE_FEDERATED
    return int(federation_preset(args.env, private=private).train.env_kwargs.get(SITES, 1))


def _sites_default_text() -> str:
    """``default: 2 for speaker_listener, 1 with --non-private and for ...``, read from the
    presets."""
    from fedcomm.presets import PRESET_ENVIRONMENTS, PRIVATE_FEDERATED, federation_preset
    from fedcomm.sim.registry import SITES

    many = {env: federation_preset(env, private=True).train.env_kwargs.get(SITES, 1)
            for env in PRIVATE_FEDERATED}
    many = {env: n for env, n in many.items() if n != 1}
    if not many:
        return "default: 1"
    others = [env for env in PRESET_ENVIRONMENTS if env not in many]
    return ("default: " + ", ".join(f"{n} for {env}" for env, n in many.items())
            + f", 1 with --non-private and for {', '.join(others)}")


def site_key_value(text: str) -> tuple[int, str, object]:
    site, sep, rest = text.partition("/")
    if not sep or not site.isdigit():
        raise argparse.ArgumentTypeError(f"expected S/KEY=VALUE (S a site number), got {text!r}")
    return (int(site), *key_value(rest))


def site_flags(args: argparse.Namespace, default: int = 1) -> dict[str, Any]:
    """``--sites`` and ``--site-opt`` as environment options (``sim.registry.SITES``);
    ``default``: the run's sites where ``--sites`` is not given (its preset's)."""
    from fedcomm.sim.registry import SITE_OPTIONS, SITES, check_env_options

    sites, site_opt = getattr(args, "sites", None), getattr(args, "site_opt", None) or []
    dist = getattr(args, "site_dist", None)
    if sites is None and not site_opt and dist is None:
        return {}
    if sites is not None and not 1 <= sites <= 4096:
        raise FlagError("--sites", f"{sites}: expected an integer from 1 to 4096")
    sites = default if sites is None else sites
    per_site: list[dict[str, Any]] = drawn_sites(args, sites, dist)
    for site, key, value in site_opt:
        if site >= sites:
            raise FlagError("--site-opt", f"site {site}, but the run has {sites} "
                            f"(sites 0 to {sites - 1}; give --sites)")
        per_site[site][key] = value
    out: dict[str, Any] = {SITES: sites}
    if site_opt or dist:
        out[SITE_OPTIONS] = per_site
    try:
        return check_env_options(args.env, out)
    except ValueError as e:
        raise FlagError("--site-opt", str(e)) from None


def drawn_sites(args: argparse.Namespace, sites: int, dist: str | None) -> list[dict[str, Any]]:
    """Each site's options drawn from ``--site-dist`` (empty without one), with the run's
    seed: the environment's ``site_distribution`` option from Dirichlet(ALPHA)."""
    import numpy as np

    from fedcomm.sim.registry import env_class

    if dist is None:
        return [{} for _ in range(sites)]
    name, _, alpha = dist.partition("/")
    try:
        concentration = float(alpha)
    except ValueError:
        concentration = math.nan
    if name != "dirichlet" or not 0 < concentration < math.inf:
        raise FlagError("--site-dist", f"{dist!r}: expected dirichlet/ALPHA, ALPHA a positive "
                        "number (small: sites that differ more)")
    cls = env_class(args.env)
    option = getattr(cls, "site_distribution", None)
    if option is None:
        raise FlagError("--site-dist", f"{args.env} has no option to draw per site; give each "
                        "site's own with --site-opt S/KEY=VALUE")
    key, size = option
    rng = np.random.default_rng(getattr(args, f"{TRAIN}seed", None) or 0)
    return [{key: [round(float(w), 6) for w in rng.dirichlet([concentration] * size)]}
            for _ in range(sites)]
