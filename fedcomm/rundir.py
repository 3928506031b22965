"""A run directory: what a run writes.

Layout: ``config.json`` (everything needed to repeat the run), ``metrics.jsonl`` (one JSON object
per iteration), ``summary.json`` (final figures and measured baselines), ``team.pt`` (the
checkpoint) and plots.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from fedcomm.jsonfile import read_json, to_json, write_json
from fedcomm.summary import RunSummary

SUMMARY = "summary.json"
STARTED = "rounds_started.json"  # how many train rounds the server has sent, every attempt


class RunDir:
    """The files of one run, written whole (a reader never sees half a file)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def write_config(self, config: dict) -> None:
        write_json(self.path / "config.json", config)

    def append_metrics(self, row: dict) -> None:
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(to_json(row), allow_nan=False) + "\n")

    def keep_metrics(self, keep: Callable[[dict], bool]) -> None:
        """Drop the rows ``keep`` rejects (rows past a checkpoint, before a resume)."""
        rows = [row for row in self.metrics() if keep(row)] if self.has_metrics() else []
        tmp = self.path / "metrics.jsonl.tmp"
        tmp.write_text("".join(json.dumps(to_json(row), allow_nan=False) + "\n" for row in rows))
        os.replace(tmp, self.path / "metrics.jsonl")

    def has_metrics(self) -> bool:
        return (self.path / "metrics.jsonl").exists()

    def metrics(self) -> list[dict]:
        path = self.path / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def rounds_started(self) -> int | None:
        """How many train rounds were sent over the run's life (``None``: not recorded)."""
        path = self.path / STARTED
        return int(read_json(path)["rounds_started"]) if path.exists() else None

    def note_round_started(self, started: int) -> None:
        """Record, before a round's messages go out, that ``started`` rounds have been sent."""
        write_json(self.path / STARTED, {"rounds_started": started})

    def finished(self) -> bool:
        """Whether the run reached its end (its summary is written once, after the final
        evaluation)."""
        return (self.path / SUMMARY).exists()

    def write_summary(self, summary: RunSummary) -> None:
        write_json(self.path / SUMMARY, summary.to_dict())

    def summary(self) -> RunSummary:
        return RunSummary.from_dict(read_json(self.path / SUMMARY))

