"""An agent's private training state, kept between federated rounds and across restarts.

Everything an agent trains besides the shared module never leaves it: its private networks, its
optimizer and value-normaliser state and its random stream. After every completed round the
agent keeps them in two places: its Flower context (``context.state``, which outlives the
ClientApp process between rounds) and a durable directory of its own, one file per round, so a
restarted SuperNode resumes where it stopped. A round's state is restored only if the server's
global module continues from that round: a round the server never committed is discarded.
"""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ConfigRecord, RecordDict

from fedcomm.files import private_dir, write_private
from fedcomm.learning.party import Party

CONTEXT_KEY = "fedcomm.private"
KEEP = 3  # round files kept in the durable directory
_FILE = re.compile(r"state-r(\d+)\.pt")


def private_state_dict(party: Party) -> dict:
    """The party's private networks and training state, and its copy of the shared module (the
    parts it sends are replaced by the global ones each round; those it keeps are its own)."""
    return {"team": party.team.private_state(), "comm": party.team.shared_state(),
            "optimizer": party.optimizer.state_dict(),
            "value_norm": party.value_norm.state_dict(),
            "generator": party.generator.get_state()}


def load_private_state(party: Party, state: dict) -> None:
    party.team.load_private_state(state["team"])
    if "comm" in state:
        party.team.load_shared_state(state["comm"])
    party.optimizer.load_state_dict(state["optimizer"])
    party.value_norm.load_state_dict(state["value_norm"])
    try:
        party.generator.set_state(state["generator"])
    except RuntimeError:  # written on another kind of device: CPU and CUDA states differ
        # The stream samples actions and minibatches only (privacy noise has its own source):
        # continue it from a seed derived from the saved state, the same on every restore.
        digest = hashlib.sha256(state["generator"].numpy().tobytes()).digest()
        party.generator.manual_seed(int.from_bytes(digest[:8], "little") >> 1)


@dataclass
class Saved:
    round: int  # the federated round whose end this state is
    state: dict


def _to_bytes(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _from_bytes(blob: bytes) -> dict:
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


class StateStore:
    """Round-tagged private state in ``context.state`` and in ``directory``."""

    def __init__(self, directory: str | Path, context_state: RecordDict) -> None:
        self.directory = Path(directory)
        self.context_state = context_state

    def save(self, server_round: int, state: dict) -> None:
        blob = _to_bytes(state)
        # The agent's alone (0700, files 0600), written atomically, never through a link.
        write_private(private_dir(self.directory) / f"state-r{server_round:06d}.pt", blob)
        for old in self._rounds()[:-KEEP]:
            (self.directory / f"state-r{old:06d}.pt").unlink(missing_ok=True)
        self.context_state[CONTEXT_KEY] = ConfigRecord({"round": server_round, "state": blob})

    def load(self, at_most: int) -> Saved | None:
        """The latest state of a round ``<= at_most``, or ``None`` for a fresh agent."""
        record = self.context_state.get(CONTEXT_KEY)
        if isinstance(record, ConfigRecord) and 0 < int(record["round"]) <= at_most:
            newer = [r for r in self._rounds() if int(record["round"]) < r <= at_most]
            if not newer:
                return Saved(int(record["round"]), _from_bytes(record["state"]))
        rounds = [r for r in self._rounds() if r <= at_most]
        if not rounds:
            return None
        path = self.directory / f"state-r{rounds[-1]:06d}.pt"
        return Saved(rounds[-1], _from_bytes(path.read_bytes()))

    def _rounds(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.directory.iterdir()
                      if (m := _FILE.fullmatch(p.name)))
