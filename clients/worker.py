"""An agent's worker: the long-lived process behind a deployment's ClientApp, on its host.

It listens on a Unix socket that only its user can open (``protocol.worker.listen``; it also
refuses a peer of another user id) and answers the ClientApp's relayed messages one at a time
with an ``AgentHost`` that keeps the agent between them (``clients.host``). A worker given a
token answers only requests that carry it, so of this user's processes only those that can read
the token file reach the agent. A worker started for one agent (``agent_id``) refuses messages
for any other. Whatever a peer sends, or fails to send within ``REQUEST_S``, costs it its
connection and nothing more: the worker logs why in one line and serves the next. SIGTERM
closes its agents' ledgers and transports and removes the socket.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
from pathlib import Path
from types import FrameType

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.app.constants import DEFAULT_TTL
from flwr.app.metadata import Metadata

from fedcomm.clients.host import AgentHost, failure_reason
from fedcomm.clients.secure import answer_stage
from fedcomm.protocol.worker import (
    WorkerReply,
    WorkerRequest,
    listen,
    peer_uid,
    read_worker_token,
)

# Seconds a connection has to deliver its whole request (and later to take its reply): the
# worker serves one connection at a time, so an idle or stalled peer must not hold it. The
# relaying ClientApp encodes its request before it connects and sends it at once.
REQUEST_S = 30.0


class AgentWorker:
    """Serves relayed messages at ``path``; ``agent_id``: only this agent's; ``token``: only
    requests that carry it (``None``: any request of this user)."""

    def __init__(self, path: str | Path, agent_id: str | None = None,
                 token: str | None = None) -> None:
        self.path, self.agent_id, self.token = Path(path), agent_id, token
        self.host = AgentHost(keep=True)
        self.secure: dict[str, RecordDict] = {}  # per agent: its SecAgg+ state and kept input
        self.sock = listen(self.path)

    def serve_forever(self) -> None:
        while True:
            conn, _ = self.sock.accept()
            with conn:
                try:
                    self.handle(conn)
                except Exception as e:  # the last guard: one connection never stops the agent
                    _log(f"dropped a connection: {type(e).__name__}: {e}")

    def handle(self, conn: socket.socket) -> None:
        """One relayed message: received, answered, the reply sent back."""
        uid = peer_uid(conn)
        if uid is not None and uid != os.getuid():
            _log(f"refused a connection from user id {uid}")
            return
        conn.settimeout(REQUEST_S)
        try:
            request = WorkerRequest.receive(conn, REQUEST_S, self.token)
        except TimeoutError:
            self.refuse(conn, f"no complete request within {REQUEST_S:g} s")
            return
        except OSError as e:  # WorkerProtocolError: malformed or without the token
            self.refuse(conn, str(e) or type(e).__name__)
            return
        start = time.perf_counter()
        _log(f"{request.kind} for {request.settings.get('agent-id', '?')}: received")
        reply = self.answer(request)
        try:
            reply.send(conn)
        except OSError as e:  # the ClientApp's process is gone (its SuperNode killed)
            _log(f"the {request.kind} reply could not be delivered ({e}); a round sent again "
                 "unchanged is answered with it")
            return
        what = reply.error or f"answered in {time.perf_counter() - start:.2f} s"
        _log(f"{request.kind} for {request.settings.get('agent-id', '?')}: {what}")

    def refuse(self, conn: socket.socket, reason: str) -> None:
        """Log why a request is refused and tell the peer, if it still listens."""
        _log(f"refused a request: {reason}")
        with contextlib.suppress(OSError):
            WorkerReply(error=f"{self.agent_id or 'the agent'}: its worker refused the request "
                        f"({reason})").send(conn)

    def answer(self, request: WorkerRequest) -> WorkerReply:
        settings = request.settings
        try:
            agent = settings.get("agent-id")
            if self.agent_id is not None and agent != self.agent_id:
                raise PermissionError(f"this worker serves {self.agent_id}, not {agent}")
            state = self.secure.setdefault(str(agent), RecordDict())  # SecAgg+'s, and the input
            if request.kind == "train":
                content = self.host.train(request.content, settings, state, request.start_s)
            elif request.kind == "secure":
                content = self.secure_stage(request.content, int(settings["node-id"]), state)
            else:
                content = self.host.evaluate(request.content, settings, RecordDict())
        except Exception as e:
            return WorkerReply(error=failure_reason(request.content, settings, e, "worker"))
        return WorkerReply(content)

    @staticmethod
    def secure_stage(content: RecordDict, node: int, state: RecordDict) -> RecordDict:
        """One SecAgg+ stage relayed from node ``node``, answered in the agent's kept state
        (``clients.secure``): the message rebuilt as its node received it."""
        metadata = Metadata(run_id=0, message_id="relayed", src_node_id=0, dst_node_id=node,
                            reply_to_message_id="", group_id="", created_at=time.time(),
                            ttl=DEFAULT_TTL, message_type=MessageType.TRAIN)
        context = Context(run_id=0, node_id=node, node_config={}, state=state, run_config={})
        return answer_stage(Message(content, metadata=metadata), context).content

    def close(self) -> None:
        self.host.close()
        self.sock.close()
        self.path.unlink(missing_ok=True)


def _log(line: str) -> None:
    """One line of the worker's log, whatever ``line`` holds (a peer's text included)."""
    print(f"{time.strftime('%H:%M:%S')} {' '.join(line.split())}", flush=True)


def run_worker(path: str | Path, agent_id: str | None = None,
               token_file: str | Path | None = None) -> None:
    """Serve at ``path`` until SIGTERM or SIGINT; ``token_file``: the token requests carry."""
    token = read_worker_token(token_file) if token_file is not None else None
    worker = AgentWorker(path, agent_id, token)

    def stop(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    _log(f"agent worker{' of ' + agent_id if agent_id else ''} listening on {path}"
         + ("" if token else " (no token file: any process of this user may ask)"))
    try:
        worker.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        with contextlib.suppress(Exception):
            worker.close()
        sys.stdout.flush()
