"""One party's training over any transport, one episode batch at a time, under its budget.

The party holds some of the agents (one, in deployment). Per batch: collect the episode batch
through the transport; differentiate its agents' loss with respect to every vector they received,
clip and noise that per episode, and exchange it through the router; then PPO on its own
trajectories, with the feedback its vectors earned added to its encoder's gradient. One feedback
exchange per batch: each exchange is a private release, and the update reuses it across epochs.

A party with a privacy account (``releases.account``) holds every batch to it: before a batch it
knows everything the batch will release (vectors, feedback, its update's DP-SGD steps) and asks
its budget; refused, it stays silent (acts, releases nothing, does not train). Allowed, the
releases are written to its ledger once the simulator admitted the batch and before anything of
it leaves, so a batch that never started (a peer missing at the join) costs nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import torch
from torch import Tensor

from fedcomm.config import PPOConfig
from fedcomm.learning.feedback import privatize, receiver_feedback
from fedcomm.learning.ppo import ValueNorm, compute_targets, make_optimizer, ppo_update
from fedcomm.learning.rollout import Rollout, collect
from fedcomm.learning.transport import Transport
from fedcomm.models.team import Team
from fedcomm.privacy.events import GaussianRelease
from fedcomm.releases.account import AgentPrivacy
from fedcomm.releases.schedule import DpSgd

R = TypeVar("R")


@dataclass
class BatchRecord:
    rollout: Rollout
    sent: Tensor  # [T, B, N, D] the feedback this party released (after clipping and noise)
    senders: Tensor  # [N] bool: whose vectors reached this party
    received: Tensor  # [T, B, n_local, D] the summed feedback for this party's vectors
    stats: dict[str, float]  # return, PPO statistics, and seconds spent in each phase
    spoke: bool = True  # False: its budget kept it silent (it released nothing)


class Party:
    """A party's agents, their optimizer, value normaliser and random stream, and the privacy
    account its batches are held to.

    The first three are the party's private training state besides the networks: a federated
    agent keeps them across rounds (``clients/state.py``).

    Parameters
    ----------
    team, transport
        The party's agents and its channel to the simulator (or the environment in process).
    cfg, seed, dp
        PPO's settings, the seed of the party's own stream (actions and minibatches), and
        DP-SGD's settings where its update is private.
    account
        Its ledger, budget and noise source (``train_batch`` and ``play_batch`` need one).
    update_releases
        What one batch's update releases (its DP-SGD steps); none where the update stays
        with the party.
    """

    def __init__(self, team: Team, transport: Transport, cfg: PPOConfig | None = None,
                 seed: int = 0, dp: DpSgd | None = None, account: AgentPrivacy | None = None,
                 update_releases: Sequence[GaussianRelease] = ()) -> None:
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
        self.account, self.update_releases = account, list(update_releases)

    # -- batches under the party's budget ----------------------------------------------------
    def train_batch(self, *, round: int, batch: int, routes: Tensor, seed: int | None = None,
                    lr: float | None = None, update: bool = True) -> BatchRecord:
        """Roll out, exchange feedback and (``update``) train on one batch, if the budget
        allows its releases; silent otherwise (``BatchRecord.spoke``)."""
        account = self._account()
        releases = account.batch_releases(routes, self.update_releases if update else ())
        return self._under_budget(releases, round, batch, partial(
            self.run_batch, seed=seed, routes=routes, lr=lr, update=update))

    @torch.no_grad()
    def play_batch(self, *, round: int, batch: int, routes: Tensor, seed: int,
                   generator: torch.Generator) -> Tensor:
        """``[B]`` this party's (first agent's) returns in one batch of greedy episodes.

        Evaluation episodes are episodes too: their vectors are releases, keyed by ``batch``
        (a replayed key composes with its first use).
        """
        releases = [r for r in self._account().batch_releases(routes)
                    if r.mechanism == "message"]
        rollout = self._under_budget(releases, round, batch, partial(
            collect, self.team, self.transport, seed=seed, generator=generator, greedy=True,
            routes=routes))
        return rollout.rewards.sum(dim=0)[:, 0]

    def _under_budget(self, releases: list[GaussianRelease], round: int, batch: int,
                      run: Callable[..., R]) -> R:
        """``run`` silent if the budget refuses ``releases``; else with them charged once the
        simulator admitted the batch."""
        account = self._account()
        speaks = account.allows(releases, batch=batch)
        charge = partial(account.charge, releases, round=round, batch=batch)
        result = run(silent=not speaks, noise=account.noise,
                     on_joined=charge if speaks else None)
        if isinstance(result, BatchRecord):
            result.spoke = speaks
        return result

    def _account(self) -> AgentPrivacy:
        if self.account is None:
            raise ValueError("a party without a privacy account runs batches with run_batch")
        return self.account

    def close(self) -> None:
        """Close the channel and the ledger."""
        self.transport.close()
        if self.account is not None:
            self.account.close()

    # -- one batch ---------------------------------------------------------------------------

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
            # a party that does not train keeps its normaliser too: nothing of an episode
            # reaches what it computes from later ones
            targets = compute_targets(rollout, self.cfg, self.value_norm,
                                      update=self.dp is None and update)
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
