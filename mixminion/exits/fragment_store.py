"""Durable state of the FRAGMENT module: an SQLite file in its directory.

Tables mirror :class:`~mixminion.codec.fragments.Reassembler` state
(pending messages, their fragments and decoded chunks, the COMPLETED /
REJECTED marks) plus an *outbox* of reassembled messages not yet accepted
by the module of their real exit type.  Every change is one transaction,
committed with ``synchronous=FULL`` (fsync) before the module reports the
fragment handled, so a crash or restart loses nothing it acknowledged.
"""

from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

from mixminion.codec.fragments import PendingMessage, Reassembler

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
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY, exit_type INTEGER NOT NULL, address BLOB NOT NULL,
    compressed BLOB NOT NULL, queued_at REAL NOT NULL, last_attempt REAL);
"""


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

    # -- loading -------------------------------------------------------------------

    def load(self, max_length: Optional[int] = None) -> Reassembler:
        """The reassembler as last committed (through its ``restore``)."""
        pending: dict[bytes, dict] = {}
        for mid, length, overhead, day in self.db.execute("SELECT mid, length, overhead, day FROM messages"):
            pending[bytes(mid)] = {"length": length, "overhead": overhead, "nym": None, "day": day,
                                   "fragments": {}, "chunks": {}}
        for mid, chunk, pos, data in self.db.execute("SELECT mid, chunk, pos, data FROM fragments"):
            if bytes(mid) in pending:
                pending[bytes(mid)]["fragments"].setdefault(chunk, {})[pos] = bytes(data)
        for mid, chunk, data in self.db.execute("SELECT mid, chunk, data FROM chunks"):
            if bytes(mid) in pending:
                pending[bytes(mid)]["chunks"][chunk] = bytes(data)
        status = {bytes(mid): [st, day] for mid, st, day in self.db.execute("SELECT mid, status, day FROM status")}
        return Reassembler.restore({"max_length": max_length, "status": status, "pending": pending})

    def outbox(self) -> list[OutboxEntry]:
        rows = self.db.execute(
            "SELECT id, exit_type, address, compressed, queued_at, last_attempt FROM outbox ORDER BY id")
        return [OutboxEntry(i, t, bytes(a), bytes(c), q, last) for i, t, a, c, q, last in rows]

    # -- changes (inside a transaction) ---------------------------------------------

    def save_message(self, mid: bytes, state: PendingMessage) -> None:
        self.db.execute("INSERT OR IGNORE INTO messages (mid, length, overhead, day) VALUES (?, ?, ?, ?)",
                        (mid, state.length, state.overhead, state.day))

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

    def add_outbox(self, exit_type: int, address: bytes, compressed: bytes, queued_at: float) -> int:
        cur = self.db.execute(
            "INSERT INTO outbox (exit_type, address, compressed, queued_at) VALUES (?, ?, ?, ?)",
            (exit_type, address, compressed, queued_at))
        assert cur.lastrowid is not None
        return cur.lastrowid

    def mark_attempt(self, entry_id: int, when: float) -> None:
        self.db.execute("UPDATE outbox SET last_attempt = ? WHERE id = ?", (when, entry_id))

    def delete_outbox(self, entry_id: int) -> None:
        self.db.execute("DELETE FROM outbox WHERE id = ?", (entry_id,))
