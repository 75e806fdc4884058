"""``MinFreeDisk`` beyond reception (issue 12 point 10): processing and the
exit modules that write local files kept writing once reception had
stopped, and drove free space to 0.  Now each checks the free space of
the disk it writes to before it writes and, under half of MinFreeDisk,
waits instead: processing leaves the packets in the incoming log, a
FRAGMENT or MBOX-file delivery leaves its items in their queue; both go
on by themselves once space is back, and nothing is lost.

Free space is a stand-in function here (``usage``); the real-process
test, on a real small disk, is ``tests/test_disk_floor.py``.
"""

from __future__ import annotations

import io
import os
from collections import namedtuple
from typing import Any, Callable

from twisted.internet import defer, task
from twisted.trial import unittest
from zope.interface import implementer

from mixminion.codec.packet import PACKET_LEN
from mixminion.codec.process import PacketProcessor
from mixminion.codec.routing import FRAGMENT_TYPE, MBOX_TYPE, SMTP_TYPE
from mixminion.exits.context import ExitContext
from mixminion.exits.interfaces import IExitModule
from mixminion.exits.registry import Dispatcher, build_dispatcher, find_exit_modules
from mixminion.server.delivery import ITEM_BYTES, Delivery
from mixminion.server.childmessages import Batch, Drain, Idle, Message, Paused, Ready, decode
from mixminion.server.diskspace import DiskPause, FreeSpace, Shortage, later_floor, shortage
from mixminion.server.draining import consumed_through
from mixminion.server.items import DeliveryItem, encode_item
from mixminion.server.processing import DISK_RECHECK_INTERVAL, Processor
from mixminion.server.processing_child import Child
from mixminion.server.queues import MIX, delivery_queue
from mixminion.server.stats import NodeStats
from mixminion.server.store_replay import StoreReplayLog
from mixminion.test.test_delivery_faults import Recorder, queue_messages
from mixminion.test.test_fragment_bounds import lone_fragment
from mixminion.test.test_pipeline import TwoStoreTestCase, _packet
from mixminion.testing.keys import key

MB = 1 << 20
DiskUsage = namedtuple("DiskUsage", "total used free")


def usage_of(free: Callable[[], int]) -> Callable[[str], DiskUsage]:
    """A ``shutil.disk_usage`` whose free space is ``free()``; it records
    the paths it was asked about."""
    def usage(path: str) -> DiskUsage:
        usage.asked.append(path)  # type: ignore[attr-defined]
        return DiskUsage(0, 0, free())

    usage.asked = []  # type: ignore[attr-defined]
    return usage


class Log:
    """Records what a :class:`DiskPause` says, by level."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict]] = []

    def warn(self, text: str, **kw: Any) -> None:
        self.lines.append(("warn", text, kw))

    def info(self, text: str, **kw: Any) -> None:
        self.lines.append(("info", text, kw))

    def levels(self) -> list[str]:
        return [level for level, _, _ in self.lines]


class FreeSpaceTests(unittest.TestCase):
    def test_the_later_stages_keep_half_of_min_free_disk(self) -> None:
        self.assertEqual(later_floor(100 * MB), 50 * MB)
        self.assertEqual(later_floor(0), 0)

    def test_read_at_most_every_interval_counted_down_and_reread_under_the_floor(self) -> None:
        clock, free = task.Clock(), [20 * PACKET_LEN]
        usage = usage_of(lambda: free[0])
        space = FreeSpace("/q", clock.seconds, 0.25, usage)
        self.assertEqual(space.free(), 20 * PACKET_LEN)
        space.spend(15 * PACKET_LEN)
        self.assertEqual(space.free(), 5 * PACKET_LEN)  # the estimate, no new read
        self.assertEqual(len(usage.asked), 1)
        self.assertEqual(space.free(10 * PACKET_LEN), 20 * PACKET_LEN)  # under it: read
        self.assertEqual(len(usage.asked), 2)
        free[0] = 3
        clock.advance(0.25)
        self.assertEqual(space.free(), 3)

    def test_shortage_names_the_first_disk_under_the_floor(self) -> None:
        clock = task.Clock()
        roomy = FreeSpace("/big", clock.seconds, usage=usage_of(lambda: 10 * MB))
        tight = FreeSpace("/small", clock.seconds, usage=usage_of(lambda: MB))
        self.assertIsNone(shortage([roomy, tight], 0))  # MinFreeDisk 0: no floor
        self.assertIsNone(shortage([roomy, tight], MB, writing=100))
        self.assertEqual(shortage([roomy, tight], 2 * MB), Shortage("/small", MB, 2 * MB))

        def broken(path: str) -> DiskUsage:
            raise OSError("no such device")

        unknown = FreeSpace("/gone", clock.seconds, usage=broken)
        self.assertEqual(shortage([roomy, unknown], 1), Shortage("/gone", 0, 1))

    def test_a_pause_says_one_warn_line_and_its_end_one_info_line(self) -> None:
        log = Log()
        pause = DiskPause(log, "Processing", "packets wait")
        short = Shortage("/q", 3 * MB, 50 * MB)
        pause.update(None)
        pause.update(short)
        pause.update(short)
        self.assertTrue(pause.paused)
        pause.update(None)
        pause.update(None)
        self.assertEqual(log.levels(), ["warn", "info"])
        _, _, said = log.lines[0]
        self.assertEqual((said["free"], said["floor"], said["path"]), ("3.0 MB", "50.0 MB", "/q"))


class ChildDiskTests(TwoStoreTestCase):
    """The processing child takes no batch while the store's disk is under
    the floor the node sends; what it leaves stays in the incoming log."""

    def child(self, free: Callable[[], int]) -> tuple[Child, io.BytesIO]:
        out = io.BytesIO()
        child = Child(self.incoming, self.store, 2, out, [os.path.dirname(self.store.path)])
        for space in child.free_space:
            space.usage, space.interval = usage_of(free), 0
        child.processor = PacketProcessor([(key("mix0"), StoreReplayLog(self.store,
                                                                    key("mix0").public.keyid))])
        self.addCleanup(child.opener.shutdown, True)
        return child, out

    def messages(self, out: io.BytesIO) -> list[Message]:
        lines = out.getvalue().splitlines()
        out.seek(0)
        out.truncate()
        return [decode(line) for line in lines]

    def test_under_the_floor_nothing_is_taken_and_it_resumes_when_space_is_back(self) -> None:
        ids = self.incoming.add_many([_packet() for _ in range(5)])
        free = [10 * MB]
        child, out = self.child(lambda: free[0])
        drain = Drain(ids[-1], floor=50 * MB)
        child.handle(drain)
        [paused] = self.messages(out)
        assert isinstance(paused, Paused)
        self.assertEqual((paused.floor, paused.free), (50 * MB, 10 * MB))
        self.assertEqual(self.store.count(MIX), 0)
        self.assertEqual(consumed_through(self.store), 0)
        self.assertEqual(len(self.incoming.ids(after=0)), 5)
        free[0] = 100 * MB
        child.handle(drain)
        said = self.messages(out)
        self.assertEqual(said[-1], Idle())
        self.assertEqual(self.store.count(MIX), 5)
        self.assertEqual(consumed_through(self.store), ids[-1])

    def test_space_running_out_midway_stops_before_the_next_batch(self) -> None:
        ids = self.incoming.add_many([_packet() for _ in range(5)])
        reads = iter([100 * MB, 100 * MB, 10 * MB, 10 * MB])
        child, out = self.child(lambda: next(reads))
        child.handle(Drain(ids[-1], floor=50 * MB))
        said = self.messages(out)
        self.assertEqual([type(m) for m in said], [Batch, Batch, Paused])
        self.assertEqual(self.store.count(MIX), 4)  # batches of two
        self.assertEqual(consumed_through(self.store), ids[3])

    def test_a_node_that_sends_no_floor_has_none(self) -> None:
        ids = self.incoming.add_many([_packet()])
        child, out = self.child(lambda: 0)
        child.handle(Drain(ids[-1]))
        self.assertEqual(self.messages(out)[-1], Idle())


class _Reactor:
    def __init__(self, clock: task.Clock) -> None:
        self.clock = clock
        self.callLater = clock.callLater
        self.seconds = clock.seconds

    def spawnProcess(self, proto, *args, **kwargs):  # noqa: N802
        proto.transport = _Pipe()


class _Pipe:
    def __init__(self) -> None:
        self.sent: list[Message] = []

    def write(self, data: bytes) -> None:
        self.sent.extend(decode(line) for line in data.splitlines())


class ProcessorDiskTests(TwoStoreTestCase):
    """The node's side: the floor it sends, the two log lines, the look
    again every few seconds, and no drain per new packet meanwhile."""

    def test_pause_and_resume(self) -> None:
        clock = task.Clock()
        processor = Processor(self.incoming.path, self.store.path, _Reactor(clock),
                              self.stats.count)
        processor.min_free_disk = lambda: 100 * MB
        log = Log()
        processor.disk.log = log
        processor.set_keys([key("mix0")])
        pipe = processor._child.transport
        processor._message(Ready())
        drains = [m for m in pipe.sent if isinstance(m, Drain)]
        self.assertEqual(drains[-1].floor, 50 * MB)
        short = Paused("/q", MB, 50 * MB)
        processor._message(short)
        self.assertTrue(processor.disk.paused)
        self.assertEqual(log.levels(), ["warn"])
        self.assertIsNone(processor.failing)
        sent = len(pipe.sent)
        processor.stored([7, 8])  # packets keep arriving: no drain each
        self.assertEqual(len(pipe.sent), sent)
        clock.advance(DISK_RECHECK_INTERVAL)
        self.assertIsInstance(pipe.sent[-1], Drain)
        self.assertEqual(pipe.sent[-1].through, 8)
        processor._message(short)  # still short: no second line
        self.assertEqual(log.levels(), ["warn"])
        clock.advance(DISK_RECHECK_INTERVAL)
        processor._message(Batch(8, {}))
        processor._message(Idle())
        self.assertFalse(processor.disk.paused)
        self.assertEqual(log.levels(), ["warn", "info"])
        self.assertEqual([c for c in clock.getDelayedCalls() if c.active()], [])


@implementer(IExitModule)
class LocalRecorder(Recorder):
    """A :class:`Recorder` that writes to a local folder."""

    def __init__(self, name: str, exit_type: int, folder: str) -> None:
        super().__init__(name, exit_type)
        self.folder = folder

    def local_paths(self) -> list[str]:
        return [self.folder]


class DeliveryDiskTests(unittest.TestCase):
    def setUp(self) -> None:
        from mixminion.testing.fakes import scratch_store

        self.store = scratch_store(self)
        self.folder = os.path.dirname(self.store.path)
        self.stats = NodeStats()
        self.clock = task.Clock()
        self.clock.advance(5000)
        self.free = [10 * MB]
        self.usage = usage_of(lambda: self.free[0])
        self.context = ExitContext(base_dir=self.folder, clock=self.clock, reactor=self.clock,
                                   counters=self.stats)
        self.log = Log()

    def delivery(self, dispatcher: Dispatcher) -> Delivery:
        delivery = Delivery(self.store, dispatcher, self.clock, self.stats.count, self.usage)
        delivery.min_free_disk = lambda: 100 * MB
        delivery.log = self.log  # type: ignore[assignment]
        return delivery

    def queue(self, module: str, exit_type: int, count: int) -> list[int]:
        return queue_messages(self.store, module, exit_type, count)

    def test_a_local_module_waits_with_its_items_untouched_and_others_go_on(self) -> None:
        mbox = LocalRecorder("MBOX", MBOX_TYPE, os.path.join(self.folder, "mail"))
        smtp = Recorder("SMTP", SMTP_TYPE)
        dispatcher = Dispatcher(self.context)
        dispatcher.add_module(mbox)
        dispatcher.add_module(smtp)
        delivery = self.delivery(dispatcher)

        async def go() -> None:
            ids = self.queue("MBOX", MBOX_TYPE, 3)
            self.queue("SMTP", SMTP_TYPE, 2)
            before = [meta for _, meta, _ in self.store.items(delivery_queue("MBOX"))]
            delivered = []
            for _ in range(3):
                delivered.append(await delivery.flush())
                self.clock.advance(3600)
            self.assertEqual(delivered, [2, 0, 0])  # SMTP's
            self.assertEqual(mbox.delivered, [])
            self.assertEqual(self.store.ids(delivery_queue("MBOX")), ids)
            after = [meta for _, meta, _ in self.store.items(delivery_queue("MBOX"))]
            self.assertEqual(after, before)  # no retry counted against them
            self.assertEqual(delivery.paused_modules, ["MBOX"])
            self.assertIn(os.path.join(self.folder, "mail"), self.usage.asked)
            self.free[0] = 100 * MB
            self.clock.advance(1)
            self.assertEqual(await delivery.flush(), 3)
            self.assertEqual(len(mbox.delivered), 3)
            self.assertEqual(delivery.paused_modules, [])
            self.assertEqual(self.log.levels(), ["warn", "info"])
            self.assertIn("MBOX", self.log.lines[0][2]["stage"])

        return defer.ensureDeferred(go())

    def test_space_is_checked_before_each_item(self) -> None:
        """Free space shrinks by an item per delivery: the module stops at
        the floor within the round; the rest wait for the next."""
        mbox = LocalRecorder("MBOX", MBOX_TYPE, self.folder)
        dispatcher = Dispatcher(self.context)
        dispatcher.add_module(mbox)
        delivery = self.delivery(dispatcher)
        floor = 50 * MB
        self.usage = usage_of(lambda: floor + 5 * ITEM_BYTES // 2 - ITEM_BYTES * len(mbox.delivered))
        delivery.usage = self.usage

        async def go() -> None:
            self.queue("MBOX", MBOX_TYPE, 5)
            self.assertEqual(await delivery.flush(), 3)
            self.assertEqual(self.store.count(delivery_queue("MBOX")), 2)
            self.assertEqual(delivery.paused_modules, ["MBOX"])

        return defer.ensureDeferred(go())

    def test_fragments_wait_and_are_not_dropped(self) -> None:
        """FRAGMENT retries nothing (a RETRY would drop its item): while
        short of space it is skipped instead, and stores the fragment
        once space is back."""
        aliases = os.path.join(self.folder, "aliases")
        with open(aliases, "w") as f:
            f.write("alice: alice@example.org\n")
        dispatcher = build_dispatcher({
            "Delivery/Fragmented": {"Enabled": "yes", "MaximumSize": "64K"},
            "Delivery/MBOX": {"Enabled": "yes", "ReturnAddress": "exit@example.org",
                              "RemoveContact": "exit@example.org", "AddressFile": aliases,
                              "MboxFile": os.path.join("mail", "alice.mbox")},
        }, self.context, find_exit_modules())
        self.addCleanup(dispatcher.stop)
        delivery = self.delivery(dispatcher)
        fragment = dispatcher.module_named("FRAGMENT")
        # Completed messages go to the node's queue of MBOX, whose own
        # folder pauses MBOX alone.
        self.assertEqual(fragment.local_paths(), [os.path.join(self.folder, "deliver", "FRAGMENT")])

        async def go() -> None:
            [packet_id] = self.store.add_many(
                delivery_queue("FRAGMENT"), [lone_fragment(1)], now=5000,
                meta=[encode_item(DeliveryItem(FRAGMENT_TYPE, b"", b""))])
            await delivery.flush()
            self.clock.advance(3600)
            await delivery.flush()
            self.assertEqual(self.store.ids(delivery_queue("FRAGMENT")), [packet_id])
            self.assertEqual(self.stats["FragmentStored"], 0)
            self.assertEqual(delivery.paused_modules, ["FRAGMENT", "MBOX"])
            self.free[0] = 100 * MB
            self.clock.advance(1)
            await delivery.flush()
            self.assertEqual(self.store.count(delivery_queue("FRAGMENT")), 0)
            self.assertEqual(self.stats["FragmentStored"], 1)
            self.assertEqual(delivery.paused_modules, [])

        return defer.ensureDeferred(go())

    def test_an_mta_module_never_checks_the_disk(self) -> None:
        smtp = Recorder("SMTP", SMTP_TYPE)
        dispatcher = Dispatcher(self.context)
        dispatcher.add_module(smtp)
        delivery = self.delivery(dispatcher)

        async def go() -> None:
            self.queue("SMTP", SMTP_TYPE, 2)
            self.assertEqual(await delivery.flush(), 2)
            self.assertEqual(self.usage.asked, [])
            self.assertEqual(delivery.disk, {})

        return defer.ensureDeferred(go())
