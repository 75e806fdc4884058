"""Counters of MMTP events (mmtp.md §12), kept in memory; the node saves
them across restarts."""

from __future__ import annotations

from collections import Counter
from typing import Mapping


class MMTPStats:
    """Named event counters: ``ReceivedConnection``, ``ReceivedPacket``,
    ``RejectedPacket``, ``AttemptedConnect``, ``SuccessfulConnect``,
    ``FailedConnect``, ``KeyIdMismatch``, ``AttemptedRelay``,
    ``SuccessfulRelay``, ``FailedRelay``, ``TimedOut``, ``ProtocolError``,
    ``DeniedConnection``, ``RefusedConnection``, ``EvictedConnection``
    (a full table made room), ``DeniedConnect`` (a next hop's address
    refused by the outgoing rules after connecting), ``StuckNextHop`` (a
    next hop whose connection brought no acknowledgement in time)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def count(self, event: str, n: int = 1) -> None:
        self.counts[event] += n

    def __getitem__(self, event: str) -> int:
        return self.counts[event]

    def snapshot(self) -> Mapping[str, int]:
        return dict(self.counts)
