"""What would make a loop wait for an accelerator, caught on the CPU.

On a GPU, reading a tensor's value on the host (``.item()``, ``int(t)``, ``if t.any()``), an
operation whose output size depends on the data (``nonzero``, boolean indexing) and a tensor
made without naming its device (it lands on the CPU, and is copied over at every use) each stall
the step loop. The same calls happen on the CPU, where they cost nothing, so a test on the CPU can
count them: ``DeviceDiscipline`` records both kinds while it is active.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# Ops that read values on the host or size their output by the data.
SYNCING = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.unique_dim,
           aten._unique2, aten.repeat_interleave, aten.equal, aten.is_nonzero}


def _has_bool_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


class _Syncs(TorchDispatchMode):
    def __init__(self, found: list[str]) -> None:
        super().__init__()
        self.found = found

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket
        if packet in SYNCING or (packet in (aten.index, aten.index_put, aten.index_put_)
                                 and _has_bool_index(args)):
            self.found.append(str(func))
        return func(*args, **(kwargs or {}))


class _Factories(TorchFunctionMode):
    def __init__(self, found: list[str]) -> None:
        super().__init__()
        self.found = found
        self.constructors = _device_constructors()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.constructors and kwargs.get("device") is None:
            self.found.append(getattr(func, "__name__", str(func)))
        return func(*args, **kwargs)


class DeviceDiscipline:
    """``with DeviceDiscipline() as d:`` ... then ``d.syncs`` and ``d.undeviced`` list the
    host reads and the tensors made without a device, by op name."""

    def __init__(self) -> None:
        self.syncs: list[str] = []
        self.undeviced: list[str] = []
        self._modes = (_Factories(self.undeviced), _Syncs(self.syncs))

    def __enter__(self) -> DeviceDiscipline:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
