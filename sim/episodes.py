"""The seed an episode batch resets with: its public label, keyed by the simulator's secret.

Agents name each batch by a label every party can compute (``JoinRequest.seed``: the run's seed
and the batch's number). Were the label the environment's seed, any peer or the server could
regenerate an agent's private observations (its goals, faults, orders) from the run's
configuration. The simulator resets with a keyed derivation of the label instead: the first 63
bits of HMAC-SHA256 under a key only it holds, so a run stays reproducible for whoever holds the
key and for nobody else.
"""

from __future__ import annotations

import hashlib
import hmac

KEY_BYTES = 32  # the episode key's least length: 256 bits, HMAC-SHA256's own strength


def check_key(key: bytes) -> None:
    """Refuse a key shorter than ``KEY_BYTES``: guessing it would be easier than the HMAC."""
    if len(key) < KEY_BYTES:
        raise ValueError(f"an episode key holds at least {KEY_BYTES} bytes, not {len(key)}")


def episode_seed(key: bytes, run_id: str, declared: int | None, round_label: int) -> int:
    """The seed of a batch whose agents declared the label ``declared``; where they declared
    none, ``round_label`` (the simulator's seed plus the round number) labels it, in a domain of
    its own so that it never coincides with a declared label."""
    label = f"seed {declared}" if declared is not None else f"round {round_label}"
    digest = hmac.new(key, f"{run_id}\0{label}".encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") >> 1
