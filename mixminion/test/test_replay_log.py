"""Tests of the replay logs: the in-memory one and the node's durable one,
a table of its packet store (a real store in a ``mktemp`` directory)."""

from __future__ import annotations

from twisted.trial import unittest

from mixminion.codec import crypto
from mixminion.codec.replay import MemoryReplayLog, ReplayLog
from mixminion.server.packetstore import PacketStore
from mixminion.server.store_replay import StoreReplayLog
from mixminion.testing.fakes import scratch_store

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


class StoreReplayLogTests(unittest.TestCase):
    def setUp(self) -> None:
        self.store = scratch_store(self)

    def open(self, key: bytes = KEY_A) -> StoreReplayLog:
        return StoreReplayLog(self.store, key)

    def reopen_store(self) -> None:
        """Close the store and open it again, as a restarted node does."""
        self.store.close()
        self.store = PacketStore(self.store.path)
        self.addCleanup(self.store.close)

    def test_seen_or_add(self) -> None:
        log = self.open()
        self.assertIsInstance(log, ReplayLog)
        self.assertFalse(log.seen_or_add(entry(1)))
        self.assertTrue(log.seen_or_add(entry(1)))
        self.assertFalse(log.seen_or_add(entry(2)))

    def test_survives_reopening_the_store(self) -> None:
        log = self.open()
        for i in range(10):
            log.seen_or_add(entry(i))
        log.close()
        self.reopen_store()
        log = self.open()
        self.assertTrue(all(log.seen_or_add(entry(i)) for i in range(10)))
        self.assertFalse(log.seen_or_add(entry(10)))

    def test_each_key_has_its_own_entries(self) -> None:
        self.open(KEY_A).seen_or_add(entry(1))
        self.assertFalse(self.open(KEY_B).seen_or_add(entry(1)))
        self.assertTrue(self.open(KEY_A).seen_or_add(entry(1)))

    def test_key_digest_must_be_20_bytes(self) -> None:
        self.assertRaises(ValueError, StoreReplayLog, self.store, b"short")

    def test_seen_or_add_many(self) -> None:
        log = self.open()
        log.seen_or_add(entry(0))
        flags = log.seen_or_add_many([entry(0), entry(1), entry(2), entry(1)])
        self.assertEqual(flags, [True, False, False, True])
        self.assertEqual(log.seen_or_add_many([]), [])
        self.assertEqual(log.seen_or_add_many(iter([entry(3)])), [False])
        self.reopen_store()
        self.assertEqual(self.open().seen_or_add_many([entry(i) for i in range(5)]),
                         [True] * 4 + [False])

    def test_bad_batch_records_nothing(self) -> None:
        log = self.open()
        self.assertRaises(ValueError, log.seen_or_add_many, [entry(1), b"bad"])
        self.assertFalse(log.seen_or_add(entry(1)))

    def test_entries_roll_back_with_the_transaction(self) -> None:
        """Entries commit with what the packets became, or not at all."""
        log = self.open()
        with self.assertRaises(OSError):
            with self.store.transaction():
                log.seen_or_add(entry(1))
                raise OSError("disk gone")
        self.assertFalse(log.seen_or_add(entry(1)))

    def test_forget(self) -> None:
        log = self.open(KEY_A)
        log.seen_or_add(entry(1))
        self.open(KEY_B).seen_or_add(entry(1))
        log.forget()
        self.assertFalse(log.seen_or_add(entry(1)))
        self.assertTrue(self.open(KEY_B).seen_or_add(entry(1)))
