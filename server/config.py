"""What a federated run is: the centralized trainer's settings plus how rounds are federated.

The environment, models, PPO settings and the budget in environment steps are a ``TrainConfig``,
the same presets the centralized trainer uses, so a federated run and its centralized reference
differ only in what federation changes. A round is ``batches_per_round`` episode batches per
agent; the ServerApp sends the whole configuration to the agents with every round.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Literal

from fedcomm.train import TrainConfig

Strategy = Literal["fedavg", "fedavgm", "fedadam"]
OnFailure = Literal["stop", "continue"]
STRATEGIES: tuple[str, ...] = ("fedavg", "fedavgm", "fedadam")


@dataclass
class FederationConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    batches_per_round: int = 8  # episode batches each agent trains on between aggregations
    strategy: Strategy = "fedavg"
    server_lr: float = 1.0  # FedAvgM's and FedAdam's server learning rate
    server_momentum: float = 0.0  # FedAvgM
    # Average each type's private modules among the agents of that type too (off: they never
    # leave their agent). Weaker privacy: the server then sees every agent's private networks.
    aggregate_private: bool = False
    # A round in which an agent fails or does not answer: stop the run, or aggregate the
    # replies that came and go on (the joint environment retries everyone next round).
    on_agent_failure: OnFailure = "stop"
    max_failed_rounds: int = 3  # with "continue": consecutive failed rounds before stopping
    round_timeout: float = 900.0  # seconds for every reply of a round
    node_timeout: float = 120.0  # seconds for every agent's node to be connected
    eval_every: int = 0  # rounds between greedy evaluations; 0: as often as the trainer's

    def __post_init__(self) -> None:
        if isinstance(self.train, dict):
            self.train = TrainConfig.from_dict(self.train)
        if self.batches_per_round < 1:
            raise ValueError("batches_per_round must be at least 1")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}: use "
                             f"{', '.join(STRATEGIES)}")
        if self.on_agent_failure not in ("stop", "continue"):
            raise ValueError("on_agent_failure is 'stop' or 'continue'")
        if min(self.round_timeout, self.node_timeout) <= 0:
            raise ValueError("timeouts must be positive")

    @property
    def batch_steps(self) -> int:
        """Environment steps of one episode batch (one iteration of the centralized trainer)."""
        from fedcomm.sim.registry import make_env

        spec = make_env(self.train.env, 1, **self.train.env_kwargs).spec
        return self.train.num_envs * spec.episode_length

    @property
    def total_batches(self) -> int:
        return max(1, self.train.env_steps // self.batch_steps)

    @property
    def rounds(self) -> int:
        return math.ceil(self.total_batches / self.batches_per_round)

    @property
    def eval_interval(self) -> int:
        """Rounds between evaluations: the trainer's interval in batches, rounded up."""
        if self.eval_every:
            return self.eval_every
        if not self.train.eval_every:
            return 0
        return max(1, math.ceil(self.train.eval_every / self.batches_per_round))

    def batches_in(self, server_round: int) -> range:
        """The (1-based) global batch numbers of a round: the last round may be shorter."""
        first = (server_round - 1) * self.batches_per_round + 1
        return range(first, min(first + self.batches_per_round, self.total_batches + 1))

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> FederationConfig:
        """From ``to_dict`` output, or a run directory's ``config.json`` (which adds ``mode``)."""
        return cls(**{k: v for k, v in d.items() if k != "mode"})

    @classmethod
    def from_json(cls, text: str) -> FederationConfig:
        return cls.from_dict(json.loads(text))
