"""What /proc says about processes (Linux): whether one runs (``mixminiond``
before it signals a node), and its children (benchmarks and tests that
watch a node and its processing child)."""

from __future__ import annotations

import os


def child_pids(pid: int) -> list[int]:
    """Processes whose parent is ``pid``, alive now."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, ValueError):
                continue
    return found


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not, for our purposes)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return True
