"""Writing result files: whole or not at all, to a location checked before any work.

A file is written under a temporary name in its own folder and renamed over the target
(``os.replace``, atomic on one file system), so a crash, a full disk or a failed check never
leaves a half-written or unchecked file under the real name.
"""
from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, Path]


@contextlib.contextmanager
def replacing(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (its folder created if missing); when the block ends
    without an exception the temporary file replaces ``path``, otherwise it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_bytes_atomically(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file (flushed to disk) and a rename."""
    path = Path(path)
    with replacing(path) as tmp:
        # os.open with 0o666 keeps the umask's permissions (mkstemp would give 0600).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return path


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def output_file_problem(path: PathLike) -> str | None:
    """Why a file cannot be written at ``path`` (None if it can be, as far as can be told now)."""
    path = Path(path)
    if path.is_dir():
        return f"{path} is a folder"
    base = _nearest_existing(path.parent)
    if not base.is_dir():
        return f"{base} is a file, not a folder"
    if not os.access(base, os.W_OK):
        return f"{base} is not writable"
    return None


def output_folder_problem(path: PathLike) -> str | None:
    """Why results cannot be written into the folder ``path`` (None if they can be)."""
    path = Path(path)
    base = _nearest_existing(path)
    if not base.is_dir():
        return f"{base} is a file, not a folder"
    if not os.access(base, os.W_OK):
        return f"{base} is not writable"
    return None
