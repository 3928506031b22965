"""The layers of docs/architecture.md, read from every module's imports: nothing imports a
layer above its own, and the two parties (clients, server) never import each other."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Highest first, as docs/architecture.md draws them. A module imports its own layer or lower
# ones; of the packages named in PEERS neither imports the other.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("fedcomm.commands", "fedcomm.__main__"),
    ("fedcomm.deploy",),
    ("fedcomm.modes",),
    ("fedcomm.clients", "fedcomm.server"),
    ("fedcomm.learning",),
    ("fedcomm.releases",),
    ("fedcomm.models",),
    ("fedcomm.config", "fedcomm.presets", "fedcomm.rundir", "fedcomm.summary",
     "fedcomm.baselines", "fedcomm.plots", "fedcomm.progress"),
    ("fedcomm.sim",),
    ("fedcomm.privacy", "fedcomm.protocol"),
    ("fedcomm.device", "fedcomm.jsonfile", "fedcomm"),
)
PEERS = ({"fedcomm.clients", "fedcomm.server"}, {"fedcomm.privacy", "fedcomm.protocol"})


def place(module: str) -> tuple[int, str]:
    """The layer (0 = top) and the package a module belongs to, by longest prefix."""
    best = None
    for level, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and (
                    best is None or len(name) > len(best[1])):
                best = (level, name)
    if best is None:
        raise AssertionError(f"{module} is in no layer of docs/architecture.md")
    return best


def modules() -> dict[str, Path]:
    """Every module of the package, by import path, from pyproject's folder mapping."""
    section = (ROOT / "pyproject.toml").read_text().split("[tool.setuptools.package-dir]")[1]
    mapping = re.findall(r'^"?([\w.]+)"? = "(\w+)"$', section.split("\n[")[0], re.M)
    found = {}
    for package, folder in mapping:
        for path in (ROOT / folder).rglob("*.py"):
            if "_pb2" in path.name:
                continue  # generated
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            found.setdefault(name, path)
    return found


def imports(path: Path, module: str) -> set[str]:
    """The fedcomm modules ``path`` imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing package
                package = module.split(".")
                if path.name != "__init__.py":
                    package = package[:-1]
                base = package[:len(package) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            out.add(target)
            out |= {f"{target}.{a.name}" for a in node.names}
    return {m for m in out if m == "fedcomm" or m.startswith("fedcomm.")}


MODULES = modules()


def test_every_module_has_a_layer():
    assert len(MODULES) > 60
    for name in MODULES:
        place(name)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_and_never_across_the_parties(module: str):
    level, package = place(module)
    known = set(MODULES)
    for target in imports(MODULES[module], module):
        if target not in known:
            continue  # a name imported from a module, counted as the module itself
        their_level, theirs = place(target)
        assert their_level >= level, (f"{module} imports {target}: a lower layer imports a "
                                      "higher one")
        assert {package, theirs} not in PEERS, (f"{module} imports {target}: {package} and "
                                                f"{theirs} never import each other")


def test_the_check_catches_an_import_from_the_server_into_the_agents(tmp_path: Path):
    """The check itself: an import of the server from clients/ would be reported."""
    source = tmp_path / "x.py"
    source.write_text("from fedcomm.server.federation import Federation\n")
    targets = imports(source, "fedcomm.clients.x") & set(MODULES)
    assert targets == {"fedcomm.server.federation"}
    assert {place("fedcomm.clients.x")[1], place("fedcomm.server.federation")[1]} in PEERS


# Deployed, Flower starts a fresh ClientApp process for every message: what its module imports
# is paid every round. These are needed only where used (DP-SGD, an accountant other than the
# one a budget asks for, plots, the simulation engine).
NOT_IN_AN_AGENT = ("opacus", "matplotlib", "ray", "dp_accounting", "fedcomm.plots",
                   "fedcomm.modes", "fedcomm.server")


@pytest.mark.integration  # a Python process
def test_the_clientapp_module_imports_nothing_its_round_may_not_need():
    code = ("import sys, fedcomm.clients.app; "
            f"print(' '.join(m for m in {NOT_IN_AN_AGENT!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == [], f"importing fedcomm.clients.app pulls in {out}"


# With a worker, the ClientApp process Flower starts per message only relays: no torch, no
# agent (clients.relay imports them only where a node has no worker).
NOT_IN_A_RELAY = (*NOT_IN_AN_AGENT, "torch", "fedcomm.clients.agent", "fedcomm.models")


@pytest.mark.integration  # a Python process
def test_the_relaying_clientapp_imports_neither_torch_nor_the_agent():
    code = ("import sys, fedcomm.clients.relay; "
            f"print(' '.join(m for m in {NOT_IN_A_RELAY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == [], f"importing fedcomm.clients.relay pulls in {out}"
