"""A plant where the agents that know cannot act and the agents that act do not know.

Each actuator runs one machine. Every step, each machine independently either has a fault (with
probability ``fault_prob``) or is running, and the order book asks it for one of ``n_products``
products. Sensors see the faults of the machines assigned to them, processors see those machines'
orders; actuators see only which machine they run and the time. Per machine and step:

==================  ==================  =======================
machine             actuator services   actuator makes product p
==================  ==================  =======================
fault               +1                  -1 (run while broken)
running, order p'   0                   +1 if p == p' else 0
==================  ==================  =======================

Every agent receives the team reward, the mean over machines. Faults and orders are drawn afresh
each step, so the best a team can do without communication is the best fixed action under the
prior (servicing, for the defaults), and a team that knows everything scores 1 per step: the value
of communication is that measured gap.
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
    one_hot,
)

SERVICE = 0  # actuator action 0; action p + 1 makes product p


def factory_spec(n_sensors: int = 2, n_processors: int = 2, n_actuators: int = 3,
                 n_products: int = 3, episode_length: int = 25) -> EnvSpec:
    if min(n_sensors, n_processors, n_actuators) < 1 or n_products < 2:
        raise ValueError("a factory needs at least one agent of each type and two products")
    m = n_actuators
    return EnvSpec(
        name="factory",
        types=(
            AgentType("sensor", n_sensors, obs_dim=2 * m, n_actions=1),
            AgentType("processor", n_processors, obs_dim=m * (1 + n_products), n_actions=1),
            AgentType("actuator", n_actuators, obs_dim=m + 1, n_actions=1 + n_products),
        ),
        episode_length=episode_length,
    )


class Factory(VecEnv):
    options: ClassVar[Mapping[str, EnvOption]] = {
        "n_sensors": EnvOption(int, 2, "sensors", low=1),
        "n_processors": EnvOption(int, 2, "processors", low=1),
        "n_actuators": EnvOption(int, 3, "actuators, one machine each", low=1),
        "n_products": EnvOption(int, 3, "products a machine can make", low=2),
        "fault_prob": EnvOption(float, 0.25, "each machine's chance of a fault per step",
                                low=0, high=1),
        "episode_length": EnvOption(int, 25, "steps per episode", low=1),
    }

    def __init__(self, num_envs: int, device: str | torch.device = "cpu", n_sensors: int = 2,
                 n_processors: int = 2, n_actuators: int = 3, n_products: int = 3,
                 fault_prob: float = 0.25, episode_length: int = 25) -> None:
        if not 0.0 <= fault_prob <= 1.0:
            raise ValueError("fault_prob must lie in [0, 1]")
        self.spec = factory_spec(n_sensors, n_processors, n_actuators, n_products, episode_length)
        self.num_envs = num_envs
        self.device = torch.device(device)
        self.n_machines, self.n_products, self.fault_prob = n_actuators, n_products, fault_prob
        machines = torch.arange(self.n_machines, device=self.device)
        # Machine m is watched by sensor m % n_sensors and scheduled by processor m % n_processors.
        self.sensor_mask = (machines[None] % n_sensors ==
                            torch.arange(n_sensors, device=self.device)[:, None]).float()
        self.processor_mask = (machines[None] % n_processors ==
                               torch.arange(n_processors, device=self.device)[:, None]).float()
        self._gen = make_generator(None, self.device)
        self.t = 0

    def reset(self, seed: int | None = None) -> Obs:
        if seed is not None:
            self._gen = make_generator(seed, self.device)
        self.t = 0
        self._draw()
        return self.observe()

    def _draw(self) -> None:
        shape = (self.num_envs, self.n_machines)
        self.fault = torch.rand(shape, generator=self._gen, device=self.device) < self.fault_prob
        self.order = torch.randint(self.n_products, shape, generator=self._gen, device=self.device)

    def observe(self) -> Obs:
        b, m, p = self.num_envs, self.n_machines, self.n_products
        fault = self.fault.float()[:, None, :] * self.sensor_mask[None]
        sensor = torch.cat([self.sensor_mask[None].expand(b, -1, -1), fault], dim=2)
        orders = one_hot(self.order, p)  # [B, M, P]
        seen = orders[:, None] * self.processor_mask[None, :, :, None]  # [B, n_proc, M, P]
        processor = torch.cat([self.processor_mask[None].expand(b, -1, -1),
                               seen.reshape(b, -1, m * p)], dim=2)
        ident = torch.eye(m, device=self.device)[None].expand(b, -1, -1)
        clock = torch.full((b, m, 1), self.t / self.spec.episode_length, device=self.device)
        return [sensor, processor, torch.cat([ident, clock], dim=2)]

    def step(self, actions: Actions) -> Step:
        self.check_actions(actions)
        act = actions[2]
        serviced = act == SERVICE
        made_order = act == self.order + 1
        per_machine = torch.where(self.fault, serviced.float() * 2 - 1, made_order.float())
        team = per_machine.mean(dim=1, keepdim=True).expand(-1, self.spec.n_agents)
        self.t += 1
        self._draw()
        return Step(self.observe(), team, self.t >= self.spec.episode_length)

    def _idle(self, k: int) -> Tensor:
        return torch.zeros(self.num_envs, self.spec.types[k].count, dtype=torch.long,
                           device=self.device)

    def oracle_actions(self) -> Actions:
        act = torch.where(self.fault, SERVICE, self.order + 1)
        return [self._idle(0), self._idle(1), act]

    def channel_symbols(self) -> dict[int, tuple[Tensor, int]]:
        """Each sensor tells the joint fault state of its machines, each processor their joint
        orders (mixed-radix codes over the machines each watches)."""
        out = {}
        n_s = self.spec.types[0].count
        for i, mask in enumerate(self.sensor_mask):
            out[i] = _code(self.fault.long(), mask.bool(), 2)
        for j, mask in enumerate(self.processor_mask):
            out[n_s + j] = _code(self.order, mask.bool(), self.n_products)
        return out

    def channel_actions(self, posteriors: dict[int, Tensor], obs: Obs) -> Actions:
        """Each actuator takes the action of highest expected reward under the marginals of its
        machine's fault and order."""
        n_s = self.spec.types[0].count
        p_fault = torch.zeros(self.num_envs, self.n_machines, device=self.device)
        p_order = torch.zeros(self.num_envs, self.n_machines, self.n_products, device=self.device)
        for i, mask in enumerate(self.sensor_mask):
            p_fault += _marginals(posteriors[i], mask.bool(), 2)[..., 1]
        for j, mask in enumerate(self.processor_mask):
            p_order += _marginals(posteriors[n_s + j], mask.bool(), self.n_products)
        service = p_fault  # +1 if broken, 0 if running
        make = (1 - p_fault)[..., None] * p_order - p_fault[..., None]  # [B, M, P]
        value = torch.cat([service[..., None], make], dim=2)
        return [self._idle(0), self._idle(1), value.argmax(dim=2)]

    def no_comm_actions(self, obs: Obs) -> Actions:
        """The best fixed action under the prior: service, or make (any) one product."""
        q = self.fault_prob
        produce_value = (1 - q) / self.n_products - q
        action = SERVICE if q >= produce_value else 1
        return [self._idle(0), self._idle(1), torch.full_like(self._idle(2), action)]


def _code(values: Tensor, watched: Tensor, radix: int) -> tuple[Tensor, int]:
    """``values[:, watched]`` ``[B, m]`` as one mixed-radix symbol per environment."""
    seen = values[:, watched]
    weights = radix ** torch.arange(seen.shape[1], device=values.device)
    return (seen * weights).sum(dim=1), radix ** seen.shape[1]


def _marginals(posterior: Tensor, watched: Tensor, radix: int) -> Tensor:
    """``[B, M, radix]`` each watched machine's marginal under a posterior over the joint code
    (zero for machines not watched)."""
    b, m = posterior.shape[0], watched.shape[0]
    n = int(watched.sum())
    codes = torch.arange(radix**n, device=posterior.device)
    digits = (codes[:, None] // radix ** torch.arange(n, device=posterior.device)) % radix
    per = posterior @ one_hot(digits, radix).reshape(radix**n, n * radix)  # [B, n * radix]
    out = torch.zeros(b, m, radix, device=posterior.device)
    out[:, watched] = per.reshape(b, n, radix)
    return out
