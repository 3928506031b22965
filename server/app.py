"""The Flower ServerApp: the coordinator that aggregates the shared communication module.

In deployment (``flwr run``) it reads the run from the run config: ``fedcomm-config`` (a
``FederationConfig`` as JSON), ``run-dir`` (where the run directory goes) and ``agent-keys``
(the file of every agent's key shared with the server, on the SuperLink's host). ``fedcomm
simulate`` builds the same app with them given directly.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedcomm.config import FederationConfig
from fedcomm.protocol.auth import read_tokens
from fedcomm.server.federation import Federation, FederationError
from fedcomm.summary import RunResult

ERROR_FILE = "error.txt"


def make_server_app(fed: FederationConfig | None = None, run_dir: str | Path | None = None,
                    progress: bool = True,
                    results: list[RunResult | FederationError] | None = None,
                    stop: threading.Event | None = None, keys: str | Path | None = None,
                    local_status: Callable[[int], str] | None = None,
                    capacity: int | None = None) -> ServerApp:
    """A ServerApp for ``fed`` writing to ``run_dir`` with the agents' keys in ``keys`` (all
    three default to the run config).

    With ``results``, the run's result, or the ``FederationError`` that ended it, is appended
    there instead of raised; ``stop`` ends the run at its next wait; ``local_status`` is the
    operator's view of a round, ``capacity`` the agents that run at once (``Federation``).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = fed or FederationConfig.from_json(str(context.run_config["fedcomm-config"]))
        out = Path(run_dir or str(context.run_config["run-dir"]))
        (out / ERROR_FILE).unlink(missing_ok=True)
        try:
            result = Federation(grid, cfg, out, _agent_keys(keys, context), progress,
                                stop=stop, local_status=local_status,
                                capacity=capacity).run_rounds()
        except FederationError as e:
            if results is None:  # a deployment: the run directory says why it stopped
                (out / ERROR_FILE).write_text(f"{e}\n")
                raise
            results.append(e)
            return
        if results is not None:
            results.append(result)

    return app


def _agent_keys(keys: str | Path | None, context: Context) -> dict[str, str]:
    path = keys or context.run_config.get("agent-keys")
    if not path:
        raise FederationError("the run config names no agent-keys file: the server verifies "
                              "every reply under its agent's key")
    try:
        return read_tokens(str(path))
    except ValueError as e:
        raise FederationError(str(e)) from None


app = make_server_app()
