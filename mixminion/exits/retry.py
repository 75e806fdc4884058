"""When to try a failed delivery again (spec: server.md §6.2, §6.3)."""

from __future__ import annotations

from typing import Optional, Sequence

from mixminion.config.intervals import DEFAULT_MODULE_RETRY, parse_retry_schedule
from mixminion.server.schedule import next_attempt

#: the schema's default retry schedule of a module ("7 hours for 6 days")
DEFAULT_SCHEDULE = list(parse_retry_schedule(DEFAULT_MODULE_RETRY))


def is_ready(last: Optional[float], first: float, schedule: Sequence[int], now: float) -> Optional[bool]:
    """Per-message queues (§6.3): True to try now, False to wait, None when
    the schedule is exhausted and the item must be deleted."""
    when = next_attempt(last, first, schedule, True, now)
    if when is None:
        return None
    return when <= now
