"""Intervals and retry schedules as written in configuration files
(server.md §6.1, §14.2).

A schedule is a tuple of intervals in whole seconds.  The written form is a
comma-separated list of items, each ``INTERVAL`` (one attempt after that
long) or ``[every] INTERVAL for DURATION`` (``ceil(DURATION / INTERVAL)``
attempts spaced by INTERVAL).  When to try again is
:mod:`mixminion.server.schedule`'s job; this is only the text.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Mapping, Optional, Sequence

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
    """``NUMBER UNIT`` as seconds (``.5 months`` = 15 days).

    Every interval counts whole seconds, so one that is not a whole number
    of them is refused rather than truncated: ``KeepOpen: 0.5 seconds``
    would otherwise mean 0, the opposite of what was asked.  Exact
    rational arithmetic, so ``0.1 hour`` is 360 s, not 359.
    """
    exact = _exact_seconds(text)
    if exact.denominator != 1:
        raise ScheduleError(f'"{text.strip()}" is not a whole number of seconds '
                            f"(intervals count whole seconds)")
    return int(exact)


def _exact_seconds(text: str) -> Fraction:
    """``NUMBER UNIT`` as an exact number of seconds."""
    match = _INTERVAL.fullmatch(text.strip())
    seconds = _unit_seconds(match.group("unit")) if match else None
    if match is None or seconds is None:
        raise ScheduleError(f'"{text.strip()}" is not an interval ({_INTERVAL_HINT})')
    return Fraction(match.group("number")) * seconds


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
    # Only a count of attempts comes of the duration: it need not be whole.
    duration = _exact_seconds(match.group("duration"))
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
