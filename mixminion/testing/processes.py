"""Real ``twistd`` processes for tests and benchmarks.

A :class:`Daemon` is one node (or authority) started the way an operator
starts it -- ``twistd -n mixminion -c FILE`` as a child process with its
own log file -- and watched from a test: wait for a log line, send a
signal, stop it and read its exit status.  Every wait polls the log and
fails at once, with the log's tail, if the process died.  A
:class:`MixNode` is a relay node of a test around its :class:`Daemon`
(its descriptor's hop, its metrics, packets sent to it over MMTP).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from twisted.internet import defer, protocol, task, threads

from mixminion.codec.build import build_forward_packet
from mixminion.codec.header import Hop
from mixminion.codec.packet import PAYLOAD_LEN
from mixminion.codec.routing import DROP_TYPE, HostInfo
from mixminion.directory.descriptor import parse_descriptor
from mixminion.mmtp.initiator import Destination, MMTPClient, MMTPError
from mixminion.procinfo import child_pids

from mixminion.testnet import free_ports, twistd

__all__ = ["BlackHole", "Daemon", "MixNode", "family_rss_mb", "forward_packets", "free_ports",
           "gauge", "metric", "node_config", "relay_and_next_hop", "rss_kb", "run_twistd",
           "send_until_acknowledged", "twistd"]


def node_config(base: str, port: int, nickname: str = "node", server: str = "",
                incoming: str = "", outgoing: str = "", extra: str = "",
                log_level: str = "INFO", relaying: bool = True) -> str:
    """A small working ``mixminiond.conf`` on loopback with fast (insecure)
    mixing; the strings are added to their sections as written."""
    return (f"[Server]\nBaseDir: {base}\nMode: relay\nNickname: {nickname}\n"
            f"Contact-Email: {nickname}@example.org\nMixAlgorithm: Timed\n"
            f"MixInterval: 1 second\nLogLevel: {log_level}\n{server}\n"
            f"[Incoming/MMTP]\nEnabled: yes\nIP: 127.0.0.1\nHostname: localhost\n"
            f"Port: {port}\n{incoming}\n"
            f"[Outgoing/MMTP]\nEnabled: {'yes' if relaying else 'no'}\n{outgoing}\n{extra}")


def gauge(port: int, name: str) -> float:
    """A node's ``mixminion_NAME`` gauge from its metrics port (0 if absent)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
        text = page.read().decode()
    found = re.search(rf"^mixminion_{re.escape(name)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def rss_kb(pid: int) -> int:
    """A process's resident memory (VmRSS), in KiB."""
    with open(f"/proc/{pid}/status") as f:
        found = re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.M)
    assert found is not None
    return int(found.group(1))


def family_rss_mb(pid: int) -> float:
    """VmRSS of a node and its children (the processing child), in MiB."""
    total = 0
    for p in [pid, *child_pids(pid)]:
        try:
            total += rss_kb(p)
        except (OSError, AssertionError):
            pass  # a child that just exited
    return total / 1024


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


def metric(port: int, event: str) -> int:
    """A node's ``mixminion_events_total{event=EVENT}`` from its metrics
    port (0 if not counted yet)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
        text = page.read().decode()
    found = re.search(rf'^mixminion_events_total{{event="{re.escape(event)}"}} (\d+)$', text, re.M)
    return int(found.group(1)) if found else 0


async def send_until_acknowledged(reactor: Any, client: MMTPClient, destination: Destination,
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


def run_twistd(args: Sequence[str], cwd: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``twistd -n ARGS`` to its end (for start-ups that must fail);
    stdout and stderr together in ``.stdout``."""
    return subprocess.run(twistd() + ["-n", "--pidfile=", *args], cwd=cwd, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)


@dataclass
class Daemon:
    """One ``twistd -n`` process: ``args`` follow twistd's own options
    (e.g. ``["mixminion", "-c", conf]``)."""

    directory: str
    args: Sequence[str]
    name: str = "node"
    process: Optional[subprocess.Popen] = field(default=None, repr=False)
    #: variables added to the test's environment (e.g. libfaketime's)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def log(self) -> str:
        return os.path.join(self.directory, f"{self.name}.log")

    @property
    def output(self) -> str:
        """stdout and stderr: what is said before logging starts."""
        return os.path.join(self.directory, f"{self.name}.out")

    def start(self) -> None:
        with open(self.output, "ab") as out:
            self.process = subprocess.Popen(
                twistd() + ["-n", "--pidfile=", f"--logfile={self.log}", *self.args],
                cwd=self.directory, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, **self.env} if self.env else None)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def text(self) -> str:
        """The log and the output so far."""
        parts = []
        for path in (self.output, self.log):
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    parts.append(f.read())
            except OSError:
                pass
        return "".join(parts)

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    async def wait_for(self, reactor: Any, what: str, check: Callable[[], bool],
                       timeout: float = 30.0, interval: float = 0.1) -> None:
        """Poll ``check``; raise AssertionError with the log's tail if the
        process dies or ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        while not check():
            if not self.alive():
                raise AssertionError(f"{self.name} exited ({self.process.returncode if self.process else '?'}) "
                                     f"while waiting for {what}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n{self.tail()}")
            await task.deferLater(reactor, interval, lambda: None)

    async def wait_for_line(self, reactor: Any, text: str, timeout: float = 30.0,
                            count: int = 1) -> None:
        """Until ``text`` appears ``count`` times in the log."""
        await self.wait_for(reactor, repr(text), lambda: self.text().count(text) >= count, timeout)

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    async def stop(self, reactor: Any, timeout: float = 30.0) -> int:
        """SIGTERM, then wait; returns the exit status (SIGKILL after
        ``timeout``, and then AssertionError)."""
        if self.process is None:
            return 0
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.process.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"{self.name} did not stop on SIGTERM:\n{self.tail()}")
            await task.deferLater(reactor, 0.1, lambda: None)
        return self.process.returncode

    def kill(self) -> None:
        """For cleanups: SIGKILL if still running."""
        if self.alive():
            assert self.process is not None
            self.process.kill()
            self.process.wait()


def _global_reactor() -> Any:
    """The global reactor, imported only when a node is used (importing
    this module installs none)."""
    from twisted.internet import reactor
    return reactor


class MixNode:
    """One ``twistd mixminion`` node of a test, in a folder of its own
    under ``test.dir``, with a metrics port; ``outgoing`` is added to its
    ``[Outgoing/MMTP]`` section."""

    def __init__(self, test: Any, name: str, outgoing: str = "") -> None:
        self.name = name
        self.dir = os.path.join(test.dir, name)
        os.makedirs(self.dir)
        self.base = os.path.join(self.dir, "base")
        self.port, self.metrics_port = free_ports(2)
        self.conf = os.path.join(self.dir, "node.conf")
        with open(self.conf, "w") as f:
            f.write(node_config(self.base, self.port, nickname=name,
                                server=f"MetricsPort: {self.metrics_port}", outgoing=outgoing))
        self.daemon = Daemon(self.dir, ["mixminion", "-c", self.conf], name=name)
        test.addCleanup(self.daemon.kill)

    async def start(self) -> None:
        self.daemon.start()
        await self.daemon.wait_for_line(_global_reactor(), f"Mix node {self.name} started",
                                        timeout=60)
        with open(os.path.join(self.base, "keys", "key_0001", "ServerDesc")) as f:
            desc = parse_descriptor(f.read(), time.time())
        self.identity = desc.identity_digest
        self.packet_key = desc.packet_key
        self.hop = Hop(desc.packet_key, HostInfo.parse(desc.routing_info))

    async def send(self, packets: list[bytes]) -> None:
        """Send ``packets`` to this node; all must be acknowledged."""
        client = MMTPClient(_global_reactor())
        try:
            destination = Destination("127.0.0.1", self.port, self.identity)
            results = await defer.DeferredList(
                [client.send_packet(destination, p) for p in packets], consumeErrors=True)
        finally:
            await client.close()
        failed = [value for ok, value in results if not ok]
        assert not failed, f"{len(failed)} packets refused: {failed[:1]}"

    def counted(self, event: str) -> int:
        return metric(self.metrics_port, event)

    def rss_mb(self) -> float:
        return family_rss_mb(self.daemon.pid)


def forward_packets(a: MixNode, g: MixNode, count: int) -> list[bytes]:
    """``count`` packets through ``a`` to ``g``, dropped there."""
    return [build_forward_packet(os.urandom(PAYLOAD_LEN), [a.hop], [g.hop], DROP_TYPE, b"",
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
    a = MixNode(test, "relay", outgoing=outgoing)
    await defer.gatherResults([defer.ensureDeferred(g.start()),
                               defer.ensureDeferred(a.start())])
    await a.send(await threads.deferToThread(forward_packets, a, g, 1))
    await g.daemon.wait_for(reactor, "the warm-up packet at G",
                            lambda: g.counted("ReceivedPacket") >= 1, timeout=60, interval=0.5)
    return hole, listening.getHost().port, a, g
