"""The node's pinger (doc/reliability.md §1, §2, §5): the packet a ping
becomes, its return through processing, expiry, the signed report and its
upload, the directory it pings through, what the node shows of it, and
``[Pinging]`` through the real entry points.

No sleeps: the pinger's clock is an :class:`InPlaceReactor`, its worker
runs in place, its directory is a real :class:`ClientDirectory` whose
download is a file written by the test; the one upload over HTTP and the
processing child are real and awaited.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import os
import random
import subprocess
import sys
from collections import Counter
from typing import Any, Optional, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.internet import task
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web import resource, server

from mixminion.client.directory import ClientDirectory, DirectoryUpdateError
from mixminion.codec.process import Exit, PacketProcessor, Relay
from mixminion.codec.replay import MemoryReplayLog
from mixminion.codec.routing import PING_TYPE, NextHop
from mixminion.directory.descriptor import ServerDescriptor
from mixminion.directory.directory import DirectoryInfo, VotingServer, build_directory, sign_directory
from mixminion.directory.http import HTTPClient
from mixminion.directory.reliability import Measured, ServerReliability, parse_report
from mixminion.events import Event
from mixminion.server import mixminiond, tap
from mixminion.server.config import SCHEMA, load_config
from mixminion.server.draining import drain, pool_row
from mixminion.server.incoming_log import IncomingLog
from mixminion.server.items import decode_item
from mixminion.server.metrics import peer_metrics
from mixminion.mmtp.initiator import (
    CannotConnect,
    ConnectionFailed,
    HandshakeFailed,
    PacketRejected,
)
from mixminion.server.pinging.handles import HANDLE_LEN
from mixminion.server.pinging.inference import PingOutcome, measure
from mixminion.server.pinging.reports import ReportUploads
from mixminion.server.pinging.service import PingerService, PingSettings, consensus_threshold
from mixminion.server.pinging.store import PingStore
from mixminion.server.processing import Processor
from mixminion.server.publish import UploadResult, http_report_uploader
from mixminion.server.queues import OUT, PING
from mixminion.server.stats import NodeStats
from mixminion.server.statusview import status_facts
from mixminion.server.store_replay import StoreReplayLog
from mixminion.test.test_client_directory import DAY, NOW, TODAY, signed_descriptor
from mixminion.test.test_client_directory import descriptor as directory_descriptor
from mixminion.testing.daemon import free_ports, node_config
from mixminion.testing.fakes import scratch_store
from mixminion.testing.keys import key
from mixminion.testing.threads import InPlaceReactor, InPlaceWorker

reactor: Any = _reactor

AUTHORITY = "pinger-auth"
AUTHORITY_URL = "http://auth.example/"
#: the pinger itself, three servers that relay, one that does not
ME = "Pinger"
RELAYS = ("Xray", "Sierra", "Yankee")
EXIT_ONLY = "Exitonly"
SETTINGS = PingSettings(interval=1e9, timeout=600.0, window=3600.0, report_interval=300.0)


@functools.cache
def descriptor(nickname: str, relay: bool = True) -> ServerDescriptor:
    """``nickname``'s descriptor (identity ``key(nickname)``, valid from
    2024-01-15) with a packet key of its own, ``key(nickname + "-packet")``,
    relaying or not."""
    fields = dataclasses.replace(directory_descriptor(nickname).to_fields(),
                                 packet_key=key(nickname + "-packet").public,
                                 outgoing=directory_descriptor(nickname).outgoing if relay else None)
    return signed_descriptor(fields, nickname)


def network() -> list[ServerDescriptor]:
    return [descriptor(ME), *(descriptor(n) for n in RELAYS), descriptor(EXIT_ONLY, relay=False)]


def fp(nickname: str) -> str:
    return key(nickname).public.fingerprint


def consensus(descriptors: Sequence[ServerDescriptor],
              reliability: Optional[dict[str, ServerReliability]] = None) -> str:
    """Today's consensus of ``descriptors``, signed by the one authority."""
    info = DirectoryInfo(status="consensus", valid_after=TODAY, valid_until=TODAY + DAY,
                         recommended_nicknames=tuple(d.nickname for d in descriptors),
                         voting_servers=(VotingServer(fp(AUTHORITY), AUTHORITY_URL),),
                         reliability=reliability or {})
    return sign_directory(build_directory(info, descriptors), key(AUTHORITY), os.urandom)


class OfflineDirectory(ClientDirectory):
    """A real ClientDirectory whose download is the test's: ``text`` is
    written where a download saves it and read back (signatures checked);
    ``fail`` makes it raise as when no authority answers."""

    def __init__(self, root: str, text: str, wall: task.Clock) -> None:
        super().__init__(root, [(AUTHORITY_URL, fp(AUTHORITY))], clock=wall,
                         report=lambda level, message: None)
        self.text = text
        self.fail = False
        self.updates = 0

    async def update(self, force: bool = False, agent: Any = None) -> None:  # type: ignore[override]
        self.updates += 1
        if self.fail:
            raise DirectoryUpdateError("none of the 1 configured authorities gave a valid one")
        os.makedirs(self.root, exist_ok=True)
        with open(os.path.join(self.root, "dir"), "w") as f:
            f.write(self.text)
        self.load()
        self.downloaded = self._now()


class FakeUploads:
    """An uploader that answers what the test says, per URL."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []
        self.answers: dict[str, UploadResult] = {}

    def __call__(self, url: str, text: str) -> defer.Deferred:
        self.sent.append((url, text))
        return defer.succeed(self.answers.get(url, UploadResult(True, "report kept")))


def route(packet: bytes, first_keyid: bytes, stop_before: Optional[str] = None
          ) -> tuple[list[str], Any, bytes]:
    """Process ``packet`` hop by hop with each server's packet key (as
    test_client_cli.route does) until it exits, or until it is about to
    reach ``stop_before``: (nicknames visited, the last result, the packet
    that result hands on)."""
    by_keyid = {descriptor(n).identity_digest: n for n in (ME, *RELAYS)}
    seen, keyid, result = [], first_keyid, None
    for _ in range(10):
        name = by_keyid[keyid]
        if name == stop_before:
            return seen, result, packet
        seen.append(name)
        result = PacketProcessor([(key(name + "-packet"), MemoryReplayLog())]).process(packet)
        if isinstance(result, Exit):
            return seen, result, packet
        assert isinstance(result, Relay), result
        packet, keyid = result.packet, result.next_hop.keyid
    raise AssertionError("the packet never exited")


class PingerTestCase(unittest.TestCase):
    """A pinger named ``Pinger`` on a real store and ping store, with the
    consensus of :func:`network`, on an in-place clock and worker."""

    settings = SETTINGS

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.reactor = InPlaceReactor()
        self.reactor.advance(1000.0)
        self.wall = task.Clock()
        self.wall.advance(NOW)
        self.store = scratch_store(self, body_dir=True)
        self.pings = PingStore(os.path.join(self.dir, "pings.db"))
        self.directory = OfflineDirectory(os.path.join(self.dir, "dir"), consensus(network()),
                                          self.wall)
        self.uploader = FakeUploads()
        self.uploads = ReportUploads([("http://a1.example/", fp("auth-a")),
                                      ("http://a2.example/", fp("auth-b"))],
                                     self.reactor, self.uploader, self.settings.report_interval,
                                     wall=self.wall, rng=lambda: 0.0)
        self.counts: Counter = Counter()
        self.flushes = 0
        self.pinger = PingerService(
            self.settings, nickname=ME, identity=key(ME), own_descriptor=lambda: descriptor(ME),
            directory=self.directory, pings=self.pings, store=self.store, flush=self._flush,
            count=self._count, uploads=self.uploads, reactor=self.reactor, wall=self.wall,
            worker=InPlaceWorker(), rng=random.Random(16))

    def _flush(self) -> None:
        self.flushes += 1

    def _count(self, name: str, n: int) -> None:
        self.counts[name] += n

    def start(self) -> None:
        self.pinger.startService()
        self.addCleanup(self.stop)
        self.settle()

    def stop(self) -> Optional[defer.Deferred]:
        return self.pinger.stopService() if self.pinger.running else None

    def settle(self) -> None:
        """Deliver what the worker handed back, and what that set off."""
        for _ in range(10):
            self.reactor.advance(0)

    def send_ping(self) -> tuple[bytes, NextHop]:
        """One ping: (its packet, its first hop) from the ``out`` queue."""
        before = {i for i, _m, _a in self.store.items(OUT)}
        self.pinger.ping()
        self.settle()
        [(row, meta, _added)] = [r for r in self.store.items(OUT) if r[0] not in before]
        hop, _ = decode_item(meta)
        return self.store.get(row), hop

    def come_back(self, handle: bytes, at: float) -> None:
        """What the processing child does with a returned ping, then its report."""
        self.store.add(PING, b"", at, handle)
        self.pinger.batch_done({Event.PROCESSED_PING: 1})
        self.settle()


class TickTests(PingerTestCase):
    settings = PingSettings(interval=1.0, timeout=600.0, window=3600.0, report_interval=300.0)

    def test_a_tick_sends_a_ping_over_x_s_y_back_to_us(self) -> None:
        """The schedule's tick queues one packet for X, exactly as a relayed
        packet is queued; processed hop by hop with the servers' packet
        keys it exits at the pinger with PING and the handle it recorded."""
        self.start()
        self.assertEqual(self.store.count(OUT), 0)
        for _ in range(100):
            self.reactor.advance(0.5)
            self.settle()
            if self.store.count(OUT):
                break
        [(row, meta, added)] = self.store.items(OUT)
        hop, _ = decode_item(meta)
        seen, result, _ = route(self.store.get(row), hop.keyid)
        self.assertEqual(len(seen), 4)
        self.assertEqual(seen[-1], ME)
        self.assertEqual(sorted(seen[:3]), sorted(RELAYS))
        x = descriptor(seen[0])
        self.assertEqual(hop, NextHop(x.hostname, x.port, x.identity_digest))
        self.assertEqual((result.exit_type, len(result.routing_info)), (PING_TYPE, HANDLE_LEN))
        record = self.pings.lookup(result.routing_info)
        self.assertEqual(record.path, tuple(fp(n) for n in seen[:3]))
        self.assertEqual(record.sent_at, added)
        self.assertIsNone(record.returned_at)
        self.assertEqual((self.counts[Event.PING_SENT], self.flushes), (1, 1))


class PingPacketTests(PingerTestCase):
    def test_each_ping_is_a_fresh_packet_and_handle(self) -> None:
        self.start()
        first, second = self.send_ping(), self.send_ping()
        exits = [route(packet, hop.keyid)[1] for packet, hop in (first, second)]
        self.assertNotEqual(first[0], second[0])
        self.assertNotEqual(exits[0].routing_info, exits[1].routing_info)
        # S rotates: the one measured least goes next
        self.assertNotEqual(self.pings.lookup(exits[0].routing_info).path[1],
                            self.pings.lookup(exits[1].routing_info).path[1])

    def test_no_ping_without_three_other_relaying_servers(self) -> None:
        """Neither this node nor a server that does not relay is on a path;
        with only two relays left there is no ping."""
        self.directory.text = consensus([descriptor(ME), descriptor("Xray"), descriptor("Sierra"),
                                         descriptor(EXIT_ONLY, relay=False)])
        self.start()
        self.assertEqual({d.nickname for d in self.pinger.servers},
                         {ME, "Xray", "Sierra"})
        self.pinger.ping()
        self.settle()
        self.assertEqual((self.store.count(OUT), self.counts[Event.PING_SENT]), (0, 0))

    def test_a_store_failure_is_one_warning_and_the_next_tick_tries_again(self) -> None:
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.start()
        self.pings.close()
        self.pinger.ping()
        self.settle()
        lines = [formatEvent(e) for e in events if e.get("log_level") in (LogLevel.warn,
                                                                          LogLevel.critical)]
        self.assertEqual(lines, ["Pinger: a ping failed: the ping store is closed"])
        self.assertEqual(self.store.count(OUT), 0)

    def test_no_ping_without_a_descriptor_of_ours(self) -> None:
        self.pinger.own_descriptor = lambda: None
        self.start()
        self.assertIsNone(self.pinger.ping())
        self.assertEqual(self.store.count(OUT), 0)


class ReturnTests(PingerTestCase):
    def test_a_returned_handle_is_marked_at_its_arrival(self) -> None:
        self.start()
        packet, hop = self.send_ping()
        handle = route(packet, hop.keyid)[1].routing_info
        self.come_back(handle, 1042.5)
        self.assertEqual(self.pings.lookup(handle).returned_at, 1042.5)
        self.assertEqual(self.store.count(PING), 0)
        self.assertEqual(self.counts[Event.PING_RETURNED], 1)

    def test_an_unknown_or_repeated_handle_changes_nothing(self) -> None:
        self.start()
        packet, hop = self.send_ping()
        handle = route(packet, hop.keyid)[1].routing_info
        self.come_back(handle, 1010.0)
        self.come_back(handle, 1020.0)
        self.come_back(os.urandom(HANDLE_LEN), 1030.0)
        self.assertEqual(self.pings.lookup(handle).returned_at, 1010.0)
        self.assertEqual((self.counts[Event.PING_RETURNED], self.counts[Event.PING_UNMATCHED]),
                         (1, 2))

    def test_returns_queued_before_a_restart_are_settled_at_start(self) -> None:
        self.pings.record_sent(b"h" * HANDLE_LEN, [fp(n) for n in RELAYS], 900.0)
        self.store.add(PING, b"", 950.0, b"h" * HANDLE_LEN)
        self.start()
        self.assertEqual(self.pings.lookup(b"h" * HANDLE_LEN).returned_at, 950.0)

    def test_a_batch_without_pings_reads_nothing(self) -> None:
        self.start()
        self.store.add(PING, b"", 950.0, b"h" * HANDLE_LEN)
        self.pinger.batch_done({Event.PROCESSED_RELAY: 5})
        self.settle()
        self.assertEqual(self.store.count(PING), 1)


class FirstHopTests(PingerTestCase):
    """doc/reliability.md §1: a first hop's link-level failures (connect,
    TLS, REJECTED) are recorded against it, once per ping."""

    def ping_row(self) -> tuple[int, str]:
        """One ping: its row in the ``out`` queue and its first hop's
        fingerprint."""
        packet, hop = self.send_ping()
        [row] = [r for r, _m, _a in self.store.items(OUT) if self.store.get(r) == packet]
        [x] = [d.fingerprint for d in self.pinger.servers if d.identity_digest == hop.keyid]
        return row, x

    def link_outcomes(self) -> list[PingOutcome]:
        return [o for o in self.pings.outcomes(0.0) if len(o.path) == 1]

    def test_each_kind_of_link_failure_is_one_lost_one_hop_ping(self) -> None:
        self.start()
        expected = []
        for error in (CannotConnect("cannot connect: refused"),
                      HandshakeFailed("TLS handshake timed out"),
                      PacketRejected("the next hop answered REJECTED")):
            row, x = self.ping_row()
            self.pinger.attempted(row, Failure(error))
            self.settle()
            expected.append(PingOutcome((x,), False))
        self.assertEqual(self.link_outcomes(), expected)
        self.assertEqual(self.counts[Event.PING_LINK_FAILED], 3)
        # ... which the measurement lays on X: sent counts it, nothing returned
        measured = measure(self.pings.outcomes(0.0))
        for outcome in expected:
            self.assertEqual(measured[outcome.path[0]].returned, 0)

    def test_only_the_first_attempt_of_a_ping_counts(self) -> None:
        """The queue retries a failing first hop many times; one ping is one
        result.  A retry that gets through leaves the ping to come back."""
        self.start()
        row, x = self.ping_row()
        for _ in range(5):
            self.pinger.attempted(row, Failure(CannotConnect("cannot connect: refused")))
        self.pinger.attempted(row, None)
        self.settle()
        self.assertEqual(self.link_outcomes(), [PingOutcome((x,), False)])

    def test_acknowledged_or_not_link_level_records_nothing(self) -> None:
        self.start()
        acked, _ = self.ping_row()
        self.pinger.attempted(acked, None)
        self.pinger.attempted(acked, Failure(CannotConnect("cannot connect: later")))
        broken, _ = self.ping_row()  # MMTP had begun: the hop proved itself
        self.pinger.attempted(broken, Failure(ConnectionFailed("connection lost: reset")))
        self.pinger.attempted(broken, Failure(CannotConnect("cannot connect: later")))
        self.settle()
        self.assertEqual(self.link_outcomes(), [])
        self.assertEqual(self.counts[Event.PING_LINK_FAILED], 0)

    def test_traffic_is_not_a_ping(self) -> None:
        self.start()
        traffic = self.store.add(OUT, b"x" * 32768, 1000.0, None)
        self.pinger.attempted(traffic, Failure(CannotConnect("cannot connect: refused")))
        self.settle()
        self.assertEqual(self.link_outcomes(), [])

    def test_pings_never_attempted_are_forgotten_with_the_window(self) -> None:
        self.start()
        row, _ = self.ping_row()
        self.assertIn(row, self.pinger._first_hops)
        self.reactor.advance(self.settings.window + 1)
        self.settle()
        self.assertNotIn(row, self.pinger._first_hops)


class ProcessingTests(unittest.TestCase):
    """How processing treats a PING exit: dropped unless the node pings."""

    def setUp(self) -> None:
        self.store = scratch_store(self, body_dir=True)
        self.incoming = IncomingLog(os.path.join(os.path.dirname(self.store.path), "incoming"))
        self.addCleanup(self.incoming.close)
        self.processor = PacketProcessor(
            [(key(ME + "-packet"), StoreReplayLog(self.store, key(ME + "-packet").public.keyid))])

    def returning_ping(self, handle: bytes) -> bytes:
        """A ping over X, S, Y as Y hands it to us."""
        from mixminion.server.pinging.packets import build_ping

        x, s, y = (descriptor(n) for n in RELAYS)
        ping = build_ping(x, s, y, descriptor(ME), handle, os.urandom)
        seen, _, packet = route(ping.packet, ping.first_hop.keyid, stop_before=ME)
        self.assertEqual(seen, list(RELAYS))
        return packet

    def drain(self, pings: bool) -> Counter:
        counts: Counter = Counter()
        for done in drain(self.incoming, self.store, self.processor, 16, lambda: 777.0,
                          through=self.incoming.committed_through, pings=pings):
            counts.update(done.counts)
        return counts

    def test_a_pinging_node_queues_returned_pings_apart_from_the_pool(self) -> None:
        handle = os.urandom(HANDLE_LEN)
        self.incoming.add_many([self.returning_ping(handle)])
        counts = self.drain(pings=True)
        self.assertEqual(counts[Event.PROCESSED_PING], 1)
        self.assertEqual(self.store.items(PING), [(1, handle, 777.0)])
        self.assertEqual(self.store.count("mix"), 0)

    def test_a_node_that_does_not_ping_drops_them(self) -> None:
        self.incoming.add_many([self.returning_ping(os.urandom(HANDLE_LEN))])
        counts = self.drain(pings=False)
        self.assertEqual(counts[Event.DROPPED_PING], 1)
        self.assertEqual((self.store.count(PING), self.store.count("mix")), (0, 0))

    def test_a_ping_exit_that_cannot_be_a_handle_is_dropped(self) -> None:
        counts: Counter = Counter()
        exit_ = Exit(PING_TYPE, b"short", b"", b"short", b"k" * 16, b"", None, 0)  # type: ignore[arg-type]
        self.assertIsNone(pool_row(exit_, counts, pings=True))
        self.assertEqual(counts[Event.DROPPED_PING], 1)

    def test_the_processing_child_learns_it_from_its_command_line(self) -> None:
        """A real child, started with ``--pings``, queues the return."""
        handle = os.urandom(HANDLE_LEN)
        self.incoming.add_many([self.returning_ping(handle)])
        stats = NodeStats()
        batches: list = []
        processor = Processor(self.incoming.path, self.store.path, reactor, stats.count,
                              body_dir=os.path.join(os.path.dirname(self.store.path), "bodies"),
                              restart_delay=0.1, pings=True)
        processor.batch_listeners.append(batches.append)
        processor.committed_through = self.incoming.committed_through
        self.addCleanup(processor.stop)

        async def go() -> None:
            processor.set_keys([key(ME + "-packet")])
            await processor.wait_idle()
            [(_id, queued, _at)] = self.store.items(PING)
            self.assertEqual(queued, handle)
            self.assertEqual(stats[Event.PROCESSED_PING], 1)
            self.assertEqual(batches, [{Event.PROCESSED_PING: 1}])

        return defer.ensureDeferred(go())


class ReportTests(PingerTestCase):
    def record(self, name: str, path: Sequence[str], sent: float,
               back: Optional[float] = None) -> None:
        handle = name.encode().ljust(HANDLE_LEN, b".")
        self.pings.record_sent(handle, [fp(n) for n in path], sent)
        if back is not None:
            self.pings.mark_returned(handle, back)

    def test_expiry_measure_sign_upload(self) -> None:
        """At ReportInterval: pings older than Window are forgotten, pings
        past Timeout settled as lost, the rest measured into a signed
        report uploaded to every authority."""
        self.start()  # at 1000 on the elapsed clock
        x, s, y = RELAYS
        self.record("old", (x, s, y), 1000.0 - 2 * SETTINGS.window)  # beyond Window
        self.record("back", (x, s, y), 1000.0, back=1001.5)
        self.record("lost", (y, s, x), 990.0)
        self.record("young", (x, y, s), 1200.0)
        self.reactor.advance(SETTINGS.report_interval)  # 1300: nothing past its 600 s yet
        self.settle()
        self.assertEqual(self.counts[Event.PING_LOST], 0)
        self.assertIsNone(self.pings.lookup(b"old".ljust(HANDLE_LEN, b".")))
        self.reactor.advance(SETTINGS.report_interval)  # 1600: "lost" timed out
        self.settle()
        self.assertEqual(self.counts[Event.PING_LOST], 1)
        self.assertIsNotNone(self.pings.lookup(b"lost".ljust(HANDLE_LEN, b".")).lost_at)
        self.assertIsNone(self.pings.lookup(b"young".ljust(HANDLE_LEN, b".")).lost_at)
        [(url1, text1), (url2, text2)] = self.uploader.sent[-2:]
        self.assertEqual(({url1, url2}, text1), ({"http://a1.example/", "http://a2.example/"},
                                                 text2))
        report = parse_report(text1, self.wall.seconds())
        self.assertEqual((report.pinger, report.fingerprint), (ME, fp(ME)))
        self.assertEqual((report.published, report.interval_end), (NOW, NOW))
        self.assertEqual(report.interval_end - report.interval_start, int(SETTINGS.window))
        by_fp = {m.fingerprint: m for m in report.measured}
        self.assertEqual(set(by_fp), {fp(n) for n in RELAYS})
        for m in by_fp.values():  # "back" and "lost" went through each of the three
            self.assertEqual((m.sent, m.returned, m.median_ms), (2, 1, 1500))
        self.assertEqual(set(self.pinger.measured), set(by_fp))
        self.assertEqual(self.uploads.last_success, NOW)

    def test_nothing_measured_no_report(self) -> None:
        self.start()
        self.reactor.advance(SETTINGS.report_interval)
        self.settle()
        self.assertEqual(self.uploader.sent, [])


class UploadTests(unittest.TestCase):
    AUTHORITIES = [("http://a1.example/", "A1" * 20), ("http://a2.example/", "A2" * 20)]

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.uploader = FakeUploads()
        self.uploads = ReportUploads(self.AUTHORITIES, self.clock, self.uploader, 300.0,
                                     rng=lambda: 0.0)

    def test_an_unreached_authority_is_tried_again_with_backoff(self) -> None:
        self.uploader.answers["http://a2.example/"] = UploadResult(False, "refused", error=True)
        self.uploads.submit("report 1")
        self.assertEqual(len(self.uploader.sent), 2)
        self.clock.advance(29.9)
        self.assertEqual(len(self.uploader.sent), 2)
        self.clock.advance(0.1)  # the first retry after 30 s, to a2 only
        self.assertEqual(self.uploader.sent[2:], [("http://a2.example/", "report 1")])
        self.clock.advance(60.0)
        self.assertEqual(len(self.uploader.sent), 4)
        del self.uploader.answers["http://a2.example/"]
        self.clock.advance(120.0)
        self.assertEqual(len(self.uploader.sent), 5)
        self.clock.advance(3600.0)
        self.assertEqual(len(self.uploader.sent), 5)  # accepted: done
        self.assertIn("A2" * 20, self.uploads.last_error)

    def test_backoff_never_waits_beyond_the_report_interval(self) -> None:
        self.uploader.answers["http://a1.example/"] = UploadResult(False, "down", error=True)
        self.uploads.submit("report")
        self.clock.pump([1] * (30 + 60 + 120 + 240))  # four retries, doubling from 30 s
        self.assertEqual(len(self.uploader.sent), 2 + 4)
        self.clock.pump([1] * 299)  # the next would be 480 s; capped at 300
        self.assertEqual(len(self.uploader.sent), 6)
        self.clock.advance(1)
        self.assertEqual(len(self.uploader.sent), 7)

    def test_a_refusal_is_not_retried_and_a_new_report_replaces_the_old(self) -> None:
        self.uploader.answers["http://a1.example/"] = UploadResult(False, "unlisted pinger")
        self.uploader.answers["http://a2.example/"] = UploadResult(False, "down", error=True)
        self.uploads.submit("report 1")
        self.uploads.submit("report 2")
        self.clock.pump([1] * 300)
        sent = self.uploader.sent
        self.assertEqual(sent[:2], [("http://a1.example/", "report 1"),
                                    ("http://a2.example/", "report 1")])
        self.assertEqual(sent[2:4], [("http://a1.example/", "report 2"),
                                     ("http://a2.example/", "report 2")])
        self.assertEqual(set(sent[4:]), {("http://a2.example/", "report 2")})
        self.assertEqual(len(sent[4:]), 3)  # at 30, 90 and 210 s

    def test_over_http_to_a_loopback_authority(self) -> None:
        """The report is the whole body of a POST to /report, and the
        answer is read as /publish's."""
        received: list[tuple[bytes, bytes]] = []

        class Report(resource.Resource):
            isLeaf = True

            def render_POST(self, request) -> bytes:  # noqa: N802
                received.append((request.getHeader(b"content-type"), request.content.read()))
                request.setHeader(b"Content-Type", b"text/plain")
                return b"Status: 1\nMessage: Report kept.\n"

        root = resource.Resource()
        root.putChild(b"report", Report())
        port = reactor.listenTCP(0, server.Site(root), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = HTTPClient(reactor, timeout=10)
        url = f"http://127.0.0.1:{port.getHost().port}/"
        uploads = ReportUploads([(url, "A1" * 20)], reactor, http_report_uploader(client), 300.0,
                                close=client.close)
        self.addCleanup(uploads.stop)
        text = "[Ping-Report]\nVersion: 0.1\n"

        async def go() -> None:
            await uploads.submit(text)
            self.assertEqual(received, [(b"text/plain; charset=utf-8", text.encode())])
            self.assertIsNotNone(uploads.last_success)
            self.assertIsNone(uploads.last_error)

        return defer.ensureDeferred(go())


class DirectoryTests(PingerTestCase):
    def test_refreshed_at_start_and_every_report_interval(self) -> None:
        self.start()
        self.assertEqual(self.directory.updates, 1)
        self.assertEqual(self.pinger.directory_downloaded, NOW)
        self.reactor.advance(SETTINGS.report_interval - 1)
        self.settle()
        self.assertEqual(self.directory.updates, 1)
        self.reactor.advance(1)
        self.settle()
        self.assertEqual(self.directory.updates, 2)

    def test_a_failed_download_is_tried_again_and_the_last_one_kept(self) -> None:
        self.start()
        self.directory.fail = True
        self.reactor.advance(SETTINGS.report_interval)
        self.settle()
        self.assertEqual(self.directory.updates, 2)
        self.assertEqual(len(self.pinger.servers), 4)  # still the cached directory's
        self.reactor.advance(33.0)  # the publisher's first backoff: 30 s and up to 10% more
        self.settle()
        self.assertGreaterEqual(self.directory.updates, 3)
        self.directory.fail = False
        self.reactor.advance(SETTINGS.report_interval)
        self.settle()
        self.assertEqual(self.pinger._refresh_failures, 0)

    def test_a_cached_directory_is_used_before_the_first_download(self) -> None:
        self.directory.fail = True
        os.makedirs(self.directory.root)
        with open(os.path.join(self.directory.root, "dir"), "w") as f:
            f.write(consensus(network()))
        self.start()
        self.assertEqual(len(self.pinger.servers), 4)
        self.send_ping()

    def test_consensus_threshold_is_half_the_authorities_rounded_up(self) -> None:
        self.assertEqual([consensus_threshold(n) for n in (1, 2, 3, 4, 5)], [1, 1, 2, 2, 3])


class NewDayTests(PingerTestCase):
    settings = PingSettings(interval=1e9, timeout=600.0, window=3600.0, report_interval=10 * DAY)

    def test_refreshed_just_after_midnight(self) -> None:
        self.start()
        delay = TODAY + DAY + 60 - NOW
        self.wall.advance(delay - 1)
        self.reactor.advance(delay - 1)
        self.settle()
        self.assertEqual(self.directory.updates, 1)
        self.wall.advance(1)
        self.reactor.advance(1)
        self.settle()
        self.assertEqual(self.directory.updates, 2)
        self.wall.advance(DAY)
        self.reactor.advance(DAY)
        self.settle()
        self.assertEqual(self.directory.updates, 3)


class WhatTheOperatorSeesTests(PingerTestCase):
    def test_status_shows_our_reliability_from_the_directory(self) -> None:
        self.directory.text = consensus(network(), {fp(ME): ServerReliability(0.953, 1234, 3)})
        self.start()
        doc = {"pinging": self.pinger.status()}
        [line] = [line for line in status_facts(doc, NOW, True) if line.startswith("reliability:")]
        self.assertEqual(line, "reliability: 0.953, latency 1234 ms, 3 pingers in the directory "
                               "downloaded 2024-01-15 12:00:00 UTC")
        self.assertEqual(doc["pinging"]["servers"], 3)

    def test_status_when_unmeasured_not_downloaded_or_off(self) -> None:
        self.start()
        lines = status_facts({"pinging": self.pinger.status()}, NOW, True)
        self.assertIn("reliability: unmeasured in the directory downloaded "
                      "2024-01-15 12:00:00 UTC", lines)
        self.assertIn("ping reports: last accepted unknown; last attempt unknown", lines)
        self.assertIn("reliability: unknown (no directory downloaded yet)",
                      status_facts({"pinging": {"directory_downloaded": None}}, NOW, True))
        self.assertIn("reliability: unknown (pinging is off: the node downloads no directory)",
                      status_facts({"pinging": None}, NOW, True))

    def test_metrics_per_peer_by_nickname(self) -> None:
        self.start()
        self.pinger.measured = {
            fp("Xray"): Measured(fp("Xray"), 4, 3, 0.8, 1500, 2500),
            fp("Sierra"): Measured(fp("Sierra"), 2, 0, 0.0, 0, 0),
        }

        class Peers:
            def collect(inner):  # noqa: N805
                return peer_metrics(self.pinger.peers())

        registry = CollectorRegistry(auto_describe=False)
        registry.register(Peers())
        text = generate_latest(registry).decode()
        x = f'{{fingerprint="{fp("Xray")}",peer="Xray"}}'
        s = f'{{fingerprint="{fp("Sierra")}",peer="Sierra"}}'
        for line in (f"mixminion_peer_ping_success_ratio{x} 0.75",
                     f"mixminion_peer_ping_success_ratio{s} 0.0",
                     f"mixminion_peer_reliability{x} 0.8",
                     f"mixminion_peer_pings{x} 4.0",
                     f"mixminion_peer_ping_latency_median_seconds{x} 1.5",
                     f"mixminion_peer_ping_latency_p90_seconds{x} 2.5"):
            self.assertIn(line + "\n", text)
        self.assertNotIn(f"mixminion_peer_ping_latency_median_seconds{s}", text)


def free_port() -> int:
    [port] = free_ports(1)
    return port


def run_check(path: str) -> tuple[int, str]:
    """``mixminiond check -c PATH`` in this process: (exit status, stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = mixminiond.main(["check", "-c", path])
    return code, out.getvalue()


class ConfigurationTests(unittest.TestCase):
    """``[Pinging]`` through the entry points: ``mixminiond check`` and
    twistd's ``makeService``."""

    AUTHORITY = f"[DirectoryServers]\nPublish: yes\nAuthority: {AUTHORITY_URL} {'AB' * 20}\n"

    def write(self, extra: str) -> str:
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(node_config(path + ".base", 48099, extra=extra))
        return path

    def test_each_old_option_is_refused_naming_the_new_one(self) -> None:
        instead = {"RecomputeInterval": "ReportInterval", "ServerPingPeriod": "Interval",
                   "DullChainPingPeriod": "Interval", "ChainPingPeriod": "Interval",
                   "ServerProbePeriod": "Interval", "RetainData": "Window",
                   "RetainResults": "ReportInterval"}
        self.assertEqual(set(instead), {o.key for o in SCHEMA["Pinging"].options if o.refused})
        for option, new in instead.items():
            code, out = run_check(self.write(f"[Pinging]\n{option}: 1 hour\n"))
            self.assertEqual(code, 1, option)
            [line] = out.splitlines()
            self.assertIn(f"[Pinging] {option}: not supported:", line)
            self.assertIn(f"use {new} ", line + " ")

    def test_enabled_without_authorities_is_refused(self) -> None:
        path = self.write("[Pinging]\nEnabled: yes\n")
        code, out = run_check(path)
        self.assertEqual(code, 1)
        [line] = out.splitlines()
        self.assertIn("[Pinging] Enabled: needs [DirectoryServers] Authority lines", line)
        umask = os.umask(0o022)  # makeService sets the node's umask: keep the test run's
        try:
            exc = self.assertRaises(SystemExit, tap.makeService, {"config": path})
        finally:
            os.umask(umask)
        self.assertIn("[Pinging] Enabled: needs [DirectoryServers] Authority lines", str(exc))
        self.assertNotIn("\n", str(exc))

    def test_the_real_command_refuses_with_one_line(self) -> None:
        path = self.write("[Pinging]\nRetainData: 30 days\n")
        done = subprocess.run([sys.executable, "-m", "mixminion.server.mixminiond", "check", "-c",
                               path], capture_output=True, text=True, timeout=60)
        self.assertEqual(done.returncode, 1, done.stderr)
        [line] = done.stdout.splitlines()
        self.assertIn("[Pinging] RetainData: not supported:", line)
        self.assertIn("use Window instead", line)

    def test_a_pinging_configuration_is_accepted(self) -> None:
        path = self.write(self.AUTHORITY + "[Pinging]\nEnabled: yes\nInterval: 1 second\n"
                          "Timeout: 5 seconds\nWindow: 1 minute\nReportInterval: 10 seconds\n")
        code, out = run_check(path)
        self.assertEqual((code, out.splitlines()[-1]), (0, "OK"), out)
        pinging = load_config(path).pinging
        self.assertEqual((pinging.interval, pinging.timeout, pinging.window,
                          pinging.report_interval), (1, 5, 60, 10))


class NodeWiringTests(unittest.TestCase):
    """``build_node`` with ``[Pinging] Enabled``: the pinger is a child of
    the node, processing routes returns to it, the status says so."""

    def test_a_pinging_node(self) -> defer.Deferred:
        base = os.path.abspath(self.mktemp())
        conf = base + ".conf"
        with open(conf, "w") as f:
            f.write(node_config(base, free_port(), extra=ConfigurationTests.AUTHORITY.replace(
                AUTHORITY_URL, "http://127.0.0.1:9/") + "[Pinging]\nEnabled: yes\n"
                "Interval: 1 second\nTimeout: 5 seconds\nWindow: 1 minute\n"
                "ReportInterval: 10 seconds\n"))
        node = tap.build_node(load_config(conf), reactor)
        pinger = node.pinger
        self.assertIsInstance(pinger, PingerService)
        self.assertTrue(all(w.pings for w in node.processor.workers))
        self.assertIn(pinger.batch_done, node.processor.batch_listeners)
        self.assertIn(pinger.attempted, node.outgoing.attempt_listeners)
        self.assertEqual(pinger.settings, PingSettings(1.0, 5.0, 60.0, 10.0))
        [loop] = list(pinger)
        self.assertEqual(loop._schedule.mean_interval, 1.0)
        self.assertEqual(pinger.uploads.max_delay, 10.0)
        self.assertEqual(pinger.directory.root, os.path.join(base, "work", "dir"))
        self.assertEqual(pinger.pings.path, os.path.join(base, "work", "pings.db"))
        node.startService()

        async def go() -> None:
            self.assertIsNotNone(node.status()["pinging"])
            await node.stopService()
            self.assertFalse(pinger.running)

        return defer.ensureDeferred(go())
