"""Files only their owner may read: secrets, ledgers and an agent's private state.

Whatever already lies at the path (a file of another mode, a symbolic link planted there), what
these functions leave is a regular file of mode 0600, or a folder of mode 0700, of this user.
A new file is written beside the old one (``O_CREAT | O_EXCL | O_NOFOLLOW``, mode 0600 from the
start), synced, and renamed over the path, so no reader ever sees it half-written or readable
by others, and a link at the path is replaced rather than followed.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

FILE_MODE = 0o600
DIR_MODE = 0o700


def private_dir(path: str | Path) -> Path:
    """``path`` as a folder (made with its parents if missing) of mode 0700.

    A folder of another owner keeps its mode, which only its owner may change: a Kubernetes
    volume's mount point, root's and shared with the pod's ``fsGroup``, is one, closed to all
    but the pod's containers by the volume itself."""
    path = Path(path)
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    if path.is_symlink():
        raise PermissionError(f"{path} is a symbolic link, not a folder of its own")
    if path.stat().st_uid == os.getuid():
        os.chmod(path, DIR_MODE)
    return path


def write_private(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` atomically as a file of mode 0600 (see the module)."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode()
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)  # whatever the umask took away or left
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


def open_private(path: str | Path, flags: int = os.O_RDWR | os.O_CREAT | os.O_APPEND) -> int:
    """A descriptor of ``path`` opened with ``flags`` without following a link; the file is
    made mode 0600 whatever mode it had."""
    fd = os.open(path, flags | os.O_NOFOLLOW, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def fsync_dir(directory: str | Path) -> None:
    """Make a file's creation or rename in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
