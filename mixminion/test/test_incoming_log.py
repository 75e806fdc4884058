"""Tests of the incoming queue's append-only log (real segment files in
``mktemp`` directories, small ``per_segment`` to cross segment boundaries)."""

from __future__ import annotations

import os
import shutil
import stat

from twisted.trial import unittest

from mixminion.server.incoming_log import (
    PACKET_LEN,
    RECORD_LEN,
    IncomingLog,
    IncomingLogError,
)

PER = 4  # records per segment


def pkt(i: int) -> bytes:
    """A distinct, nowhere-zero packet for id ``i``."""
    return bytes([i % 255 + 1]) * PACKET_LEN


class IncomingLogTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()

    def open(self, consumed: int = 0, per: int = PER, **kw: bool) -> IncomingLog:
        log = IncomingLog(self.dir, consumed, per, **kw)
        self.addCleanup(log.close)
        return log

    def seg(self, n: int) -> str:
        return os.path.join(self.dir, f"{n:012d}.seg")

    def raw(self, n: int) -> bytes:
        with open(self.seg(n), "rb") as f:
            return f.read()

    def segments(self) -> list[str]:
        return sorted(n for n in os.listdir(self.dir) if n.endswith(".seg"))

    def spares(self, per: int = PER) -> list[str]:
        """Emptied segments kept for reuse; each full-size and all zeros."""
        names = sorted(n for n in os.listdir(self.dir) if n.endswith(".spare"))
        for name in names:
            with open(os.path.join(self.dir, name), "rb") as f:
                data = f.read()
            self.assertEqual((len(data), data.count(0)), (per * RECORD_LEN, per * RECORD_LEN))
        return names

    def filled(self, n: int, consumed: int = 0) -> IncomingLog:
        log = self.open(consumed)
        self.assertEqual(log.add_many([pkt(i) for i in range(consumed + 1, consumed + n + 1)],
                                      now=5.0), list(range(consumed + 1, consumed + n + 1)))
        return log

    # 1
    def test_add_and_get(self) -> None:
        log = self.open()
        self.assertEqual(log.add_many([pkt(1), pkt(2), pkt(3)]), [1, 2, 3])
        self.assertEqual(log.add_many([pkt(4), pkt(5), pkt(6)]), [4, 5, 6])  # crosses 4|5
        self.assertEqual(log.add_many([]), [])
        self.assertEqual(log.get_many([1, 4, 5, 6]), [pkt(1), pkt(4), pkt(5), pkt(6)])
        self.assertEqual((log.committed_through, log.count()), (6, 6))
        self.assertEqual(self.segments(), [f"{0:012d}.seg", f"{1:012d}.seg"])
        self.assertEqual(len(self.raw(0)), PER * RECORD_LEN)
        self.assertEqual(len(self.raw(1)), 2 * RECORD_LEN)
        self.assertEqual(stat.S_IMODE(os.stat(self.dir).st_mode), 0o700)
        for n in (0, 1):
            self.assertEqual(stat.S_IMODE(os.stat(self.seg(n)).st_mode), 0o600)

    # 2
    def test_reopen_finds_everything(self) -> None:
        log = self.filled(10)
        log.close()
        again = self.open()
        self.assertEqual((again.committed_through, again.count()), (10, 10))
        self.assertEqual(again.ids(), list(range(1, 11)))
        self.assertEqual(again.get_many(again.ids()), [pkt(i) for i in range(1, 11)])

    # 3
    def test_reopen_with_consumed(self) -> None:
        self.filled(10).close()
        log = self.open(consumed=6)
        self.assertEqual((log.committed_through, log.count()), (10, 4))
        self.assertEqual(log.ids(), [7, 8, 9, 10])
        self.assertEqual(log.get_many([7, 10]), [pkt(7), pkt(10)])
        self.assertFalse(os.path.exists(self.seg(0)))
        data = self.raw(1)  # ids 5..8
        self.assertEqual(data[:2 * RECORD_LEN], bytes(2 * RECORD_LEN))
        self.assertNotEqual(data[2 * RECORD_LEN:3 * RECORD_LEN], bytes(RECORD_LEN))
        self.assertRaises(IncomingLogError, log.get_many, [6])
        self.assertEqual(log.add_many([pkt(11)]), [11])

    # 4
    def test_remove_through(self) -> None:
        log = self.filled(6)
        log.remove_through(2)
        self.assertEqual(self.raw(0)[:2 * RECORD_LEN], bytes(2 * RECORD_LEN))
        self.assertNotEqual(self.raw(0)[2 * RECORD_LEN:3 * RECORD_LEN], bytes(RECORD_LEN))
        self.assertEqual((log.count(), log.ids()), (4, [3, 4, 5, 6]))
        log.remove_through(5)
        self.assertFalse(os.path.exists(self.seg(0)))
        self.assertEqual(self.raw(1)[:RECORD_LEN], bytes(RECORD_LEN))
        self.assertEqual(log.get_many([6]), [pkt(6)])
        log.remove_through(100)  # capped at committed_through
        self.assertEqual((log.removed_through, log.count(), log.ids()), (6, 0, []))
        self.assertTrue(os.path.exists(self.seg(1)))  # the append segment stays
        self.assertEqual(self.raw(1), bytes(2 * RECORD_LEN))
        self.assertEqual(log.add_many([pkt(7)]), [7])
        self.assertEqual(log.get_many([7]), [pkt(7)])
        log.add_many([pkt(8)])
        log.remove_through(8)  # a segment full and consumed goes
        self.assertEqual(self.segments(), [])
        self.assertEqual(self.spares(), ["0.spare", "1.spare"])  # zeroed, kept for reuse

    def assert_torn_at_6(self) -> None:
        """Records 1-5 survive; the bad last record 6 is a torn tail."""
        log = self.open()
        self.assertEqual((log.committed_through, log.ids()), (5, [1, 2, 3, 4, 5]))
        self.assertEqual(log.unreadable_at_start, 0)
        self.assertEqual(log.get_many([1, 4, 5]), [pkt(1), pkt(4), pkt(5)])
        self.assertEqual(self.segments(), [f"{0:012d}.seg", f"{1:012d}.seg"])
        self.assertEqual(len(self.raw(1)), RECORD_LEN)
        self.assertEqual(log.add_many([pkt(60)]), [6])
        log.close()
        self.assertEqual(self.open().get_many([6]), [pkt(60)])

    # 5
    def test_torn_tail_bad_crc(self) -> None:
        self.filled(6).close()
        with open(self.seg(1), "r+b") as f:
            f.seek(RECORD_LEN + RECORD_LEN - 100)
            f.write(b"\x00")
        self.assert_torn_at_6()

    def test_torn_tail_truncated(self) -> None:
        self.filled(6).close()
        os.truncate(self.seg(1), RECORD_LEN + 1000)
        self.assert_torn_at_6()

    def test_torn_tail_zeroed_before_truncation(self) -> None:
        """The dropped tail is overwritten, not only cut off."""
        self.filled(6).close()
        os.truncate(self.seg(1), RECORD_LEN + 1000)
        self.patch(os, "ftruncate", lambda fd, length: None)
        self.assertEqual(self.open().committed_through, 5)
        self.assertEqual(self.raw(1)[RECORD_LEN:], bytes(1000))

    def test_wrong_id_in_last_slot_ends_log(self) -> None:
        self.filled(6).close()
        data = self.raw(0)
        with open(self.seg(1), "r+b") as f:  # record 2 copied into slot 6
            f.seek(RECORD_LEN)
            f.write(data[RECORD_LEN:2 * RECORD_LEN])
        self.assert_torn_at_6()

    def test_damaged_record_inside_the_log_is_skipped(self) -> None:
        """A bad record followed by good ones was acknowledged (its commit
        finished before a later one started) and damaged afterwards:
        recovery keeps the records after it, and readers see it as None."""
        self.filled(6).close()
        with open(self.seg(0), "r+b") as f:  # a flipped byte in record 3
            f.seek(2 * RECORD_LEN + RECORD_LEN - 100)
            f.write(b"\x00")
        os.truncate(self.seg(0), 3 * RECORD_LEN + 1000)  # and record 4 cut short
        log = self.open()
        self.assertEqual((log.committed_through, log.ids()), (6, [1, 2, 3, 4, 5, 6]))
        self.assertEqual(log.unreadable_at_start, 2)
        self.assertEqual(log.read_many([2, 3, 4, 5]), [pkt(2), None, None, pkt(5)])
        self.assertRaises(IncomingLogError, log.get_many, [3])
        reader = self.open(read_only=True)
        self.assertEqual(reader.read_many([3, 6]), [None, pkt(6)])
        self.assertEqual(log.add_many([pkt(7)]), [7])
        log.remove_through(7)
        self.assertEqual(self.segments(), [f"{1:012d}.seg"])

    # 6
    def test_ids_never_reused(self) -> None:
        self.filled(3).close()
        shutil.rmtree(self.dir)
        log = self.open(consumed=10)
        self.assertEqual((log.committed_through, log.count(), log.ids()), (10, 0, []))
        self.assertEqual(log.add_many([pkt(11)]), [11])
        log.close()
        again = self.open(consumed=10)
        self.assertEqual((again.ids(), again.get_many([11])), ([11], [pkt(11)]))

    # 7
    def test_errors(self) -> None:
        log = self.filled(5)
        self.assertRaises(ValueError, log.add_many, [pkt(6), b"short"])
        self.assertRaises(ValueError, log.add_many, [pkt(6) + b"x"])
        self.assertEqual(log.committed_through, 5)
        log.remove_through(2)
        for bad in ([1], [2], [6], [100]):
            self.assertRaises(IncomingLogError, log.get_many, bad)
        reader = self.open(read_only=True)
        self.assertRaises(IncomingLogError, reader.add_many, [pkt(1)])

    # 8
    def test_read_only_reader(self) -> None:
        writer = self.open(per=2)
        reader = self.open(per=2, read_only=True)
        done = 0
        for round_ in range(20):
            writer.add_many([pkt(done + 1), pkt(done + 2), pkt(done + 3)])
            ids = reader.ids(after=done, through=writer.committed_through)
            self.assertEqual(ids, [done + 1, done + 2, done + 3])
            self.assertEqual(reader.get_many(ids), [pkt(i) for i in ids])
            self.assertLessEqual(len(reader._fds), 2)
            done = ids[-1]
            writer.remove_through(done)
            self.assertLessEqual(len(self.segments()), 1)
            self.assertLessEqual(len(self.spares(per=2)), 2)
        self.assertEqual(writer.count(), 0)
        self.assertRaises(IncomingLogError, reader.get_many, [done + 1])

    # 9
    def test_write(self) -> None:
        log = self.open()
        self.assertEqual(log.write([pkt(1), pkt(2), pkt(3)], 1.0, 0), [1, 2, 3])
        self.assertEqual(log.write([pkt(4), pkt(5)], 2.0, 2), [4, 5])
        self.assertEqual((log.ids(), log.count()), ([3, 4, 5], 3))
        self.assertEqual(log.write([], 3.0, 4), [])
        self.assertFalse(os.path.exists(self.seg(0)))
        self.assertEqual(log.get_many([5]), [pkt(5)])
        self.assertRaises(IncomingLogError, log.get_many, [3])

    # 13
    def test_spares_are_reused(self) -> None:
        log = self.filled(3 * PER)
        log.remove_through(3 * PER)  # three full segments emptied: two kept
        self.assertEqual((self.segments(), self.spares()), ([], ["0.spare", "1.spare"]))
        inode = os.stat(os.path.join(self.dir, "0.spare")).st_ino
        ids = log.add_many([pkt(i) for i in range(13, 13 + PER + 1)])  # segments 3 and 4
        self.assertEqual(ids, list(range(13, 18)))
        self.assertEqual(self.spares(), [])
        self.assertEqual(os.stat(self.seg(3)).st_ino, inode)  # the oldest spare, renamed
        self.assertEqual(log.get_many(ids), [pkt(i) for i in ids])
        self.assertEqual(self.raw(4)[RECORD_LEN:], bytes((PER - 1) * RECORD_LEN))
        log.close()
        again = self.open(consumed=12)  # what recovery makes of a reused file
        self.assertEqual((again.committed_through, again.ids()), (17, ids))
        self.assertEqual(again.get_many(ids), [pkt(i) for i in ids])

    # 14
    def test_recovery_with_spares(self) -> None:
        log = self.filled(2 * PER)
        log.remove_through(PER)
        self.assertEqual(self.spares(), ["0.spare"])
        log.add_many([pkt(9)])  # segment 2 is the spare, renamed
        log.close()
        # A crash after a spare was renamed for a segment never written:
        os.rename(self.seg(2), self.seg(3))
        with open(os.path.join(self.dir, "7.spare"), "wb") as f:
            f.write(bytes(RECORD_LEN))  # not full-size: not kept
        with open(os.path.join(self.dir, "8.spare"), "wb") as f:
            f.write(bytes(PER * RECORD_LEN))  # a good spare: kept
        again = self.open(consumed=PER)
        self.assertEqual((again.committed_through, again.ids()), (2 * PER, [5, 6, 7, 8]))
        self.assertEqual(self.segments(), [f"{1:012d}.seg"])  # 3 held no record: gone
        self.assertEqual(self.spares(), ["8.spare"])
        self.assertEqual(again.add_many([pkt(9)]), [9])
        self.assertEqual(self.spares(), [])
        self.assertEqual(again.get_many([5, 9]), [pkt(5), pkt(9)])

    # 15
    def test_failed_directory_sync_puts_the_spare_back(self) -> None:
        from mixminion.server import incoming_log
        log = self.filled(2 * PER)
        log.remove_through(PER)  # segment 0 becomes a spare
        syncs, real = [], incoming_log.sync_directory

        def flaky(folder: str) -> None:
            syncs.append(folder)
            if len(syncs) == 1:
                raise OSError(5, "EIO (simulated)")
            real(folder)

        self.patch(incoming_log, "sync_directory", flaky)
        self.assertRaises(OSError, log.add_many, [pkt(9)])  # segment 2: not acknowledged
        self.assertEqual((self.segments(), self.spares()), ([f"{1:012d}.seg"], ["0.spare"]))
        self.assertEqual(log.add_many([pkt(9)]), [9])  # the retry syncs the name again
        self.assertEqual(len(syncs), 2)
        self.assertEqual(self.spares(), [])
        self.assertEqual(log.get_many([9]), [pkt(9)])

    # 16
    def test_zeros_in_a_live_segment_are_synced(self) -> None:
        log = self.filled(3)
        synced = []
        real = os.fdatasync
        self.patch(os, "fdatasync", lambda fd: (synced.append(fd), real(fd)))
        log.remove_through(2)  # records 1-2 of segment 0, which stays
        self.assertEqual(synced, [log._fds[0]])
        self.assertEqual(self.raw(0)[:2 * RECORD_LEN], bytes(2 * RECORD_LEN))
