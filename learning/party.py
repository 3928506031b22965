"""One party's training over any transport, one episode batch at a time.

The party holds some of the agents (one, in deployment). Per batch: collect the episode batch
through the transport; differentiate its agents' loss with respect to every vector they received,
clip and noise that per episode, and exchange it through the router; then PPO on its own
trajectories, with the feedback its vectors earned added to its encoder's gradient. One feedback
exchange per batch: each exchange is a private release, and the update reuses it across epochs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from fedcomm.config import PPOConfig
from fedcomm.learning.feedback import privatize, receiver_feedback
from fedcomm.learning.ppo import ValueNorm, compute_targets, make_optimizer, ppo_update
from fedcomm.learning.rollout import Rollout, collect
from fedcomm.learning.transport import Transport
from fedcomm.models.team import Team
from fedcomm.releases.schedule import DpSgd


@dataclass
class BatchRecord:
    rollout: Rollout
    sent: Tensor  # [T, B, N, D] the feedback this party released (after clipping and noise)
    senders: Tensor  # [N] bool: whose vectors reached this party
    received: Tensor  # [T, B, n_local, D] the summed feedback for this party's vectors
    stats: dict[str, float]  # return, PPO statistics, and seconds spent in each phase


class Party:
    """A party's agents, their optimizer, value normaliser and random stream.

    The three are the party's private training state besides the networks: a federated agent
    keeps them across rounds (``clients/state.py``).
    """

    def __init__(self, team: Team, transport: Transport, cfg: PPOConfig | None = None,
                 seed: int = 0, dp: DpSgd | None = None) -> None:
        if team.whole:
            raise ValueError("a party holds some of the agents; train a whole team with "
                             "the centralized trainer")
        if transport.agents != team.agents:
            raise ValueError(f"the transport carries agents {transport.agents}, "
                             f"the team holds {team.agents}")
        self.team, self.transport, self.cfg = team, transport, cfg or PPOConfig()
        self.optimizer = make_optimizer(team.parameters(), self.cfg.lr)
        device = team.local_index.device
        # Under DP-SGD the normaliser is never updated: it starts from a scale that depends on
        # no episode, returns of the order of one reward per step.
        scale = team.spec.episode_length if dp is not None else 1.0
        self.value_norm = ValueNorm(team.n_local, scale).to(device)
        self.generator = torch.Generator(device).manual_seed(seed)
        self.dp = dp

    def run_batch(self, *, seed: int | None = None, routes: Tensor | None = None,
                  lr: float | None = None, update: bool = True, silent: bool = False,
                  noise: torch.Generator | None = None,
                  on_joined: Callable[[], None] | None = None) -> BatchRecord:
        """Roll out, exchange feedback and (``update``) train on one episode batch.

        ``routes`` fixes the graph's kept routes for the batch (default: the team's own graph);
        ``lr`` sets the learning rate of this batch's update. A ``silent`` party (its privacy
        budget spent) acts but releases nothing: no vectors, no feedback, and it does not train.
        ``noise`` draws every random choice an accountant assumes secret: the privacy noise of
        vectors, feedback and DP-SGD, and DP-SGD's Poisson samples (subsampling amplifies
        privacy only while the sample is secret); default: the party's seeded stream.
        ``on_joined`` runs once the batch is admitted, before anything is sent.
        """
        t0 = time.perf_counter()
        rollout = collect(self.team, self.transport, seed=seed, generator=self.generator,
                          routes=routes, silent=silent, noise=noise, on_joined=on_joined)
        t1 = time.perf_counter()
        n = self.team.spec.n_agents
        if not silent:
            targets = compute_targets(rollout, self.cfg, self.value_norm,
                                      update=self.dp is None)
        if silent or not self.team.cfg.feedback:  # the party sends feedback for nobody
            senders = torch.zeros(n, dtype=torch.bool, device=rollout.rewards.device)
            sent = rollout.rewards.new_zeros(self.team.spec.episode_length, rollout.num_envs, n,
                                             self.team.cfg.comm_dim)
        else:
            grads = receiver_feedback(self.team, rollout, targets, self.cfg)
            senders = rollout.delivered.flatten(0, 2).any(dim=0)  # [N]
            senders[self.team.local_index] = False
            sent = privatize(grads, self.team.cfg.feedback_clip,
                             self.team.cfg.feedback_noise_multiplier, noise or self.generator)
            sent.masked_fill_(~senders[:, None], 0)  # [T, B, N, D]: no host sync
        received = self.transport.feedback(sent, senders)
        t2 = time.perf_counter()
        stats = {"return_mean": rollout.episode_return().mean().item()}
        if update and not silent:
            if lr is not None:
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
            if self.dp is None:
                stats |= ppo_update(self.team, self.optimizer, rollout, self.cfg, targets,
                                    self.generator, feedback=received)
            else:
                from fedcomm.learning.dpsgd import dp_ppo_update  # Opacus: only where used

                update, steps = dp_ppo_update(
                    self.team, self.optimizer, rollout, self.cfg, targets,
                    noise_multiplier=self.dp.noise_multiplier, clip=self.dp.clip,
                    sample_rate=self.dp.sample_rate, generator=noise or self.generator,
                    noise_generator=noise or self.generator, feedback=received,
                    clip_shares=self.dp.clip_shares,
                    statistics=self.dp.statistics)
                stats |= update | {"dp_steps": steps}
        stats |= {"rollout_s": t1 - t0, "feedback_s": t2 - t1,
                  "update_s": time.perf_counter() - t2}
        return BatchRecord(rollout, sent, senders, received, stats)
