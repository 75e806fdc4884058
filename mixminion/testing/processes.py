"""Real ``twistd`` processes for tests and benchmarks.

The process core -- :class:`Daemon`, :func:`node_config`, :func:`free_ports`,
:func:`wait_until` and the rest -- is :mod:`mixminion.testing.daemon`,
shared with ``mixminion-testnet``; it is all importable from here too.
This module adds what needs the codec and MMTP: a :class:`MixNode` is one
``twistd mixminion`` node of a test or a benchmark around its
:class:`Daemon` (its folder, ports and configuration, its descriptor's
hop, its metrics, packets sent to it over MMTP).  Nothing here imports
trial.
"""

from __future__ import annotations

import os
import time
from typing import Any, Optional, Sequence

from twisted.internet import defer, protocol, task, threads
from twisted.python.failure import Failure

from mixminion.codec.build import build_forward_packet
from mixminion.codec.header import Hop
from mixminion.codec.packet import PAYLOAD_LEN
from mixminion.codec.routing import DROP_TYPE, HostInfo
from mixminion.directory.descriptor import ServerDescriptor, parse_descriptor
from mixminion.mmtp.initiator import NextHop, MMTPClient, MMTPError
from mixminion.testing.daemon import (
    Daemon,
    authority_config,
    family_rss_mb,
    free_ports,
    gauge,
    metric,
    metrics_text,
    node_config,
    pid_alive,
    port_open,
    read_text,
    rss_kb,
    run_twistd,
    sleep,
    twistd,
    upload_report,
    wait_until,
)

__all__ = ["BlackHole", "Daemon", "MixNode", "authority_config", "family_rss_mb",
           "forward_packets", "free_ports", "gauge", "metric", "metrics_text", "node_config",
           "pid_alive", "port_open", "read_text", "relay_and_next_hop", "rss_kb", "run_twistd",
           "send_until_acknowledged", "sleep", "twistd", "upload_report", "wait_until"]


class BlackHole(protocol.Factory):
    """A TCP listener that accepts and never says a word (a next hop or an
    MTA that hangs); counts the connections open at once."""

    def __init__(self) -> None:
        self.open = 0
        self.most = 0
        self.total = 0
        self.addresses: set[str] = set()
        self.protocols: set[protocol.Protocol] = set()

    def buildProtocol(self, addr: Any) -> protocol.Protocol:  # noqa: N802
        factory = self

        class Silent(protocol.Protocol):
            def connectionMade(self) -> None:  # noqa: N802
                factory.open += 1
                factory.total += 1
                factory.most = max(factory.most, factory.open)
                factory.addresses.add(self.transport.getHost().host)
                factory.protocols.add(self)

            def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
                factory.open -= 1
                factory.protocols.discard(self)

        return Silent()

    def close_all(self) -> None:
        for proto in list(self.protocols):
            proto.transport.abortConnection()


async def send_until_acknowledged(reactor: Any, client: MMTPClient, destination: NextHop,
                                  packet: bytes, deadline: float, reasons: dict[str, int],
                                  retry_after: float = 0.5) -> bool:
    """Send ``packet`` until ``destination`` acknowledges it, as a persistent
    sender would: a connection refused or closed under it is tried again
    after ``retry_after`` seconds (a real node waits for its retry
    schedule, an hour by default).  False if ``deadline`` (a
    ``time.monotonic()`` value) passes first; each failed attempt is
    counted in ``reasons`` under its message."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            await client.send_packet(destination, packet).addTimeout(left, reactor)
        except defer.TimeoutError:
            continue
        except MMTPError as exc:
            reasons[str(exc)] = reasons.get(str(exc), 0) + 1
            await task.deferLater(reactor, retry_after, lambda: None)
            continue
        return True


def _global_reactor() -> Any:
    """The global reactor, imported only when a node is used (importing
    this module installs none)."""
    from twisted.internet import reactor
    return reactor


class MixNode:
    """One ``twistd mixminion`` node in a folder of its own, ``NAME`` under
    ``where``: a test case (its ``dir``; the node is killed by its cleanup)
    or a folder.  It has an MMTP port and a metrics port; its configuration
    file is written by :meth:`write` (or :meth:`start`), typically the text
    of :meth:`config`.  ``twistd_options`` go before the ``mixminion``
    command (e.g. a profiler's)."""

    def __init__(self, where: Any, name: str = "node",
                 twistd_options: Sequence[str] = ()) -> None:
        self.name = name
        self.dir = os.path.join(where if isinstance(where, str) else where.dir, name)
        os.makedirs(self.dir)
        self.base = os.path.join(self.dir, "base")
        self.conf = os.path.join(self.dir, "node.conf")
        self.port, self.metrics_port = free_ports(2)
        self.daemon = Daemon(self.dir, [*twistd_options, "mixminion", "-c", self.conf], name=name)
        self.starts = 0
        self._descriptor: Optional[ServerDescriptor] = None
        if not isinstance(where, str):
            where.addCleanup(self.daemon.kill)

    def config(self, metrics: bool = False, server: str = "", **sections: Any) -> str:
        """:func:`node_config` for this node (``metrics``: with its
        ``MetricsPort``)."""
        if metrics:
            server = f"MetricsPort: {self.metrics_port}\n{server}"
        return node_config(self.base, self.port, nickname=self.name, server=server, **sections)

    def write(self, text: str) -> None:
        with open(self.conf, "w") as f:
            f.write(text)

    async def start(self, text: Optional[str] = None, timeout: float = 60.0,
                    listening: bool = False) -> None:
        """Write ``text`` as the configuration (if given; with none written
        yet, :meth:`config` with metrics), start twistd and wait for the
        start line (the line of this start: the log goes on across
        restarts; it is a WARN line, so it shows at any LogLevel), or with
        ``listening`` for the MMTP port alone."""
        if text is not None:
            self.write(text)
        elif not os.path.exists(self.conf):
            self.write(self.config(metrics=True))
        self._descriptor = None
        self.daemon.start()
        self.starts += 1
        reactor = _global_reactor()
        if listening:
            await self.daemon.wait_for_port(reactor, self.port, timeout)
        else:
            await self.daemon.wait_for_line(reactor, f"Mix node {self.name} started",
                                            timeout=timeout, count=self.starts)

    def descriptor(self) -> ServerDescriptor:
        """Its current descriptor, from its keyset folder (read once a start)."""
        if self._descriptor is None:
            with open(os.path.join(self.base, "keys", "key_0001", "ServerDesc")) as f:
                self._descriptor = parse_descriptor(f.read(), time.time())
        return self._descriptor

    @property
    def identity(self) -> bytes:
        """Its identity key's digest (what an MMTP client expects)."""
        return self.descriptor().identity_digest

    @property
    def packet_key(self) -> Any:
        """Its public packet key."""
        return self.descriptor().packet_key

    def destination(self) -> NextHop:
        return NextHop("127.0.0.1", self.port, self.identity)

    def hop(self) -> Hop:
        desc = self.descriptor()
        return Hop(desc.packet_key, HostInfo.parse(desc.routing_info))

    def drop_packets(self, count: int) -> list[bytes]:
        """Valid packets through this node on both legs, ending in DROP."""
        me = self.hop()
        return [build_forward_packet(os.urandom(PAYLOAD_LEN), [me], [me], DROP_TYPE, b"",
                                     os.urandom).packet for _ in range(count)]

    async def send_all(self, packets: list[bytes],
                       client: Optional[MMTPClient] = None) -> list[Optional[Failure]]:
        """Send every packet at once (pipelined on one client: ``client``, or
        a new one closed afterwards); the failure of each, None for a packet
        acknowledged RECEIVED."""
        own = client is None
        sender = MMTPClient(_global_reactor()) if client is None else client
        try:
            destination = self.destination()
            results = await defer.DeferredList(
                [sender.send_packet(destination, p) for p in packets], consumeErrors=True)
        finally:
            if own:
                await sender.close()
        return [None if ok else value for ok, value in results]

    async def send(self, packets: list[bytes]) -> None:
        """Send ``packets`` to this node; all must be acknowledged."""
        failed = [f for f in await self.send_all(packets) if f is not None]
        assert not failed, f"{len(failed)} packets refused: {failed[:1]}"

    def counted(self, event: str) -> int:
        return metric(self.metrics_port, event)

    async def wait_counted(self, event: str, at_least: int, timeout: float = 60.0,
                           interval: float = 0.5) -> None:
        """Until its metrics page has counted ``event`` ``at_least`` times."""
        await self.daemon.wait_for(_global_reactor(), f"{event} >= {at_least}",
                                   lambda: self.counted(event) >= at_least, timeout=timeout,
                                   interval=interval)

    def rss_mb(self) -> float:
        return family_rss_mb(self.daemon.pid)


def forward_packets(a: MixNode, g: MixNode, count: int) -> list[bytes]:
    """``count`` packets through ``a`` to ``g``, dropped there."""
    first, last = a.hop(), g.hop()
    return [build_forward_packet(os.urandom(PAYLOAD_LEN), [first], [last], DROP_TYPE, b"",
                                 os.urandom).packet for _ in range(count)]


async def relay_and_next_hop(test: Any,
                             outgoing: str = "") -> tuple[BlackHole, int, MixNode, MixNode]:
    """For the outgoing black-hole attack: a :class:`BlackHole` on every
    127.0.0.0/8 address (and its port), and two nodes started, a relay A
    (``outgoing`` added to its ``[Outgoing/MMTP]``) and a next hop G that
    A has relayed one packet to (a next hop that has answered); all closed
    at the end of ``test``.  Returns ``(hole, port, a, g)``."""
    reactor = _global_reactor()
    hole = BlackHole()
    listening = reactor.listenTCP(0, hole, interface="0.0.0.0", backlog=1024)
    test.addCleanup(hole.close_all)
    test.addCleanup(listening.stopListening)

    g = MixNode(test, "honest")
    a = MixNode(test, "relay")
    a.write(a.config(metrics=True, outgoing=outgoing))
    await defer.gatherResults([defer.ensureDeferred(g.start()),
                               defer.ensureDeferred(a.start())])
    await a.send(await threads.deferToThread(forward_packets, a, g, 1))
    await g.wait_counted("ReceivedPacket", 1, timeout=60)
    return hole, listening.getHost().port, a, g

