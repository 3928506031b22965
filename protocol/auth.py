"""Agent authentication: one secret token per agent, sent as call metadata on every RPC.

The simulator holds the tokens (a JSON object ``{agent_id: token}``) and checks, on every call,
that the token belongs to the agent the call claims to come from; every message's header must
then name that same agent, so an agent can speak only as itself.
"""

from __future__ import annotations

import hmac
import json
import secrets
from collections.abc import Iterable, Sequence
from pathlib import Path

from fedcomm.files import write_private

AGENT_KEY = "x-fedcomm-agent"
TOKEN_KEY = "authorization"
BEARER = "Bearer "
BINARY_SUFFIX = "-bin"  # gRPC's mark of a key whose values are bytes


def call_metadata(agent_id: str, token: str) -> tuple[tuple[str, str], ...]:
    return ((AGENT_KEY, agent_id), (TOKEN_KEY, f"{BEARER}{token}"))


def claimed_identity(metadata: Iterable[tuple[str, str | bytes]]) -> tuple[str, str]:
    """The agent id and token a call presents.

    Raises ValueError, saying what is wrong, unless the metadata holds ``AGENT_KEY`` and
    ``TOKEN_KEY`` once each, as text, the token as ``Bearer <token>``. No other key is read:
    binary ones (``-bin``) may hold any bytes, as gRPC's own ``grpc-trace-bin`` does.
    """
    values: dict[str, list[str | bytes]] = {AGENT_KEY: [], TOKEN_KEY: []}
    for key, value in metadata:
        if key in values:
            values[key].append(value)
        elif isinstance(key, str) and key.removesuffix(BINARY_SUFFIX) in values:
            raise ValueError(f"{key} metadata: the {key.removesuffix(BINARY_SUFFIX)} is text")
    agent_id = _one_text_value(values, AGENT_KEY)
    token = _one_text_value(values, TOKEN_KEY)
    if not token.startswith(BEARER):
        raise ValueError(f"{TOKEN_KEY} metadata: expected '{BEARER}<token>'")
    return agent_id, token.removeprefix(BEARER)


def _one_text_value(values: dict[str, list[str | bytes]], key: str) -> str:
    found = values[key]
    if not found:
        raise ValueError(f"no {key} metadata")
    if len(found) > 1:
        raise ValueError(f"{len(found)} {key} metadata values; a call carries one")
    if not isinstance(found[0], str):
        raise ValueError(f"{key} metadata: not text")
    return found[0]


def token_matches(expected: str, presented: str) -> bool:
    return hmac.compare_digest(expected.encode(), presented.encode())


def generate_tokens(agent_ids: Sequence[str]) -> dict[str, str]:
    return {agent: secrets.token_urlsafe(32) for agent in agent_ids}


def write_tokens(path: str | Path, tokens: dict[str, str]) -> None:
    """Write a token file readable by its owner only (``write_private``: whatever file or link
    was at ``path`` is replaced, never written through)."""
    write_private(path, json.dumps(tokens, indent=2))


def read_tokens(path: str | Path) -> dict[str, str]:
    try:
        tokens = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the token file {path}: {e}") from e
    if not isinstance(tokens, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v for k, v in tokens.items()):
        raise ValueError(f"{path} must hold a JSON object of agent id -> non-empty token")
    return tokens
