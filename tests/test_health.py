"""Visible health on a real ``twistd -n mixminion`` node (issue 14 part 3):
the WARN start line, ``/health`` following ``MinFreeDisk`` across SIGHUPs,
``/status`` and ``WorkDir/status.json`` (the contract ``mixminiond status``
reads), ``/metrics`` through prometheus_client, and a log at INFO without
Twisted's factory lines or an access line per request."""

from __future__ import annotations

import json
import os
import shutil
import signal
import urllib.error
import urllib.request

from twisted.internet import defer, threads
from twisted.web.resource import Resource
from twisted.web.server import Site

from mixminion.events import Event
from mixminion.test.test_status import CONTRACT_KEYS
from mixminion.testing.processes import MixNode, metric, metrics_text
from tests.test_node_options import RELOADED_ONE, NodeTestCase, reactor

GB = 1 << 30
AUTHORITY_FINGERPRINT = "A" * 40


class Authority(Resource):
    """An authority that accepts every descriptor (descriptors.md §7.3)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.uploads = 0

    def render_POST(self, request) -> bytes:  # noqa: N802
        self.uploads += 1
        request.setHeader(b"Content-Type", b"text/plain")
        return b"Status: 1\nMessage: Accepted.\n"


def fetch(port: int, path: str) -> tuple[int, str]:
    """(status, body) of a GET on the node's metrics port (blocking)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as page:
            return page.status, page.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


class HealthTests(NodeTestCase):
    def test_start_line_at_warn(self) -> defer.Deferred:
        """At the default level WARN a healthy start says one line: who
        the node is, where it listens, how long its key lasts."""
        return defer.ensureDeferred(self._start_line())

    async def _start_line(self) -> None:
        node = MixNode(self)
        await node.start(node.config(metrics=True, log_level="WARN"))
        [line] = node.daemon.lines("Mix node node started")
        self.assertIn("#warn]", line)
        self.assertIn(f"Mix node node started: identity {node.descriptor().fingerprint}, "
                      f"listening on 127.0.0.1:{node.port} (MMTP), "
                      f"127.0.0.1:{node.metrics_port} (metrics), packet key valid from ", line)
        self.assertRegex(line, r"to \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC$")
        self.assertEqual(node.daemon.lines("#info]"), [])

    def test_health_follows_min_free_disk(self) -> defer.Deferred:
        return defer.ensureDeferred(self._min_free_disk())

    async def _min_free_disk(self) -> None:
        node = MixNode(self)
        await node.start(node.config(metrics=True, server="MinFreeDisk: 1 MB"))
        self.assertEqual(await threads.deferToThread(fetch, node.metrics_port, "/health"),
                         (200, "ok\n"))
        free = shutil.disk_usage(node.base).free
        node.write(node.config(metrics=True, server=f"MinFreeDisk: {free // GB + 1024} GB"))
        node.daemon.signal(signal.SIGHUP)
        await node.daemon.wait_for_line(reactor, RELOADED_ONE)
        code, body = await threads.deferToThread(fetch, node.metrics_port, "/health")
        self.assertEqual(code, 503, body)
        disk = [r for r in body.splitlines() if r.startswith("disk space under MinFreeDisk: ")]
        self.assertEqual(len(disk), 1, body)
        self.assertIn(f"free on the disk of {node.base}", disk[0])
        node.write(node.config(metrics=True, server="MinFreeDisk: 1 MB"))
        node.daemon.signal(signal.SIGHUP)
        await node.daemon.wait_for_line(reactor, RELOADED_ONE, count=2)
        # Processing (which waited too, under half the floor) looks again
        # every 2 seconds.
        await node.daemon.wait_for(
            reactor, "/health to answer 200 again",
            lambda: threads.deferToThread(fetch, node.metrics_port, "/health").addCallback(
                lambda result: result == (200, "ok\n")), timeout=20, interval=0.5)

    def test_status_metrics_and_a_quiet_log(self) -> defer.Deferred:
        return defer.ensureDeferred(self._status_and_metrics())

    async def _status_and_metrics(self) -> None:
        authority = Authority()
        listening = reactor.listenTCP(0, Site(authority), interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        url = f"http://127.0.0.1:{listening.getHost().port}/"
        node = MixNode(self)
        await node.start(node.config(metrics=True, extra=(  # LogLevel INFO
            f"[DirectoryServers]\nPublish: yes\nAuthority: {url} {AUTHORITY_FINGERPRINT}\n")))
        await node.daemon.wait_for_line(reactor, "Descriptor of key_0001 published")
        await node.send(node.drop_packets(1))
        await node.wait_counted(Event.DROPPED_DUMMY, 1)

        code, body = await threads.deferToThread(fetch, node.metrics_port, "/status")
        self.assertEqual(code, 200)
        doc = json.loads(body)
        self.assertEqual(set(doc), CONTRACT_KEYS)
        self.assertEqual(doc["fingerprint"], node.descriptor().fingerprint)
        self.assertEqual((doc["nickname"], doc["pid"], doc["running"]),
                         ("node", node.daemon.pid, True))
        self.assertEqual(doc["listening"], [f"127.0.0.1:{node.port}",
                                            f"127.0.0.1:{node.metrics_port}"])
        self.assertEqual(doc["health"], {"ok": True, "reasons": []})
        publication = doc["publication"]
        self.assertEqual((publication["authorities"], publication["last_error"]), ([url], None))
        self.assertGreaterEqual(publication["last_success"], publication["last_attempt"])
        self.assertGreaterEqual(authority.uploads, 1)
        self.assertIn(float(node.descriptor().valid_until),
                      [key["valid_until"] for key in doc["keys"]])
        status_file = os.path.join(node.base, "work", "status.json")
        with open(status_file) as f:
            written = json.load(f)
        self.assertEqual(set(written), CONTRACT_KEYS)
        self.assertEqual(written["fingerprint"], doc["fingerprint"])

        text = await threads.deferToThread(metrics_text, node.metrics_port)
        self.assertRegex(text, r'\nmixminion_build_info\{version="[^"]+"\} 1\.0\n')
        for event in Event:
            self.assertIn(f'mixminion_events_total{{event="{event.value}"}} ', text)
        self.assertEqual(metric(node.metrics_port, Event.RECEIVED_PACKET), 1)
        self.assertEqual(metric(node.metrics_port, Event.RELAYED_TO_SELF), 1)
        self.assertIn("\nmixminion_uptime_seconds ", text)
        self.assertIn("\nmixminion_packet_key_valid_until_seconds{keyset=\"key_0001\"} ", text)
        self.assertIn("\nprocess_resident_memory_bytes ", text)

        self.assertEqual(await node.daemon.stop(reactor), -signal.SIGTERM)
        self.assertEqual(node.daemon.lines("Starting factory"), [])
        self.assertEqual(node.daemon.lines("Stopping factory"), [])
        self.assertEqual(node.daemon.lines("GET /"), [])
        self.assertEqual(node.daemon.lines(" at 0x"), [])
        with open(status_file) as f:
            last = json.load(f)
        self.assertIs(last["running"], False)
