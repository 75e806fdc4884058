"""Counters of MMTP events (mmtp.md §12), kept in memory; the node saves
them across restarts."""

from __future__ import annotations

from collections import Counter
from typing import Mapping


class MMTPStats:
    """Event counters (:class:`mixminion.events.Event`: the MMTP ones are
    ``ReceivedConnection`` ... ``StuckNextHop``, mmtp.md §12); the node's
    statistics add the pipeline's and the exit modules'."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def count(self, event: str, n: int = 1) -> None:
        self.counts[event] += n

    def __getitem__(self, event: str) -> int:
        return self.counts[event]

    def snapshot(self) -> Mapping[str, int]:
        return dict(self.counts)
