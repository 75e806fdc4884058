"""When to try a failed delivery or relay again (spec: server.md §6.2, §6.3).

The rule lives here, below the node, because FRAGMENT's outbox uses it
too; the node's retry records (:mod:`mixminion.server.schedule`) import it.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

from mixminion.config.intervals import DEFAULT_MODULE_RETRY, parse_retry_schedule

#: holding mode uses this period when the schedule gives no usable one (§6.2)
HOLDING_FALLBACK = 3600
#: ... and "no usable one" means empty or a last interval below this
HOLDING_MINIMUM = 5

#: the schema's default retry schedule of a module ("7 hours for 6 days")
DEFAULT_SCHEDULE = list(parse_retry_schedule(DEFAULT_MODULE_RETRY))


def is_ready(last: Optional[float], first: float, schedule: Sequence[int], now: float) -> Optional[bool]:
    """Per-message queues (§6.3): True to try now, False to wait, None when
    the schedule is exhausted and the item must be deleted."""
    when = next_attempt(last, first, schedule, True, now)
    if when is None:
        return None
    return when <= now


def next_attempt(
    last: Optional[float],
    first: float,
    schedule: Sequence[int],
    can_drop: bool,
    now: float,
) -> Optional[float]:
    """When to try next, counting the schedule from ``first``.

    ``last`` None means never tried (ready now).  The answer may lie in the
    past (retry at once).  None means give up; it only happens with
    ``can_drop``.  Without it, an exhausted schedule enters holding mode and
    keeps trying every ``r`` (the last interval, or an hour if that is
    missing or under 5 s).
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
    r = schedule[-1] if schedule and schedule[-1] >= HOLDING_MINIMUM else HOLDING_FALLBACK
    return t + math.ceil((last - t + 60) / r) * r
