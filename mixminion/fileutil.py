"""Writing files so that a crash leaves the old content or the new one."""

from __future__ import annotations

import errno
import os
import tempfile
from typing import Optional


def fsync_dir(folder: str) -> None:
    """Make a rename or creation in ``folder`` durable, where the system
    allows (some filesystems refuse to sync a directory)."""
    try:
        sync_directory(folder)
    except OSError:
        pass


def atomic_write(path: str, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` whole: temp file in the same folder, fsync, chmod,
    rename, fsync the folder.  Readers see the old file or the new one."""
    folder = os.path.dirname(path) or "."
    fd, temp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temp, mode)
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
    fsync_dir(folder)


def sync_directory(folder: str) -> None:
    """Make names created in ``folder`` durable; raises if it cannot
    (unlike :func:`fsync_dir`, for names acknowledgements depend on)."""
    fd = os.open(folder or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_segment(path: str, create: bool, writable: bool = True) -> Optional[int]:
    """A descriptor of a segment file (mode 0600), or None if it does not
    exist and ``create`` is false.  A new file's name is synced into its
    folder, so it survives a crash."""
    if create:
        existed = os.path.exists(path)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        if not existed:
            try:  # acknowledgements depend on this name surviving a crash
                sync_directory(os.path.dirname(path))
            except OSError:
                os.close(fd)
                os.unlink(path)
                raise
        return fd
    try:
        return os.open(path, os.O_RDWR if writable else os.O_RDONLY)
    except FileNotFoundError:
        return None


_ZEROS = bytes(1 << 20)  # shared, never written to: every zeroing writes from it
_IOV_MAX = 1024


def write_zeros(fd: int, offset: int, length: int) -> None:
    """Overwrite ``length`` bytes at ``offset`` with zeros, in one system
    call for up to 1 GiB, from one shared buffer (no allocation per call:
    a per-slot ``bytes(n)`` and a ``pwrite`` each was a visible share of
    the threads that delete packets)."""
    while length > 0:
        whole, rest = divmod(min(length, len(_ZEROS) * _IOV_MAX), len(_ZEROS))
        buffers: list = [_ZEROS] * whole
        if rest:
            buffers.append(memoryview(_ZEROS)[:rest])
        written = os.pwritev(fd, buffers, offset)
        if written <= 0:
            raise OSError(f"could not overwrite {length} bytes with zeros")
        offset += written
        length -= written


def write_durably(fd: int, buffers: list, offset: int) -> int:
    """``pwritev`` whose data is on stable storage when it returns (like a
    write then ``fdatasync``, but one system call: a thread that waits for
    the GIL after each call pays for every extra one).  Only this range is
    synced, not other dirty pages of the file.  Returns the bytes written."""
    if _DSYNC is not None:
        try:
            return os.pwritev(fd, buffers, offset, _DSYNC)
        except OSError as exc:
            # Refused by the kernel or filtered by a sandbox: do it in two.
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS, errno.EPERM):
                raise
    written = os.pwritev(fd, buffers, offset)
    os.fdatasync(fd)
    return written


_DSYNC = getattr(os, "RWF_DSYNC", None)
