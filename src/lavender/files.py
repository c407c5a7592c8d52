"""Files written safely: atomic replacement, names that no id can steer, one writer at a time.

* :func:`write_atomic` writes through a temporary file created in the target's own folder with
  ``O_EXCL`` (``tempfile.mkstemp``: a unique name, never a link followed), syncs it, and renames it
  over the target, so a reader sees the old file or the new one, never half of one; a failed write
  removes its temporary file, and a full disk is a :class:`DiskFull` naming the folder; a killed
  writer's temporary file stays until :func:`remove_temporaries` clears it.
* :func:`file_stem` turns an untrusted id (a record's) into a file name component that stays in
  its folder, whatever the id holds (``/``, ``..``, NUL, 10 000 characters).
* :func:`exclusive` holds an advisory lock for as long as one process writes somewhere; the kernel
  drops it when the process dies, so a killed run never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Collection, Iterator

from lavender.errors import LavenderError

_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


class DiskFull(LavenderError, OSError):
    """No space left where a file was being written; nothing partial was left behind."""


class Busy(LavenderError):
    """Another process holds the lock of a folder this one wants to write."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Replace ``path`` with ``data`` (str is written as UTF-8) atomically; returns ``path``."""
    path = Path(path)
    payload = memoryview(data.encode("utf-8") if isinstance(data, str) else data)
    folder = path.parent
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    written = 0
    try:
        while written < len(payload):
            written += os.write(handle, payload[written:])
        os.fchmod(handle, 0o666 & ~_umask())  # mkstemp's 0600 would hide a shared store from its group
        os.fsync(handle)
        os.close(handle)
        handle = -1
        os.replace(temporary, path)
    except BaseException as error:
        if handle >= 0:
            os.close(handle)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        if isinstance(error, OSError) and error.errno in _FULL:
            raise DiskFull(
                f"{folder}: no space left on the device while writing {path.name} "
                f"({written:,} of {len(payload):,} bytes written, then removed); free some space and re-run"
            ) from None
        raise
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself survive a crash
    finally:
        os.close(directory)
    return path


def remove_temporaries(folder: str | os.PathLike, names: Collection[str]) -> int:
    """Remove the temporary files that killed :func:`write_atomic` calls for the files ``names`` of
    ``folder`` left behind, in one pass over the folder; returns how many. Only for a caller that
    knows no live process is writing those files (one that holds the :func:`exclusive` lock of their
    writers): a live writer's file would go too."""
    names = set(names)
    removed = 0
    for entry in os.scandir(folder):
        is_temporary = entry.name.startswith(".") and entry.name.endswith(".tmp")
        # write_atomic's ".NAME.RANDOM.tmp": mkstemp's RANDOM holds no dot
        if is_temporary and entry.name[1:-4].rpartition(".")[0] in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed += 1
    return removed


def file_stem(identifier: str, limit: int = 40) -> str:
    """A file name component for ``identifier``: its safe characters, cut, plus a hash of the whole.

    The hash keeps distinct ids apart after the cut and the replacement of unsafe characters.
    """
    readable = _UNSAFE.sub("_", identifier)[:limit].strip("_")
    digest = hashlib.sha256(identifier.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{readable}-{digest}" if readable else digest


@contextlib.contextmanager
def exclusive(path: str | os.PathLike, holder: str) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (created if absent); :class:`Busy` if another holds it.

    ``holder`` says who would be holding it, for the message (e.g. "another `lavender targets`").
    """
    path = Path(path)
    try:
        handle = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as error:
        raise Busy(f"{path}: cannot open the lock file ({error.strerror})") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Busy(f"{path.parent} is being written by {holder}; wait for it to finish") from None
        yield
    finally:
        os.close(handle)  # closing releases the lock


def write_new(path: str | os.PathLike, data: bytes | str) -> bool:
    """Create ``path`` with ``data`` unless it exists; False if it did (its content untouched).

    The file appears complete or not at all: it is written under a temporary name and linked into
    place, and the link fails if another process created ``path`` first.
    """
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".new", dir=path.parent)
    os.close(handle)
    try:
        write_atomic(temporary, data)
        try:
            os.link(temporary, path)
        except FileExistsError:
            return False
        return True
    finally:
        os.unlink(temporary)
