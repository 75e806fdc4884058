"""The metrics port (``/metrics``, ``/health``, ``/status``) of a node built
in process, and what keeps the log quiet."""

from __future__ import annotations

import io
import json
import os
import sys
import warnings
from typing import Any

from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.logger import LogBeginner, Logger, LogPublisher, formatEvent, globalLogPublisher
from twisted.trial import unittest
from twisted.web.client import Agent, readBody

import mixminion
from mixminion.events import Event
from mixminion.logfilter import SeverityFilter, apply_log_level
from mixminion.server.config import load_config
from mixminion.server.stats import NodeStats
from mixminion.server.tap import build_node
from mixminion.test.test_status import CONTRACT_KEYS
from mixminion.testing.daemon import free_ports, node_config

reactor: Any = _reactor


async def get(port: int, path: str) -> tuple[int, bytes]:
    response = await Agent(reactor).request(b"GET", f"http://127.0.0.1:{port}{path}".encode())
    return response.code, await readBody(response)


class MetricsPortTests(unittest.TestCase):
    def test_metrics_health_and_status(self) -> defer.Deferred:
        return defer.ensureDeferred(self._pages())

    async def _pages(self) -> None:
        base = os.path.abspath(self.mktemp())
        conf = base + ".conf"
        port, metrics = free_ports(2)
        with open(conf, "w") as f:
            f.write(node_config(base, port, nickname="unit", server=f"MetricsPort: {metrics}"))
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        node = build_node(load_config(conf), reactor)
        node.startService()
        stopped: list[bool] = []
        self.addCleanup(lambda: None if stopped else node.stopService())
        fingerprint = node.identity.public.fingerprint
        [start] = [formatEvent(e) for e in events if "Mix node unit started" in formatEvent(e)]
        self.assertEqual(start, f"Mix node unit started: identity {fingerprint}, listening on "
                                f"127.0.0.1:{port} (MMTP), 127.0.0.1:{metrics} (metrics), "
                                f"packet key valid {start.split(' packet key valid ')[1]}")
        self.assertRegex(start, r"valid from \d{4}-\d\d-\d\d \d\d:\d\d:\d\d to "
                                r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC$")

        code, body = await get(metrics, "/metrics")
        self.assertEqual(code, 200)
        text = body.decode()
        self.assertIn(f'mixminion_build_info{{version="{mixminion.__version__}"}} 1.0\n', text)
        self.assertIn("# TYPE mixminion_events_total counter\n", text)
        for event in Event:
            self.assertIn(f'mixminion_events_total{{event="{event.value}"}} ', text)
        for name in ("uptime_seconds", "start_time_seconds", "queue_incoming_packets",
                     "queue_pool_bytes", "processing_running", "processing_paused_disk",
                     "delivery_paused_disk", "next_key_event_seconds", "healthy"):
            self.assertRegex(text, rf"\nmixminion_{name} \S+\n")
        self.assertRegex(text, r'\nmixminion_packet_key_valid_until_seconds\{keyset="key_0001"\} ')
        self.assertIn("\nprocess_cpu_seconds_total ", text)
        self.assertIn("\npython_info{", text)

        self.assertEqual(await get(metrics, "/health"), (200, b"ok\n"))
        node.sink.min_free_bytes = 1 << 62  # as a SIGHUP raising MinFreeDisk would
        code, body = await get(metrics, "/health")
        self.assertEqual(code, 503)
        [reason] = body.decode().splitlines()
        self.assertTrue(reason.startswith("disk space under MinFreeDisk: "), reason)
        node.sink.min_free_bytes = 0
        self.assertEqual(await get(metrics, "/health"), (200, b"ok\n"))

        code, body = await get(metrics, "/status")
        self.assertEqual(code, 200)
        doc = json.loads(body)
        self.assertEqual(set(doc), CONTRACT_KEYS)
        self.assertEqual((doc["fingerprint"], doc["nickname"]), (fingerprint, "unit"))
        self.assertEqual(doc["listening"], [f"127.0.0.1:{port}", f"127.0.0.1:{metrics}"])
        self.assertEqual(doc["health"], {"ok": True, "reasons": []})
        self.assertEqual(doc["last_errors"], [])
        self.assertEqual((await get(metrics, "/nothing"))[0], 404)
        code, body = await get(metrics, "/")
        self.assertEqual(code, 200)
        self.assertIn(b"/health", body)

        # No access-log line per request, no factory start/stop line of the site.
        logged = [formatEvent(e) for e in events]
        self.assertEqual([line for line in logged if "GET /" in line], [])
        self.assertEqual([line for line in logged if "factory" in line and "QuietSite" in line],
                         [])

        path = os.path.join(base, "work", "status.json")
        with open(path) as f:
            self.assertIs(json.load(f)["running"], True)
        await node.stopService()
        stopped.append(True)
        with open(path) as f:
            last = json.load(f)
        self.assertIs(last["running"], False)
        self.assertEqual(last["listening"], [])


class EventCountTests(unittest.TestCase):
    def test_every_event_and_every_name_counted(self) -> None:
        stats = NodeStats()
        stats.count(Event.EXIT_DELIVERED.of("SMTP"), 2)
        stats.count(Event.RECEIVED_PACKET)
        counts = stats.event_counts()
        self.assertEqual(counts["ExitDelivered:SMTP"], 2)
        self.assertEqual(counts["ReceivedPacket"], 1)
        self.assertEqual(counts["DroppedDummy"], 0)
        self.assertEqual(set(counts), {e.value for e in Event} | {"ExitDelivered:SMTP"})


class QuietLogTests(unittest.TestCase):
    def test_factory_lines_never_reach_the_log(self) -> None:
        publisher = LogPublisher()
        beginner = LogBeginner(publisher, io.StringIO(), sys, warnings)
        apply_log_level("INFO", beginner, SeverityFilter())
        seen: list = []
        beginner.beginLoggingTo([seen.append], redirectStandardIO=False)
        log = Logger(observer=publisher)
        log.info("Starting factory {factory!r}", factory=object())
        log.info("Stopping factory {factory!r}", factory=object())
        log.info("Packet key {keyset} retired", keyset="key_0001")
        self.assertEqual([formatEvent(e) for e in seen], ["Packet key key_0001 retired"])
