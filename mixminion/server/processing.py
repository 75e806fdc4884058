"""Processing: incoming queue → codec → mix pool, in a child process.

The codec's work per packet (one RSA decryption, LIONESS over the payload)
costs about as much CPU as everything else the node does for it, and in
one process it would share the GIL with MMTP: acknowledgements would wait
behind decryption.  So :class:`Processor` runs it in
:mod:`mixminion.server.processing_child`, started on first use (after
twistd's fork into a daemon) and restarted if it dies.  The child reads
the incoming store and commits to the main store; this side only tells it
the packet keys and when to drain, counts what it did, and lets the
reception side delete what it consumed (see
:mod:`mixminion.server.draining` for why that is crash-safe).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, Optional, Sequence

from twisted.internet import defer, protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from mixminion.events import Event
import mixminion
from mixminion.codec.rsa import PrivateKey
from mixminion.server.childmessages import (
    Batch,
    Drain,
    Failed,
    Idle,
    Keys,
    Message,
    Paused,
    Ready,
    decode,
    encode,
)
from mixminion.server.diskspace import DiskPause, Shortage, later_floor

#: longest line the child may send (a batch report is a few hundred bytes)
MAX_LINE = 1 << 20
#: how much the child lowers its CPU priority.  Decryption is throughput
#: work with a queue in front of it; MMTP acknowledgements and relaying
#: are latency work.  When both want the CPU, the node's process goes
#: first, and the incoming queue (bounded by MaxQueuedPackets, then
#: REJECTED) absorbs the difference.  benchmarks/node.py, one sender, 7
#: runs each: pipeline_ratio 0.55-0.61 (mean 0.59) at 5 against 0.51-0.55
#: at 0; at 10 the queue grew and results varied more (0.55-0.62).
CHILD_NICENESS = 5
#: failures in a row (the child dying, or reporting an error, with no batch
#: done in between) after which processing counts as not running: the node
#: then refuses packets rather than acknowledge what it cannot process
FAILURES_BEFORE_FAILING = 3
#: the longest wait between two restarts of a failing child; the wait
#: doubles from ``restart_delay`` so a child that cannot run (a damaged
#: store) is not restarted in a tight loop
MAX_RESTART_DELAY = 60.0
#: seconds between two looks at the disk while processing waits for space
DISK_RECHECK_INTERVAL = 2.0


class _ChildProtocol(protocol.ProcessProtocol):
    """Splits the child's stdout into JSON messages for the Processor."""

    def __init__(self, owner: "Processor") -> None:
        self.owner = owner
        self._buffer = b""

    def outReceived(self, data: bytes) -> None:  # noqa: N802
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        if len(self._buffer) > MAX_LINE:
            self.owner.log.error("Processing child sent an overlong line; restarting it")
            self._buffer = b""
            self.transport.signalProcess("KILL")
            return
        for line in lines:
            try:
                message = decode(line)
            except ValueError as exc:
                self.owner.log.error("Processing child sent a line we cannot read: {why}",
                                     why=str(exc))
                continue
            self.owner._message(message)

    def errReceived(self, data: bytes) -> None:  # noqa: N802
        for line in data.decode("utf-8", "replace").splitlines():
            if line.strip():
                self.owner.log.warn("Processing child: {line}", line=line)

    def processEnded(self, reason: Failure) -> None:  # noqa: N802
        self.owner._ended(self, reason)


class Processor:
    """Keeps the processing child fed; counts what it reports.

    ``on_consumed(through, count)`` is told after each committed batch that
    incoming packets up to id ``through`` (``count`` of them) are done.

    :attr:`failing` says why processing cannot run (None while it can):
    after :data:`FAILURES_BEFORE_FAILING` failures in a row, logged once at
    ERROR; the first batch or idle report clears it, logged at WARN.

    :attr:`disk` says whether processing waits for disk space: the child
    takes no batch while a disk of the store has less than half of
    :attr:`min_free_disk` free (see :mod:`mixminion.server.diskspace`);
    the packets wait in the incoming log, and a drain is asked for again
    every :data:`DISK_RECHECK_INTERVAL` seconds until it goes on.  Not a
    failure: the node keeps accepting packets while the incoming log's
    own disk has room (``MinFreeDisk`` there).
    """

    log = Logger()

    def __init__(self, incoming_path: str, store_path: str, reactor,
                 count: Callable[[str, int], None], *,
                 on_consumed: Optional[Callable[[int, int], None]] = None,
                 batch_size: int = 32, restart_delay: float = 1.0,
                 body_dir: Optional[str] = None) -> None:
        self.incoming_path = incoming_path
        self.store_path = store_path
        self.body_dir = body_dir
        self.lock_path = os.path.join(os.path.dirname(store_path), "processing.lock")
        self.reactor = reactor
        self.count = count
        self.on_consumed = on_consumed
        self.batch_size = batch_size
        self.restart_delay = restart_delay
        self._keys: list[PrivateKey] = []
        #: the last incoming id on stable storage (the child reads no further)
        self.committed_through = 0
        #: the last incoming id the child reported consumed
        self.consumed_through = 0
        self._child: Optional[_ChildProtocol] = None
        self._ready = False
        self._draining = False
        self._again = False
        self._stopping = False
        self._retry = None
        self._idle_waiters: list[defer.Deferred] = []
        self._stopped: Optional[defer.Deferred] = None
        #: children started so far (a restart after a crash adds one)
        self.starts = 0
        #: why processing cannot run, or None (see the class docstring)
        self.failing: Optional[str] = None
        self._failures = 0
        #: ``[Server] MinFreeDisk`` as the node has it now (bytes; 0: none)
        self.min_free_disk: Callable[[], int] = lambda: 0
        #: whether processing waits for disk space (see the class docstring)
        self.disk = DiskPause(self.log, "Processing",
                              "received packets wait in the incoming queue")

    # --- what the node calls ---------------------------------------------------

    def set_keys(self, keys: Sequence[PrivateKey]) -> None:
        """Use these packet keys (newest first) from now on."""
        self._keys = list(keys)
        if self._ready:
            self._send(Keys(tuple(key.der for key in self._keys)))
        self.kick()

    def stored(self, ids: Sequence[int]) -> None:
        """Incoming packets with these ids are committed: process them."""
        if ids:
            self.committed_through = max(self.committed_through, max(ids))
        self.kick()

    def kick(self, _ignored: object = None) -> None:
        """Process whatever is in the incoming queue, soon."""
        if self._stopping or not self._keys:
            return
        if self._child is None:
            self._start()
        elif not self._ready or self._draining or self._waiting_for_disk():
            self._again = True
        else:
            self._draining, self._again = True, False
            self._send_drain()

    def _waiting_for_disk(self) -> bool:
        """Paused for disk space with the next look already planned: new
        packets wait for it rather than ask the child each time."""
        return self.disk.paused and self._retry is not None and self._retry.active()

    def wait_idle(self) -> defer.Deferred:
        """Fires once the child has drained the queue and nothing is pending."""
        if self._child is None and not self._keys:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._idle_waiters.append(d)
        self.kick()
        return d

    def stop(self) -> defer.Deferred:
        """Close the child's stdin (it finishes its batch and exits)."""
        self._stopping = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        if self._child is None:
            return defer.succeed(None)
        self._stopped = defer.Deferred()
        self._child.transport.closeStdin()
        child = self._child
        kill = self.reactor.callLater(60, self._kill, child)
        self._stopped.addBoth(lambda r: (kill.cancel() if kill.active() else None, r)[1])
        return self._stopped

    # --- the child ---------------------------------------------------------------

    def _start(self) -> None:
        self.starts += 1
        child = _ChildProtocol(self)
        self._ready = self._draining = False
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(mixminion.__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (package_root, env.get("PYTHONPATH")) if p)
        argv = [sys.executable, "-m", "mixminion.server.processing_child",
                "--incoming", self.incoming_path, "--store", self.store_path,
                "--lock", self.lock_path, "--batch", str(self.batch_size),
                "--nice", str(CHILD_NICENESS)]
        if self.body_dir:
            argv += ["--bodies", self.body_dir]
        try:
            self.reactor.spawnProcess(child, sys.executable, argv, env=env,
                                      childFDs={0: "w", 1: "r", 2: "r"})
        except OSError as exc:  # e.g. out of file descriptors
            self.log.error("Cannot start the processing child ({why}); trying again",
                           why=str(exc))
            self._failed(f"cannot start the processing child: {exc}")
            return
        self._child = child

    def _send(self, message: Message) -> None:
        self._child.transport.write(encode(message))

    def _send_drain(self) -> None:
        # The child stamps what it queues on our clock, which counts elapsed
        # time (mixminion.server.clock): it adds the monotonic clock, which
        # the two processes share, to this offset.
        offset = self.reactor.seconds() - time.monotonic()
        self._send(Drain(self.committed_through, offset, later_floor(self.min_free_disk())))

    def _message(self, message: Message) -> None:
        if isinstance(message, Ready):
            self._ready = True
            self._send(Keys(tuple(key.der for key in self._keys)))
            self._again = False
            self._draining = True
            self._send_drain()
        elif isinstance(message, Batch):
            self._working()
            self.disk.update(None)
            for name, n in message.counts.items():
                self.count(name, n)
            rejected = sum(n for k, n in message.counts.items() if k.startswith(Event.REJECTED.of("")))
            if rejected:
                self.log.info("Processing rejected {n} packets", n=rejected)
            damaged = message.counts.get(Event.DROPPED_DAMAGED, 0)
            if damaged:
                self.log.warn("Dropped {n} unreadable records of the incoming log (torn by a "
                              "crash in a commit never acknowledged, or damaged on disk)",
                              n=damaged)
            # Ids are consecutive: counting from the last mark also covers
            # a batch whose report died with a killed child.
            through = message.through
            consumed = max(0, through - self.consumed_through)
            self.consumed_through = max(self.consumed_through, through)
            if self.on_consumed is not None:
                self.on_consumed(through, consumed)
        elif isinstance(message, Idle):
            self._working()
            self.disk.update(None)
            self._draining = False
            if self._again:
                self.kick()
            else:
                waiters, self._idle_waiters = self._idle_waiters, []
                for d in waiters:
                    d.callback(None)
        elif isinstance(message, Paused):
            self._draining = False
            self.disk.update(Shortage(message.path, message.free, message.floor))
            if self._retry is None or not self._retry.active():
                self._retry = self.reactor.callLater(DISK_RECHECK_INTERVAL, self.kick)
        elif isinstance(message, Failed):
            self._draining = False
            self.log.error("Packet processing failed; will retry: {why}", why=message.why)
            self._failed(f"processing failed: {message.why}")

    def _ended(self, child: _ChildProtocol, reason: Failure) -> None:
        if child is not self._child:
            return
        self._child = None
        self._ready = self._draining = False
        if self._stopping:
            stopped, self._stopped = self._stopped, None
            if stopped is not None:
                stopped.callback(None)
            return
        self.log.error("Processing child exited ({why}); restarting it",
                       why=reason.getErrorMessage())
        self._failed(f"the processing child exits at once ({reason.getErrorMessage()})")

    def _failed(self, why: str) -> None:
        """One more failure in a row: try again later, later each time;
        after a few, say that processing is not running."""
        self._failures += 1
        if self._failures >= FAILURES_BEFORE_FAILING and self.failing is None:
            self.failing = why
            self.count(Event.PROCESSING_FAILING, 1)
            self.log.error("Processing is not running ({why}; {n} failures in a row): the "
                           "node refuses packets until it recovers; check the queue folder "
                           "and the log above", why=why, n=self._failures)
        delay = min(MAX_RESTART_DELAY, self.restart_delay * 2 ** (self._failures - 1))
        self._retry = self.reactor.callLater(delay, self.kick)

    def _working(self) -> None:
        """The child did work: whatever failed before has passed."""
        self._failures = 0
        if self.failing is not None:
            self.failing = None
            self.log.warn("Processing runs again; the node accepts packets again")

    def _kill(self, child: _ChildProtocol) -> None:
        self.log.warn("Processing child did not stop in time; killing it")
        try:
            child.transport.signalProcess("KILL")
        except Exception:  # already gone
            pass

