"""The ClientApp of a deployment: each message handed to the agent's worker, if it has one.

Flower starts a fresh ClientApp process for every message. Where the SuperNode's node config
names a ``worker-socket``, this process imports only Flower's records and this module (no
torch, no fedcomm agent), hands the message to the agent's long-lived worker on the same host
(``clients.worker``) and returns its reply; without one it runs the agent itself
(``clients.app``). A SecAgg+ stage goes to the worker too, which holds the agent's masked input
and SecAgg+ state between messages (``clients.secure``). The request carries the worker's
token, read from the file the node config names as ``worker-token-file``. A worker that is not
listening yet (starting, or restarted by its supervisor) is retried for ``CONNECT_S``; one that
goes away mid-message, or does not answer within the run's round timeout (by then the server
has given up on the round), fails the message with one line, and the server's failure policy
decides.
"""

from __future__ import annotations

import json
import math
import time

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from fedcomm.clients.messages import error_reply, process_age
from fedcomm.protocol.round import CONFIG, identity_reply
from fedcomm.protocol.signing import seal
from fedcomm.protocol.worker import (
    WORKER_SOCKET,
    WORKER_TOKEN,
    WorkerProtocolError,
    WorkerRequest,
    ask,
    read_worker_token,
)

CONNECT_S = 60.0
RETRY_S = 0.1
ANSWER_S = 900.0  # seconds for the worker's answer where the message names no round timeout


def relay(msg: Message, context: Context, kind: str) -> Message:
    """``msg`` answered by the agent's worker (or, without one, by the agent in process)."""
    settings = {str(k): str(v) for k, v in context.node_config.items()}
    path = settings.get(WORKER_SOCKET)
    if not path:
        from fedcomm.clients.app import app as in_process

        return in_process(msg, context)
    who = settings.get("agent-id", f"node {context.node_id}")
    try:
        token = read_worker_token(settings[WORKER_TOKEN]) if WORKER_TOKEN in settings else ""
    except ValueError as e:
        return error_reply(msg, f"{who}: {e}")
    if kind == "secure":  # SecAgg+ keys the agent's masks by its node
        settings["node-id"] = str(context.node_id)
    request = WorkerRequest(kind, settings, msg.content, process_age(), token)
    timeout = answer_timeout(msg.content)
    deadline = time.monotonic() + CONNECT_S
    while True:
        try:
            reply = ask(path, request, timeout)
            break
        except (FileNotFoundError, ConnectionRefusedError) as e:
            if time.monotonic() < deadline:
                time.sleep(RETRY_S)
                continue
            error = f"its worker is not listening at {path} ({e}); is `fedcomm worker` running?"
        except TimeoutError:
            error = f"its worker at {path} did not answer within {timeout:g} s"
        except (OSError, WorkerProtocolError) as e:
            error = f"its worker at {path} stopped before it answered ({e})"
        return error_reply(msg, f"{who}: {error}")
    if reply.error is not None:
        return error_reply(msg, reply.error)
    if kind == "secure":  # SecAgg+'s own reply: keys, shares or a masked vector
        return Message(reply.content, reply_to=msg)
    try:
        return Message(seal(reply.content, msg.metadata.message_id, settings), reply_to=msg)
    except ValueError as e:
        return error_reply(msg, f"{who}: {e}")


def answer_timeout(content: RecordDict) -> float:
    """Seconds to wait for the worker: the run's round timeout, read from the message's run
    config (JSON, without importing the run's types, which bring torch), else ``ANSWER_S``."""
    try:
        seconds = float(json.loads(str(content[CONFIG]["config"]))["round_timeout"])
    except (KeyError, TypeError, ValueError, RecursionError):
        return ANSWER_S
    return seconds if 0 < seconds < math.inf else ANSWER_S


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    return relay(msg, context, "secure" if RECORD_KEY_CONFIGS in msg.content.config_records
                 else "train")


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return relay(msg, context, "evaluate")


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Which agent this node runs: the node config's ``agent-id``, signed with its key."""
    settings = {str(k): str(v) for k, v in context.node_config.items()}
    if "agent-id" not in settings:
        return error_reply(msg, f"node {context.node_id}: the node config names no agent-id")
    try:
        content = identity_reply(settings["agent-id"])
        return Message(seal(content, msg.metadata.message_id, settings), reply_to=msg)
    except ValueError as e:
        return error_reply(msg, f"{settings['agent-id']}: {e}")
