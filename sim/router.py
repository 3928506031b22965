"""Which knowledge vectors reach which agents.

The router is the only place that decides delivery, in process and on the simulator server alike:
a route from agent ``i`` to agent ``j`` carries a vector only if the communication graph keeps
the route between their types, ``i != j``, both are of one site (``sim.sites``), and, under a
bandwidth limit, ``i`` is among the ``bandwidth`` senders of highest priority in that
environment, site and step. A sender's priority is the first coordinate of its (already
noised) vector, so ranking senders is post-processing of a private release and costs no privacy.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedcomm.sim.base import EnvSpec


def priority(messages: Tensor) -> Tensor:
    """``[..., N, D] -> [..., N]`` in (0, 1): how strongly each sender claims the channel."""
    return torch.sigmoid(messages[..., 0])


def sites_of(spec: EnvSpec, device: torch.device | str = "cpu") -> Tensor | None:
    """``[N]`` the site of each agent of ``spec``, for ``delivery_mask``; ``None``: one site."""
    return None if spec.sites == 1 else torch.tensor(spec.site_of_agent, device=device)


def delivery_mask(type_of_agent: Tensor, routes: Tensor, messages: Tensor | None = None,
                  bandwidth: int | None = None, silent: Tensor | None = None,
                  site_of_agent: Tensor | None = None, sites: int = 1) -> Tensor:
    """``[B or 1, N_receivers, N_senders]`` bool: the vectors that are delivered.

    Parameters
    ----------
    type_of_agent
        ``[N]`` type index of each agent.
    routes
        ``[K, K]`` bool, ``routes[sender_type, receiver_type]``: the graph's kept routes.
    messages
        ``[B, N, D]`` the senders' vectors, needed only under a bandwidth limit.
    bandwidth
        At most this many senders per environment are delivered; ``None`` for no limit.
    silent
        ``[N]`` bool: senders that release nothing (their budget is spent); they take no slot.
    site_of_agent, sites
        ``[N]`` the site of each agent, of ``sites`` (``sim.sites``): vectors stay within their
        site, and the bandwidth limit holds per site; ``None``: one site.
    """
    n = type_of_agent.numel()
    allowed = routes[type_of_agent][:, type_of_agent].T  # [receiver, sender]
    allowed = allowed & ~torch.eye(n, dtype=torch.bool, device=allowed.device)
    if site_of_agent is not None:
        allowed = allowed & (site_of_agent[:, None] == site_of_agent[None, :])
    if silent is not None:
        allowed = allowed & ~silent[None, :]
    mask = allowed[None]
    if site_of_agent is None:
        sites = 1
    if bandwidth is not None and bandwidth < n // sites:
        if messages is None:
            raise ValueError("a bandwidth limit needs the messages to rank senders")
        # Rank only senders some kept route leaves from: the others would waste a slot.
        scores = priority(messages).masked_fill(~allowed.any(dim=0), -1.0)
        selected = torch.zeros(messages.shape[:-1], dtype=torch.bool, device=messages.device)
        for site in range(sites):
            ranked = (scores if site_of_agent is None
                      else scores.masked_fill(site_of_agent != site, -2.0))
            top = ranked.topk(bandwidth, dim=-1).indices  # [B, bandwidth]
            selected.scatter_(-1, top, True)
        mask = mask & selected[:, None, :]
    return mask
