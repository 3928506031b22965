"""Privacy budgets that are checked before spending, and the odometer that holds what was spent.

:class:`PrivacyBudget` is a privacy filter: :meth:`PrivacyBudget.check` computes the epsilon of
the composition *after* the next releases and raises :class:`BudgetExhausted` if it would
exceed the budget, so the spent epsilon never passes the budget. The composed figure is taken
under the budget's neighbouring relation; releases recorded under another relation (DP-SGD
under add/remove, as Opacus accounts it) are re-analysed under it.

What composes depends on the privacy unit and on how the agent trains (``composition``):

* ``"episode"`` with composition ``"batch"``: every episode is used in exactly one batch (the
  caller's contract) and every network that shapes a release trains on it only under DP-SGD,
  so the releases that can depend on one episode are those of its batch: the T vector
  releases, the feedback release and the DP-SGD steps of that batch; later releases depend on
  it only through DP-SGD's output (post-processing). The check is per batch, and the spent
  epsilon is the largest over batches.
* ``"episode"`` with composition ``"all"``: a network that shapes releases trains on the
  episode without DP, so every later release can depend on it (its mean can move anywhere in
  the clip ball): all the agent's releases compose.
* ``"history"``: the unit is everything the agent holds, so all its releases over the run
  compose.

:class:`PrivacyAccount` is the odometer of one agent: it groups releases by unit, answers
:meth:`~PrivacyAccount.spent` and :meth:`~PrivacyAccount.check`, writes to the ledger before a
release with :meth:`~PrivacyAccount.spend`, and is rebuilt from ledger entries on restart
(:meth:`~PrivacyAccount.from_ledger`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .accountants import DEFAULT_ACCOUNTANT, Accountant, make_accountant
from .accountants.base import EPS_DECIMALS, check_delta
from .events import GaussianRelease, Relation, check_relation, common_relation
from .ledger import (
    UNITS,
    Composition,
    Ledger,
    Unit,
    composes_every_release,
    group_key,
    release_from_entry,
)


class BudgetExhausted(Exception):
    """The next release would take the composed epsilon past the budget; nothing was spent.

    Attributes
    ----------
    requested
        Epsilon of the composition including the refused releases.
    budget, spent, remaining
        The budget, the epsilon spent before the request and ``budget - spent``.
    difference
        ``requested - budget``: by how much the request exceeds the budget.
    """

    def __init__(self, requested: float, budget: float, spent: float, who: str = "") -> None:
        self.requested, self.budget, self.spent = requested, budget, spent
        self.remaining = remaining_budget(budget, spent)
        self.difference = requested - budget
        super().__init__(
            f"privacy budget exhausted{' for ' + who if who else ''}: the next release would "
            f"bring epsilon to {requested:.6f}, over the budget of {budget:.6f} by "
            f"{self.difference:.6f} (spent {spent:.6f}, remaining {self.remaining:.6f}); "
            "nothing was released")


def remaining_budget(budget: float, spent: float) -> float:
    """``budget - spent`` rounded down, never negative; ``inf`` for an infinite budget.

    An infinite budget (an agent that is not capped) stays infinite even after an
    infinite spend: ``inf - inf`` would be NaN, which no report can state.
    """
    if budget == math.inf:
        return math.inf
    return floor_eps(max(budget - spent, 0.0))


def floor_eps(value: float) -> float:
    """Round ``value`` down to the epsilon precision: remaining budgets err on the safe side."""
    scale = 10.0**EPS_DECIMALS
    return math.floor(value * scale) / scale if math.isfinite(value) else value


@dataclass(frozen=True)
class PrivacyBudget:
    """An (epsilon, delta) budget with the accountant and relation it is measured by.

    Parameters
    ----------
    epsilon, delta
        The budget: the composed releases must stay (epsilon, delta)-DP.
    accountant
        Accountant name or instance (resolved to an instance).
    relation
        Neighbouring relation of the composed guarantee.
    """

    epsilon: float
    delta: float
    accountant: str | Accountant = DEFAULT_ACCOUNTANT
    relation: Relation = "replace_one"

    def __post_init__(self) -> None:
        if not self.epsilon > 0:
            raise ValueError(f"epsilon budget must be positive, got {self.epsilon!r}")
        check_delta(self.delta)
        check_relation(self.relation)
        object.__setattr__(self, "accountant", make_accountant(self.accountant))

    def epsilon_of(self, releases: Sequence[GaussianRelease]) -> float:
        """Composed epsilon of ``releases`` under this budget's relation and accountant."""
        assert isinstance(self.accountant, Accountant)
        converted = [r.as_relation(self.relation) for r in releases]
        return self.accountant.epsilon(converted, self.delta)

    def check(self, spent: Sequence[GaussianRelease], next_releases: Sequence[GaussianRelease],
              who: str = "") -> float:
        """Epsilon after ``next_releases``; raise :class:`BudgetExhausted` if over budget."""
        requested = self.epsilon_of([*spent, *next_releases])
        if requested > self.epsilon:
            raise BudgetExhausted(requested, self.epsilon, self.epsilon_of(spent), who)
        return requested


@dataclass(frozen=True)
class Spent:
    """What an agent has spent: composed epsilon, epsilon per mechanism, and what is left."""

    composed: float
    per_mechanism: dict[str, float]
    budget: float
    delta: float
    remaining: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "remaining", remaining_budget(self.budget, self.composed))


class PrivacyAccount:
    """The odometer and filter of one agent's releases.

    Parameters
    ----------
    budget
        The agent's budget.
    unit
        The privacy unit, ``"episode"`` or ``"history"`` (module docstring).
    agent
        Name used in messages and in the ledger check of :meth:`from_ledger`.
    composition
        For the unit ``"episode"``: ``"batch"`` or ``"all"`` (module docstring).
    """

    def __init__(self, budget: PrivacyBudget, unit: Unit = "episode", agent: str = "",
                 composition: Composition = "batch") -> None:
        if unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
        composes_every_release(unit, composition)  # validates the composition
        self.budget, self.unit, self.agent = budget, unit, agent
        self.composition = composition
        self._groups: dict[int | None, list[GaussianRelease]] = {}
        self._cache: dict[int | None, tuple[float, dict[str, float]]] = {}

    def _key(self, batch: int) -> int | None:
        return group_key(self.unit, self.composition, batch)

    def releases(self, batch: int = 0) -> list[GaussianRelease]:
        """Releases that compose with a release in ``batch`` (all of them for ``history``)."""
        return list(self._groups.get(self._key(batch), []))

    def record(self, releases: Iterable[GaussianRelease], *, batch: int) -> None:
        """Add releases that were made (no check: use :meth:`check` or :meth:`spend` first)."""
        key = self._key(batch)
        self._groups.setdefault(key, []).extend(releases)
        self._cache.pop(key, None)

    def check(self, releases: Sequence[GaussianRelease], *, batch: int) -> float:
        """Composed epsilon after ``releases`` in ``batch``; raise :class:`BudgetExhausted`."""
        return self.budget.check(self.releases(batch), releases, self.agent)

    def spend(self, ledger: Ledger, releases: Sequence[GaussianRelease], *, round: int,
              batch: int) -> list[dict[str, Any]]:
        """Check, write every release to ``ledger``, record; release the values afterwards.

        Raises :class:`BudgetExhausted` before anything is written if the budget would be
        exceeded. Returns the ledger entries.
        """
        self.check(releases, batch=batch)
        entries = []
        for release in releases:
            entries.append(ledger.append(release, round=round, batch=batch, unit=self.unit))
            self.record([release], batch=batch)
        return entries

    def spent(self) -> Spent:
        """Epsilon spent, composed and per mechanism (the largest over batches for episodes)."""
        composed, per_mechanism = 0.0, {}
        for key, releases in self._groups.items():
            if key not in self._cache:
                self._cache[key] = (self.budget.epsilon_of(releases),
                                    mechanism_epsilons(releases, self.budget))
            eps, mechs = self._cache[key]
            composed = max(composed, eps)
            for name, value in mechs.items():
                per_mechanism[name] = max(per_mechanism.get(name, 0.0), value)
        return Spent(composed, per_mechanism, self.budget.epsilon, self.budget.delta)

    @classmethod
    def from_ledger(cls, entries: Iterable[Mapping[str, Any]], budget: PrivacyBudget,
                    unit: Unit = "episode", agent: str = "",
                    composition: Composition = "batch") -> PrivacyAccount:
        """Rebuild the account from ledger entries (after a restart)."""
        account = cls(budget, unit, agent, composition)
        for number, entry in enumerate(entries, 1):
            if entry["unit"] != unit:
                raise ValueError(f"ledger line {number} has unit {entry['unit']!r}, not {unit!r}")
            if agent and entry["agent"] != agent:
                raise ValueError(f"ledger line {number} belongs to agent {entry['agent']!r}")
            account.record([release_from_entry(entry)], batch=entry["batch"])
        return account


def mechanism_epsilons(releases: Sequence[GaussianRelease],
                       budget: PrivacyBudget) -> dict[str, float]:
    """Epsilon of each mechanism's releases alone, under the mechanism's own relation.

    A mechanism whose releases mix relations is analysed under the budget's relation.
    """
    assert isinstance(budget.accountant, Accountant)
    by_mechanism: dict[str, list[GaussianRelease]] = {}
    for r in releases:
        by_mechanism.setdefault(r.mechanism, []).append(r)
    result = {}
    for name, group in by_mechanism.items():
        try:
            common_relation(group)
        except ValueError:
            group = [r.as_relation(budget.relation) for r in group]
        result[name] = budget.accountant.epsilon(group, budget.delta)
    return result
