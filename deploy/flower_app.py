"""The Flower app that ``flwr run`` submits: the same ServerApp and ClientApp as in simulation.

Its ClientApp is ``fedcomm.clients.relay``: on a node whose config names a ``worker-socket``
it hands each message to the agent's worker, elsewhere it runs the simulation's ClientApp.

The app directory holds only its ``pyproject.toml``: the components are imported from the
installed ``fedcomm`` package on the SuperLink's and every SuperNode's host, so the code that
runs is the code that was installed and reviewed there, not code shipped with the run.
The app's run config carries the whole run: ``fedcomm-config`` (a ``FederationConfig`` as
JSON), ``run-dir`` (where the ServerApp writes the run directory) and ``agent-keys`` (the file
of every agent's server key, which the server verifies replies with), both on the SuperLink's
host.
"""

from __future__ import annotations

import json
from pathlib import Path

import fedcomm

PYPROJECT = f"""\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedcomm-app"
version = "{fedcomm.__version__}"
description = "fedcomm: the federated run of a joint environment"
license = "Apache-2.0"
dependencies = ["fedcomm=={fedcomm.__version__}"]

[tool.flwr.app]
publisher = "fedcomm"

[tool.flwr.app.components]
serverapp = "fedcomm.server.app:app"
clientapp = "fedcomm.clients.relay:app"

[tool.flwr.app.config]
"""


def write_app(out: str | Path, fed_json: str, run_dir: str | Path,
              agent_keys: str | Path) -> Path:
    """Write the app directory ``out`` for one run: ``fed_json`` (``FederationConfig.to_json``)
    written to ``run_dir`` and verified with the keys in ``agent_keys``, both on the
    SuperLink's host. Returns ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # A JSON string is a valid TOML basic string.
    config = (f"fedcomm-config = {json.dumps(fed_json)}\n"
              f"run-dir = {json.dumps(str(run_dir))}\n"
              f"agent-keys = {json.dumps(str(agent_keys))}\n")
    (out / "pyproject.toml").write_text(PYPROJECT + config)
    return out
