"""What /proc says about processes (Linux): for benchmarks and tests that
watch a node and its processing child."""

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
