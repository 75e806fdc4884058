"""The node assembled from a configuration file, in process."""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.internet import defer, reactor
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from mixminion.codec.build import build_forward_packet
from mixminion.codec.header import Hop
from mixminion.codec.packet import PAYLOAD_LEN
from mixminion.codec.routing import DROP_TYPE, IPv4Info
from mixminion.directory.descriptor import parse_descriptor
from mixminion.mmtp.initiator import NextHop, MMTPClient
from mixminion.server.config import load_config
from mixminion.server.reload import ReloadService
from mixminion.server.tap import build_node


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: the beginnings of the [Server] and [Incoming/MMTP] sections of a relay
#: named ``unit`` on localhost (fill in ``{base}`` and ``{port}``)
UNIT_SERVER = """\
[Server]
BaseDir: {base}
Mode: relay
Nickname: unit
Contact-Email: unit@example.com
"""
UNIT_INCOMING = """\
[Incoming/MMTP]
Enabled: yes
IP: 127.0.0.1
Hostname: localhost
Port: {port}
"""

CONFIG = UNIT_SERVER + """\
MixAlgorithm: {algorithm}
MixInterval: {interval}
MixPoolMinSize: 5
MetricsPort: {metrics}

""" + UNIT_INCOMING + """\
MaxConnections: {maxconn}

[Outgoing/MMTP]
Enabled: yes
"""


class NodeFromConfigTests(unittest.TestCase):
    def _write(self, path: str, **values) -> None:
        with open(path, "w") as f:
            f.write(CONFIG.format(**values))

    @defer.inlineCallbacks
    def test_start_publish_reload_stop(self):
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
        yield reload.reload()
        self.assertEqual(node.mixer.interval, 7200)
        self.assertEqual(type(node.mixer.algorithm).__name__, "BinomialMix")
        self.assertEqual(node.limits.max_connections, 7)
        warnings = [e for e in events if "after a restart" in e.get("log_format", "")]
        self.assertEqual(sorted(e["key"] for e in warnings), ["ListenPort", "Port"])
        yield self._metrics(values["metrics"])

    @defer.inlineCallbacks
    def test_sighups_in_a_row_swap_modules_once_each(self):
        """Two reloads while a delivery round runs: each waits for the one
        before it, every replaced set of exit modules is stopped exactly
        once, and the node ends on the last one built."""
        base = os.path.abspath(self.mktemp())
        conf = base + ".conf"
        self._write(conf, base=base, algorithm="Timed", interval="1 hour", port=_free_port(),
                    maxconn=128, metrics=_free_port())
        node = build_node(load_config(conf), reactor)
        node.startService()
        self.addCleanup(node.stopService)
        from mixminion.exits.registry import Dispatcher

        stopped: list = []
        real_stop = Dispatcher.stop

        def stop(dispatcher):
            stopped.append(dispatcher)
            return real_stop(dispatcher)

        self.patch(Dispatcher, "stop", stop)
        first = node.delivery.dispatcher
        round_running = defer.Deferred()
        node.delivery._rounds.add(round_running)  # a round under way
        [service] = [s for s in node if isinstance(s, ReloadService)]
        done: list = []
        one = service.reload().addCallback(lambda _: done.append("one"))
        two = service.reload().addCallback(lambda _: done.append("two"))
        self.assertEqual((done, stopped), ([], []))  # both wait for the round
        self.assertIs(node.delivery.dispatcher, first)
        node.delivery._rounds.discard(round_running)
        round_running.callback(None)
        yield defer.gatherResults([one, two])
        self.assertEqual(sorted(done), ["one", "two"])
        # Three sets of modules: the first and the one the first reload put
        # in are stopped once each, in that order; the last one runs.
        last = node.delivery.dispatcher
        self.assertEqual(len(stopped), 2)
        self.assertIs(stopped[0], first)
        self.assertNotIn(last, stopped)
        self.assertEqual(len({id(d) for d in (*stopped, last)}), 3)

    def _metrics(self, port: int) -> defer.Deferred:
        from twisted.web.client import Agent, readBody

        d = Agent(reactor).request(b"GET", f"http://127.0.0.1:{port}/metrics".encode())
        d.addCallback(readBody)

        def check(body: bytes) -> None:
            text = body.decode()
            self.assertIn("# TYPE mixminion_events_total counter", text)
            self.assertIn("mixminion_queue_pool_packets 0", text)

        return d.addCallback(check)

    def _started_node(self, before: Any = None) -> tuple[str, int, Any]:
        """A Timed relay started in this process (``before(node)`` runs
        just before the start): (BaseDir, port, node)."""
        base = os.path.abspath(self.mktemp())
        conf = base + ".conf"
        port = _free_port()
        self._write(conf, base=base, algorithm="Timed", interval="1 hour", port=port,
                    maxconn=128, metrics=_free_port())
        node = build_node(load_config(conf), reactor)
        if before is not None:
            before(node)
        node.startService()
        return base, port, node

    @staticmethod
    async def _send_processed(node: Any, port: int, count: int) -> list[bytes]:
        """``count`` packets for ``node`` sent to it over MMTP and processed
        (each then dropped, one hop on); returns them."""
        key = node.packet_keys()[0]
        me = IPv4Info("127.0.0.1", port, node.identity.public.keyid)
        elsewhere = Hop(key.public, IPv4Info("127.0.0.1", 1, bytes(20)))
        packets = [build_forward_packet(os.urandom(PAYLOAD_LEN), [Hop(key.public, me),
                                                                  elsewhere],
                                        [elsewhere], DROP_TYPE, b"", os.urandom).packet
                   for _ in range(count)]
        client = MMTPClient(reactor)
        dest = NextHop("127.0.0.1", port, node.identity.public.keyid)
        await defer.gatherResults([client.send_packet(dest, p) for p in packets])
        await client.close()
        await node.processor.wait_idle()  # they are stored: they are processed
        return packets

    def test_stop_overwrites_the_processed_incoming_packets(self) -> None:
        """Received packets are processed into the pool; once the node has
        stopped, nothing of them is left readable in the incoming log."""
        base, port, node = self._started_node()
        stopped = []

        async def go() -> None:
            packets = await self._send_processed(node, port, 3)
            self.assertEqual(node.queue_sizes()["pool"], 3)
            self.assertEqual(node.queue_sizes()["incoming"], 0)  # processed, if not yet erased
            await node.stopService()
            stopped.append(True)
            log_dir = os.path.join(base, "work", "queues", "incoming")
            for name in os.listdir(log_dir):
                with open(os.path.join(log_dir, name), "rb") as f:
                    content = f.read()
                for packet in packets:
                    self.assertNotIn(packet[:4096], content)

        self.addCleanup(lambda: None if stopped else node.stopService())
        return defer.ensureDeferred(go())

    def test_a_retired_keys_replay_entries_go_once_processing_has_the_new_keys(self) -> None:
        """keys_rotated: the child decrypts with the new keys from its next
        drain on, so the retired key's replay entries stay until
        Processor.keys_in_use fires (here held by the test), then go."""
        _, port, node = self._started_node()
        self.addCleanup(node.stopService)

        def entries(keyid: bytes) -> int:
            return node.store._query_one("SELECT COUNT(*) FROM replay WHERE key_digest = ?",
                                         (keyid,))[0]

        async def go() -> None:
            await self._send_processed(node, port, 2)
            key = node.packet_keys()[0]
            keyid = key.public.keyid
            self.assertEqual(entries(keyid), 2)
            held: defer.Deferred = defer.Deferred()
            node.processor.keys_in_use = lambda: held  # a drain with the old keys runs
            node.keys_rotated([keyid])
            self.assertEqual(entries(keyid), 2)
            held.callback(None)
            self.assertEqual(entries(keyid), 0)

        return defer.ensureDeferred(go())

    def test_a_start_removes_the_replay_entries_of_keys_no_longer_live(self) -> None:
        """What a stop before keys_in_use fired left behind."""
        gone, live = bytes([7]) * 20, []

        def leftovers(node: Any) -> None:
            node.store.replay_seen_or_add_many(gone, [b"a" * 20, b"b" * 20])
            live.append(node.packet_keys()[0].public.keyid)
            node.store.replay_seen_or_add_many(live[0], [b"c" * 20])

        _, _, node = self._started_node(leftovers)
        self.addCleanup(node.stopService)
        self.assertEqual(node.store.replay_logs(), live)
