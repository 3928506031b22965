"""The local protocol between a deployment's ClientApp and its agent's worker process.

Flower starts a fresh ClientApp process for every message. With a worker, that process only
relays: it hands the message to a long-lived process of the same agent on the same host (a
Unix socket that only the agent's user can open), which keeps the agent's models, optimizer,
channel to the simulator and open ledger between rounds, and hands back the reply.

One exchange per connection. The ClientApp sends two frames, a header (JSON: the message
type, the node's settings, its own start-up time) and the message's content (Flower's
``RecordDict`` as protobuf); the worker answers with two frames, a header (JSON: ``ok``, or the
one line that says why not) and the reply's content. A frame is its length (8 bytes, big
endian) and its bytes. This module imports only the standard library and Flower's records, so
that the relaying process starts fast.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

WORKER_SOCKET = "worker-socket"  # the node config's key: where the agent's worker listens
MAX_FRAME = 1 << 30  # bytes; a larger length is a broken or hostile peer
_LENGTH = struct.Struct("!Q")
KINDS = ("train", "evaluate")


class WorkerProtocolError(ConnectionError):
    """The other end broke the protocol or went away mid-exchange."""


@dataclass
class WorkerRequest:
    """ClientApp -> worker: one Flower message of one agent."""

    kind: str  # "train" or "evaluate"
    settings: dict[str, str]  # the SuperNode's node config
    content: RecordDict
    start_s: float = 0.0  # the relaying process's start-up before it handled the message

    def send(self, sock: socket.socket) -> None:
        header = {"kind": self.kind, "settings": self.settings, "start_s": self.start_s}
        _send_frames(sock, json.dumps(header).encode(), _content_bytes(self.content))

    @classmethod
    def receive(cls, sock: socket.socket) -> WorkerRequest:
        header, content = _receive_frames(sock)
        kind, settings = header.get("kind"), header.get("settings")
        if kind not in KINDS or not isinstance(settings, dict):
            raise WorkerProtocolError(f"a request needs a kind in {KINDS} and the node's "
                                      "settings")
        return cls(kind, {str(k): str(v) for k, v in settings.items()}, content,
                   float(header.get("start_s", 0.0)))


@dataclass
class WorkerReply:
    """Worker -> ClientApp: the reply's content, or why there is none."""

    content: RecordDict = field(default_factory=RecordDict)
    error: str | None = None

    def send(self, sock: socket.socket) -> None:
        header = {"ok": self.error is None, "error": self.error}
        _send_frames(sock, json.dumps(header).encode(), _content_bytes(self.content))

    @classmethod
    def receive(cls, sock: socket.socket) -> WorkerReply:
        header, content = _receive_frames(sock)
        if header.get("ok"):
            return cls(content)
        return cls(error=str(header.get("error") or "the worker gave no reason"))


def ask(path: str | Path, request: WorkerRequest, timeout: float | None = None
        ) -> WorkerReply:
    """Send ``request`` to the worker listening at ``path`` and wait for its reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        request.send(sock)
        return WorkerReply.receive(sock)


def listen(path: str | Path) -> socket.socket:
    """A listening socket at ``path`` that only this user can connect to: its folder is this
    user's and closed to everyone else (made so if new), the socket itself mode 0600."""
    path = Path(path)
    folder = path.parent
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = folder.stat()
    if info.st_uid != os.getuid() or info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PermissionError(f"{folder} must belong to this user and be closed to others "
                              "(chmod 700): the worker's socket would be reachable")
    if len(os.fsencode(path)) > 100:
        raise ValueError(f"socket path too long for a Unix socket ({path}); choose a shorter one")
    path.unlink(missing_ok=True)  # a stale socket of a worker that died
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(16)
    return sock


def peer_uid(sock: socket.socket) -> int | None:
    """The user id of the process at the other end (Linux); ``None`` where unknown."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, option,
                                                          struct.calcsize("3i")))
    return uid


def _content_bytes(content: RecordDict) -> bytes:
    return recorddict_to_proto(content).SerializeToString()


def _send_frames(sock: socket.socket, *frames: bytes) -> None:
    sock.sendall(b"".join(_LENGTH.pack(len(f)) + f for f in frames))


def _receive_frames(sock: socket.socket) -> tuple[dict[str, Any], RecordDict]:
    header = _receive_frame(sock)
    try:
        parsed = json.loads(header)
    except ValueError as e:
        raise WorkerProtocolError(f"the header is not JSON: {e}") from e
    if not isinstance(parsed, dict):
        raise WorkerProtocolError("the header is not a JSON object")
    proto = ProtoRecordDict()
    try:
        proto.ParseFromString(_receive_frame(sock))
        return parsed, recorddict_from_proto(proto)
    except Exception as e:  # malformed protobuf or records
        raise WorkerProtocolError(f"the content is not a Flower RecordDict: {e}") from e


def _receive_frame(sock: socket.socket) -> bytes:
    (length,) = _LENGTH.unpack(_receive_exactly(sock, _LENGTH.size))
    if length > MAX_FRAME:
        raise WorkerProtocolError(f"a frame of {length} bytes is over the limit of {MAX_FRAME}")
    return _receive_exactly(sock, length)


def _receive_exactly(sock: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise WorkerProtocolError("the other end closed the connection mid-exchange")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
