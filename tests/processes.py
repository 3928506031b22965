"""Finding the processes a test's run left behind."""

from __future__ import annotations

import os
import time
from pathlib import Path


def processes_mentioning(text: str) -> dict[int, str]:
    """Pid -> command line of live processes whose command line or environment mentions
    ``text`` (a run's directory: Flower's own children carry it only in their environment)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or proc.name == str(os.getpid()):
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            environ = (proc / "environ").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if text in cmdline or text in environ:
            found[int(proc.name)] = cmdline
    return found


def assert_nothing_left(run_dir: Path, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while (left := processes_mentioning(str(run_dir))) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, list(left.values())
