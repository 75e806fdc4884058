"""The durable record of pings: ``WorkDir/pings.db`` (doc/reliability.md §1).

One SQLite file, opened like the packet store: WAL with
``synchronous=FULL`` (every write is its own transaction, synced before
the method returns), ``secure_delete`` so pruned paths do not linger, and
mode 0600 for the file and its WAL.  A ping is recorded before it is sent
and its return when it arrives: a "returned" mark lost in a crash would
count a ping that came back as lost and blame its path.  Pings are few
(one every few minutes), so the fsyncs cost nothing worth batching.

Times are whatever clock the caller passes (the node's elapsed clock);
nothing here reads one.

**Pings.**  ``record_sent`` stores the handle, the path ``X, S, Y`` (the
pinger itself, the last hop of every ping, is left out: it is not
measured) and the time.  ``mark_returned`` settles it as returned;
``expire`` settles as lost every ping not back after the timeout.  A
return with an unknown handle, or for a ping already settled (a duplicate,
or one that came back after it was counted lost), changes nothing and
answers False for the caller to report.

**First-hop failures** (connect, TLS, REJECTED) go to a table of their
own, against ``X`` alone, without a handle: the packet never reached ``S``
or ``Y``, so they learn nothing of them.  :meth:`PingStore.outcomes` gives
each as a lost one-hop ping ``(X,)``, which the inference lays on ``X``
only, and which counts in ``X``'s ``sent``.  Such a failure does not
settle the ping: a packet that is retried and comes back still counts as
returned; one that never does is lost through ``X, S, Y`` as well, and the
fixed point lays that loss mostly on ``X`` too, since its other results
explain it.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from typing import Optional, Sequence

from mixminion.mmtp.initiator import LINK_CONNECT, LINK_REJECTED, LINK_TLS
from mixminion.server.pinging.handles import HANDLE_LEN
from mixminion.server.pinging.inference import PingOutcome
from mixminion.sqlitefile import SQLiteStore

#: the file's name in the work directory
PINGS_DB = "pings.db"

#: first-hop failures a node records against ``X`` (how the MMTP client
#: names them: :func:`mixminion.mmtp.initiator.link_failure`)
LINK_FAILURES = frozenset({LINK_CONNECT, LINK_TLS, LINK_REJECTED})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pings (
    handle BLOB PRIMARY KEY,
    x TEXT NOT NULL,
    s TEXT NOT NULL,
    y TEXT NOT NULL,
    sent_at REAL NOT NULL,
    returned_at REAL,
    lost_at REAL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS pings_sent ON pings (sent_at);
CREATE TABLE IF NOT EXISTS link_failures (
    id INTEGER PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    at REAL NOT NULL,
    reason TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS link_failures_at ON link_failures (at);
"""


class PingStoreError(Exception):
    """The store could not do what was asked (disk full, I/O error...)."""


@dataclass(frozen=True)
class PingRecord:
    """One ping as stored; at most one of ``returned_at``, ``lost_at`` is set."""

    handle: bytes
    path: tuple[str, str, str]
    sent_at: float
    returned_at: Optional[float]
    lost_at: Optional[float]


class PingStore(SQLiteStore):
    """Pings by handle and first-hop failures.  Blocking and thread-safe:
    the node may call it from the reactor or from one worker thread."""

    error = PingStoreError
    label = "the ping store"

    def __init__(self, path: str) -> None:
        super().__init__(path, _SCHEMA)

    @classmethod
    def in_work_dir(cls, work_dir: str) -> "PingStore":
        return cls(os.path.join(work_dir, PINGS_DB))

    # --- pings ------------------------------------------------------------------

    def record_sent(self, handle: bytes, path: Sequence[str], sent_at: float) -> None:
        """A ping with this handle leaves over ``path`` (``X, S, Y``)."""
        if len(handle) != HANDLE_LEN:
            raise ValueError(f"a ping handle is {HANDLE_LEN} bytes, not {len(handle)}")
        if len(path) != 3:
            raise ValueError(f"a ping path is X, S, Y, not {len(path)} servers")
        try:
            self._execute("INSERT INTO pings (handle, x, s, y, sent_at) VALUES (?, ?, ?, ?, ?)",
                          (bytes(handle), *path, sent_at))
        except sqlite3.IntegrityError as exc:
            raise ValueError("this handle was already used") from exc

    def lookup(self, handle: bytes) -> Optional[PingRecord]:
        """The ping a handle stands for, or None: the only link between a
        delivered PING and the path it took."""
        rows = self._query("SELECT handle, x, s, y, sent_at, returned_at, lost_at FROM pings "
                           "WHERE handle = ?", (bytes(handle),))
        if not rows:
            return None
        h, x, s, y, sent_at, returned_at, lost_at = rows[0]
        return PingRecord(bytes(h), (x, s, y), sent_at, returned_at, lost_at)

    def mark_returned(self, handle: bytes, at: float) -> bool:
        """The ping came back at ``at``.  False (nothing changed) for an
        unknown handle or a ping already settled: the caller reports it."""
        return self._execute("UPDATE pings SET returned_at = ? WHERE handle = ? "
                           "AND returned_at IS NULL AND lost_at IS NULL", (at, bytes(handle))) == 1

    def expire(self, now: float, timeout: float) -> int:
        """Settle as lost every ping not back ``timeout`` seconds after it
        left; how many."""
        return self._execute("UPDATE pings SET lost_at = ? WHERE returned_at IS NULL "
                           "AND lost_at IS NULL AND sent_at <= ?", (now, now - timeout))

    def measured_counts(self, since: float) -> dict[str, int]:
        """How many pings measured each server (as ``S``) since ``since``,
        settled or not: what :func:`.paths.choose_path` rotates by."""
        rows = self._query("SELECT s, COUNT(*) FROM pings WHERE sent_at >= ? GROUP BY s",
                           (since,))
        return {s: n for s, n in rows}

    # --- first-hop failures ----------------------------------------------------

    def record_link_failure(self, fingerprint: str, at: float, reason: str) -> None:
        """The first hop ``fingerprint`` could not be handed a ping (one of
        :data:`LINK_FAILURES`)."""
        if reason not in LINK_FAILURES:
            raise ValueError(f"unknown first-hop failure {reason!r}")
        self._execute("INSERT INTO link_failures (fingerprint, at, reason) VALUES (?, ?, ?)",
                    (fingerprint, at, reason))

    # --- reading and forgetting ------------------------------------------------

    def outcomes(self, since: float) -> list[PingOutcome]:
        """Settled pings sent since ``since``, then first-hop failures since
        then (as lost pings through ``X`` alone): the inference's input."""
        pings = self._query(
            "SELECT x, s, y, sent_at, returned_at FROM pings WHERE sent_at >= ? "
            "AND (returned_at IS NOT NULL OR lost_at IS NOT NULL) ORDER BY sent_at, handle",
            (since,))
        links = self._query("SELECT fingerprint FROM link_failures WHERE at >= ? "
                            "ORDER BY at, id", (since,))
        return ([PingOutcome((x, s, y), back is not None,
                             None if back is None else max(0.0, back - sent))
                 for x, s, y, sent, back in pings]
                + [PingOutcome((fp,), False) for (fp,) in links])

    def prune(self, before: float) -> int:
        """Forget pings sent and failures seen before ``before``, settled or
        not (a ping that old is past any window); how many rows went."""
        with self.transaction():
            return (self._execute("DELETE FROM pings WHERE sent_at < ?", (before,))
                    + self._execute("DELETE FROM link_failures WHERE at < ?", (before,)))
