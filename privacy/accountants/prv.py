"""Privacy random variable accountant, built on Opacus' PRV analysis (Gopi et al. 2021).

Releases become Opacus' ``PoissonSubsampledGaussianPRV`` (noise ``z = std / sensitivity``),
are discretised on a common grid and composed by FFT. The epsilon returned is Opacus' upper
bound ``eps_estimate(delta - delta_error) + eps_error``; the delta is the matching bound
``delta_estimate(epsilon - eps_error) + delta_error``.

Opacus analyses the add/remove relation only, which is exact for unsampled releases of either
relation (a Gaussian with the stated sensitivity). For a replace-one sequence with Poisson-
sampled releases a provable upper bound is used instead: group privacy over the path
``D -> D - x -> D'``. Every release is re-expressed under add/remove (radius
``sensitivity / 2``), the add/remove composition is ``(eps', delta')``-DP with
``delta' = delta_ar(eps')``, and the replace-one composition is then
``(2 eps', delta' (1 + e^eps'))``-DP. The smallest ``eps'`` meeting the target delta is found
by bisection, and ``2 eps'`` is returned.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from opacus.accountants.analysis.prv import (
    DiscretePRV,
    Domain,
    PoissonSubsampledGaussianPRV,
    TruncatedPrivacyRandomVariable,
    compose_heterogeneous,
    compute_safe_domain_size,
    discretize,
)

from ..events import GaussianRelease, Release
from .base import Accountant
from .rdp import RDPAccountant


def discrete_prv(releases: Sequence[GaussianRelease], eps_error: float,
                 delta_error: float) -> DiscretePRV:
    """Composed discrete PRV of add/remove or unsampled ``releases`` (Opacus' construction)."""
    prvs = [PoissonSubsampledGaussianPRV(r.sample_rate, r.effective_noise) for r in releases]
    counts = [r.count for r in releases]
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        # log(1 - q) at q = 1; Opacus' RDP warning on the domain size does not affect the bound.
        warnings.filterwarnings("ignore", message="Optimal order is the")
        half_width = compute_safe_domain_size(prvs, counts, eps_error=eps_error,
                                              delta_error=delta_error)
        mesh = eps_error / math.sqrt(sum(counts) * math.log(12 / delta_error) / 2)
        domain = Domain.create_aligned(-half_width, half_width, mesh)
        dprvs = [discretize(TruncatedPrivacyRandomVariable(p, domain.t_min, domain.t_max), domain)
                 for p in prvs]
    return compose_heterogeneous(dprvs, counts)


class PRVAccountant(Accountant):
    """Opacus' PRV accountant.

    Parameters
    ----------
    eps_error
        Width of the epsilon error band; the returned epsilon includes it.
    delta_error
        Delta error as a fraction of the target delta (Opacus' default ``1e-3``).
    """

    name = "prv"

    def __init__(self, eps_error: float = 0.01, delta_error: float = 1e-3) -> None:
        if not (eps_error > 0 and 0 < delta_error < 1):
            raise ValueError("eps_error must be positive and delta_error in (0, 1)")
        self.eps_error, self.delta_error = float(eps_error), float(delta_error)

    def options(self) -> dict:
        return {"eps_error": self.eps_error, "delta_error": self.delta_error}

    def _epsilon(self, releases: list[GaussianRelease], delta: float) -> float:
        _gaussian_only(releases)
        if _needs_group_bound(releases):
            return self._replace_epsilon(releases, delta)
        d_err = delta * self.delta_error
        dprv = discrete_prv(releases, self.eps_error, d_err)
        return float(dprv.compute_epsilon(delta, d_err, self.eps_error)[2])

    def _delta(self, releases: list[GaussianRelease], epsilon: float) -> float:
        if _needs_group_bound(releases):
            raise NotImplementedError("delta of a sampled replace-one sequence under PRV")
        # The error band is relative to a delta not known in advance; 1e-12 is absolute.
        dprv = discrete_prv(releases, self.eps_error, 1e-12)
        return float(dprv.compute_delta_estimate(epsilon - self.eps_error)) + 1e-12

    def _replace_epsilon(self, releases: list[GaussianRelease], delta: float) -> float:
        ar = [r.as_relation("add_remove") for r in releases]
        # The error band must be small against delta' = delta / (1 + e^eps'); estimate eps'
        # from the (looser, fast) RDP accountant. Validity does not depend on the estimate.
        rdp = RDPAccountant()
        first = min(rdp.epsilon(ar, delta / 2), 700.0)
        guess = rdp.epsilon(ar, delta / (2 + 2 * math.exp(first)))
        d_err = self.delta_error * delta / (1 + math.exp(min(guess, 700.0)))
        if not d_err > 1e-250:  # no finite bound at floating-point precision
            return math.inf
        dprv = discrete_prv(ar, self.eps_error, d_err)

        def delta_replace(eps_ar: float) -> float:
            if eps_ar > 700:
                return math.inf
            delta_ar = float(dprv.compute_delta_estimate(eps_ar - self.eps_error)) + d_err
            return delta_ar * (1 + math.exp(eps_ar))

        lo, hi = 0.0, max(guess, 1.0)
        while delta_replace(hi) > delta:
            lo, hi = hi, 2 * hi
            if hi > 700:
                return math.inf
        while hi - lo > 1e-7 * max(1.0, hi):
            mid = (lo + hi) / 2
            if delta_replace(mid) > delta:
                lo = mid
            else:
                hi = mid
        return 2 * hi


def _gaussian_only(releases: Sequence[Release]) -> None:
    for r in releases:
        if not isinstance(r, GaussianRelease):
            raise ValueError(f"the prv accountant composes Gaussian releases only; "
                             f"{r.mechanism!r} is {type(r).__name__}: use pld or rdp")


def _needs_group_bound(releases: Sequence[GaussianRelease]) -> bool:
    return any(r.sampled and r.relation == "replace_one" for r in releases)
