"""The nymserver's durable state: ``BaseDir/deliver/NYM/nyms.db`` (doc/nym.md).

One private SQLite file (:func:`mixminion.sqlitefile.open_private_sqlite`:
mode 0600, WAL, a full sync per commit, deleted rows overwritten).  What
a request changes, and the counter that makes it new, are written in one
transaction (:meth:`NymStore.transaction`), so a request is done once or
not at all.

* ``nyms``: name, the owner's Ed25519 public key, the last counter
  accepted, the policy, when it was created.
* ``reply_blocks``: the nym's reply blocks (packed) and when each expires.
* ``outbox``: messages for the owner (answers and mails) waiting for reply
  blocks; answers go before mails, then oldest first.
* ``mail_out``: mail a nym sends, until the MTA took it.
* ``usage``: how many mails a nym sent today and received this hour (the
  rate limits of doc/nym.md §4).

Blocking and thread-safe (one lock): the module calls it from one worker
thread; tests call it directly.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from typing import Optional, Sequence

from mixminion.nym.formats import Kind, Policy
from mixminion.sqlitefile import SQLiteStore

NYMS_DB = "nyms.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS nyms (
    name TEXT PRIMARY KEY,
    key BLOB NOT NULL,
    counter INTEGER NOT NULL,
    policy TEXT NOT NULL,
    created REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS reply_blocks (
    id INTEGER PRIMARY KEY,
    nym TEXT NOT NULL,
    block BLOB NOT NULL,
    expires INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS reply_blocks_nym ON reply_blocks (nym, expires);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    nym TEXT NOT NULL,
    kind TEXT NOT NULL,
    body BLOB NOT NULL,
    queued_at REAL NOT NULL,
    counter INTEGER,
    ok INTEGER NOT NULL DEFAULT 1,
    reason TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS outbox_nym ON outbox (nym, id);
CREATE TABLE IF NOT EXISTS mail_out (
    id INTEGER PRIMARY KEY,
    nym TEXT NOT NULL,
    recipient TEXT NOT NULL,
    text BLOB NOT NULL,
    queued_at REAL NOT NULL,
    next_attempt REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS usage (
    nym TEXT NOT NULL,
    what TEXT NOT NULL,
    period INTEGER NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (nym, what, period)
) WITHOUT ROWID;
"""

#: usage kinds
SENT = "sent"
RECEIVED = "received"


class NymStoreError(Exception):
    """The store could not do what was asked (disk full, I/O error...)."""


class NameTaken(Exception):
    """``create`` for a name that exists."""


@dataclass(frozen=True)
class NymRecord:
    name: str
    key: bytes
    counter: int
    policy: Policy
    created: float


@dataclass(frozen=True)
class Queued:
    """A message for the owner waiting for reply blocks: a mail, or the
    answer to request ``counter`` (done or not, and why)."""

    id: int
    nym: str
    kind: Kind
    body: bytes
    queued_at: float
    counter: Optional[int] = None
    ok: bool = True
    reason: str = ""


@dataclass(frozen=True)
class MailOut:
    """A mail a nym sends, to one recipient, until the MTA takes it."""

    id: int
    nym: str
    recipient: str
    text: bytes
    attempts: int
    queued_at: float


class NymStore(SQLiteStore):
    """See the module docstring.  A method of one statement commits it on
    its own; one of several runs them in a transaction of its own; either
    joins the caller's (:meth:`transaction`)."""

    error = NymStoreError
    label = "the nym store"

    def __init__(self, path: str) -> None:
        super().__init__(path, _SCHEMA)

    @classmethod
    def in_dir(cls, folder: str) -> "NymStore":
        return cls(os.path.join(folder, NYMS_DB))

    # --- nyms ---------------------------------------------------------------------------

    def get(self, name: str) -> Optional[NymRecord]:
        rows = self._query("SELECT name, key, counter, policy, created FROM nyms WHERE name = ?",
                           (name,))
        if not rows:
            return None
        name, key, counter, policy, created = rows[0]
        return NymRecord(name, bytes(key), counter, Policy(policy), created)

    def names(self) -> list[str]:
        return [n for (n,) in self._query("SELECT name FROM nyms ORDER BY name", ())]

    def count(self) -> int:
        return self._query("SELECT COUNT(*) FROM nyms", ())[0][0]

    def create(self, name: str, key: bytes, counter: int, policy: Policy, now: float) -> None:
        """A new nym (NameTaken if the name exists)."""
        try:
            self._execute("INSERT INTO nyms (name, key, counter, policy, created) "
                          "VALUES (?, ?, ?, ?, ?)", (name, key, counter, policy.value, now))
        except sqlite3.IntegrityError:
            raise NameTaken(name) from None

    def use_counter(self, name: str, counter: int) -> bool:
        """Record ``counter`` as the nym's last if it is larger than the
        last; False (nothing changed) if not, or if there is no such nym."""
        return self._execute("UPDATE nyms SET counter = ? WHERE name = ? AND counter < ?",
                             (counter, name, counter)) == 1

    def set_policy(self, name: str, policy: Policy) -> None:
        self._execute("UPDATE nyms SET policy = ? WHERE name = ?", (policy.value, name))

    def delete(self, name: str) -> None:
        """The nym and everything it holds (its reply blocks, its waiting
        messages and mail)."""
        with self.transaction():
            for table, column in (("nyms", "name"), ("reply_blocks", "nym"), ("outbox", "nym"),
                                  ("mail_out", "nym"), ("usage", "nym")):
                self._execute(f"DELETE FROM {table} WHERE {column} = ?", (name,))

    # --- reply blocks ---------------------------------------------------------------------

    def add_reply_blocks(self, name: str, blocks: Sequence[tuple[bytes, int]], keep: int) -> int:
        """Add ``(packed, expires)`` blocks; keep at most ``keep`` per nym,
        those that expire last.  How many the nym holds now."""
        with self.transaction():
            for packed, expires in blocks:
                self._execute("INSERT INTO reply_blocks (nym, block, expires) VALUES (?, ?, ?)",
                              (name, packed, expires))
            self._execute("DELETE FROM reply_blocks WHERE nym = ? AND id NOT IN (SELECT id FROM "
                          "reply_blocks WHERE nym = ? ORDER BY expires DESC, id DESC LIMIT ?)",
                          (name, name, keep))
            return self._query("SELECT COUNT(*) FROM reply_blocks WHERE nym = ?", (name,))[0][0]

    def reply_blocks(self, name: str, usable_after: int) -> list[tuple[int, bytes]]:
        """``(id, packed)`` of the nym's blocks that expire after
        ``usable_after``, soonest to expire first (the one that would be
        wasted first is used first)."""
        return [(i, bytes(b)) for i, b in self._query(
            "SELECT id, block FROM reply_blocks WHERE nym = ? AND expires > ? "
            "ORDER BY expires, id", (name, usable_after))]

    def count_reply_blocks(self, name: str, usable_after: int) -> int:
        return self._query("SELECT COUNT(*) FROM reply_blocks WHERE nym = ? AND expires > ?",
                           (name, usable_after))[0][0]

    def forget_expired(self, usable_after: int) -> int:
        """Remove every block that expires at or before ``usable_after``."""
        return self._execute("DELETE FROM reply_blocks WHERE expires <= ?", (usable_after,))

    # --- messages for the owner -------------------------------------------------------------

    def queue_mail(self, name: str, body: bytes, now: float) -> None:
        self._execute("INSERT INTO outbox (nym, kind, body, queued_at) VALUES (?, ?, ?, ?)",
                      (name, Kind.MAIL.value, body, now))

    def queue_answer(self, name: str, counter: int, ok: bool, reason: str, body: bytes,
                     now: float) -> None:
        self._execute("INSERT INTO outbox (nym, kind, body, queued_at, counter, ok, reason) "
                      "VALUES (?, ?, ?, ?, ?, ?, ?)",
                      (name, Kind.ANSWER.value, body, now, counter, int(ok), reason))

    def waiting(self, name: str) -> list[Queued]:
        """The nym's messages in the order they go: answers, then mails,
        oldest first."""
        rows = self._query("SELECT id, nym, kind, body, queued_at, counter, ok, reason FROM outbox "
                           "WHERE nym = ? ORDER BY kind = 'mail', id", (name,))
        return [Queued(i, n, Kind(k), bytes(b), q, c, bool(ok), r)
                for i, n, k, b, q, c, ok, r in rows]

    def nyms_waiting(self) -> list[str]:
        return [n for (n,) in self._query("SELECT DISTINCT nym FROM outbox ORDER BY nym", ())]

    def mails_waiting(self, name: str) -> tuple[int, int]:
        """(mails, bytes) the nym has waiting."""
        count, size = self._query("SELECT COUNT(*), COALESCE(SUM(LENGTH(body)), 0) FROM outbox "
                                  "WHERE nym = ? AND kind = 'mail'", (name,))[0]
        return count, size

    def sent_to_owner(self, message_id: int, block_ids: Sequence[int]) -> None:
        """A message went out through these reply blocks: both are gone."""
        with self.transaction():
            self._execute("DELETE FROM outbox WHERE id = ?", (message_id,))
            for block_id in block_ids:
                self._execute("DELETE FROM reply_blocks WHERE id = ?", (block_id,))

    # --- mail a nym sends -----------------------------------------------------------------------

    def add_mail_out(self, name: str, recipients: Sequence[str], text: bytes, now: float) -> None:
        with self.transaction():
            for recipient in recipients:
                self._execute("INSERT INTO mail_out (nym, recipient, text, queued_at, "
                              "next_attempt) VALUES (?, ?, ?, ?, ?)",
                              (name, recipient, text, now, now))

    def mail_out_due(self, now: float, limit: int = 64) -> list[MailOut]:
        rows = self._query("SELECT id, nym, recipient, text, attempts, queued_at FROM mail_out "
                           "WHERE next_attempt <= ? ORDER BY next_attempt, id LIMIT ?",
                           (now, limit))
        return [MailOut(i, n, r, bytes(t), a, q) for i, n, r, t, a, q in rows]

    def mail_out_done(self, mail_id: int) -> None:
        self._execute("DELETE FROM mail_out WHERE id = ?", (mail_id,))

    def mail_out_later(self, mail_id: int, next_attempt: float) -> None:
        self._execute("UPDATE mail_out SET attempts = attempts + 1, next_attempt = ? "
                      "WHERE id = ?", (next_attempt, mail_id))

    # --- rate limits --------------------------------------------------------------------------

    def usage(self, name: str, what: str, period: int) -> int:
        rows = self._query("SELECT count FROM usage WHERE nym = ? AND what = ? AND period = ?",
                           (name, what, period))
        return rows[0][0] if rows else 0

    def use(self, name: str, what: str, period: int, n: int = 1) -> None:
        """Count ``n`` more in ``period``; earlier periods are forgotten."""
        with self.transaction():
            self._execute("DELETE FROM usage WHERE nym = ? AND what = ? AND period < ?",
                          (name, what, period))
            self._execute("INSERT INTO usage (nym, what, period, count) VALUES (?, ?, ?, ?) "
                          "ON CONFLICT (nym, what, period) DO UPDATE SET count = count + ?",
                          (name, what, period, n, n))
