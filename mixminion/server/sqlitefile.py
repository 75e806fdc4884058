"""A private, durable SQLite file: how the node's stores open theirs.

Mode 0600 on the database and on its WAL and shared-memory files (they
hold packets, or what a pinger knows); WAL with a full sync per commit so
that what a commit returned from survives a crash; ``secure_delete`` so
deleted rows are overwritten.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Optional


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
