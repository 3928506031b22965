"""The channel every sender releases through: the privacy mechanism of a knowledge message.

Gaussian: a vector clipped to norm ``C`` plus noise of std ``sigma C``. Discrete: a codeword of a
learned codebook, sampled from the encoder and privatised by ``K``-ary randomized response.
``expected`` is what a release is drawn around (differentiable in the sender's networks),
``draw`` the release's random part (from the agent's secure source), ``release`` the vector a
receiver hears, with the gradient that reaches the sender through it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fedcomm.config import TeamConfig
from fedcomm.models.comm import clip_norm
from fedcomm.sim.base import one_hot


class Channel:
    """The DP channel of a team's senders (``TeamConfig``: its kind, clip, noise, codebook)."""

    def __init__(self, cfg: TeamConfig) -> None:
        self.cfg = cfg

    def expected(self, encoded: Tensor) -> Tensor:
        """What the release is drawn around, given the encoder's output.

        Gaussian: the vector clipped to norm C (the noise is added to it). Discrete: the
        expected released one-hot, ``b + (a - b) softmax(logits)``, where ``a`` is randomized
        response's probability of keeping the sampled codeword and ``b`` of each other one: the
        released codeword is drawn from it, and its gradient is the straight-through one
        (``release``).
        """
        if self.cfg.channel == "gaussian":
            return clip_norm(encoded, self.cfg.clip)
        keep, other = self.response_probabilities()
        return other + (keep - other) * torch.softmax(self.code_logits(encoded), dim=-1)

    def code_logits(self, encoded: Tensor) -> Tensor:
        """A discrete code's logits: the encoder's output standardised over the codewords and
        scaled by ``cfg.code_scale``, so that a new code depends on what its sender sees."""
        centred = encoded - encoded.mean(dim=-1, keepdim=True)
        scale = centred.pow(2).mean(dim=-1, keepdim=True).add(1e-6).rsqrt()
        return centred * (scale * self.cfg.code_scale)

    def response_probabilities(self) -> tuple[float, float]:
        """Randomized response's probabilities: the codeword kept, each other one."""
        k, eps = self.cfg.symbols, self.cfg.rr_epsilon
        other = 1.0 / (math.exp(eps) + k - 1)
        return 1.0 - (k - 1) * other, other

    def draw(self, clean: Tensor, generator: torch.Generator | None = None,
             greedy: bool = False) -> Tensor:
        """The channel's privacy noise for ``clean`` (``expected``'s output), the release's random
        part: Gaussian noise of std ``sigma C``; or, discrete, the released one-hot: a codeword
        sampled from the encoder (its most likely one when ``greedy``), then kept with
        probability ``a`` and replaced by each other one with ``b``. Drawn from ``generator``
        (the privacy noise's)."""
        device = clean.device
        if self.cfg.channel == "gaussian":
            noise = torch.randn(*clean.shape, generator=generator, device=device)
            return noise * (self.cfg.noise_multiplier * self.cfg.clip)
        keep, other = self.response_probabilities()
        k = self.cfg.symbols
        # The encoder's own choice, then randomized response applied to whatever it is: the
        # mechanism's guarantee does not depend on the encoder's output being a distribution.
        probs = ((clean - other) / (keep - other)).nan_to_num(0.0, 0.0, 0.0).clamp_(min=0.0)
        total = probs.sum(dim=-1, keepdim=True)
        probs = torch.where(total > 0, probs / total.clamp(min=1e-30), 1.0 / k)
        if greedy:
            chosen = probs.argmax(dim=-1)
        else:
            u = torch.rand(clean.shape, generator=generator, device=device).clamp_(min=1e-20)
            chosen = (probs.clamp(min=1e-30).log() - torch.log(-torch.log(u))).argmax(dim=-1)
        kept = torch.rand(chosen.shape, generator=generator, device=device) < keep
        shift = torch.randint(1, k, chosen.shape, generator=generator, device=device)
        symbol = torch.where(kept, chosen, (chosen + shift) % k)
        return one_hot(symbol, k).to(clean.dtype)

    def release(self, clean: Tensor, drawn: Tensor) -> Tensor:
        """The released vector: ``clean + noise`` (Gaussian); the drawn one-hot, with the
        gradient of its expectation ``clean`` (discrete, straight-through)."""
        if self.cfg.channel == "gaussian":
            return clean + drawn
        return drawn + (clean - clean.detach())


def categorical_entropy(p: Tensor) -> Tensor:
    """The entropy of each distribution ``p`` over the last dimension."""
    return -(p * p.clamp(min=1e-30).log()).sum(dim=-1)
