"""Privacy loss distribution accountant: Google's dp-accounting PLDs.

Each release becomes a dp-accounting privacy loss distribution, pessimistically discretised
(an upper bound at any grid width), and the distributions are composed by convolution, as
dp-accounting's ``PLDAccountant`` does. The noise is passed as ``std / (true L2 sensitivity)``
so nothing depends on how dp-accounting scales a noise multiplier under ``REPLACE_ONE`` (its
RDP accountant ignores the relation for Gaussian events, google/differential-privacy#378):

* unsampled, either relation: the Gaussian with sensitivity 1 and noise ``std / sensitivity``,
  exact; ``count`` copies are one Gaussian with noise ``std / (sensitivity sqrt(count))``; a
  composition of unsampled releases only is the exact mu-GDP profile (``exact.py``);
* sampled, add/remove: the Poisson-subsampled Gaussian under ``ADD_OR_REMOVE_ONE``, the tight
  analysis of DP-SGD (both the add and the remove direction);
* randomized response: dp-accounting's exact PLD of K-ary randomized response;
* sampled, replace-one: dp-accounting's ``REPLACE_ONE`` analysis of the Poisson-subsampled
  Gaussian, the pair ``(1-q) N(0, s^2) + q N(-r, s^2)`` against ``(1-q) N(0, s^2) + q N(r, s^2)``
  with radius ``r = sensitivity / 2``; it reduces to the Gaussian with sensitivity ``2 r`` at
  ``q = 1``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..events import GaussianRelease, RandomizedResponse, Release, SkellamRelease
from .base import Accountant
from .exact import gaussian_mu, gdp_epsilon

if TYPE_CHECKING:
    from dp_accounting.pld import privacy_loss_distribution as pld_lib


def release_pld(release: Release, interval: float) -> pld_lib.PrivacyLossDistribution:
    """PLD of ``release`` (all its ``count`` compositions), pessimistically discretised.

    dp-accounting is imported here, when first needed: unsampled Gaussians compose without it
    (``PLDAccountant._epsilon``), and an agent process that releases only those is spared its
    import (0.65 s) in every round."""
    from dp_accounting import NeighboringRelation
    from dp_accounting.pld import privacy_loss_distribution as pld_lib

    if isinstance(release, RandomizedResponse):
        pld = pld_lib.from_randomized_response(
            noise_parameter=release.uniform_probability, num_buckets=release.symbols,
            value_discretization_interval=interval)
        return pld.self_compose(release.count) if release.count > 1 else pld
    if not release.sampled:
        # count identical Gaussians compose exactly into one with noise z / sqrt(count).
        return pld_lib.from_gaussian_mechanism(
            standard_deviation=release.effective_noise / math.sqrt(release.count),
            value_discretization_interval=interval)
    if release.relation == "add_remove":
        pld = pld_lib.from_gaussian_mechanism(
            standard_deviation=release.effective_noise, sampling_prob=release.sample_rate,
            value_discretization_interval=interval)
    else:
        pld = pld_lib.from_gaussian_mechanism(
            standard_deviation=release.std, sensitivity=release.sensitivity / 2,
            sampling_prob=release.sample_rate, value_discretization_interval=interval,
            neighboring_relation=NeighboringRelation.REPLACE_ONE)
    return pld.self_compose(release.count) if release.count > 1 else pld


RELATIVE_GRID = 1e-4
"""The grid is never coarser than this fraction of the epsilon it computes."""


def rough_mu(releases: list[Release]) -> float:
    """A rough mu-GDP of the composition (the central limit for sampled releases): only to
    size the grid, never reported."""
    total = 0.0
    for r in releases:
        if isinstance(r, RandomizedResponse):
            total += r.count * r.epsilon**2
            continue
        z = r.effective_noise
        if not r.sampled:
            total += r.count / z**2
        else:
            total += r.count * r.sample_rate**2 * math.expm1(min(1 / z**2, 700))
    return math.sqrt(total)


def grid_interval(releases: list[Release], delta: float, finest: float) -> float:
    """A grid width that keeps the loss distribution's support small whatever the epsilon: at
    most ``RELATIVE_GRID`` of a rough estimate of it, which the pessimistic discretisation
    keeps an upper bound at any width."""
    return max(finest, RELATIVE_GRID * gdp_epsilon(rough_mu(releases), delta))


class PLDAccountant(Accountant):
    """dp-accounting's privacy loss distributions, composed.

    Parameters
    ----------
    value_discretization_interval
        Width of the privacy-loss grid. Results are upper bounds at any width; ``1e-3`` is
        within 1e-3 relative of ``1e-4`` on the reference settings and ten times faster.
    """

    name = "pld"

    def __init__(self, value_discretization_interval: float = 1e-3) -> None:
        if not value_discretization_interval > 0:
            raise ValueError("value_discretization_interval must be positive")
        self.interval = float(value_discretization_interval)

    def options(self) -> dict:
        return {"value_discretization_interval": self.interval}

    def _pld(self, releases: list[Release], delta: float
             ) -> pld_lib.PrivacyLossDistribution:
        interval = grid_interval(releases, delta, self.interval)
        composed = release_pld(releases[0], interval)
        for r in releases[1:]:
            composed = composed.compose(release_pld(r, interval))
        return composed

    def _epsilon(self, releases: list[GaussianRelease], delta: float) -> float:
        _no_skellam(releases)
        if all(isinstance(r, GaussianRelease) and not r.sampled for r in releases):
            # Unsampled Gaussians compose exactly to mu-GDP: the profile itself, without a
            # grid (whose size grows with epsilon: a run's vectors can cost thousands).
            return gdp_epsilon(gaussian_mu(releases), delta)
        return self._pld(releases, delta).get_epsilon_for_delta(delta)

    def _delta(self, releases: list[GaussianRelease], epsilon: float) -> float:
        _no_skellam(releases)
        return self._pld(releases, 1e-10).get_delta_for_epsilon(epsilon)


def _no_skellam(releases: Sequence[Release]) -> None:
    for r in releases:
        if isinstance(r, SkellamRelease):
            raise ValueError(f"the pld accountant has no Skellam mechanism ({r.mechanism!r}): "
                             "use rdp")
