"""Packet bodies kept beside SQLite (:mod:`mixminion.server.bodies`) and
their use by :class:`~mixminion.server.packetstore.PacketStore`: slots are
written and synced before their rows commit, zeroed after the deletion
commits (never after a rollback), dead segments unlinked, and strays left by
a crash swept at start-up.  Segments of 4 slots cross boundaries quickly."""

from __future__ import annotations

import os
import sqlite3
import stat

from twisted.trial import unittest

from mixminion.server.bodies import MAX_BODY, MAX_OPEN_FILES, SLOT_LEN, BodyFiles
from mixminion.server import packetstore
from mixminion.server.packetstore import PacketStore, PacketStoreError

PER = 4
ZERO_SLOT = bytes(SLOT_LEN)


def seg_path(bodies: str, segment: int) -> str:
    return os.path.join(bodies, f"{segment:012d}.bodies")


def slot(bodies: str, row_id: int) -> bytes:
    """The raw bytes of a row's slot, read from the segment file."""
    segment, index = divmod(row_id - 1, PER)
    with open(seg_path(bodies, segment), "rb") as f:
        f.seek(index * SLOT_LEN)
        return f.read(SLOT_LEN)


def packets(n: int, length: int = 100) -> list[bytes]:
    return [os.urandom(length) for _ in range(n)]


class StoreBodiesTest(unittest.TestCase):
    def open(self, base: str) -> PacketStore:
        store = PacketStore(os.path.join(base, "packets.db"), body_dir=os.path.join(base, "b"))
        store._bodies.per_segment = PER
        self.addCleanup(store.close)
        return store

    def setUp(self) -> None:
        self.base = self.mktemp()
        os.makedirs(self.base)
        self.db = os.path.join(self.base, "packets.db")
        self.bodies = os.path.join(self.base, "b")
        self.store = self.open(self.base)

    def raw(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.db, isolation_level=None)
        self.addCleanup(conn.close)
        return conn

    def assertZeroed(self, *ids: int) -> None:
        for i in ids:
            self.assertEqual(slot(self.bodies, i), ZERO_SLOT, f"slot {i} not zeroed")

    def assertLive(self, *ids: int) -> None:
        for i in ids:
            self.assertNotEqual(slot(self.bodies, i), ZERO_SLOT, f"slot {i} zeroed")

    def test_round_trip(self) -> None:
        """Bodies up to 32 KiB go to slots (empty blob in the row); longer
        ones stay inline; files 0600, directory 0700."""
        data = [os.urandom(n) for n in (0, 100, 28 * 1024, MAX_BODY, 40000)]
        ids = self.store.add_many("q", data)
        self.assertEqual(ids, [1, 2, 3, 4, 5])
        self.assertEqual([self.store.get(i) for i in ids], data)
        self.assertEqual(self.store.get_many(ids[::-1]), data[::-1])
        lengths = dict(self.raw().execute("SELECT id, length(packet) FROM packets"))
        self.assertEqual(lengths, {1: 0, 2: 0, 3: 0, 4: 0, 5: 40000})
        self.assertEqual(slot(self.bodies, 4)[4:], data[3])
        self.assertEqual(stat.S_IMODE(os.stat(self.bodies).st_mode), 0o700)
        self.assertEqual(sorted(os.listdir(self.bodies)), ["000000000000.bodies"])
        self.assertEqual(stat.S_IMODE(os.stat(seg_path(self.bodies, 0)).st_mode), 0o600)

    def test_remove_zeroes_and_unlinks(self) -> None:
        """Zero exactly the removed slots; unlink a segment only when fully
        allocated and empty of rows."""
        data = packets(10)
        self.store.add_many("q", data)  # segments 0: 1-4, 1: 5-8, 2: 9-12
        self.store.remove_many([2])
        self.assertZeroed(2)
        self.assertLive(1, 3, 4)
        self.store.remove_many([1, 3, 4, 5, 6, 7, 9, 10])
        self.assertFalse(os.path.exists(seg_path(self.bodies, 0)))
        self.assertTrue(os.path.exists(seg_path(self.bodies, 1)), "row 8 lives there")
        self.assertTrue(os.path.exists(seg_path(self.bodies, 2)), "ids 11-12 unallocated")
        self.assertZeroed(5, 6, 7, 9, 10)
        self.assertEqual(self.store.get_many([8]), [data[7]])
        self.assertRaises(KeyError, self.store.get, 5)
        self.store.remove_many([8])
        self.assertFalse(os.path.exists(seg_path(self.bodies, 1)))

    def test_sync_order(self) -> None:
        """Bodies are synced before their rows commit; zeros are synced after
        the deletion commits and before the segment is unlinked."""
        raw = self.raw()
        events: list[tuple[str, str, int]] = []
        real_sync, real_unlink = os.fdatasync, os.unlink

        def committed() -> int:
            return raw.execute("SELECT COUNT(*) FROM packets").fetchone()[0]

        def sync(fd: int) -> None:
            events.append(("sync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}")),
                           committed()))
            real_sync(fd)

        def unlink(path: str) -> None:
            if path.endswith(".bodies"):
                events.append(("unlink", os.path.basename(path), committed()))
            real_unlink(path)

        self.patch(os, "fdatasync", sync)
        self.patch(os, "unlink", unlink)
        self.store.add_many("q", packets(5))
        self.store.remove_many([1, 2, 3, 4])
        s0, s1 = "000000000000.bodies", "000000000001.bodies"
        self.assertEqual(events, [("sync", s0, 0), ("sync", s1, 0),
                                  ("sync", s0, 1), ("unlink", s0, 1)])

    def test_rollback_zeroes_nothing(self) -> None:
        """A deletion rolled back leaves rows and bodies, also for later
        commits of the same store."""
        data = packets(5)
        self.store.add_many("q", data)

        def fail() -> None:
            with self.store.transaction():
                self.store.remove_many([1, 2, 3, 4])
                raise RuntimeError("abort")

        self.assertRaises(RuntimeError, fail)
        self.assertEqual(self.store.get_many([1, 2, 3, 4]), data[:4])
        self.assertLive(1, 2, 3, 4)
        self.store.remove_many([5])
        self.assertZeroed(5)
        self.assertLive(1, 2, 3, 4)
        self.assertEqual(self.store.get_many([1, 2, 3, 4]), data[:4])

    def test_rolled_back_insert_leaves_no_body(self) -> None:
        """Bodies written for rows whose transaction rolled back are
        overwritten at once, not left for the next start's sweep."""
        self.store.add_many("q", packets(2))

        def fail() -> None:
            with self.store.transaction():
                self.assertEqual(self.store.add_many("q", packets(3)), [3, 4, 5])
                self.assertLive(3, 4, 5)
                raise RuntimeError("abort")

        self.assertRaises(RuntimeError, fail)
        self.assertZeroed(3, 4, 5)
        self.assertLive(1, 2)
        again = packets(1)
        self.assertEqual(self.store.add_many("q", again), [3])  # the id comes back
        self.assertEqual(self.store.get(3), again[0])
        self.assertZeroed(4, 5)
        self.assertEqual(self.store.sweep_bodies(), 0)

    def test_no_zeroing_once_sqlite_rolled_back_by_itself(self) -> None:
        """A full disk makes SQLite roll back and drop the write lock on
        its own: the ids may already be another writer's, whose bodies
        must survive (the start-up sweep handles ours)."""
        other = self.open(self.base)  # a second writer on the same files
        self.store.add_many("q", packets(1))
        zero = self.store._zero_unwritten

        def meanwhile() -> None:
            self.assertFalse(self.store._db.in_transaction)
            self.assertEqual(other.add_many("q", [b"theirs"]), [2])
            zero()

        self.store._zero_unwritten = meanwhile  # type: ignore[method-assign]

        def fill_the_disk() -> None:
            with self.store.transaction():
                self.assertEqual(self.store.add_many("q", [b"ours"]), [2])
                pages = self.store._db.execute("PRAGMA page_count").fetchone()[0]
                self.store._db.execute(f"PRAGMA max_page_count={pages}")
                self.store.set_value("big", b"v" * 100000)

        self.assertRaises(PacketStoreError, fill_the_disk)
        self.assertEqual(other.get(2), b"theirs")

    def test_remove_through(self) -> None:
        """Only the queue's rows up to the bound lose their bodies."""
        a = packets(2) + packets(2)
        b = packets(2)
        self.store.add_many("a", a[:2])  # 1, 2
        self.store.add_many("b", b)  # 3, 4
        self.store.add_many("a", a[2:])  # 5, 6
        self.store.remove_through("a", 5)
        self.assertZeroed(1, 2, 5)
        self.assertLive(3, 4, 6)
        self.assertEqual(self.store.get_many([3, 4, 6]), b + [a[3]])
        self.assertEqual(self.store.ids("a"), [6])

    def test_sweep_after_crash(self) -> None:
        """Bodies whose rows went away without zeroing (a crash after the
        commit, or a rolled-back write) are zeroed by the next start's sweep,
        dead segments unlinked, live bodies kept."""
        data = packets(10)
        self.store.add_many("q", data)
        self.store.close()
        raw = self.raw()
        raw.execute("DELETE FROM packets WHERE id IN (1, 2, 3, 4, 6, 9, 10)")
        BodyFiles(self.bodies, per_segment=PER).write([12], [b"uncommitted"])
        store = self.open(self.base)
        self.assertEqual(store.sweep_bodies(), 8)
        self.assertFalse(os.path.exists(seg_path(self.bodies, 0)))
        self.assertTrue(os.path.exists(seg_path(self.bodies, 2)), "ids 11-12 unallocated")
        self.assertZeroed(6, 9, 10, 12)
        self.assertLive(5, 7, 8)
        self.assertEqual(store.get_many([5, 7, 8]), [data[i - 1] for i in (5, 7, 8)])
        self.assertEqual(store.sweep_bodies(), 0)
        self.assertEqual(store.add_many("q", [b"new"]), [11])
        self.assertEqual(store.get(11), b"new")

    def test_two_stores_share_files(self) -> None:
        """One store adds while another on the same files reads and removes
        (the node and its processing child); nothing is lost."""
        other = self.open(self.base)
        first = packets(6)
        self.store.add_many("q", first)  # 1-6
        self.assertEqual(other.get_many(list(range(1, 7))), first)
        other.remove_many([1, 2, 3, 4])
        self.assertFalse(os.path.exists(seg_path(self.bodies, 0)))
        second = packets(5)
        self.assertEqual(self.store.add_many("q", second), [7, 8, 9, 10, 11])
        other.remove_many([5, 6, 7, 8])
        self.assertFalse(os.path.exists(seg_path(self.bodies, 1)))
        third = packets(3)
        self.assertEqual(self.store.add_many("q", third), [12, 13, 14])
        expected = second[2:] + third
        for store in (self.store, other):
            self.assertEqual(store.get_many(list(range(9, 15))), expected)
            self.assertEqual(store.count("q"), 6)


class PlainStoreTest(unittest.TestCase):
    def test_inline_without_body_dir(self) -> None:
        """Without a body directory packets stay in the table."""
        base = self.mktemp()
        os.makedirs(base)
        store = PacketStore(os.path.join(base, "packets.db"))
        self.addCleanup(store.close)
        data = [os.urandom(n) for n in (0, 100, MAX_BODY)]
        ids = store.add_many("q", data)
        self.assertEqual(store.get_many(ids), data)
        self.assertIsNone(store._bodies)
        self.assertEqual(store.sweep_bodies(), 0)
        raw = sqlite3.connect(os.path.join(base, "packets.db"))
        self.addCleanup(raw.close)
        self.assertEqual([r[0] for r in raw.execute("SELECT length(packet) FROM packets")],
                         [0, 100, MAX_BODY])
        self.assertEqual([n for n in os.listdir(base) if not n.startswith("packets.db")], [])


class BodyFilesTest(unittest.TestCase):
    def setUp(self) -> None:
        self.files = BodyFiles(self.mktemp(), per_segment=PER)
        self.addCleanup(self.files.close)

    def test_missing_and_oversized(self) -> None:
        """Unwritten ids raise KeyError; oversized bodies ValueError, with
        nothing written."""
        self.assertRaises(KeyError, self.files.read, 1)
        self.files.write([1], [b"one"])
        self.assertEqual(self.files.read(1), b"one")
        self.assertRaises(KeyError, self.files.read, 2)
        self.assertRaises(KeyError, self.files.read, 5)
        self.assertRaises(ValueError, self.files.write, [2, 5], [b"x", bytes(MAX_BODY + 1)])
        self.assertRaises(KeyError, self.files.read, 2)
        self.files.write([2], [bytes(MAX_BODY)])
        self.assertEqual(self.files.read(2), bytes(MAX_BODY))

    def test_directory_private(self) -> None:
        """An existing directory is made 0700."""
        path = self.mktemp()
        os.makedirs(path)
        os.chmod(path, 0o755)
        BodyFiles(path).close()
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o700)

    def test_open_files_bounded(self) -> None:
        """Touching many segments keeps at most MAX_OPEN_FILES open."""
        def open_fds() -> int:
            return len(os.listdir("/proc/self/fd"))

        before = open_fds()
        ids = [1 + PER * s for s in range(3 * MAX_OPEN_FILES)]
        for i in ids:
            self.files.write([i], [i.to_bytes(4, "big")])
            self.assertLessEqual(open_fds() - before, MAX_OPEN_FILES)
        self.assertEqual([self.files.read(i) for i in ids], [i.to_bytes(4, "big") for i in ids])
        self.assertLessEqual(open_fds() - before, MAX_OPEN_FILES)
        self.assertEqual(len(self.files.segments()), 3 * MAX_OPEN_FILES)
        self.files.close()
        self.assertEqual(open_fds(), before)


class WriteLockTest(unittest.TestCase):
    """Two connections to one store (the node and a processing child):
    a transaction waits for the other's write lock, polling at short
    intervals (PacketStore._begin), instead of failing."""

    def setUp(self) -> None:
        path = os.path.join(self.mktemp(), "packets.db")
        os.makedirs(os.path.dirname(path))
        self.a = PacketStore(path)
        self.b = PacketStore(path)
        self.addCleanup(self.a.close)
        self.addCleanup(self.b.close)

    def test_a_writer_waits_for_the_other_connections_commit(self) -> None:
        import threading

        waiting = threading.Event()
        tries = []
        real_sleep = packetstore.time.sleep

        def sleep(seconds: float) -> None:
            tries.append(seconds)
            waiting.set()
            real_sleep(seconds)

        self.patch(packetstore.time, "sleep", sleep)
        done: list[int] = []
        with self.a.transaction():
            self.a.add("q", b"first")
            writer = threading.Thread(target=lambda: done.append(self.b.add("q", b"second")))
            writer.start()
            self.assertTrue(waiting.wait(10), "the second writer never waited")
            self.assertEqual(done, [])
        writer.join(10)
        self.assertEqual(len(done), 1)
        self.assertEqual(sorted(self.a.get(i) for i in self.a.ids("q")), [b"first", b"second"])
        self.assertEqual(tries[0], packetstore.LOCK_RETRY_FIRST)
        self.assertLessEqual(max(tries), packetstore.LOCK_RETRY_MAX)

    def test_an_error_that_is_not_the_lock_is_not_waited_out(self) -> None:
        self.b._db.close()
        self.assertRaises(PacketStoreError, self.b.add, "q", b"x")
