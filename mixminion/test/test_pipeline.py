"""The node's pipeline stages, one at a time, on a real packet store.

Processing, mixing, the outgoing queue and delivery each get their input
put straight into the store.  Nothing waits on the real clock: time is a
``task.Clock``, the stores' worker threads run in place
(:mod:`mixminion.testing.threads`), and the tests of the real processing
child and of the sink's real worker thread await the Deferreds those fire.
"""

from __future__ import annotations

import os
from collections import Counter
import shutil
from concurrent.futures import ThreadPoolExecutor

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from mixminion.codec.build import build_forward_packet, encode_message_payloads
from mixminion.codec.process import PacketProcessor
from mixminion.codec.header import Hop
from mixminion.codec.routing import MBOX_TYPE, SMTP_TYPE, HostInfo

from mixminion.exits.context import ExitContext
from mixminion.exits.interfaces import ExitModuleBase
from mixminion.exits.items import DeliveryResult
from mixminion.exits.registry import Dispatcher
from mixminion.mmtp.initiator import ConnectionFailed, NextHop
from mixminion.server.childmessages import Batch
from mixminion.server.delivery import Delivery
from mixminion.server.items import DeliveryItem, decode_item, encode_item
from mixminion.server.mixing import Mixer
from mixminion.server.outgoing import Outgoing
from mixminion.server.packetstore import PacketStore, PacketStoreError
from mixminion.server.mix_algorithm import TimedMix
from mixminion.server.draining import (
    CONSUMED_KEY,
    Share,
    consumed_through,
    drain,
    everything_through,
    open_incoming,
)
from mixminion.server.incoming_log import IncomingLog
from mixminion.server.processing import ProcessingWorkers, Processor
from mixminion.server.queues import INCOMING, MIX, OUT, delivery_queue
from mixminion.server.store_replay import StoreReplayLog
from mixminion.server.stats import NodeStats
from mixminion.testing.fakes import ListSink, scratch_store
from mixminion.testing.keys import key
from mixminion.testing.threads import InPlaceWorker, InPlaceReactor


def _hop(n: int) -> Hop:
    return Hop(key(f"mix{n}").public, HostInfo(f"mix{n}.example.net", 48000 + n, bytes([n]) * 20))


def _packet(exit_type: int = SMTP_TYPE, address: bytes = b"a@example.com") -> bytes:
    [payload] = encode_message_payloads(b"hello\n", os.urandom)
    return build_forward_packet(payload, [_hop(0)], [_hop(1)], exit_type, address,
                                os.urandom).packet


class StoreTestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.store = scratch_store(self)
        self.stats = NodeStats()


class TwoStoreTestCase(StoreTestCase):
    """Processing's two stores: incoming and main."""

    def setUp(self) -> None:
        super().setUp()
        self.incoming = IncomingLog(os.path.join(os.path.dirname(self.store.path), "incoming"))
        self.addCleanup(self.incoming.close)


class ProcessorTests(TwoStoreTestCase):
    """The Twisted side with a real processing child process."""

    def setUp(self) -> None:
        super().setUp()
        self.consumed: list[tuple[int, int]] = []

    def _processor(self) -> Processor:
        processor = Processor(self.incoming.path, self.store.path, reactor, self.stats.count,
                              on_consumed=lambda *a: self.consumed.append(a),
                              restart_delay=0.1)
        processor.committed_through = self.incoming.committed_through
        self.addCleanup(processor.stop)
        return processor

    async def _drain(self, processor: Processor) -> None:
        processor.committed_through = self.incoming.committed_through
        processor.set_keys([key("mix0")])
        await processor.wait_idle()

    def test_relay_packets_reach_the_pool_with_their_next_hop(self) -> None:
        packets = [_packet() for _ in range(3)]
        ids = self.incoming.add_many(packets)
        d = defer.ensureDeferred(self._drain(self._processor()))

        def check(_):
            items = self.store.items(MIX)
            self.assertEqual(len(items), 3)
            for _id, meta, _added in items:
                item, _ = decode_item(meta)
                self.assertEqual(item, NextHop("mix1.example.net", 48001, bytes([1]) * 20))
            self.assertEqual(self.stats["ProcessedRelay"], 3)
            self.assertEqual(self.consumed, [(ids[-1], 3)])
            self.assertEqual(consumed_through(self.store), ids[-1])

        return d.addCallback(check)

    def test_replayed_packet_is_refused_and_nothing_is_queued_twice(self) -> None:
        packet = _packet()
        self.incoming.add_many([packet, packet])
        d = defer.ensureDeferred(self._drain(self._processor()))

        def check(_):
            self.assertEqual(self.store.count(MIX), 1)
            self.assertEqual(self.stats["Rejected:replay"], 1)

        return d.addCallback(check)

    def test_a_killed_child_is_restarted_and_loses_nothing(self) -> None:
        processor = self._processor()

        async def go():
            await self._drain(processor)  # the child is up and idle
            processor._child.transport.signalProcess("KILL")
            processor.committed_through = self.incoming.add_many([_packet() for _ in range(4)])[-1]
            # fires once a child has drained the four: the killed one cannot
            await processor.wait_idle()
            self.assertEqual(processor.starts, 2)
            self.assertEqual(self.store.count(MIX), 4)
            self.assertEqual(self.stats["ProcessedRelay"], 4)

        return defer.ensureDeferred(go())

    def test_two_workers_share_the_packets_and_report_one_mark(self) -> None:
        """``ProcessingWorkers: 2``: two children, each its share; the node
        hears the common mark advance, and a count for every packet."""
        workers = ProcessingWorkers(self.incoming.path, self.store.path, reactor,
                                    self.stats.count, workers=2)
        workers.on_consumed = lambda *a: self.consumed.append(a)
        self.addCleanup(workers.stop)
        packet = _packet()
        ids = self.incoming.add_many([_packet() for _ in range(9)] + [packet, packet])
        workers.start_from(self.store, 0, 0)

        async def go():
            workers.stored(ids)
            workers.set_keys([key("mix0")])
            await workers.wait_idle()
            self.assertEqual([w.starts for w in workers.workers], [1, 1])
            self.assertEqual(self.store.count(MIX), 10)
            self.assertEqual((self.stats["ProcessedRelay"], self.stats["Rejected:replay"]),
                             (10, 1))
            self.assertEqual(max(through for through, _ in self.consumed), ids[-1])
            self.assertEqual(sum(count for _, count in self.consumed), 11)
            self.assertEqual(consumed_through(self.store, 2), ids[-1])

        return defer.ensureDeferred(go())

    def test_stop_ends_the_child(self) -> None:
        processor = self._processor()

        async def go():
            await self._drain(processor)
            child = processor._child
            await processor.stop()
            self.assertIsNone(processor._child)
            self.assertIsNotNone(child.transport.status)  # the process has exited

        return defer.ensureDeferred(go())


    def test_the_node_waits_for_a_child_of_a_killed_node(self) -> None:
        """A processing child outliving its node holds the lock; the next
        node's start-up recovery waits for it."""
        import fcntl
        import subprocess
        import sys

        from mixminion.server import processing_child
        from mixminion.server.processing_child import processing_lock

        lock = os.path.join(os.path.dirname(self.store.path), "processing.lock")
        holder = subprocess.Popen(
            [sys.executable, "-c", "import sys\n"
             "from mixminion.server.processing_child import processing_lock\n"
             f"with processing_lock({lock!r}):\n"
             "    print('held', flush=True); sys.stdin.read()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.addCleanup(holder.wait)
        self.addCleanup(holder.stdout.close)
        self.addCleanup(holder.stdin.close)  # lets it go if the test fails first
        self.assertEqual(holder.stdout.readline(), b"held\n")
        blocking: list[int] = []
        real_flock = fcntl.flock

        def flock(f, operation: int) -> None:
            if operation == fcntl.LOCK_EX:  # about to wait: let the holder go
                blocking.append(operation)
                holder.stdin.close()
            real_flock(f, operation)

        self.patch(processing_child.fcntl, "flock", flock)
        with processing_lock(lock) as waited:
            self.assertTrue(waited)
        self.assertEqual(blocking, [fcntl.LOCK_EX])
        with processing_lock(lock) as waited:
            self.assertFalse(waited)
        self.assertEqual(os.stat(lock).st_mode & 0o777, 0o600)


class DrainingTestCase(TwoStoreTestCase):
    """The batch logic the child runs, called directly."""

    def setUp(self) -> None:
        super().setUp()
        self.processor = PacketProcessor(
            [(key("mix0"), StoreReplayLog(self.store, key("mix0").public.keyid))])

    def _drain(self, batch_size: int = 16) -> list:
        return list(drain(self.incoming, self.store, self.processor, batch_size,
                          lambda: 123.0, through=self.incoming.committed_through))


class DrainingTests(DrainingTestCase):
    def test_batches_commit_in_order_with_the_consumed_mark(self) -> None:
        ids = self.incoming.add_many([_packet() for _ in range(5)])
        with ThreadPoolExecutor(1) as opener:
            done = list(drain(self.incoming, self.store, self.processor, 2, lambda: 123.0,
                              opener, ids[-1]))
        self.assertEqual([(b.through, b.count) for b in done],
                         [(ids[1], 2), (ids[3], 2), (ids[4], 1)])
        self.assertEqual(sum(b.counts["ProcessedRelay"] for b in done), 5)
        self.assertEqual(consumed_through(self.store), ids[4])
        self.assertEqual({added for _, _, added in self.store.items(MIX)}, {123.0})

    def test_a_drain_goes_on_to_what_is_committed_meanwhile(self) -> None:
        """``more`` is asked before each batch, and once more when the last
        batch found nothing: packets committed during a drain are processed
        in it, not left for the next one."""
        ids = self.incoming.add_many([_packet() for _ in range(2)])
        asked: list[int] = []

        def more() -> int:
            asked.append(len(asked))
            if len(asked) == 3:  # after the first batch found nothing beyond itself
                ids.extend(self.incoming.add_many([_packet() for _ in range(3)]))
            return ids[-1]

        with ThreadPoolExecutor(1) as opener:
            done = list(drain(self.incoming, self.store, self.processor, 2, lambda: 123.0,
                              opener, ids[1], more=more))
        self.assertEqual([(b.through, b.count) for b in done],
                         [(ids[1], 2), (ids[3], 2), (ids[4], 1)])
        self.assertEqual(consumed_through(self.store), ids[4])

    def test_a_damaged_record_is_dropped_and_counted(self) -> None:
        """A record damaged on disk after its commit cannot be processed;
        it is counted and passed, not retried for ever (which would stop
        processing and fill the queue)."""
        ids = self.incoming.add_many([_packet() for _ in range(3)])
        segment, offset = self.incoming._locate(ids[1])
        with open(self.incoming._segment_path(segment), "r+b") as f:
            f.seek(offset + 5000)
            f.write(b"\xff\x00\xff")
        with ThreadPoolExecutor(1) as opener:
            done = list(drain(self.incoming, self.store, self.processor, 16, lambda: 123.0,
                              opener, ids[-1]))
        self.assertEqual([(b.through, b.count) for b in done], [(ids[2], 3)])
        self.assertEqual((done[0].counts["ProcessedRelay"], done[0].counts["DroppedDamaged"]),
                         (2, 1))
        self.assertEqual(consumed_through(self.store), ids[2])
        self.assertEqual(self.store.count(MIX), 2)

    def test_a_failed_batch_leaves_everything_in_place(self) -> None:
        """Replay entries, results and the consumed mark commit together,
        or not at all."""
        self.incoming.add_many([_packet()])
        original = self.store.add_many

        def broken(*args, **kwargs):
            raise OSError("disk gone")

        self.store.add_many = broken  # type: ignore[method-assign]
        self.assertRaises(OSError, self._drain)
        self.store.add_many = original  # type: ignore[method-assign]
        self.assertEqual(self.store.count(MIX), 0)
        self.assertEqual(consumed_through(self.store), 0)
        # The replay entry rolled back too: the packet still processes.
        [done] = self._drain()
        self.assertEqual(done.counts["ProcessedRelay"], 1)

    def test_packets_up_to_the_consumed_mark_are_never_processed_again(self) -> None:
        """A crash after processing committed but before the incoming
        packets were removed: the next drain skips them, and reopening the
        log (as the node does at start-up) removes them."""
        ids = self.incoming.add_many([_packet() for _ in range(3)])
        self._drain()
        self.assertEqual(self.incoming.count(), 3)  # the node removes them later
        self.assertEqual(self._drain(), [])
        self.assertEqual(self.store.count(MIX), 3)
        self.incoming.close()
        self.incoming = open_incoming(self.incoming.directory, self.store)
        self.addCleanup(self.incoming.close)
        self.assertEqual(self.incoming.count(), 0)
        later = self.incoming.add_many([_packet()])
        self.assertGreater(later[0], ids[-1])
        self.assertEqual(len(self._drain()), 1)

    def test_a_recreated_incoming_log_does_not_reuse_consumed_ids(self) -> None:
        self.incoming.add_many([_packet() for _ in range(3)])
        self._drain()
        self.incoming.close()
        shutil.rmtree(self.incoming.directory)
        self.incoming = open_incoming(self.incoming.directory, self.store)
        self.addCleanup(self.incoming.close)
        self.assertEqual(self.incoming.add_many([_packet()]), [4])
        [done] = self._drain()
        self.assertEqual(done.counts["ProcessedRelay"], 1)
        self.assertEqual(self.store.count(MIX), 4)

    def test_packets_queued_in_the_main_store_by_an_older_version_move_over(self) -> None:
        self.store.add_many(INCOMING, [_packet(), _packet()])
        self.incoming.close()
        self.incoming = open_incoming(self.incoming.directory, self.store)
        self.addCleanup(self.incoming.close)
        self.assertEqual(self.store.count(INCOMING), 0)
        self.assertEqual(self.incoming.count(), 2)
        self.assertEqual(sum(b.count for b in self._drain()), 2)


class ShareTests(unittest.TestCase):
    """Which ids each of N processing workers takes, and what is done."""

    def test_shares_split_the_ids(self) -> None:
        shares = [Share(i, 3) for i in range(3)]
        taken = sorted(i for share in shares for i in share.ids(0, 20, 100))
        self.assertEqual(taken, list(range(1, 21)))
        self.assertEqual(Share(1, 3).ids(0, 20, 3), [1, 4, 7])
        self.assertEqual(Share(1, 3).ids(4, 20, 100), [7, 10, 13, 16, 19])
        self.assertEqual(Share(0, 3).ids(4, 5, 10), [])
        self.assertEqual(Share().ids(4, 9, 3), [5, 6, 7])
        self.assertEqual(Share(2, 3).count_between(2, 11), 3)  # 5, 8, 11
        self.assertEqual(Share(0, 1).key, CONSUMED_KEY)
        self.assertEqual(Share(1, 2).key, CONSUMED_KEY + "/1/2")
        self.assertRaises(ValueError, Share, 2, 2)

    def test_everything_through_is_the_first_gap_minus_one(self) -> None:
        self.assertEqual(everything_through([7]), 7)
        self.assertEqual(everything_through([100, 99]), 100)  # 101 is worker 1's next
        self.assertEqual(everything_through([100, 51]), 52)  # 53 is worker 1's next
        self.assertEqual(everything_through([0, 0]), 0)
        self.assertEqual(everything_through([0, 1]), 1)


class WorkerDrainingTests(DrainingTestCase):
    """Two workers' drains over one incoming log and one store."""

    def _drain_share(self, share: Share, batch_size: int = 16) -> list:
        return list(drain(self.incoming, self.store, self.processor, batch_size,
                          lambda: 123.0, through=self.incoming.committed_through, share=share))

    def test_each_worker_processes_its_share_once(self) -> None:
        ids = self.incoming.add_many([_packet() for _ in range(7)])
        first = self._drain_share(Share(0, 2), 2)
        self.assertEqual([b.through for b in first], [ids[3], ids[5]])  # 2, 4 | 6
        self.assertEqual(consumed_through(self.store, 2), 0)  # id 1 is worker 1's
        second = self._drain_share(Share(1, 2), 2)
        self.assertEqual([b.through for b in second], [ids[2], ids[6]])  # 1, 3 | 5, 7
        self.assertEqual(consumed_through(self.store, 2), ids[6])
        self.assertEqual(self.store.count(MIX), 7)
        self.assertEqual(self._drain_share(Share(0, 2)) + self._drain_share(Share(1, 2)), [])

    def test_a_replay_across_workers_is_processed_once(self) -> None:
        """The shared replay log: the same packet at an id of each share."""
        packet = _packet()
        self.incoming.add_many([packet, packet])
        [one] = self._drain_share(Share(1, 2))
        [other] = self._drain_share(Share(0, 2))
        self.assertEqual((one.counts["ProcessedRelay"], other.counts["Rejected:replay"]), (1, 1))
        self.assertEqual(self.store.count(MIX), 1)

    def test_a_new_number_of_workers_starts_from_what_all_had_done(self) -> None:
        """Worker 0 of 2 went ahead; with one worker the node starts after
        the first gap, and what worker 0 had done above it is refused as a
        replay, not processed twice."""
        self.incoming.add_many([_packet() for _ in range(6)])
        self._drain_share(Share(0, 2))  # 2, 4, 6
        self.store.set_value(Share(1, 2).key, b"1")  # worker 1 did only 1
        self.incoming.close()
        self.incoming = open_incoming(self.incoming.directory, self.store, 1)
        self.addCleanup(self.incoming.close)
        self.assertEqual(consumed_through(self.store), 2)
        self.assertEqual(self.store.values_named(CONSUMED_KEY + "/"), {})
        self.assertEqual(self.incoming.count(), 4)  # 3-6
        [done] = self._drain()
        self.assertEqual((done.counts["ProcessedRelay"], done.counts["Rejected:replay"]), (2, 2))
        self.assertEqual(self.store.count(MIX), 5)  # 2, 4, 6 and 3, 5 (1 was never here)

    def test_new_ids_start_above_every_workers_mark(self) -> None:
        """Worker 0 of 2 processed 2, 4, 6, worker 1 only 1, and records 5
        and 6 were damaged on disk since: the log's last good record is 4,
        but new packets must not get ids 5 and 6 (worker 0 would skip 6,
        and the common mark would then pass it unprocessed)."""
        self.incoming.add_many([_packet() for _ in range(6)])
        self._drain_share(Share(0, 2))
        self.store.set_value(Share(1, 2).key, b"1")
        self.incoming.close()
        for packet_id in (5, 6):
            segment, offset = self.incoming._locate(packet_id)
            with open(self.incoming._segment_path(segment), "r+b") as f:
                f.seek(offset + 100)
                f.write(b"X" * 10)
        self.incoming = open_incoming(self.incoming.directory, self.store, 2)
        self.addCleanup(self.incoming.close)
        self.assertEqual(self.incoming.add_many([_packet(), _packet()]), [7, 8])
        counts: Counter = Counter()
        for share in (Share(0, 2), Share(1, 2)):
            for done in self._drain_share(share):
                counts.update(done.counts)
        self.assertEqual((counts["ProcessedRelay"], counts["DroppedDamaged"]), (3, 1))  # 3 5 7 8
        self.assertEqual(consumed_through(self.store, 2), 8)

    def test_records_a_worker_had_processed_are_not_counted_as_queued(self) -> None:
        self.incoming.add_many([_packet() for _ in range(6)])
        self._drain_share(Share(0, 2))  # 2, 4, 6; 1, 3, 5 wait
        workers = ProcessingWorkers(self.incoming.path, self.store.path, None, self.stats.count,
                                    workers=2)
        self.assertEqual(workers.start_from(self.store, 6, 0), 3)
        self.assertEqual([w.consumed_through for w in workers.workers], [6, 0])
        self.assertEqual(self.incoming.count(), 6)  # the log keeps 2 4 6 behind 1
        self.assertEqual(workers.waiting(6), 3)  # the queue: 1 3 5
        workers.workers[1].on_consumed(3, 2)  # worker 1 reports 1 and 3
        self.assertEqual(workers.waiting(6), 1)
        self.assertEqual(workers.waiting(8), 3)  # 7 and 8 came: 5 7 8

    def test_a_commit_wakes_only_the_workers_whose_ids_it_holds(self) -> None:
        workers = ProcessingWorkers(self.incoming.path, self.store.path, None, self.stats.count,
                                    workers=2)
        told: list[tuple[int, list[int]]] = []
        for worker in workers.workers:
            worker.stored = lambda ids, i=worker.share.index: told.append((i, list(ids)))
        workers.stored([7])
        workers.stored([8, 9, 10])
        workers.stored([])
        self.assertEqual(told, [(1, [7]), (0, [8, 10]), (1, [9])])

    def test_the_same_number_of_workers_keeps_their_marks(self) -> None:
        self.incoming.add_many([_packet() for _ in range(4)])
        self._drain_share(Share(0, 2))
        self.incoming.close()
        self.incoming = open_incoming(self.incoming.directory, self.store, 2)
        self.addCleanup(self.incoming.close)
        self.assertEqual(self.incoming.count(), 4)  # 1 is not done: nothing removed
        self.assertEqual(self._drain_share(Share(0, 2)), [])
        [done] = self._drain_share(Share(1, 2))
        self.assertEqual((done.counts["ProcessedRelay"], done.counts.get("Rejected:replay", 0)),
                         (2, 0))


class MixerTests(StoreTestCase):
    def test_timed_mix_moves_everything_at_the_interval(self) -> None:
        clock = task.Clock()
        relay = encode_item(NextHop("h", 1, bytes(20)))
        mbox = encode_item(DeliveryItem(MBOX_TYPE, bytes(20) + b"nym", bytes(16)))
        unknown = encode_item(DeliveryItem(0x0999, bytes(20) + b"x", bytes(16)))
        self.store.add_many(MIX, [b"r" * 10, b"m" * 10, b"u" * 10], meta=[relay, mbox, unknown])
        flushed = []
        mixer = Mixer(self.store, TimedMix(), 60, clock,
                      {MBOX_TYPE: "MBOX"},
                      self.stats.count, lambda: flushed.append(True))
        mixer.start()
        self.addCleanup(mixer.stop)
        clock.advance(59)
        self.assertEqual(self.store.count(MIX), 3)
        clock.advance(1)
        self.assertEqual(self.store.count(MIX), 0)
        self.assertEqual(self.store.count(OUT), 1)
        self.assertEqual(self.store.count(delivery_queue("MBOX")), 1)
        self.assertEqual(self.store.count(), 2)
        self.assertEqual(self.stats["DroppedUnknownExitType"], 1)
        self.assertEqual(flushed, [True])


class FakeClient:
    """Stands in for MMTPClient: each send returns a Deferred the test fires."""

    def __init__(self) -> None:
        self.sent: list[tuple[NextHop, bytes, defer.Deferred]] = []

    def send_packet(self, dest: NextHop, packet: bytes) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.sent.append((dest, packet, d))
        return d


class OutgoingTests(StoreTestCase):
    def _outgoing(self, clock: InPlaceReactor, client, schedule=(60, 60)) -> Outgoing:
        """An Outgoing whose removals from the store run in place."""
        self.to_self = ListSink()
        out = Outgoing(self.store, client, schedule, clock, b"\x07" * 20, self.stats.count,
                       self.to_self, worker=InPlaceWorker())
        self.addCleanup(out.stop)
        return out

    def test_success_removes_failure_waits_for_the_address_retry(self) -> None:
        clock = InPlaceReactor()
        clock.advance(1000)
        client = FakeClient()
        meta = encode_item(NextHop("127.0.0.1", 5000, b"\x01" * 20))
        ids = self.store.add_many(OUT, [b"a" * 32768, b"b" * 32768], now=1000, meta=[meta, meta])
        out = self._outgoing(clock, client)
        self.assertEqual(out.flush(), 2)
        self.assertEqual(out.flush(), 0)  # in flight: not sent twice
        client.sent[0][2].callback(None)
        client.sent[1][2].errback(ConnectionFailed("down"))
        clock.advance(0)  # the removal's result comes back
        self.assertEqual(self.store.ids(OUT), [ids[1]])
        clock.advance(30)
        self.assertEqual(out.flush(), 0)  # the address waits for its retry
        clock.advance(31)
        self.assertEqual(out.flush(), 1)

    def test_packets_for_ourselves_go_back_to_incoming_and_old_ones_expire(self) -> None:
        clock = InPlaceReactor()
        clock.advance(10_000)
        mine = encode_item(NextHop("127.0.0.1", 5000, b"\x07" * 20))
        other = encode_item(NextHop("127.0.0.1", 5001, b"\x02" * 20))
        self.store.add_many(OUT, [b"x" * 10], now=10_000, meta=[mine])
        self.store.add_many(OUT, [b"y" * 10], now=100, meta=[other])
        out = self._outgoing(clock, FakeClient())
        self.to_self.refusing = True  # our incoming log is full: the packet waits
        self.assertEqual(out.flush(), 0)
        clock.advance(0)
        self.assertEqual(self.to_self.packets, [])
        self.assertEqual(self.store.count(OUT), 1)
        self.assertEqual(self.stats["ExpiredRelay"], 1)
        self.to_self.refusing = False
        self.assertEqual(out.flush(), 0)
        self.assertEqual(self.to_self.packets, [b"x" * 10])
        clock.advance(0)  # the removal's result comes back
        self.assertEqual(self.store.count(OUT), 0)
        self.assertEqual(self.stats["RelayedToSelf"], 1)


class ScriptedModule(ExitModuleBase):
    """An exit module whose answers the test scripts."""

    name = "MBOX"
    exit_types = frozenset({MBOX_TYPE})
    retry_schedule = (100, 100)

    def __init__(self, answers) -> None:
        self.answers = list(answers)
        self.items = []

    def deliver(self, item):
        self.items.append(item)
        return defer.succeed(self.answers.pop(0))


class DeliveryTests(StoreTestCase):
    async def _deliver_scripted(self, answers, steps):
        clock = task.Clock()
        clock.advance(5000)
        module = ScriptedModule(answers)
        dispatcher = Dispatcher(ExitContext(base_dir=self.mktemp(), clock=clock,
                                            reactor=reactor, counters=self.stats))
        dispatcher.add_module(module)
        delivery = Delivery(self.store, dispatcher, clock, self.stats.count)
        [payload] = encode_message_payloads(b"to the nym\n", os.urandom)
        meta = encode_item(DeliveryItem(MBOX_TYPE, b"T" * 20 + b"nym", bytes(16)))
        self.store.add_many(delivery_queue("MBOX"), [payload], now=5000, meta=[meta])
        for advance in steps:
            clock.advance(advance)
            await delivery.flush()
        return module

    def test_retry_then_success(self) -> None:
        async def go():
            module = await self._deliver_scripted([DeliveryResult.RETRY, DeliveryResult.OK], [0, 50, 60])
            self.assertEqual(len(module.items), 2)  # not retried before its time
            self.assertEqual(module.items[0].address, b"nym")
            self.assertEqual(module.items[0].tag, b"T" * 20)
            self.assertEqual(self.store.count(), 0)
            self.assertEqual(self.stats["ExitRetry:MBOX"], 1)
            self.assertEqual(self.stats["ExitDelivered:MBOX"], 1)

        return defer.ensureDeferred(go())

    def test_noretry_drops_and_counts(self) -> None:
        async def go():
            await self._deliver_scripted([DeliveryResult.NORETRY], [0])
            self.assertEqual(self.store.count(), 0)
            self.assertEqual(self.stats["ExitFailed:MBOX"], 1)

        return defer.ensureDeferred(go())

    def test_retries_run_out(self) -> None:
        from twisted.logger import formatEvent, globalLogPublisher

        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)

        async def go():
            module = await self._deliver_scripted([DeliveryResult.RETRY] * 3, [0, 100, 100, 100])
            self.assertEqual(len(module.items), 3)
            self.assertEqual(self.store.count(), 0)
            self.assertEqual(self.stats["Expired:MBOX"], 1)
            said = [formatEvent(e) for e in events if "retry schedule" in formatEvent(e)]
            self.assertEqual(said, ["MBOX: dropped 1 undelivered message(s) whose retry schedule "
                                    "ran out"])

        return defer.ensureDeferred(go())


class SinkBoundTests(TwoStoreTestCase):
    """The sink in front of the incoming log, as the node has it."""

    def test_a_full_incoming_queue_refuses_until_processing_drains_it(self) -> None:
        """With the sink's real worker thread: each packet's Deferred fires
        once the thread has committed it."""
        from mixminion.server.durable import DurableSink, SinkRefused

        sink = DurableSink(self.incoming, reactor, max_queued=2)
        self.addCleanup(sink.stop)

        async def go():
            await sink.receivePacket(b"a" * 32768, "peer")
            await sink.receivePacket(b"b" * 32768, "peer")
            with self.assertRaises(SinkRefused):
                await sink.receivePacket(b"c" * 32768, "peer")
            self.assertEqual(sink.refused, 1)
            sink.removed(1)
            await sink.receivePacket(b"d" * 32768, "peer")
            self.assertEqual(self.incoming.count(), 3)

        return defer.ensureDeferred(go())


    def test_consumed_packets_are_deleted_by_the_next_commit(self) -> None:
        from mixminion.server.durable import DurableSink

        clock = InPlaceReactor()
        sink = DurableSink(self.incoming, clock, max_queued=3, worker=InPlaceWorker())
        self.addCleanup(sink.stop)

        def receive(packet: bytes) -> int:
            d = sink.receivePacket(packet, "peer")
            clock.advance(0)  # the commit's result comes back
            return self.successResultOf(d)

        ids = [receive(bytes([i]) * 32768) for i in range(3)]
        sink.consumed(ids[1], 2)  # processing committed the first two
        receive(b"d" * 32768)  # room again
        self.assertEqual(self.incoming.get_many(self.incoming.ids()),
                         [bytes([2]) * 32768, b"d" * 32768])
        sink.consumed(ids[2], 1)  # with nothing arriving, a commit of its own
        self.assertEqual(self.incoming.count(), 1)
        clock.advance(0)  # its result comes back: nothing left to wait for
        self.successResultOf(sink.stop())


class SinkDiskTests(TwoStoreTestCase):
    def test_too_little_free_disk_answers_refused(self) -> None:
        """A full disk makes MMTP answer REJECTED instead of crashing."""
        from mixminion.server.durable import DurableSink, SinkRefused

        sink = DurableSink(self.incoming, InPlaceReactor(), min_free_bytes=1 << 62, worker=InPlaceWorker())
        self.addCleanup(sink.stop)
        self.failureResultOf(sink.receivePacket(b"a" * 32768, "peer"), SinkRefused)
        self.assertEqual(self.incoming.count(), 0)

    def test_free_space_is_read_at_most_every_quarter_second_and_errs_low(self) -> None:
        from collections import namedtuple

        from mixminion.server import durable

        clock, reads = task.Clock(), []
        usage = namedtuple("usage", "total used free")

        def disk_usage(path):
            reads.append(clock.seconds())
            return usage(0, 0, 20 * 32768)

        sink = durable.DurableSink(self.incoming, clock, min_free_bytes=10 * 32768)
        sink.free_space.usage = disk_usage
        self.assertEqual([sink._refusal() for _ in range(11)], [None] * 11)
        self.assertEqual(len(reads), 1)  # the estimate counts the 11 taken down
        self.assertIsNone(sink._refusal())  # estimate under the minimum: read again
        self.assertEqual(len(reads), 2)
        clock.advance(0.25)
        sink._refusal()
        self.assertEqual(len(reads), 3)

        def full(path):
            reads.append(clock.seconds())
            return usage(0, 0, 32768)

        sink.free_space.usage = full
        clock.advance(0.25)
        self.assertIn("below the configured minimum", sink._refusal())


class FailureHandlingTests(TwoStoreTestCase):
    """Error paths found in review: none may lose packets or stop a stage."""

    def test_a_short_body_write_rolls_the_rows_back(self) -> None:
        from mixminion.server import bodies

        store = PacketStore(os.path.join(os.path.dirname(self.store.path), "b.db"),
                            body_dir=os.path.join(os.path.dirname(self.store.path), "b"))
        self.addCleanup(store.close)
        self.patch(bodies.os, "pwritev", lambda fd, buffers, offset: 100)  # disk full
        self.assertRaises(OSError, store.add_many, MIX, [b"x" * 1000])
        self.assertEqual(store.count(), 0)

    def test_a_child_that_cannot_start_is_tried_again(self) -> None:
        clock = task.Clock()
        attempts: list[object] = []

        class Reactor:
            callLater = clock.callLater
            seconds = clock.seconds

            def spawnProcess(self, proto, *args, **kwargs):  # noqa: N802
                attempts.append(proto)
                if len(attempts) == 1:
                    raise OSError("Too many open files")
                proto.transport = None

        processor = Processor(self.incoming.path, self.store.path, Reactor(), self.stats.count,
                              restart_delay=1.0)
        processor.set_keys([key("mix0")])
        self.assertEqual(len(attempts), 1)
        self.assertIsNone(processor._child)
        clock.advance(1.0)
        self.assertEqual(len(attempts), 2)
        self.assertIs(processor._child, attempts[1])

    def test_consumed_counts_come_from_ids_so_a_lost_report_is_counted(self) -> None:
        consumed = []
        processor = Processor(self.incoming.path, self.store.path, reactor, self.stats.count,
                              on_consumed=lambda *a: consumed.append(a))
        processor.consumed_through = 10
        # The report for ids 11-14 died with a killed child; this one is 15-16.
        processor._message(Batch(16, {}))
        self.assertEqual(consumed, [(16, 6)])

    def test_failing_to_overwrite_consumed_records_does_not_stop_reception(self) -> None:
        ids = self.incoming.add_many([_packet(), _packet()])

        def broken(last_id):
            raise OSError("I/O error")

        self.patch(self.incoming, "remove_through", broken)
        [new] = self.incoming.write([_packet()], 0.0, ids[-1])
        self.assertEqual(new, ids[-1] + 1)
        self.assertIsInstance(self.incoming.removal_error, OSError)

    def test_a_failing_flush_after_a_mix_does_not_stop_mixing(self) -> None:
        clock = task.Clock()
        calls = []

        def flush() -> None:
            calls.append(clock.seconds())
            raise PacketStoreError("database is locked")

        mixer = Mixer(self.store, TimedMix(), 60, clock, {}, self.stats.count, flush)
        mixer.start()
        self.addCleanup(mixer.stop)
        clock.advance(60)
        clock.advance(60)
        self.assertEqual(calls, [60, 120])
        self.assertEqual(len(self.flushLoggedErrors(PacketStoreError)), 2)
