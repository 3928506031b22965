"""Which agents' updates are summed together under secure aggregation.

An agent's update covers the arrays it sends the server (``releases.schedule``: its parts of
the shared module, its type's copy of them with ``share="role"``, its type's private networks
with ``aggregate_private``). Agents that send the same arrays form a *cohort*: SecAgg+ sums
vectors of one shape, so each cohort is one secure sum, and the server learns each cohort's
sum and nothing of any member's update. Agent and server derive the cohorts from the run's
configuration alone, so an agent knows how many share its noise before it adds its own.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import replace

from fedcomm.config import FederationConfig
from fedcomm.privacy.skellam import SkellamCodec
from fedcomm.releases.schedule import averages_private, initial_routes, shared_parts

MIN_COHORT = 3
"""A sum of two inputs tells each of them the other's: a cohort needs three agents at least."""


def cohorts(fed: FederationConfig) -> tuple[tuple[int, ...], ...]:
    """The run's cohorts, each the indices of the agents that send the same arrays (agents
    that send nothing are in none)."""
    return _cohorts(fed.to_json())


def cohort_of(fed: FederationConfig, index: int) -> tuple[int, ...]:
    """The cohort of agent ``index`` (empty if it sends nothing)."""
    return next((c for c in cohorts(fed) if index in c), ())


def codec(fed: FederationConfig, cohort: int, dim: int) -> SkellamCodec:
    """The encoding of the updates of a cohort of ``cohort`` agents, ``dim`` coordinates each,
    with the noise ``client_dp_noise`` the agents add between them (``clip_of``)."""
    return SkellamCodec(clip_of(fed, dim), fed.client_dp_noise, cohort, dim)


def clip_of(fed: FederationConfig, dim: int) -> float:
    """The L2 bound of an agent's update of ``dim`` coordinates: ``client_dp_clip`` under
    client-level DP; else the furthest an honest agent's optimizer moves it in a round (Adam's
    bound per step and coordinate, ``TrainConfig.step_reach``, as the server checks an update
    sent in the clear), which clips no honest update."""
    if fed.client_dp_noise > 0:
        return fed.client_dp_clip
    return fed.train.step_reach(fed.batches_per_round) * math.sqrt(dim)


def check_cohorts(fed: FederationConfig) -> None:
    """Raise ``ValueError`` (one line) where a cohort is too small to hide its members."""
    small = [c for c in cohorts(fed) if len(c) < MIN_COHORT]
    if small:
        ids = fed.spec.agent_ids
        names = "; ".join(", ".join(ids[i] for i in c) for c in small)
        raise ValueError(f"secure_aggregation sums the updates of agents that send the same "
                         f"arrays, at least {MIN_COHORT} of them: too few in {names} (run more "
                         "sites, or share less)")


@functools.lru_cache(maxsize=64)
def _cohorts(config: str) -> tuple[tuple[int, ...], ...]:
    fed = FederationConfig.from_json(config)
    spec, routes = fed.spec, initial_routes(fed.train)
    by: dict[tuple, list[int]] = {}
    for index in range(spec.n_agents):
        name = spec.types[spec.type_of_agent[index]].name
        parts = tuple(sorted(shared_parts(spec, fed.share, routes, index)))
        private = averages_private(spec, fed.share, fed.aggregate_private, routes, index)
        signature = (parts, name if parts and fed.share == "role" else None,
                     name if private else None)
        if parts or private:
            by.setdefault(signature, []).append(index)
    return tuple(tuple(members) for members in by.values())


def noise_for_epsilon(fed: FederationConfig, epsilon: float, dims: Sequence[int]) -> float:
    """A ``client_dp_noise`` (to 4 significant digits) whose releases over the run's rounds cost
    every agent of every cohort at most ``epsilon`` at the run's delta, checked at the value
    returned (``dims``: each cohort's coordinates, in ``cohorts`` order). ``ValueError`` past
    10^4."""
    from fedcomm.privacy.accountants import make_accountant

    rdp, delta = make_accountant("rdp"), fed.train.privacy.delta

    def cost(noise: float) -> float:
        trial = replace(fed, client_dp_noise=noise, client_dp_epsilon=None)
        return max(rdp.epsilon([codec(trial, len(c), d).release().with_count(fed.rounds)],
                               delta) for c, d in zip(cohorts(fed), dims, strict=True))

    low, high = 1e-3, 1e4
    if cost(high) > epsilon:
        raise ValueError(f"client_dp_epsilon {epsilon:g} needs noise above {high:g}")
    while high / low > 1 + 1e-5:
        mid = math.sqrt(low * high)
        low, high = (low, mid) if cost(mid) <= epsilon else (mid, high)
    places = 3 - math.floor(math.log10(high))
    noise = round(math.ceil(high * 10**places) / 10**places, places)
    while cost(noise) > epsilon:  # the scale steps at powers of two: the cost is not monotone
        noise = round(noise + 10**-places, places)
    return noise
