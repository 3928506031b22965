"""The server's side of Flower's grid: waiting for the agents' nodes, and sending messages and
collecting their replies within a timeout."""

from __future__ import annotations

import threading
import time

from flwr.app import Message, RecordDict
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import Grid

POLL_S = 0.05  # seconds between polls for replies


class FederationError(RuntimeError):
    """The run cannot go on; the message says why and what to do."""


def wait_for_nodes(grid: Grid, n: int, timeout: float,
                   stop: threading.Event | None = None) -> list[int]:
    """The grid's nodes once ``n`` have connected (``timeout`` s at most)."""
    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < n:
        if stop is not None and stop.is_set():
            raise FederationError("stopped")
        if time.monotonic() > deadline:
            raise FederationError(f"{len(nodes)} of {n} agents' nodes connected within "
                                  f"{timeout:g} s: start a SuperNode for every agent")
        time.sleep(0.2)
    return nodes


def exchange(grid: Grid, messages: list[Message], timeout: float,
             stop: threading.Event | None = None, arrived: dict[int, float] | None = None
             ) -> tuple[list[Message], list[str]]:
    """Send ``messages`` and collect the replies: the good ones, and one line for each node
    that failed or did not answer within ``timeout``. ``stop`` ends the wait early;
    ``arrived`` gets the seconds each node's reply took."""
    t0 = time.monotonic()
    ids = list(grid.push_messages(messages))
    node_of = dict(zip(ids, (m.metadata.dst_node_id for m in messages)))
    pending = set(ids)
    replies: list[Message] = []
    deadline = t0 + timeout
    while pending and time.monotonic() < deadline:
        if stop is not None and stop.is_set():
            raise FederationError("stopped")
        got = list(grid.pull_messages(pending))
        replies += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        if arrived is not None:
            arrived |= {node_of.get(m.metadata.reply_to_message_id, -1): time.monotonic() - t0
                        for m in got}
        if pending:
            time.sleep(POLL_S)
    good = [m for m in replies if not m.has_error()]
    failures = []
    for m in replies:
        if m.has_error():
            node = node_of.get(m.metadata.reply_to_message_id)
            reason = m.error.reason or "failed"
            # the ClientApp's own errors name the agent; the SuperLink's name nobody
            failures.append(reason if m.metadata.src_node_id == node else f"node {node}: {reason}")
    failures += [f"node {node_of[i]} did not answer within {timeout:g} s" for i in sorted(pending)]
    return good, failures




def wire_bytes(content: RecordDict) -> int:
    """The bytes of a message's content as Flower's protocol serialises it."""
    return recorddict_to_proto(content).ByteSize()
