"""What every ClientApp of an agent answers with, and when its process started.

Both the agent's own ClientApp (``clients.app``) and a deployment's relaying one
(``clients.relay``) answer a message that has no answer with one line, and report how long
their process took to start (a deployment starts one per message). Only the standard library and
Flower's messages: the relay imports no torch.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from flwr.app import Error, Message
from flwr.common.constant import ErrorCode


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


def error_reply(msg: Message, reason: str) -> Message:
    """The reply that tells the server, in one line, why ``msg`` has no answer."""
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                   reply_to=msg)
