"""A run directory: what a run writes.

Layout: ``config.json`` (everything needed to repeat the run), ``metrics.jsonl`` (one JSON object
per iteration), ``summary.json`` (final figures and measured baselines), ``team.pt`` (the
checkpoint) and plots.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _finite(x: Any) -> Any:
    """JSON has no NaN or Infinity: write them as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_finite(obj), indent=2) + "\n")
    os.replace(tmp, path)  # a reader never sees half a file


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def write_config(self, config: dict) -> None:
        write_json(self.path / "config.json", config)

    def append_metrics(self, row: dict) -> None:
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(_finite(row)) + "\n")

    def keep_metrics(self, keep: Callable[[dict], bool]) -> None:
        """Drop the rows ``keep`` rejects (rows past a checkpoint, before a resume)."""
        rows = [row for row in self.metrics() if keep(row)] if self.has_metrics() else []
        tmp = self.path / "metrics.jsonl.tmp"
        tmp.write_text("".join(json.dumps(_finite(row)) + "\n" for row in rows))
        os.replace(tmp, self.path / "metrics.jsonl")

    def has_metrics(self) -> bool:
        return (self.path / "metrics.jsonl").exists()

    def metrics(self) -> list[dict]:
        path = self.path / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def write_summary(self, summary: dict) -> None:
        write_json(self.path / "summary.json", summary)

    def summary(self) -> dict:
        return json.loads((self.path / "summary.json").read_text())

