"""PPO as DP-SGD over episodes: the update of a party whose shared module leaves it.

The party's copy of the shared module goes to the server, and every other parameter of its agent
shapes that copy's gradients, so the whole model is trained with DP-SGD, the privacy unit being
one episode (one environment's trajectory in the batch). Each step draws a Poisson sample of
episodes, takes each sampled episode's gradient of its own loss, clips it to norm ``clip``, sums,
adds ``N(0, (noise_multiplier * clip)^2)`` per coordinate and divides by the expected sample
size (Opacus' ``DPOptimizer`` does the clipping, noise and scaling).

Per-episode gradients come from ``torch.func``: ``vmap(grad(loss))`` over the batch's
environment dimension with the team called through ``functional_call``. Opacus' grad samplers
do not fit: the grouped layers have none, a layer's rows are steps rather than episodes, and
the route logits are used outside any layer.

Each episode's loss is ``ppo_loss``'s on that episode alone, without standardising the
advantages, plus its feedback surrogate; the mean over a sample is ``ppo_update``'s minibatch
loss when the advantages come standardised. Standardising here is what DP forbids: over the
sample (as ``ppo_update`` does) it makes each episode's clipped gradient depend on the other
episodes, so one episode could move the update by more than ``clip``; within each episode it
is private but discards which episodes went better than expected: on speaker_listener (no
noise or clipping, one seed) the mean return over batches 181-200 was -14.0 with it, -10.5
unstandardised, -9.7 with ``ppo_update``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from opacus.optimizers import DPOptimizer
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from fedcomm.config import PPOConfig
from fedcomm.learning.ppo import Targets, ppo_loss
from fedcomm.learning.rollout import Rollout, replay
from fedcomm.models.state import SHARED
from fedcomm.models.team import Team
from fedcomm.releases.schedule import check_sample_rate, dp_steps

VALUE = "value."  # the value networks' parameters
RECALL = "recall."  # a sender's recall decoders


class _EpisodeLoss(nn.Module):
    """The team's loss on one episode, as a module so ``functional_call`` can swap its
    parameters (``ppo_loss`` uses the team beyond its ``forward``)."""

    def __init__(self, team: Team, cfg: PPOConfig) -> None:
        super().__init__()
        self.team, self.cfg = team, cfg

    def forward(self, batch: Rollout, targets: Targets, feedback: Tensor | None
                ) -> tuple[Tensor, dict[str, Tensor]]:
        loss, out, stats = ppo_loss(self.team, batch, targets, self.cfg, standardize=False)
        if feedback is not None:  # one episode: sum(m * g) / 1
            loss = loss + (out.messages * feedback).sum()
        return loss, stats


def _episode_data(rollout: Rollout, targets: Targets, feedback: Tensor | None
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The batch's tensors and the dimension of each that indexes episodes (``None``: shared,
    as a delivery mask broadcast over environments)."""
    data: dict[str, Any] = {
        "obs": rollout.obs, "actions": rollout.actions, "noise": rollout.noise,
        "logprobs": rollout.logprobs, "values": rollout.values, "rewards": rollout.rewards,
        "received": rollout.received, "delivered": rollout.delivered,
        "advantages": targets.advantages, "returns": targets.returns, "feedback": feedback,
        "marginal": targets.marginal}
    dims: dict[str, Any] = {k: None if v is None else 1 for k, v in data.items()}
    dims["marginal"] = None  # the same for every episode
    dims["obs"] = [1] * len(rollout.obs)
    dims["actions"] = [1] * len(rollout.actions)
    if rollout.delivered is not None and rollout.delivered.shape[1] == 1:
        dims["delivered"] = None
    return data, dims


def episode_gradients(team: Team, rollout: Rollout, targets: Targets, cfg: PPOConfig,
                      feedback: Tensor | None = None
                      ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Each episode's gradient of its loss, ``{name: [B, *param.shape]}`` for the team's
    trainable parameters, and each episode's PPO statistics ``{name: [B]}``."""
    module = _EpisodeLoss(team, cfg)
    params = {k: p.detach() for k, p in module.named_parameters() if p.requires_grad}
    frozen = {k: p for k, p in module.named_parameters() if not p.requires_grad}
    buffers = dict(module.named_buffers())
    data, dims = _episode_data(rollout, targets, feedback)

    def one(params: dict[str, Tensor], data: dict[str, Any]) -> tuple[Tensor, dict]:
        def episode(x: Any, dim: Any) -> Any:  # restore the batch dimension of 1
            if isinstance(x, list):
                return [v.unsqueeze(1) for v in x]
            return x if x is None or dim is None else x.unsqueeze(1)

        d = {k: episode(v, dims[k]) for k, v in data.items()}
        batch = Rollout(d["obs"], d["actions"], d["noise"], d["logprobs"], d["values"],
                        d["rewards"], d["received"], d["delivered"])
        part = Targets(d["advantages"], d["returns"], d["marginal"])
        return functional_call(module, (params, frozen, buffers), (batch, part, d["feedback"]))

    grads, stats = vmap(grad(one, has_aux=True), in_dims=(None, dims))(params, data)
    prefix = "team."
    return {k[len(prefix):]: g for k, g in grads.items()}, stats


def clip_group(name: str) -> str:
    """The clip group of a parameter: ``shared`` (the shared module), ``value`` (the value
    networks), ``recall`` (a sender's recall decoders) or ``private`` (every other network)."""
    if name.startswith(SHARED):
        return "shared"
    if name.startswith(RECALL):
        return "recall"
    return "value" if name.startswith(VALUE) else "private"


def clip_groups(grads: dict[str, Tensor], clip: float, shares: dict[str, float]
                ) -> dict[str, Tensor]:
    """Each episode's gradient clipped group by group (``clip_group``): a group with a share
    ``w`` to ``clip * sqrt(w)``, the private networks (and every group without a share) to the
    rest, so the whole gradient still has norm at most ``clip``."""
    given = sum(shares.values())
    if any(not 0 < w < 1 for w in shares.values()) or not given < 1 or "private" in shares:
        raise ValueError(f"the clip groups' shares must lie in (0, 1) and sum below 1, got "
                         f"{shares}")
    bounds = {**shares, "private": 1 - given}
    group_of = {k: clip_group(k) if clip_group(k) in shares else "private" for k in grads}
    out = {}
    for group, share in bounds.items():
        names = [k for k in grads if group_of[k] == group]
        if not names:
            continue
        bound = clip * math.sqrt(share)
        norm = torch.stack([grads[k].flatten(1).norm(dim=1) for k in names]).norm(dim=0)
        scale = (bound / norm.clamp(min=bound))  # [B]: 1 below the bound
        out |= {k: grads[k] * scale.view(-1, *[1] * (grads[k].dim() - 1)) for k in names}
    return out


@torch.no_grad()
def released_statistics(team: Team, rollout: Rollout, targets: Targets, cfg: PPOConfig, *,
                        noise_multiplier: float, clip: float, sample_rate: float,
                        generator: torch.Generator | None,
                        noise_generator: torch.Generator | None) -> Targets:
    """``targets`` with the advantages centred on the batch's released mean per step and, for
    positive signalling, each sender's released codeword marginal: one sampled Gaussian step of
    DP-SGD's shape (rate ``sample_rate``, each episode's statistics clipped to ``clip``, noise
    ``noise_multiplier * clip``), so it is accounted as one more step.

    Each sampled episode contributes its advantages, divided by a scale that depends on no
    episode (twice the episode length, one reward per step, times the root of their number),
    and its release distributions, each part clipped to ``clip / sqrt(parts)``. Without the
    centring a new agent's advantages are all of one sign (about -21 +- 15 rewards on
    speaker_listener), and with every episode's gradient clipped that offset biases each step.
    """
    b = rollout.num_envs
    adv = targets.advantages.transpose(0, 1).flatten(1)  # [B, T * n_local]
    scale = 2 * team.spec.episode_length * math.sqrt(adv.shape[1])
    parts = [adv / scale]
    probs = None
    if cfg.signal_coef and team.cfg.channel == "discrete":
        code = replay(team, rollout).code_probs
        steps = torch.arange(code.shape[0], device=code.device)
        probs = code[team.releases_at(steps)].transpose(0, 1)  # [B, S, n_local, K]
        parts.append(probs.flatten(1) / math.sqrt(probs.shape[1] * probs.shape[2]))
    bound = clip / math.sqrt(len(parts))
    clipped = torch.cat([x * (bound / x.norm(dim=1, keepdim=True).clamp(min=bound))
                         for x in parts], dim=1)
    device = rollout.rewards.device
    sampled = poisson_sample(b, sample_rate, generator).to(device)
    noise = torch.randn(clipped.shape[1], generator=noise_generator,
                        device=noise_generator.device if noise_generator is not None else "cpu")
    mean = ((clipped * sampled[:, None]).sum(dim=0)
            + noise.to(device) * (noise_multiplier * clip)) / (sample_rate * b)
    n = adv.shape[1]
    centre = (mean[:n] * scale).view(targets.advantages.shape[0], 1, -1)
    marginal = None
    if probs is not None:
        s, agents, k = probs.shape[1:]
        m = (mean[n:] * math.sqrt(s * agents)).view(s, agents, k).mean(dim=0)
        _, other = team.channel.response_probabilities()
        m = m.clamp(min=other)  # randomized response releases each codeword this often
        marginal = m / m.sum(dim=-1, keepdim=True)
    return Targets(targets.advantages - centre, targets.returns, marginal)


def poisson_sample(b: int, rate: float, generator: torch.Generator | None) -> Tensor:
    """``[B]`` bool: which of ``b`` episodes a DP-SGD step samples, each with probability
    ``rate``. Subsampling amplifies privacy only while the sample is secret: ``generator`` is
    the agent's secure source, never a stream seeded from anything public."""
    device = generator.device if generator is not None else "cpu"
    return torch.rand(b, generator=generator, device=device) < rate


def dp_ppo_update(team: Team, optimizer: torch.optim.Optimizer, rollout: Rollout,
                  cfg: PPOConfig, targets: Targets, *, noise_multiplier: float, clip: float,
                  sample_rate: float, generator: torch.Generator | None,
                  noise_generator: torch.Generator | None,
                  feedback: Tensor | None = None,
                  clip_shares: dict[str, float] | None = None,
                  statistics: bool = False) -> tuple[dict[str, float], int]:
    """``ppo_update``'s epochs as DP-SGD steps over Poisson samples of episodes.

    ``clip_shares`` (``{"shared": w, "value": v}``, either or both) clips each episode's
    gradient in parts (``clip_groups``): the shared module's to norm ``clip * sqrt(w)``, the
    value networks' to ``clip * sqrt(v)``, the other private networks' to the rest, so their
    sum still has norm at most ``clip`` (the same sensitivity and noise) but a small part is
    not drowned by a large one: the shared module's gradient by the policy's, whose norm is
    tens of times larger; the value's, which fixes the advantages' baseline, by the policy's
    while that baseline is still off. Empty or ``None`` clips the whole gradient to ``clip``.
    ``statistics`` first releases the batch's statistics (``released_statistics``) as one
    more step.

    Each step is one sampled Gaussian release (rate ``sample_rate``, noise multiplier
    ``noise_multiplier``, L2 sensitivity ``clip`` under add/remove of an episode); the
    second value returned is their number, ``dp_steps(cfg, sample_rate)``. A step whose
    sample is empty still releases noise. ``generator`` draws the samples
    (``poisson_sample``), ``noise_generator`` the noise: both the agent's secure source.
    ``cfg.max_grad_norm`` is not applied: the per-episode clip bounds the update. Advantages
    are used as given (see the module's note): rescale them, if at all, by a constant that
    depends on no episode.
    """
    check_sample_rate(sample_rate)
    if not 0 < clip < math.inf or noise_multiplier < 0:
        raise ValueError("the clip norm must be positive and finite, the noise multiplier "
                         "non-negative")
    own = {id(p): name for name, p in team.named_parameters() if p.requires_grad}
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    if sorted(own) != sorted(id(p) for p in params):
        raise ValueError("the optimizer must hold exactly the team's trainable parameters: "
                         "each one shapes the shared module's update")
    b = rollout.num_envs
    dp = DPOptimizer(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=clip,
                     expected_batch_size=sample_rate * b, loss_reduction="mean",
                     generator=noise_generator)
    device = rollout.rewards.device
    steps = dp_steps(cfg, sample_rate, statistics)
    if statistics:
        targets = released_statistics(team, rollout, targets, cfg,
                                      noise_multiplier=noise_multiplier, clip=clip,
                                      sample_rate=sample_rate, generator=generator,
                                      noise_generator=noise_generator)
    stats: dict[str, list[float]] = {}
    try:
        for _ in range(steps - int(statistics)):
            envs = poisson_sample(b, sample_rate, generator).nonzero().squeeze(1).to(device)
            dp.zero_grad(set_to_none=True)
            if len(envs):
                part = Targets(targets.advantages[:, envs], targets.returns[:, envs],
                               targets.marginal)
                grads, episode_stats = episode_gradients(
                    team, rollout.select(envs), part, cfg,
                    None if feedback is None else feedback[:, envs])
                if clip_shares:
                    grads = clip_groups(grads, clip, clip_shares)
                for p in params:
                    p.grad_sample = grads[own[id(p)]]
                norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()])
                episode_stats["dp_clip_frac"] = (norms.norm(dim=0) > clip * (1 - 1e-6)).float()
                for k, v in episode_stats.items():
                    stats.setdefault(k, []).append(v.mean().item())
            else:
                for p in params:
                    p.grad_sample = p.new_zeros((0, *p.shape))
            stats.setdefault("dp_episodes", []).append(float(len(envs)))
            dp.step()
    finally:  # leave no per-sample state on the parameters
        for p in params:
            for attr in ("grad_sample", "summed_grad"):
                if hasattr(p, attr):
                    delattr(p, attr)
    return {k: sum(v) / len(v) for k, v in stats.items()}, steps
