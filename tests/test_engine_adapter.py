"""The one adapter to Flower's internals (``modes.simulation.all_agents_at_once``): what it
changes of Flower's simulation engine, and that it puts it back."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from flwr.server.superlink.fleet.vce import vce_api

from fedcomm.modes.simulation import all_agents_at_once


def test_the_engine_adapter_gives_every_agent_a_thread():
    """Flower's engine sizes its message threads by the CPU count (``cpu_count + 4``): inside
    ``all_agents_at_once(n)`` a pool of the engine's own kind holds ``n`` threads, more than
    this machine's count gives, and outside it the engine's class is its own again."""
    n = (os.cpu_count() or 1) + 40
    with all_agents_at_once(n):
        pool = vce_api.ThreadPoolExecutor()
        assert pool._max_workers == n
        pool.shutdown()
    assert vce_api.ThreadPoolExecutor is ThreadPoolExecutor
