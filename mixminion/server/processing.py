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

import functools
import glob
import os
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Optional, Protocol, Sequence

from automat import NoTransition, TypeMachine, TypeMachineBuilder
from twisted.internet import defer, protocol
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from mixminion.events import Event
import mixminion
from mixminion.codec.rsa import PrivateKey
from mixminion.server import childmessages as msg
from mixminion.server.diskspace import DiskPause, Shortage, later_floor
from mixminion.server.draining import Share, everything_through, worker_mark
from mixminion.server.packetstore import PacketStore
from mixminion.server.processing_child import BATCH_SIZE, processing_lock

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
#: how long a stopping child may take to finish its batch before it is killed
STOP_TIMEOUT = 60.0


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
                message = msg.decode(line)
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


@dataclass(frozen=True)
class _Failure:
    """One failure: its log line (``log_format`` with ``why``) and what
    :attr:`Processor.failing` says if it is one too many."""

    log_format: str
    why: str
    reason: str


class _Lifecycle(Protocol):
    """The inputs of the processing child's lifecycle (see :func:`_lifecycle`)."""

    def kick(self) -> None:
        "There may be packets to process (only sent while there are keys)."

    def new_keys(self) -> None:
        "The packet keys changed."

    def ready(self) -> None:
        "The child said Ready."

    def idle(self) -> None:
        "The child said Idle: it processed all it was asked to."

    def paused(self) -> None:
        "The child said Paused: a disk is short of space."

    def failed(self, failure: _Failure) -> None:
        "The child said Failed."

    def ended(self, failure: _Failure) -> None:
        "The child exited, or could not be started."

    def waited(self) -> None:
        "A wait (for disk space, or before trying again) is over."

    def stop(self) -> None:
        "Stop for good."


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

    The child's lifecycle is a state machine (:func:`_lifecycle`); this
    class keeps the books: keys, counts, failures, and who waits.
    """

    log = Logger()

    def __init__(self, incoming_path: str, store_path: str, reactor,
                 count: Callable[[str, int], None], *,
                 on_consumed: Optional[Callable[[int, int], None]] = None,
                 batch_size: int = BATCH_SIZE, restart_delay: float = 1.0,
                 body_dir: Optional[str] = None, pings: bool = False,
                 share: Share = Share()) -> None:
        self.incoming_path = incoming_path
        #: the incoming ids this worker's child takes
        self.share = share
        if share.of > 1:
            # With several workers, the log says which one each line is about.
            self.log = Logger(namespace=f"{__name__}.worker{share.index}", source=self)
        #: the node pings: the child queues returned pings for the pinger
        #: (a command-line flag: ``[Pinging] Enabled`` changes at a restart)
        self.pings = pings
        #: told the counts of each committed batch (the pinger collects
        #: returned pings when there are some)
        self.batch_listeners: list[Callable[[Mapping[str, int]], None]] = []
        self.store_path = store_path
        self.body_dir = body_dir
        self.lock_path = lock_path(store_path, share.index)
        self.reactor = reactor
        self.count = count
        self.on_consumed = on_consumed
        self.batch_size = batch_size
        self.restart_delay = restart_delay
        self._keys: list[PrivateKey] = []
        #: set_keys calls so far, and the count when the drain under way
        #: (if any: ``_drain_open``) was asked for: the child decrypts that
        #: drain with the keys it had then, whatever came since
        self._keys_serial = 0
        self._drain_serial = 0
        self._drain_open = False
        #: (keys serial, Deferred) for :meth:`keys_in_use`
        self._keys_waiters: list[tuple[int, defer.Deferred[None]]] = []
        #: the last incoming id on stable storage (the child reads no further)
        self.committed_through = 0
        #: the last incoming id the child was told is committed
        self._told_through = 0
        #: the last incoming id the child reported consumed
        self.consumed_through = 0
        self._child: Optional[_ChildProtocol] = None
        self._idle_waiters: list[defer.Deferred[None]] = []
        self._stop_waiters: list[defer.Deferred[None]] = []
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
        self._machine: _Lifecycle = _LIFECYCLE(self)

    # --- what the node calls ---------------------------------------------------

    def set_keys(self, keys: Sequence[PrivateKey]) -> None:
        """Use these packet keys (newest first) from now on."""
        self._keys = list(keys)
        self._keys_serial += 1
        self._machine.new_keys()
        self.kick()

    def keys_in_use(self) -> defer.Deferred[None]:
        """Fires once the child decrypts with the keys of the last
        :meth:`set_keys` only: no drain asked for before them runs any
        more.  A drain under way when keys change ends with the keys it
        began with (the child takes new keys between drains), so the
        replay entries of a retired key must stay until then, or a replay
        of a packet for it would pass as new."""
        d: defer.Deferred[None] = defer.Deferred()
        self._keys_waiters.append((self._keys_serial, d))
        self._keys_settled()
        return d

    def _keys_settled(self) -> None:
        """Fire the :meth:`keys_in_use` waiters whose keys are in use."""
        in_use = self._drain_serial if self._drain_open else self._keys_serial
        ready = [d for serial, d in self._keys_waiters if serial <= in_use]
        self._keys_waiters = [(s, d) for s, d in self._keys_waiters if s > in_use]
        for d in ready:
            d.callback(None)

    def stored(self, ids: Sequence[int]) -> None:
        """Incoming packets with these ids are committed: process them (a
        commit that only removed consumed records asks for nothing)."""
        if ids:
            self.committed_through = max(self.committed_through, max(ids))
            self.kick()

    def kick(self, _ignored: object = None) -> None:
        """Process whatever is in the incoming queue, soon.  Without keys
        nothing is processed: the packets wait for keys."""
        if self._keys:
            self._machine.kick()

    def wait_idle(self) -> defer.Deferred[None]:
        """Fires once the child has drained the queue and nothing is pending."""
        if self._child is None and not self._keys:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._idle_waiters.append(d)
        self.kick()
        return d

    def stop(self) -> defer.Deferred[None]:
        """Close the child's stdin (it finishes its batch and exits)."""
        d: defer.Deferred[None] = defer.Deferred()
        self._stop_waiters.append(d)
        self._machine.stop()
        return d

    # --- what the child says -----------------------------------------------------

    def _message(self, message: msg.Message) -> None:
        """Keeps the books on what the child says; the lifecycle decides
        what to do next."""
        if isinstance(message, msg.Batch):
            self._batch(message)
            return
        if isinstance(message, (msg.Idle, msg.Paused, msg.Failed)):
            self._drain_open = False  # the drain is over (another may begin below)
        try:
            if isinstance(message, msg.Ready):
                self._machine.ready()
            elif isinstance(message, msg.Idle):
                self._working()
                self.disk.update(None)
                self._machine.idle()
            elif isinstance(message, msg.Paused):
                self.disk.update(Shortage(message.path, message.free, message.floor))
                self._machine.paused()
            elif isinstance(message, msg.Failed):
                self._machine.failed(_Failure("Packet processing failed; will retry: {why}",
                                              message.why, f"processing failed: {message.why}"))
            else:  # Keys or Drain: what the node says, not the child
                self._out_of_turn(message)
        except NoTransition:
            self._out_of_turn(message)
        self._keys_settled()

    def _out_of_turn(self, message: msg.Message) -> None:
        self.log.error("Processing child sent {kind} out of turn; ignored",
                       kind=type(message).__name__)

    def _batch(self, message: msg.Batch) -> None:
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
        consumed = self.share.count_between(self.consumed_through, through)
        self.consumed_through = max(self.consumed_through, through)
        if self.on_consumed is not None:
            self.on_consumed(through, consumed)
        for listener in self.batch_listeners:
            listener(message.counts)

    def _ended(self, child: _ChildProtocol, reason: Failure) -> None:
        if child is not self._child:
            return
        self._child = None
        self._drain_open = False  # a new child gets the keys before any drain
        self._keys_settled()
        why = reason.getErrorMessage()
        self._machine.ended(_Failure("Processing child exited ({why}); restarting it", why,
                                     f"the processing child exits at once ({why})"))

    def _working(self) -> None:
        """The child did work: whatever failed before has passed."""
        self._failures = 0
        if self.failing is not None:
            self.failing = None
            self.log.warn("Processing runs again; the node accepts packets again")

    # --- what the lifecycle does -----------------------------------------------------

    def _spawn(self) -> None:
        """Start a child (OSError if the system cannot)."""
        self.starts += 1
        child = _ChildProtocol(self)
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(mixminion.__file__)))
        env = dict(os.environ)
        # Its two threads (the opener decrypts batch k+1 while the main one
        # commits batch k) each took a glibc arena, and each kept the high
        # water mark of its 32 KiB buffers: one arena is 1.2 MB less with a
        # 50,000-packet pool (benchmarks/node.py rss_mb_50k 99.3-99.4
        # against 100.1-100.7).  An operator's own setting stands.
        env.setdefault("MALLOC_ARENA_MAX", "1")
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (package_root, env.get("PYTHONPATH")) if p)
        argv = [sys.executable, "-m", "mixminion.server.processing_child",
                "--incoming", self.incoming_path, "--store", self.store_path,
                "--lock", self.lock_path, "--batch", str(self.batch_size),
                "--nice", str(CHILD_NICENESS)]
        if self.body_dir:
            argv += ["--bodies", self.body_dir]
        if self.pings:
            argv.append("--pings")
        if self.share.of > 1:
            argv += ["--share", str(self.share)]
        self.reactor.spawnProcess(child, sys.executable, argv, env=env,
                                  childFDs={0: "w", 1: "r", 2: "r"})
        self._child = child

    def _send(self, message: msg.Message) -> None:
        self._child.transport.write(msg.encode(message))

    def _send_keys(self) -> None:
        self._send(msg.Keys(tuple(key.der for key in self._keys)))

    def _send_drain(self) -> None:
        # The child stamps what it queues on our clock, which counts elapsed
        # time (mixminion.server.clock): it adds the monotonic clock, which
        # the two processes share, to this offset.
        offset = self.reactor.seconds() - time.monotonic()
        self._send(msg.Drain(self.committed_through, offset,
                             later_floor(self.min_free_disk())))
        self._told_through = self.committed_through
        self._drain_open, self._drain_serial = True, self._keys_serial

    def _send_more(self) -> None:
        """Tell the draining child what was committed since (it goes on
        to it), unless it knows already."""
        if self.committed_through > self._told_through:
            self._send(msg.More(self.committed_through))
            self._told_through = self.committed_through

    def _failed(self, failure: _Failure) -> float:
        """One more failure in a row: log it; after a few, say that
        processing is not running.  Returns how long to wait before trying
        again: longer each time, so a child that cannot run is not
        restarted in a tight loop."""
        self.log.error(failure.log_format, why=failure.why)
        self._failures += 1
        if self._failures >= FAILURES_BEFORE_FAILING and self.failing is None:
            self.failing = failure.reason
            self.count(Event.PROCESSING_FAILING, 1)
            self.log.error("Processing is not running ({why}; {n} failures in a row): the "
                           "node refuses packets until it recovers; check the queue folder "
                           "and the log above", why=failure.reason, n=self._failures)
        return min(MAX_RESTART_DELAY, self.restart_delay * 2 ** (self._failures - 1))

    def _drained(self) -> None:
        waiters, self._idle_waiters = self._idle_waiters, []
        for d in waiters:
            d.callback(None)

    def _stopped(self) -> None:
        waiters, self._stop_waiters = self._stop_waiters, []
        for d in waiters:
            d.callback(None)

    def _kill(self, child: _ChildProtocol) -> None:
        self.log.warn("Processing child did not stop in time; killing it")
        try:
            child.transport.signalProcess("KILL")
        except Exception:  # already gone
            pass


def lock_path(store_path: str, index: int) -> str:
    """The lock file worker ``index``'s child holds while it runs."""
    name = "processing.lock" if index == 0 else f"processing-{index}.lock"
    return os.path.join(os.path.dirname(store_path), name)


class ProcessingWorkers:
    """``[Server] ProcessingWorkers`` children, each a :class:`Processor`
    that takes its :class:`~mixminion.server.draining.Share` of the
    incoming ids, seen by the node as one: the incoming log gives up a
    packet once every id up to it is processed, whichever worker had it.

    Processing counts as failing while any worker fails (its share of the
    packets would wait), and as paused for disk space while any is.
    """

    def __init__(self, incoming_path: str, store_path: str, reactor,
                 count: Callable[[str, int], None], *, workers: int = 1,
                 body_dir: Optional[str] = None, pings: bool = False) -> None:
        self.incoming_path = incoming_path
        self.store_path = store_path
        #: told ``(through, count)`` as the common mark advances
        self.on_consumed: Optional[Callable[[int, int], None]] = None
        #: told the counts of each worker's committed batches
        self.batch_listeners: list[Callable[[Mapping[str, int]], None]] = []
        self.workers = [Processor(incoming_path, store_path, reactor, count, body_dir=body_dir,
                                  pings=pings, share=Share(i, workers))
                        for i in range(workers)]
        for worker in self.workers:
            worker.batch_listeners = self.batch_listeners
            worker.on_consumed = functools.partial(self._consumed, worker.share.index)
        #: how far each worker processed its share
        self._marks = [0] * workers
        self.consumed_through = 0

    @contextmanager
    def locked(self) -> Iterator[bool]:
        """Hold every worker's lock, and those of a previous run's extra
        workers (their children may be finishing a batch); yields whether
        one had to be waited for."""
        paths = {worker.lock_path for worker in self.workers}
        paths.update(glob.glob(os.path.join(os.path.dirname(self.store_path),
                                            "processing*.lock")))
        with ExitStack() as stack:
            waited = [stack.enter_context(processing_lock(path)) for path in sorted(paths)]
            yield any(waited)

    def start_from(self, store: PacketStore, committed_through: int, removed_through: int) -> int:
        """Where the workers begin: what the log holds, and each worker's
        mark (after :func:`~mixminion.server.draining.settle_marks`).
        Returns how many records of the log some worker had processed
        already: the queue's length does not count them."""
        self._marks = [max(removed_through, min(committed_through, worker_mark(store, w.share)))
                       for w in self.workers]
        self.consumed_through = removed_through
        done = 0
        for worker, mark in zip(self.workers, self._marks):
            worker.committed_through = committed_through
            worker.consumed_through = mark
            done += worker.share.count_between(removed_through, mark)
        return done

    def waiting(self, committed_through: int) -> int:
        """Packets committed up to ``committed_through`` that no worker
        has processed yet: the incoming queue's length.  The log itself
        keeps a record until every id below it is processed, whichever
        worker had it, so its own count also holds what a worker ahead
        of the others has done."""
        return sum(worker.share.count_between(mark, committed_through)
                   for worker, mark in zip(self.workers, self._marks))

    def _consumed(self, index: int, through: int, count: int) -> None:
        self._marks[index] = max(self._marks[index], through)
        self.consumed_through = max(self.consumed_through, everything_through(self._marks))
        if self.on_consumed is not None:
            self.on_consumed(self.consumed_through, count)

    @property
    def failing(self) -> Optional[str]:
        return next((w.failing for w in self.workers if w.failing is not None), None)

    @property
    def disk(self) -> DiskPause:
        return next((w.disk for w in self.workers if w.disk.paused), self.workers[0].disk)

    @property
    def starts(self) -> int:
        return sum(w.starts for w in self.workers)

    @property
    def min_free_disk(self) -> Callable[[], int]:
        return self.workers[0].min_free_disk

    @min_free_disk.setter
    def min_free_disk(self, value: Callable[[], int]) -> None:
        for worker in self.workers:
            worker.min_free_disk = value

    def set_keys(self, keys: Sequence[PrivateKey]) -> None:
        for worker in self.workers:
            worker.set_keys(keys)

    def keys_in_use(self) -> defer.Deferred:
        """Fires once every worker decrypts with the last keys only."""
        return defer.gatherResults([w.keys_in_use() for w in self.workers]).addCallback(
            lambda _: None)

    def stored(self, ids: Sequence[int]) -> None:
        """Each worker hears of the ids of its share only: a commit with
        none of them does not wake its child."""
        if len(self.workers) == 1:
            self.workers[0].stored(ids)
            return
        for worker in self.workers:
            mine = [i for i in ids if worker.share.takes(i)]
            if mine:
                worker.stored(mine)

    def kick(self, _ignored: object = None) -> None:
        for worker in self.workers:
            worker.kick()

    def wait_idle(self) -> defer.Deferred:
        return defer.gatherResults([w.wait_idle() for w in self.workers]).addCallback(
            lambda _: None)

    def stop(self) -> defer.Deferred:
        return defer.gatherResults([w.stop() for w in self.workers]).addCallback(lambda _: None)


def _lifecycle() -> TypeMachine[_Lifecycle, Processor]:
    """The processing child's lifecycle.

    States: no child; starting (until it says Ready); idle; draining (a
    Drain sent, its Idle, Paused or Failed awaited); draining again (and
    another drain wanted when this one ends; meanwhile each kick tells the
    child with More how far the queue is committed, so the drain under
    way goes on to it); waiting for disk space;
    waiting to retry after a failed drain (the child alive) or to restart
    after the child died; stopping; stopped.  The three waits hold their
    timer, and stopping the call that kills a child too slow to exit.

    A wait ends by going back to idle (or no child) and kicking, so a
    drain or a start only ever follows a kick: :meth:`Processor.kick`
    sends none without keys.  Kicks while starting or waiting are
    dropped: Ready, or the end of the wait, kicks anyway.
    """
    b = TypeMachineBuilder(_Lifecycle, Processor)
    no_child = b.state("NoChild")
    starting = b.state("Starting")
    idle = b.state("Idle")
    draining = b.state("Draining")
    draining_again = b.state("DrainingAgain")

    def recheck_later(c: _Lifecycle, p: Processor) -> IDelayedCall:
        return p.reactor.callLater(DISK_RECHECK_INTERVAL, c.waited)

    def retry_later(c: _Lifecycle, p: Processor, failure: _Failure) -> IDelayedCall:
        return p.reactor.callLater(p._failed(failure), c.waited)

    def close_stdin(c: _Lifecycle, p: Processor) -> IDelayedCall:
        child = p._child
        child.transport.closeStdin()
        return p.reactor.callLater(STOP_TIMEOUT, p._kill, child)

    disk_wait = b.state("DiskWait", recheck_later)
    retry_wait = b.state("RetryWait", retry_later)
    restart_wait = b.state("RestartWait", retry_later)
    stopping = b.state("Stopping", close_stdin)
    stopped = b.state("Stopped")
    alive = (starting, idle, draining, draining_again)  # a child, and no timer
    asked = (draining, draining_again)  # a drain sent, its answer awaited

    # kick
    @no_child.upon(_Lifecycle.kick).to(starting)
    def start(c: _Lifecycle, p: Processor) -> None:
        try:
            p._spawn()
        except OSError as exc:  # e.g. out of file descriptors
            c.ended(_Failure("Cannot start the processing child ({why}); trying again",
                             str(exc), f"cannot start the processing child: {exc}"))

    @idle.upon(_Lifecycle.kick).to(draining)
    def drain(c: _Lifecycle, p: Processor) -> None:
        p._send_drain()

    @draining.upon(_Lifecycle.kick).to(draining_again)
    @draining_again.upon(_Lifecycle.kick).loop()
    def tell_more(c: _Lifecycle, p: Processor) -> None:
        p._send_more()

    for state in (starting, disk_wait, retry_wait, restart_wait, stopping, stopped):
        state.upon(_Lifecycle.kick).loop().returns(None)

    # new_keys: a child not ready yet gets them when it is
    @idle.upon(_Lifecycle.new_keys).loop()
    @draining.upon(_Lifecycle.new_keys).loop()
    @draining_again.upon(_Lifecycle.new_keys).loop()
    @disk_wait.upon(_Lifecycle.new_keys, nodata=True).loop()
    @retry_wait.upon(_Lifecycle.new_keys, nodata=True).loop()
    def send_keys(c: _Lifecycle, p: Processor) -> None:
        p._send_keys()

    for state in (no_child, starting, restart_wait, stopping, stopped):
        state.upon(_Lifecycle.new_keys).loop().returns(None)

    # what the child says (a child that is stopping may still answer)
    @starting.upon(_Lifecycle.ready).to(idle)
    def ready(c: _Lifecycle, p: Processor) -> None:
        p._send_keys()
        p.kick()

    @draining.upon(_Lifecycle.idle).to(idle)
    @stopping.upon(_Lifecycle.idle, nodata=True).loop()
    def drained(c: _Lifecycle, p: Processor) -> None:
        p._drained()

    @draining_again.upon(_Lifecycle.idle).to(idle)
    def drain_again(c: _Lifecycle, p: Processor) -> None:
        p.kick()

    @stopping.upon(_Lifecycle.failed, nodata=True).loop()
    def failed_while_stopping(c: _Lifecycle, p: Processor, failure: _Failure) -> None:
        p.log.error(failure.log_format, why=failure.why)

    for state in asked:
        state.upon(_Lifecycle.paused).to(disk_wait).returns(None)
        state.upon(_Lifecycle.failed).to(retry_wait).returns(None)
    stopping.upon(_Lifecycle.ready).loop().returns(None)
    stopping.upon(_Lifecycle.paused).loop().returns(None)

    # ended
    for state in alive:
        state.upon(_Lifecycle.ended).to(restart_wait).returns(None)

    @disk_wait.upon(_Lifecycle.ended).to(restart_wait)
    @retry_wait.upon(_Lifecycle.ended).to(restart_wait)
    def died_waiting(c: _Lifecycle, p: Processor, wait: IDelayedCall, failure: _Failure) -> None:
        wait.cancel()

    @stopping.upon(_Lifecycle.ended).to(stopped)
    def exited(c: _Lifecycle, p: Processor, kill: IDelayedCall, failure: _Failure) -> None:
        if kill.active():
            kill.cancel()
        p._stopped()

    # waited
    @disk_wait.upon(_Lifecycle.waited).to(idle)
    @retry_wait.upon(_Lifecycle.waited).to(idle)
    @restart_wait.upon(_Lifecycle.waited).to(no_child)
    def try_again(c: _Lifecycle, p: Processor, done: IDelayedCall) -> None:
        p.kick()

    # stop
    for state in alive:
        state.upon(_Lifecycle.stop).to(stopping).returns(None)
    stopping.upon(_Lifecycle.stop).loop().returns(None)

    @disk_wait.upon(_Lifecycle.stop).to(stopping)
    @retry_wait.upon(_Lifecycle.stop).to(stopping)
    def stop_waiting(c: _Lifecycle, p: Processor, wait: IDelayedCall) -> None:
        wait.cancel()

    @restart_wait.upon(_Lifecycle.stop).to(stopped)
    def stop_restarting(c: _Lifecycle, p: Processor, wait: IDelayedCall) -> None:
        wait.cancel()
        p._stopped()

    @no_child.upon(_Lifecycle.stop).to(stopped)
    @stopped.upon(_Lifecycle.stop).loop()
    def stop_now(c: _Lifecycle, p: Processor) -> None:
        p._stopped()

    return b.build()


_LIFECYCLE = _lifecycle()
