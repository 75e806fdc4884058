"""Real ``twistd`` processes for tests and benchmarks.

A :class:`Daemon` is one node (or authority) started the way an operator
starts it -- ``twistd -n mixminion -c FILE`` as a child process with its
own log file -- and watched from a test: wait for a log line, send a
signal, stop it and read its exit status.  Every wait polls the log and
fails at once, with the log's tail, if the process died.
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

from twisted.internet import protocol, task

from mixminion.procinfo import child_pids

from mixminion.testnet import free_ports, twistd

__all__ = ["BlackHole", "Daemon", "family_rss_mb", "free_ports", "gauge", "metric", "node_config",
           "rss_kb", "run_twistd", "twistd"]


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
