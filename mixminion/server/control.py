"""What ``mixminiond`` knows of a running node: its process, its status file.

The node is found through its pid file (``[Server] PidFile``).  A pid read
there is trusted only when three things hold, so that a stale file (after
a crash, once the number is reused) never makes ``mixminiond`` signal a
stranger: the process is alive (a zombie is not), its command line names
``twistd`` or ``mixminion`` (where ``/proc`` says), and the pid file's lock
is held -- the node holds it from start-up until it has stopped.  The lock
is only tested once the first two hold, so ``mixminiond`` practically
never holds it itself when a node starts.

The node writes ``WorkDir/status.json`` (:mod:`mixminion.server.status`);
:func:`read_status` reads it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from mixminion.server.status import STATUS_INTERVAL, status_path
# (a zombie, ended but not reaped, is not alive; shared with the process harness)
from mixminion.procinfo import pid_alive

#: a status written longer ago than this by a running node means it is stuck
STALE_AFTER = 6 * STATUS_INTERVAL

EXIT_OK = 0
#: the command ran and failed (or the node is unhealthy)
EXIT_FAILED = 1
#: usage, configuration or permission error: nothing could be done
EXIT_USAGE = 2
#: the node is not running
EXIT_NOT_RUNNING = 3


class OperatorError(Exception):
    """One line for the operator, and the exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def permission_error(path: str) -> OperatorError:
    return OperatorError(f"cannot read {path}: permission denied (run mixminiond as the "
                         "node's user)", EXIT_USAGE)


# --- the process ------------------------------------------------------------------------


def looks_like_node(pid: int) -> bool:
    """Whether the command line of ``pid`` names twistd or mixminion (True
    where there is no /proc to tell)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return not os.path.isdir("/proc/self")
    return b"twistd" in cmdline or b"mixminion" in cmdline


def lock_held(fd: int) -> bool:
    """Whether another process holds the lock of the open file ``fd``."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
            return True
        raise
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


@dataclass(frozen=True)
class NodeProcess:
    """What the pid file says: ``pid`` (None: no file, or no number in it)
    and whether that process is the running node."""

    pid_file: str
    pid: Optional[int]
    running: bool

    def describe(self) -> str:
        """One line for a node that is not running."""
        if self.pid is None:
            return f"not running (no process id in {self.pid_file})"
        return (f"not running (the pid file {self.pid_file} names process {self.pid}, "
                "which is not a running mixminion node)")


def find_node(pid_file: str) -> NodeProcess:
    """The node that runs with ``pid_file``.  OperatorError if the file
    cannot be read."""
    try:
        fd = os.open(pid_file, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return NodeProcess(pid_file, None, False)
    except PermissionError:
        raise permission_error(pid_file) from None
    try:
        text = os.read(fd, 64).decode("ascii", "replace").strip()
        pid = int(text) if text.isdigit() else None
        running = (pid is not None and pid_alive(pid) and looks_like_node(pid)
                   and lock_held(fd))
    finally:
        os.close(fd)
    return NodeProcess(pid_file, pid, running)


def running_node(pid_file: str) -> int:
    """The running node's pid; OperatorError (exit 3) if it does not run."""
    node = find_node(pid_file)
    if not node.running:
        raise OperatorError(node.describe(), EXIT_NOT_RUNNING)
    assert node.pid is not None
    return node.pid


def send_signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        raise OperatorError(f"process {pid} ended before it could be signalled",
                            EXIT_NOT_RUNNING) from None
    except PermissionError:
        raise OperatorError(f"cannot signal process {pid}: permission denied (run mixminiond "
                            "as the node's user)", EXIT_USAGE) from None


def wait_for(check: Callable[[], Any], timeout: float, interval: float = 0.1,
             clock: Callable[[], float] = time.monotonic,
             sleep: Callable[[float], None] = time.sleep) -> Any:
    """Poll ``check`` until it gives something true (returned) or ``timeout``
    seconds pass (its last result is returned)."""
    deadline = clock() + timeout
    while True:
        result = check()
        if result or clock() >= deadline:
            return result
        sleep(interval)


# --- the status file --------------------------------------------------------------------


def read_status(work_dir: str) -> Optional[dict]:
    """The node's last ``status.json`` (None if there is none, or it is not
    a JSON object); OperatorError if it cannot be read."""
    path = status_path(work_dir)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    except PermissionError:
        raise permission_error(path) from None
    try:
        doc = json.loads(data)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def status_since(work_dir: str, pid: int, since: float) -> Optional[dict]:
    """The status written by process ``pid`` at or after wall time ``since``, if any."""
    doc = read_status(work_dir)
    if doc is None or doc.get("pid") != pid:
        return None
    updated = doc.get("updated")
    return doc if isinstance(updated, (int, float)) and updated >= since else None
