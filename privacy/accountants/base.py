"""The interface every accountant implements, and the rounding they share.

An accountant turns a sequence of :class:`~fedcomm.privacy.events.Release` into an
(epsilon, delta) guarantee for their composition. The releases may differ (noise changing
between rounds, sampled and unsampled releases mixed) but must share one neighbouring relation.

Every value an accountant returns is an upper bound, rounded to the safe side: epsilon is
rounded *up* to the next multiple of ``1e-6`` (:func:`round_up`), delta up to the next float.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from typing import Any, ClassVar

from ..events import Release, common_relation, merge

EPS_DECIMALS = 6
"""Epsilon is rounded up to this many decimals."""


def round_up(value: float, decimals: int = EPS_DECIMALS) -> float:
    """Round ``value`` up to ``decimals`` decimals; the result is never below ``value``."""
    if not math.isfinite(value):
        return value
    scale = 10.0**decimals
    rounded = math.ceil(value * scale) / scale
    while rounded < value:
        rounded = math.nextafter(rounded, math.inf)
    return rounded


def check_delta(delta: float) -> float:
    """Return ``delta`` if it lies in (0, 1), else raise ``ValueError``."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    return delta


class Accountant(abc.ABC):
    """Composes Gaussian releases into (epsilon, delta).

    Subclasses implement :meth:`_epsilon` (and optionally :meth:`_delta`) on releases that are
    already merged (identical releases folded into one ``count``), non-empty and noisy; the
    public methods handle validation, the trivial cases and rounding. Epsilons are kept per
    merged sequence and delta: an agent's batches release the same thing again and again.
    """

    name: ClassVar[str]
    CACHE_SIZE: ClassVar[int] = 4096

    def epsilon(self, releases: Sequence[Release], delta: float) -> float:
        """Smallest epsilon this accountant can certify for ``releases`` at ``delta``.

        Returns ``0.0`` for no releases and ``inf`` if any release has no noise. Raises
        ``ValueError`` if the releases mix neighbouring relations.
        """
        check_delta(delta)
        releases = self._prepare(releases)
        if not releases:
            return 0.0
        if any(r.noiseless for r in releases):
            return math.inf
        key = (tuple(sorted(releases, key=repr)), delta)
        cache = self.__dict__.setdefault("_cache", {})
        if key not in cache:
            if len(cache) >= self.CACHE_SIZE:
                cache.pop(next(iter(cache)))
            cache[key] = round_up(float(self._epsilon(releases, delta)))
        return cache[key]

    def delta(self, releases: Sequence[Release], epsilon: float) -> float:
        """Smallest delta this accountant can certify for ``releases`` at ``epsilon``."""
        if not epsilon >= 0:
            raise ValueError(f"epsilon must be >= 0, got {epsilon!r}")
        releases = self._prepare(releases)
        if not releases:
            return 0.0
        if any(r.noiseless for r in releases):
            return 1.0
        value = float(self._delta(releases, epsilon))
        return min(1.0, math.nextafter(max(value, 0.0), math.inf))

    def describe(self) -> dict[str, Any]:
        """Name and options, enough to rebuild this accountant with ``make_accountant``."""
        return {"name": self.name, **self.options()}

    def options(self) -> dict[str, Any]:
        """Constructor options (JSON values) that change the numbers this accountant gives."""
        return {}

    @staticmethod
    def _prepare(releases: Sequence[Release]) -> list[Release]:
        releases = list(releases)
        common_relation(releases)
        return merge(releases)

    @abc.abstractmethod
    def _epsilon(self, releases: list[Release], delta: float) -> float:
        """Epsilon of merged, noisy, non-empty ``releases`` with one relation."""

    def _delta(self, releases: list[Release], epsilon: float) -> float:
        """Delta of merged, noisy, non-empty ``releases`` with one relation."""
        raise NotImplementedError(f"the {self.name} accountant does not compute delta")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({args})"
