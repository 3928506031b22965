"""What an agent keeps of its rounds instead of sending it: its own log.

A private agent sends the server only counts, its ledger's anchor and DP releases
(``protocol.round.RELEASES``); its training return, the update's statistics, its timings and
its evaluation returns are functions of its private episodes that no mechanism covers. It
writes them here, one JSON line per round or evaluation, readable by its owner only. Whoever
runs every party of a run on one machine (``fedcomm simulate``, ``fedcomm deploy local``) reads
the agents' journals to show the run's learning curve and result; on separate hosts each
party reads its own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fedcomm.files import open_private

JOURNAL = "journal.jsonl"


class Journal:
    """An agent's own log in its state directory."""

    def __init__(self, directory: str | Path) -> None:
        self.path = Path(directory) / JOURNAL

    def train(self, server_round: int, return_mean: float, timings: dict[str, float],
              stats: dict[str, float]) -> None:
        self._append({"kind": "train", "round": server_round, "return_mean": return_mean,
                      **timings, **stats})

    def evaluation(self, server_round: int, seed: int, returns: list[float]) -> None:
        self._append({"kind": "evaluate", "round": server_round, "seed": seed,
                      "returns": returns})

    def _append(self, row: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = open_private(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        with os.fdopen(fd, "a") as f:
            f.write(json.dumps(row) + "\n")


def read_journal(directory: str | Path) -> list[dict[str, Any]]:
    """An agent's journal, oldest first: a round written again (a round the server ran a
    second time) replaces the earlier line of the same kind and round."""
    path = Path(directory) / JOURNAL
    if not path.exists():
        return []
    rows: dict[tuple[str, int, int], dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash
        rows[(row.get("kind", ""), int(row.get("round", 0)), int(row.get("seed", 0)))] = row
    return sorted(rows.values(), key=lambda r: (r["round"], r["kind"] == "evaluate"))
