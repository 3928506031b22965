"""Rényi DP accountant (``rdp``), built on Opacus' analysis of the sampled Gaussian: the fast
alternative to the default, PLD (``privacy.accountants.pld``).

Each release contributes an RDP curve over a fixed set of orders; curves of a heterogeneous
sequence add up (RDP composition), and the sum is converted to (epsilon, delta) with Opacus'
conversion (Balle et al. 2020, Theorem 21). RDP is 3-8% looser than PLD or PRV but fast
(milliseconds) and simple; a run uses it where it asks for it (``--accountant rdp``).

Curves per release, with ``z = std / sensitivity``:

* unsampled: the Gaussian mechanism, ``alpha / (2 z^2)``, exact for either relation;
* randomized response: its exact Rényi divergence (the two output distributions differ in
  two values);
* Skellam: the bound of :class:`~fedcomm.privacy.events.SkellamRelease` (integer orders);
* sampled, add/remove: Opacus' sampled Gaussian mechanism (Mironov, Talwar and Zhang 2019);
* sampled, replace-one: Opacus has no analysis, so a provable upper bound is used. Replacing
  unit ``x`` by ``x'`` passes through the dataset without the unit, ``D -> D - x -> D'``; both
  steps are add/remove steps of radius ``r = sensitivity / 2``. The weak triangle inequality
  for Rényi divergence (Mironov 2017, Proposition 11, with ``p = q = 2``) gives

      D_a(P || Q) <= (a - 1/2) / (a - 1) * D_2a(P || R) + D_(2a-1)(R || Q),

  so the curve at order ``a`` is ``(a - 1/2)/(a - 1) * rdp_ar(2a) + rdp_ar(2a - 1)`` with the
  add/remove curve ``rdp_ar`` of noise ``std / r``. For q = 1 this is ``4a + 1/(a - 1)`` in
  place of the exact ``4a`` (times ``1 / (2 z_r^2)``), so the bound is close to tight.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence

import numpy as np
from opacus.accountants.analysis import rdp as opacus_rdp
from opacus.accountants.rdp import RDPAccountant as _OpacusRDP

from ..events import RandomizedResponse, Release, SkellamRelease
from .base import Accountant

DEFAULT_ORDERS: tuple[float, ...] = tuple(_OpacusRDP.DEFAULT_ALPHAS)
"""Opacus' default orders, 1.1 to 63."""


def release_rdp(release: Release, orders: Sequence[float]) -> np.ndarray:
    """RDP curve of ``release`` (all its ``count`` compositions) at ``orders``."""
    if isinstance(release, RandomizedResponse):
        return _response_rdp(float(release.epsilon), release.symbols, tuple(orders)) \
            * release.count
    if isinstance(release, SkellamRelease):
        return np.array([release.rdp(a) for a in orders], dtype=float)
    curve = _single_rdp(release.effective_noise, release.sample_rate,
                        release.relation if release.sampled else "any", tuple(orders))
    return curve * release.count


@functools.lru_cache(maxsize=4096)
def _single_rdp(z: float, q: float, relation: str, orders: tuple[float, ...]) -> np.ndarray:
    if relation != "replace_one":
        curve = opacus_rdp.compute_rdp(q=q, noise_multiplier=z, steps=1, orders=list(orders))
    else:
        a = np.asarray(orders, dtype=float)
        z_ar = 2 * z  # noise over the radius r = sensitivity / 2
        d_2a = opacus_rdp.compute_rdp(q=q, noise_multiplier=z_ar, steps=1, orders=list(2 * a))
        d_2a1 = opacus_rdp.compute_rdp(q=q, noise_multiplier=z_ar, steps=1,
                                       orders=list(2 * a - 1))
        curve = (a - 0.5) / (a - 1) * d_2a + d_2a1
    curve = np.asarray(curve, dtype=float)
    curve.flags.writeable = False
    return curve


@functools.lru_cache(maxsize=4096)
def _response_rdp(eps: float, k: int, orders: tuple[float, ...]) -> np.ndarray:
    """Exact Rényi divergence of K-ary randomized response between two inputs: the two output
    distributions differ in two values, ``(a, b, b, ...)`` against ``(b, a, b, ...)``."""
    a = np.asarray(orders, dtype=float)
    log_norm = np.log1p((k - 1) * math.exp(-eps))
    log_p, log_q = -log_norm, -eps - log_norm  # keep, and each other value
    terms = np.logaddexp(a * log_p + (1 - a) * log_q, a * log_q + (1 - a) * log_p)
    if k > 2:
        terms = np.logaddexp(terms, math.log(k - 2) + log_q)
    curve = terms / (a - 1)
    curve.flags.writeable = False
    return curve


class RDPAccountant(Accountant):
    """Rényi DP accountant over the orders ``orders`` (Opacus' defaults).

    Parameters
    ----------
    orders
        RDP orders, all > 1. More orders give a tighter (never looser) result.
    """

    name = "rdp"

    def __init__(self, orders: Sequence[float] = DEFAULT_ORDERS) -> None:
        if not orders or min(orders) <= 1:
            raise ValueError("orders must be a non-empty sequence of numbers > 1")
        self.orders = tuple(float(a) for a in orders)

    def options(self) -> dict:
        return {} if self.orders == DEFAULT_ORDERS else {"orders": list(self.orders)}

    def curve(self, releases: Sequence[Release]) -> np.ndarray:
        """Composed RDP curve of ``releases`` at this accountant's orders."""
        return sum((release_rdp(r, self.orders) for r in releases),
                   np.zeros(len(self.orders)))

    def _epsilon(self, releases: list[Release], delta: float) -> float:
        with warnings.catch_warnings():
            # Opacus warns when the best order is at the end of the range; the bound holds.
            warnings.filterwarnings("ignore", message="Optimal order is the")
            eps, _ = opacus_rdp.get_privacy_spent(orders=list(self.orders),
                                                  rdp=self.curve(releases), delta=delta)
        return float(eps)

    def _delta(self, releases: list[Release], epsilon: float) -> float:
        # The conversion used for epsilon, solved for delta, minimised over orders.
        a = np.asarray(self.orders)
        log_delta = (a - 1) * (self.curve(releases) - epsilon + np.log1p(-1 / a)) - np.log(a)
        return math.exp(min(0.0, float(np.nanmin(log_delta))))
