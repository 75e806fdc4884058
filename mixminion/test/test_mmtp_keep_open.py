"""``InitiatorSettings.keep_open`` (``[Outgoing/MMTP] KeepOpen``): a
connection whose packets are all acknowledged stays open that long, so a
packet that comes soon after goes out at once, with no TCP connection or
TLS handshake to wait for (issue 18, point 2).  In memory, through real TLS
to a real responder, on a ``task.Clock`` (the harness of
``test_mmtp_protocol``); through ``twistd``: tests/test_node_options.py."""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from mixminion.mmtp.initiator import ConnectionFailed, InitiatorSettings, Phase
from mixminion.test.test_mmtp_client_limit import Hops
from mixminion.test.test_mmtp_protocol import LogMixin, MemorySink, Network, make_packet


class KeepOpenTests(LogMixin):
    def test_at_zero_a_connection_closes_once_all_is_acknowledged(self) -> None:
        """The reference's rule (mmtp.md §7.4 step 3), and the default."""
        net = Network(MemorySink())
        ds = net.send([make_packet(0)])
        net.flush()
        self.assertEqual(ds.results, [None])
        self.assertEqual(net.client.connections, 0)

    def test_a_packet_within_keep_open_goes_out_on_the_same_connection(self) -> None:
        net = Network(MemorySink(), InitiatorSettings(keep_open=5.0))
        first = net.send([make_packet(0)])
        net.flush()
        self.assertEqual(first.results, [None])
        [conn] = net.initiators
        self.assertIs(conn.phase, Phase.IDLE)
        net.clock.advance(4.0)
        second = net.send([make_packet(1), make_packet(2)])
        net.flush()
        self.assertEqual(second.results, [None, None])
        self.assertEqual(len(net.links), 1, "no new connection")
        self.assertEqual(net.sink.stored, [make_packet(n) for n in range(3)])
        # The wait starts again from the last acknowledgement.
        net.clock.advance(4.0)
        self.assertIs(conn.phase, Phase.IDLE)
        net.clock.advance(1.0)
        net.flush()
        self.assertIs(conn.phase, Phase.CLOSED)
        self.assertIsNone(conn.failure)
        self.assertEqual(net.client.connections, 0)

    def test_an_idle_connection_is_not_a_stuck_next_hop(self) -> None:
        """Nothing is awaited while it is kept open: the acknowledgement and
        idle deadlines do not run, and its close is no failure."""
        settings = InitiatorSettings(keep_open=120.0, ack_timeout=30.0, idle_timeout=60.0)
        net = Network(MemorySink(), settings)
        net.send([make_packet(0)])
        net.flush()
        [conn] = net.initiators
        net.clock.advance(90.0)
        net.flush()
        self.assertIs(conn.phase, Phase.IDLE)
        net.clock.advance(30.0)
        net.flush()
        self.assertIs(conn.phase, Phase.CLOSED)
        self.assertFalse(conn.next_hop_failed)
        self.assertTrue(net.client.proven(net.destination))
        self.assertEqual(net.client.stats["TimedOut"], 0)

    def test_a_full_connection_is_not_kept_open(self) -> None:
        net = Network(MemorySink(),
                      InitiatorSettings(keep_open=5.0, max_packets_per_connection=2))
        net.send([make_packet(0), make_packet(1)])
        net.flush()
        self.assertEqual(net.client.connections, 0)

    def test_a_destination_waiting_for_a_slot_closes_an_idle_connection(self) -> None:
        net = Hops(MemorySink(), InitiatorSettings(keep_open=60.0, max_connections=1))
        a, b = net.hop("192.0.2.1"), net.hop("192.0.2.2")
        net.send_to([a])
        net.flush()
        self.assertEqual((net.client.connections, net.opened), (1, [a]))
        ds = net.send_to([b], first=1)
        net.flush()
        self.assertEqual(ds.results, [None])
        self.assertEqual(net.opened, [a, b])
        self.assertEqual(net.initiators[0].phase, Phase.CLOSED)
        self.assertIsNone(net.initiators[0].failure)

    def test_a_connection_is_not_kept_open_while_a_destination_waits_for_its_slot(self) -> None:
        """The other order: B waits for the only slot while A still sends;
        A's last acknowledgement closes it at once instead of keeping it."""
        from mixminion.test.test_mmtp_protocol import HeldSink

        net = Hops(HeldSink(), InitiatorSettings(keep_open=60.0, max_connections=1))
        a, b = net.hop("192.0.2.1"), net.hop("192.0.2.2")
        net.send_to([a])
        net.flush()
        ds = net.send_to([b], first=1)
        net.flush()
        self.assertEqual((net.opened, net.client.waiting_destinations), ([a], 1))
        net.store(0)  # A's only packet is acknowledged
        net.flush()
        self.assertEqual(net.initiators[0].phase, Phase.CLOSED)
        self.assertEqual(net.opened, [a, b])
        net.store(1)
        self.assertEqual(ds.results, [None])

    def test_a_shorter_keep_open_closes_idle_connections_at_once(self) -> None:
        """A SIGHUP that lowers KeepOpen (here to 0) does not leave
        connections open for the old time."""
        net = Network(MemorySink(), InitiatorSettings(keep_open=60.0))
        net.send([make_packet(0)])
        net.flush()
        [conn] = net.initiators
        net.client.apply_settings(InitiatorSettings(keep_open=0.0))
        net.flush()
        self.assertIs(conn.phase, Phase.CLOSED)
        self.assertIsNone(conn.failure)


class ClosedUnderUsTests(LogMixin):
    """The next hop closes a connection we keep open (its own idle timeout,
    a restart) just as packets go out on it: they never reached it, and
    are sent again on a new connection at once, rather than failed and left
    to the next hop's retry schedule (an hour by default)."""

    def kept_open(self, sink: Any) -> tuple[Network, Any]:
        net = Network(sink, InitiatorSettings(keep_open=60.0))
        net.send([make_packet(0)])
        net.flush()
        if sink.waiting:  # a HeldSink: the first packet is stored now
            sink.store(0)
            net.flush()
        [conn] = net.initiators
        self.assertIs(conn.phase, Phase.IDLE)
        return net, conn

    @staticmethod
    def peer_closes(net: Network) -> None:
        """The first link goes: what we wrote on it never arrives."""
        client, _, _ = net.links.pop(0)
        client.transport.getOutBuffer()
        client.connectionLost(Failure(ConnectionDone("closed by the next hop")))

    def test_packets_sent_as_it_closes_go_out_on_a_new_connection(self) -> None:
        net, conn = self.kept_open(MemorySink())
        ds = net.send([make_packet(1), make_packet(2)])
        self.peer_closes(net)
        net.flush()
        self.assertEqual(ds.results, [None, None])
        self.assertEqual(len(net.initiators), 2)
        self.assertEqual(net.sink.stored, [make_packet(n) for n in range(3)])
        self.assertIs(conn.phase, Phase.CLOSED)
        self.assertEqual(len(conn.returned), 2)
        self.assertFalse(conn.next_hop_failed)
        self.assertTrue(net.client.proven(net.destination))
        self.assertEqual(net.client.stats["FailedRelay"], 0)
        self.assertEqual(net.client.stats["SuccessfulRelay"], 3)

    def test_once_it_has_answered_since_a_loss_fails_as_before(self) -> None:
        """An acknowledgement after it was woken shows the next hop was
        there: what is still unacknowledged when it goes fails as on any
        connection (its caller retries it)."""
        from mixminion.test.test_mmtp_protocol import HeldSink

        net, conn = self.kept_open(HeldSink())
        ds = net.send([make_packet(1), make_packet(2)])
        net.flush()
        net.sink.store(1)
        net.flush()
        self.assertEqual(ds.results, [None, "?"])
        self.peer_closes(net)
        net.flush()
        self.assertEqual(ds.types(), [None, ConnectionFailed])
        self.assertEqual(conn.returned, [])
        self.assertEqual(len(net.initiators), 1)


class UnprovenShareTests(LogMixin):
    """Who a connection kept open makes way for."""

    def test_a_destination_held_back_by_the_unproven_share_closes_nothing(self) -> None:
        """Every slot taken, and the only one waiting is a next hop not
        proven, whose share is full: closing the connection kept open to a
        proven one would free a slot it may not take."""
        from mixminion.test.test_mmtp_protocol import HeldSink

        net = Hops(HeldSink(), InitiatorSettings(keep_open=60.0, max_connections=4))
        proven = net.hop("192.0.2.1")
        for n in (0, 1):  # the second connection opens once it is proven
            net.send_to([proven], first=n)
            net.flush()
            net.store(n)
            net.clock.advance(60.0)
            net.flush()
        net.send_to([proven], first=9)
        net.flush()
        net.store(9)
        kept = net.initiators[-1]
        self.assertFalse(kept.unproven)
        self.assertIs(kept.phase, Phase.IDLE)
        new = [net.hop(f"192.0.2.{n}") for n in (2, 3, 4, 5)]
        net.send_to(new, first=10)  # three take the unproven share, the fourth waits
        net.flush()
        self.assertEqual((net.client.connections, net.client.waiting_destinations), (4, 1))
        self.assertIs(kept.phase, Phase.IDLE)
        opened = len(net.opened)
        net.send_to([proven], first=20)  # it still serves its next hop at once
        net.flush()
        net.store(20)
        self.assertEqual(len(net.opened), opened)
        net.store(10)  # a new one answers: its slot goes to the one waiting
        self.assertEqual(net.opened[-1], new[3])

    def test_only_as_many_close_as_the_unproven_share_has_room_for(self) -> None:
        """Two next hops not proven arrive one after the other while the
        unproven share has room for one more: one connection kept open
        closes for the first, none for the second."""
        from mixminion.test.test_mmtp_protocol import HeldSink

        net = Hops(HeldSink(), InitiatorSettings(keep_open=60.0, max_connections=4))
        p1, p2 = net.hop("192.0.2.1"), net.hop("192.0.2.2")
        net.send_to([p1, p2])  # proven once they answer; then kept open, proven
        net.flush()
        net.store(0)
        net.store(1)
        net.clock.advance(60.0)
        net.flush()
        net.send_to([p1, p2], first=2)
        net.flush()
        net.store(2)
        net.store(3)
        kept = net.initiators[-2:]
        self.assertEqual([(c.phase, c.unproven) for c in kept], [(Phase.IDLE, False)] * 2)
        net.send_to([net.hop("192.0.2.3"), net.hop("192.0.2.4")], first=4)  # busy, unproven
        net.flush()
        self.assertEqual(net.client.connections, 4)
        d1, d2 = net.hop("192.0.2.5"), net.hop("192.0.2.6")
        net.send_to([d1], first=6)  # the first one's connection is still closing ...
        net.send_to([d2], first=7)  # ... when the second comes
        net.flush()
        self.assertEqual(sorted(c.phase.value for c in kept), ["closed", "idle"])
        self.assertEqual(net.opened[-1], d1)
        self.assertEqual(net.client.waiting_destinations, 1)
