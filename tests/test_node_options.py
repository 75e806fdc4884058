"""The ``[Server]`` file options, ``[Outgoing/MMTP]`` relaying rules
and SIGHUP, each shown on a real ``twistd -n mixminion -c
FILE`` process (the manual is a contract: every option has a test through
the real entry point that shows its effect).

Every node runs through :mod:`mixminion.testing.processes`; packets are
built with the codec from the node's own descriptor and sent over MMTP.
A SIGHUP is only sent once the node has acknowledged a packet: twistd
runs the reactor only after every service has started, so an
acknowledgement proves the SIGHUP handler is installed (a SIGHUP before
that would kill the process, SIGHUP's default action).
"""

from __future__ import annotations

import os
import signal
from typing import Any, Optional

from twisted.internet import defer, protocol, threads
from twisted.internet import reactor as _reactor
from twisted.trial import unittest

from mixminion.codec.build import build_forward_packet, build_message_packets
from mixminion.codec.header import Hop
from mixminion.codec.packet import PAYLOAD_LEN
from mixminion.codec.routing import DROP_TYPE, MBOX_TYPE, SMTP_TYPE, IPv4Info
from mixminion.mmtp.initiator import MMTPClient, PacketRejected
from mixminion.server.pidfile import read_pid
from mixminion.smtpsink import tac_text
from mixminion.testing.processes import Daemon, MixNode, free_ports, metric, read_text, run_twistd

#: the global reactor (untyped: its interfaces are spread over many zope ones)
reactor: Any = _reactor

RELOADED_ONE = "SIGHUP: applied 1 changed options"
NOT_RELOADED = "SIGHUP: configuration not reloaded, still running on the old one: "

#: seconds between two reads of /metrics
METRICS_POLL = 0.5


class NodeTestCase(unittest.TestCase):
    """Each test in a folder of its own (``self.dir``)."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)


class ServerPathTests(NodeTestCase):
    """``QueueDir``, ``WorkDir``, ``PidFile``."""

    def test_queue_dir_and_work_dir_are_honoured(self) -> defer.Deferred:
        return defer.ensureDeferred(self._queue_and_work_dirs())

    async def _queue_and_work_dirs(self) -> None:
        node = MixNode(self)
        queues, work = os.path.join(self.dir, "fastq"), os.path.join(self.dir, "w")
        await node.start(node.config(server=f"QueueDir: {queues}\nWorkDir: {work}"))
        self.assertTrue(os.path.isfile(os.path.join(queues, "packets.db")), os.listdir(queues))
        self.assertTrue(os.path.isdir(os.path.join(queues, "incoming")), os.listdir(queues))
        self.assertFalse(os.path.exists(os.path.join(node.base, "work", "queues")))
        self.assertFalse(os.path.exists(os.path.join(node.base, "work")), os.listdir(node.base))
        # Received packets go to the incoming log under QueueDir.
        self.assertEqual(await node.send_all(node.drop_packets(1)), [None])
        self.assertTrue(os.listdir(os.path.join(queues, "incoming")))
        # The counters are saved at a clean stop, under WorkDir.
        self.assertEqual(await node.daemon.stop(reactor), -signal.SIGTERM)
        self.assertTrue(os.path.isfile(os.path.join(work, "stats.json")), os.listdir(work))
        self.assertFalse(os.path.exists(os.path.join(node.base, "work")), os.listdir(node.base))

    def test_pid_file_default(self) -> defer.Deferred:
        """``BaseDir/pid`` holds twistd's pid while the node runs; a second
        node on the same configuration stops with one line naming the file;
        SIGTERM removes it.  twistd re-raises SIGTERM once it has stopped
        cleanly, so the exit status is "killed by SIGTERM" (Popen: -15;
        a shell's $?: 143)."""
        return defer.ensureDeferred(self._pid_file(None))

    def test_pid_file_configured(self) -> defer.Deferred:
        return defer.ensureDeferred(self._pid_file(os.path.join(self.dir, "run", "mix.pid")))

    async def _pid_file(self, configured: Optional[str]) -> None:
        node = MixNode(self)
        path = configured or os.path.join(node.base, "pid")
        await node.start(node.config(server=f"PidFile: {configured}" if configured else ""))
        pid = node.daemon.pid
        self.assertEqual(read_pid(path), pid)
        second = await threads.deferToThread(run_twistd, ["mixminion", "-c", node.conf],
                                             cwd=node.dir)
        self.assertNotEqual(second.returncode, 0, second.stdout)
        self.assertNotIn("Traceback", second.stdout)
        naming = [line for line in second.stdout.splitlines() if path in line]
        self.assertEqual(len(naming), 1, second.stdout)
        self.assertTrue(naming[0].startswith("mixminion: "), naming[0])
        self.assertIn(f"process {pid} ", naming[0])
        self.assertTrue(node.daemon.alive())
        self.assertEqual(read_pid(path), pid)
        self.assertEqual(await node.daemon.stop(reactor), -signal.SIGTERM)
        self.assertFalse(os.path.exists(path))


class PrivateFilesTests(NodeTestCase):
    """Nothing the node writes is readable by others: the fragment store
    and twistd's log were 0644 (issue 12 point 10)."""

    def test_files_are_private(self) -> defer.Deferred:
        return defer.ensureDeferred(self._private())

    async def _private(self) -> None:
        node = MixNode(self)
        aliases = os.path.join(self.dir, "aliases")
        with open(aliases, "w") as f:
            f.write("alice: alice@example.org\n")
        os.chmod(aliases, 0o644)
        await node.start(node.config(extra=(
            "[Delivery/MBOX]\nEnabled: yes\nReturnAddress: exit@example.org\n"
            f"RemoveContact: exit@example.org\nAddressFile: {aliases}\n"
            f"MboxFile: {os.path.join(self.dir, 'mail.mbox')}\n"
            "[Delivery/Fragmented]\nEnabled: yes\nMaximumSize: 64K\n")))
        hop = node.hop()
        packets = [b.packet for b in build_message_packets(
            b"x" * 50000, MBOX_TYPE, b"alice", lambda i: ([hop], [hop]), os.urandom)]
        self.assertEqual(await node.send_all(packets), [None] * len(packets))
        mbox = os.path.join(self.dir, "mail.mbox")
        await node.daemon.wait_for(reactor, "the reassembled message",
                                   lambda: os.path.exists(mbox) and os.path.getsize(mbox) > 0)
        written = [node.daemon.log, mbox]
        for folder, _dirs, files in os.walk(node.base):
            written += [os.path.join(folder, name) for name in files]
        self.assertTrue(any("fragments.sqlite3" in path for path in written), written)
        public = ("ServerDesc", "published")  # the descriptor is published anyway
        loose = [f"{path} {oct(os.stat(path).st_mode & 0o777)}" for path in written
                 if os.path.exists(path) and os.stat(path).st_mode & 0o077
                 and os.path.basename(path) not in public]
        self.assertEqual(loose, [])


class StatsTests(NodeTestCase):
    """``StatsFile``, ``StatsInterval``, ``LogStats``."""

    def test_stats_interval_and_log_stats(self) -> defer.Deferred:
        return defer.ensureDeferred(self._stats())

    async def _stats(self) -> None:
        """A summary in StatsFile every StatsInterval; none with LogStats: no."""
        # The quiet node starts first, so when the loud one has written two
        # summaries the quiet one has run for more than two intervals too.
        quiet, loud = MixNode(self, "quiet"), MixNode(self, "loud")
        await quiet.start(quiet.config(server="LogStats: no\nStatsInterval: 2 seconds"))
        await loud.start(loud.config(server="StatsInterval: 2 seconds"))
        loud_file = os.path.join(loud.base, "stats")
        await loud.daemon.wait_for(reactor, "two summaries in the StatsFile",
                                   lambda: read_text(loud_file).count("Statistics from ") >= 2)
        self.assertRegex(read_text(loud_file), r"^Statistics from \d{4}-\d\d-\d\d \d\d:\d\d:\d\d "
                                               r"to \d{4}-\d\d-\d\d \d\d:\d\d:\d\d \(UTC\):\n")
        self.assertTrue(quiet.daemon.alive(), quiet.daemon.tail())
        self.assertFalse(os.path.exists(os.path.join(quiet.base, "stats")))

    def test_stats_file_option_names_the_file(self) -> defer.Deferred:
        return defer.ensureDeferred(self._stats_file())

    async def _stats_file(self) -> None:
        node = MixNode(self)
        path = os.path.join(self.dir, "elsewhere", "traffic.txt")
        await node.start(node.config(server=f"StatsFile: {path}\nStatsInterval: 1 second"))
        await node.daemon.wait_for(reactor, "a summary in the configured StatsFile",
                                   lambda: "Statistics from " in read_text(path))
        self.assertFalse(os.path.exists(os.path.join(node.base, "stats")))


class ReloadTests(NodeTestCase):
    """SIGHUP applies ``MaxQueuedPackets`` and ``LogLevel`` without a
    restart, and a broken file changes nothing."""

    def assertSameProcess(self, node: MixNode, pid: int) -> None:
        self.assertTrue(node.daemon.alive(), node.daemon.tail())
        self.assertEqual(node.daemon.pid, pid)
        self.assertEqual(read_pid(os.path.join(node.base, "pid")), pid)

    def test_sighup_lowers_max_queued_packets(self) -> defer.Deferred:
        return defer.ensureDeferred(self._max_queued())

    async def _max_queued(self) -> None:
        node = MixNode(self)
        await node.start(node.config())
        pid = node.daemon.pid
        client = MMTPClient(reactor)
        self.addCleanup(client.close)
        self.assertEqual(await node.send_all(node.drop_packets(30), client), [None] * 30)
        node.write(node.config(server="MaxQueuedPackets: 1"))
        node.daemon.signal(signal.SIGHUP)
        await node.daemon.wait_for_line(reactor, RELOADED_ONE)
        outcomes = await node.send_all(node.drop_packets(200), client)
        failures = [f for f in outcomes if f is not None]
        self.assertTrue(failures, "no packet of the burst was answered REJECTED")
        for failure in failures:
            self.assertTrue(failure.check(PacketRejected), failure)
        self.assertSameProcess(node, pid)

    def test_sighup_as_soon_as_the_pid_file_exists(self) -> defer.Deferred:
        """The pid file is written once the services start; the SIGHUP
        handler is in place before that, so an operator's (or mixminiond's)
        SIGHUP can never hit the default action and kill the node."""
        return defer.ensureDeferred(self._early_sighup())

    async def _early_sighup(self) -> None:
        node = MixNode(self)
        node.write(node.config())
        node.daemon.start()
        pid = node.daemon.pid
        pid_file = os.path.join(node.base, "pid")
        await node.daemon.wait_for(reactor, "the pid file", lambda: read_pid(pid_file) == pid,
                                   interval=0.01)
        node.daemon.signal(signal.SIGHUP)
        await node.daemon.wait_for_line(reactor, "SIGHUP: configuration unchanged")
        self.assertSameProcess(node, pid)

    def test_sighup_changes_log_level(self) -> defer.Deferred:
        return defer.ensureDeferred(self._log_level())

    async def _log_level(self) -> None:
        node = MixNode(self)
        node.write(node.config(log_level="WARN"))
        node.daemon.start()
        pid = node.daemon.pid
        pid_file = os.path.join(node.base, "pid")
        await node.daemon.wait_for(reactor, "the pid file", lambda: read_pid(pid_file) == pid)
        self.assertEqual(await node.send_all(node.drop_packets(1)), [None])
        self.assertEqual(node.daemon.lines("#info]"), [])
        node.write(node.config())
        node.daemon.signal(signal.SIGHUP)
        await node.daemon.wait_for_line(reactor, RELOADED_ONE)
        [line] = node.daemon.lines(RELOADED_ONE)
        self.assertIn("#info]", line)
        self.assertSameProcess(node, pid)

    def test_sighup_with_an_error_keeps_the_running_configuration(self) -> defer.Deferred:
        return defer.ensureDeferred(self._broken_reload())

    async def _broken_reload(self) -> None:
        node = MixNode(self)
        await node.start(node.config())
        pid = node.daemon.pid
        self.assertEqual(await node.send_all(node.drop_packets(1)), [None])
        # A valid change beside the mistake: applied, it would refuse most of a burst.
        broken = node.config(server="MaxQueuedPackets: 1\nMaxQueuedPacketz: 1")
        node.write(broken)
        line_number = broken.splitlines().index("MaxQueuedPacketz: 1") + 1
        node.daemon.signal(signal.SIGHUP)
        await node.daemon.wait_for_line(reactor, NOT_RELOADED)
        [line] = node.daemon.lines(NOT_RELOADED)
        self.assertIn("#warn]", line)
        self.assertIn(f"{NOT_RELOADED}{node.conf}:{line_number}: [Server] MaxQueuedPacketz: "
                      "unknown option; did you mean MaxQueuedPackets?", line)
        self.assertEqual(node.daemon.lines("SIGHUP: applied"), [])
        self.assertEqual(await node.send_all(node.drop_packets(200)), [None] * 200)
        self.assertSameProcess(node, pid)


class CountingFactory(protocol.Factory):
    """A next hop that only counts the connections it accepts."""

    def __init__(self) -> None:
        self.connections = 0

    def buildProtocol(self, addr: Any) -> protocol.Protocol:  # noqa: N802
        self.connections += 1
        return protocol.Protocol()


class RelayRuleTests(NodeTestCase):
    """``[Outgoing/MMTP] Deny`` and ``Enabled: no``: a packet for a refused
    next hop is dropped, counted as RelayDenied, and never sent."""

    def test_deny_rule_drops_relayed_packets(self) -> defer.Deferred:
        return defer.ensureDeferred(self._relay_denied(outgoing="Deny: 127.0.0.0/255.0.0.0"))

    def test_outgoing_disabled_drops_relayed_packets(self) -> defer.Deferred:
        return defer.ensureDeferred(self._relay_denied(enabled=False))

    async def _relay_denied(self, outgoing: str = "", enabled: bool = True) -> None:
        hop = CountingFactory()
        listening = reactor.listenTCP(0, hop, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        node = MixNode(self)
        text = node.config(server=f"MetricsPort: {node.metrics_port}", outgoing=outgoing,
                           relaying=enabled)
        await node.start(text)
        desc = node.descriptor()
        elsewhere = Hop(desc.packet_key, IPv4Info("127.0.0.1", listening.getHost().port,
                                                  os.urandom(20)))
        packet = build_forward_packet(os.urandom(PAYLOAD_LEN), [node.hop(), elsewhere],
                                      [elsewhere], DROP_TYPE, b"", os.urandom).packet
        self.assertEqual(await node.send_all([packet]), [None])
        await node.daemon.wait_for(reactor, "RelayDenied on /metrics",
                                   lambda: metric(node.metrics_port, "RelayDenied") >= 1,
                                   interval=METRICS_POLL)
        self.assertEqual(metric(node.metrics_port, "RelayDenied"), 1)
        self.assertEqual(metric(node.metrics_port, "SuccessfulRelay"), 0)
        self.assertEqual(hop.connections, 0)


class _CountingResponder:
    """A real MMTP next hop (TLS, our responder, packets kept in memory)
    that counts the connections it accepts."""

    def __init__(self, test: unittest.TestCase) -> None:
        from mixminion.mmtp.responder import responder_factory
        from mixminion.mmtp.tls import ResponderTLS
        from mixminion.test.test_mmtp_protocol import MemorySink
        from mixminion.testing.keys import key

        self.identity = key("responder")
        self.sink = MemorySink()
        self.factory = responder_factory(self.sink, ResponderTLS(self.identity, "NextHop"),
                                         reactor)
        self.connections = 0
        build = self.factory.buildProtocol

        def counted(addr: Any) -> Any:
            self.connections += 1
            return build(addr)

        self.factory.buildProtocol = counted  # type: ignore[method-assign]
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        test.addCleanup(self.port.stopListening)

    def hop(self, packet_key: Any) -> Hop:
        """A hop through here: its packet key does not matter (we never
        decrypt), its identity does (the node checks it at the handshake)."""
        return Hop(packet_key, IPv4Info("127.0.0.1", self.port.getHost().port,
                                        self.identity.public.keyid))


class KeepOpenTests(NodeTestCase):
    """``[Outgoing/MMTP] KeepOpen``: a connection to a next hop stays open
    that long after its last acknowledgement, so the packets of the next
    mix go out on it; at 0 the node closes it at once and the next packets
    need a new connection (and TLS handshake)."""

    def test_the_next_mix_goes_out_on_the_connection_kept_open(self) -> defer.Deferred:
        return defer.ensureDeferred(self._relay_twice("KeepOpen: 1 minute", connections=1))

    def test_at_zero_each_mix_opens_a_new_connection(self) -> defer.Deferred:
        return defer.ensureDeferred(self._relay_twice("KeepOpen: 0 seconds", connections=2))

    async def _relay_twice(self, outgoing: str, connections: int) -> None:
        hop = _CountingResponder(self)
        node = MixNode(self)
        await node.start(node.config(outgoing=outgoing))
        elsewhere = hop.hop(node.descriptor().packet_key)

        def packet() -> bytes:
            return build_forward_packet(os.urandom(PAYLOAD_LEN), [node.hop(), elsewhere],
                                        [elsewhere], DROP_TYPE, b"", os.urandom).packet

        # The second packet is sent once the first has arrived: it leaves
        # at a later mix (every second), after the first connection's last
        # acknowledgement.
        for sent in (1, 2):
            self.assertEqual(await node.send_all([packet()]), [None])
            await node.daemon.wait_for(reactor, f"packet {sent} at the next hop",
                                       lambda: len(hop.sink.stored) >= sent)
        self.assertEqual(hop.connections, connections)


class RelayToSelfTests(NodeTestCase):
    """A path may name one node twice in a row: the node hands the packet
    to its own incoming log, through the sink MMTP uses, and processes it
    again, with no connection to itself."""

    def test_a_path_through_one_node_three_times(self) -> defer.Deferred:
        async def go() -> None:
            node = MixNode(self)
            await node.start(node.config(server=f"MetricsPort: {node.metrics_port}"))
            me = node.hop()
            packet = build_forward_packet(os.urandom(PAYLOAD_LEN), [me, me], [me], DROP_TYPE,
                                          b"", os.urandom).packet
            self.assertEqual(await node.send_all([packet]), [None])
            await node.daemon.wait_for(reactor, "the dummy dropped at the third pass",
                                       lambda: metric(node.metrics_port, "DroppedDummy") >= 1,
                                       interval=METRICS_POLL)
            self.assertEqual(metric(node.metrics_port, "RelayedToSelf"), 2)
            self.assertEqual(metric(node.metrics_port, "ReceivedPacket"), 1)
            self.assertEqual(metric(node.metrics_port, "SuccessfulRelay"), 0)

        return defer.ensureDeferred(go())


class BlacklistReloadTests(NodeTestCase):
    """``[Delivery/SMTP] BlacklistFile`` is re-read on SIGHUP: a newly
    listed address gets no more mail."""

    def test_reloaded_blacklist_blocks_a_new_address(self) -> defer.Deferred:
        return defer.ensureDeferred(self._blacklist())

    async def _blacklist(self) -> None:
        sink_dir = os.path.join(self.dir, "sink")
        mail = os.path.join(sink_dir, "mail")
        os.makedirs(sink_dir)
        [sink_port] = free_ports(1)
        tac = os.path.join(sink_dir, "smtpsink.tac")
        with open(tac, "w") as f:
            f.write(tac_text(sink_port, mail))
        sink = Daemon(sink_dir, ["-y", tac], name="sink")
        self.addCleanup(sink.kill)
        sink.start()

        blacklist = os.path.join(self.dir, "blacklist")
        with open(blacklist, "w") as f:
            f.write("# addresses never mailed\n")
        node = MixNode(self)
        await sink.wait_for_line(reactor, f"starting on {sink_port}")
        await node.start(node.config(
            server=f"MetricsPort: {node.metrics_port}",
            extra=f"[Delivery/SMTP]\nEnabled: yes\nReturnAddress: exit@example.org\n"
                  f"SMTPServer: 127.0.0.1\nSMTPPort: {sink_port}\nBlacklistFile: {blacklist}\n"))

        def messages() -> list[str]:
            names = sorted(n for n in os.listdir(mail) if not n.startswith("."))
            return [read_text(os.path.join(mail, n)) for n in names]

        async def send_to_bob(body: bytes) -> None:
            hop = node.hop()
            packets = [b.packet for b in build_message_packets(
                body, SMTP_TYPE, b"bob@example.com", lambda i: ([hop], [hop]), os.urandom)]
            self.assertEqual(await node.send_all(packets), [None] * len(packets))

        def counted(event: str) -> bool:
            return metric(node.metrics_port, event) >= 1

        await send_to_bob(b"first message\n")
        await node.daemon.wait_for(reactor, "ExitDelivered:SMTP on /metrics",
                                   lambda: counted("ExitDelivered:SMTP"), interval=METRICS_POLL)
        [first] = messages()
        self.assertIn("X-Envelope-To: bob@example.com", first)
        self.assertIn("first message", first)

        with open(blacklist, "a") as f:
            f.write("deny address bob@example.com\n")
        node.daemon.signal(signal.SIGHUP)
        await node.daemon.wait_for_line(
            reactor, "SIGHUP: configuration unchanged; exit modules re-read their files")
        await send_to_bob(b"second message\n")
        await node.daemon.wait_for(reactor, "ExitBlacklisted on /metrics",
                                   lambda: counted("ExitBlacklisted"), interval=METRICS_POLL)
        self.assertEqual(metric(node.metrics_port, "ExitDelivered:SMTP"), 1)
        self.assertEqual(metric(node.metrics_port, "ExitFailed:SMTP"), 1)
        self.assertEqual(messages(), [first])
