"""Replay logs: the interface a packet processor records replay values in
(spec: packet.md §9 step 7, §10).

A replay log belongs to one packet key.  Its entries are the 20-byte
``Key(s, "REPLAY PREVENTION", 20)`` values of the subheaders that key has
opened; a second packet with the same secret is a replay (or a reused reply
block) and is refused.  This module is pure: the in-memory log here serves
tests and tools, the node's durable one is :mod:`mixminion.server.store_replay`.
"""

from __future__ import annotations

import abc
from typing import Iterable, Optional

#: length of a replay log entry (a 20-byte derived key, not a packet digest)
ENTRY_LEN = 20


def check_entry(entry: bytes) -> None:
    """Raise ValueError unless ``entry`` is a 20-byte string.

    A wrong entry can only come from a programming error: the processor
    always derives exactly 20 bytes.
    """
    if not isinstance(entry, bytes) or len(entry) != ENTRY_LEN:
        raise ValueError("replay log entries are 20-byte strings")


class ReplayLog(abc.ABC):
    """What :class:`mixminion.codec.process.PacketProcessor` needs from a
    replay log.

    ``seen_or_add`` is a test-and-set: it must be atomic with respect to
    other calls on the same log, and when it returns ``False`` the entry must
    be as durable as the implementation promises (the processor relies on
    this to let the packet's output leave the server).
    """

    @abc.abstractmethod
    def seen_or_add(self, entry: bytes) -> bool:
        """True if ``entry`` was already recorded; otherwise record it and
        return False."""

    def seen_or_add_many(self, entries: Iterable[bytes]) -> list[bool]:
        """:meth:`seen_or_add` for each entry in order (a repeated entry
        within the batch is seen the second time).  Durable logs override
        this to commit the whole batch at once."""
        return [self.seen_or_add(entry) for entry in entries]

    @abc.abstractmethod
    def close(self) -> None:
        """Release the log; every recorded entry is kept (if durable)."""

    def __enter__(self) -> "ReplayLog":
        return self

    def __exit__(self, *exc_info: object) -> Optional[bool]:
        self.close()
        return None


class MemoryReplayLog(ReplayLog):
    """A replay log that lives as long as the process: for tests, vector
    runs and short-lived tools.  It is not durable."""

    def __init__(self, entries: Iterable[bytes] = ()) -> None:
        self._entries: set[bytes] = set()
        for entry in entries:
            check_entry(entry)
            self._entries.add(entry)

    def seen_or_add(self, entry: bytes) -> bool:
        check_entry(entry)
        if entry in self._entries:
            return True
        self._entries.add(entry)
        return False

    def __contains__(self, entry: object) -> bool:
        return entry in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        """Nothing to release; the entries stay readable."""
