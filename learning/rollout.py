"""Collect an episode batch and replay it with gradients.

The channel noise drawn during the rollout is stored, so the replay in the update reproduces the
exact vectors the receivers acted on (the first PPO epoch starts at ratio 1) while gradients flow
from every receiver's loss back through those vectors into the senders' encoders.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from fedcomm.learning.transport import Transport
from fedcomm.models.team import Team, TeamOutput, log_probs, memory_of, sample_actions


@dataclass
class Rollout:
    obs: list[Tensor]  # per type [T, B, count, obs_dim]
    actions: list[Tensor]  # per type [T, B, count]
    noise: Tensor  # [T, B, N, D] the channel's draw (Team.draw) of each vector
    logprobs: Tensor  # [T, B, N]
    values: Tensor  # [T, B, N] the value head's raw outputs
    rewards: Tensor  # [T, B, N]
    # A team without every agent also keeps what the router delivered from the others:
    received: Tensor | None = None  # [T, B, N, D]
    delivered: Tensor | None = None  # [T, B or 1, n_local, N] bool

    @property
    def num_envs(self) -> int:
        return self.rewards.shape[1]

    def episode_return(self) -> Tensor:
        """``[B]`` each episode's return, averaged over agents."""
        return self.rewards.sum(dim=0).mean(dim=1)

    def select(self, envs: Tensor) -> Rollout:
        """The same episodes' steps for a subset of the batch (a minibatch)."""
        def rows(x: Tensor | None) -> Tensor | None:  # a broadcast batch dim of 1 stays
            return x if x is None or x.shape[1] == 1 else x[:, envs]

        return Rollout(
            [o[:, envs] for o in self.obs], [a[:, envs] for a in self.actions],
            self.noise[:, envs], self.logprobs[:, envs], self.values[:, envs],
            self.rewards[:, envs], rows(self.received), rows(self.delivered))


@torch.no_grad()
def collect(team: Team, transport: Transport, seed: int | None = None,
            generator: torch.Generator | None = None, greedy: bool = False,
            routes: Tensor | None = None, silent: bool = False,
            noise: torch.Generator | None = None,
            on_joined: Callable[[], None] | None = None) -> Rollout:
    """Run one episode batch of the team's agents through ``transport``.

    ``routes`` (``[K, K]`` bool) are the kept routes the router uses for the batch; by default
    those of the team's own graph. Parties of a federated round pass the global graph's, so
    that every party declares the same routes. ``silent`` agents send no vectors. ``noise``
    draws the channel noise (default: ``generator``, which samples the actions).
    ``on_joined`` runs once the simulator admitted the batch, before anything of it is sent
    (where the privacy ledger is written: a batch that never starts costs nothing).
    """
    if transport.agents != team.agents:
        raise ValueError(f"the transport carries agents {transport.agents}, "
                         f"the team holds {team.agents}")
    b = transport.num_envs
    noise_source = noise or generator
    obs = transport.reset(team.kept_routes() if routes is None else routes, seed, silent)
    if on_joined is not None:
        on_joined()
    hidden = team.initial_hidden(b)
    memory = None
    steps: list[tuple] = []
    done = False
    while not done:
        feats, hidden = team.encode_obs(obs, hidden)
        clean = team.speak(feats)
        drawn = team.channel.draw(clean, noise_source, greedy)
        messages = team.channel.release(clean, drawn)
        received, delivered = transport.exchange(messages, team.releases_at(len(steps)))
        logits, values, extras = team.respond(feats, messages, received, delivered, memory)
        memory = memory_of(extras)
        actions = sample_actions(logits, greedy, generator)
        logp, _ = log_probs(logits, actions)
        code_logp, _ = team.code_terms(clean, drawn, len(steps))
        if code_logp is not None:  # the codeword is part of the sender's action
            logp = logp + code_logp
        step = transport.step(actions)
        steps.append((obs, actions, drawn, logp, values, step.reward, received, delivered))
        obs, done = step.obs, step.done
    obs_t, act_t, noise_t, logp_t, val_t, rew_t, rec_t, del_t = zip(*steps)
    n_types = len(team.types)
    return Rollout(
        obs=[torch.stack([o[k] for o in obs_t]) for k in range(n_types)],
        actions=[torch.stack([a[k] for a in act_t]) for k in range(n_types)],
        noise=torch.stack(noise_t), logprobs=torch.stack(logp_t),
        values=torch.stack(val_t), rewards=torch.stack(rew_t),
        received=None if team.whole else torch.stack(rec_t),
        delivered=None if team.whole else torch.stack(del_t))


def replay(team: Team, rollout: Rollout) -> TeamOutput:
    """Recompute the team's outputs for a stored batch, with gradients, as ``[T, B, ...]``
    (all steps in one batch; only a GRU's recurrence steps one after the other)."""
    return team.forward_steps(rollout.obs, rollout.noise, rollout.received, rollout.delivered)


def party_rollout(whole: Team, rollout: Rollout, agent: int) -> Rollout:
    """What ``agent`` alone would have recorded of a whole team's batch: its own data plus the
    vectors the router delivered to it (for comparing a party with the team it is cut from)."""
    with torch.no_grad():
        messages = replay(whole, rollout).messages  # [T, B, N, D]
        delivered = torch.stack([whole.route(m)[:, [agent]] & whole.releases_at(t)
                                 for t, m in enumerate(messages)])
    spec = whole.spec
    return Rollout(
        obs=spec.select(rollout.obs, (agent,), dim=2),
        actions=spec.select(rollout.actions, (agent,), dim=2),
        noise=rollout.noise[:, :, [agent]], logprobs=rollout.logprobs[:, :, [agent]],
        values=rollout.values[:, :, [agent]], rewards=rollout.rewards[:, :, [agent]],
        received=messages, delivered=delivered)
