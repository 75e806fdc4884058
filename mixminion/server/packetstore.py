"""A durable store of 32 KiB packets in SQLite, with group commit.

Each packet a peer hands us must reach stable storage before we
acknowledge it, and fsync costs far more than writing 32 KiB.  Packets that
arrive while a commit is running are gathered into the next transaction,
so one fsync covers a whole batch and throughput grows with load instead of
being capped at one packet per fsync.

SQLite in WAL mode with ``synchronous=FULL`` fsyncs the write-ahead log at
every commit.  ``secure_delete`` overwrites removed packets with zeros,
and checkpoints truncate the WAL, so removed packets do not linger.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from contextlib import contextmanager
from typing import Iterable, Iterator, Optional, Sequence

from mixminion.server.bodies import MAX_BODY, BodyFiles
from mixminion.sqlitefile import open_private_sqlite

_SCHEMA = """
CREATE TABLE IF NOT EXISTS packets (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    packet BLOB NOT NULL,
    meta BLOB,
    added REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS packets_queue ON packets (queue, id);
CREATE TABLE IF NOT EXISTS replay (
    key_digest BLOB NOT NULL,
    entry BLOB NOT NULL,
    PRIMARY KEY (key_digest, entry)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS kv (
    name TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
"""


#: SQLite page size of a new store, in bytes (measured with benchmarks/node.py:
#: about 8% less CPU per relayed packet than the default 4096; 32768 was worse)
PAGE_SIZE = 16384
#: each connection's page cache, in KiB (SQLite's default is 2,000).  The
#: node has a connection per thread that reads; the pages they would keep
#: are the packets table's, which grows with the pool, and the kernel's
#: page cache holds them anyway.
CACHE_KIB = 256
#: how long a writer waits for another process's transaction (SQLite's
#: default in Python is 5 s)
BUSY_TIMEOUT_MS = 60_000
#: the first and the longest pause between two tries at a transaction's
#: write lock, in seconds (see :meth:`PacketStore._begin`)
LOCK_RETRY_FIRST = 0.0002
LOCK_RETRY_MAX = 0.005


def _busy(exc: sqlite3.OperationalError) -> bool:
    """Another connection holds the lock (SQLITE_BUSY)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF == sqlite3.SQLITE_BUSY if code is not None else "locked" in str(exc)


class PacketStoreError(Exception):
    """The store could not do what was asked (disk full, I/O error...)."""


class PacketStore:
    """Packets by queue name, each with an integer id and optional metadata.

    Every method is blocking; the Twisted side calls them from a single
    worker thread (see :class:`mixminion.server.durable.DurableSink`).
    The object is thread-safe.
    """

    def __init__(self, path: str, body_dir: Optional[str] = None) -> None:
        self.path = path
        #: where packet bodies live when not in the table (see bodies.py)
        self._bodies = BodyFiles(body_dir) if body_dir else None
        #: ids whose bodies are zeroed once the deleting transaction commits
        self._to_zero: list[int] = []
        #: bodies written by the open transaction: zeroed if it rolls back
        self._written: list[int] = []
        self._lock = threading.RLock()
        self._tx_depth = 0
        #: the thread whose transaction is open (its reads must see its writes)
        self._tx_thread: Optional[int] = None
        #: per-thread read-only connections (see :meth:`get_many`)
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        try:
            # The page size applies to a new store only: a 32 KiB packet
            # spans 3 pages of 16 KiB instead of 9 of 4 KiB, so each write
            # or read of one costs a third of the system calls.
            self._db = open_private_sqlite(path, _SCHEMA, page_size=PAGE_SIZE)
            self._db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
            # The node and its processing children write in turn; one holds
            # the lock through its syncs, which a busy disk can make slow.
            self._db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        except (OSError, sqlite3.Error) as exc:
            raise PacketStoreError(f"cannot open packet store {path}: {exc}") from exc

    @contextmanager
    def transaction(self) -> Iterator["PacketStore"]:
        """Group several operations into one durable commit.

        Inside the ``with`` block every method of this store joins the
        transaction; it commits (one fsync) when the block ends and rolls
        back if it raises.  Other threads wait for the block to finish.
        """
        with self._lock:
            if self._tx_depth:
                self._tx_depth += 1
                try:
                    yield self
                finally:
                    self._tx_depth -= 1
                return
            try:
                self._begin()
            except sqlite3.Error as exc:
                raise PacketStoreError(f"cannot start a transaction: {exc}") from exc
            self._tx_depth = 1
            self._tx_thread = threading.get_ident()
            try:
                yield self
            except BaseException:
                self._tx_depth, self._tx_thread = 0, None
                self._to_zero.clear()
                try:
                    self._zero_unwritten()
                finally:
                    self._rollback()
                raise
            self._tx_depth, self._tx_thread = 0, None
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._to_zero.clear()
                # A COMMIT that failed in its sync may still come back from
                # the WAL: leave these bodies to the next start's sweep.
                self._written.clear()
                self._rollback()
                raise PacketStoreError(f"cannot commit: {exc}") from exc
            self._written.clear()
            if self._to_zero:
                ids, self._to_zero = self._to_zero, []
                self._zero_bodies(ids)

    def _begin(self) -> None:
        """BEGIN IMMEDIATE, waiting for another process's write lock.

        Not with SQLite's own busy handler: it sleeps 1, 2, 5, 10, 15, 20
        and 25 ms between tries, and the processing child commits a batch
        every few milliseconds, so a mix or an outgoing delete waiting for
        a lock held 2 ms slept 8-18 ms (issue 18's latency trace).  Here
        the pauses start at 0.2 ms and double up to 5 ms, for at most
        :data:`BUSY_TIMEOUT_MS` in all."""
        self._db.execute("PRAGMA busy_timeout=0")
        try:
            deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
            pause = LOCK_RETRY_FIRST
            while True:
                try:
                    self._db.execute("BEGIN IMMEDIATE")
                    return
                except sqlite3.OperationalError as exc:
                    if not _busy(exc) or time.monotonic() >= deadline:
                        raise
                time.sleep(pause)
                pause = min(2 * pause, LOCK_RETRY_MAX)
        finally:
            self._db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")

    def add_many(self, queue: str, packets: Sequence[bytes], now: float = 0.0,
                 meta: Optional[Sequence[Optional[bytes]]] = None) -> list[int]:
        """Store ``packets`` in one transaction; durable when this returns
        (or when the enclosing :meth:`transaction` commits)."""
        metas = list(meta) if meta is not None else [None] * len(packets)
        try:
            with self.transaction():
                cur = self._db.cursor()
                ids, outside = [], []
                for packet, m in zip(packets, metas):
                    # With a body directory, the row holds an empty blob and
                    # the body goes to its slot (synced before the commit).
                    external = self._bodies is not None and len(packet) <= MAX_BODY
                    cur.execute("INSERT INTO packets (queue, packet, meta, added) "
                                "VALUES (?, ?, ?, ?)", (queue, b"" if external else packet, m,
                                                        now))
                    ids.append(cur.lastrowid)
                    if external:
                        outside.append((cur.lastrowid, packet))
                if outside:
                    self._written.extend(i for i, _ in outside)  # before: a write may fail midway
                    self._bodies.write([i for i, _ in outside], [p for _, p in outside])
                return ids
        except sqlite3.Error as exc:
            raise PacketStoreError(f"cannot store packets: {exc}") from exc

    def replay_seen_or_add_many(self, key_digest: bytes, entries: Iterable[bytes]) -> list[bool]:
        """Test-and-set replay entries of one packet key; in order, so a
        repeated entry within the batch is seen the second time."""
        with self.transaction():
            cur = self._db.cursor()
            seen = []
            for entry in entries:
                cur.execute("INSERT OR IGNORE INTO replay (key_digest, entry) VALUES (?, ?)",
                            (key_digest, entry))
                seen.append(cur.rowcount == 0)
            return seen

    def replay_logs(self) -> list[bytes]:
        """The key digests that have replay entries (one index seek each)."""
        found: list[bytes] = []
        while True:
            row = self._query_one("SELECT key_digest FROM replay WHERE key_digest > ? "
                                  "ORDER BY key_digest LIMIT 1", (found[-1] if found else b"",))
            if row is None:
                return found
            found.append(bytes(row[0]))

    def forget_replay_log(self, key_digest: bytes) -> None:
        """Delete the replay entries of a retired packet key."""
        self._write_many("DELETE FROM replay WHERE key_digest = ?", [(key_digest,)])

    def meta(self, packet_id: int) -> Optional[bytes]:
        row = self._query_one("SELECT meta FROM packets WHERE id = ?", (packet_id,))
        if row is None:
            raise KeyError(packet_id)
        return None if row[0] is None else bytes(row[0])

    def items(self, queue: str, limit: int = -1,
              after: int = 0) -> list[tuple[int, Optional[bytes], float]]:
        """(id, meta, added) of the packets in ``queue`` above ``after``,
        oldest first, without the packets themselves (a pool may hold
        50,000); at most ``limit`` of them (all if negative), so a long
        queue can be read in slices."""
        return [(r[0], None if r[1] is None else bytes(r[1]), r[2]) for r in self._query(
            "SELECT id, meta, added FROM packets WHERE queue = ? AND id > ? ORDER BY id LIMIT ?",
            (queue, after, limit))]

    def set_value(self, name: str, value: bytes) -> None:
        self._write_many("INSERT OR REPLACE INTO kv (name, value) VALUES (?, ?)", [(name, value)])

    def values_named(self, prefix: str) -> dict[str, bytes]:
        """The kv values whose names start with ``prefix``."""
        return {name: bytes(value) for name, value in self._query(
            "SELECT name, value FROM kv WHERE substr(name, 1, ?) = ?", (len(prefix), prefix))}

    def delete_values(self, names: Sequence[str]) -> None:
        self._write_many("DELETE FROM kv WHERE name = ?", [(name,) for name in names])

    def get_value(self, name: str) -> Optional[bytes]:
        row = self._query_one("SELECT value FROM kv WHERE name = ?", (name,))
        return None if row is None else bytes(row[0])

    def add(self, queue: str, packet: bytes, now: float = 0.0, meta: Optional[bytes] = None) -> int:
        return self.add_many(queue, [packet], now, [meta])[0]

    def get(self, packet_id: int) -> bytes:
        row = self._query_one("SELECT packet FROM packets WHERE id = ?", (packet_id,))
        if row is None:
            raise KeyError(packet_id)
        return self._body(packet_id, row[0])

    def ids(self, queue: str, limit: int = -1, after: int = 0) -> list[int]:
        """Committed ids in ``queue`` above ``after``, oldest first; at most
        ``limit`` of them (all if negative), so a worker taking batches from
        a long queue does not read the whole queue for each batch.  Read
        like :meth:`get_many`, without waiting for the writers."""
        return [r[0] for r in self._query(
            "SELECT id FROM packets WHERE queue = ? AND id > ? ORDER BY id LIMIT ?",
            (queue, after, limit))]

    def get_many(self, ids: Sequence[int]) -> list[bytes]:
        """The committed packets with these ids, in that order, in one query.

        Read through this thread's own connection: WAL lets it read while
        another thread writes, so a worker reading its next batch does not
        wait for the shared connection's lock (and the writers behind it).
        """
        rows = dict(self._query(
            f"SELECT id, packet FROM packets WHERE id IN ({','.join('?' * len(ids))})",
            list(ids)))
        try:
            return [self._body(i, rows[i]) for i in ids]
        except KeyError as exc:
            raise KeyError(exc.args[0]) from None

    def iterate(self, queue: str) -> Iterator[tuple[int, bytes]]:
        """(id, packet) pairs of ``queue`` in arrival order."""
        for packet_id in self.ids(queue):
            try:
                yield packet_id, self.get(packet_id)
            except KeyError:
                continue

    def count(self, queue: Optional[str] = None) -> int:
        if queue is None:
            return self._query_one("SELECT COUNT(*) FROM packets", ())[0]
        return self._query_one("SELECT COUNT(*) FROM packets WHERE queue = ?", (queue,))[0]

    def move_many(self, ids: Iterable[int], queue: str) -> None:
        """Move packets to another queue in one durable transaction."""
        self._write_many("UPDATE packets SET queue = ? WHERE id = ?",
                         [(queue, i) for i in ids])

    def update_meta(self, packet_id: int, meta: Optional[bytes]) -> None:
        self._write_many("UPDATE packets SET meta = ? WHERE id = ?", [(meta, packet_id)])

    def remove_many(self, ids: Iterable[int]) -> None:
        """Delete packets (overwritten with zeros: in the table by
        ``secure_delete``, in their body slots once the deletion commits)."""
        ids = list(ids)
        if not ids:
            return
        with self.transaction():
            self._write_many("DELETE FROM packets WHERE id = ?", [(i,) for i in ids])
            if self._bodies is not None:
                self._to_zero.extend(ids)

    def remove_through(self, queue: str, last_id: int) -> None:
        """Delete every packet of ``queue`` whose id is at most ``last_id``."""
        with self.transaction():
            self.remove_many(r[0] for r in self._db.execute(
                "SELECT id FROM packets WHERE queue = ? AND id <= ?", (queue, last_id)))

    def sweep_bodies(self) -> int:
        """Start-up, before another process writes: zero body slots that
        have no row (see :meth:`BodyFiles.sweep`); how many held data."""
        if self._bodies is None:
            return 0
        with self._lock:
            return self._bodies.sweep(self._external_ids, self._allocated_through())

    # --- bodies outside the table -------------------------------------------------

    def _body(self, packet_id: int, stored: bytes) -> bytes:
        if self._bodies is not None and not stored:
            return self._bodies.read(packet_id)
        return bytes(stored)

    def _zero_unwritten(self) -> None:
        """Before a rollback: overwrite the bodies of the rows it undoes.
        Their ids will be handed out again, so only while the transaction
        still holds the write lock (no other writer, in this process or
        another, can have been given those ids yet); otherwise, or if it
        fails, the next start's sweep does it."""
        ids, self._written = self._written, []
        # SQLite rolls some failures (a full disk, I/O errors) back by
        # itself and drops the lock: then another writer may hold these ids.
        if ids and self._db.in_transaction:
            try:
                self._zero_bodies(ids)
            except (PacketStoreError, sqlite3.Error):
                pass

    def _zero_bodies(self, ids: list[int]) -> None:
        try:
            self._bodies.zero(ids, self._rows_between, self._allocated_through())
        except OSError as exc:
            # The rows are gone; the next start's sweep zeroes what is left.
            raise PacketStoreError(f"cannot overwrite removed packets: {exc}") from exc

    def _rows_between(self, first: int, last: int) -> bool:
        return self._db.execute("SELECT 1 FROM packets WHERE id BETWEEN ? AND ? LIMIT 1",
                                (first, last)).fetchone() is not None

    def _external_ids(self, first: int, last: int) -> set[int]:
        return {r[0] for r in self._db.execute(
            "SELECT id FROM packets WHERE id BETWEEN ? AND ? AND length(packet) = 0",
            (first, last))}

    def _allocated_through(self) -> int:
        row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'packets'").fetchone()
        return row[0] if row else 0

    def checkpoint(self) -> None:
        """Fold the WAL into the database and truncate it, so deleted
        packets do not survive in old WAL frames."""
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _query(self, sql: str, params: Sequence) -> list[tuple]:
        """Rows of a read.  Readers do not take the writers' lock: a WAL
        reader sees the last commit without waiting for the one under way
        (whose fsync may take milliseconds, far too long for the reactor
        thread).  A thread inside its own transaction reads through the
        writing connection instead, so it sees what it wrote."""
        if self._tx_thread == threading.get_ident():
            return self._db.execute(sql, params).fetchall()
        return self._reader().execute(sql, params).fetchall()

    def _query_one(self, sql: str, params: Sequence) -> Optional[tuple]:
        rows = self._query(sql, params)
        return rows[0] if rows else None

    def _reader(self) -> sqlite3.Connection:
        """This thread's read-only view of the committed store."""
        conn = getattr(self._local, "reader", None)
        if conn is None:
            if self._db is None:
                raise PacketStoreError("the packet store is closed")
            try:
                conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
                conn.execute("PRAGMA query_only=ON")
                conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
            except sqlite3.Error as exc:
                raise PacketStoreError(f"cannot open packet store {self.path}: {exc}") from exc
            self._local.reader = conn
            with self._lock:
                self._readers.append(conn)
        return conn

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None  # type: ignore[assignment]
            for conn in self._readers:
                conn.close()
            self._readers.clear()
            if self._bodies is not None:
                self._bodies.close()

    def _write_many(self, sql: str, rows: list[tuple]) -> None:
        if not rows:
            return
        try:
            with self.transaction():
                self._db.executemany(sql, rows)
        except sqlite3.Error as exc:
            raise PacketStoreError(str(exc)) from exc

    def _rollback(self) -> None:
        try:
            self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass
