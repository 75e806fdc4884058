"""Retry schedules and when to try again (server.md §6, §14.2, §14.9).

Pure functions and small state records, no Twisted and no clock: every
time is passed in, so queues, tests and the configuration parser share one
definition of "when is the next attempt".

A schedule is a tuple of intervals in whole seconds.  The written form is a
comma-separated list of items, each ``INTERVAL`` (one attempt after that
long) or ``[every] INTERVAL for DURATION`` (``ceil(DURATION / INTERVAL)``
attempts spaced by INTERVAL).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Mapping, Optional, Sequence

Schedule = tuple[int, ...]

MINUTE = 60
HOUR = 3600
DAY = 86400
WEEK = 7 * DAY
MONTH = 30 * DAY
YEAR = 365 * DAY

#: ``[every] X for Y`` outgoing default (§14.6): 24 x 1 h, then 18 x 7 h.
DEFAULT_OUTGOING_RETRY = "every 1 hour for 1 day, 7 hours for 5 days"
#: exit-module default (§14.9): 21 x 7 h.
DEFAULT_MODULE_RETRY = "7 hours for 6 days"

#: holding mode uses this period when the schedule gives no usable one (§6.2)
HOLDING_FALLBACK = 3600
#: ... and "no usable one" means empty or a last interval below this
HOLDING_MINIMUM = 5

_UNITS: Mapping[str, int] = {
    "sec": 1, "second": 1,
    "min": MINUTE, "minute": MINUTE,
    "hour": HOUR,
    "day": DAY,
    "week": WEEK,
    "mon": MONTH, "month": MONTH,
    "year": YEAR,
}

_INTERVAL = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?P<unit>[A-Za-z]+)")
_EVERY = re.compile(r"(?:(?P<every>every)\s+)?(?P<interval>.+?)\s+for\s+(?P<duration>.+)", re.IGNORECASE)
_INTERVAL_HINT = 'expected NUMBER UNIT, e.g. "30 minutes"'


class ScheduleError(ValueError):
    """A written interval or retry schedule does not parse; the message is
    the reason, ready to be placed after the option's name."""


# --- intervals -------------------------------------------------------------------


def _unit_seconds(unit: str) -> Optional[int]:
    """Seconds in a unit name, accepting any case and a plural ``s``."""
    unit = unit.lower()
    if unit in _UNITS:
        return _UNITS[unit]
    if unit.endswith("s") and unit[:-1] in _UNITS:
        return _UNITS[unit[:-1]]
    return None


def parse_interval(text: str) -> int:
    """``NUMBER UNIT`` as whole seconds, truncated (``.5 months`` = 15 days).

    Exact rational arithmetic, so ``0.1 hour`` is 360 s, not 359.
    """
    match = _INTERVAL.fullmatch(text.strip())
    seconds = _unit_seconds(match.group("unit")) if match else None
    if match is None or seconds is None:
        raise ScheduleError(f'"{text.strip()}" is not an interval ({_INTERVAL_HINT})')
    return math.floor(Fraction(match.group("number")) * seconds)


_FORMAT_UNITS = (("day", DAY), ("hour", HOUR), ("minute", MINUTE), ("second", 1))


def _plural(count: int, unit: str) -> str:
    return f"{count} {unit}" if count == 1 else f"{count} {unit}s"


def format_interval(seconds: int) -> str:
    """Canonical spelling: the largest of day/hour/minute/second that divides
    exactly (``1800`` -> ``30 minutes``).  Weeks, months and years are not
    used so every value has one obvious spelling."""
    for unit, size in _FORMAT_UNITS:
        if seconds and seconds % size == 0:
            return _plural(seconds // size, unit)
    return _plural(seconds, "second")


def _duration_for(interval: int, count: int) -> str:
    """The coarsest whole-unit DURATION with ``ceil(DURATION / interval) ==
    count``, so ``18 x 7 hours`` prints as ``for 5 days`` (not 126 hours) and
    still parses back to 18 attempts."""
    low, high = (count - 1) * interval, count * interval  # low < DURATION <= high
    for unit, size in _FORMAT_UNITS:
        amount = low // size + 1
        if amount * size <= high:
            return _plural(amount, unit)
    raise AssertionError("a whole number of seconds always fits")  # pragma: no cover


# --- schedules -------------------------------------------------------------------


def _parse_item(item: str) -> list[int]:
    """One comma-separated item of a schedule."""
    match = _EVERY.fullmatch(item)
    if match is None:
        if item.lower().startswith("every"):
            raise ScheduleError(f'"{item}": "every INTERVAL" needs "for DURATION"')
        return [parse_interval(item)]
    interval = parse_interval(match.group("interval"))
    duration = parse_interval(match.group("duration"))
    if interval < 1:
        raise ScheduleError(f'"{item}": the repeated interval must be at least 1 second')
    return [interval] * math.ceil(duration / interval)


def parse_retry_schedule(text: str) -> Schedule:
    """The intervals of a written schedule (§6.1, §14.2)."""
    items = [item.strip() for item in text.split(",")]
    if items == [""]:
        raise ScheduleError("empty retry schedule (expected e.g. \"every 1 hour for 1 day\")")
    schedule: list[int] = []
    for item in items:
        if not item:
            raise ScheduleError(f'"{text.strip()}": empty item in retry schedule')
        schedule.extend(_parse_item(item))
    return tuple(schedule)


def _runs(schedule: Sequence[int]) -> list[tuple[int, int]]:
    """``(interval, count)`` for each run of equal consecutive intervals."""
    runs: list[tuple[int, int]] = []
    for interval in schedule:
        if runs and runs[-1][0] == interval:
            runs[-1] = (interval, runs[-1][1] + 1)
        else:
            runs.append((interval, 1))
    return runs


def format_retry_schedule(schedule: Sequence[int]) -> str:
    """Canonical text (§14.11), e.g. ``every 1 hour for 1 day, every 7 hours
    for 5 days``; parsing it gives back exactly ``schedule``."""
    parts = []
    for interval, count in _runs(schedule):
        if count == 1:
            parts.append(format_interval(interval))
        else:
            parts.append(f"every {format_interval(interval)} for {_duration_for(interval, count)}")
    return ", ".join(parts)


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

