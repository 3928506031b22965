"""Replies bound to their agent and to the message they answer.

Each agent shares a key with the server (``server-key-file``, a JSON object ``{agent_id:
key}`` as ``protocol.auth.write_tokens`` writes it). The process that answers a server's
message (the ClientApp, or a deployment's relay) signs the reply: HMAC-SHA256 under the
agent's key of the message id it answers, the agent's id and a digest of the reply's whole
content (every array's name, dtype, shape and bytes; every metric; the proof's ledger anchor).
The server verifies it with the key of the agent the reply names, so a node can answer only as
the agent whose key it holds, a reply answers exactly one message of the present round (a
replayed one names an old message), and nothing of it can be changed on the way.

Only the standard library and Flower's records: a deployment's relay signs without torch.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedcomm.protocol.auth import read_tokens
from fedcomm.protocol.round import PROOF

SIGNATURE = "signature"  # the proof's field that holds the signature
KEY_FILE = "server-key-file"  # the node config's key: the agent's key shared with the server


def content_digest(content: RecordDict) -> bytes:
    """SHA-256 over a reply's records, in a canonical order, without the signature itself."""
    h = hashlib.sha256()
    for name in sorted(content.keys()):
        record = content[name]
        h.update(b"R" + name.encode() + b"\0")
        if isinstance(record, ArrayRecord):
            for key in sorted(record.keys()):
                array = record[key]
                head = json.dumps([key, array.dtype, list(array.shape), array.stype])
                h.update(head.encode() + b"\0" + len(array.data).to_bytes(8, "big")
                         + array.data)
        elif isinstance(record, (MetricRecord, ConfigRecord)):
            values = {k: _plain(v) for k, v in record.items() if k != SIGNATURE}
            h.update(json.dumps(values, sort_keys=True, allow_nan=True).encode())
        else:
            raise TypeError(f"a reply record of type {type(record).__name__} cannot be signed")
    return h.digest()


def signature(key: str, message_id: str, agent_id: str, content: RecordDict) -> str:
    """The hex HMAC that binds ``content`` to ``agent_id`` and the message it answers."""
    body = b"\0".join([b"fedcomm-reply-v1", message_id.encode(), agent_id.encode(),
                       content_digest(content)])
    return hmac.new(key.encode(), body, hashlib.sha256).hexdigest()


def verifies(key: str, message_id: str, agent_id: str, content: RecordDict,
             signed: str) -> bool:
    """Whether ``signed`` is the signature of ``content`` answering ``message_id``."""
    return hmac.compare_digest(signature(key, message_id, agent_id, content), str(signed))


def agent_key(settings: Mapping[str, object], agent_id: str) -> str:
    """The key ``agent_id`` shares with the server, from the node's ``server-key-file``."""
    path = settings.get(KEY_FILE)
    if not path:
        raise ValueError(f"the node config of {agent_id} lacks {KEY_FILE}: the key its replies "
                         "are signed with")
    key = read_tokens(str(path)).get(agent_id)
    if not key:
        raise ValueError(f"no server key for {agent_id} in {path}")
    return key


def _plain(value: object) -> object:
    """A record value as JSON can hold it (bytes as hex)."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def seal(content: RecordDict, message_id: str, settings: Mapping[str, object]) -> RecordDict:
    """``content`` (a reply holding a ``proof`` record) signed for the message it answers, with
    the key of the agent its proof names (from the node's settings)."""
    proof = content.get(PROOF)
    if not isinstance(proof, ConfigRecord) or not isinstance(proof.get("agent_id"), str):
        raise ValueError(f"a reply to sign holds a {PROOF!r} record naming its agent")
    agent_id = str(proof["agent_id"])
    named = settings.get("agent-id")
    if named is not None and str(named) != agent_id:
        raise ValueError(f"node of {named} cannot sign a reply of {agent_id}")
    proof[SIGNATURE] = signature(agent_key(settings, agent_id), message_id, agent_id, content)
    return content
