"""Child processes that a command starts and must stop: on success, failure, Ctrl-C, SIGTERM.

Each child runs in its own session (process group), so stopping it stops what it started in
turn (a SuperNode's ClientApp processes, the SuperLink's ServerApp), and Linux is asked to stop
it if the parent dies without cleaning up.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from fedcomm.config import FederationConfig
from fedcomm.server.federation import FederationError


def _die_with_parent() -> None:
    """Ask Linux to stop this child if the parent dies without cleaning up (a SIGKILL)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the parent's cleanup is all there is
        pass


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment plus ``extra``, with this Python environment's commands first
    on PATH: Flower starts its own (flower-superexec, flwr-clientapp) by name, and they must be
    the ones installed with fedcomm whether or not the environment is activated."""
    here = str(Path(sys.executable).parent)
    path = os.pathsep.join([here, os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, **(extra or {})}


class ChildProcess:
    """``command`` in its own process group, its output appended to ``log``."""

    def __init__(self, name: str, command: Sequence[str], log: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name, self.command, self.log = name, list(command), log
        self.started = time.monotonic()
        self._out = open(log, "a")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.command, stdout=self._out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=child_env(env),
                                     start_new_session=True, preexec_fn=_die_with_parent)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (what a crash of the host process looks like)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the group, SIGKILL it after ``grace`` seconds; idempotent."""
        if self.alive:
            self.kill(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=grace)
        self.kill(signal.SIGKILL)  # whatever of the group is left
        self.proc.wait()
        self._out.close()

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def stop_tagged(tag: str, grace: float = 5.0) -> list[int]:
    """Stop every process whose environment has ``tag`` (``NAME=value``), wherever it runs:
    processes that their parents started in sessions of their own (Flower's SuperExec and its
    ServerApp) are out of reach of a process group. Linux; elsewhere nothing is found."""
    needle = tag.encode() + b"\0"

    def tagged() -> list[int]:
        found = []
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if int(proc.name) != os.getpid() and needle in (proc / "environ").read_bytes():
                    found.append(int(proc.name))
            except (OSError, ValueError):
                continue
        return found

    pids = tagged()
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 0.0)):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while (pids := tagged()) and time.monotonic() < deadline:
            time.sleep(0.1)
    return pids


EPISODE_KEY = Path("sim") / "episode.key"


class SimProcess(ChildProcess):
    """``fedcomm sim serve`` for a federated run, on a free port of ``host``.

    ``tls`` are the simulator's certificate, key and the CA its clients must be signed by.
    ``episode_key`` is the file of the secret that keys its episodes, made if missing (default:
    ``sim/episode.key`` beside ``log``, in the run directory of ``fedcomm simulate``, so that a
    resumed run keeps its key).
    """

    def __init__(self, fed: FederationConfig, tokens: Path, log: Path, host: str = "127.0.0.1",
                 tls: tuple[Path, Path, Path] | None = None, timeout: float = 180.0,
                 episode_key: Path | None = None) -> None:
        train = fed.train
        port_file = log.with_suffix(".port")
        port_file.unlink(missing_ok=True)
        episode_key = episode_key or log.parent / EPISODE_KEY
        episode_key.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        options = [a for k, v in train.env_kwargs.items()
                   for a in ("--env-opt", f"{k}={json.dumps(v)}")]
        command = [sys.executable, "-m", "fedcomm", "sim", "serve", "--env", train.env,
                   *options, "--num-envs", str(train.num_envs), "--seed", str(train.seed),
                   "--episode-key", str(episode_key), "--comm-dim", str(train.team.comm_dim),
                   "--device", train.device, "--host", host, "--port", "0",
                   "--port-file", str(port_file), "--tokens", str(tokens),
                   "--join-timeout", str(timeout),
                   "--feedback-timeout", str(timeout)]
        if tls:
            command += ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1]),
                        "--tls-client-ca", str(tls[2])]
        super().__init__("sim", command, log, env={"OMP_NUM_THREADS": "1"})
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if not self.alive or time.monotonic() > deadline:
                self.stop()
                raise FederationError(f"the simulator did not start:\n{self.tail()}")
            time.sleep(0.05)
        self.port = int(port_file.read_text().strip())
        self.address = f"{host}:{self.port}"
        port_file.unlink()

    def __enter__(self) -> SimProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
