"""Batched port of mpe2's ``simple_speaker_listener_v4`` (MPE cooperative communication).

A speaker sees which of three landmarks is the goal but cannot move; a listener moves but does not
see the goal. Both receive ``-|listener - goal|^2`` every step, for 25 steps. Observations, action
semantics, dynamics (position integrates the old velocity, then damping, then the force) and
rewards follow mpe2 1.1 step for step; ``tests/test_speaker_listener_port.py`` checks that.

The environment's own discrete "say" action (delivered one step late through the listener's
observation) is kept for fidelity; fedcomm's agents talk through their learned channel instead.
It is a channel outside every privacy mechanism (the speaker's action carries the goal
unprotected): ``say=False`` mutes it. A muted speaker has one action, which changes nothing (the
listener always hears codeword 0 after the first step, as mpe2's listener does of a speaker
muted by ``Mpe2Env(mute=...)``), so its policy has nothing to learn and, under DP-SGD, no
gradient to spend the clip on. Private runs mute it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import ClassVar

import torch
from torch import Tensor

from fedcomm.sim.base import (
    Actions,
    AgentType,
    EnvOption,
    EnvSpec,
    Obs,
    Step,
    VecEnv,
    make_generator,
    one_hot,
)

N_LANDMARKS = 3
DIM_C = 3
DT = 0.1
DAMPING = 0.25
ACCEL = 5.0  # mpe2's default action sensitivity; the listener's mass is 1
LANDMARK_COLORS = ((0.65, 0.15, 0.15), (0.15, 0.65, 0.15), (0.15, 0.15, 0.65))
# Discrete movement action -> unit force direction: no-op, left, right, down, up.
MOVES = ((0.0, 0.0), (-1.0, 0.0), (1.0, 0.0), (0.0, -1.0), (0.0, 1.0))

SPEC = EnvSpec(
    name="speaker_listener",
    types=(
        AgentType("speaker", count=1, obs_dim=3, n_actions=DIM_C),
        AgentType("listener", count=1, obs_dim=2 + 2 * N_LANDMARKS + DIM_C, n_actions=len(MOVES)),
    ),
    episode_length=25,
)


class SpeakerListener(VecEnv):
    channel_persists = True  # the goal holds for the episode
    # What non-IID sites draw per site (``--site-dist``): how often each landmark is the goal.
    site_distribution = ("goal_weights", N_LANDMARKS)
    options: ClassVar[Mapping[str, EnvOption]] = {
        "episode_length": EnvOption(int, 25, "steps per episode", low=1),
        "say": EnvOption(bool, True, "the speaker's own say action, a channel through the "
                         "environment that no mechanism covers (false mutes it)"),
        "goal_weights": EnvOption(float, None, "how often each landmark is the goal (3 "
                                  "weights; null: uniform): non-IID sites", low=0, null=True,
                                  many=True),
    }

    def __init__(self, num_envs: int, device: str | torch.device = "cpu",
                 episode_length: int = 25, say: bool = True,
                 goal_weights: list[float] | None = None) -> None:
        if goal_weights is not None and (len(goal_weights) != N_LANDMARKS
                                         or not sum(goal_weights) > 0):
            raise ValueError(f"goal_weights={goal_weights}: expected {N_LANDMARKS} "
                             "non-negative weights, not all zero")
        self.goal_weights = (None if goal_weights is None
                             else torch.tensor(goal_weights, dtype=torch.float32))
        self.say = say
        types = SPEC.types if say else (replace(SPEC.types[0], n_actions=1), SPEC.types[1])
        self.spec = SPEC if (say and episode_length == 25) else EnvSpec(
            SPEC.name, types, episode_length)
        self.num_envs = num_envs
        self.device = torch.device(device)
        self._colors = torch.tensor(LANDMARK_COLORS, device=self.device)
        self._moves = torch.tensor(MOVES, device=self.device) * ACCEL
        self._gen = make_generator(None, self.device)
        self.t = 0

    # -- state -----------------------------------------------------------------------------
    def reset(self, seed: int | None = None) -> Obs:
        if seed is not None:
            self._gen = make_generator(seed, self.device)
        b, g, dev = self.num_envs, self._gen, self.device

        def uniform(*shape: int) -> Tensor:
            return torch.rand(*shape, generator=g, device=dev) * 2 - 1

        self.set_state(
            goal=(torch.randint(N_LANDMARKS, (b,), generator=g, device=dev)
                  if self.goal_weights is None else
                  torch.multinomial(self.goal_weights.to(dev), b, True, generator=g)),
            speaker_pos=uniform(b, 2),
            listener_pos=uniform(b, 2),
            landmark_pos=uniform(b, N_LANDMARKS, 2),
        )
        return self.observe()

    def set_state(self, goal: Tensor, speaker_pos: Tensor, listener_pos: Tensor,
                  landmark_pos: Tensor, listener_vel: Tensor | None = None,
                  comm: Tensor | None = None) -> None:
        """Start the batch from an explicit state (how the port is checked against mpe2)."""
        f32 = {"dtype": torch.float32, "device": self.device}
        self.goal = goal.to(self.device, torch.long)
        self.speaker_pos = speaker_pos.to(**f32)
        self.listener_pos = listener_pos.to(**f32).clone()
        self.landmark_pos = landmark_pos.to(**f32)
        zeros = torch.zeros(self.num_envs, 2, **f32)
        self.listener_vel = zeros if listener_vel is None else listener_vel.to(**f32).clone()
        self.comm = (torch.zeros(self.num_envs, DIM_C, **f32) if comm is None
                     else comm.to(**f32).clone())
        self.t = 0
        # Fixed for the episode. gather/index_select rather than advanced indexing: the latter
        # opens a parallel region per call, which stalls for milliseconds on a busy machine.
        self._goal_pos = self.landmark_pos.gather(
            1, self.goal[:, None, None].expand(-1, 1, 2))[:, 0]
        self._speaker_obs = self._colors.index_select(0, self.goal)[:, None, :]

    def goal_pos(self) -> Tensor:
        return self._goal_pos

    def observe(self) -> Obs:
        rel = (self.landmark_pos - self.listener_pos[:, None, :]).reshape(self.num_envs, -1)
        listener = torch.cat([self.listener_vel, rel, self.comm], dim=1)
        return [self._speaker_obs, listener[:, None, :]]

    # -- dynamics --------------------------------------------------------------------------
    def step(self, actions: Actions) -> Step:
        self.check_actions(actions)
        say, move = actions[0][:, 0], actions[1][:, 0]  # a muted speaker's say is 0
        self.listener_pos = self.listener_pos + self.listener_vel * DT
        force = self._moves.index_select(0, move)
        self.listener_vel = self.listener_vel * (1 - DAMPING) + force * DT
        self.comm = one_hot(say, DIM_C)
        self.t += 1
        dist2 = ((self.listener_pos - self.goal_pos()) ** 2).sum(dim=1)
        reward = (-dist2)[:, None].expand(self.num_envs, 2)
        return Step(self.observe(), reward, self.t >= self.spec.episode_length)

    # -- scripted references ---------------------------------------------------------------
    def oracle_actions(self) -> Actions:
        move = steer(self.goal_pos() - self.listener_pos, self.listener_vel, self._moves)
        say = self.goal if self.say else torch.zeros_like(self.goal)
        return [say[:, None], move[:, None]]

    def channel_symbols(self) -> dict[int, tuple[Tensor, int]]:
        return {0: (self.goal, N_LANDMARKS)}  # the speaker tells the goal

    def channel_actions(self, posteriors: dict[int, Tensor], obs: Obs) -> Actions:
        """The listener's best response to its posterior over the goal: the expected reward
        ``-E|x - goal|^2 = -|x - mean|^2 - Var`` is the reward of the goal's posterior mean
        position, so it steers there, hedging between landmarks where what it heard is
        uncertain. (A search over every sequence of 4 moves, planned again each step, does no
        better than ``steer``'s lookahead: -7.309 both at epsilon 8, -12.707 against -12.711
        at 1.6, over 8,000 episodes.)"""
        target = (posteriors[0][:, :, None] * self.landmark_pos).sum(dim=1)
        move = steer(target - self.listener_pos, self.listener_vel, self._moves)
        say = torch.zeros(self.num_envs, 1, dtype=torch.long, device=self.device)
        return [say, move[:, None]]

    def no_comm_actions(self, obs: Obs) -> Actions:
        listener = obs[1][:, 0]
        vel, rel = listener[:, :2], listener[:, 2:2 + 2 * N_LANDMARKS].reshape(-1, N_LANDMARKS, 2)
        move = steer(rel.mean(dim=1), vel, self._moves)
        say = torch.zeros(self.num_envs, 1, dtype=torch.long, device=self.device)
        return [say, move[:, None]]


def steer(target_rel: Tensor, vel: Tensor, forces: Tensor) -> Tensor:
    """The move that brings the listener closest to a target two steps ahead.

    A force changes the velocity now and the position one step later, so one step of lookahead
    would not see the action's effect.
    """
    v1 = vel[:, None, :] * (1 - DAMPING) + forces[None] * DT  # [B, 5, 2]
    offset = vel[:, None, :] * DT + v1 * DT
    return ((offset - target_rel[:, None, :]) ** 2).sum(-1).argmin(dim=1)
