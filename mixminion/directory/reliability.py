"""Reliability statistics: what pingers report and what directories carry
(doc/reliability.md).

Values are fixed-point so that every authority writes the same bytes:
reliability in thousandths, latency in whole milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass

#: reliability is written with three decimals
RELIABILITY_SCALE = 1000


def format_reliability(value: float) -> str:
    """``0.000``..``1.000``, rounded to the nearest thousandth."""
    thousandths = min(RELIABILITY_SCALE, max(0, round(value * RELIABILITY_SCALE)))
    return f"{thousandths // RELIABILITY_SCALE}.{thousandths % RELIABILITY_SCALE:03d}"


@dataclass(frozen=True)
class Measured:
    """One pinger's measurement of one server over a report interval
    (a ``Measured:`` line of a ``[Ping-Report]``)."""

    #: the server's identity fingerprint, 40 upper-case hex digits
    fingerprint: str
    #: pings sent through the server, and how many came back
    sent: int
    returned: int
    #: inferred reliability (doc/reliability.md §1), 0..1
    reliability: float
    #: round-trip time of the returned pings through it, milliseconds
    median_ms: int
    p90_ms: int


@dataclass(frozen=True)
class ServerReliability:
    """What a vote or the consensus says of one server (a ``Server:`` line
    of a directory's ``[Reliability]`` section)."""

    reliability: float
    latency_ms: int
    #: how many (grouped) pingers the value rests on
    pingers: int
