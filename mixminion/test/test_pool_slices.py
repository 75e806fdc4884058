"""Issue 12 point 9: releasing a pool of any size keeps the reactor free.

Releasing 60,000 packets read and decoded the whole pool on the reactor
thread to choose the batch, then the whole outgoing queue to flush it:
the node answered nothing for seconds.  Now the mix does its reading and
choosing in its worker, and a flush reads the outgoing queue a slice per
reactor call.  These tests check the structure, not the time: which
thread does what, how many rows one reactor call reads, that nothing is
lost or sent twice, and that a flush read in slices sends exactly what
one read in a single pass sends (the fairness of the outgoing queue is
unchanged).

Everything runs on a ``task.Clock``; worker threads are stood in for by
:class:`~mixminion.testing.threads.InPlaceWorker`, whose results reach the
clock's next turn as a real thread's reach the reactor.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Optional

from twisted.internet import defer
from twisted.logger import LogLevel
from twisted.trial import unittest

from mixminion.codec.routing import MBOX_TYPE
from mixminion.mmtp.initiator import NextHop
from mixminion.server import mixing, outgoing
from mixminion.server.items import DeliveryItem, encode_item
from mixminion.server.mixing import Mixer, queue_slices
from mixminion.server.outgoing import Outgoing
from mixminion.server.packetstore import PacketStore, PacketStoreError
from mixminion.server.mix_algorithm import CottrellMix, TimedMix
from mixminion.server.queues import MIX, OUT, delivery_queue
from mixminion.server.stats import NodeStats
from mixminion.server.workers import run_in
from mixminion.test.test_mmtp_protocol import LogMixin
from mixminion.testing.fakes import HeldClient, ListSink, scratch_store
from mixminion.testing.threads import InPlaceWorker, InPlaceReactor

OWN_KEYID = b"own key id".ljust(20, b"\0")


class ThreadClock(InPlaceReactor):
    """An :class:`InPlaceReactor` that numbers the calls it runs:
    ``current`` is the number of the one running (None outside), so a test
    can tell what one reactor call did."""

    def __init__(self) -> None:
        super().__init__()
        self.ran = 0
        self.current: Optional[int] = None

    def callLater(self, delay: float, f: Callable[..., Any], *args: Any,  # noqa: N802
                  **kwargs: Any) -> Any:
        def numbered(*a: Any, **kw: Any) -> Any:
            outer, self.ran = self.current, self.ran + 1
            self.current = self.ran
            try:
                return f(*a, **kw)
            finally:
                self.current = outer

        return super().callLater(delay, numbered, *args, **kwargs)


def dest(n: int) -> NextHop:
    return NextHop(f"192.0.2.{n}", 48099, bytes([n]) * 20)


def relay_meta(d: NextHop) -> bytes:
    return encode_item(NextHop(d.host, d.port, d.keyid))


def packet(n: int) -> bytes:
    """Small distinct packets (nothing here looks at their size)."""
    return n.to_bytes(4, "big") * 8


class ReadLog:
    """Wraps a store's ``items``/``ids``: what each call read, whether it
    ran in the worker, and in which call of ``clock`` (None: the test's)."""

    def __init__(self, test: unittest.TestCase, store: PacketStore, clock: ThreadClock,
                 worker: Optional[InPlaceWorker] = None) -> None:
        #: (method, rows, in the worker, clock call)
        self.calls: list[tuple[str, int, bool, Optional[int]]] = []
        for name in ("items", "ids"):
            original = getattr(store, name)

            def wrapped(*args: Any, _name: str = name, _original: Any = original,
                        **kwargs: Any) -> Any:
                rows = _original(*args, **kwargs)
                self.calls.append((_name, len(rows), bool(worker and worker.running),
                                   clock.current))
                return rows

            test.patch(store, name, wrapped)

    def rows(self) -> list[int]:
        return [n for _, n, _, _ in self.calls]

    def per_reactor_call(self) -> list[int]:
        """Rows read on the reactor thread by each of its calls, in order."""
        rows: dict[Optional[int], int] = {}
        for _, n, in_worker, call in self.calls:
            if not in_worker:
                rows[call] = rows.get(call, 0) + n
        return list(rows.values())


class MixerTests(LogMixin):
    def setUp(self) -> None:
        super().setUp()
        self.store = scratch_store(self)
        self.stats = NodeStats()
        self.clock = ThreadClock()
        self.worker = InPlaceWorker()
        self.flushed: list[bool] = []

    def mixer(self, pool: Any, routes: Optional[dict[int, str]] = None,
              read_slice: int = 100) -> Mixer:
        mixer = Mixer(self.store, pool, 60, self.clock, routes or {}, self.stats.count,
                      lambda: self.flushed.append(True),
                      run_write=lambda fn, *args: run_in(self.clock, self.worker, fn, *args))
        mixer.read_slice = read_slice
        self.addCleanup(mixer.stop)
        return mixer

    def fill(self, relays: int, hops: int = 5, mbox: int = 0, unknown: int = 0) -> list[int]:
        metas = ([relay_meta(dest(i % hops)) for i in range(relays)]
                 + [encode_item(DeliveryItem(MBOX_TYPE, bytes(20) + b"nym%d" % i, bytes(16)))
                    for i in range(mbox)]
                 + [encode_item(DeliveryItem(0x0999, bytes(20) + b"x", bytes(16)))] * unknown)
        random.Random(5).shuffle(metas)
        return self.store.add_many(MIX, [packet(i) for i in range(len(metas))], meta=metas)

    def test_the_round_reads_and_chooses_in_the_worker(self) -> None:
        """Reading the pool, choosing and moving happen in the worker; the
        reactor only sorts the chosen exit types by the routing table."""
        self.fill(1000, mbox=50)
        worker = self.worker
        chosen_in: list[bool] = []

        class Watched(TimedMix):
            def choose_batch(self, item_ids):
                chosen_in.append(worker.running)
                return super().choose_batch(item_ids)

        reads = ReadLog(self, self.store, self.clock, worker)
        done = self.mixer(Watched(), {MBOX_TYPE: "MBOX"}).mix()
        self.assertEqual(chosen_in, [True])
        self.assertEqual(reads.per_reactor_call(), [])
        self.clock.advance(0)  # the choice, then the moves' end, reach the reactor
        self.assertEqual(reads.per_reactor_call(), [])
        self.assertEqual(self.successResultOf(done), 1050)
        self.assertEqual(self.store.count(MIX), 0)
        self.assertEqual(self.store.count(OUT), 1000)
        self.assertEqual(self.store.count(delivery_queue("MBOX")), 50)
        self.assertEqual(self.flushed, [True])
        self.assertEqual(self.stats["Mixed"], 1050)

    def test_the_pool_is_read_in_slices(self) -> None:
        self.fill(1050)
        reads = ReadLog(self, self.store, self.clock, self.worker)
        self.mixer(TimedMix(), read_slice=100).mix()
        self.clock.advance(0)
        items = [n for name, n, _, _ in reads.calls if name == "items"]
        self.assertEqual(items, [100] * 10 + [50])
        self.assertEqual([name for name, _, _, _ in reads.calls].count("ids"), 1,
                         "the ids alone, once, for the choice")

    def test_each_distinct_record_is_decoded_once(self) -> None:
        self.fill(2000, hops=4, mbox=3)
        decoded = []
        original = mixing.decode_item
        self.patch(mixing, "decode_item", lambda meta: (decoded.append(meta), original(meta))[1])
        d = self.mixer(TimedMix(), {MBOX_TYPE: "MBOX"}).mix()
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(d), 2003)
        self.assertEqual(len(decoded), 4 + 3)

    def test_the_batch_is_the_pools_choice_over_the_whole_pool(self) -> None:
        """A dynamic pool chooses among every item, whatever the slices:
        exactly its batch moves, nothing is lost or moved twice, and a
        payload no module takes is dropped."""
        ids = self.fill(900, mbox=60, unknown=40)
        expected = set(CottrellMix(100, 0.5, random.Random(9)).choose_batch(ids))
        d = self.mixer(CottrellMix(100, 0.5, random.Random(9)),
                       {MBOX_TYPE: "MBOX"}, read_slice=64).mix()
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(d), len(expected))
        left = set(self.store.ids(MIX))
        moved = set(self.store.ids(OUT)) | set(self.store.ids(delivery_queue("MBOX")))
        self.assertEqual(len(left), 1000 - 500)
        self.assertEqual(set(ids) - left, expected)
        self.assertFalse(left & moved)
        self.assertEqual(len(moved) + self.stats["DroppedUnknownExitType"], len(expected))
        self.assertEqual(self.store.count(), len(left) + len(moved))

    def test_items_that_arrive_after_the_choice_stay_in_the_pool(self) -> None:
        self.fill(300)
        store = self.store

        class ArrivalsMeanwhile(TimedMix):
            def choose_batch(self, item_ids):
                store.add_many(MIX, [b"late"] * 5, meta=[relay_meta(dest(1))] * 5)
                return super().choose_batch(item_ids)

        d = self.mixer(ArrivalsMeanwhile(), read_slice=64).mix()
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(d), 300)
        self.assertEqual(self.store.count(MIX), 5)
        self.assertEqual(self.store.count(OUT), 300)

    def test_a_failed_move_moves_nothing(self) -> None:
        """The moves commit together: one failing leaves the whole pool."""
        self.fill(500, unknown=10)

        def broken(ids):
            raise PacketStoreError("disk I/O error")

        self.patch(self.store, "remove_many", broken)
        d = self.mixer(TimedMix()).mix()
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(d), 0)
        self.assertEqual(self.store.count(MIX), 510)
        self.assertEqual(self.store.count(OUT), 0)
        self.assertEqual(self.flushed, [])
        self.assertEqual(len(self.flushLoggedErrors(PacketStoreError)), 1)

    def test_a_round_is_not_started_while_one_is_under_way(self) -> None:
        """A restart at a new interval does not wait for the round under
        way; the next mix time then passes rather than choose the same
        items again."""
        self.fill(200)
        mixer = self.mixer(TimedMix())
        first = mixer.mix()
        self.assertEqual(self.successResultOf(mixer.mix()), 0)
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(first), 200)
        self.assertEqual(self.stats["Mixed"], 200)

    def test_stopping_before_the_move_moves_nothing(self) -> None:
        self.fill(500)
        mixer = self.mixer(TimedMix())
        d = mixer.mix()
        stopped = mixer.stop()
        self.assertNoResult(stopped)
        self.clock.advance(0)  # the choice reaches the reactor: no move now
        self.successResultOf(stopped)
        self.assertEqual(self.successResultOf(d), 0)
        self.assertEqual(self.store.count(MIX), 500)
        self.assertEqual(self.flushed, [])


class PacketClient(HeldClient):
    """A :class:`HeldClient` that keeps each packet too."""

    def __init__(self) -> None:
        super().__init__()
        self.packets: list[tuple[NextHop, bytes]] = []

    def send_packet(self, dest: NextHop, packet: bytes) -> defer.Deferred[Any]:
        self.packets.append((dest, packet))
        return super().send_packet(dest, packet)

    def answer(self) -> None:
        """Every send not answered yet is acknowledged (not those the
        answers bring)."""
        for _, d in list(self.sent):
            if not d.called:
                d.callback(None)


class SlicedOutgoing:
    """An :class:`Outgoing` on a :class:`ThreadClock` whose removals run
    in place, reading ``scan_slice`` rows per reactor call."""

    def __init__(self, test: unittest.TestCase, store: PacketStore, clock: ThreadClock,
                 scan_slice: int, allows: Any = None) -> None:
        self.stats = NodeStats()
        self.client = PacketClient()
        self.to_self = ListSink()
        self.out = Outgoing(store, self.client, (60, 60), clock, OWN_KEYID,  # type: ignore[arg-type]
                            self.stats.count, self.to_self, reactor=clock, allows=allows,
                            worker=InPlaceWorker())
        self.out.scan_slice = scan_slice
        test.addCleanup(self.out.stop)


def no_documentation_addresses(ip: str, port: int) -> bool:
    return not ip.startswith("198.51.100.")


class OutgoingSliceTests(LogMixin):
    def setUp(self) -> None:
        super().setUp()
        self.store = scratch_store(self)
        self.clock = ThreadClock()
        self.clock.advance(10_000)

    def queue(self, dests: list[NextHop], added: Optional[float] = None,
              store: Optional[PacketStore] = None) -> list[int]:
        store = store or self.store
        first = store.count()
        return store.add_many(OUT, [packet(first + i) for i in range(len(dests))],
                              now=self.clock.seconds() if added is None else added,
                              meta=[relay_meta(d) for d in dests])

    def sliced(self, scan_slice: int, store: Optional[PacketStore] = None,
               **kwargs: Any) -> SlicedOutgoing:
        return SlicedOutgoing(self, store or self.store, self.clock, scan_slice, **kwargs)

    def test_a_long_queue_is_read_one_slice_per_reactor_call(self) -> None:
        self.queue([dest(i % 7) for i in range(1050)])
        s = self.sliced(100)
        reads = ReadLog(self, self.store, self.clock)
        self.assertEqual(s.out.flush(), 0, "nothing goes before the whole queue is read")
        self.assertEqual(reads.rows(), [100])
        self.assertEqual(s.client.sent, [])
        self.clock.advance(0)
        self.assertEqual(reads.per_reactor_call(), [100] * 10 + [50])
        self.assertEqual(len(s.client.sent), s.out.max_in_flight_on_probation,
                         "then the window fills at once")

    def test_a_queue_of_one_slice_goes_in_the_call(self) -> None:
        self.queue([dest(1)] * 5)
        s = self.sliced(100)
        self.assertEqual(s.out.flush(), 5)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_sliced_and_single_pass_flushes_send_the_same(self) -> None:
        """The same queue, read in slices of 7 rows or in one pass: the
        same packets to the same next hops in the same order, the same
        removals and counts.  Healthy next hops, new ones, failing ones,
        expired packets, denied ones and packets for ourselves are mixed."""
        results = []
        for scan_slice in (10_000, 7):
            store = scratch_store(self)
            rng = random.Random(3)
            for _ in range(600):
                kind = rng.choice(["healthy", "new", "failing", "old", "denied", "self"])
                if kind == "old":
                    self.queue([dest(rng.randrange(8))], added=0, store=store)
                elif kind == "denied":
                    self.queue([NextHop("198.51.100.7", 48099, bytes(20))], store=store)
                elif kind == "self":
                    self.queue([NextHop("192.0.2.99", 48099, OWN_KEYID)], store=store)
                else:
                    offset = {"healthy": 10, "new": 30, "failing": 50}[kind]
                    self.queue([dest(offset + rng.randrange(12))], store=store)
            s = self.sliced(scan_slice, store=store, allows=no_documentation_addresses)
            s.out.max_in_flight = 100
            s.out.max_in_flight_on_probation = 40
            s.out.max_in_flight_per_destination = 6
            for n in range(12):
                s.out._state(dest(10 + n)).succeeded(self.clock.seconds() - 1)
                s.out._state(dest(50 + n)).failed(self.clock.seconds() - 1)
            s.out.flush()
            self.clock.advance(0)
            # Every other one is answered: more go, in turn.
            for _, d in s.client.sent[::2]:
                d.callback(None)
            self.clock.advance(0)
            results.append((s.client.packets, store.ids(OUT), s.to_self.packets,
                            {k: s.stats[k] for k in ("ExpiredRelay", "RelayDenied",
                                                     "RelayedToSelf")}))
        single, sliced = results
        self.assertEqual(sliced, single)
        self.assertGreater(len(single[0]), 100)
        self.assertTrue(all(single[3].values()), single[3])

    def test_destinations_take_turns_across_slices(self) -> None:
        a, b = dest(1), dest(2)
        self.queue([a] * 1000 + [b])
        s = self.sliced(100)
        s.out.max_in_flight = 10
        s.out.flush()
        self.clock.advance(0)
        self.assertEqual([d for d, _ in s.client.sent[:2]], [a, b])
        self.assertEqual(len(s.client.sent), 10)

    def test_a_healthy_next_hop_goes_first_behind_a_long_attack(self) -> None:
        good = dest(1)
        holes = [NextHop(f"198.51.{i // 250}.{i % 250}", 48099, bytes(20))
                 for i in range(3000)]
        self.queue(holes + [good] * 3)
        s = self.sliced(250)
        s.out._state(good).succeeded(self.clock.seconds())
        s.out.flush()
        self.clock.advance(0)
        self.assertEqual([d for d, _ in s.client.sent[:3]], [good] * 3)
        self.assertEqual(len(s.client.sent), 3 + s.out.max_in_flight_on_probation)

    def test_nothing_is_lost_or_sent_twice(self) -> None:
        """3,000 packets for 20 next hops, a small window, flushes asked
        for while one is under way: each packet goes exactly once."""
        self.queue([dest(i % 20) for i in range(3000)])
        s = self.sliced(128)
        s.out.max_in_flight = 64
        s.out.flush()
        for round_ in range(1000):
            if not self.store.count(OUT):
                break
            if round_ % 3 == 0:
                s.out.flush()
            s.client.answer()
            self.clock.advance(0)
        else:
            self.fail(f"{self.store.count(OUT)} packets still queued")
        sent = [p for _, p in s.client.packets]
        self.assertEqual(len(sent), len(set(sent)))
        self.assertEqual(sorted(sent), sorted(packet(i) for i in range(3000)))

    def test_a_flush_asked_for_during_one_runs_once_after_it(self) -> None:
        self.queue([dest(i % 3) for i in range(500)])
        s = self.sliced(100)
        reads = ReadLog(self, self.store, self.clock)
        s.out.flush()
        self.assertEqual(s.out.flush(), 0)
        self.assertEqual(s.out.flush(), 0)
        self.clock.advance(0)
        self.assertEqual(reads.rows(), [100] * 5 + [0] + [100] * 5 + [0])

    def test_stop_ends_a_flush_under_way(self) -> None:
        self.queue([dest(1)] * 500)
        s = self.sliced(100)
        reads = ReadLog(self, self.store, self.clock)
        s.out.flush()
        stopped = s.out.stop()
        self.clock.advance(0)
        self.successResultOf(stopped)
        self.assertEqual(reads.rows(), [100])
        self.assertEqual(s.client.sent, [])
        self.assertEqual(self.store.count(OUT), 500)

    def test_expired_packets_leave_in_bounded_batches(self) -> None:
        self.queue([dest(i % 4) for i in range(1000)], added=0)
        s = self.sliced(300)
        s.out.settle_batch = 64
        removals: list[tuple[Optional[int], int]] = []  # (reactor call, ids removed)
        original = self.store.remove_many
        self.patch(self.store, "remove_many", lambda ids: (
            removals.append((self.clock.current, len(ids))), original(ids))[1])
        s.out.flush()
        self.clock.advance(0)
        self.assertEqual(self.store.count(OUT), 0)
        self.assertEqual(s.stats["ExpiredRelay"], 1000)
        self.assertEqual(sorted(n for _, n in removals), [36] + [44] * 3 + [64] * 13)
        self.assertEqual(len({call for call, _ in removals}), len(removals),
                         "one batch per reactor call")
        [warn] = self.expect_log("retry schedule ran out", LogLevel.warn, count=1)
        self.assertEqual(warn["n"], 1000)

    def test_each_distinct_record_is_decoded_once(self) -> None:
        self.queue([dest(i % 4) for i in range(2000)])
        decoded = []
        original = outgoing.decode_item
        self.patch(outgoing, "decode_item",
                   lambda meta: (decoded.append(meta), original(meta))[1])
        s = self.sliced(100)
        s.out.flush()
        self.clock.advance(0)
        self.assertEqual(len(decoded), 4)
        self.assertEqual(len(s.client.sent), 4 * 64)

    def test_a_store_failing_midway_is_said_and_the_next_flush_starts_over(self) -> None:
        self.queue([dest(1)] * 300)
        s = self.sliced(100)
        original = self.store.items
        calls = []

        def failing(*args: Any, **kwargs: Any) -> Any:
            calls.append(kwargs)
            if len(calls) == 2:
                raise PacketStoreError("disk I/O error")
            return original(*args, **kwargs)

        self.patch(self.store, "items", failing)
        s.out.flush()
        self.clock.advance(0)
        [error] = self.expect_log("Could not flush the outgoing queue", LogLevel.error, count=1)
        self.assertNotIn("log_failure", error)
        self.assertEqual(s.client.sent, [])
        s.out.flush()
        self.clock.advance(0)
        self.assertEqual(len(s.client.sent), 64)

    def test_a_damaged_record_is_reported_and_the_rest_go(self) -> None:
        self.queue([dest(1)] * 3)
        self.store.add_many(OUT, [b"bad"], now=self.clock.seconds(), meta=[b"{not json"])
        self.queue([dest(2)] * 3)
        s = self.sliced(2)
        s.out.flush()
        self.clock.advance(0)
        self.assertEqual(len(s.client.sent), 6)
        self.assertEqual(self.store.count(OUT), 7)
        self.expect_log("damaged records", LogLevel.error, count=1)


class ReleaseTests(unittest.TestCase):
    """The node's wiring, on one clock: the mix, then the flush."""

    def test_a_large_pool_is_released_in_bounded_reactor_calls(self) -> None:
        store = scratch_store(self)
        clock = ThreadClock()
        clock.advance(1000)
        worker = InPlaceWorker()
        stats = NodeStats()
        metas = [relay_meta(dest(i % 30)) for i in range(5000)]
        store.add_many(MIX, [packet(i) for i in range(5000)], now=1000, meta=metas)
        sliced = SlicedOutgoing(self, store, clock, scan_slice=256)
        mixer = Mixer(store, TimedMix(), 60, clock, {}, stats.count,
                      sliced.out.flush,
                      run_write=lambda fn, *args: run_in(clock, worker, fn, *args))
        mixer.read_slice = 256
        reads = ReadLog(self, store, clock, worker)
        mixer.start()
        self.addCleanup(mixer.stop)
        clock.advance(60)
        self.assertEqual(stats["Mixed"], 5000)
        self.assertEqual(store.count(OUT), 5000)
        in_worker = sum(n for name, n, worker_, _ in reads.calls if worker_ and name == "items")
        self.assertEqual(in_worker, 5000, "the mix read the pool in its worker")
        on_reactor = reads.per_reactor_call()
        self.assertEqual(sum(on_reactor), 5000, "the flush read each row once, on the reactor")
        self.assertLessEqual(max(on_reactor), 256)
        self.assertEqual(len(on_reactor), 5000 // 256 + 1)
        self.assertEqual(len(sliced.client.sent), sliced.out.max_in_flight_on_probation)
        sliced.client.answer()
        clock.advance(0)
        self.assertEqual(store.count(OUT), 5000 - sliced.out.max_in_flight_on_probation)
        more = len(sliced.client.sent) - sliced.out.max_in_flight_on_probation
        self.assertGreater(more, 0, "answers bring more, without another flush")
        self.assertLessEqual(more, sliced.out.max_in_flight)

    def test_queue_slices_reads_a_queue_of_any_length_in_bounded_slices(self) -> None:
        store = scratch_store(self)
        store.add_many(OUT, [b"p"] * 250, meta=[b"{}"] * 250)
        sizes = [len(rows) for rows in queue_slices(store, OUT, 100)]
        self.assertEqual(sizes, [100, 100, 50])
        store.add_many(OUT, [b"p"] * 50, meta=[b"{}"] * 50)
        self.assertEqual([len(rows) for rows in queue_slices(store, OUT, 100)], [100] * 3)
        self.assertEqual(list(queue_slices(store, MIX, 100)), [])
