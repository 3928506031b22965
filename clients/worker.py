"""An agent's worker: the long-lived process behind a deployment's ClientApp, on its host.

It listens on a Unix socket that only its user can open (``protocol.worker.listen``; it also
refuses a peer of another user id) and answers the ClientApp's relayed messages one at a time
with an ``AgentHost`` that keeps the agent between them (``clients.host``). A worker started
for one agent (``agent_id``) refuses messages for any other. SIGTERM closes its agents'
ledgers and transports and removes the socket.
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

from flwr.app import RecordDict

from fedcomm.clients.host import AgentHost, failure_reason
from fedcomm.protocol.worker import (
    WorkerProtocolError,
    WorkerReply,
    WorkerRequest,
    listen,
    peer_uid,
)


class AgentWorker:
    """Serves relayed messages at ``path``; ``agent_id``: only this agent's."""

    def __init__(self, path: str | Path, agent_id: str | None = None) -> None:
        self.path, self.agent_id = Path(path), agent_id
        self.host = AgentHost(keep=True)
        self.sock = listen(self.path)

    def serve_forever(self) -> None:
        while True:
            conn, _ = self.sock.accept()
            with conn:
                self.handle(conn)

    def handle(self, conn: socket.socket) -> None:
        """One relayed message: received, answered, the reply sent back."""
        uid = peer_uid(conn)
        if uid is not None and uid != os.getuid():
            _log(f"refused a connection from user id {uid}")
            return
        try:
            request = WorkerRequest.receive(conn)
        except WorkerProtocolError as e:
            _log(f"refused a malformed request: {e}")
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

    def answer(self, request: WorkerRequest) -> WorkerReply:
        settings = request.settings
        try:
            agent = settings.get("agent-id")
            if self.agent_id is not None and agent != self.agent_id:
                raise PermissionError(f"this worker serves {self.agent_id}, not {agent}")
            if request.kind == "train":
                content = self.host.train(request.content, settings, RecordDict(),
                                          request.start_s)
            else:
                content = self.host.evaluate(request.content, settings, RecordDict())
        except Exception as e:
            return WorkerReply(error=failure_reason(request.content, settings, e, "worker"))
        return WorkerReply(content)

    def close(self) -> None:
        self.host.close()
        self.sock.close()
        self.path.unlink(missing_ok=True)


def _log(line: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)


def run_worker(path: str | Path, agent_id: str | None = None) -> None:
    """Serve at ``path`` until SIGTERM or SIGINT."""
    worker = AgentWorker(path, agent_id)

    def stop(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    _log(f"agent worker{' of ' + agent_id if agent_id else ''} listening on {path}")
    try:
        worker.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        with contextlib.suppress(Exception):
            worker.close()
        sys.stdout.flush()
