"""One party's training round over any transport: rollout, DIAL feedback exchange, local PPO.

The party holds some of the agents (one, in deployment). Its round: collect an episode batch
through the transport; differentiate its agents' loss with respect to every vector they received,
clip and noise that per episode, and exchange it through the router; then PPO on its own
trajectories, with the feedback its vectors earned added to its encoder's gradient. One feedback
exchange per round: each exchange is a private release, and the update reuses it across epochs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fedcomm.clients.feedback import privatize, receiver_feedback
from fedcomm.clients.ppo import PPOConfig, ValueNorm, compute_targets, ppo_update
from fedcomm.clients.rollout import Rollout, collect
from fedcomm.clients.team import Team
from fedcomm.clients.transport import Transport


@dataclass
class RoundRecord:
    rollout: Rollout
    sent: Tensor  # [T, B, N, D] the feedback this party released (after clipping and noise)
    senders: Tensor  # [N] bool: whose vectors reached this party
    received: Tensor  # [T, B, n_local, D] the summed feedback for this party's vectors
    stats: dict[str, float]


class Party:
    def __init__(self, team: Team, transport: Transport, cfg: PPOConfig | None = None,
                 seed: int = 0) -> None:
        if team.whole:
            raise ValueError("a party holds some of the agents; train a whole team with "
                             "the centralized trainer")
        if transport.agents != team.agents:
            raise ValueError(f"the transport carries agents {transport.agents}, "
                             f"the team holds {team.agents}")
        self.team, self.transport, self.cfg = team, transport, cfg or PPOConfig()
        self.optimizer = torch.optim.Adam(team.parameters(), lr=self.cfg.lr, eps=1e-5)
        self.value_norm = ValueNorm(team.n_local)
        self.generator = torch.Generator().manual_seed(seed)

    def run_round(self, update: bool = True) -> RoundRecord:
        rollout = collect(self.team, self.transport, generator=self.generator)
        targets = compute_targets(rollout, self.cfg, self.value_norm)
        grads = receiver_feedback(self.team, rollout, targets, self.cfg)
        senders = rollout.delivered.flatten(0, 2).any(dim=0)  # [N]
        senders[self.team.local_index] = False
        sent = privatize(grads, self.team.cfg.feedback_clip,
                         self.team.cfg.feedback_noise_multiplier, self.generator)
        sent[:, :, ~senders] = 0
        received = self.transport.feedback(sent, senders)
        stats = {"return_mean": rollout.episode_return().mean().item()}
        if update:
            stats |= ppo_update(self.team, self.optimizer, rollout, self.cfg, targets,
                                self.generator, feedback=received)
        return RoundRecord(rollout, sent, senders, received, stats)
