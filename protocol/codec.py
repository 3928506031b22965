"""Tensors on the wire, and the checks every received tensor passes before it is used.

Tensors travel as raw little-endian bytes with shape and dtype (``fedcomm.v1.Tensor``). Decoding
never trusts the sender: dtype, shape, byte length and finiteness are checked, and a failed check
raises ``ProtocolError`` carrying the gRPC status code to answer with.
"""

from __future__ import annotations

import math

import grpc
import numpy as np
import torch
from torch import Tensor

from fedcomm.protocol.v1 import joint_env_pb2 as pb

NUMPY = {pb.FLOAT32: np.dtype("<f4"), pb.INT64: np.dtype("<i8"), pb.BOOL: np.dtype("?")}
TORCH_TO_WIRE = {torch.float32: pb.FLOAT32, torch.int64: pb.INT64, torch.bool: pb.BOOL}


class ProtocolError(Exception):
    """A message that breaks the protocol; ``code`` is the status the peer gets."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> ProtocolError:
    return ProtocolError(grpc.StatusCode.INVALID_ARGUMENT, message)


def encode(t: Tensor) -> pb.Tensor:
    if t.dtype not in TORCH_TO_WIRE:
        raise TypeError(f"no wire dtype for {t.dtype}")
    wire = TORCH_TO_WIRE[t.dtype]
    array = t.detach().cpu().contiguous().numpy().astype(NUMPY[wire], copy=False)
    return pb.Tensor(dtype=wire, shape=list(t.shape), data=array.tobytes())


def decode(msg: pb.Tensor, what: str, dtype: int, shape: tuple[int | None, ...]) -> Tensor:
    """Check and decode a tensor; ``None`` in ``shape`` accepts any size along that axis."""
    if msg.dtype != dtype:
        got = pb.DType.Name(msg.dtype) if msg.dtype in pb.DType.values() else msg.dtype
        raise invalid(f"{what}: dtype {got}, expected {pb.DType.Name(dtype)}")
    got = tuple(msg.shape)
    if len(got) != len(shape) or any(e is not None and g != e for g, e in zip(got, shape)):
        want = ", ".join("*" if e is None else str(e) for e in shape)
        raise invalid(f"{what}: shape {list(got)}, expected [{want}]")
    if any(g < 0 for g in got):
        raise invalid(f"{what}: negative dimension in shape {list(got)}")
    np_dtype = NUMPY[dtype]
    if len(msg.data) != math.prod(got) * np_dtype.itemsize:
        raise invalid(f"{what}: {len(msg.data)} bytes do not hold a {np_dtype.name} tensor "
                      f"of shape {list(got)}")
    array = np.frombuffer(msg.data, dtype=np_dtype).reshape(got)
    if dtype == pb.FLOAT32 and not np.isfinite(array).all():
        raise invalid(f"{what}: contains NaN or Inf")
    return torch.from_numpy(array.astype(np_dtype.newbyteorder("="), copy=True))


def norm_bound(dp: pb.DpParams, dims: int) -> float:
    """Largest L2 norm a clipped, noised release of ``dims`` coordinates can plausibly have.

    ``||clip(x) + z|| <= C + ||z||`` and ``||z|| / (sigma C)`` is chi-distributed with ``dims``
    degrees of freedom, exceeding ``sqrt(dims) + 10`` with probability below ``e^-50``.
    """
    return dp.clip_norm * (1 + dp.noise_multiplier * (math.sqrt(dims) + 10)) * (1 + 1e-5)


def check_norms(x: Tensor, what: str, dp: pb.DpParams, row_dims: int) -> None:
    """Refuse a release whose rows (the trailing ``row_dims`` dims flattened) are too long."""
    rows = x.reshape(-1, math.prod(x.shape[-row_dims:]))
    bound = norm_bound(dp, rows.shape[1])
    worst = rows.norm(dim=1).max().item() if rows.numel() else 0.0
    if worst > bound:
        raise invalid(f"{what}: norm {worst:.4g} exceeds what clip {dp.clip_norm:g} with noise "
                      f"multiplier {dp.noise_multiplier:g} can produce ({bound:.4g})")
