"""The unit of accounting: one release, or ``count`` identical ones: Gaussian
(:class:`GaussianRelease`), K-ary randomized response (:class:`RandomizedResponse`) or
Skellam (:class:`SkellamRelease`, integer noise whose sum over agents is Skellam again: the
mechanism of distributed client-level DP under secure aggregation).

A release adds ``N(0, (noise_multiplier * clip)^2 I)`` to a value whose per-unit contribution
is clipped to L2 norm ``clip``. What an accountant needs besides the noise is the *true* L2
sensitivity under the neighbouring relation in force:

* ``"replace_one"`` (the default): one unit is replaced by another. Two clipped contributions
  can point in opposite directions, so the sensitivity of an unsampled release is ``2 * clip``.
* ``"add_remove"``: one unit is added or removed (Opacus' DP-SGD analysis). The sensitivity of
  an unsampled release is ``clip``.

Poisson-sampled releases (``sample_rate < 1``) enter the sum only when the unit is sampled.
Their privacy depends on the relation as well as on the sensitivity, so every release carries
its relation; :meth:`GaussianRelease.as_relation` re-expresses a release under the other one.
A composed figure is only meaningful under one relation, so accountants refuse mixed sequences.

How each accountant treats a sampled release under replace-one is documented in its module:
the PLD accountant uses dp-accounting's replace-one analysis of the Poisson-subsampled Gaussian,
the RDP and PRV accountants use provable upper bounds built from the add/remove analysis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal, get_args

Relation = Literal["replace_one", "add_remove"]
RELATIONS: tuple[str, ...] = get_args(Relation)
RELATION_FACTOR: dict[str, float] = {"replace_one": 2.0, "add_remove": 1.0}
"""L2 sensitivity of an unsampled clipped release, in units of the clip norm."""


def check_relation(relation: str) -> str:
    """Return ``relation`` if it is known, else raise a ``ValueError`` naming the choices."""
    if relation not in RELATIONS:
        raise ValueError(f"unknown neighbouring relation {relation!r}; choose one of {RELATIONS}")
    return relation


@dataclass(frozen=True)
class GaussianRelease:
    """``count`` identical releases of a clipped value plus Gaussian noise.

    Parameters
    ----------
    mechanism
        Name of the mechanism (``"message"``, ``"feedback"``, ``"dpsgd"``, ...). Reports group
        releases by it.
    noise_multiplier
        Noise standard deviation divided by ``clip``: what the mechanism was configured with.
    clip
        L2 norm bound on one unit's contribution.
    sensitivity
        True L2 distance between the clipped values on two neighbouring inputs: ``2 * clip``
        for replace-one, ``clip`` for add/remove, more if one unit contributes several times
        (use :func:`gaussian_release` to get it right).
    sample_rate
        Poisson sampling rate q of the unit; ``1.0`` means no sampling.
    count
        Number of identical, self-composed releases this object stands for.
    relation
        Neighbouring relation the sensitivity was derived for.
    """

    mechanism: str
    noise_multiplier: float
    clip: float
    sensitivity: float
    sample_rate: float = 1.0
    count: int = 1
    relation: Relation = "replace_one"

    def __post_init__(self) -> None:
        if not isinstance(self.mechanism, str) or not self.mechanism:
            raise ValueError("mechanism must be a non-empty string")
        for name in ("noise_multiplier", "clip", "sensitivity", "sample_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value!r}")
        if self.clip <= 0:
            raise ValueError(f"clip must be positive, got {self.clip!r}")
        if self.noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier!r}")
        if self.sensitivity <= 0:
            raise ValueError(f"sensitivity must be positive, got {self.sensitivity!r}")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate!r}")
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ValueError(f"count must be an integer >= 1, got {self.count!r}")
        check_relation(self.relation)

    @property
    def std(self) -> float:
        """Standard deviation of the noise added to each coordinate."""
        return self.noise_multiplier * self.clip

    @property
    def noiseless(self) -> bool:
        """A release without noise: no epsilon bounds it."""
        return self.noise_multiplier == 0

    @property
    def effective_noise(self) -> float:
        """Noise standard deviation per unit of true sensitivity: ``z = std / sensitivity``.

        For an unsampled release this alone fixes the privacy loss (a Gaussian mechanism with
        sensitivity 1 and noise ``z``).
        """
        return self.std / self.sensitivity

    @property
    def sampled(self) -> bool:
        """Whether the unit enters through Poisson sampling."""
        return self.sample_rate < 1.0

    def as_relation(self, relation: Relation) -> GaussianRelease:
        """The same release analysed under ``relation``.

        The contribution of one unit lies in a ball of radius ``r``; its sensitivity is ``r``
        under add/remove and ``2 r`` under replace-one. Converting scales the sensitivity by
        the ratio, which keeps any extra factor (a unit contributing several times) intact.
        """
        check_relation(relation)
        if relation == self.relation:
            return self
        scale = RELATION_FACTOR[relation] / RELATION_FACTOR[self.relation]
        return replace(self, sensitivity=self.sensitivity * scale, relation=relation)

    def with_count(self, count: int) -> GaussianRelease:
        """The same release self-composed ``count`` times."""
        return replace(self, count=count)


@dataclass(frozen=True)
class RandomizedResponse:
    """``count`` releases of one of ``symbols`` values by K-ary randomized response.

    The true value is released with probability ``e^eps / (e^eps + K - 1)``, each other with
    ``1 / (e^eps + K - 1)``: pure ``epsilon``-DP for any change of the unit, so the release is
    the same under either relation, and Rényi and privacy loss distributions of it are exact.

    Parameters
    ----------
    mechanism
        Name of the mechanism; reports group releases by it.
    epsilon
        Epsilon of one release (finite, positive).
    symbols
        K, the number of values (at least 2).
    count, relation
        As in :class:`GaussianRelease`.
    """

    mechanism: str
    epsilon: float
    symbols: int
    count: int = 1
    relation: Relation = "replace_one"

    def __post_init__(self) -> None:
        if not isinstance(self.mechanism, str) or not self.mechanism:
            raise ValueError("mechanism must be a non-empty string")
        if isinstance(self.epsilon, bool) or not isinstance(self.epsilon, (int, float)) \
                or not 0 < self.epsilon < math.inf:
            raise ValueError(f"epsilon must be positive and finite, got {self.epsilon!r}")
        if isinstance(self.symbols, bool) or not isinstance(self.symbols, int) \
                or self.symbols < 2:
            raise ValueError(f"symbols must be an integer >= 2, got {self.symbols!r}")
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ValueError(f"count must be an integer >= 1, got {self.count!r}")
        check_relation(self.relation)

    sampled = False
    sample_rate = 1.0
    noiseless = False

    @property
    def keep_probability(self) -> float:
        """The probability that the true value is released."""
        return 1.0 / (1.0 + (self.symbols - 1) * math.exp(-self.epsilon))

    @property
    def uniform_probability(self) -> float:
        """The probability of answering uniformly at random (dp-accounting's parameter):
        ``K / (e^eps + K - 1)``."""
        return self.symbols / (math.exp(self.epsilon) + self.symbols - 1)

    def as_relation(self, relation: Relation) -> RandomizedResponse:
        """The same release under ``relation``: pure epsilon-DP holds under either."""
        check_relation(relation)
        return self if relation == self.relation else replace(self, relation=relation)

    def with_count(self, count: int) -> RandomizedResponse:
        return replace(self, count=count)


@dataclass(frozen=True)
class SkellamRelease:
    """``count`` releases of an integer vector plus Skellam noise of ``variance`` per
    coordinate (the difference of two Poisson variables of mean ``variance / 2``).

    A sum of independent Skellam variables is Skellam with the summed variance, so agents that
    each add a share of the noise to their integer updates, summed under secure aggregation,
    release exactly this mechanism. Its Rényi DP (Agarwal, Kairouz and Liu, "The Skellam
    Mechanism for Differentially Private Federated Learning", NeurIPS 2021, Theorem 3.5), for
    integer orders ``a > 1``::

        a D2^2 / (2 mu) + min(((2a - 1) D2^2 + 6 D1) / (4 mu^2), 3 D1 / (2 mu))

    with ``mu = variance`` and ``D1``, ``D2`` the L1 and L2 sensitivities of the integer
    vector under ``relation``. Only the RDP accountant composes it.

    Parameters
    ----------
    mechanism
        Name of the mechanism; reports group releases by it.
    variance
        Variance of the noise per coordinate (at least the sum's, where agents add shares).
    l2_sensitivity, l1_sensitivity
        Largest L2 and L1 distance between the integer vectors of two neighbouring inputs.
    count, relation
        As in :class:`GaussianRelease`.
    """

    mechanism: str
    variance: float
    l2_sensitivity: float
    l1_sensitivity: float
    count: int = 1
    relation: Relation = "replace_one"

    sampled = False
    sample_rate = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.mechanism, str) or not self.mechanism:
            raise ValueError("mechanism must be a non-empty string")
        for name in ("variance", "l2_sensitivity", "l1_sensitivity"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not 0 <= value < math.inf:
                raise ValueError(f"{name} must be a non-negative finite number, got {value!r}")
        if not self.l2_sensitivity > 0 or self.l1_sensitivity < self.l2_sensitivity:
            raise ValueError("l2_sensitivity must be positive and l1_sensitivity at least it")
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ValueError(f"count must be an integer >= 1, got {self.count!r}")
        check_relation(self.relation)

    @property
    def noiseless(self) -> bool:
        return self.variance == 0

    def rdp(self, order: float) -> float:
        """Rényi DP of all ``count`` releases at ``order`` (``inf`` where the bound is not
        proven: orders that are not integers)."""
        if order <= 1 or order != int(order):
            return math.inf
        a, mu = float(order), float(self.variance)
        d2, d1 = float(self.l2_sensitivity) ** 2, float(self.l1_sensitivity)
        one = a * d2 / (2 * mu) + min(((2 * a - 1) * d2 + 6 * d1) / (4 * mu**2),
                                      3 * d1 / (2 * mu))
        return one * self.count

    def as_relation(self, relation: Relation) -> SkellamRelease:
        """The same release under ``relation`` (sensitivities scaled as a Gaussian's)."""
        check_relation(relation)
        if relation == self.relation:
            return self
        scale = RELATION_FACTOR[relation] / RELATION_FACTOR[self.relation]
        return replace(self, l2_sensitivity=self.l2_sensitivity * scale,
                       l1_sensitivity=self.l1_sensitivity * scale, relation=relation)

    def with_count(self, count: int) -> SkellamRelease:
        return replace(self, count=count)


Release = GaussianRelease | RandomizedResponse | SkellamRelease
"""Any release an accountant composes."""


def gaussian_release(
    mechanism: str,
    noise_multiplier: float,
    clip: float,
    *,
    relation: Relation = "replace_one",
    sample_rate: float = 1.0,
    count: int = 1,
    contributions: float = 1.0,
) -> GaussianRelease:
    """Build a release whose sensitivity is right for ``relation``.

    Parameters
    ----------
    contributions
        Upper bound on how many clipped terms of one unit enter the released sum (for example
        the transitions of one episode in a DP-SGD batch). The sensitivity grows linearly.
    """
    check_relation(relation)
    if not contributions >= 1:
        raise ValueError(f"contributions must be >= 1, got {contributions!r}")
    sensitivity = RELATION_FACTOR[relation] * clip * contributions
    return GaussianRelease(mechanism, noise_multiplier, clip, sensitivity, sample_rate, count,
                           relation)


def common_relation(releases: list[Release] | tuple[Release, ...]) -> str | None:
    """The one relation all ``releases`` share (``None`` if empty); raise if they are mixed."""
    relations = {r.relation for r in releases}
    if len(relations) > 1:
        raise ValueError(
            f"releases mix neighbouring relations {sorted(relations)}; a composed epsilon holds "
            "for one relation: convert them with GaussianRelease.as_relation first")
    return relations.pop() if relations else None


def merge(releases: list[Release] | tuple[Release, ...]) -> list[Release]:
    """Fold ``releases`` into the fewest releases with the same composed privacy loss.

    Accountants run in time proportional to the number of distinct releases, so this is how
    they read a long history cheaply. Two identities are used, both exact:

    * the loss of a release depends only on its effective noise ``z``, sampling rate and
      relation, and composition does not depend on order: equal ones add their counts;
    * unsampled Gaussian releases compose into one Gaussian with
      ``z = (sum_t count_t / z_t^2) ** -1/2``.

    The result is normalised to ``clip = sensitivity = 1`` and ``noise_multiplier = z``.
    Randomized responses with the same epsilon and symbols add their counts, and so do
    identical Skellam releases.
    """
    counts: dict[tuple[float, float, str], tuple[str, int]] = {}
    responses: dict[tuple[float, int, str], tuple[str, int]] = {}
    skellams: dict[SkellamRelease, int] = {}
    inverse_var, first_unsampled = 0.0, None
    for r in releases:
        if isinstance(r, SkellamRelease):
            key_s = r.with_count(1)
            skellams[key_s] = skellams.get(key_s, 0) + r.count
            continue
        if isinstance(r, RandomizedResponse):
            key = (float(r.epsilon), r.symbols, r.relation)
            name, n = responses.get(key, (r.mechanism, 0))
            responses[key] = (name, n + r.count)
            continue
        if not r.sampled and r.noise_multiplier > 0:
            inverse_var += r.count / r.effective_noise**2
            first_unsampled = first_unsampled or r
            continue
        key = (r.effective_noise, r.sample_rate, r.relation)
        name, n = counts.get(key, (r.mechanism, 0))
        counts[key] = (name, n + r.count)
    merged: list[Release] = [GaussianRelease(name, z, 1.0, 1.0, q, n, rel)
                             for (z, q, rel), (name, n) in counts.items()]
    merged += [RandomizedResponse(name, eps, k, n, rel)
               for (eps, k, rel), (name, n) in responses.items()]
    merged += [r.with_count(n) for r, n in skellams.items()]
    if first_unsampled is not None:
        merged.insert(0, GaussianRelease(first_unsampled.mechanism, inverse_var**-0.5, 1.0, 1.0,
                                         1.0, 1, first_unsampled.relation))
    return merged
