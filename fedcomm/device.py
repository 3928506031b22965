"""Where a run's tensors live: the one place a ``--device`` name becomes a ``torch.device``.

Everything of a rollout (environment, team, random streams, the batch) lives on that device, so
the step loop never waits for the host. Checkpoints are written from and loaded to any device.
"""

from __future__ import annotations

import torch


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto``: the first CUDA device if torch sees one, else the CPU.

    ``cuda`` or ``cuda:N`` where torch sees no such device fails here, with the reason, rather
    than at the first tensor moved.
    """
    if isinstance(name, torch.device):
        name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch is a CPU-only build" if torch.version.cuda is None
                   else f"this torch is built for CUDA {torch.version.cuda}, but no device "
                   "or driver is visible")
            raise ValueError(f"device {name!r}: torch {torch.__version__} sees no CUDA device "
                             f"({why}); use --device cpu, or auto")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {name!r}: torch sees {count} CUDA device(s), "
                             f"cuda:0 to cuda:{count - 1}")
    return device


def describe(device: torch.device) -> str:
    """The device's name, for summaries and logs (``cuda:0 (NVIDIA H100 80GB HBM3)``)."""
    if device.type != "cuda":
        return str(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
