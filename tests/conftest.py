"""Shared fixtures: real simulator and agent processes on loopback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

FEDCOMM = [sys.executable, "-m", "fedcomm"]


def pytest_configure(config: pytest.Config) -> None:
    """Ctrl-C as in a terminal's foreground, for the processes the tests start and interrupt.

    A shell without job control starts background commands with SIGINT ignored, and an ignored
    signal stays ignored across exec, so Python in every child would never raise
    KeyboardInterrupt. A handled one is reset to the default at exec: handle it here. (Not in a
    ``preexec_fn``: forking Python with gRPC's threads running can abort the child.)
    """
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def fedcomm(*args: str, **kwargs) -> subprocess.Popen:
    """Start ``fedcomm ARGS`` as its own process."""
    # PYTHONFAULTHANDLER: a process that hangs dumps every thread's stack on SIGABRT.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONFAULTHANDLER": "1"}
    return subprocess.Popen([*FEDCOMM, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        if proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}):\n{proc.stdout.read()}")
        time.sleep(0.1)
    raise TimeoutError(f"{path} did not appear within {timeout} s")


@pytest.fixture
def sim_process(tmp_path: Path):
    """Start ``fedcomm sim serve`` with the given options; yields its address."""
    procs: list[subprocess.Popen] = []

    def start(*options: str) -> str:
        port_file = tmp_path / f"port-{len(procs)}"
        proc = fedcomm("sim", "serve", "--port", "0", "--port-file", str(port_file), *options)
        procs.append(proc)
        return f"127.0.0.1:{wait_for_file(port_file, proc)}"

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def finish(procs: list[subprocess.Popen], timeout: float = 180.0) -> Iterator[str]:
    """Wait for every process; yield each one's output; fail on a non-zero exit."""
    for proc in procs:
        out, _ = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, out
        yield out
