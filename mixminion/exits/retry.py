"""When to try a failed delivery again (spec: server.md §6.2, §6.3)."""

from __future__ import annotations

import math
from typing import Optional, Sequence

#: the module default "7 hours for 6 days"
DEFAULT_SCHEDULE = [7 * 3600] * 21
#: holding-mode interval when the schedule gives none usable
HOLDING_INTERVAL = 3600


def next_attempt(last: Optional[float], first: float, schedule: Sequence[int], can_drop: bool,
                 now: float) -> Optional[float]:
    """The time of the next attempt, or None to give up (server.md §6.2).

    ``first`` is when the item was queued and ``last`` when the last
    attempt started (None: never attempted).
    """
    if last is None:
        return now
    t = first
    for interval in schedule:
        t += interval
        if t > last:
            return t
    if can_drop:
        return None
    r = schedule[-1] if schedule and schedule[-1] >= 5 else HOLDING_INTERVAL
    return t + math.ceil((last - t + 60) / r) * r


def is_ready(last: Optional[float], first: float, schedule: Sequence[int], now: float) -> Optional[bool]:
    """Per-message queues (§6.3): True to try now, False to wait, None when
    the schedule is exhausted and the item must be deleted."""
    when = next_attempt(last, first, schedule, True, now)
    if when is None:
        return None
    return when <= now
