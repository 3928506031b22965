"""One agent's privacy account at run time: its ledger, its budget and its noise source.

Every release is checked against the agent's budget and written to its ledger (fsync'd,
hash-chained) before it happens, so a crash can over-count a release but never under-count
one. An agent whose next batch would exceed its budget releases nothing more.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fedcomm.config import TeamConfig
from fedcomm.privacy.budget import BudgetExhausted, PrivacyAccount, PrivacyBudget, Spent
from fedcomm.privacy.config import PrivacyConfig
from fedcomm.privacy.events import GaussianRelease
from fedcomm.privacy.ledger import Composition, Ledger, config_hash
from fedcomm.privacy.noise import secure_generator
from fedcomm.releases.schedule import batch_releases, for_unit
from fedcomm.sim.base import EnvSpec

LEDGER = "ledger.jsonl"


class AgentPrivacy:
    """The ledger, the odometer and the noise source of one agent.

    Parameters
    ----------
    agent, index
        The agent's id and its index in ``spec``.
    team
        The channel settings (noise multipliers and clip norms of vectors and feedback).
    cfg
        The run's privacy settings.
    ledger_path
        The agent's ledger; an existing one is verified and continued.
    run_config
        The run configuration every ledger entry is bound to by its hash.
    device
        Where the noise is drawn: the device the agent's vectors are on.
    composition
        Which of its releases compose for a unit (``composition_for`` its training).
    episodes
        Episodes per batch: what each release counts for the unit (``for_unit``).
    seeded_noise
        Draw the noise from the agent's seeded stream instead of its secure source: test
        randomness, marked in every ledger entry (``fedcomm audit`` fails such a run).
    """

    def __init__(self, agent: str, index: int, spec: EnvSpec, team: TeamConfig,
                 cfg: PrivacyConfig, ledger_path: Path, run_config: dict[str, Any],
                 device: str | torch.device = "cpu", composition: Composition = "batch",
                 episodes: int = 1, seeded_noise: bool = False) -> None:
        self.agent, self.index, self.spec, self.team, self.cfg = agent, index, spec, team, cfg
        self.composition, self.episodes = composition, episodes
        self.ledger = Ledger(ledger_path, agent, config_hash(run_config),
                             noise="seeded" if seeded_noise else "secure")
        budget = PrivacyBudget(cfg.budget, cfg.delta, cfg.accountant, cfg.relation)
        self.account = PrivacyAccount.from_ledger(self.ledger.entries, budget, cfg.unit, agent,
                                                  composition)
        self.noise = None if seeded_noise else secure_generator(device=device)

    def batch_releases(self, routes: Tensor, extra: Sequence[GaussianRelease] = ()
                       ) -> list[GaussianRelease]:
        """Everything the agent releases in one episode batch under ``routes``, plus ``extra``
        (its DP-SGD steps), as they cost one unit."""
        releases = batch_releases(self.spec, self.team, self.cfg.relation, routes, self.index,
                                  extra)
        return for_unit(releases, self.cfg.unit, self.composition, self.episodes)

    @property
    def next_batch(self) -> int:
        """The batch number after the last one in the ledger (0 for an empty ledger)."""
        entries = self.ledger.entries
        return entries[-1]["batch"] + 1 if entries else 0

    def allows(self, releases: Sequence[GaussianRelease], *, batch: int) -> bool:
        """Whether the budget allows ``releases``; ``False``: the agent must stay silent
        (``on_budget_spent="stop"`` raises instead). Nothing is written."""
        try:
            self.account.check(releases, batch=batch)
        except BudgetExhausted:
            if self.cfg.on_budget_spent == "stop":
                raise
            return False
        return True

    def charge(self, releases: Sequence[GaussianRelease], *, round: int, batch: int) -> None:
        """Write ``releases`` before they happen (raises BudgetExhausted if not allowed)."""
        if releases:
            self.account.spend(self.ledger, releases, round=round, batch=batch)

    def spent(self) -> Spent:
        return self.account.spent()

    def close(self) -> None:
        self.ledger.close()
