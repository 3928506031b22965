"""Agent authentication: one secret token per agent, sent as call metadata on every RPC.

The simulator holds the tokens (a JSON object ``{agent_id: token}``) and checks, on every call,
that the token belongs to the agent the call claims to come from; every message's header must
then name that same agent, so an agent can speak only as itself.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
from collections.abc import Iterable, Sequence
from pathlib import Path

AGENT_KEY = "x-fedcomm-agent"
TOKEN_KEY = "authorization"


def call_metadata(agent_id: str, token: str) -> tuple[tuple[str, str], ...]:
    return ((AGENT_KEY, agent_id), (TOKEN_KEY, f"Bearer {token}"))


def claimed_identity(metadata: Iterable[tuple[str, str | bytes]]) -> tuple[str, str]:
    """The agent id and token a call presents (empty strings where absent)."""
    values = {k: v.decode() if isinstance(v, bytes) else v for k, v in metadata}
    token = values.get(TOKEN_KEY, "")
    return values.get(AGENT_KEY, ""), token.removeprefix("Bearer ")


def token_matches(expected: str, presented: str) -> bool:
    return hmac.compare_digest(expected.encode(), presented.encode())


def generate_tokens(agent_ids: Sequence[str]) -> dict[str, str]:
    return {agent: secrets.token_urlsafe(32) for agent in agent_ids}


def write_tokens(path: str | Path, tokens: dict[str, str]) -> None:
    """Write a token file readable by its owner only."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(tokens, f, indent=2)


def read_tokens(path: str | Path) -> dict[str, str]:
    try:
        tokens = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the token file {path}: {e}") from e
    if not isinstance(tokens, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v for k, v in tokens.items()):
        raise ValueError(f"{path} must hold a JSON object of agent id -> non-empty token")
    return tokens
