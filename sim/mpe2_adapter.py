"""Run any mpe2 parallel environment with discrete actions through the batched interface.

One mpe2 environment per batch entry, stepped in a Python loop: slow, but it is the original, so a
policy trained on a port can be evaluated where published numbers come from.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from typing import ClassVar

import numpy as np
import torch

from fedcomm.sim.base import Actions, AgentType, EnvOption, EnvSpec, Obs, Step, VecEnv


def agent_type_name(agent: str) -> str:
    """mpe2 names agents ``<type>_<index>``."""
    return re.sub(r"_\d+$", "", agent)


class Mpe2Env(VecEnv):
    # No rules of mpe2's environments are scripted here: only the random team is generic.
    scripted_teams = ("random",)
    options: ClassVar[Mapping[str, EnvOption]] = {
        "max_cycles": EnvOption(int, 25, "steps per episode", low=1),
        "mute": EnvOption(str, (), "agent types whose actions are replaced by action 0",
                          many=True),
    }
    instead: ClassVar[Mapping[str, str]] = {
        "say": "mute=speaker (what say=false is on the port)",
        "episode_length": "max_cycles=N",
    }

    def __init__(self, env_name: str, num_envs: int, device: str | torch.device = "cpu",
                 max_cycles: int = 25, mute: str | list[str] = ()) -> None:
        # Agent types whose actions are replaced by action 0: a channel through the
        # environment itself (speaker_listener's "say") closed as a port's option closes it.
        self.mute = [mute] if isinstance(mute, str) else list(mute)
        try:
            module = importlib.import_module(f"mpe2.{env_name}")
        except ModuleNotFoundError as e:
            raise ValueError(f"mpe2 has no environment {env_name!r}") from e
        self.envs = [module.parallel_env(max_cycles=max_cycles, continuous_actions=False)
                     for _ in range(num_envs)]
        self.num_envs = num_envs
        self.device = torch.device(device)
        first = self.envs[0]
        groups: dict[str, list[str]] = {}
        for agent in first.possible_agents:
            groups.setdefault(agent_type_name(agent), []).append(agent)
        types = []
        for name, agents in groups.items():
            dims = {first.observation_space(a).shape[0] for a in agents}
            n_actions = {getattr(first.action_space(a), "n", None) for a in agents}
            if len(dims) != 1 or len(n_actions) != 1 or None in n_actions:
                raise ValueError(f"mpe2:{env_name}: agents of type {name!r} differ in spaces or "
                                 "do not have discrete actions")
            # Plain ints: gymnasium's are numpy scalars, which a weights-only checkpoint load
            # and JSON refuse.
            # A muted type has one action (its own action 0), as a muted port's agent has.
            actions = 1 if name in self.mute else int(n_actions.pop())
            types.append(AgentType(name, len(agents), int(dims.pop()), actions))
        self.spec = EnvSpec(f"mpe2:{env_name}", tuple(types), episode_length=max_cycles)
        unknown = set(self.mute) - set(groups)
        if unknown:
            raise ValueError(f"mpe2:{env_name} has no agent type {', '.join(sorted(unknown))} "
                             f"to mute; its types: {', '.join(groups)}")
        self._groups = list(groups.values())
        self._order = [a for agents in self._groups for a in agents]
        self.t = 0

    def reset(self, seed: int | None = None) -> Obs:
        self.t = 0
        observations = [env.reset(seed=None if seed is None else seed + i)[0]
                        for i, env in enumerate(self.envs)]
        return self._stack(observations)

    def step(self, actions: Actions) -> Step:
        self.check_actions(actions)
        actions = [torch.zeros_like(a) if t.name in self.mute else a
                   for t, a in zip(self.spec.types, actions)]
        flat = torch.cat(actions, dim=1).cpu().numpy()  # [B, n_agents] in agent order
        observations, rewards = [], []
        for env, row in zip(self.envs, flat):
            obs, rew, *_ = env.step({a: int(x) for a, x in zip(self._order, row)})
            observations.append(obs)
            rewards.append([rew[a] for a in self._order])
        self.t += 1
        reward = torch.tensor(np.asarray(rewards), dtype=torch.float32, device=self.device)
        return Step(self._stack(observations), reward, self.t >= self.spec.episode_length)

    def _stack(self, observations: list[dict]) -> Obs:
        return [
            torch.as_tensor(np.asarray([[o[a] for a in agents] for o in observations]),
                            dtype=torch.float32, device=self.device)
            for agents in self._groups
        ]

    def oracle_actions(self) -> Actions:
        raise NotImplementedError(f"{self.spec.name} has no scripted oracle team")

    def no_comm_actions(self, obs: Obs) -> Actions:
        raise NotImplementedError(f"{self.spec.name} has no scripted no_comm team")
