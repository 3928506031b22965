"""The ClientApp of a deployment: each message handed to the agent's worker, if it has one.

Flower starts a fresh ClientApp process for every message. Where the SuperNode's node config
names a ``worker-socket``, this process imports only Flower's records and this module (no
torch, no fedcomm agent), hands the message to the agent's long-lived worker on the same host
(``clients.worker``) and returns its reply; without one it runs the agent itself
(``clients.app``). A worker that is not listening yet (starting, or restarted by its
supervisor) is retried for ``CONNECT_S``; one that goes away mid-message fails the message with
one line, and the server's failure policy decides.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from fedcomm.protocol.worker import WORKER_SOCKET, WorkerProtocolError, WorkerRequest, ask

CONNECT_S = 60.0
RETRY_S = 0.1


def process_age() -> float:
    """Seconds since this process started (Linux; 0 elsewhere)."""
    try:
        stat = Path("/proc/self/stat").read_text()
        ticks = int(stat.rpartition(")")[2].split()[19])  # field 22: start, in clock ticks
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return max(0.0, time.time() - boot - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, StopIteration):
        return 0.0


def relay(msg: Message, context: Context, kind: str) -> Message:
    """``msg`` answered by the agent's worker (or, without one, by the agent in process)."""
    settings = {str(k): str(v) for k, v in context.node_config.items()}
    path = settings.get(WORKER_SOCKET)
    if not path:
        from fedcomm.clients.app import app as in_process

        return in_process(msg, context)
    request = WorkerRequest(kind, settings, msg.content, process_age())
    deadline = time.monotonic() + CONNECT_S
    while True:
        try:
            reply = ask(path, request)
            break
        except (FileNotFoundError, ConnectionRefusedError) as e:
            if time.monotonic() < deadline:
                time.sleep(RETRY_S)
                continue
            error = f"its worker is not listening at {path} ({e}); is `fedcomm worker` running?"
        except (OSError, WorkerProtocolError) as e:
            error = f"its worker at {path} stopped before it answered ({e})"
        who = settings.get("agent-id", f"node {context.node_id}")
        return error_reply(msg, f"{who}: {error}")
    if reply.error is not None:
        return error_reply(msg, reply.error)
    return Message(reply.content, reply_to=msg)


def error_reply(msg: Message, reason: str) -> Message:
    """The reply that tells the server, in one line, why ``msg`` has no answer."""
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                   reply_to=msg)


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    return relay(msg, context, "train")


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return relay(msg, context, "evaluate")
