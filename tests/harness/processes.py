"""Child processes of a test: ``fedcomm`` command lines (``fedcomm``, ``simulate``, ``deploy``)
started with ``subprocess.Popen``, their stdout and stderr in one text pipe; ``SimServeProcesses``,
``fedcomm sim serve`` on a port it picks and writes to a file. Each is stopped by whoever
started it: ``finish`` waits for processes to exit (and fails on a non-zero exit),
``SimServeProcesses.stop`` terminates what it started (killing what does not exit within
10 s). ``processes_mentioning`` and ``assert_nothing_left`` find the processes a run left
behind, its own children included; they stop nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

FEDCOMM = [sys.executable, "-m", "fedcomm"]

# A small ``fedcomm simulate`` (and ``deploy local``): three agents of three types, rounds of
# two batches of 32 environments.
SMALL = ["--env", "factory", "--env-opt", "n_sensors=1", "--env-opt", "n_processors=1",
         "--env-opt", "n_actuators=1", "--num-envs", "32", "--batches-per-round", "2",
         "--eval-episodes", "64", "--share", "all", "--quiet"]
ROUND_STEPS = 2 * 32 * 25


def fedcomm(*args: str, **kwargs) -> subprocess.Popen:
    """Start ``fedcomm ARGS`` as its own process."""
    # PYTHONFAULTHANDLER: a process that hangs dumps every thread's stack on SIGABRT.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONFAULTHANDLER": "1"}
    return subprocess.Popen([*FEDCOMM, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def simulate(*args: str) -> subprocess.Popen:
    """Start ``fedcomm simulate ARGS`` as a user runs it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([*FEDCOMM, "simulate", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def deploy(*args: str, cwd: Path | None = None) -> subprocess.Popen:
    """Start ``fedcomm deploy local`` of the ``SMALL`` run with ``ARGS``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([*FEDCOMM, "deploy", "local", *SMALL, *args], env=env,
                            stdout=subprocess.PIPE, cwd=cwd, stderr=subprocess.STDOUT,
                            text=True)


def rounds_in(run_dir: Path) -> list[int]:
    """The rounds a run's ``metrics.jsonl`` holds so far."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["round"] for line in lines]


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float = 60.0) -> str:
    """The text ``proc`` writes to ``path``, once it is there; fails if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        if proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}):\n{proc.stdout.read()}")
        time.sleep(0.1)
    raise TimeoutError(f"{path} did not appear within {timeout} s")


def finish(procs: list[subprocess.Popen], timeout: float = 180.0) -> Iterator[str]:
    """Wait for every process; yield each one's output; fail on a non-zero exit."""
    for proc in procs:
        out, _ = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, out
        yield out


class SimServeProcesses:
    """``fedcomm sim serve`` processes on loopback, each on a port of its choosing that it writes
    to a file in ``folder``; ``stop`` terminates every one (and kills one still running 10 s
    later)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.procs: list[subprocess.Popen] = []

    def start(self, *options: str) -> tuple[subprocess.Popen, str]:
        """Start ``fedcomm sim serve OPTIONS``; its process and address, once it serves."""
        port_file = self.folder / f"port-{len(self.procs)}"
        proc = fedcomm("sim", "serve", "--port", "0", "--port-file", str(port_file), *options)
        self.procs.append(proc)
        return proc, f"127.0.0.1:{wait_for_file(port_file, proc)}"

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
            try:
                proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


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
    """Fail if a process mentioning ``run_dir`` is still alive after ``timeout``."""
    deadline = time.monotonic() + timeout
    while (left := processes_mentioning(str(run_dir))) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, list(left.values())
