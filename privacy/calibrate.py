"""Noise calibration: the smallest noise multiplier that meets a target epsilon."""

from __future__ import annotations

import math

from .accountants import Accountant, make_accountant, round_up
from .events import RELATION_FACTOR, GaussianRelease, Relation, check_relation


def noise_for_epsilon(
    target_eps: float,
    delta: float,
    *,
    sample_rate: float = 1.0,
    count: int = 1,
    relation: Relation = "replace_one",
    sensitivity_factor: float | None = None,
    accountant: str | Accountant = "rdp",
    rel_tol: float = 1e-5,
) -> float:
    """Smallest noise multiplier whose ``count`` releases cost at most ``target_eps``.

    Bisection on the noise multiplier ``sigma`` (std / clip), then rounded up to 6 decimals;
    the epsilon of the returned value is checked against the target before it is returned,
    so a caller can configure it as is.

    Parameters
    ----------
    sample_rate, count, relation
        As in :class:`~fedcomm.privacy.events.GaussianRelease`.
    sensitivity_factor
        True L2 sensitivity in units of the clip norm; defaults to the relation's (2 for
        replace-one, 1 for add/remove).
    accountant
        Name or instance; the result holds for that accountant's epsilon.
    rel_tol
        Relative width of the final bisection bracket.
    """
    check_relation(relation)
    if not target_eps > 0:
        raise ValueError(f"target_eps must be positive, got {target_eps!r}")
    if math.isinf(target_eps):
        return 0.0
    acc = make_accountant(accountant)
    factor = RELATION_FACTOR[relation] if sensitivity_factor is None else sensitivity_factor

    def epsilon(sigma: float) -> float:
        release = GaussianRelease("calibration", sigma, 1.0, factor, sample_rate, count, relation)
        return acc.epsilon([release], delta)

    lo, hi = 0.0, 1.0
    while epsilon(hi) > target_eps:
        lo, hi = hi, 2 * hi
        if hi > 1e8:
            raise ValueError(f"no noise multiplier up to 1e8 reaches epsilon {target_eps}")
    while hi - lo > rel_tol * hi:
        mid = (lo + hi) / 2
        if epsilon(mid) > target_eps:
            lo = mid
        else:
            hi = mid
    sigma = round_up(hi)
    if epsilon(sigma) > target_eps:  # epsilon is monotone in sigma; this guards the contract
        raise RuntimeError(f"calibration failed: sigma {sigma} gives more than {target_eps}")
    return sigma
