"""``[Server] PidFile``: the running node's process id, locked.

The lock is taken when the node is built, before twistd forks, so that a
second node started on the same BaseDir stops at once with one line
rather than sharing queues with the first.  It is an ``flock`` on the open
file, which the forked daemon inherits with the descriptor; the id is
written when the service starts, in the process that will run (after any
fork).  ``mixminiond`` reads the file to signal the node.
"""

from __future__ import annotations

import errno
import fcntl
import os
from typing import Optional


class NodeAlreadyRunning(Exception):
    """Another process holds the pid file's lock; ``str()`` says which."""


def read_pid(path: str) -> Optional[int]:
    """The id written in ``path``, or None (no file, or not a number)."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


class PidFile:
    """Holds the lock on ``path`` from construction until :meth:`release`."""

    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                other = read_pid(path)
                who = f"process {other}" if other else "another process"
                raise NodeAlreadyRunning(
                    f"{who} already runs a node with PidFile {path}; stop it first "
                    "(two nodes must not share a BaseDir)") from None
            raise
        self._fd: Optional[int] = fd

    def write(self, pid: int) -> None:
        """Record ``pid`` (the process that runs the node, after any fork)."""
        if self._fd is None:
            return
        data = f"{pid}\n".encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)

    def release(self) -> None:
        """Remove the file and drop the lock (at a clean stop)."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None
