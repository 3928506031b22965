"""Shared fixtures: real simulator and agent processes on loopback, simulators in process, and a
throwaway PKI. What they start and stop lives in tests/harness/; these only tie it to a test's
lifetime."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness.processes import SimServeProcesses
from tests.harness.secrets import Pki, make_pki
from tests.harness.sim import Client, Simulators


def pytest_configure(config: pytest.Config) -> None:
    """Ctrl-C as in a terminal's foreground, for the processes the tests start and interrupt.

    A shell without job control starts background commands with SIGINT ignored, and an ignored
    signal stays ignored across exec, so Python in every child would never raise
    KeyboardInterrupt. A handled one is reset to the default at exec: handle it here. (Not in a
    ``preexec_fn``: forking Python with gRPC's threads running can abort the child.)
    """
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say what a run left out and how to run it: no test is left out silently."""
    deselected = terminalreporter.stats.get("deselected", [])
    if deselected:
        integration = sum(1 for item in deselected if item.get_closest_marker("integration"))
        terminalreporter.write_line(
            f"{len(deselected)} tests deselected, {integration} of them marked integration "
            "(processes, servers, slow): `python -m pytest` runs every test")


@pytest.fixture
def sim_process(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Start ``fedcomm sim serve`` with the given options; yields its address."""
    procs = SimServeProcesses(tmp_path)
    yield lambda *options: procs.start(*options)[1]
    procs.stop()


@pytest.fixture
def start() -> Iterator[Callable[..., Client]]:
    """Start simulators in process (tests/harness/sim.py's ``config``, SimConfig changes as
    keywords, ``tls`` a ServerTls), each with a client; all stop after."""
    simulators = Simulators()
    try:
        yield simulators.start
    finally:
        simulators.close()


@pytest.fixture
def sim(start: Callable[..., Client]) -> Client:
    """A simulator in process with a client that can look inside it."""
    return start()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A throwaway CA with a server pair (localhost, 127.0.0.1) and a client pair; and a rogue
    CA with a client pair of its own."""
    return make_pki(tmp_path_factory.mktemp("pki"))
