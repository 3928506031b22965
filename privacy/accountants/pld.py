"""Privacy loss distribution accountant: Google's dp-accounting PLDs.

Each release becomes a dp-accounting privacy loss distribution, pessimistically discretised
(an upper bound at any grid width), and the distributions are composed by convolution, as
dp-accounting's ``PLDAccountant`` does. The noise is passed as ``std / (true L2 sensitivity)``
so nothing depends on how dp-accounting scales a noise multiplier under ``REPLACE_ONE`` (its
RDP accountant ignores the relation for Gaussian events, google/differential-privacy#378):

* unsampled, either relation: the Gaussian with sensitivity 1 and noise ``std / sensitivity``,
  exact; ``count`` copies are one Gaussian with noise ``std / (sensitivity sqrt(count))``;
* sampled, add/remove: the Poisson-subsampled Gaussian under ``ADD_OR_REMOVE_ONE``, the tight
  analysis of DP-SGD (both the add and the remove direction);
* sampled, replace-one: dp-accounting's ``REPLACE_ONE`` analysis of the Poisson-subsampled
  Gaussian, the pair ``(1-q) N(0, s^2) + q N(-r, s^2)`` against ``(1-q) N(0, s^2) + q N(r, s^2)``
  with radius ``r = sensitivity / 2``; it reduces to the Gaussian with sensitivity ``2 r`` at
  ``q = 1``.
"""

from __future__ import annotations

import math

import dp_accounting
from dp_accounting.pld import privacy_loss_distribution as pld_lib

from ..events import GaussianRelease
from .base import Accountant

NeighboringRelation = dp_accounting.NeighboringRelation


def release_pld(release: GaussianRelease, interval: float) -> pld_lib.PrivacyLossDistribution:
    """PLD of ``release`` (all its ``count`` compositions), pessimistically discretised."""
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

    def _pld(self, releases: list[GaussianRelease]) -> pld_lib.PrivacyLossDistribution:
        composed = release_pld(releases[0], self.interval)
        for r in releases[1:]:
            composed = composed.compose(release_pld(r, self.interval))
        return composed

    def _epsilon(self, releases: list[GaussianRelease], delta: float) -> float:
        return self._pld(releases).get_epsilon_for_delta(delta)

    def _delta(self, releases: list[GaussianRelease], epsilon: float) -> float:
        return self._pld(releases).get_delta_for_epsilon(epsilon)
