"""The one adapter to Flower's internals (``modes.simulation.more_engine_threads``): what it
changes of Flower's simulation engine, only where needed, and that it puts it back."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from flwr.server.superlink.fleet.vce import vce_api

from fedcomm.modes.simulation import engine_threads, more_engine_threads


def test_the_engine_runs_as_many_clientapps_as_python_gives_its_thread_pool():
    """``engine_threads`` is the size of the pool Flower's engine makes (Python's default)."""
    pool = vce_api.ThreadPoolExecutor()
    assert pool._max_workers == engine_threads()
    pool.shutdown()


def test_the_engine_adapter_only_acts_where_a_site_needs_more_threads():
    """Inside ``more_engine_threads(n)`` a pool of the engine's own kind holds ``n`` threads
    where that is more than the engine's own count, and outside it (or for ``n`` within that
    count) the engine's class is its own."""
    n = engine_threads() + 40
    with more_engine_threads(n):
        pool = vce_api.ThreadPoolExecutor()
        assert pool._max_workers == n
        pool.shutdown()
    assert vce_api.ThreadPoolExecutor is ThreadPoolExecutor
    with more_engine_threads(engine_threads()):
        assert vce_api.ThreadPoolExecutor is ThreadPoolExecutor
