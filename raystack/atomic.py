"""Atomic outputs: write into a hidden sibling, then rename, so a crash never leaves a half-written result."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path

from .errors import UserError
from .errors import DiskFull


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "File too large")


def is_disk_full(e: BaseException) -> bool:
    """A write that failed for want of space (or a file-size limit), here or inside a Ray worker's error text."""

    return (isinstance(e, DiskFull) or (isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS)
            or any(t in str(e) for t in DISK_FULL_TEXTS))


def disk_full(dest: Path, e: BaseException):
    from .errors import DiskFull

    why = e.strerror if isinstance(e, OSError) and e.strerror else "no space left on device"
    return DiskFull(f"{dest}: {why.lower()} while writing it; nothing was written (free space and rerun)")


@contextlib.contextmanager
def atomic_dir(dest: Path, overwrite: bool = False):
    """Yield a temporary folder next to `dest`; on success it replaces `dest` in one rename."""
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise UserError(f"{dest}: already exists (pass --overwrite to replace it)")
    if dest.exists():
        from .outputs import check_replaceable

        check_replaceable(dest, str(dest))
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        try:
            yield tmp
        except OSError as e:
            if is_disk_full(e):
                raise disk_full(dest, e) from None
            raise
        from .outputs import write_output_marker

        write_output_marker(tmp)
        _fault_point()
        if dest.exists():
            if not _exchange(tmp, dest):  # no atomic swap here: two renames, a short window without dest
                old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
                os.replace(dest, old / "x")
                os.replace(tmp, dest)
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    finally:
        if tmp.exists():  # the new contents on failure, the previous ones after a swap
            shutil.rmtree(tmp, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange)
    return rc == 0


def _fault_point() -> None:
    """Fault injection for tests: IMMUNIZE_FAULT_SAVE_PAUSE=seconds holds a finished output before its
    commit, so a test can kill the process while it saves."""
    pause = os.environ.get("IMMUNIZE_FAULT_SAVE_PAUSE")
    if pause:
        import time

        marker = os.environ.get("IMMUNIZE_FAULT_SAVE_MARKER")
        if marker:
            Path(marker).write_text("saving")
        time.sleep(float(pause))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make shared outputs unreadable
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and is_disk_full(e):
            raise disk_full(path, e) from None
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB chunks (a multi-GB checkpoint never sits in memory)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
