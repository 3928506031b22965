"""The server's checkpoint: enough to continue a stopped run without repeating or losing a round.

Written atomically after every committed round: the round number, the global shared module, the
strategy's server-side optimizer state, the run configuration, the running totals and every
agent's ledger anchor as its replies stated it. The
agents' private state is not in it: each agent keeps its own, tagged by round
(``clients/state.py``), and restores the one that matches the checkpoint's round.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

CHECKPOINT = "checkpoint.pt"


@dataclass
class Checkpoint:
    round: int  # the last committed round
    arrays: dict[str, np.ndarray]  # the global shared module after that round
    config: dict  # the FederationConfig the run was started with
    strategy: dict = field(default_factory=dict)  # server-side optimizer state
    env_steps: int = 0
    train_time_s: float = 0.0  # seconds spent in rounds, evaluations excluded
    # Each agent's ledger (entries, last hash) as its replies stated it, by agent id: a resumed
    # run, and an audit, require every ledger to extend it.
    anchors: dict[str, tuple[int, str]] = field(default_factory=dict)


def _to_torch(value):
    if isinstance(value, dict):
        return {k: _to_torch(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_torch(v) for v in value]
    return torch.from_numpy(np.array(value)) if isinstance(value, np.ndarray) else value


def _to_numpy(value):
    if isinstance(value, dict):
        return {k: _to_numpy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_numpy(v) for v in value]
    return value.numpy() if isinstance(value, torch.Tensor) else value


def save_checkpoint(run_dir: str | Path, ckpt: Checkpoint) -> None:
    path = Path(run_dir) / CHECKPOINT
    tmp = path.with_suffix(".tmp")
    payload = {"round": ckpt.round, "arrays": _to_torch(ckpt.arrays), "config": ckpt.config,
               "strategy": _to_torch(ckpt.strategy), "env_steps": ckpt.env_steps,
               "train_time_s": ckpt.train_time_s,
               "anchors": {a: [int(n), str(h)] for a, (n, h) in ckpt.anchors.items()}}
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(run_dir: str | Path) -> Checkpoint | None:
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        return None
    d = torch.load(path, map_location="cpu", weights_only=True)
    return Checkpoint(round=int(d["round"]), arrays=_to_numpy(d["arrays"]), config=d["config"],
                      strategy=_to_numpy(d["strategy"]), env_steps=int(d["env_steps"]),
                      train_time_s=float(d["train_time_s"]),
                      anchors={a: (int(n), str(h)) for a, (n, h) in d.get("anchors", {}).items()})
