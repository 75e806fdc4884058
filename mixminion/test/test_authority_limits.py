"""The authority's HTTP limits (issue 12, points 8 and 10), in memory.

Every connection is a ``StringTransport`` on a ``task.Clock``: connection
slots in total and per address, 413 before a too-large body is read, a
chunked body cut off at the cap without a temporary file, the deadline on
a whole request (trickling does not extend it), and no client address in
any log line above DEBUG.  ``tests/test_authority_attacks.py`` runs the
same attacks on a real ``twistd mixminion-directory``.
"""

from __future__ import annotations

import types
from io import BytesIO
from typing import Optional

from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.internet.error import ConnectionDone
from twisted.trial import unittest
from twisted.web import http, resource
from twisted.web.test.requesthelper import DummyRequest

from mixminion.config.syntax import ConfigError
from mixminion.directory import tap
from mixminion.directory.authconfig import parse_authority_config
from mixminion.directory.httpserver import (
    ABORT_AFTER,
    LINGER,
    LINGER_BYTES,
    WARN_INTERVAL,
    AuthorityChannel,
    AuthoritySite,
    ConnectionSlots,
    HTTPLimits,
)
from mixminion.directory.service import PublishResource

ATTACKER = "203.0.113.7"
CAP = 4096


class Recorder(resource.Resource):
    """Answers every request; keeps what it was given."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[bytes] = []
        self.content_types: list[type] = []

    def render_GET(self, request) -> bytes:  # noqa: N802
        return b"directory"

    def render_POST(self, request) -> bytes:  # noqa: N802
        self.content_types.append(type(request.content))
        self.bodies.append(request.content.read())
        return b"stored %d" % len(self.bodies[-1])


class HalfClosingTransport(StringTransport):
    """A StringTransport that can close its write side, as TCP can."""

    write_closed = False

    def loseWriteConnection(self) -> None:  # noqa: N802
        self.write_closed = True


class SiteCase(unittest.TestCase):
    limits = HTTPLimits(max_connections=8, max_connections_per_address=3, request_timeout=30,
                        max_body=CAP)

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)
        self.recorder = Recorder()
        self.site = AuthoritySite(self.recorder, self.limits, reactor=self.clock)
        self.logs = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self._ports = iter(range(40000, 50000))

    def connect(self, host: str = ATTACKER) -> tuple[Optional[AuthorityChannel], HalfClosingTransport]:
        address = IPv4Address("TCP", host, next(self._ports))
        channel = self.site.buildProtocol(address)
        transport = HalfClosingTransport(peerAddress=address)
        if channel is not None:
            channel.makeConnection(transport)
        return channel, transport

    @staticmethod
    def close(channel: AuthorityChannel) -> None:
        channel.connectionLost(Failure(ConnectionDone()))

    def lines_above_debug(self) -> list[str]:
        return [formatEvent(e) for e in self.logs if e.get("log_level", LogLevel.info) > LogLevel.debug]


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


# --- connection slots -----------------------------------------------------------------------------


class SlotTests(unittest.TestCase):
    def test_total_and_per_address(self) -> None:
        slots = ConnectionSlots(total=3, per_address=2)
        self.assertEqual([slots.take("a"), slots.take("a"), slots.take("a")], [None, None, "per-address"])
        self.assertIsNone(slots.take("b"))
        self.assertEqual(slots.take("c"), "total")
        slots.give_back("a")
        self.assertIsNone(slots.take("c"))
        self.assertEqual((slots.open, slots.by_address), (3, {"a": 1, "b": 1, "c": 1}))

    def test_giving_back_what_was_not_taken(self) -> None:
        self.assertRaises(ValueError, ConnectionSlots(1, 1).give_back, "a")


class ConnectionLimitTests(SiteCase):
    def test_per_address_limit_refuses_at_once_and_frees_on_close(self) -> None:
        held = [self.connect()[0] for _ in range(3)]
        self.assertNotIn(None, held)
        refused, _ = self.connect()
        self.assertIsNone(refused)  # the listening port closes the socket unread
        other, _ = self.connect("198.51.100.1")
        self.assertIsNotNone(other)
        self.close(held[0])
        again, _ = self.connect()
        self.assertIsNotNone(again)
        self.assertEqual(self.site.slots.by_address, {ATTACKER: 3, "198.51.100.1": 1})

    def test_total_limit(self) -> None:
        channels = [self.connect(f"198.51.100.{i}")[0] for i in range(8)]
        self.assertNotIn(None, channels)
        self.assertIsNone(self.connect("192.0.2.1")[0])
        self.close(channels[3])
        self.assertIsNotNone(self.connect("192.0.2.1")[0])

    def test_loopback_is_not_exempt(self) -> None:
        for _ in range(3):
            self.assertIsNotNone(self.connect("127.0.0.1")[0])
        self.assertIsNone(self.connect("127.0.0.1")[0])

    def test_closing_twice_gives_back_one_slot(self) -> None:
        channel, _ = self.connect()
        self.connect()
        self.close(channel)
        self.close(channel)
        self.assertEqual(self.site.slots.open, 1)

    def test_refusals_are_one_warning_a_minute_without_addresses(self) -> None:
        for _ in range(3):
            self.connect()
        for _ in range(5):
            self.connect()
        warnings = [e for e in self.logs if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(warnings[0]["counts"], {"connection (per-address limit)": 1})
        for _ in range(int(WARN_INTERVAL)):  # the three held connections time out at 30 s
            self.clock.advance(1)
        warnings = [e for e in self.logs if e["log_level"] == LogLevel.warn]
        self.assertEqual([w["counts"] for w in warnings[1:]],
                         [{"connection (per-address limit)": 4, "request not complete in time": 3}])
        self.connect()  # a minute has not passed since that summary
        self.assertEqual(len([e for e in self.logs if e["log_level"] == LogLevel.warn]), 2)
        self.site.stopFactory()  # what is left is reported at the end
        warnings = [e for e in self.logs if e["log_level"] == LogLevel.warn]
        self.assertEqual(warnings[2]["counts"], {"connection (per-address limit)": 1})
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.site.refusals.total, {"connection (per-address limit)": 6,
                                                    "request not complete in time": 3})
        self.assertFalse([line for line in self.lines_above_debug() if ATTACKER in line])
        debug = [formatEvent(e) for e in self.logs if e["log_level"] == LogLevel.debug]
        self.assertTrue(any(ATTACKER in line for line in debug), debug)


# --- request bodies --------------------------------------------------------------------------------


class BodyTests(SiteCase):
    def setUp(self) -> None:
        super().setUp()

        def no_temporary_files(length):
            raise AssertionError(f"twisted.web asked for a content file ({length})")
        self.patch(http, "_getContentFile", no_temporary_files)

    def test_declared_too_large_is_413_before_the_body(self) -> None:
        channel, transport = self.connect()
        channel.dataReceived(b"POST /publish HTTP/1.1\r\nHost: a\r\n"
                             b"Content-Type: application/x-www-form-urlencoded\r\n"
                             b"Content-Length: 107374182400\r\n\r\n")
        answer = transport.value()
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer)
        self.assertIn(b"Status: 0\nMessage: Upload too large: 107374182400 bytes declared", answer)
        self.assertTrue(transport.write_closed)
        [request] = channel.requests
        self.assertIsNone(request.content)  # nothing allocated for the body, in memory or on disk
        transport.clear()
        channel.dataReceived(b"desc=" + b"x" * 100_000)  # read and dropped while lingering
        self.assertEqual((transport.value(), self.recorder.bodies), (b"", []))
        self.assertFalse(transport.disconnected)
        self.clock.advance(LINGER)
        self.assertTrue(transport.disconnected)  # aborted
        self.assertEqual(self.site.refusals.total, {"body too large": 1})

    def test_lingering_ends_after_a_megabyte(self) -> None:
        channel, transport = self.connect()
        channel.dataReceived(b"POST /publish HTTP/1.1\r\nHost: a\r\nContent-Length: 10000000\r\n\r\n")
        channel.dataReceived(b"x" * LINGER_BYTES)
        self.assertFalse(transport.disconnected)
        channel.dataReceived(b"x")
        self.assertTrue(transport.disconnected)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_expect_100_continue_gets_only_the_413(self) -> None:
        channel, transport = self.connect()
        channel.dataReceived(b"POST /publish HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n"
                             b"Content-Length: %d\r\n\r\n" % (CAP + 1))
        self.assertNotIn(b"100 Continue", transport.value())
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "))

    def test_body_at_the_cap_is_in_memory(self) -> None:
        channel, transport = self.connect()
        body = b"d" * CAP
        channel.dataReceived(b"POST /publish HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % CAP + body)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "))
        self.assertEqual((self.recorder.bodies, self.recorder.content_types), ([body], [BytesIO]))

    def test_oversized_chunked_body_is_cut_off_in_memory(self) -> None:
        channel, transport = self.connect()
        channel.dataReceived(b"POST /publish HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
        [request] = channel.requests
        piece = b"c" * 1000
        sent = 0
        while not channel.refused:
            channel.dataReceived(chunk(piece))
            sent += len(piece)
            self.assertIsInstance(request.content, BytesIO)
            self.assertLessEqual(len(request.content.getvalue()), CAP)
            self.assertLess(sent, 10 * CAP, "never cut off")
        self.assertEqual(sent, 5000)  # the first chunk past 4096 bytes
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "))
        self.assertIn(b"more than 4096 bytes", transport.value())
        channel.dataReceived(chunk(piece) + b"0\r\n\r\n")
        self.assertEqual(self.recorder.bodies, [])
        self.assertEqual(len(request.content.getvalue()), 4000)

    def test_oversized_chunks_in_one_read_are_not_processed(self) -> None:
        channel, transport = self.connect()
        channel.dataReceived(b"POST /publish HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                             + chunk(b"x" * (CAP + 1)) + b"0\r\n\r\n"
                             + b"GET /directory HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(transport.value().count(b"HTTP/1.1 "), 1)
        self.assertEqual(self.recorder.bodies, [])

    def test_chunked_body_under_the_cap(self) -> None:
        channel, transport = self.connect()
        channel.dataReceived(b"POST /publish HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                             + chunk(b"a" * 3000) + chunk(b"b" * 1096) + b"0\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "))
        self.assertEqual(self.recorder.bodies, [b"a" * 3000 + b"b" * 1096])


class LargeCapTests(SiteCase):
    """Above twisted.web's own 100 KB threshold for a temporary file."""

    limits = HTTPLimits(max_body=200_000)

    def test_150_kb_body_stays_in_memory(self) -> None:
        self.patch(http, "_getContentFile", lambda length: self.fail("temporary file"))
        channel, transport = self.connect()
        body = b"z" * 150_000
        channel.dataReceived(b"POST /publish HTTP/1.1\r\nHost: a\r\nContent-Length: 150000\r\n\r\n")
        for i in range(0, len(body), 16384):
            channel.dataReceived(body[i:i + 16384])
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "))
        self.assertEqual(self.recorder.content_types, [BytesIO])
        self.assertEqual(self.recorder.bodies, [body])


# --- deadlines -----------------------------------------------------------------------------------------


class DeadlineTests(SiteCase):
    def test_trickled_headers_are_cut_at_the_deadline(self) -> None:
        channel, transport = self.connect()
        channel.dataReceived(b"GET /directory HTTP/1.1\r\n")
        for _ in range(29):  # a byte a second resets twisted's idle timer, not the deadline
            self.clock.advance(1)
            channel.dataReceived(b"X")
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.site.refusals.total, {"request not complete in time": 1})
        self.clock.advance(ABORT_AFTER)  # the peer does not let go: aborted
        self.assertTrue(transport.disconnected)

    def test_trickled_body_is_cut_at_the_deadline(self) -> None:
        channel, transport = self.connect()
        channel.dataReceived(b"POST /publish HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n")
        for _ in range(30):
            channel.dataReceived(b"y")
            self.clock.advance(1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.recorder.bodies, [])

    def test_idle_connection_from_the_start(self) -> None:
        channel, transport = self.connect()
        self.clock.advance(29.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)

    def test_each_request_gets_its_own_deadline_and_keep_alive_idles_out(self) -> None:
        channel, transport = self.connect()
        self.clock.advance(20)
        channel.dataReceived(b"GET /directory HTTP/1.1\r\nHost: a\r\n\r\n")
        self.clock.advance(20)  # 40 s since the connection opened, 20 since the answer
        channel.dataReceived(b"GET /directory HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(transport.value().count(b"HTTP/1.1 200 OK"), 2)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(30)  # kept alive but idle: closed, and not counted as an attack
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.site.refusals.total, {})

    def test_a_request_left_unfinished_after_an_answer_counts(self) -> None:
        channel, transport = self.connect()
        channel.dataReceived(b"GET /directory HTTP/1.1\r\nHost: a\r\n\r\nGET /dir")
        self.clock.advance(30)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.site.refusals.total, {"request not complete in time": 1})

    def test_a_closed_connection_leaves_no_timer(self) -> None:
        channel, _ = self.connect()
        channel.dataReceived(b"GET /directory HTTP/1.1\r\nHost: a\r\n\r\n")
        self.close(channel)
        self.assertEqual(self.clock.getDelayedCalls(), [])


# --- logs ---------------------------------------------------------------------------------------------------


class LogTests(SiteCase):
    def test_no_client_address_above_debug(self) -> None:
        channel, _ = self.connect()
        channel.dataReceived(b"GET /directory HTTP/1.1\r\nHost: a\r\nUser-Agent: Tell-Tale/1.0\r\n\r\n")
        slow, _ = self.connect()
        self.clock.advance(30 + ABORT_AFTER)  # twisted's own timeout line names the peer at INFO
        big, _ = self.connect()
        big.dataReceived(b"POST /publish HTTP/1.1\r\nHost: a\r\nContent-Length: 999999\r\n\r\n")
        for _ in range(5):
            self.connect()
        text = "\n".join(self.lines_above_debug())
        self.assertNotIn(ATTACKER, text)
        self.assertNotIn("Tell-Tale", text)
        debug = "\n".join(formatEvent(e) for e in self.logs if e["log_level"] == LogLevel.debug)
        self.assertIn("GET /directory -> 200", debug)
        self.assertNotIn("Tell-Tale", debug)

    def test_publish_names_the_publisher_only_at_debug(self) -> None:
        store = types.SimpleNamespace(max_size=CAP, accept_upload=lambda text, now: (True, "Accepted."))
        authority = types.SimpleNamespace(store=store, clock=self.clock)
        request = DummyRequest([])
        request.method, request.args = b"POST", {b"desc": [b"descriptor"]}
        request.client = IPv4Address("TCP", ATTACKER, 1234)
        self.assertEqual(PublishResource(authority).render(request), b"Status: 1\nMessage: Accepted.\n")
        self.assertIn("Publish: status 1: Accepted.", self.lines_above_debug())
        self.assertNotIn(ATTACKER, "\n".join(self.lines_above_debug()))
        debug = [formatEvent(e) for e in self.logs if e["log_level"] == LogLevel.debug]
        self.assertIn(f"Publish from {ATTACKER}", debug)

    def test_the_authority_log_level(self) -> None:
        levels = []
        self.patch(tap, "apply_log_level", levels.append)
        self.patch(tap, "build_authority", lambda settings, reactor: settings)
        conf = self.mktemp()
        with open(conf, "w") as f:
            f.write("[Authority]\nBaseDir: data\nNickname: Quorum1\nLogLevel: warn\n")
        options = tap.Options()
        options.parseOptions(["-c", conf])
        tap.makeService(options)
        self.assertEqual(levels, ["WARN"])


# --- configuration and wiring ----------------------------------------------------------------------------


class ConfigTests(unittest.TestCase):
    BASE = "[Authority]\nBaseDir: x\nNickname: A\n"

    def test_defaults(self) -> None:
        settings = parse_authority_config(self.BASE, "/etc/authority.conf")
        self.assertEqual((settings.max_connections, settings.max_connections_per_address,
                          settings.request_timeout, settings.log_level), (256, 16, 30.0, "INFO"))
        self.assertEqual(settings.http_limits, HTTPLimits(256, 16, 30.0, 4 * 32 * 1024))

    def test_values(self) -> None:
        settings = parse_authority_config(
            self.BASE + "MaxConnections: 1000\nMaxConnectionsPerAddress: 40\nRequestTimeout: 1 minute\n"
            "MaxDescriptorSize: 16K\nLogLevel: debug\n", "/etc/authority.conf")
        self.assertEqual(settings.http_limits, HTTPLimits(1000, 40, 60.0, 4 * 16 * 1024))
        self.assertEqual(settings.log_level, "DEBUG")

    def assertConfigError(self, text: str, *fragments: str) -> None:
        with self.assertRaises(ConfigError) as caught:
            parse_authority_config(self.BASE + text, "authority.conf")
        for fragment in fragments:
            self.assertIn(fragment, str(caught.exception))

    def test_errors(self) -> None:
        self.assertConfigError("MaxConnections: 0\n", "authority.conf:4: [Authority] MaxConnections:",
                               "at least 1")
        self.assertConfigError("MaxConnectionsPerAddress: 300\n", "[Authority] MaxConnectionsPerAddress:",
                               "between 1 and MaxConnections")
        self.assertConfigError("RequestTimeout: 0 seconds\n", "RequestTimeout", "at least 1 second")
        self.assertConfigError("MaxConnections: many\n", "authority.conf:4:", "MaxConnections")
        self.assertConfigError("LogLevel: loud\n", "authority.conf:4:", "LogLevel")

    def test_service_listens_through_the_limited_site(self) -> None:
        from mixminion.directory.service import AuthorityService
        settings = parse_authority_config(self.BASE + "MaxConnections: 10\nMaxConnectionsPerAddress: 2\n",
                                          "/etc/authority.conf")
        authority = type("FakeAuthority", (), {"settings": settings})()
        service = AuthorityService(authority, reactor=None, clock=task.Clock(), listen=False)
        self.assertIsInstance(service.site, AuthoritySite)
        self.assertEqual(service.site.limits, settings.http_limits)


class DescriptorLimitTests(unittest.TestCase):
    def test_raised_up_to_the_hard_limit(self) -> None:
        calls = []
        soft = tap.ensure_descriptors(320, getrlimit=lambda what: (256, 4096),
                                      setrlimit=lambda what, limits: calls.append(limits))
        self.assertEqual((soft, calls), (320, [(320, 4096)]))

    def test_warns_when_the_hard_limit_is_too_low(self) -> None:
        logs = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        soft = tap.ensure_descriptors(320, getrlimit=lambda what: (100, 200), setrlimit=lambda *a: None)
        self.assertEqual(soft, 200)
        self.assertIn("lower MaxConnections", formatEvent(logs[0]))

    def test_enough_already(self) -> None:
        self.assertEqual(tap.ensure_descriptors(320, getrlimit=lambda what: (1024, 4096),
                                                setrlimit=lambda *a: self.fail("set")), 1024)
