"""Layers that hold one private set of weights per agent and apply them all in one batched op.

Agents of a type share an architecture but not weights (each belongs to its own party), so their
weights are stacked along a group dimension ``G`` and inputs carry a matching agent dimension:
``[..., G, in] -> [..., G, out]``. A single party is the case ``G = 1``.
"""

from __future__ import annotations

import math
from itertools import pairwise

import torch
from torch import Tensor, nn


class GroupLinear(nn.Module):
    def __init__(self, groups: int, in_features: int, out_features: int, gain: float = 1.0,
                 bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(groups, in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(groups, out_features)) if bias else None
        for w in self.weight:  # orthogonal per agent, as PPO implementations initialise
            nn.init.orthogonal_(w, gain=gain)

    def forward(self, x: Tensor) -> Tensor:
        # One batched matmul over the groups; as an einsum it stays one under vmap too (the
        # per-episode gradients of DP-SGD), where a bmm would copy the weights per episode.
        y = torch.einsum("...gi,gio->...go", x, self.weight)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        g, i, o = self.weight.shape
        return f"groups={g}, in_features={i}, out_features={o}, bias={self.bias is not None}"


def group_mlp(groups: int, sizes: list[int], out_gain: float = math.sqrt(2)) -> nn.Sequential:
    """Tanh MLP with per-agent weights; ``out_gain`` scales the last layer's initialisation."""
    layers: list[nn.Module] = []
    for k, (i, o) in enumerate(pairwise(sizes)):
        last = k == len(sizes) - 2
        layers.append(GroupLinear(groups, i, o, gain=out_gain if last else math.sqrt(2)))
        if not last:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class GroupGRUCell(nn.Module):
    """A GRU cell per agent: the optional recurrent state of each agent's features."""

    def __init__(self, groups: int, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.x2h = GroupLinear(groups, input_size, 3 * hidden_size)
        self.h2h = GroupLinear(groups, hidden_size, 3 * hidden_size)
        self.hidden_size = hidden_size

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        return self._step(self.x2h(x), h)

    def unroll(self, x: Tensor, h: Tensor) -> Tensor:
        """The states of ``T`` steps from state ``h``, ``x`` being ``[T, B, groups, in]``: the
        inputs' projections in one batch, only the recurrence step after step (under vmap,
        DP-SGD's per-episode gradients, every op in the loop costs once per step)."""
        states = []
        for projected in self.x2h(x):
            h = self._step(projected, h)
            states.append(h)
        return torch.stack(states)

    def _step(self, projected: Tensor, h: Tensor) -> Tensor:
        xr, xz, xn = projected.chunk(3, dim=-1)
        hr, hz, hn = self.h2h(h).chunk(3, dim=-1)
        r = torch.sigmoid(xr + hr)
        z = torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return (1 - z) * n + z * h
