"""How a party's agents reach the joint environment and each other: a swappable piece.

The rollout (``learning/rollout.py``) is written once against ``Transport``. In process,
``LocalTransport`` drives a ``VecEnv`` and the router directly, for a team that holds every
agent (the centralized trainer, evaluation, tests). Over the network, ``GrpcTransport``
(``clients/grpc_transport.py``) speaks the ``fedcomm.v1`` protocol to the simulator service for
one agent.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from fedcomm.sim.base import Actions, EnvSpec, Obs, VecEnv
from fedcomm.sim.router import delivery_mask, sites_of


class BatchTruncated(RuntimeError):
    """The episode batch ended early (a peer left or timed out); its data is incomplete."""


@dataclass
class TransportStep:
    obs: Obs  # the local agents' next observations
    reward: Tensor  # [B, n_local]
    done: bool


class Transport(ABC):
    spec: EnvSpec
    agents: tuple[int, ...]  # the local agents, in agent order
    num_envs: int

    @abstractmethod
    def reset(self, routes: Tensor, seed: int | None = None, silent: bool = False) -> Obs:
        """Join the next episode batch with this round's kept routes ``[K, K]``.

        Returns the local agents' first observations. ``seed`` seeds the batch: a local
        environment directly, a remote simulator through the join (every agent of the batch
        declares the same seed; without one the simulator picks). ``silent``: the local agents
        release nothing in this batch (their privacy budget is spent); they still act.
        """

    @abstractmethod
    def exchange(self, vectors: Tensor, release: bool = True) -> tuple[Tensor | None, Tensor]:
        """Send the local agents' vectors ``[B, n_local, D]``; get what was delivered to them.
        ``release=False``: a step the schedule skips, where the local agents send nothing.

        Returns ``received`` (``[B, N, D]``, every sender's vector, or ``None`` when every agent
        is local) and ``delivered`` (``[B or 1, n_local, N]`` bool).
        """

    @abstractmethod
    def step(self, actions: Actions) -> TransportStep:
        """Send the local agents' actions (one tensor per local type); raises BatchTruncated."""

    def feedback(self, grads: Tensor, senders: Tensor) -> Tensor:
        """Send DIAL feedback for remote senders; receive the local senders' summed feedback.

        ``grads`` is ``[T, B, N, D]``, the gradient of the local agents' summed loss with respect
        to each vector they received; ``senders`` (``[N]`` bool) marks whose entries to send.
        Returns ``[T, B, n_local, D]``.
        """
        t, b, _, d = grads.shape
        return grads.new_zeros(t, b, len(self.agents), d)

    def close(self) -> None:  # noqa: B027 - optional hook: only remote transports hold resources
        """Release connections."""


class LocalTransport(Transport):
    """The environment and the router in this process, for a team holding every agent."""

    def __init__(self, env: VecEnv) -> None:
        self.env, self.spec, self.num_envs = env, env.spec, env.num_envs
        self.agents = tuple(range(env.spec.n_agents))
        self.type_of_agent = torch.tensor(env.spec.type_of_agent, device=env.device)
        self.site_of_agent = sites_of(env.spec, env.device)
        self.routes: Tensor | None = None

    def reset(self, routes: Tensor, seed: int | None = None, silent: bool = False) -> Obs:
        if silent:
            raise ValueError("a team holding every agent has nobody to be silent towards")
        self.routes = routes
        return self.env.reset(seed)

    def exchange(self, vectors: Tensor, release: bool = True) -> tuple[Tensor | None, Tensor]:
        if self.routes is None:
            raise RuntimeError("reset the transport before exchanging vectors")
        mask = delivery_mask(self.type_of_agent, self.routes, vectors, self.spec.bandwidth,
                             site_of_agent=self.site_of_agent, sites=self.spec.sites)
        return None, mask & release

    def step(self, actions: Actions) -> TransportStep:
        step = self.env.step(actions)
        return TransportStep(step.obs, step.reward, step.done)
