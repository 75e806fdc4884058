"""A durable replay log in SQLite (spec: packet.md §10, server.md §7, §17).

One log per packet key.  It must never forget an entry it has reported as
new: a server that crashed and lost entries would let an attacker replay
packets through it.  SQLite in WAL mode with ``synchronous=FULL`` fsyncs the
write-ahead log at every commit, so an entry is on stable storage as soon as
the commit that recorded it returns; no separate journal or sync step is
needed.  The log is labelled with ``H(DER(packet public key))`` so that a log
paired with the wrong key is refused instead of silently starting empty.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from typing import Iterable, Optional, Union

from mixminion.codec.replay import ENTRY_LEN, ReplayLog, check_entry
from mixminion.codec.rsa import PublicKey
from mixminion.fileutil import fsync_dir

PathLike = Union[str, "os.PathLike[str]"]

#: the key of the label row; entries are 20 bytes, so it cannot collide
LABEL_KEY = b"KEYID"
_TABLE = "replay_log"
_FILE_MODE = 0o600


class ReplayLogError(Exception):
    """The replay log cannot be used (unreadable file, closed log...)."""


class ReplayLogKeyMismatch(ReplayLogError):
    """The log on disk belongs to another packet key."""


class SQLiteReplayLog(ReplayLog):
    """A replay log in one SQLite file (plus its ``-wal``/``-shm`` files),
    readable by its owner only.

    Durability: :meth:`seen_or_add` returns ``False`` only after the
    transaction that recorded the entry has committed, and with WAL and
    ``synchronous=FULL`` a commit fsyncs the write-ahead log first.  An entry
    reported as new therefore survives a crash of the process or of the
    machine (as far as the storage honours fsync).  :meth:`seen_or_add_many`
    records a whole batch in one transaction: all of it is durable when the
    call returns, none of it if the call raises (then no packet of the batch
    may be forwarded).  The object is safe to share between threads.
    """

    def __init__(self, path: PathLike, key_digest: bytes) -> None:
        if not isinstance(key_digest, bytes) or len(key_digest) != 20:
            raise ValueError("key_digest is the 20-byte H(DER(packet public key))")
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        _create_private(self.path)
        try:
            self._conn: Optional[sqlite3.Connection] = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise ReplayLogError(f"cannot open replay log {self.path}: {exc}") from exc
        try:
            self._configure()
            self._check_label(key_digest)
        except BaseException:
            self._conn.close()
            self._conn = None
            raise

    @classmethod
    def for_key(cls, path: PathLike, packet_key: PublicKey) -> "SQLiteReplayLog":
        """The log of ``packet_key``, labelled with its key ID."""
        return cls(path, packet_key.keyid)

    # --- opening -----------------------------------------------------------

    def _configure(self) -> None:
        conn = self._connection()
        try:
            (mode,) = conn.execute("PRAGMA journal_mode=WAL").fetchone()
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute(f"CREATE TABLE IF NOT EXISTS {_TABLE} "
                         "(k BLOB PRIMARY KEY, v BLOB) WITHOUT ROWID")
        except sqlite3.Error as exc:
            raise ReplayLogError(f"{self.path} is not a usable replay log: {exc}") from exc
        if str(mode).lower() != "wal":
            raise ReplayLogError(f"{self.path}: SQLite refused WAL mode ({mode})")

    def _check_label(self, key_digest: bytes) -> None:
        """Label a new log; refuse one labelled with another key."""
        conn = self._connection()
        try:
            conn.execute("BEGIN IMMEDIATE")
            self._label_in_transaction(conn, key_digest)
        except sqlite3.Error as exc:
            raise ReplayLogError(f"{self.path}: cannot read the key label: {exc}") from exc

    def _label_in_transaction(self, conn: sqlite3.Connection, key_digest: bytes) -> None:
        """Inside BEGIN: write the label, or compare it; commit or roll back."""
        try:
            row = conn.execute(f"SELECT v FROM {_TABLE} WHERE k = ?", (LABEL_KEY,)).fetchone()
            if row is None:
                if conn.execute(f"SELECT 1 FROM {_TABLE} LIMIT 1").fetchone() is not None:
                    raise ReplayLogError(f"{self.path}: replay log has entries but no key label")
                conn.execute(f"INSERT INTO {_TABLE} (k, v) VALUES (?, ?)", (LABEL_KEY, key_digest))
            elif row[0] != key_digest:
                found = row[0].hex() if isinstance(row[0], bytes) else repr(row[0])
                raise ReplayLogKeyMismatch(
                    f"{self.path} is the replay log of packet key {found}, "
                    f"not of {key_digest.hex()}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    # --- the ReplayLog interface ------------------------------------------

    def seen_or_add(self, entry: bytes) -> bool:
        check_entry(entry)
        with self._lock:
            conn = self._connection()
            try:
                # In autocommit mode the statement is its own transaction:
                # committed (and the WAL fsynced) when execute returns.
                cursor = conn.execute(
                    f"INSERT OR IGNORE INTO {_TABLE} (k) VALUES (?)", (entry,))
            except sqlite3.Error as exc:
                raise ReplayLogError(f"{self.path}: cannot record entry: {exc}") from exc
            return cursor.rowcount == 0

    def seen_or_add_many(self, entries: Iterable[bytes]) -> list[bool]:
        """One flag per entry, in order, from a single committed transaction
        (an entry repeated within the batch is seen the second time)."""
        batch = list(entries)
        for entry in batch:
            check_entry(entry)
        if not batch:
            return []
        with self._lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    seen = [conn.execute(f"INSERT OR IGNORE INTO {_TABLE} (k) VALUES (?)",
                                         (entry,)).rowcount == 0 for entry in batch]
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise ReplayLogError(f"{self.path}: cannot record entries: {exc}") from exc
            return seen

    def close(self) -> None:
        """Checkpoint the WAL into the database and close; idempotent."""
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is None:
                return
            try:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass  # the WAL stays and is replayed at the next open
            finally:
                conn.close()

    # --- inspection ----------------------------------------------------------

    def __contains__(self, entry: object) -> bool:
        if not isinstance(entry, bytes) or len(entry) != ENTRY_LEN:
            return False
        with self._lock:
            row = self._connection().execute(
                f"SELECT 1 FROM {_TABLE} WHERE k = ?", (entry,)).fetchone()
        return row is not None

    def __len__(self) -> int:
        with self._lock:
            (count,) = self._connection().execute(
                f"SELECT COUNT(*) FROM {_TABLE} WHERE k != ?", (LABEL_KEY,)).fetchone()
        return int(count)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise ReplayLogError(f"replay log {self.path} is closed")
        return self._conn


def _create_private(path: str) -> None:
    """Make sure ``path`` exists with mode 0600 before SQLite opens it (its
    ``-wal`` and ``-shm`` files copy the database file's mode), and make a
    new file's directory entry durable."""
    try:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, _FILE_MODE)
            created = True
        except FileExistsError:
            fd = os.open(path, os.O_RDWR)
            created = False
        try:
            os.fchmod(fd, _FILE_MODE)
            if created:
                os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise ReplayLogError(f"cannot open replay log {path}: {exc}") from exc
    if created:
        fsync_dir(os.path.dirname(os.path.abspath(path)))
