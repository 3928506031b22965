"""What a run promises about privacy: unit, relation, delta, budget, accountant, calibration."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from fedcomm.privacy.events import check_relation

UNITS = ("episode", "history")


@dataclass
class PrivacyConfig:
    """The privacy settings of a run; they appear in every ledger entry's config hash and in
    the report.

    Parameters
    ----------
    unit
        ``"episode"``: one episode of one agent (the releases of the batch that used it
        compose); ``"history"``: everything one agent releases in the run.
    relation
        ``"replace_one"`` (sensitivity 2C) or ``"add_remove"`` (C).
    delta
        Delta of every epsilon.
    epsilon_budget
        Each agent's epsilon budget for the unit; ``None``: accounted and reported, not capped.
    message_epsilon, feedback_epsilon, update_epsilon
        Calibrate the noise multiplier of the knowledge vectors, of the feedback (for an agent
        that every other agent's vectors reach) and of the DP-SGD update so that one unit's
        releases of that mechanism in one batch cost at most this (rounded to the safe side);
        ``None``: use the configured noise multiplier.
    accountant
        ``"rdp"`` (default), ``"pld"`` or ``"prv"``: the accountant budgets are checked with.
    on_budget_spent
        An agent whose next batch would exceed its budget goes ``"silent"`` (acts, releases
        nothing, the run goes on without its vectors, feedback and updates) or ``"stop"``s the
        run.
    seeded_noise
        Draw privacy noise from the agent's seeded stream instead of a cryptographically
        seeded one: reproducible, for tests only.
    update_noise_multiplier, update_clip, update_sample_rate
        DP-SGD on a federated agent's whole model, whose shared part it sends to the server:
        each step Poisson-samples episodes with the rate (default ``1 / minibatches``), clips
        each episode's gradient to ``update_clip`` and adds noise. ``None``: plain PPO, and the
        update the server receives is reported as a release without DP.
    """

    unit: Literal["episode", "history"] = "episode"
    relation: Literal["replace_one", "add_remove"] = "replace_one"
    delta: float = 1e-5
    epsilon_budget: float | None = None
    message_epsilon: float | None = None
    feedback_epsilon: float | None = None
    update_epsilon: float | None = None
    accountant: str = "rdp"
    on_budget_spent: Literal["silent", "stop"] = "silent"
    seeded_noise: bool = False
    update_noise_multiplier: float | None = None
    update_clip: float = 1.0
    update_sample_rate: float | None = None

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ValueError(f"privacy unit must be one of {UNITS}, got {self.unit!r}")
        check_relation(self.relation)
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must lie in (0, 1), got {self.delta}")
        for name in ("epsilon_budget", "message_epsilon", "feedback_epsilon", "update_epsilon"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be positive and finite, got {value}")
        if self.accountant not in ("rdp", "pld", "prv"):
            raise ValueError(f"accountant must be rdp, pld or prv, got {self.accountant!r}")
        if self.update_noise_multiplier is not None and not self.update_noise_multiplier >= 0:
            raise ValueError("update_noise_multiplier must be non-negative")
        if not 0 < self.update_clip < math.inf:
            raise ValueError(f"update_clip must be positive and finite, got {self.update_clip}")
        if self.update_sample_rate is not None and not 0 < self.update_sample_rate <= 1:
            raise ValueError(f"update_sample_rate must lie in (0, 1], got "
                             f"{self.update_sample_rate}")
        if self.on_budget_spent not in ("silent", "stop"):
            raise ValueError(f"on_budget_spent must be silent or stop, got "
                             f"{self.on_budget_spent!r}")
