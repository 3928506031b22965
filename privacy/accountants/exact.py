"""Exact composition of unsampled Gaussian releases through mu-Gaussian DP.

An unsampled release with noise std ``s`` and sensitivity ``Delta`` is exactly ``mu``-GDP with
``mu = Delta / s`` (Dong, Roth and Su 2019), and ``T`` such releases, adaptively composed,
are exactly ``sqrt(sum_t Delta_t^2 / s_t^2)``-GDP. The (epsilon, delta) curve of ``mu``-GDP is

    delta(eps) = Phi(-eps / mu + mu / 2) - e^eps Phi(-eps / mu - mu / 2),

which this module inverts by bisection. This is the tight value the other accountants are
tested against; it does not apply to Poisson-sampled releases.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy.special import log_ndtr, ndtr

from ..events import GaussianRelease
from .base import Accountant, check_delta


def gaussian_mu(releases: Sequence[GaussianRelease]) -> float:
    """``mu`` of the composition of unsampled ``releases`` (``inf`` if one has no noise)."""
    total = 0.0
    for r in releases:
        if not isinstance(r, GaussianRelease):
            raise ValueError(f"the exact Gaussian composition needs Gaussian releases; "
                             f"{r.mechanism!r} is {type(r).__name__}")
        if r.sampled:
            raise ValueError(
                f"the exact Gaussian composition needs unsampled releases; {r.mechanism!r} has "
                f"sample_rate {r.sample_rate}")
        if r.noise_multiplier == 0:
            return math.inf
        total += r.count / r.effective_noise**2
    return math.sqrt(total)


def gdp_delta(mu: float, epsilon: float) -> float:
    """Delta of ``mu``-GDP at ``epsilon`` (the exact privacy profile of the Gaussian)."""
    if mu == 0:
        return 0.0
    if math.isinf(mu):
        return 1.0
    a = float(ndtr(-epsilon / mu + mu / 2))
    b = math.exp(epsilon + float(log_ndtr(-epsilon / mu - mu / 2)))
    return max(a - b, 0.0)


def gdp_epsilon(mu: float, delta: float, tol: float = 1e-10) -> float:
    """Smallest epsilon with ``gdp_delta(mu, epsilon) <= delta``, found by bisection.

    The upper end of the bracket is returned, so the result is never below the exact value;
    the target is shrunk by ``1e-9`` relative to absorb floating-point error in the profile.
    """
    check_delta(delta)
    target = delta * (1 - 1e-9)
    if mu == 0 or gdp_delta(mu, 0.0) <= target:
        return 0.0
    if math.isinf(mu):
        return math.inf
    lo, hi = 0.0, 1.0
    while gdp_delta(mu, hi) > target:
        lo, hi = hi, 2 * hi
    while hi - lo > tol * max(1.0, hi):
        mid = (lo + hi) / 2
        if gdp_delta(mu, mid) > target:
            lo = mid
        else:
            hi = mid
    return hi


class ExactGaussianAccountant(Accountant):
    """Exact accountant for sequences of unsampled Gaussian releases (mu-GDP).

    Raises ``ValueError`` on a Poisson-sampled release; use ``rdp``, ``pld`` or ``prv`` there.
    """

    name = "exact"

    def _epsilon(self, releases: list[GaussianRelease], delta: float) -> float:
        return gdp_epsilon(gaussian_mu(releases), delta)

    def _delta(self, releases: list[GaussianRelease], epsilon: float) -> float:
        return gdp_delta(gaussian_mu(releases), epsilon)
