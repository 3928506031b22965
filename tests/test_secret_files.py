"""Secrets, ledgers and an agent's private state are files of their owner's alone, whatever lay
at their paths before: a file of a looser mode is left mode 0600, and a symbolic link planted
there is replaced (or, for a ledger, refused), never written through."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from flwr.app import RecordDict

from fedcomm.clients.state import StateStore
from fedcomm.deploy.secrets import make_secrets
from fedcomm.privacy.events import GaussianRelease
from fedcomm.privacy.ledger import Ledger, read_ledger
from fedcomm.protocol.auth import read_tokens, write_tokens

AGENTS = ("sensor_0", "actuator_0")
VICTIM = b"someone else's file\n"


def secret_paths(out: Path) -> list[Path]:
    """Every private key and token ``make_secrets`` writes under ``out``."""
    paths = [out / "ca.key", out / "superlink" / "server.key", out / "sim" / "server.key",
             out / "sim" / "tokens.json"]
    for agent in AGENTS:
        folder = out / "agents" / agent
        paths += [folder / "client.key", folder / "node.key", folder / "token.json",
                  folder / "worker.token"]
    return paths


def plant(paths: list[Path], how: str, victim: Path) -> None:
    """A world-readable file, or a link to ``victim``, at each path."""
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        if how == "file":
            path.write_bytes(b"old")
            path.chmod(0o644)
        else:
            path.symlink_to(victim)


def assert_private(path: Path) -> None:
    info = path.lstat()
    assert stat.S_ISREG(info.st_mode), f"{path} is not a regular file"
    assert stat.S_IMODE(info.st_mode) == 0o600, f"{path}: {oct(stat.S_IMODE(info.st_mode))}"


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim"
    path.write_bytes(VICTIM)
    path.chmod(0o644)
    return path


@pytest.fixture(autouse=True)
def loose_umask():
    """The umask of a careless shell: whatever is private must not rely on it."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_a_fresh_deployments_secrets_are_private(tmp_path):
    out = tmp_path / "secrets"
    made = make_secrets(out, AGENTS)
    for path in secret_paths(out):
        assert_private(path)
    assert made.exists(AGENTS)
    for agent in AGENTS:
        token = made.agent(agent).worker_token.read_text().strip()
        assert len(token) >= 32  # and each agent's its own
    assert len({made.agent(a).worker_token.read_text() for a in AGENTS}) == len(AGENTS)


@pytest.mark.parametrize("how", ["file", "link"])
def test_secrets_made_again_over_old_files_or_links_are_private(tmp_path, victim, how):
    out = tmp_path / "secrets"
    plant(secret_paths(out), how, victim)
    make_secrets(out, AGENTS)
    for path in secret_paths(out):
        assert_private(path)
        assert path.read_bytes() != b"old"
    assert victim.read_bytes() == VICTIM


@pytest.mark.parametrize("how", ["file", "link"])
def test_a_token_file_written_over_an_old_file_or_link_is_private(tmp_path, victim, how):
    path = tmp_path / "tokens.json"
    plant([path], how, victim)
    write_tokens(path, {"a": "secret"})
    assert_private(path)
    assert read_tokens(path) == {"a": "secret"}
    assert victim.read_bytes() == VICTIM


def release() -> GaussianRelease:
    return GaussianRelease(mechanism="message", noise_multiplier=1.0, clip=1.0, sensitivity=1.0,
                           sample_rate=1.0, count=1, relation="replace_one")


def test_a_new_ledger_and_its_folder_are_private(tmp_path):
    path = tmp_path / "agent" / "ledger.jsonl"
    with Ledger(path, "a", "h") as ledger:
        ledger.append(release(), round=1, batch=1, unit="episode")
    assert_private(path)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_an_old_ledger_of_a_looser_mode_is_made_private_and_kept(tmp_path):
    path = tmp_path / "agent" / "ledger.jsonl"
    with Ledger(path, "a", "h") as ledger:
        ledger.append(release(), round=1, batch=1, unit="episode")
    path.chmod(0o644)
    path.parent.chmod(0o755)
    with Ledger(path, "a", "h") as ledger:
        assert len(ledger) == 1  # its history kept
        ledger.append(release(), round=2, batch=2, unit="episode")
    assert_private(path)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert [e["round"] for e in read_ledger(path)] == [1, 2]


def test_a_ledger_at_a_link_is_refused_and_the_links_target_left_alone(tmp_path, victim):
    """A ledger is append-only history: replacing what a link points at with an empty ledger
    would forget releases, writing through it would write someone else's file."""
    path = tmp_path / "agent" / "ledger.jsonl"
    plant([path], "link", victim)
    with pytest.raises(OSError):
        Ledger(path, "a", "h")
    assert path.is_symlink() and victim.read_bytes() == VICTIM
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644


STATE_FILE = "state-r000001.pt"


@pytest.mark.parametrize("how", ["none", "file", "link"])
def test_private_state_is_written_private_over_old_files_and_links(tmp_path, victim, how):
    folder = tmp_path / "agent"
    if how != "none":
        plant([folder / STATE_FILE], how, victim)
        folder.chmod(0o755)
    store = StateStore(folder, RecordDict())
    store.save(1, {"w": torch.arange(3.0)})
    assert_private(folder / STATE_FILE)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert victim.read_bytes() == VICTIM
    assert sorted(p.name for p in folder.iterdir()) == [STATE_FILE]  # no temporary left
    saved = StateStore(folder, RecordDict()).load(1)
    assert saved is not None and torch.equal(saved.state["w"], torch.arange(3.0))



@pytest.mark.skipif(os.geteuid() != 0, reason="making a folder of another owner needs root")
def test_a_state_folder_of_another_owner_keeps_its_mode(tmp_path):
    """A volume's mount point handed to the agent (Kubernetes: root's, group ``fsGroup``) cannot
    be made 0700 by the agent's user: its state goes there all the same, its files 0600."""
    folder = tmp_path / "state"
    folder.mkdir()
    folder.chmod(0o2775)
    os.chown(folder, 12345, -1)
    StateStore(folder, RecordDict()).save(1, {"w": torch.zeros(1)})
    with Ledger(folder / "ledger.jsonl", "a", "h"):
        pass
    assert stat.S_IMODE(folder.stat().st_mode) == 0o2775
    assert_private(folder / STATE_FILE)
    assert_private(folder / "ledger.jsonl")
