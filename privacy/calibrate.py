"""Noise calibration: the smallest noise that meets a target epsilon, for one mechanism or for
several that share one budget.

:func:`noise_for_epsilon` calibrates one Gaussian release. :func:`split_budget` calibrates
several mechanisms to one composed epsilon: each free mechanism's own epsilon is its weight's
part of a common scale, the scale is the largest whose composition still fits the budget, and
mechanisms with a fixed target keep it. Every noise is rounded up and every composed value
checked with the accountant before it is returned, so a caller can configure the result as is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .accountants import DEFAULT_ACCOUNTANT, Accountant, make_accountant, round_up
from .accountants.exact import gaussian_mu, gdp_epsilon
from .events import RELATION_FACTOR, GaussianRelease, Relation, Release, check_relation

MAX_NOISE = 1e8


def noise_for_epsilon(
    target_eps: float,
    delta: float,
    *,
    sample_rate: float = 1.0,
    count: int = 1,
    relation: Relation = "replace_one",
    sensitivity_factor: float | None = None,
    accountant: str | Accountant = DEFAULT_ACCOUNTANT,
    rel_tol: float = 1e-5,
) -> float:
    """Smallest noise multiplier whose ``count`` releases cost at most ``target_eps``.

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
        Relative width of the final bracket.
    """
    check_relation(relation)
    factor = RELATION_FACTOR[relation] if sensitivity_factor is None else sensitivity_factor
    acc = make_accountant(accountant)

    def releases(sigma: float) -> list[GaussianRelease]:
        return [GaussianRelease("calibration", sigma, 1.0, factor, sample_rate, count, relation)]

    return smallest_noise(lambda sigma: acc.epsilon(releases(sigma), delta), target_eps,
                          rel_tol)


class Unreachable(ValueError):
    """No noise multiplier the calibration searches reaches the target epsilon."""


def smallest_noise(epsilon_of: Callable[[float], float], target: float,
                   rel_tol: float = 1e-5) -> float:
    """Smallest noise multiplier (rounded up to 6 decimals) with ``epsilon_of(noise) <=
    target``, for an ``epsilon_of`` that decreases with the noise.

    Regula falsi (Illinois) on log epsilon against log noise inside a bracket that always
    holds the answer: a few evaluations where bisection needs twenty, which matters when each
    is a privacy loss distribution.
    """
    if not target > 0:
        raise ValueError(f"the target epsilon must be positive, got {target!r}")
    if math.isinf(target):
        return 0.0
    lo, hi = 0.0, 1.0
    while epsilon_of(hi) > target:
        lo, hi = hi, 2 * hi
        if hi > MAX_NOISE:
            raise Unreachable(f"no noise multiplier up to {MAX_NOISE:g} reaches epsilon "
                              f"{target:.4g}")
    if lo == 0.0:
        lo = hi / 2
        while epsilon_of(lo) <= target:
            hi, lo = lo, lo / 2
            if lo < 1e-6:
                return round_up(hi)
    sigma = _regula_falsi(lambda x: math.log(max(epsilon_of(x), 1e-300)), math.log(target),
                          lo, hi, rel_tol)
    sigma = round_up(sigma)
    if epsilon_of(sigma) > target:  # monotone in sigma; this guards the contract
        raise RuntimeError(f"calibration failed: noise {sigma} gives more than {target}")
    return sigma


def _regula_falsi(f: Callable[[float], float], y: float, lo: float, hi: float,
                  rel_tol: float) -> float:
    """``x`` in ``[lo, hi]`` with ``f(x) <= y`` as small as the tolerance allows, for ``f``
    decreasing, ``f(lo) > y >= f(hi)``; the search runs on ``log x``."""
    a, b = math.log(lo), math.log(hi)
    fa, fb = f(lo) - y, f(hi) - y
    side = 0
    while b - a > math.log1p(rel_tol):
        c = (a * fb - b * fa) / (fb - fa) if fa != fb else (a + b) / 2
        c = min(max(c, a + 0.01 * (b - a)), b - 0.01 * (b - a))
        fc = f(math.exp(c)) - y
        if fc > 0:
            a, fa = c, fc
            if side == -1:
                fb /= 2
            side = -1
        else:
            b, fb = c, fc
            if side == 1:
                fa /= 2
            side = 1
    return math.exp(b)


@dataclass(frozen=True)
class Mechanism:
    """A mechanism to calibrate: what composes of it for one unit, at a noise multiplier.

    Parameters
    ----------
    name
        As the releases name it.
    releases
        The unit's releases of this mechanism at a noise multiplier.
    weight
        Its part of the budget, relative to the other mechanisms without a target.
    target
        A fixed epsilon for this mechanism alone instead of a weighted part.
    """

    name: str
    releases: Callable[[float], list[Release]]
    weight: float = 1.0
    target: float | None = None


@dataclass(frozen=True)
class Split:
    """What :func:`split_budget` chose: each mechanism's noise multiplier and its epsilon alone,
    and the composed epsilon of all of them."""

    noise: dict[str, float]
    epsilon: dict[str, float]
    composed: float


def split_budget(total: float, delta: float, mechanisms: Sequence[Mechanism],
                 accountant: str | Accountant = DEFAULT_ACCOUNTANT,
                 relation: Relation = "replace_one", rel_tol: float = 1e-3,
                 together: Sequence[Sequence[str]] | None = None) -> Split:
    """Calibrate ``mechanisms`` so that together they cost at most ``total`` for one unit.

    Each mechanism without a target gets the epsilon ``scale * weight / sum(weights)`` alone;
    the scale is the largest (to ``rel_tol``) whose composition fits ``total``. ``together``
    names the mechanisms each party releases (default: one party releasing all of them): what
    must fit is the composition of the party that spends most. Raises ``ValueError`` if the
    fixed targets alone do not fit.
    """
    # parties that release the same mechanisms count once (a run of many sites has many)
    parties = ([list(p) for p in dict.fromkeys(tuple(p) for p in together)] if together
               else [[m.name for m in mechanisms]])
    acc = make_accountant(accountant)
    if not mechanisms:
        return Split({}, {}, 0.0)
    free = [m for m in mechanisms if m.target is None]
    weights = {m.name: m.weight / sum(f.weight for f in free) for m in free}

    def alone(m: Mechanism, sigma: float) -> float:
        return search_epsilon(m.releases(sigma), delta, acc, relation)

    def calibrate(targets: dict[str, float]) -> Split:
        """The mechanisms named in ``targets`` calibrated to them, and what they compose to
        for the party that spends most."""
        noise = {m.name: smallest_noise(lambda s, m=m: alone(m, s), targets[m.name], rel_tol / 10)
                 for m in mechanisms if m.name in targets}
        by_name = {m.name: m for m in mechanisms}
        composed = max(acc.epsilon([r.as_relation(relation) for name in party if name in noise
                                    for r in by_name[name].releases(noise[name])], delta)
                       for party in parties if any(name in noise for name in party))
        return Split(noise, {}, composed)

    fixed = {m.name: m.target for m in mechanisms if m.target is not None}
    if not free:
        split = calibrate(fixed)
    else:
        def at(scale: float) -> Split:
            return calibrate({**fixed, **{k: scale * w for k, w in weights.items()}})

        if fixed and calibrate(fixed).composed > total:  # the fixed epsilons alone
            raise ValueError(_over(fixed, total))
        lo, hi = 0.0, total
        while at(hi).composed <= total:
            lo, hi = hi, 2 * hi
        if lo == 0.0:
            lo = hi / 2
            while at(lo).composed > total:
                hi, lo = lo, lo / 2
        # the largest scale that fits: bisection on log scale, keeping the side that fits
        while hi / lo > 1 + rel_tol:
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if at(mid).composed <= total else (lo, mid)
        split = at(lo)
    if split.composed > total:
        raise ValueError(_over(fixed, total))
    stated = {m.name: acc.epsilon([r.as_relation(relation) for r in m.releases(
        split.noise[m.name])], delta) for m in mechanisms}  # by the accountant of the report
    return Split(split.noise, stated, split.composed)


def search_epsilon(releases: Sequence[Release], delta: float, accountant: Accountant,
                   relation: Relation) -> float:
    """Epsilon of ``releases`` for a noise search: exact (and fast) for unsampled Gaussians,
    the accountant's otherwise. The noise found is then stated with the accountant."""
    releases = [r.as_relation(relation) for r in releases]
    if all(isinstance(r, GaussianRelease) and not r.sampled for r in releases):
        return round_up(gdp_epsilon(gaussian_mu(releases), delta))
    return accountant.epsilon(releases, delta)


def _over(fixed: dict[str, float], total: float) -> str:
    given = ", ".join(f"{k} {v:g}" for k, v in fixed.items())
    return f"the fixed epsilons ({given}) compose to more than the budget {total:g}"
