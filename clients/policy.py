"""An agent's own privacy policy: the least privacy it accepts, checked on every round's config.

The server sends the run's whole configuration with every message, privacy settings included;
an agent that applied it blindly would let the server decide its privacy. Each agent holds its
own policy instead (its node config in a deployment; the command line in a simulation) and
checks every configuration against it before it opens its ledger or releases anything: the
largest epsilon per unit it accepts (as its own accountant plans the run for this agent), the
unit and neighbouring relation that epsilon is for, the largest delta, whether DP-SGD is
required, and the smallest noise multiplier of any Gaussian release. A configuration below it
is refused with one line naming the setting. The policy also caps the agent's budget, so a
release the plan did not foresee is refused by the ledger's budget as well.

``seeded-noise`` draws the privacy noise from a seeded stream: test randomness, set on the
node only (a configuration cannot carry it), and marked in every ledger entry so that
``fedcomm audit`` fails such a run.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

from fedcomm.config import FederationConfig
from fedcomm.privacy.budget import PrivacyBudget
from fedcomm.privacy.events import RELATIONS
from fedcomm.releases.plan import Schedule, unit_releases
from fedcomm.releases.schedule import (
    initial_routes,
    peers,
    releases_anything,
    sends_to_server,
    update_dp,
)

KEYS = ("max-epsilon", "privacy-unit", "privacy-relation", "max-delta", "require-dp-sgd",
        "min-noise-multiplier", "seeded-noise")
"""The node config's policy keys; ``max-epsilon`` is required (``inf`` accepts any run)."""


class PolicyRefusal(ValueError):
    """A round's configuration is below the agent's policy; nothing was released."""


@dataclass(frozen=True)
class PrivacyPolicy:
    """The least privacy one agent accepts.

    Parameters
    ----------
    max_epsilon
        The largest epsilon per ``unit`` the agent accepts for everything it releases in the
        run; ``inf`` accepts any run, private or not, and its metrics are sent in the clear.
    unit
        What ``max_epsilon`` protects: ``"episode"`` (a run whose unit is ``"history"`` gives
        more and is accepted too) or ``"history"``.
    relation
        The neighbouring relation of ``max_epsilon``; a run must state the same.
    max_delta
        The largest delta accepted.
    require_dp_sgd
        Every network that shapes a release trains under DP-SGD: the run's guarantee per
        episode then holds for the episode's own batch, not only for the whole run.
    min_noise_multiplier
        The smallest noise multiplier of any Gaussian release the agent makes (vectors,
        feedback, DP-SGD).
    seeded_noise
        Test randomness: noise from a seeded stream (see the module).
    """

    max_epsilon: float
    unit: str = "episode"
    relation: str = "replace_one"
    max_delta: float = 1e-5
    require_dp_sgd: bool = False
    min_noise_multiplier: float = 0.0
    seeded_noise: bool = False

    def __post_init__(self) -> None:
        if not self.max_epsilon > 0:
            raise ValueError(f"max-epsilon must be positive (inf: any run), got "
                             f"{self.max_epsilon}")
        if self.unit not in ("episode", "history"):
            raise ValueError(f"privacy-unit must be episode or history, got {self.unit!r}")
        if self.relation not in RELATIONS:
            raise ValueError(f"privacy-relation must be one of {', '.join(RELATIONS)}, got "
                             f"{self.relation!r}")
        if not 0 < self.max_delta < 1:
            raise ValueError(f"max-delta must lie in (0, 1), got {self.max_delta}")
        if not self.min_noise_multiplier >= 0:
            raise ValueError("min-noise-multiplier must be non-negative")

    @property
    def private(self) -> bool:
        """Whether the agent promises a finite epsilon: it then releases nothing to the server
        that no mechanism covers (``protocol.round``)."""
        return self.max_epsilon < math.inf

    # -- where a policy comes from ---------------------------------------------------------
    @classmethod
    def from_settings(cls, settings: dict[str, Any], agent_id: str) -> PrivacyPolicy:
        """From a node's settings (``KEYS``); one without ``max-epsilon`` is refused: an agent
        without a policy would take whatever the server sends."""
        if "max-epsilon" not in settings:
            raise PolicyRefusal(f"the node config of {agent_id} sets no privacy policy: set "
                                "max-epsilon (the largest epsilon per unit it accepts; inf for "
                                "any run, private or not)")
        try:
            return cls(max_epsilon=float(settings["max-epsilon"]),
                       unit=str(settings.get("privacy-unit", "episode")),
                       relation=str(settings.get("privacy-relation", "replace_one")),
                       max_delta=float(settings.get("max-delta", 1e-5)),
                       require_dp_sgd=_flag(settings.get("require-dp-sgd", False)),
                       min_noise_multiplier=float(settings.get("min-noise-multiplier", 0.0)),
                       seeded_noise=_flag(settings.get("seeded-noise", False)))
        except ValueError as e:
            raise PolicyRefusal(f"the privacy policy in the node config of {agent_id}: {e}") \
                from None

    @classmethod
    def of_run(cls, fed: FederationConfig) -> PrivacyPolicy:
        """The policy that accepts exactly what ``fed`` promises: what a party that chose the
        run itself (``fedcomm simulate``, ``fedcomm deploy``) holds its agents to."""
        cfg = fed.train.privacy
        noise = _gaussian_noise(fed)
        return cls(max_epsilon=cfg.budget, unit=cfg.unit, relation=cfg.relation,
                   max_delta=cfg.delta,
                   require_dp_sgd=cfg.update_noise_multiplier is not None,
                   min_noise_multiplier=min(noise.values(), default=0.0))

    def to_settings(self) -> dict[str, str]:
        """The node config that holds this policy."""
        return {"max-epsilon": _number(self.max_epsilon), "privacy-unit": self.unit,
                "privacy-relation": self.relation, "max-delta": _number(self.max_delta),
                "require-dp-sgd": str(self.require_dp_sgd).lower(),
                "min-noise-multiplier": _number(self.min_noise_multiplier),
                **({"seeded-noise": "true"} if self.seeded_noise else {})}

    # -- the check -------------------------------------------------------------------------
    def check(self, fed: FederationConfig, index: int) -> None:
        """Refuse (``PolicyRefusal``, one line naming the setting) a run configuration below
        this policy for agent ``index``."""
        if not self.private:
            return
        cfg, spec = fed.train.privacy, fed.spec
        refuse = _refuser(spec.agent_ids[index])
        if cfg.unit != self.unit and self.unit == "history":
            refuse(f"train.privacy.unit is {cfg.unit!r}, its policy requires {self.unit!r}")
        if cfg.relation != self.relation:
            refuse(f"train.privacy.relation is {cfg.relation!r}, its policy requires "
                   f"{self.relation!r}")
        if cfg.delta > self.max_delta:
            refuse(f"train.privacy.delta is {cfg.delta:g}, its policy accepts at most "
                   f"{self.max_delta:g}")
        routes = initial_routes(fed.train)
        releases = releases_anything(spec, fed.train.team, fed.share, routes, index) or \
            sends_to_server(spec, fed.share, fed.aggregate_private, routes, index)
        if self.require_dp_sgd and releases and update_dp(cfg, fed.train.ppo) is None:
            refuse("train.privacy.update_noise_multiplier is unset (no DP-SGD); its policy "
                   "requires DP-SGD")
        for name, sigma in _gaussian_noise(fed, index).items():
            if sigma < self.min_noise_multiplier:
                refuse(f"{name} is {sigma:g}, its policy requires at least "
                       f"{self.min_noise_multiplier:g}")
        planned = planned_epsilon(fed.to_json(), index)
        if planned > self.max_epsilon * (1 + 1e-9):
            refuse(f"the run plans epsilon {planned:.4g} per {cfg.unit} for it "
                   f"(train.privacy and train.team), its policy accepts at most "
                   f"{self.max_epsilon:g}")

    def cap(self, budget: float) -> float:
        """The budget the agent holds itself to: the run's, at most its own."""
        return min(budget, self.max_epsilon)


@functools.lru_cache(maxsize=16)
def planned_epsilon(config: str, index: int) -> float:
    """Agent ``index``'s composed epsilon per unit for the run ``config`` (JSON), as planned
    by the run's accountant (cached: every round of a run sends the same configuration)."""
    fed = FederationConfig.from_json(config)
    cfg = fed.train.privacy
    releases = unit_releases(fed.train, Schedule.of(fed), index)
    if not releases:
        return 0.0
    return PrivacyBudget(math.inf, cfg.delta, cfg.accountant, cfg.relation).epsilon_of(releases)


def _gaussian_noise(fed: FederationConfig, index: int | None = None) -> dict[str, float]:
    """The noise multiplier of each kind of Gaussian release agent ``index`` (any agent, if
    none) makes, by the configuration field that sets it."""
    team, spec = fed.train.team, fed.spec
    routes = initial_routes(fed.train)
    agents = range(spec.n_agents) if index is None else [index]
    out: dict[str, float] = {}
    dp = update_dp(fed.train.privacy, fed.train.ppo)
    for i in agents:
        reach, reached_by = peers(spec, routes, i)
        if reach and team.channel == "gaussian":
            out["train.team.noise_multiplier"] = team.noise_multiplier
        if reached_by and team.feedback:
            out["train.team.feedback_noise_multiplier"] = team.feedback_noise_multiplier
        trains_under_dp = releases_anything(spec, team, fed.share, routes, i) or \
            sends_to_server(spec, fed.share, fed.aggregate_private, routes, i)
        if dp is not None and trains_under_dp:
            out["train.privacy.update_noise_multiplier"] = dp.noise_multiplier
    return out


def _refuser(agent: str):
    def refuse(why: str) -> None:
        raise PolicyRefusal(f"{agent} refuses the round: {why}")

    return refuse


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(f"expected true or false, got {value!r}")
    return text in ("true", "1", "yes")


def _number(value: float) -> str:
    return "inf" if value == math.inf else repr(float(value))
