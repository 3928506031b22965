"""Empirical one-run privacy audit with canaries (Steinke, Nasr and Jagielski 2023).

``m`` canaries are each included with probability 1/2 and the mechanism runs once as
configured: canary ``i`` contributes the clipped vector ``C e_i`` (under replace-one an
excluded canary is replaced by ``-C e_i``, the farthest neighbour; under add/remove it is
absent), and every one of the ``T`` releases per unit adds ``N(0, (sigma C)^2)`` to every
coordinate. The score of canary ``i`` is the sum of its coordinate over the ``T`` releases.
The auditor guesses "in" for the ``k+`` highest scores and "out" for the ``k-`` lowest; with
``r`` guesses of which ``v`` are right, an (epsilon, delta)-DP mechanism satisfies

    P[W >= v] <= f(v) + 2 m delta max_{i=1..v} (f(v - i) - f(v)) / i,

with ``f(u) = P[Binomial(r, e^eps / (1 + e^eps)) >= u]``. The lower bound is the largest
epsilon the observation rejects at the given confidence. A correct mechanism gives a lower
bound at most its claimed epsilon (with probability ``confidence``); a larger one shows the
mechanism leaks more than it claims.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import binom

from .accountants import Accountant, make_accountant
from .events import RELATION_FACTOR, GaussianRelease, RandomizedResponse, Relation, check_relation


@dataclass(frozen=True)
class CanaryAudit:
    """Result of :func:`empirical_audit`."""

    epsilon_lower_bound: float
    claimed_epsilon: float
    canaries: int
    guesses: int
    correct: int
    confidence: float

    @property
    def confidence_text(self) -> str:
        """The confidence as a percentage, with the digits it has (0.999 is 99.9%)."""
        return percent(self.confidence)

    @property
    def consistent(self) -> bool:
        """Whether the lower bound does not exceed the claim."""
        return self.epsilon_lower_bound <= self.claimed_epsilon


def percent(p: float) -> str:
    """``p`` as a percentage with the digits it has, never rounded up to 100%: 0.95 is 95%,
    0.999 is 99.9%."""
    return f"{round(p * 100, 6):g}%"


def rejection_probability(epsilon: float, canaries: int, guesses: int, correct: int,
                          delta: float) -> float:
    """Upper bound on P[at least ``correct`` right] for an (epsilon, delta)-DP mechanism."""
    p = math.exp(epsilon) / (1 + math.exp(epsilon)) if epsilon < 700 else 1.0
    f_v = binom.sf(correct - 1, guesses, p)
    if correct == 0:
        return float(f_v)
    i = np.arange(1, correct + 1)
    gaps = (binom.sf(correct - i - 1, guesses, p) - f_v) / i
    return float(f_v + 2 * canaries * delta * gaps.max())


def epsilon_lower_bound(canaries: int, guesses: int, correct: int, delta: float,
                        confidence: float = 0.95) -> float:
    """Largest epsilon rejected at ``confidence`` by ``correct`` right out of ``guesses``."""
    alpha = 1 - confidence
    if rejection_probability(0.0, canaries, guesses, correct, delta) > alpha:
        return 0.0
    lo, hi = 0.0, 1.0
    while rejection_probability(hi, canaries, guesses, correct, delta) <= alpha:
        lo, hi = hi, 2 * hi
        if hi > 100:
            return lo
    while hi - lo > 1e-4:
        mid = (lo + hi) / 2
        if rejection_probability(mid, canaries, guesses, correct, delta) <= alpha:
            lo = mid
        else:
            hi = mid
    return lo


def empirical_audit(
    noise_multiplier: float,
    *,
    clip: float = 1.0,
    relation: Relation = "replace_one",
    releases_per_unit: int = 1,
    delta: float = 1e-5,
    canaries: int = 100_000,
    k_plus: int = 1000,
    k_minus: int = 1000,
    confidence: float = 0.95,
    accountant: str | Accountant = "exact",
    seed: int | None = None,
    true_noise_multiplier: float | None = None,
) -> CanaryAudit:
    """Run the one-run audit on the Gaussian message mechanism as configured.

    Parameters
    ----------
    noise_multiplier, clip, relation, releases_per_unit
        The mechanism as configured; the claimed epsilon is computed from them.
    k_plus, k_minus
        Number of "in" guesses (highest scores) and "out" guesses (lowest scores).
    accountant
        Accountant for the claimed epsilon (the exact Gaussian composition by default).
    true_noise_multiplier
        Test only: simulate a faulty mechanism that adds this much noise while claiming
        ``noise_multiplier``.
    """
    check_relation(relation)
    if k_plus + k_minus > canaries:
        raise ValueError("more guesses than canaries")
    release = GaussianRelease("canary", noise_multiplier, clip, RELATION_FACTOR[relation] * clip,
                              1.0, releases_per_unit, relation)
    claimed = make_accountant(accountant).epsilon([release], delta)
    sigma = noise_multiplier if true_noise_multiplier is None else true_noise_multiplier
    rng = np.random.default_rng(seed)
    included = rng.random(canaries) < 0.5
    value = np.where(included, clip, -clip if relation == "replace_one" else 0.0)
    noise = rng.standard_normal((releases_per_unit, canaries)).sum(axis=0) * (sigma * clip)
    scores = releases_per_unit * value + noise
    order = np.argsort(scores)
    correct = int(included[order[canaries - k_plus:]].sum() + (~included[order[:k_minus]]).sum())
    guesses = k_plus + k_minus
    bound = epsilon_lower_bound(canaries, guesses, correct, delta, confidence)
    return CanaryAudit(bound, claimed, canaries, guesses, correct, confidence)


def empirical_response_audit(
    epsilon: float,
    symbols: int,
    *,
    releases_per_unit: int = 1,
    canaries: int = 100_000,
    k_plus: int = 1000,
    k_minus: int = 1000,
    confidence: float = 0.999,
    seed: int | None = None,
    true_epsilon: float | None = None,
) -> CanaryAudit:
    """The one-run audit of K-ary randomized response: canary ``i``'s unit holds codeword 0
    when included and codeword 1 (its replace-one neighbour) when not; each of the
    ``releases_per_unit`` releases reports it by randomized response at ``epsilon``, and the
    score is how often 0 was reported minus how often 1 was.

    Randomized response meets its claim with equality here (the guesses are right with
    probability exactly e^eps / (1 + e^eps)), so a lower bound at confidence c exceeds an honest
    claim with probability 1 - c: hence the high default confidence.

    ``true_epsilon`` (test only) simulates a mechanism that keeps the codeword as often as
    ``true_epsilon`` would while claiming ``epsilon``.
    """
    if k_plus + k_minus > canaries:
        raise ValueError("more guesses than canaries")
    # pure epsilon-DP: the audit and the claim at delta 0, where composition adds epsilons
    claimed = epsilon * releases_per_unit
    used = RandomizedResponse("canary", true_epsilon or epsilon, symbols)
    rng = np.random.default_rng(seed)
    included = rng.random(canaries) < 0.5
    truth = np.where(included, 0, 1)
    kept = rng.random((releases_per_unit, canaries)) < used.keep_probability
    other = (truth + rng.integers(1, symbols, (releases_per_unit, canaries))) % symbols
    reported = np.where(kept, truth, other)
    scores = (reported == 0).sum(axis=0) - (reported == 1).sum(axis=0)
    order = np.argsort(scores + rng.random(canaries) * 0.5)  # ties broken at random
    correct = int(included[order[canaries - k_plus:]].sum() + (~included[order[:k_minus]]).sum())
    guesses = k_plus + k_minus
    bound = epsilon_lower_bound(canaries, guesses, correct, 0.0, confidence)
    return CanaryAudit(bound, claimed, canaries, guesses, correct, confidence)
