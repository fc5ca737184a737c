"""Crash-safe file writes and an inter-process write lock (POSIX)."""

from __future__ import annotations

import errno
import fcntl
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from skillbank.errors import BankError, BankLockedError

__all__ = ["TMP_PREFIX", "atomic_write", "check_output_path", "exclusive_lock", "fsync_dir", "write_output"]

#: Temporary files in a bank start with this; a writer holding the lock removes
#: leftovers of crashed writers.
TMP_PREFIX = ".tmp-"


def fsync_dir(directory: Path) -> None:
    """Make a rename or unlink in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one.

    Temporary file in the same directory, fsync, rename over ``path``, fsync the
    directory.
    """
    tmp = path.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}-{path.name}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def check_output_path(out: Path) -> None:
    """Refuse ``out`` as a place to write a result file unless it is missing or a regular file: never a symbolic
    link (it would send the write elsewhere), a directory, a FIFO or a device (``/dev/full``, ``/dev/stdout``); its
    folder must exist. Raises :class:`BankError` saying which."""
    import stat

    try:
        mode = os.lstat(out).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode):
        kind = "a symbolic link" if stat.S_ISLNK(mode) else "a directory" if stat.S_ISDIR(mode) else "a FIFO, socket or device"
        raise BankError(f"{out} is {kind}; write to a new or regular file instead (nothing was written).")
    if not out.parent.is_dir():
        raise BankError(f"cannot write {out}: the folder {out.parent} does not exist; create it first.")


def write_output(out: Path, data: bytes) -> Path:
    """Write a result file (a report, a plot) atomically: :func:`check_output_path`, then :func:`atomic_write`, which
    renames a temporary file of its own over ``out``, so a failure leaves the old file or none, never half of one."""
    check_output_path(out)
    atomic_write(out, data)
    return out


@contextmanager
def exclusive_lock(lock_path: Path, timeout: float = 60.0) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (created if missing) for the block.

    The kernel drops the lock when its holder dies, so a crashed writer never
    wedges the bank.
    """
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except PermissionError as exc:
        raise BankError(
            f"cannot write to {lock_path.parent}: permission denied (read-only bank). "
            "Reading still works; to add or remove skills, use a writable copy of the bank."
        ) from exc
    except OSError as exc:
        if exc.errno == errno.EROFS:
            raise BankError(f"{lock_path.parent} is on a read-only file system; copy the bank elsewhere to write.") from exc
        if exc.errno == errno.EISDIR:
            raise BankError(
                f"{lock_path} is a directory; a bank's lock is a plain file it makes itself. "
                "Remove that directory (nothing was written)."
            ) from None
        if exc.errno == errno.ELOOP:
            raise BankError(
                f"{lock_path} is a symbolic link; a bank's lock is a plain file it makes itself. "
                "Remove the link (nothing was written)."
            ) from None
        raise
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise BankLockedError(
                        f"another process has held the write lock {lock_path} for over {timeout:.0f}s; "
                        "wait for it to finish, or raise lock_timeout."
                    ) from None
                time.sleep(0.01)
        yield
    finally:
        os.close(fd)
