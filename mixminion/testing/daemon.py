"""The core of the process harness: write a configuration, start ``twistd``
with it, wait for a log line or a port, show the logs when something goes
wrong, stop.

:mod:`mixminion.testnet` (the shipped ``mixminion-testnet`` command) runs
its network with it, as the tests and benchmarks run their nodes (through
:mod:`mixminion.testing.processes`, which adds what needs the codec and
MMTP).  So this module imports only the standard library and
``twisted.internet``: never trial, nor anything of a test.

A :class:`Daemon` is one process started the way an operator starts it --
``twistd -n --pidfile=FILE --logfile=FILE ARGS`` as a child in a session of
its own, stdout and stderr in a file beside its log -- or any other program
(``program``).  Every wait (:func:`wait_until`) polls, fails at once with
the logs' tails if a watched process died, and after its timeout.
"""

from __future__ import annotations

import errno
import inspect
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from twisted.internet import defer, task

from mixminion.procinfo import child_pids, pid_alive

__all__ = ["QUIET_LINES", "Daemon", "authority_config", "family_rss_mb", "free_ports", "gauge",
           "metric", "metrics_text", "node_config", "pid_alive", "port_free", "port_open",
           "read_text", "rss_kb", "run_twistd", "sleep", "twistd", "upload_report", "wait_until"]

#: log lines not worth showing in a tail (one a second per node)
QUIET_LINES = ("Mix: 0 of 0 items",)


# --- commands, ports, files --------------------------------------------------------------


def twistd() -> list[str]:
    """The twistd of this Python (a different one on $PATH may lack our plugins)."""
    beside = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.access(beside, os.X_OK):
        return [beside]
    # (``python -m twisted`` is ``twist``, which has no -n, --pidfile...)
    return [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; "
            "sys.argv[0] = 'twistd'; run()"]


def run_twistd(args: Sequence[str], cwd: str, timeout: float = 60,
               foreground: bool = True) -> subprocess.CompletedProcess:
    """Run ``twistd -n --pidfile= ARGS`` to its end (for start-ups that
    must fail); stdout and stderr together in ``.stdout``.  With
    ``foreground=False``, ``twistd ARGS``: it daemonizes, and ends when the
    daemon is detached (``ARGS`` then name its ``--pidfile``)."""
    options = ["-n", "--pidfile="] if foreground else []
    return subprocess.run(twistd() + options + list(args), cwd=cwd, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)


#: trial workers (``-jN``) given ports of their own
_PORT_SLICES = 8
#: where free_ports goes on from in this process (None: not started)
_port_cursor: Optional[int] = None


def _listening_ports() -> range:
    """Where :func:`free_ports` looks.

    Below the kernel's ephemeral range (the source ports of outgoing
    connections), so that no connection of another test takes a daemon's
    port between its stop and its restart (seen: "cannot listen on
    127.0.0.1:32937: Address already in use"); and a slice of that per
    trial worker (``trial -jN`` runs worker *i* in a folder named *i*), so
    that two workers never pick the same port in the moment between one's
    pick and its daemon's listen (seen with random picks)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    ports = range(max(1024, low - 12000), max(2048, low))
    worker = os.path.basename(os.getcwd())
    index = int(worker) % _PORT_SLICES if worker.isdigit() else 0
    size = len(ports) // _PORT_SLICES
    return ports[index * size:(index + 1) * size]


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (all bound at once, then released):
    the next ones of this process's slice (:func:`_listening_ports`), so a
    port comes back only after the whole slice."""
    global _port_cursor
    candidates = _listening_ports()
    if _port_cursor is None:
        _port_cursor = random.randrange(len(candidates))
    sockets: list[socket.socket] = []
    try:
        for _ in range(len(candidates)):
            if len(sockets) == count:
                break
            port = candidates[_port_cursor % len(candidates)]
            _port_cursor += 1
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
            except OSError as exc:
                s.close()
                if exc.errno != errno.EADDRINUSE:
                    raise
                continue
            sockets.append(s)
        if len(sockets) < count:
            raise OSError(f"no {count} free loopback ports in {candidates}")
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def port_free(port: int) -> bool:
    """Whether loopback ``port`` could be listened on now."""
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


async def port_open(reactor: Any, port: int, timeout: float = 2.0, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on ``host``:``port`` (loopback)."""
    from twisted.internet import error, protocol
    from twisted.internet.endpoints import TCP4ClientEndpoint

    endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    try:
        proto = await endpoint.connect(protocol.Factory.forProtocol(protocol.Protocol))
    except error.ConnectError:
        return False
    proto.transport.loseConnection()
    return True


def sleep(reactor: Any, seconds: float) -> defer.Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


def read_text(path: str) -> str:
    """A text file's contents, or "" if it does not exist (yet)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""




# --- configurations ------------------------------------------------------------------------


def node_config(base: str, port: int, nickname: str = "node", server: str = "",
                incoming: str = "", outgoing: str = "", extra: str = "",
                log_level: str = "INFO", relaying: bool = True, contact: str = "",
                mix_interval: str = "1 second", comment: str = "",
                address: str = "127.0.0.1", hostname: str = "localhost") -> str:
    """A small working ``mixminiond.conf`` on loopback with fast (insecure)
    Timed mixing; the strings are added to their sections as written
    (``comment``, lines without their ``#``, above it all).  ``address``
    (listened on and published) and ``hostname`` (published): nodes that
    must count as different networks (doc/reliability.md §3) each take
    their own 127.N.0.1."""
    heading = "".join(f"# {line}\n" for line in comment.splitlines())
    return (f"{heading}[Server]\nBaseDir: {base}\nMode: relay\nNickname: {nickname}\n"
            f"Contact-Email: {contact or nickname + '@example.org'}\nMixAlgorithm: Timed\n"
            f"MixInterval: {mix_interval}\nLogLevel: {log_level}\n{server}\n"
            f"[Incoming/MMTP]\nEnabled: yes\nIP: {address}\nHostname: {hostname}\n"
            f"Port: {port}\n{incoming}\n"
            f"[Outgoing/MMTP]\nEnabled: {'yes' if relaying else 'no'}\n{outgoing}\n{extra}")


def authority_config(base: str, nickname: str, port: int, peers: Sequence[tuple[str, str]],
                     threshold: int, vote_interval: int, comment: str = "",
                     reliability: str = "") -> str:
    """A directory authority's configuration on loopback; ``peers`` are
    every authority's (URL, fingerprint), its own included; ``reliability``,
    if given, is the body of its ``[Reliability]`` section (e.g.
    ``"MinPingers: 2\nReportInterval: 30 seconds\n"``)."""
    heading = "".join(f"# {line}\n" for line in comment.splitlines())
    lines = "".join(f"Peer: {url} {fingerprint}\n" for url, fingerprint in peers)
    section = f"[Reliability]\n{reliability}" if reliability else ""
    return (f"{heading}[Authority]\nBaseDir: {base}\nNickname: {nickname}\nListenIP: 127.0.0.1\n"
            f"Port: {port}\n{lines}Threshold: {threshold}\n"
            f"VoteInterval: {vote_interval} seconds\n{section}")


def upload_report(url: str, text: str, timeout: float = 5) -> tuple[int, str]:
    """POST a signed ping report to the authority at ``url`` (its ``/report``,
    the report as the whole body); ``(HTTP status, answer text)``.  Blocking:
    call it from a thread where that matters."""
    request = urllib.request.Request(url.rstrip("/") + "/report", data=text.encode("ascii"),
                                     headers={"Content-Type": "text/plain"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, answer.read().decode("ascii", "replace")
    except urllib.error.HTTPError as refused:  # 413: the answer is in the body too
        with refused:
            return refused.code, refused.read().decode("ascii", "replace")


# --- what a running node shows -------------------------------------------------------------


def metrics_text(port: int, timeout: float = 5) -> str:
    """A node's metrics page (blocking: call it from a thread where that matters)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as page:
        return page.read().decode()


def gauge(port: int, name: str) -> float:
    """A node's ``mixminion_NAME`` gauge from its metrics port (0 if absent)."""
    found = re.search(rf"^mixminion_{re.escape(name)} (\S+)$", metrics_text(port), re.M)
    return float(found.group(1)) if found else 0.0


def metric(port: int, event: str) -> int:
    """A node's ``mixminion_events_total{event=EVENT}`` from its metrics
    port (0 if not counted yet; prometheus_client writes a count as a
    float: ``5.0``, ``1.5e+06``)."""
    found = re.search(rf'^mixminion_events_total{{event="{re.escape(event)}"}} (\S+)$',
                      metrics_text(port), re.M)
    return int(float(found.group(1))) if found else 0


def rss_kb(pid: int, field_name: str = "VmRSS") -> int:
    """A process's resident memory (``VmRSS``, or another ``/proc/PID/status``
    field such as its peak ``VmHWM``), in KiB."""
    with open(f"/proc/{pid}/status") as f:
        found = re.search(rf"^{field_name}:\s+(\d+) kB", f.read(), re.M)
    assert found is not None
    return int(found.group(1))


def pss_kb(pid: int) -> int:
    """A process's proportional set size (``/proc/PID/smaps_rollup``): its
    resident pages, those it shares counted as its share, in KiB."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        found = re.search(r"^Pss:\s+(\d+) kB", f.read(), re.M)
    assert found is not None
    return int(found.group(1))


def family_rss_mb(pid: int, field_name: str = "VmRSS") -> float:
    """:func:`rss_kb` of a node and its children (the processing child), in
    MiB; ``field_name`` ``"Pss"``: :func:`pss_kb` (pages the node and its
    child share, such as the interpreter's, counted once)."""
    total = 0
    for p in [pid, *child_pids(pid)]:
        try:
            total += pss_kb(p) if field_name == "Pss" else rss_kb(p, field_name)
        except (OSError, AssertionError):
            pass  # a child that just exited
    return total / 1024


# --- processes -------------------------------------------------------------------------------


async def wait_until(reactor: Any, what: str, check: Callable[[], Any], timeout: float,
                     interval: float = 0.1, watch: Sequence[Any] = (),
                     report: Optional[Callable[[Sequence[Any]], str]] = None,
                     explain: Optional[Callable[[], str]] = None,
                     error: Callable[[str], BaseException] = AssertionError) -> Any:
    """Poll ``check`` (its result may be awaitable) until it gives something
    true, and return that.  Raise ``error`` at once if one of ``watch``
    (objects with ``name`` and ``alive()``: daemons) has died, or after
    ``timeout`` seconds; its message ends with ``report(those)`` -- the dead
    ones, or all of ``watch`` after the timeout (default: each one's
    :meth:`Daemon.report`) -- and a timeout's with ``explain()`` too."""
    if report is None:
        def report(procs: Sequence[Any]) -> str:
            return "\n".join(p.report() for p in procs)
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        dead = [p for p in watch if not p.alive()]
        if dead:
            names = ", ".join(getattr(p, "ended", p.name) for p in dead)
            raise error(f"{names} died while waiting for {what}\n{report(dead)}")
        if time.monotonic() > deadline:
            why = f" {explain()}" if explain is not None else ""
            raise error(f"timed out after {timeout:.0f} s waiting for {what}{why}\n{report(watch)}")
        await sleep(reactor, interval)


@dataclass
class Daemon:
    """One ``twistd -n`` process: ``args`` follow twistd's own options (e.g.
    ``["mixminion", "-c", conf]``); its log is ``DIRECTORY/NAME.log`` and its
    stdout and stderr go to ``DIRECTORY/NAME.out`` unless ``logfile`` and
    ``outfile`` say otherwise.  With ``program``, the process is
    ``PROGRAM ARGS`` instead (no log file of its own)."""

    directory: str
    args: Sequence[str]
    name: str = "node"
    process: Optional[subprocess.Popen] = field(default=None, repr=False)
    #: variables added to the environment (e.g. libfaketime's)
    env: dict[str, str] = field(default_factory=dict)
    logfile: str = ""
    outfile: str = ""
    #: twistd's --pidfile ("": none)
    pidfile: str = ""
    program: Sequence[str] = ()

    @property
    def log(self) -> str:
        return self.logfile or os.path.join(self.directory, f"{self.name}.log")

    @property
    def output(self) -> str:
        """stdout and stderr: what is said before logging starts."""
        return self.outfile or os.path.join(self.directory, f"{self.name}.out")

    def argv(self) -> list[str]:
        if self.program:
            return [*self.program, *self.args]
        return twistd() + ["-n", f"--pidfile={self.pidfile}", f"--logfile={self.log}", *self.args]

    def start(self) -> None:
        """Start it (again, after it ended: the log and output go on)."""
        with open(self.output, "ab") as out:
            self.process = subprocess.Popen(
                self.argv(), cwd=self.directory, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, **self.env} if self.env else None)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def returncode(self) -> Optional[int]:
        """The exit status once it ended (a signal's as minus its number)."""
        return self.process.poll() if self.process is not None else None

    @property
    def ended(self) -> str:
        """Its name, and how it ended."""
        return f"{self.name} (exit status {self.returncode})"

    def _files(self) -> list[str]:
        return [self.output] if self.program else [self.output, self.log]

    def text(self) -> str:
        """The output and the log so far."""
        return "".join(read_text(path) for path in self._files())

    def lines(self, containing: str) -> list[str]:
        """The lines of :meth:`text` holding ``containing``."""
        return [line for line in self.text().splitlines() if containing in line]

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def report(self, lines: int = 25, quiet: Sequence[str] = QUIET_LINES) -> str:
        """The last ``lines`` of the output (if any) and of the log, without
        the ``quiet`` ones, under their paths: what a failure shows."""
        out = f"--- {self.name}:\n"
        for path in self._files():
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    kept = [ln for ln in f if not any(q in ln for q in quiet)]
            except OSError as exc:
                out += f"  ({path}: {exc.strerror})\n"
                continue
            if kept or path == self.log:
                out += f"  {path}:\n" + "".join("    " + ln for ln in kept[-lines:])
        return out

    async def wait_for(self, reactor: Any, what: str, check: Callable[[], Any],
                       timeout: float = 30.0, interval: float = 0.1) -> Any:
        """:func:`wait_until` watching this process; AssertionError with its
        log's tail if it dies or ``timeout`` passes first."""
        return await wait_until(reactor, what, check, timeout, interval, watch=[self],
                                report=lambda _: self.report(40))

    async def wait_for_line(self, reactor: Any, text: str, timeout: float = 30.0,
                            count: int = 1) -> None:
        """Until ``text`` appears ``count`` times in the log."""
        await self.wait_for(reactor, repr(text), lambda: self.text().count(text) >= count, timeout)

    async def wait_for_port(self, reactor: Any, port: int, timeout: float = 30.0,
                            interval: float = 0.1) -> None:
        """Until it accepts connections on loopback ``port``."""
        await self.wait_for(reactor, f"a listener on port {port}",
                            lambda: port_open(reactor, port, timeout=1), timeout, interval)

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    async def stop(self, reactor: Any, timeout: float = 30.0, strict: bool = True) -> int:
        """SIGTERM, then wait; returns the exit status.  After ``timeout``:
        SIGKILL, and AssertionError if ``strict``."""
        if self.process is None:
            return 0
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.process.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
                if strict:
                    raise AssertionError(f"{self.name} did not stop on SIGTERM:\n{self.tail()}")
                break
            await sleep(reactor, 0.1)
        return self.process.returncode

    def stopper(self, reactor: Any, timeout: float = 5.0) -> Callable[[], defer.Deferred]:
        """For a cleanup that lets the process end cleanly: SIGTERM, SIGKILL
        after ``timeout``, never an error."""
        return lambda: defer.ensureDeferred(self.stop(reactor, timeout, strict=False))

    def kill(self) -> None:
        """For cleanups: SIGKILL if still running."""
        if self.alive():
            assert self.process is not None
            self.process.kill()
            self.process.wait()
