"""Writing result files: whole or not at all, to a location checked before any work.

A file is written under a temporary name in its own folder and renamed over the target
(``os.replace``, atomic on one file system), so a crash, a full disk or a failed check never
leaves a half-written or unchecked file under the real name. The files of one result (a mask and
its overlay) are written together: all, or none of them. A temporary name carries the writer's
process id, so that temporary files left by a killed run can be told from those of a live one and
removed by the next run into the same folder (``remove_stale_temporaries``).
"""
from __future__ import annotations

import contextlib
import os
import re
import uuid
from pathlib import Path
from typing import Dict, Iterator, List, Union

PathLike = Union[str, Path]


@contextlib.contextmanager
def replacing(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (its folder created if missing); when the block ends
    without an exception the temporary file replaces ``path``, otherwise it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


# ".<name>.<pid>-<12 hex>.tmp": the writer's process id tells a killed run's leftovers from a live run's.
_TEMPORARY = re.compile(r"^\..+\.(\d+)-[0-9a-f]{12}\.tmp$")


def _temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp")


def _write_synced(path: Path, data: bytes) -> None:
    # os.open with 0o666 keeps the umask's permissions (mkstemp would give 0600).
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_bytes_atomically(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file (flushed to disk) and a rename."""
    path = Path(path)
    with replacing(path) as tmp:
        _write_synced(tmp, data)
    return path


def write_files_together(files: Dict[Path, bytes]) -> None:
    """Write several files as one result: every file goes to a temporary name first, and only when
    all are written are they renamed into place. A failure before that (a full disk, an unwritable
    folder) leaves none of them; one in the renames removes those already renamed."""
    temporaries: List[tuple] = []
    try:
        for path, data in files.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = _temporary_name(path)
            temporaries.append((tmp, path))
            _write_synced(tmp, data)
    except BaseException:
        for tmp, _ in temporaries:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise
    done: List[Path] = []
    try:
        for tmp, path in temporaries:
            os.replace(tmp, path)
            done.append(path)
    except BaseException:
        for p in done:
            with contextlib.suppress(OSError):
                p.unlink()
        for tmp, _ in temporaries:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise


def process_running(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, killed but not yet reaped, does not): what tells a
    dead writer's (or server's) leftovers from a live one's."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except FileNotFoundError:
        return False
    except (OSError, IndexError):  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's live process
            pass
        return True


def remove_stale_temporaries(folder: PathLike) -> List[Path]:
    """Remove the temporary files in ``folder`` (not below it) that a run, now dead, left behind
    when it was killed mid-write; those of live processes are kept. Returns what was removed."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:  # no folder yet, or unreadable: nothing of ours there
        return removed
    for e in entries:
        m = _TEMPORARY.match(e.name)
        if m and e.is_file(follow_symlinks=False) and int(m.group(1)) != os.getpid() \
                and not process_running(int(m.group(1))):
            with contextlib.suppress(OSError):
                os.unlink(e.path)
                removed.append(Path(e.path))
    return removed


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
