"""The client's blocking MMTP sender over real loopback sockets.

Against the standard-library test peer (which can pose as a 0.0.8-era
server and reports how the TLS session ended) and against the node's own
Twisted responder: the link policy (1024-bit link keys only in legacy
mode), the peer check of mmtp.md section 5, and the close of section 7.4
(close_notify both ways before the FIN).
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer, threads
from twisted.internet import reactor as _reactor
from twisted.trial import unittest

from mixminion.mmtp import blocking
from mixminion.mmtp.frames import PACKET_LEN
from mixminion.mmtp.responder import responder_factory
from mixminion.mmtp.tls import ResponderTLS
from mixminion.testing.fakes import ListSink
from mixminion.testing.keys import key
from mixminion.testing.tlspeer import TLSPeer

reactor: Any = _reactor


def packets(n: int) -> list[bytes]:
    return [os.urandom(PACKET_LEN) for _ in range(n)]


class LinkPolicyTests(unittest.TestCase):
    """A responder with a 1024-bit link key, as 0.0.8 servers have."""

    def peer(self, **kw: Any) -> TLSPeer:
        peer = TLSPeer(key("blocking-identity"), link_bits=1024, **kw)
        self.addCleanup(peer.close)
        return peer

    def test_refused_by_default(self) -> None:
        peer = self.peer()
        result = blocking.send_packets("127.0.0.1", peer.port, key("blocking-identity").public.keyid,
                                       packets(1), timeout=10)
        peer.join()
        self.assertEqual(result.accepted, [])
        self.assertEqual(result.failure, "the link key is shorter than 2048 bits")
        self.assertEqual(peer.records[0].packets, [])

    def test_accepted_in_legacy_mode_from_an_original_server(self) -> None:
        peer = self.peer(original=True)
        sent = packets(3)
        result = blocking.send_packets("127.0.0.1", peer.port, key("blocking-identity").public.keyid,
                                       sent, legacy=True, timeout=10)
        peer.join()
        self.assertIsNone(result.failure)
        self.assertEqual(sorted(result.accepted), [0, 1, 2])
        (record,) = peer.records
        self.assertEqual(record.packets, sent)
        self.assertEqual((record.tls_version, record.cipher), ("TLSv1", "DHE-RSA-AES128-SHA"))

    def test_modern_mode_cannot_speak_to_an_original_server(self) -> None:
        peer = self.peer(original=True)
        result = blocking.send_packets("127.0.0.1", peer.port, key("blocking-identity").public.keyid,
                                       packets(1), timeout=10)
        peer.join()
        self.assertEqual(result.accepted, [])
        self.assertTrue(result.failure and result.failure.startswith("TLS failed"), result.failure)

    def test_legacy_still_checks_the_identity(self) -> None:
        peer = self.peer(original=True)
        result = blocking.send_packets("127.0.0.1", peer.port, key("someone-else").public.keyid,
                                       packets(1), legacy=True, timeout=10)
        peer.join()
        self.assertEqual(result.accepted, [])
        self.assertIn("identity key", result.failure or "")
        self.assertEqual(peer.records[0].packets, [])


class CloseTests(unittest.TestCase):
    """mmtp.md section 7.4: the initiator sends close_notify and waits for
    the responder's before the TCP close."""

    def test_peer_sees_close_notify_before_fin(self) -> None:
        peer = TLSPeer(key("blocking-identity"))
        self.addCleanup(peer.close)
        result = blocking.send_packets("127.0.0.1", peer.port, key("blocking-identity").public.keyid,
                                       packets(2), timeout=10)
        peer.join()
        self.assertEqual(sorted(result.accepted), [0, 1])
        self.assertEqual(peer.records[0].ending, "close_notify")
        self.assertTrue(result.closed_cleanly)

    def test_a_peer_that_closes_without_answering_is_not_a_clean_close(self) -> None:
        peer = TLSPeer(key("blocking-identity"), answer_close=False)
        self.addCleanup(peer.close)
        result = blocking.send_packets("127.0.0.1", peer.port, key("blocking-identity").public.keyid,
                                       packets(1), timeout=10)
        peer.join()
        self.assertEqual(result.accepted, [0])
        self.assertIsNone(result.failure)
        self.assertFalse(result.closed_cleanly)
        self.assertEqual(peer.records[0].ending, "close_notify")

    @defer.inlineCallbacks
    def test_the_node_responder_answers_close_notify(self) -> Any:
        """Both ends: our responder replies with its own close_notify."""
        identity = key("blocking-node")
        sink = ListSink()
        tls = ResponderTLS(identity, "Node", clock=reactor)
        port = reactor.listenTCP(0, responder_factory(sink, tls, reactor), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        sent = packets(4)
        result = yield threads.deferToThread(
            blocking.send_packets, "127.0.0.1", port.getHost().port, identity.public.keyid, sent,
            timeout=10)
        self.assertIsNone(result.failure)
        self.assertEqual(sorted(result.accepted), [0, 1, 2, 3])
        self.assertTrue(result.closed_cleanly)
        self.assertEqual(sorted(p for p in sink.packets), sorted(sent))


    @defer.inlineCallbacks
    def test_the_node_initiator_sends_close_notify(self) -> Any:
        """The node's Twisted initiator (relaying to a next hop) ends the
        same way."""
        from mixminion.codec.routing import NextHop
        from mixminion.mmtp.initiator import InitiatorSettings, MMTPClient
        from mixminion.mmtp.tls import InitiatorTLS

        identity = key("blocking-identity")
        peer = TLSPeer(identity)
        self.addCleanup(peer.close)
        client = MMTPClient(reactor, InitiatorTLS(), InitiatorSettings(close_timeout=10))
        sent = packets(2)
        hop = NextHop("127.0.0.1", peer.port, identity.public.keyid)
        yield defer.gatherResults([client.send_packet(hop, p) for p in sent])
        yield threads.deferToThread(peer.join)
        yield client.close()
        self.assertEqual(peer.records[0].packets, sent)
        self.assertEqual(peer.records[0].ending, "close_notify")


class DeadlineTests(unittest.TestCase):

    def test_a_trickling_peer_is_cut_off_by_the_overall_deadline(self) -> None:
        """Each byte comes well within the per-call timeout; the whole
        exchange still ends by timeout x (2 + packets)."""
        peer = TLSPeer(key("blocking-identity"), trickle=True)
        self.addCleanup(peer.close)
        ticks = iter(range(10_000))  # one second per call: no real waiting
        result = blocking.send_packets(
            "127.0.0.1", peer.port, key("blocking-identity").public.keyid, packets(1),
            timeout=4, monotonic=lambda: float(next(ticks)))
        self.assertEqual((result.accepted, result.failure), ([], "timed out"))

    def test_a_prompt_peer_is_within_the_deadline(self) -> None:
        """The same clock and timeout as above: only the trickle runs out."""
        peer = TLSPeer(key("blocking-identity"))
        self.addCleanup(peer.close)
        ticks = iter(range(10_000))
        result = blocking.send_packets(
            "127.0.0.1", peer.port, key("blocking-identity").public.keyid, packets(1),
            timeout=4, monotonic=lambda: float(next(ticks)))
        peer.join()
        self.assertEqual((result.accepted, result.failure), ([0], None))


class PingTests(unittest.TestCase):

    def test_junk_frame_acknowledged(self) -> None:
        peer = TLSPeer(key("blocking-identity"))
        self.addCleanup(peer.close)
        result = blocking.ping("127.0.0.1", peer.port, key("blocking-identity").public.keyid,
                               timeout=10)
        peer.join()
        self.assertEqual((result.accepted, result.failure), ([0], None))
        self.assertEqual(peer.records[0].junk, 1)

    def test_unauthenticated_ping_with_zero_keyid(self) -> None:
        peer = TLSPeer(key("blocking-identity"))
        self.addCleanup(peer.close)
        result = blocking.ping("127.0.0.1", peer.port, timeout=10)
        peer.join()
        self.assertEqual(result.accepted, [0])

    def test_nobody_listening(self) -> None:
        peer = TLSPeer(key("blocking-identity"), connections=0)
        peer.join()
        result = blocking.ping("127.0.0.1", peer.port, timeout=10)
        self.assertEqual(result.accepted, [])
        self.assertEqual(result.failure, "Connection refused")
