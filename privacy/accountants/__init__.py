"""Accountants: one per file behind the :class:`Accountant` interface, and a registry.

``rdp`` (the default) is fast and a few percent loose; ``pld`` and ``prv`` are tight to about
1e-2; ``exact`` is the exact mu-GDP composition and accepts unsampled releases only.
"""

from __future__ import annotations

from typing import Any

from .base import Accountant, round_up
from .exact import ExactGaussianAccountant, gaussian_mu, gdp_delta, gdp_epsilon
from .pld import PLDAccountant
from .prv import PRVAccountant
from .rdp import RDPAccountant

ACCOUNTANTS: dict[str, type[Accountant]] = {
    cls.name: cls
    for cls in (RDPAccountant, PLDAccountant, PRVAccountant, ExactGaussianAccountant)
}
DEFAULT_ACCOUNTANT = "rdp"


def make_accountant(name: str | Accountant = DEFAULT_ACCOUNTANT, **options: Any) -> Accountant:
    """Build the accountant called ``name`` with ``options``; pass an instance through."""
    if isinstance(name, Accountant):
        if options:
            raise ValueError("options apply to an accountant name, not an instance")
        return name
    try:
        cls = ACCOUNTANTS[name]
    except KeyError:
        raise ValueError(
            f"unknown accountant {name!r}; choose one of {sorted(ACCOUNTANTS)}") from None
    return cls(**options)


__all__ = [
    "ACCOUNTANTS",
    "DEFAULT_ACCOUNTANT",
    "Accountant",
    "ExactGaussianAccountant",
    "PLDAccountant",
    "PRVAccountant",
    "RDPAccountant",
    "gaussian_mu",
    "gdp_delta",
    "gdp_epsilon",
    "make_accountant",
    "round_up",
]
