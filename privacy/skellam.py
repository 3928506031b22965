"""Distributed client-level DP for secure aggregation: each agent's update as integers with its
share of Skellam noise, so that the sum the server unmasks is a Skellam mechanism.

An agent clips its update (its module minus the global one it was sent) to L2 norm ``clip``,
scales it by ``scale`` and rounds it to integers, adds Skellam noise of variance
``variance / (threshold - 1)`` per coordinate and reduces the result modulo ``target_range``.
The server's sum of ``m >= threshold`` such vectors (Flower's SecAgg+ sums modulo a multiple of
``target_range``) is, modulo ``target_range``, the sum of the integer updates plus Skellam noise
of variance ``m / (threshold - 1) * variance``: with any one input's share known (a member of
the cohort, or the server with one), ``threshold - 1`` shares, ``variance``, remain. So what the
server, or one member, learns of the round is a deterministic function of a Skellam mechanism
of variance ``variance``: one :class:`~fedcomm.privacy.events.SkellamRelease` per agent,
whatever the dropouts, as long as the sum is unmasked at all (SecAgg+ unmasks only with
``threshold`` agents). Nothing is clipped after the noise (the reduction wraps): there is no
tail event to add to delta.

The sensitivity of one agent's integer vector under replace-one is
``2 (scale * clip + sqrt(dim) / 2)`` in L2 (rounding moves each coordinate by at most 1/2) and
``sqrt(dim)`` times that in L1. ``noise`` is the Gaussian-like multiplier: the sum's noise has
standard deviation ``noise * clip`` in the update's units, as server-side client-level DP adds.

Every scale is a power of two, so the vectors pass Flower's quantizer
(``flwr.common.secure_aggregation.quantization.quantize`` with ``clipping_range`` and
``target_range``) unchanged: its stochastic rounding sees integers and rounds none.
The noise is torch's Poisson sampler in float64 (floating-point, as all noise here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .events import SkellamRelease

MECHANISM = "client_update"
RESOLUTION = 2**20  # the integer length of a clipped update: rounding costs sqrt(dim)/2 of it
NOISE_LENGTH = 2**24  # at most the noise's standard deviation in integers: Poisson means stay
# below 2^47, where float64 holds every integer
MARGIN = 8.0  # noise standard deviations the decoded sum keeps clear of the wrap


def threshold_of(agents: int) -> int:
    """SecAgg+'s reconstruction threshold for a cohort of ``agents``: two thirds, at least 3
    (a sum of two tells each the other's). A sum is unmasked only with this many agents'
    inputs in it."""
    return max(3, math.ceil(2 * agents / 3))


@dataclass(frozen=True)
class SkellamCodec:
    """The integer encoding of one cohort's updates.

    Parameters
    ----------
    clip
        L2 bound of an agent's whole update in the cohort.
    noise
        Standard deviation of the sum's noise over ``clip`` (0: secure aggregation alone).
    agents
        The cohort: the agents whose updates are summed.
    dim
        Coordinates of one agent's update.
    """

    clip: float
    noise: float
    agents: int
    dim: int

    def __post_init__(self) -> None:
        if not (0 < self.clip < math.inf and 0 <= self.noise < math.inf):
            raise ValueError("clip must be positive and finite, noise non-negative and finite")
        if self.agents < 3 or self.dim < 1:
            raise ValueError("a cohort has three agents or more, and an update one coordinate")

    @property
    def threshold(self) -> int:
        return threshold_of(self.agents)

    @property
    def target_range(self) -> int:
        """Integers are reduced modulo this power of two; ``agents`` of them and Flower's
        weight factor stay below SecAgg+'s modulus, 2^32."""
        return 2 ** (31 - self.agents.bit_length())

    @property
    def scale(self) -> float:
        """Integers per unit of the update (a power of two): a clipped update is at most
        ``RESOLUTION`` long, its noise's standard deviation at most ``NOISE_LENGTH``, and the
        largest sum (``agents`` clipped updates and ``MARGIN`` standard deviations of the most
        noise it can hold) within half the range."""
        worst_noise = self.noise * math.sqrt(self.agents / (self.threshold - 1))
        reach = self.agents + MARGIN * worst_noise + 1  # per coordinate, in clipped lengths
        length = min(RESOLUTION, self.target_range / (4 * reach),
                     NOISE_LENGTH / max(self.noise, 1.0))
        return 2.0 ** math.floor(math.log2(length / self.clip))

    @property
    def clipping_range(self) -> float:
        """Flower's quantizer range: the integers ``[-T/2, T/2)`` over ``scale``."""
        return self.target_range / (2 * self.scale)

    @property
    def variance(self) -> float:
        """Variance per coordinate of the noise that ``threshold - 1`` inputs hold together:
        what protects one agent in a sum, one other input's share known."""
        return (self.noise * self.scale * self.clip) ** 2

    @property
    def share(self) -> float:
        """Variance per coordinate of one agent's noise."""
        return self.variance / (self.threshold - 1)

    def release(self) -> SkellamRelease | None:
        """What one round of an agent's input releases (``None`` without noise)."""
        if self.noise == 0:
            return None
        l2 = 2 * (self.scale * self.clip + math.sqrt(self.dim) / 2)
        return SkellamRelease(MECHANISM, self.variance, l2, l2 * math.sqrt(self.dim))

    def encode(self, update: np.ndarray, generator: torch.Generator) -> np.ndarray:
        """An agent's update as Flower's quantizer takes it: clipped, scaled, rounded, its
        noise share added, reduced modulo the range, in ``[-clipping_range,
        clipping_range)``."""
        update = np.asarray(update, dtype=np.float64).ravel()
        if update.size != self.dim:
            raise ValueError(f"an update of {self.dim} coordinates, got {update.size}")
        # a coordinate that is not finite counts as 0: a function of the agent's data like any
        # other, inside the clip, so nothing of it leaves the mechanism (not even a failure)
        update = np.nan_to_num(update, nan=0.0, posinf=0.0, neginf=0.0)
        norm = float(np.linalg.norm(update))
        if norm > self.clip:
            update = update * (self.clip / norm)
        integers = np.rint(update * self.scale)
        if self.noise > 0:
            rate = torch.full((self.dim,), self.share / 2,
                              dtype=torch.float64)
            share = torch.poisson(rate, generator) - torch.poisson(rate, generator)
            integers = integers + share.numpy()
        t = self.target_range
        wrapped = np.mod(integers, t)
        return (wrapped - t / 2) / self.scale

    def decode(self, mean: np.ndarray, count: int) -> np.ndarray:
        """The sum of ``count`` agents' inputs from Flower's unmasked mean of them: the
        integers modulo the range, centred, over ``scale``."""
        t, c = self.target_range, self.clipping_range
        total = np.rint((np.asarray(mean, dtype=np.float64) + c) * count * self.scale)
        centred = np.mod(total + t / 2, t) - t / 2
        return centred / self.scale

    def sum_bound(self, count: int) -> float:
        """The longest sum of ``count`` honest inputs, but with probability below e^-30: their
        clipped updates, rounding, and the noise (a chi bound, Laurent and Massart 2000)."""
        var = count * self.share / self.scale**2
        x = 30.0
        noise = math.sqrt(var * (self.dim + 2 * math.sqrt(self.dim * x) + 2 * x))
        rounding = count * math.sqrt(self.dim) / (2 * self.scale)
        return count * self.clip + rounding + noise
