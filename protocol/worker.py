"""The local protocol between a deployment's ClientApp and its agent's worker process.

Flower starts a fresh ClientApp process for every message. With a worker, that process only
relays: it hands the message to a long-lived process of the same agent on the same host (a
Unix socket that only the agent's user can open), which keeps the agent's models, optimizer,
channel to the simulator and open ledger between rounds, and hands back the reply.

One exchange per connection. The ClientApp sends two frames, a header (JSON: the message
type, the node's settings, its own start-up time and the worker's token) and the message's
content (Flower's ``RecordDict`` as protobuf); the worker answers with two frames, a header
(JSON: ``ok``, or the one line that says why not) and the reply's content. A frame is its
length (8 bytes, big endian) and its bytes. The token (in a file of the agent's secrets that
the node config names as ``worker-token-file``) tells the agent's own ClientApp from a process
of the same user that cannot read those secrets; the worker checks it before it reads the
content. This module imports only the standard library and Flower's records, so that the
relaying process starts fast.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import math
import os
import socket
import stat
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

WORKER_SOCKET = "worker-socket"  # the node config's key: where the agent's worker listens
WORKER_TOKEN = "worker-token-file"  # the node config's key: the file of the worker's token
MAX_FRAME = 1 << 30  # bytes; a larger length is a broken or hostile peer
MAX_HEADER = 1 << 20  # bytes of a header: a node config and a few scalars
_LENGTH = struct.Struct("!Q")
KINDS = ("train", "evaluate", "secure")


class WorkerProtocolError(ConnectionError):
    """The other end broke the protocol or went away mid-exchange."""


class WorkerAuthError(WorkerProtocolError):
    """A request without the worker's token."""


@dataclass
class WorkerRequest:
    """ClientApp -> worker: one Flower message of one agent."""

    kind: str  # "train", "evaluate" or "secure" (a SecAgg+ stage)
    settings: dict[str, str]  # the SuperNode's node config
    content: RecordDict
    start_s: float = 0.0  # the relaying process's start-up before it handled the message
    token: str = field(default="", repr=False)  # the worker's token, read from WORKER_TOKEN

    def encode(self) -> bytes:
        """The request's frames, ready to send."""
        header = {"kind": self.kind, "settings": self.settings, "start_s": self.start_s,
                  "token": self.token}
        return _frames(json.dumps(header).encode(), _content_bytes(self.content))

    def send(self, sock: socket.socket) -> None:
        sock.sendall(self.encode())

    @classmethod
    def receive(cls, sock: socket.socket, timeout: float | None = None,
                token: str | None = None) -> WorkerRequest:
        """The request a peer sends, all of it within ``timeout`` seconds (``TimeoutError``
        past it; ``None``: no limit). ``token``: the one it must carry (``None``: any), checked
        before the content is read. Anything malformed: ``WorkerProtocolError``."""
        deadline = _deadline(timeout)
        header = _receive_header(sock, deadline)
        sent = header.get("token", "")
        if not isinstance(sent, str):
            raise WorkerProtocolError("a request's token must be a string")
        if token is not None and not hmac.compare_digest(sent.encode(), token.encode()):
            raise WorkerAuthError("the request does not carry this worker's token")
        content = _receive_content(sock, deadline)
        kind, settings = header.get("kind"), header.get("settings")
        start_s = header.get("start_s", 0.0)
        if kind not in KINDS:
            raise WorkerProtocolError(f"a request needs a kind in {KINDS}")
        if not isinstance(settings, dict) or not all(isinstance(v, str)
                                                      for v in settings.values()):
            raise WorkerProtocolError("a request's settings must map names to strings")
        if (isinstance(start_s, bool) or not isinstance(start_s, (int, float))
                or not 0 <= start_s < math.inf):
            raise WorkerProtocolError("a request's start_s must be a number of seconds >= 0")
        return cls(kind, settings, content, float(start_s), sent)


@dataclass
class WorkerReply:
    """Worker -> ClientApp: the reply's content, or why there is none."""

    content: RecordDict = field(default_factory=RecordDict)
    error: str | None = None

    def send(self, sock: socket.socket) -> None:
        header = {"ok": self.error is None, "error": self.error}
        sock.sendall(_frames(json.dumps(header).encode(), _content_bytes(self.content)))

    @classmethod
    def receive(cls, sock: socket.socket, timeout: float | None = None) -> WorkerReply:
        """The reply, all of it within ``timeout`` seconds (``TimeoutError`` past it)."""
        return cls._receive(sock, _deadline(timeout))

    @classmethod
    def _receive(cls, sock: socket.socket, deadline: float | None) -> WorkerReply:
        header = _receive_header(sock, deadline)
        content = _receive_content(sock, deadline)
        if header.get("ok"):
            return cls(content)
        return cls(error=str(header.get("error") or "the worker gave no reason"))


def ask(path: str | Path, request: WorkerRequest, timeout: float | None = None
        ) -> WorkerReply:
    """Send ``request`` to the worker listening at ``path`` and wait for its reply, all within
    ``timeout`` seconds (``TimeoutError`` past it; ``None``: no limit)."""
    data = request.encode()  # before connecting: the worker gives a request little time
    deadline = _deadline(timeout)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        _time_left(sock, deadline)
        sock.connect(str(path))
        _time_left(sock, deadline)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)  # a worker that refuses stops reading: its reply says why
        return WorkerReply._receive(sock, deadline)


def read_worker_token(path: str | Path) -> str:
    """The token in the file at ``path`` (``ValueError`` if unreadable or empty)."""
    try:
        token = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the worker token file {path}: {e}") from e
    if not token:
        raise ValueError(f"the worker token file {path} is empty")
    return token


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


def _frames(*frames: bytes) -> bytes:
    return b"".join(_LENGTH.pack(len(f)) + f for f in frames)


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _time_left(sock: socket.socket, deadline: float | None) -> None:
    """Make the socket's next operation give up at ``deadline`` (``TimeoutError``)."""
    if deadline is not None:  # not 0: that would make the socket non-blocking
        sock.settimeout(max(deadline - time.monotonic(), 1e-6))


def _receive_header(sock: socket.socket, deadline: float | None) -> dict[str, Any]:
    header = _receive_frame(sock, deadline, MAX_HEADER)
    try:
        parsed = json.loads(header.decode())
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, or nested too deep
        raise WorkerProtocolError(f"the header is not JSON in UTF-8: {e}") from e
    if not isinstance(parsed, dict):
        raise WorkerProtocolError("the header is not a JSON object")
    return parsed


def _receive_content(sock: socket.socket, deadline: float | None) -> RecordDict:
    data, proto = _receive_frame(sock, deadline, MAX_FRAME), ProtoRecordDict()
    try:
        proto.ParseFromString(data)
        return recorddict_from_proto(proto)
    except Exception as e:  # malformed protobuf or records
        raise WorkerProtocolError(f"the content is not a Flower RecordDict: {e}") from e


def _receive_frame(sock: socket.socket, deadline: float | None, limit: int) -> bytes:
    (length,) = _LENGTH.unpack(_receive_exactly(sock, _LENGTH.size, deadline))
    if length > limit:
        raise WorkerProtocolError(f"a frame of {length} bytes is over the limit of {limit}")
    return _receive_exactly(sock, length, deadline)


def _receive_exactly(sock: socket.socket, n: int, deadline: float | None) -> bytes:
    chunks, left = [], n
    while left:
        _time_left(sock, deadline)
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise WorkerProtocolError("the other end closed the connection mid-exchange")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
