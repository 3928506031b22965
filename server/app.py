"""The Flower ServerApp: the coordinator that aggregates the shared communication module.

In deployment (``flwr run``) it reads the run from the run config: ``fedcomm-config`` (a
``FederationConfig`` as JSON) and ``run-dir`` (where the run directory goes). ``fedcomm
simulate`` builds the same app with the configuration given directly.
"""

from __future__ import annotations

import threading
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedcomm.config import FederationConfig
from fedcomm.server.federation import Federation, FederationError
from fedcomm.summary import RunResult

ERROR_FILE = "error.txt"


def make_server_app(fed: FederationConfig | None = None, run_dir: str | Path | None = None,
                    progress: bool = True,
                    results: list[RunResult | FederationError] | None = None,
                    stop: threading.Event | None = None) -> ServerApp:
    """A ServerApp for ``fed`` writing to ``run_dir`` (both default to the run config).

    With ``results``, the run's result, or the ``FederationError`` that ended it, is appended
    there instead of raised; ``stop`` ends the run at its next wait.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = fed or FederationConfig.from_json(str(context.run_config["fedcomm-config"]))
        out = Path(run_dir or str(context.run_config["run-dir"]))
        (out / ERROR_FILE).unlink(missing_ok=True)
        try:
            result = Federation(grid, cfg, out, progress, stop=stop).run_rounds()
        except FederationError as e:
            if results is None:  # a deployment: the run directory says why it stopped
                (out / ERROR_FILE).write_text(f"{e}\n")
                raise
            results.append(e)
            return
        if results is not None:
            results.append(result)

    return app


app = make_server_app()
