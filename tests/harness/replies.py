"""Replies as an agent's ClientApp makes them, for tests that play the agents' part: the proof
(its ledger anchor) signed under the agent's key for the message it answers. Nothing here
starts or stops anything: these are messages only."""

from __future__ import annotations

from collections.abc import Sequence
from uuid import uuid4

from flwr.app import Message, RecordDict

from fedcomm.privacy.ledger import GENESIS
from fedcomm.protocol.auth import generate_tokens
from fedcomm.protocol.round import PROOF, Proof
from fedcomm.protocol.signing import SIGNATURE, signature


def agent_keys(agent_ids: Sequence[str]) -> dict[str, str]:
    """A fresh key per agent, shared with the server."""
    return generate_tokens(agent_ids)


def pushed(messages: Sequence[Message]) -> list[Message]:
    """``messages`` with the ids a grid gives them as it pushes them."""
    for msg in messages:
        msg.metadata.__dict__["_message_id"] = str(uuid4())
    return list(messages)


def signed_reply(content: RecordDict, answering: Message, agent_id: str, key: str,
                 entries: int = 0, last: str = GENESIS) -> Message:
    """The reply to ``answering`` with ``content``, its proof naming ``agent_id`` and its
    ledger ``(entries, last)``, signed with ``key``."""
    content[PROOF] = Proof(agent_id, entries, last).to_record()
    content[PROOF][SIGNATURE] = signature(key, answering.metadata.message_id, agent_id, content)
    return Message(content, reply_to=answering)
