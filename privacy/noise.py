"""Random number generators for noise that leaves the agent."""

from __future__ import annotations

import secrets

import torch


def secure_generator(seed: int | None = None,
                     device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` for privacy noise.

    With ``seed=None`` the generator is seeded from ``secrets.randbits(63)`` (the operating
    system's cryptographic source), so a peer cannot reproduce the noise from a guessable seed.
    A fixed ``seed`` gives a deterministic stream, for tests only.

    The generator itself is torch's Philox/Mersenne engine, not a cryptographic one: the
    seed is unpredictable, the stream is not proven to be.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(63) if seed is None else seed)
    return generator
