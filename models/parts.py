"""Which parts of the shared communication module each agent uses and sends, from its routes.

The shared module has a sender's part (the encoder) and a receiver's parts (the gates, the
decoder and the route graph). Which of them an agent uses follows from the routes its type may
send and receive on; which it sends the server follows from ``FederationConfig.share``. The
agents decide what they train and release from this, and the server what each reply must
carry: both read it here.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fedcomm.config import TrainConfig
from fedcomm.sim.base import EnvSpec

SENDER_PARTS = ("encoder",)
RECEIVER_PARTS = ("gate_state", "gate_message", "decoder", "graph")


def uses(spec: EnvSpec, routes: Tensor, index: int) -> tuple[str, ...]:
    """The parts of the shared module agent ``index`` uses: the encoder if its vectors reach
    someone, the receiving parts if vectors reach it."""
    reach, reached_by = peers(spec, routes, index)
    return (SENDER_PARTS if reach else ()) + (RECEIVER_PARTS if reached_by else ())


def shared_parts(spec: EnvSpec, share: str, routes: Tensor, index: int) -> tuple[str, ...]:
    """The parts of the shared module agent ``index`` sends to the server: all of them, or
    (``share="used"``) those it uses that another agent uses too: the encoder if its vectors
    reach someone and another agent's do, the receiving parts if vectors reach it and another
    agent."""
    if share == "all":
        return SENDER_PARTS + RECEIVER_PARTS
    if share == "none":
        return ()
    links = [peers(spec, routes, i) for i in range(spec.n_agents)]
    reach, reached_by = links[index]
    senders = sum(r > 0 for r, _ in links)
    receivers = sum(b > 0 for _, b in links)
    return ((SENDER_PARTS if reach and senders > 1 else ())
            + (RECEIVER_PARTS if reached_by and receivers > 1 else ()))


def sends_to_server(spec: EnvSpec, share: str, aggregate_private: bool, routes: Tensor,
                    index: int) -> bool:
    """Whether agent ``index`` sends the server any of its networks: parts of the shared
    module (``shared_parts``) or, with ``aggregate_private``, its type's private networks."""
    return aggregate_private or bool(shared_parts(spec, share, routes, index))


def peers(spec: EnvSpec, routes: Tensor, index: int) -> tuple[int, int]:
    """How many other agents ``index``'s vectors can reach, and how many can reach it."""
    routes = routes.cpu()
    types = torch.tensor(spec.type_of_agent)
    others = torch.arange(spec.n_agents) != index
    k = spec.type_of_agent[index]
    reach = int((routes[k, types] & others).sum())
    reached_by = int((routes[types, k] & others).sum())
    return reach, reached_by


def initial_routes(train: TrainConfig) -> Tensor:
    """The routes of the first round: all of them, unless the team does not communicate or
    starts with every route below the pruning threshold."""
    keep = (train.team.communicate
            and 1 / (1 + math.exp(-train.team.graph_init)) > train.team.prune_threshold)
    return torch.tensor(train.team.allowed_routes(train.spec)) & keep
