"""Accountants: one per file behind the :class:`Accountant` interface, and a registry.

``pld`` (the default) is tight to about 1e-3; ``rdp`` is fast and a few percent loose, the
fallback; ``prv`` is tight to about 1e-2; ``exact`` is the exact mu-GDP composition and accepts
unsampled releases only.
"""

from __future__ import annotations

import importlib
from typing import Any

from .base import Accountant, round_up
from .exact import ExactGaussianAccountant, gaussian_mu, gdp_delta, gdp_epsilon

# name -> (module, class). All but the exact accountant are imported when first asked for:
# they bring dp-accounting and Opacus (Opacus' import alone is 1.4 s), start-up that every
# agent process would pay for an accountant it never uses.
ACCOUNTANTS: dict[str, tuple[str, str]] = {
    "rdp": ("rdp", "RDPAccountant"), "pld": ("pld", "PLDAccountant"),
    "prv": ("prv", "PRVAccountant"), "exact": ("exact", "ExactGaussianAccountant"),
}
DEFAULT_ACCOUNTANT = "pld"


def accountant_class(name: str) -> type[Accountant]:
    try:
        module, cls = ACCOUNTANTS[name]
    except KeyError:
        raise ValueError(
            f"unknown accountant {name!r}; choose one of {sorted(ACCOUNTANTS)}") from None
    return getattr(importlib.import_module(f".{module}", __name__), cls)


def __getattr__(name: str) -> Any:
    lazy = {cls: key for key, (_, cls) in ACCOUNTANTS.items()}
    if name in lazy:
        return accountant_class(lazy[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_accountant(name: str | Accountant = DEFAULT_ACCOUNTANT, **options: Any) -> Accountant:
    """Build the accountant called ``name`` with ``options``; pass an instance through."""
    if isinstance(name, Accountant):
        if options:
            raise ValueError("options apply to an accountant name, not an instance")
        return name
    return accountant_class(name)(**options)


__all__ = [
    "ACCOUNTANTS",
    "DEFAULT_ACCOUNTANT",
    "Accountant",
    "ExactGaussianAccountant",
    "PLDAccountant",
    "PRVAccountant",
    "RDPAccountant",
    "accountant_class",
    "gaussian_mu",
    "gdp_delta",
    "gdp_epsilon",
    "make_accountant",
    "round_up",
]
