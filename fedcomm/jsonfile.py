"""How fedcomm writes JSON: strict JSON, whole files, one convention for what JSON lacks.

JSON has no infinity and no NaN. In every file fedcomm writes (run summaries, metrics, privacy
reports) +inf, the epsilon of a release without noise or a budget without a cap, is the string
``"inf"``; NaN, an undefined statistic such as the standard error of one episode, is ``null``
(a privacy report refuses it: no epsilon is undefined).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

INF = "inf"


def to_json(obj: Any, nan: bool = True, where: str = "value") -> Any:
    """``obj`` with +inf as ``"inf"`` and (``nan``) NaN and -inf as ``None``; without ``nan``
    a ``ValueError`` names where a NaN or -inf is."""
    if isinstance(obj, float) and not math.isfinite(obj):
        if obj == math.inf:
            return INF
        if nan:
            return None
        raise ValueError(f"{where}: JSON here cannot state {obj!r}")
    if isinstance(obj, Mapping):
        return {k: to_json(v, nan, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_json(v, nan, f"{where}[{i}]") for i, v in enumerate(obj)]
    return obj


def number(value: Any) -> float:
    """A number as written by :func:`to_json`: ``"inf"`` is +inf and ``None`` NaN."""
    if value == INF:
        return math.inf
    return math.nan if value is None else float(value)


def write_json(path: Path, obj: Any, nan: bool = True, sort_keys: bool = False) -> None:
    """Write ``obj`` so that a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(to_json(obj, nan), indent=2, sort_keys=sort_keys,
                              allow_nan=False) + "\n")
    os.replace(tmp, path)


def read_json(path: Path | str) -> Any:
    """Read a file as strict JSON (``Infinity`` and ``NaN`` literals are refused)."""
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON; fedcomm writes infinity as {INF!r}")

    return json.loads(Path(path).read_text(), parse_constant=refuse)
