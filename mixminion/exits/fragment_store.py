"""Durable state of the FRAGMENT module: an SQLite file in its directory,
and reassembly (fragments.md §5.2) over it.

The file holds the pending messages, their fragments and decoded chunks,
the COMPLETED / REJECTED marks, and an *outbox* of reassembled messages
not yet accepted by the module of their real exit type.  Every change is
one transaction, committed with ``synchronous=FULL`` (fsync) before the
module reports the fragment handled, so a crash or restart loses nothing
it acknowledged.

Fragment bodies stay in the file.  The :class:`DiskReassembler` keeps in
memory only what the rules of §5.2 decide on -- per pending message its
length, overhead, first-seen day, which fragments and chunks are stored,
and how many bytes they take (a few hundred bytes in all) -- and reads
bodies back only to FEC-decode a chunk that has ``k`` fragments, to join a
completed message, or to compare a repeated fragment with the one stored.
The marks live only in the file (one primary-key lookup per fragment of a
message not pending).  Before this, every pending fragment was held in
memory and all of them were read back at a restart: 9,000 one-fragment
messages with random ids took a node (with its processing child) from
91 MB to 356 MB, 29.5 KB per fragment (issue 12).  Now the same attack
ends at 106 MB, about 1 KB per fragment of which 0.4 KB is the metadata
(``tracemalloc``), the rest allocator noise, and a restart with the
9,000 pending reads them back in 0.05 s for 4.6 MB
(``tests/test_attack_fragments.py``, ``mixminion/test/test_fragment_bounds.py``).

What is pending is bounded by message count and by bytes (fragment and
chunk data on disk); :meth:`DiskReassembler.evict` removes the oldest
pending messages (by arrival of their first fragment) first.  An evicted
message is forgotten, not rejected: fragments of it that come later start
it again, and may still be enough to complete it.
"""

from __future__ import annotations

import sqlite3
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator, Optional

from mixminion.codec.crypto import unwhiten
from mixminion.codec.fragments import COMPLETED, REJECTED, AddResult, FragmentParams, Outcome, fec_decode
from mixminion.codec.payload import FragmentPayload

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    mid BLOB PRIMARY KEY, length INTEGER NOT NULL, overhead INTEGER NOT NULL, day INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS fragments (
    mid BLOB NOT NULL, chunk INTEGER NOT NULL, pos INTEGER NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (mid, chunk, pos));
CREATE TABLE IF NOT EXISTS chunks (
    mid BLOB NOT NULL, chunk INTEGER NOT NULL, data BLOB NOT NULL, PRIMARY KEY (mid, chunk));
CREATE TABLE IF NOT EXISTS status (
    mid BLOB PRIMARY KEY, status TEXT NOT NULL, day INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS status_by_day ON status (day);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY, exit_type INTEGER NOT NULL, address BLOB NOT NULL,
    compressed BLOB NOT NULL, queued_at REAL NOT NULL, last_attempt REAL);
"""

PENDING = "PENDING"


@dataclass(frozen=True)
class OutboxEntry:
    """A reassembled message waiting for its real exit module."""

    id: int
    exit_type: int
    address: bytes
    compressed: bytes
    queued_at: float
    last_attempt: Optional[float]


class FragmentStore:
    """The SQLite file; methods that change it must run inside
    :meth:`transaction`."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- reading -------------------------------------------------------------------

    def messages(self) -> Iterator[tuple[bytes, int, int, int]]:
        """``(mid, length, overhead, day)`` of each pending message, oldest
        first (rowids grow with insertion)."""
        for mid, length, overhead, day in self.db.execute(
                "SELECT mid, length, overhead, day FROM messages ORDER BY rowid"):
            yield bytes(mid), length, overhead, day

    def fragment_sizes(self) -> Iterator[tuple[bytes, int, int, int]]:
        """``(mid, chunk, pos, size)`` of every stored fragment, without its
        data (SQLite's ``length()`` reads a blob's size from its header)."""
        for mid, chunk, pos, size in self.db.execute("SELECT mid, chunk, pos, length(data) FROM fragments"):
            yield bytes(mid), chunk, pos, size

    def chunk_sizes(self) -> Iterator[tuple[bytes, int, int]]:
        for mid, chunk, size in self.db.execute("SELECT mid, chunk, length(data) FROM chunks"):
            yield bytes(mid), chunk, size

    def fragment(self, mid: bytes, chunk: int, pos: int) -> Optional[bytes]:
        row = self.db.execute("SELECT data FROM fragments WHERE mid = ? AND chunk = ? AND pos = ?",
                              (mid, chunk, pos)).fetchone()
        return None if row is None else bytes(row[0])

    def fragments_of_chunk(self, mid: bytes, chunk: int) -> list[tuple[int, bytes]]:
        rows = self.db.execute("SELECT pos, data FROM fragments WHERE mid = ? AND chunk = ? ORDER BY pos",
                               (mid, chunk))
        return [(pos, bytes(data)) for pos, data in rows]

    def chunks_of(self, mid: bytes) -> list[bytes]:
        """The decoded chunks of a message, in order."""
        return [bytes(data) for (data,) in
                self.db.execute("SELECT data FROM chunks WHERE mid = ? ORDER BY chunk", (mid,))]

    def status(self, mid: bytes) -> Optional[str]:
        row = self.db.execute("SELECT status FROM status WHERE mid = ?", (mid,)).fetchone()
        return None if row is None else str(row[0])

    def has_status_before(self, day: int) -> bool:
        return self.db.execute("SELECT 1 FROM status WHERE day < ? LIMIT 1", (day,)).fetchone() is not None

    def outbox(self) -> list[OutboxEntry]:
        rows = self.db.execute(
            "SELECT id, exit_type, address, compressed, queued_at, last_attempt FROM outbox ORDER BY id")
        return [OutboxEntry(i, t, bytes(a), bytes(c), q, last) for i, t, a, c, q, last in rows]

    def outbox_waiting(self) -> list[tuple[int, int, float, Optional[float]]]:
        """``(id, exit_type, queued_at, last_attempt)`` of each outbox entry,
        without the messages."""
        return list(self.db.execute("SELECT id, exit_type, queued_at, last_attempt FROM outbox ORDER BY id"))

    def outbox_entry(self, entry_id: int) -> Optional[OutboxEntry]:
        row = self.db.execute("SELECT id, exit_type, address, compressed, queued_at, last_attempt "
                              "FROM outbox WHERE id = ?", (entry_id,)).fetchone()
        if row is None:
            return None
        i, t, a, c, q, last = row
        return OutboxEntry(i, t, bytes(a), bytes(c), q, last)

    # -- changes (inside a transaction) ---------------------------------------------

    def save_message(self, mid: bytes, length: int, overhead: int, day: int) -> None:
        self.db.execute("INSERT OR IGNORE INTO messages (mid, length, overhead, day) VALUES (?, ?, ?, ?)",
                        (mid, length, overhead, day))

    def save_fragment(self, mid: bytes, chunk: int, pos: int, data: bytes) -> None:
        self.db.execute("INSERT OR REPLACE INTO fragments (mid, chunk, pos, data) VALUES (?, ?, ?, ?)",
                        (mid, chunk, pos, data))

    def save_chunk(self, mid: bytes, chunk: int, data: bytes) -> None:
        """A decoded chunk replaces its fragments."""
        self.db.execute("DELETE FROM fragments WHERE mid = ? AND chunk = ?", (mid, chunk))
        self.db.execute("INSERT OR REPLACE INTO chunks (mid, chunk, data) VALUES (?, ?, ?)", (mid, chunk, data))

    def delete_message(self, mid: bytes) -> None:
        for table in ("messages", "fragments", "chunks"):
            self.db.execute(f"DELETE FROM {table} WHERE mid = ?", (mid,))  # noqa: S608 - fixed names

    def set_status(self, mid: bytes, status: str, day: int) -> None:
        self.db.execute("INSERT OR REPLACE INTO status (mid, status, day) VALUES (?, ?, ?)", (mid, status, day))

    def delete_status(self, mid: bytes) -> None:
        self.db.execute("DELETE FROM status WHERE mid = ?", (mid,))

    def delete_status_before(self, day: int) -> int:
        """Forget the marks recorded before ``day``; how many."""
        return self.db.execute("DELETE FROM status WHERE day < ?", (day,)).rowcount

    def add_outbox(self, exit_type: int, address: bytes, compressed: bytes, queued_at: float) -> int:
        cur = self.db.execute(
            "INSERT INTO outbox (exit_type, address, compressed, queued_at) VALUES (?, ?, ?, ?)",
            (exit_type, address, compressed, queued_at))
        assert cur.lastrowid is not None
        return cur.lastrowid

    def delete_outbox(self, entry_id: int) -> None:
        self.db.execute("DELETE FROM outbox WHERE id = ?", (entry_id,))


# --- reassembly with the bodies on disk -----------------------------------------------------


@lru_cache(maxsize=256)
def params_for(length: int, overhead: int) -> FragmentParams:
    """Shared by every pending message of the same size."""
    return FragmentParams.for_message(length, overhead)


class PendingInfo:
    """What memory holds of one pending message: no fragment data.

    ``fragments`` is a bit set of the stored fragments' indices (bit
    ``chunk * n + pos``) of chunks not decoded yet, ``decoded`` a bit set of
    the decoded chunks, ``size`` the bytes of fragment and chunk data the
    message has on disk.
    """

    __slots__ = ("length", "overhead", "day", "fragments", "decoded", "size")

    def __init__(self, length: int, overhead: int, day: int) -> None:
        self.length = length
        self.overhead = overhead
        self.day = day
        self.fragments = 0
        self.decoded = 0
        self.size = 0

    @property
    def params(self) -> FragmentParams:
        return params_for(self.length, self.overhead)

    def stored_in(self, chunk: int) -> int:
        """Fragments stored of an undecoded chunk."""
        n = self.params.n
        return (self.fragments >> (chunk * n) & ((1 << n) - 1)).bit_count()


class DiskReassembler:
    """The rules of fragments.md §5.2 (as :class:`~mixminion.codec.fragments.Reassembler`
    applies them, on a server: no identity) over a :class:`FragmentStore`.

    Methods that change state must run inside the store's transaction; if
    it fails, the caller builds a new reassembler from the file
    (:meth:`load`), since memory may have run ahead of it.  ``pending`` is
    ordered by first arrival (oldest first), also after a restart.
    """

    def __init__(self, store: FragmentStore, max_length: Optional[int] = None) -> None:
        self.store = store
        self.max_length = max_length
        self.pending: OrderedDict[bytes, PendingInfo] = OrderedDict()
        #: bytes of fragment and chunk data of the pending messages
        self.pending_bytes = 0

    @classmethod
    def load(cls, store: FragmentStore, max_length: Optional[int] = None) -> "DiskReassembler":
        """The metadata of what the file holds, without reading one body."""
        r = cls(store, max_length)
        for mid, length, overhead, day in store.messages():
            r.pending[mid] = PendingInfo(length, overhead, day)
        for mid, chunk, pos, size in store.fragment_sizes():
            info = r.pending.get(mid)
            if info is not None:
                info.fragments |= 1 << (chunk * info.params.n + pos)
                info.size += size
        for mid, chunk, size in store.chunk_sizes():
            info = r.pending.get(mid)
            if info is not None:
                info.decoded |= 1 << chunk
                info.size += size
        r.pending_bytes = sum(info.size for info in r.pending.values())
        return r

    # -- feeding ------------------------------------------------------------------

    def add(self, fragment: FragmentPayload, day: int) -> AddResult:
        """Apply §5.2 to one checked fragment; on COMPLETED the message's
        rows are gone, its mark is set and the result carries the message."""
        mid = fragment.message_id
        info = self.pending.get(mid)
        if info is None:
            if self.store.status(mid) is not None:
                return AddResult(Outcome.DROPPED, mid)
            if self.max_length is not None and fragment.message_length > self.max_length:
                return self._reject(mid, day)
            info = PendingInfo(fragment.message_length, fragment.overhead, day)
            new = True
        elif (fragment.message_length, fragment.overhead) != (info.length, info.overhead):
            return self._reject(mid, day)
        else:
            new = False
        params = info.params
        chunk, pos = params.locate(fragment.index)
        if chunk >= params.chunks:
            return self._reject(mid, day)
        if info.decoded >> chunk & 1:
            return AddResult(Outcome.UNNEEDED, mid)
        bit = 1 << (chunk * params.n + pos)
        if info.fragments & bit:
            if self.store.fragment(mid, chunk, pos) != fragment.data:
                return self._reject(mid, day)
            return AddResult(Outcome.UNNEEDED, mid)
        if new:
            self.store.save_message(mid, info.length, info.overhead, info.day)
            self.pending[mid] = info
        self.store.save_fragment(mid, chunk, pos, fragment.data)
        info.fragments |= bit
        self._grow(info, len(fragment.data))
        if info.stored_in(chunk) >= params.k:
            stored = self.store.fragments_of_chunk(mid, chunk)
            data = b"".join(fec_decode(params.k, params.n, stored))
            self.store.save_chunk(mid, chunk, data)
            info.fragments &= ~(((1 << params.n) - 1) << (chunk * params.n))
            info.decoded |= 1 << chunk
            self._grow(info, len(data) - sum(len(d) for _, d in stored))
        if info.decoded.bit_count() < params.chunks:
            return AddResult(Outcome.STORED, mid)
        joined = b"".join(self.store.chunks_of(mid))
        self._drop(mid)
        self.store.set_status(mid, COMPLETED, day)
        return AddResult(Outcome.COMPLETED, mid, unwhiten(joined[: params.length]))

    def _grow(self, info: PendingInfo, by: int) -> None:
        info.size += by
        self.pending_bytes += by

    def _drop(self, mid: bytes) -> None:
        """Delete a pending message's rows and metadata (no mark)."""
        info = self.pending.pop(mid, None)
        if info is not None:
            self.pending_bytes -= info.size
        self.store.delete_message(mid)

    def _reject(self, mid: bytes, day: int) -> AddResult:
        self.reject(mid, day)
        return AddResult(Outcome.REJECTED, mid)

    # -- marks, expiry, bounds ----------------------------------------------------------

    def reject(self, mid: bytes, day: int) -> None:
        """Discard a message and drop its future fragments (also for a
        completed message the caller could not deliver)."""
        self._drop(mid)
        self.store.set_status(mid, REJECTED, day)

    def status_of(self, mid: bytes) -> Optional[str]:
        """``COMPLETED``, ``REJECTED``, ``"PENDING"`` or ``None`` (unknown)."""
        return PENDING if mid in self.pending else self.store.status(mid)

    def missing(self, mid: bytes) -> int:
        """How many more fragments a pending message needs at least."""
        info = self.pending[mid]
        params = info.params
        return sum(params.k - info.stored_in(c) for c in range(params.chunks) if not info.decoded >> c & 1)

    def has_older(self, before_day: int) -> bool:
        """Is a pending message's first fragment older than ``before_day``?"""
        return any(info.day < before_day for info in self.pending.values())

    def expire(self, before_day: int, today: int) -> int:
        """Reject pending messages whose first fragment came before
        ``before_day`` (marked at ``today``); how many."""
        old = [mid for mid, info in self.pending.items() if info.day < before_day]
        for mid in old:
            self.reject(mid, today)
        return len(old)

    def forget_status(self, before_day: int) -> int:
        """Forget marks recorded before ``before_day``; how many."""
        return self.store.delete_status_before(before_day)

    def evict(self, max_messages: int, max_bytes: int, keep: Optional[bytes] = None) -> int:
        """Forget the oldest pending messages (all their rows, no mark)
        until at most ``max_messages`` with at most ``max_bytes`` of data
        remain; never ``keep`` (the message that just grew).  How many."""
        evicted = 0
        while len(self.pending) > max_messages or self.pending_bytes > max_bytes:
            oldest: Optional[bytes] = None
            for mid in self.pending:  # an OrderedDict: the first two cost O(1)
                if mid != keep:
                    oldest = mid
                    break
            if oldest is None:
                break
            self._drop(oldest)
            evicted += 1
        return evicted
