"""Atomic file writes: a reader never sees a half-written file, and a failed write leaves nothing."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

# Read once at import: os.umask can only be read by setting it, which races with other threads.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def default_mode(directory: bool = False) -> int:
    """The permissions `open()` (or, for a directory, `mkdir`) would give a new file under the umask:
    `mkstemp` and `mkdtemp` make theirs private, which a staged output must not keep."""
    return (0o777 if directory else 0o666) & ~_UMASK


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it is renamed onto `target`, else removed.

    The temporary file lives in the target's folder so that the final rename stays on one
    file system, where it is atomic.
    """
    target_path = Path(target)
    descriptor, temporary_name = tempfile.mkstemp(prefix=f".{target_path.name}.", suffix=".tmp", dir=target_path.parent)
    os.fchmod(descriptor, default_mode())
    os.close(descriptor)
    temporary = Path(temporary_name)
    try:
        yield temporary
        os.replace(temporary, target_path)
    finally:
        temporary.unlink(missing_ok=True)


def write_bytes_atomic(target: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `target` through `atomic_path`."""
    with atomic_path(target) as temporary:
        temporary.write_bytes(data)
