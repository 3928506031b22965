"""A platoon that must clear the lane for an emergency vehicle it cannot see.

Trucks and cars drive in one lane of a road with a shoulder, in agent order front to back (trucks
lead, cars follow). An emergency vehicle (EV) comes up from behind at twice the cruising speed,
with a mission criticality ``c ~ U[0, 1]`` and a starting distance behind the platoon's tail drawn
per episode, so that it reaches the platoon at varying times and, in about one episode in seven,
not within the horizon. An EV that would come closer than ``EV_SAFETY`` to a vehicle ahead of it
in the lane is held behind that vehicle: it is blocked. It overtakes vehicles on the shoulder
freely.

What each agent knows and can do:

==========  =====================================================  ========================
agent       observes                                               acts
==========  =====================================================  ========================
truck, car  own speed, gap to the vehicle ahead, on shoulder,      lane (lane, shoulder) x
            time fraction                                          speed (keep, accel, brake)
emergency   distance to the platoon's tail and lead, own speed,    nothing (one no-op
            criticality, time fraction                             action): it only talks
==========  =====================================================  ========================

Trucks accelerate and brake more weakly than cars. The shoulder caps speed at ``SHOULDER_SPEED``,
so pulling over costs progress and, for a truck, a longer climb back to cruising speed. The EV
never constrains the platoon, so platoon observations carry no information about it: the only
way for a truck or car to learn that it should pull over is a message from the EV.

Team reward per step, the same for every agent, in [-1, 0.5]::

    W_PROGRESS * mean speed / CRUISE - W_BLOCK * c * [EV blocked]
    - W_SHOULDER * share on shoulder - W_GAP * share of gaps below MIN_GAP

Scripted references, measured over 2000 episodes (seed 0, defaults), mean return per agent:
the oracle (full state) scores 11.66, the no-communication team 8.94, random play -1.64.
The no-communication team never pulls over. Its observations say nothing about the EV, so its
lane choice can depend only on its own driving and the time, and the EV gets by only if every
vehicle ahead of it is on the shoulder. The measured alternatives (always on the shoulder: 3.75;
on it from step k on, or during any window of steps) all score lower: time on the shoulder costs
in every episode, while the blocking it may avoid happens in some, at a criticality of 0.5 on
average. Both teams drive with the same speed rule, which sees only the agent's own observation,
so the gap between them is the value of knowing where the EV is.
"""

from __future__ import annotations

from collections.abc import Mapping
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
)

CRUISE = 1.0  # lane speed limit, distance per step
SHOULDER_SPEED = 0.5
EV_SPEED = 2.0
EV_SAFETY = 1.0  # the EV stays this far behind a vehicle ahead of it in the lane
# A vehicle at most this far ahead of the EV blocks it this step if it stays in the lane.
EV_RANGE = EV_SPEED + EV_SAFETY
MIN_GAP = 1.0  # gaps below this are unsafe
TARGET_GAP = 2.0
ACCEL = {"truck": 0.1, "car": 0.25}
BRAKE = {"truck": 0.2, "car": 0.4}
EV_START = (4.0, 30.0)  # range of the EV's starting distance behind the tail
GAP_START = (1.5, 3.0)
SPEED_START = (0.8, 1.0)
GAP_OBS_MAX = 3.0  # gaps are observed in units of TARGET_GAP, clipped; the lead sees the maximum
DIST_SCALE = 10.0  # the EV observes distances in this unit, clipped to [-1, 4]
W_PROGRESS, W_BLOCK, W_SHOULDER, W_GAP = 0.5, 0.7, 0.1, 0.2

KEEP, ACCELERATE, BRAKE_CMD = 0, 1, 2  # speed command; action = 3 * on_shoulder + command
N_COMMANDS = 3
PLATOON_OBS = 4
EV_OBS = 5


def platoon_spec(n_trucks: int = 2, n_cars: int = 2, episode_length: int = 25,
                 bandwidth: int | None = 1) -> EnvSpec:
    if min(n_trucks, n_cars) < 1:
        raise ValueError("a platoon needs at least one truck and one car")
    if bandwidth is not None and bandwidth < 1:
        raise ValueError("bandwidth must be at least 1 (or None)")
    return EnvSpec(
        name="platoon",
        types=(
            AgentType("truck", n_trucks, obs_dim=PLATOON_OBS, n_actions=2 * N_COMMANDS),
            AgentType("car", n_cars, obs_dim=PLATOON_OBS, n_actions=2 * N_COMMANDS),
            AgentType("emergency", 1, obs_dim=EV_OBS, n_actions=1),
        ),
        episode_length=episode_length,
        bandwidth=bandwidth,
    )


class Platoon(VecEnv):
    options: ClassVar[Mapping[str, EnvOption]] = {
        "n_trucks": EnvOption(int, 2, "trucks", low=1),
        "n_cars": EnvOption(int, 2, "cars", low=1),
        "episode_length": EnvOption(int, 25, "steps per episode", low=1),
        "bandwidth": EnvOption(int, 1, "senders delivered per environment and step (null: "
                               "all)", low=1, null=True),
    }

    def __init__(self, num_envs: int, device: str | torch.device = "cpu", n_trucks: int = 2,
                 n_cars: int = 2, episode_length: int = 25, bandwidth: int | None = 1) -> None:
        self.spec = platoon_spec(n_trucks, n_cars, episode_length, bandwidth)
        self.num_envs = num_envs
        self.device = torch.device(device)
        self.n_trucks, self.n_vehicles = n_trucks, n_trucks + n_cars
        f32 = {"dtype": torch.float32, "device": self.device}
        self.accel = torch.tensor([ACCEL["truck"]] * n_trucks + [ACCEL["car"]] * n_cars, **f32)
        self.brake = torch.tensor([BRAKE["truck"]] * n_trucks + [BRAKE["car"]] * n_cars, **f32)
        self._gen = make_generator(None, self.device)
        self.t = 0

    # -- state -----------------------------------------------------------------------------
    def reset(self, seed: int | None = None) -> Obs:
        if seed is not None:
            self._gen = make_generator(seed, self.device)
        b, n, g, dev = self.num_envs, self.n_vehicles, self._gen, self.device

        def uniform(bounds: tuple[float, float], *shape: int) -> Tensor:
            lo, hi = bounds
            return lo + (hi - lo) * torch.rand(*shape, generator=g, device=dev)

        gaps = uniform(GAP_START, b, n)
        gaps[:, 0] = 0.0  # the lead starts at 0
        pos = -gaps.cumsum(dim=1)
        speed = uniform(SPEED_START, b, n) * CRUISE
        criticality = torch.rand(b, generator=g, device=dev)
        ev_pos = pos[:, -1] - uniform(EV_START, b)
        self.set_state(pos, speed, torch.zeros(b, n, dtype=torch.bool, device=dev), ev_pos,
                       criticality)
        return self.observe()

    def set_state(self, pos: Tensor, speed: Tensor, shoulder: Tensor, ev_pos: Tensor,
                  criticality: Tensor) -> None:
        """Start the batch from an explicit state (vehicles front to back): for tests."""
        f32 = {"dtype": torch.float32, "device": self.device}
        self.pos = pos.to(**f32).clone()
        self.speed = speed.to(**f32).clone()
        self.shoulder = shoulder.to(self.device, torch.bool).clone()
        self.ev_pos = ev_pos.to(**f32).clone()
        self.ev_speed = torch.full_like(self.ev_pos, EV_SPEED)
        self.blocked = torch.zeros_like(self.ev_pos, dtype=torch.bool)
        self.criticality = criticality.to(**f32).clone()
        self.t = 0

    def gaps(self) -> Tensor:
        """Distance of each vehicle to the one ahead; the lead's is infinite."""
        lead = torch.full_like(self.pos[:, :1], float("inf"))
        return torch.cat([lead, self.pos[:, :-1] - self.pos[:, 1:]], dim=1)

    def observe(self) -> Obs:
        b, n, time = self.num_envs, self.n_vehicles, self.t / self.spec.episode_length
        vehicle = torch.stack([
            self.speed / CRUISE,
            (self.gaps() / TARGET_GAP).clamp(max=GAP_OBS_MAX),
            self.shoulder.float(),
            torch.full((b, n), time, device=self.device),
        ], dim=2)
        ev = torch.stack([
            ((self.pos[:, -1] - self.ev_pos) / DIST_SCALE).clamp(-1.0, 4.0),
            ((self.pos[:, 0] - self.ev_pos) / DIST_SCALE).clamp(-1.0, 4.0),
            self.ev_speed / EV_SPEED,
            self.criticality,
            torch.full((b,), time, device=self.device),
        ], dim=1)
        k = self.n_trucks
        return [vehicle[:, :k], vehicle[:, k:], ev[:, None]]

    # -- dynamics --------------------------------------------------------------------------
    def step(self, actions: Actions) -> Step:
        self.check_actions(actions)
        act = torch.cat(actions[:2], dim=1)
        shoulder, command = act >= N_COMMANDS, act % N_COMMANDS
        cap = torch.where(shoulder, SHOULDER_SPEED, CRUISE)
        change = self.accel * (command == ACCELERATE) - self.brake * (command == BRAKE_CMD)
        speed = torch.minimum((self.speed + change).clamp(min=0.0), cap)
        moved = self.pos + speed
        # No vehicle passes the one ahead of it; one that would have matches its speed.
        pos = moved.cummin(dim=1).values
        ahead_speed = torch.cat([speed[:, :1], speed[:, :-1]], dim=1)
        speed = torch.where(pos < moved, torch.minimum(speed, ahead_speed), speed)

        # The EV is held behind the nearest vehicle that was ahead of it and is in the lane.
        ahead = ~shoulder & (self.pos > self.ev_pos[:, None])
        limit = torch.where(ahead, pos - EV_SAFETY, float("inf")).min(dim=1).values
        wanted = self.ev_pos + EV_SPEED
        self.blocked = wanted > limit
        ev_pos = torch.maximum(torch.minimum(wanted, limit), self.ev_pos)
        self.ev_speed = ev_pos - self.ev_pos

        self.pos, self.speed, self.shoulder, self.ev_pos = pos, speed, shoulder, ev_pos
        unsafe = (self.gaps()[:, 1:] < MIN_GAP).float().mean(dim=1)
        team = (W_PROGRESS * (speed / CRUISE).mean(dim=1)
                - W_BLOCK * self.criticality * self.blocked
                - W_SHOULDER * shoulder.float().mean(dim=1)
                - W_GAP * unsafe)
        self.t += 1
        reward = team[:, None].expand(-1, self.spec.n_agents)
        return Step(self.observe(), reward, self.t >= self.spec.episode_length)

    # -- scripted references ---------------------------------------------------------------
    def _split(self, lane_shoulder: Tensor, command: Tensor) -> Actions:
        act = lane_shoulder.long() * N_COMMANDS + command
        k = self.n_trucks
        ev = torch.zeros(self.num_envs, 1, dtype=torch.long, device=self.device)
        return [act[:, :k], act[:, k:], ev]

    def oracle_actions(self) -> Actions:
        """Pull over exactly while the EV could be blocked by this vehicle, then return."""
        ahead_of_ev = self.pos - self.ev_pos[:, None]
        shoulder = (ahead_of_ev > 0) & (ahead_of_ev <= EV_RANGE)
        return self._split(shoulder, self._speed_command(self.observe(), shoulder))

    def no_comm_actions(self, obs: Obs) -> Actions:
        """Never pull over: the best fixed lane rule without knowing where the EV is."""
        shoulder = torch.zeros(self.num_envs, self.n_vehicles, dtype=torch.bool,
                               device=self.device)
        return self._split(shoulder, self._speed_command(obs, shoulder))

    def _speed_command(self, obs: Obs, shoulder: Tensor) -> Tensor:
        """Cruise at a safe gap, from each vehicle's own observation only.

        Both scripted teams drive with it, so their difference is due to the lane choice alone.
        A vehicle brakes once its gap is within one step's braking of ``MIN_GAP``.
        """
        vehicle = torch.cat(obs[:2], dim=1)
        speed, gap = vehicle[..., 0] * CRUISE, vehicle[..., 1] * TARGET_GAP
        cap = torch.where(shoulder, SHOULDER_SPEED, CRUISE)
        command = torch.full_like(speed, KEEP, dtype=torch.long)
        command = torch.where((gap >= TARGET_GAP) & (speed < cap), ACCELERATE, command)
        return torch.where(gap < MIN_GAP + self.brake, BRAKE_CMD, command)
