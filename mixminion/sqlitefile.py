"""A private, durable SQLite file: how the node's stores open theirs.

Mode 0600 on the database and on its WAL and shared-memory files (they
hold packets, or what a pinger knows); WAL with a full sync per commit so
that what a commit returned from survives a crash; ``secure_delete`` so
deleted rows are overwritten.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from contextlib import contextmanager
from typing import Iterator, Optional


def open_private_sqlite(path: str, schema: str, page_size: Optional[int] = None
                        ) -> sqlite3.Connection:
    """Open (creating, 0600) ``path`` in autocommit mode for any thread and
    apply ``schema``; raises ``sqlite3.Error``.  ``page_size`` applies to a
    new file only."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)
    os.chmod(path, 0o600)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        if page_size is not None:
            db.execute(f"PRAGMA page_size={page_size}")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA secure_delete=ON")
        db.executescript(schema)
    except sqlite3.Error:
        db.close()
        raise
    for suffix in ("-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.chmod(path + suffix, 0o600)
    return db


class SQLiteStore:
    """A store on one private SQLite file, blocking and thread-safe (one
    re-entrant lock): what the ping store and the nym store share.

    Every failure of the file is raised as :attr:`error`, with a message
    that names the store (:attr:`label`); a constraint a write breaks
    (``sqlite3.IntegrityError``) is raised as it is, for the caller to
    tell apart.  A statement outside :meth:`transaction` is committed on
    its own."""

    error: type[Exception] = OSError
    label = "the store"

    def __init__(self, path: str, schema: str) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._depth = 0
        try:
            self._db: Optional[sqlite3.Connection] = open_private_sqlite(path, schema)
        except (OSError, sqlite3.Error) as exc:
            raise self.error(f"cannot open {self.label} {path}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Everything inside is committed together, or not at all (a
        transaction inside another joins it)."""
        with self._lock:
            db = self._open()
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise self.error(f"cannot write {self.label}: {exc}") from exc
            self._depth = 1
            try:
                yield
                db.execute("COMMIT")
            except BaseException as exc:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error) and not isinstance(exc, sqlite3.IntegrityError):
                    raise self.error(f"cannot write {self.label}: {exc}") from exc
                raise
            finally:
                self._depth = 0

    def _open(self) -> sqlite3.Connection:
        if self._db is None:
            raise self.error(f"{self.label} is closed")
        return self._db

    def _query(self, sql: str, params: tuple) -> list[tuple]:
        with self._lock:
            try:
                return self._open().execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise self.error(f"cannot read {self.label}: {exc}") from exc

    def _execute(self, sql: str, params: tuple) -> int:
        """One statement (its own transaction unless inside one); the rows
        it changed."""
        with self._lock:
            try:
                return self._open().execute(sql, params).rowcount
            except sqlite3.IntegrityError:
                raise
            except sqlite3.Error as exc:
                raise self.error(f"cannot write {self.label}: {exc}") from exc
