"""The shared communication module: what every agent holds a copy of and the server aggregates.

A sender turns its private features into a knowledge vector (encoder, then clipping to norm C;
the channel adds Gaussian noise). A receiver gates each incoming vector by its own state, weights
it by the learned type-to-type graph, averages and decodes the result into a context for its
policy. Every step is differentiable: gradients of a receiver's loss reach the sender's encoder
through the vector itself (DIAL), and the channel noise, ``d(m + noise)/dm = I``, passes them on.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def clip_norm(x: Tensor, max_norm: float) -> Tensor:
    """Scale each vector (last dim) down to L2 norm at most ``max_norm``; never up."""
    norm = x.norm(dim=-1, keepdim=True)
    return x * (max_norm / norm.clamp(min=max_norm))


class SuperpositionEncoder(nn.Module):
    """Several candidate encodings, mixed by weights the sender computes from its features.

    The mixture ("measurement") weights are a learned function of the input, so the same
    features always produce the same vector; they are not redrawn at random on every call.
    """

    def __init__(self, hidden: int, comm_dim: int, n_states: int = 8) -> None:
        super().__init__()
        self.states = nn.Linear(hidden, n_states * comm_dim)
        self.measure = nn.Linear(hidden, n_states)
        self.n_states, self.comm_dim = n_states, comm_dim

    def forward(self, f: Tensor) -> Tensor:
        states = torch.tanh(self.states(f)).unflatten(-1, (self.n_states, self.comm_dim))
        weights = torch.softmax(self.measure(f), dim=-1)
        return (weights[..., None] * states).sum(dim=-2)


class CommModule(nn.Module):
    """The shared module. ``typed``: the encoder and the receiver's gate also take the agent's
    type (one-hot), so one module serves every type, as parameter sharing with agent ids does
    in MARL, and can be averaged across all of a heterogeneous team's agents."""

    def __init__(self, n_types: int, hidden: int, comm_dim: int, encoder: str = "mlp",
                 n_superpositions: int = 8, graph_init: float = 1.0, typed: bool = False
                 ) -> None:
        super().__init__()
        self.n_types = n_types if typed else 0
        width = hidden + self.n_types
        if encoder == "mlp":
            self.encoder: nn.Module = nn.Sequential(
                nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, comm_dim))
        elif encoder == "superposition":
            self.encoder = SuperpositionEncoder(width, comm_dim, n_superpositions)
        else:
            raise ValueError(f"unknown encoder {encoder!r}: use 'mlp' or 'superposition'")
        self.gate_state = nn.Linear(width, comm_dim)
        self.gate_message = nn.Linear(comm_dim, comm_dim, bias=False)
        self.decoder = nn.Linear(comm_dim, hidden)
        # graph[sender_type, receiver_type]: a logit per route; sigmoid gives its weight.
        self.graph = nn.Parameter(torch.full((n_types, n_types), float(graph_init)))

    def typed(self, feats: Tensor, types: Tensor | None) -> Tensor:
        """``feats`` ``[..., N, H]`` with each agent's type (``types`` ``[N]``) one-hot
        appended, where the module is typed."""
        if not self.n_types:
            return feats
        if types is None:
            raise ValueError("a typed shared module needs each agent's type")
        code = (types[:, None] == torch.arange(self.n_types, device=types.device)).to(feats.dtype)
        return torch.cat([feats, code.expand(*feats.shape[:-1], self.n_types)], dim=-1)

    def encode(self, feats: Tensor, types: Tensor | None = None) -> Tensor:
        return self.encoder(self.typed(feats, types))

    def route_strength(self) -> Tensor:
        return torch.sigmoid(self.graph)

    def kept_routes(self, threshold: float) -> Tensor:
        """``[K, K]`` bool: the routes the router keeps; the others are not sent at all."""
        return self.route_strength().detach() > threshold

    def listen(self, feats: Tensor, incoming: Tensor, weights: Tensor,
               types: Tensor | None = None) -> Tensor:
        """Context for each receiver from the vectors it was delivered.

        Parameters
        ----------
        feats
            ``[B, Nr, H]`` the receivers' features.
        incoming
            ``[B, Nr or 1, Ns, D]`` the vectors each receiver sees (undelivered ones are
            ignored); a receiver dimension of 1 broadcasts the same senders to every receiver.
        weights
            ``[B or 1, Nr, Ns]`` the weight of each delivered vector, 0 where none was delivered.
        types
            ``[Nr]`` each receiver's type, for a typed module.
        """
        state = self.gate_state(self.typed(feats, types))
        gate = torch.sigmoid(state[:, :, None, :] + self.gate_message(incoming))
        summed = (gate * incoming * weights[..., None]).sum(dim=2)
        count = (weights > 0).sum(dim=-1, keepdim=True).clamp(min=1)
        return torch.tanh(self.decoder(summed / count))
