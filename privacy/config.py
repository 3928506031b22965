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
    epsilon
        One budget for the run: each agent's epsilon per unit, covering every release. It is
        split over the mechanisms in use (vectors, feedback, the DP-SGD update, which it turns
        on in a federated run), each calibrated to its share (``split``), and it caps what an
        agent may spend unless ``epsilon_budget`` says otherwise.
    epsilon_budget
        Each agent's epsilon cap for the unit; ``None``: ``epsilon`` if set, else accounted and
        reported but not capped.
    message_epsilon, feedback_epsilon, update_epsilon
        Calibrate the noise multiplier of the knowledge vectors, of the feedback (for an agent
        that every other agent's vectors reach) and of the DP-SGD update so that that
        mechanism's releases that compose for one unit cost at most this (rounded to the safe
        side); with ``epsilon``, they fix those mechanisms' shares and the others share the
        rest. ``None``: use the configured noise multiplier (or ``epsilon``'s split).
    update_share
        With ``epsilon``: the DP-SGD update's fixed share as a fraction of it
        (``update_epsilon = update_share * epsilon``), so one design holds at every budget.
        0: no DP-SGD, and every agent that releases or sends anything trains on none of its
        episodes (its networks stay what public data made them: ``TeamConfig.code_warmup``),
        so the whole budget goes to what it releases; agents that release and send nothing
        train as usual (``trains_releasing_agents``).
    update_shared_share
        Clip each episode's DP-SGD gradient in two parts: the shared module's to
        ``update_clip * sqrt(share)``, the private networks' to the rest (the same sensitivity
        as one clip); ``None``: one clip for the whole gradient.
    update_value_share
        The same for the value networks: their part clipped to ``update_clip * sqrt(share)``
        (with ``update_shared_share``, the other private networks get what both leave).
    update_recall_share
        The same for a sender's recall decoder (``TeamConfig.recall``): clipped with the
        feature networks, whose gradient the value loss dominates, it would keep almost none
        of its own.
    update_statistics
        DP-SGD first releases, as one more sampled step of the same noise and clip, the
        batch's mean advantage per step (which centres each episode's advantages) and, for
        positive signalling, a discrete channel's codeword marginal.
    split
        What the calibration gave each mechanism: its epsilon alone for one unit (set by
        ``releases.plan.calibrate``; stated in the report).
    accountant
        ``"pld"`` (default, tight), ``"rdp"`` (fast, a few percent loose) or ``"prv"``: the
        accountant noise is calibrated, budgets checked and the report computed with.
    on_budget_spent
        An agent whose next batch would exceed its budget goes ``"silent"`` (acts, releases
        nothing, the run goes on without its vectors, feedback and updates) or ``"stop"``s the
        run.
    update_noise_multiplier, update_clip, update_sample_rate
        DP-SGD on a federated agent's whole model, whose shared part it sends to the server:
        each step Poisson-samples episodes with the rate (default ``1 / minibatches``), clips
        each episode's gradient to ``update_clip`` and adds noise. ``None``: plain PPO, and the
        update the server receives is reported as a release without DP.
    """

    unit: Literal["episode", "history"] = "episode"
    relation: Literal["replace_one", "add_remove"] = "replace_one"
    delta: float = 1e-5
    epsilon: float | None = None
    epsilon_budget: float | None = None
    message_epsilon: float | None = None
    feedback_epsilon: float | None = None
    update_epsilon: float | None = None
    update_share: float | None = None
    accountant: str = "pld"
    on_budget_spent: Literal["silent", "stop"] = "silent"
    update_noise_multiplier: float | None = None
    update_clip: float = 1.0
    update_sample_rate: float | None = None
    update_shared_share: float | None = None
    update_value_share: float | None = None
    update_recall_share: float | None = None
    update_statistics: bool = False
    split: dict[str, float] | None = None

    @property
    def update_target(self) -> float | None:
        """The DP-SGD update's epsilon target: ``update_epsilon``, or ``update_share`` of
        ``epsilon``."""
        if self.update_share is not None and self.epsilon is not None:
            return self.update_share * self.epsilon or None
        return self.update_epsilon

    @property
    def trains_releasing_agents(self) -> bool:
        """False where ``update_share`` is 0: the agents that release or send anything do not
        train (nothing of their episodes reaches their networks, so only an episode's own
        releases compose for it)."""
        return self.update_share != 0

    @property
    def budget(self) -> float:
        """Each agent's cap per unit (``inf``: not capped)."""
        cap = self.epsilon_budget if self.epsilon_budget is not None else self.epsilon
        return math.inf if cap is None else cap

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ValueError(f"privacy unit must be one of {UNITS}, got {self.unit!r}")
        check_relation(self.relation)
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must lie in (0, 1), got {self.delta}")
        for name in ("epsilon", "epsilon_budget", "message_epsilon", "feedback_epsilon",
                     "update_epsilon"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be positive and finite, got {value}")
        if self.update_share is not None:
            if not 0 <= self.update_share < 1:
                raise ValueError(f"update_share must lie in [0, 1), got {self.update_share}")
            if self.epsilon is None or self.update_epsilon is not None:
                raise ValueError("update_share is a fraction of epsilon: give it with "
                                 "--epsilon and without --update-epsilon")
        if self.accountant not in ("rdp", "pld", "prv"):
            raise ValueError(f"accountant must be rdp, pld or prv, got {self.accountant!r}")
        if self.update_noise_multiplier is not None and not self.update_noise_multiplier >= 0:
            raise ValueError("update_noise_multiplier must be non-negative")
        if not 0 < self.update_clip < math.inf:
            raise ValueError(f"update_clip must be positive and finite, got {self.update_clip}")
        if self.update_sample_rate is not None and not 0 < self.update_sample_rate <= 1:
            raise ValueError(f"update_sample_rate must lie in (0, 1], got "
                             f"{self.update_sample_rate}")
        shares = {"update_shared_share": self.update_shared_share,
                  "update_value_share": self.update_value_share,
                  "update_recall_share": self.update_recall_share}
        for name, share in shares.items():
            if share is not None and not 0 < share < 1:
                raise ValueError(f"{name} must lie in (0, 1), got {share}")
        if sum(w for w in shares.values() if w is not None) >= 1:
            raise ValueError("update_shared_share, update_value_share and update_recall_share "
                             "must leave the other private networks a share of the clip (sum "
                             "below 1)")
        if self.on_budget_spent not in ("silent", "stop"):
            raise ValueError(f"on_budget_spent must be silent or stop, got "
                             f"{self.on_budget_spent!r}")
