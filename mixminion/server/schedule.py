"""Retry schedules and when to try again (server.md §6, §14.9).

Pure functions and small state records, no Twisted and no clock: every
time is passed in, so queues and tests share one definition of "when is
the next attempt".  A schedule is a tuple of intervals in whole seconds;
its written form is parsed by :mod:`mixminion.config.intervals`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from mixminion.config.intervals import DAY, MINUTE, Schedule, format_interval

#: holding mode uses this period when the schedule gives no usable one (§6.2)
HOLDING_FALLBACK = 3600
#: ... and "no usable one" means empty or a last interval below this
HOLDING_MINIMUM = 5


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


def schedule_total(schedule: Sequence[int]) -> int:
    """How long a queued item lives before it is given up (§6.4)."""
    return sum(schedule)


def schedule_warnings(schedule: Sequence[int], mix_interval: int) -> list[str]:
    """Operator warnings of §14.9 for one ``Retry`` value."""
    warnings = []
    total = schedule_total(schedule)
    if total < DAY:
        warnings.append(f"retries stop after only {format_interval(total)} (less than 1 day)")
    if total > 14 * DAY:
        warnings.append(f"retries continue for {format_interval(total)} (more than 14 days)")
    if any(i < mix_interval - 2 for i in schedule):
        warnings.append(
            f"intervals shorter than MixInterval ({format_interval(mix_interval)}) "
            "are rounded to the nearest mix"
        )
    elif any(i < 5 * MINUTE for i in schedule):
        warnings.append("some retry intervals are shorter than 5 minutes")
    if len(schedule) < 5:
        warnings.append(f"only {len(schedule)} attempts (fewer than 5)")
    if len(schedule) > 50:
        warnings.append(f"{len(schedule)} attempts (more than 50)")
    return warnings


# --- next attempt (§6.2) -----------------------------------------------------------


def expired(queued: float, schedule: Sequence[int], now: float) -> bool:
    """A packet outlived its schedule and is dropped whatever its address's
    state (§6.4)."""
    return queued + schedule_total(schedule) < now


# --- retry state ------------------------------------------------------------------


@dataclass
class AddressRetryState:
    """Retry state of one next-hop address (§6.4).

    Retries are per address, not per packet, so everything waiting for an
    address leaves together when it comes back and an observer cannot tell
    which packets had waited.
    """

    schedule: Schedule
    first_failure: Optional[float] = None
    last_failure: Optional[float] = None
    last_success: Optional[float] = None

    def next_attempt(self, now: float) -> float:
        """Never None: addresses are kept in holding mode, not dropped."""
        when = next_attempt(self.last_failure, self.first_failure or 0.0, self.schedule, False, now)
        assert when is not None
        return when

    def ready(self, now: float) -> bool:
        return self.next_attempt(now) <= now

    def failed(self, at: float) -> None:
        """An attempt started at ``at`` failed (retriably)."""
        if self.first_failure is None:
            self.first_failure = at
        self.last_failure = at

    def succeeded(self, now: float) -> None:
        self.last_success = now
        self.first_failure = None
        self.last_failure = None

    @property
    def last_activity(self) -> Optional[float]:
        times = [t for t in (self.last_failure, self.last_success) if t is not None]
        return max(times) if times else None

    def forgettable(self, now: float) -> bool:
        """No activity for the schedule's total: the record may be dropped
        (when no packets wait for the address) so the table stays bounded."""
        last = self.last_activity
        return last is None or last + schedule_total(self.schedule) < now

    def to_record(self) -> dict[str, Optional[float]]:
        """The times alone, for storing; the schedule comes from the config."""
        return {"first_failure": self.first_failure, "last_failure": self.last_failure,
                "last_success": self.last_success}

    @classmethod
    def from_record(cls, schedule: Schedule, record: Mapping[str, Any]) -> "AddressRetryState":
        return cls(schedule, record.get("first_failure"), record.get("last_failure"),
                   record.get("last_success"))


@dataclass
class MessageRetryState:
    """Retry state of one exit-module message (§6.3)."""

    schedule: Schedule
    queued: float
    last_attempt: Optional[float] = None

    def next_attempt(self, now: float) -> Optional[float]:
        """None once the schedule is used up: the message is to be deleted."""
        return next_attempt(self.last_attempt, self.queued, self.schedule, True, now)

    def ready(self, now: float) -> bool:
        when = self.next_attempt(now)
        return when is not None and when <= now

    def failed(self, at: float, now: Optional[float] = None) -> bool:
        """A retriable failure of the attempt started at ``at``; False means
        the schedule is exhausted and the message must be deleted."""
        self.last_attempt = at
        return self.next_attempt(at if now is None else now) is not None

    def to_record(self) -> dict[str, Optional[float]]:
        return {"queued": self.queued, "last_attempt": self.last_attempt}

    @classmethod
    def from_record(cls, schedule: Schedule, record: Mapping[str, Any]) -> "MessageRetryState":
        return cls(schedule, record["queued"], record.get("last_attempt"))

