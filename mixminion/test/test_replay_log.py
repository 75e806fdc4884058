"""Tests of the replay logs: the in-memory one and the durable SQLite one
(real files in ``mktemp`` directories)."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import threading

from twisted.trial import unittest

from mixminion.codec import crypto
from mixminion.codec.replay import MemoryReplayLog, ReplayLog
from mixminion.server.replay_log import (
    ReplayLogError,
    ReplayLogKeyMismatch,
    SQLiteReplayLog,
)

KEY_A = crypto.sha1(b"packet key A")
KEY_B = crypto.sha1(b"packet key B")


def entry(i: int) -> bytes:
    return crypto.sha1(b"entry %d" % i)


class MemoryReplayLogTests(unittest.TestCase):
    def test_seen_or_add(self) -> None:
        log = MemoryReplayLog()
        self.assertIsInstance(log, ReplayLog)
        self.assertFalse(log.seen_or_add(entry(1)))
        self.assertTrue(log.seen_or_add(entry(1)))
        self.assertEqual(log.seen_or_add_many([entry(2), entry(1), entry(2)]),
                         [False, True, True])
        self.assertEqual(len(log), 2)
        self.assertIn(entry(2), log)

    def test_entries_are_20_bytes(self) -> None:
        log = MemoryReplayLog()
        for bad in (b"", b"x" * 19, b"x" * 21, "x" * 20):
            self.assertRaises(ValueError, log.seen_or_add, bad)
        self.assertEqual(len(log), 0)


class SQLiteReplayLogTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "hash_0001")

    def open(self, key: bytes = KEY_A) -> SQLiteReplayLog:
        log = SQLiteReplayLog(self.path, key)
        self.addCleanup(log.close)
        return log

    def test_seen_or_add(self) -> None:
        log = self.open()
        self.assertIsInstance(log, ReplayLog)
        self.assertFalse(log.seen_or_add(entry(1)))
        self.assertTrue(log.seen_or_add(entry(1)))
        self.assertFalse(log.seen_or_add(entry(2)))
        self.assertEqual(len(log), 2)
        self.assertIn(entry(1), log)
        self.assertNotIn(entry(3), log)
        self.assertNotIn(b"KEYID", log)

    def test_survives_close_and_reopen(self) -> None:
        log = self.open()
        for i in range(10):
            log.seen_or_add(entry(i))
        log.close()
        log = self.open()
        self.assertEqual(len(log), 10)
        self.assertTrue(all(log.seen_or_add(entry(i)) for i in range(10)))
        self.assertFalse(log.seen_or_add(entry(10)))

    def test_wrong_key_refused(self) -> None:
        log = self.open(KEY_A)
        log.seen_or_add(entry(1))
        log.close()
        error = self.assertRaises(ReplayLogKeyMismatch, SQLiteReplayLog, self.path, KEY_B)
        self.assertIn(KEY_A.hex(), str(error))
        self.assertIn(KEY_B.hex(), str(error))
        self.assertIsInstance(error, ReplayLogError)
        # The refused open changed nothing.
        self.assertEqual(len(self.open(KEY_A)), 1)

    def test_key_digest_must_be_20_bytes(self) -> None:
        self.assertRaises(ValueError, SQLiteReplayLog, self.path, b"short")

    def test_file_mode_is_private(self) -> None:
        log = self.open()
        log.seen_or_add(entry(1))
        for suffix in ("", "-wal", "-shm"):
            name = self.path + suffix
            if os.path.exists(name):
                self.assertEqual(stat.S_IMODE(os.stat(name).st_mode), 0o600, name)
        self.assertTrue(os.path.exists(self.path + "-wal"))

    def test_existing_file_made_private(self) -> None:
        self.open().close()
        os.chmod(self.path, 0o644)
        self.open().close()
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    def test_durability_settings(self) -> None:
        log = self.open()
        conn = log._connection()
        self.assertEqual(conn.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        self.assertEqual(conn.execute("PRAGMA synchronous").fetchone()[0], 2)  # FULL
        tables = conn.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()
        self.assertEqual(len(tables), 1)

    def test_entry_committed_before_return(self) -> None:
        """A process killed right after seen_or_add returned, without
        closing the log, loses nothing."""
        code = ("import os, sys\n"
                "from mixminion.server.replay_log import SQLiteReplayLog\n"
                "log = SQLiteReplayLog(sys.argv[1], bytes.fromhex(sys.argv[2]))\n"
                "log.seen_or_add(bytes.fromhex(sys.argv[3]))\n"
                "log.seen_or_add_many([bytes.fromhex(sys.argv[4]), bytes.fromhex(sys.argv[5])])\n"
                "os._exit(0)\n")
        subprocess.run([sys.executable, "-c", code, self.path, KEY_A.hex(),
                        entry(1).hex(), entry(2).hex(), entry(3).hex()], check=True)
        log = self.open()
        self.assertEqual(log.seen_or_add_many([entry(1), entry(2), entry(3), entry(4)]),
                         [True, True, True, False])

    def test_seen_or_add_many(self) -> None:
        log = self.open()
        log.seen_or_add(entry(0))
        flags = log.seen_or_add_many([entry(0), entry(1), entry(2), entry(1)])
        self.assertEqual(flags, [True, False, False, True])
        self.assertEqual(log.seen_or_add_many([]), [])
        self.assertEqual(log.seen_or_add_many(iter([entry(3)])), [False])
        log.close()
        self.assertEqual(len(self.open()), 4)

    def test_batch_commits_once(self) -> None:
        log = self.open()
        statements: list[str] = []
        log._connection().set_trace_callback(statements.append)
        log.seen_or_add_many([entry(i) for i in range(50)])
        self.assertEqual([s for s in statements if s.startswith("COMMIT")], ["COMMIT"])

    def test_bad_batch_records_nothing(self) -> None:
        log = self.open()
        self.assertRaises(ValueError, log.seen_or_add_many, [entry(1), b"bad"])
        self.assertEqual(len(log), 0)

    def test_concurrent_threads(self) -> None:
        """The test-and-set is atomic: of many threads adding one entry,
        exactly one sees it as new."""
        log = self.open()
        results: list[bool] = []
        lock = threading.Lock()

        def worker() -> None:
            flag = log.seen_or_add(entry(7))
            with lock:
                results.append(flag)

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(sorted(results), [False] + [True] * 7)

    def test_closed_log(self) -> None:
        log = self.open()
        log.close()
        log.close()
        self.assertRaises(ReplayLogError, log.seen_or_add, entry(1))
        self.assertRaises(ReplayLogError, log.seen_or_add_many, [entry(1)])

    def test_context_manager(self) -> None:
        with SQLiteReplayLog(self.path, KEY_A) as log:
            log.seen_or_add(entry(1))
        self.assertRaises(ReplayLogError, log.seen_or_add, entry(2))

    def test_not_a_database(self) -> None:
        with open(self.path, "wb") as f:
            f.write(b"this is not an SQLite file at all" * 100)
        self.assertRaises(ReplayLogError, SQLiteReplayLog, self.path, KEY_A)

    def test_unlabelled_entries_refused(self) -> None:
        conn = sqlite3.connect(self.path)
        conn.execute("CREATE TABLE replay_log (k BLOB PRIMARY KEY, v BLOB) WITHOUT ROWID")
        conn.execute("INSERT INTO replay_log (k) VALUES (?)", (entry(1),))
        conn.commit()
        conn.close()
        error = self.assertRaises(ReplayLogError, SQLiteReplayLog, self.path, KEY_A)
        self.assertIn("no key label", str(error))

    def test_missing_directory(self) -> None:
        path = os.path.join(self.dir, "no", "such", "dir", "log")
        self.assertRaises(ReplayLogError, SQLiteReplayLog, path, KEY_A)
