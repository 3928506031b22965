"""DIAL over the wire: the feedback gradients receivers send and senders apply.

A receiver differentiates its loss with respect to every vector it received and sends that back
through the router; each sender gets the sum over its receivers and adds it to its encoder's
gradient (``ppo_update(feedback=...)``). On the wire the gradients are per episode: the gradient
of the loss summed over episodes, so that clipping each episode's slice to a norm bounds what one
episode of the receiver's trajectory can reveal.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from fedcomm.config import PPOConfig
from fedcomm.learning.ppo import Targets, ppo_loss
from fedcomm.learning.rollout import Rollout
from fedcomm.models.comm import clip_norm
from fedcomm.models.team import Team


def feedback_loss_config(cfg: PPOConfig) -> PPOConfig:
    """The loss feedback differentiates: without the value term unless ``cfg.feedback_value``."""
    return cfg if cfg.feedback_value else replace(cfg, vf_coef=0.0)


def receiver_feedback(team: Team, rollout: Rollout, targets: Targets, cfg: PPOConfig) -> Tensor:
    """``[T, B, N, D]`` per-episode gradient of the local agents' loss (policy and entropy
    terms; the value term too with ``cfg.feedback_value``) w.r.t. each received vector; zero
    wherever nothing was delivered (and for the local agents' own entries)."""
    if rollout.received is None:
        raise ValueError("a team holding every agent receives nothing from outside")
    received = rollout.received.detach().clone().requires_grad_(True)
    loss, _, _ = ppo_loss(team, replace(rollout, received=received), targets,
                          feedback_loss_config(cfg))
    (grad,) = torch.autograd.grad(loss, received)
    return grad * rollout.num_envs


def in_process_feedback(team: Team, rollout: Rollout, targets: Targets, cfg: PPOConfig
                        ) -> Tensor:
    """``[T, B, N, D]`` what every sender's vectors get from all receivers' losses, computed in
    one graph: the reference the feedback exchange reproduces.

    A vector is ``clean + noise``, so the gradient with respect to the stored noise is the
    gradient with respect to the vector.
    """
    if not team.whole:
        raise ValueError("the in-process reference needs a team holding every agent")
    noise = rollout.noise.detach().clone().requires_grad_(True)
    loss, _, _ = ppo_loss(team, replace(rollout, noise=noise), targets, feedback_loss_config(cfg))
    (grad,) = torch.autograd.grad(loss, noise)
    return grad * rollout.num_envs


def privatize(grads: Tensor, clip: float, noise_multiplier: float,
              generator: torch.Generator | None = None) -> Tensor:
    """Clip each (episode, sender) slice ``[T, D]`` of ``[T, B, S, D]`` to norm ``clip`` and add
    ``N(0, (noise_multiplier * clip)^2)`` to every coordinate: the Gaussian mechanism per episode.
    """
    per_episode = grads.permute(1, 2, 0, 3)  # [B, S, T, D]
    flat = clip_norm(per_episode.flatten(2), clip).unflatten(2, per_episode.shape[2:])
    clipped = flat.permute(2, 0, 1, 3)
    if noise_multiplier == 0:
        return clipped
    noise = torch.randn(clipped.shape, generator=generator, device=clipped.device)
    return clipped + noise * (noise_multiplier * clip)
