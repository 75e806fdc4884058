"""The node assembled from a configuration file, in process."""

from __future__ import annotations

import os
import socket

from twisted.internet import defer, reactor
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from mixminion.directory.descriptor import parse_descriptor
from mixminion.server.config import load_config
from mixminion.server.tap import ReloadService, build_node


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CONFIG = """\
[Server]
BaseDir: {base}
Mode: relay
Nickname: unit
Contact-Email: unit@example.com
MixAlgorithm: {algorithm}
MixInterval: {interval}
MixPoolMinSize: 5
MetricsPort: {metrics}

[Incoming/MMTP]
Enabled: yes
IP: 127.0.0.1
Hostname: localhost
Port: {port}
MaxConnections: {maxconn}

[Outgoing/MMTP]
Enabled: yes
"""


class NodeFromConfigTests(unittest.TestCase):
    def _write(self, path: str, **values) -> None:
        with open(path, "w") as f:
            f.write(CONFIG.format(**values))

    def test_start_publish_reload_stop(self) -> None:
        base = os.path.abspath(self.mktemp())
        conf = base + ".conf"
        values = dict(base=base, algorithm="Timed", interval="1 hour", port=_free_port(),
                      maxconn=128, metrics=_free_port())
        self._write(conf, **values)
        node = build_node(load_config(conf), reactor)
        node.startService()
        self.addCleanup(node.stopService)
        # Keys and a descriptor that verifies exist after the first start.
        [keyset] = node.keys.live_keysets(reactor.seconds())
        with open(os.path.join(base, "keys", "key_0001", "ServerDesc")) as f:
            desc = parse_descriptor(f.read(), reactor.seconds())
        self.assertEqual(desc.nickname, "unit")
        self.assertEqual(desc.port, values["port"])
        self.assertEqual(desc.packet_key, node.packet_keys()[0].public)
        self.assertEqual(oct(os.stat(node.keys.identity_path).st_mode & 0o777), "0o600")
        # SIGHUP: mixing and limits change at once; the port needs a restart.
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self._write(conf, **dict(values, algorithm="Binomial", interval="2 hours", maxconn=7,
                                 port=values["port"] + 1))
        [reload] = [s for s in node if isinstance(s, ReloadService)]
        reload.reload()
        self.assertEqual(node.mixer.interval, 7200)
        self.assertEqual(type(node.mixer.pool).__name__, "BinomialPool")
        self.assertEqual(node.settings.limits.max_connections, 7)
        warnings = [e for e in events if "after a restart" in e.get("log_format", "")]
        self.assertEqual(sorted(e["key"] for e in warnings), ["ListenPort", "Port"])
        return self._metrics(values["metrics"])

    def _metrics(self, port: int) -> defer.Deferred:
        from twisted.web.client import Agent, readBody

        d = Agent(reactor).request(b"GET", f"http://127.0.0.1:{port}/metrics".encode())
        d.addCallback(readBody)

        def check(body: bytes) -> None:
            text = body.decode()
            self.assertIn("# TYPE mixminion_events_total counter", text)
            self.assertIn("mixminion_queue_pool_packets 0", text)

        return d.addCallback(check)
