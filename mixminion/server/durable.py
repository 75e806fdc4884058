"""The durable sink behind an MMTP responder: group commit in a worker thread.

Packets handed to :meth:`DurableSink.receivePacket` are written by one
worker thread; everything that arrives while a commit runs is written by
the next commit, so one fsync covers many packets.  Each caller's
Deferred fires only after the commit holding its packet returned.

The same commits delete the packets processing has consumed
(:meth:`DurableSink.consumed`), so the deletions cost no fsync of their own.
"""

from __future__ import annotations

from typing import Callable, Optional

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mixminion.mmtp.interfaces import IPacketSink
from mixminion.server.diskspace import CHECK_INTERVAL, FreeSpace
from mixminion.server.packetstore import PacketStore
from mixminion.server.workers import run_in, stop_when_idle, worker_thread

PACKET_LEN = 32768


class SinkRefused(Exception):
    """The sink will not take the packet now (full disk, full queue)."""


class StoreQueue:
    """One queue of a :class:`PacketStore` as a sink's destination (the
    node itself uses :class:`~mixminion.server.incoming_log.IncomingLog`,
    which has the same three members)."""

    def __init__(self, store: PacketStore, queue: str) -> None:
        self.store = store
        self.queue = queue
        self.path = store.path

    def count(self) -> int:
        return self.store.count(self.queue)

    def write(self, packets: list[bytes], now: float, forget_through: int) -> list[int]:
        """One commit: delete the consumed packets, store the new ones."""
        with self.store.transaction():
            if forget_through:
                self.store.remove_through(self.queue, forget_through)
            return self.store.add_many(self.queue, packets, now) if packets else []


@implementer(IPacketSink)
class DurableSink:
    """Stores received packets in an incoming log or a :class:`PacketStore` queue.

    ``max_queued`` bounds the queue's length and ``min_free_bytes``
    (``MinFreeDisk``) the free disk space below which packets are refused
    (the responder then answers REJECTED and the sender retries later:
    mmtp.md §11).  The later stages keep half of it
    (:mod:`mixminion.server.diskspace`), so what was accepted can still
    be processed.
    """

    log = Logger()

    def __init__(self, store, reactor, queue: str = "incoming",
                 max_batch: int = 256, max_queued: Optional[int] = None,
                 min_free_bytes: int = 0, on_stored=None,
                 unable: Callable[[], Optional[str]] = lambda: None,
                 worker: Optional[ThreadPool] = None) -> None:
        #: where packets go: a PacketStore (its ``queue``) or anything with
        #: ``write``, ``count`` and ``path`` like an IncomingLog
        self.target = StoreQueue(store, queue) if isinstance(store, PacketStore) else store
        self.reactor = reactor
        self.max_batch = max_batch
        self.max_queued = max_queued
        self.min_free_bytes = min_free_bytes
        self.on_stored = on_stored
        #: why what is stored could not be processed now (None: it can be);
        #: while it says so, packets are refused rather than acknowledged
        self.unable = unable
        self.refused = 0
        self.stored = 0
        self._waiting: list[tuple[bytes, defer.Deferred]] = []
        self._writing = False
        self._queued = self.target.count()
        #: incoming ids up to this one are processed: delete them next commit
        self._forget_through = 0
        self._forgotten = 0
        #: the one-thread pool the commits run in (tests pass one that runs
        #: in place)
        self._worker = worker if worker is not None else worker_thread("mixminion-store")
        self._stopped = False
        #: the queue disk's free space, asked of the kernel at most every
        #: CHECK_INTERVAL seconds and counted down by the packets taken
        self.free_space = FreeSpace(self.target.path, reactor.seconds, CHECK_INTERVAL)

    def receivePacket(self, packet: bytes, peer: str) -> defer.Deferred:  # noqa: N802
        if len(packet) != PACKET_LEN:
            return defer.fail(SinkRefused("packet has the wrong length"))
        reason = self._refusal()
        if reason:
            self.refused += 1
            self.log.warn("Refusing a packet: {reason}", reason=reason)
            return defer.fail(SinkRefused(reason))
        d: defer.Deferred = defer.Deferred()
        self._waiting.append((packet, d))
        self._queued += 1
        self._write_next()
        return d

    def _refusal(self) -> Optional[str]:
        if self._stopped:
            return "the store is shutting down"
        if self.max_queued is not None and self._queued >= self.max_queued:
            return "incoming queue is full"
        unable = self.unable()
        if unable:
            return f"processing is not running: {unable}"
        if self.min_free_bytes:
            try:
                free = self.free_space.free(self.min_free_bytes)
            except OSError as exc:
                return f"cannot check free disk space: {exc}"
            self.free_space.spend(PACKET_LEN)
            if free < self.min_free_bytes:
                return "free disk space is below the configured minimum"
        return None

    def _write_next(self) -> None:
        if self._writing or not (self._waiting or self._forget_through > self._forgotten):
            return
        batch = self._waiting[:self.max_batch]
        del self._waiting[:self.max_batch]
        self._writing = True
        now = self.reactor.seconds()
        forget = self._forget_through if self._forget_through > self._forgotten else 0
        d = run_in(self.reactor, self._worker, self.target.write, [p for p, _ in batch], now,
                   forget)
        d.addBoth(self._written, batch, forget)

    def _written(self, result, batch, forget: int) -> None:
        self._writing = False
        if not isinstance(result, Failure) and forget:
            self._forgotten = max(self._forgotten, forget)
            problem = getattr(self.target, "removal_error", None)
            if problem is not None:
                self.log.error("Could not overwrite processed packets (will retry): {why}",
                               why=str(problem))
        if isinstance(result, Failure):
            self._queued -= len(batch)
            self.refused += len(batch)
            self.log.failure("Could not store {count} packets", result, count=len(batch))
            for _, d in batch:
                d.errback(Failure(SinkRefused("the packet could not be stored")))
        else:
            self.stored += len(batch)
            for (_, d), packet_id in zip(batch, result):
                d.callback(packet_id)
            if self.on_stored is not None:
                try:
                    self.on_stored(result)
                except Exception:  # the packets are stored and acknowledged
                    self.log.failure("After storing {count} packets", count=len(batch))
        self._write_next()

    def removed(self, count: int) -> None:
        """Tell the sink that ``count`` packets left its queue."""
        self._queued = max(0, self._queued - count)

    def consumed(self, through: int, count: int) -> None:
        """Processing committed every packet up to id ``through``
        (``count`` of them): delete them with the next commit."""
        self.removed(count)
        if self._stopped:
            return  # the node overwrites them itself once processing stopped
        self._forget_through = max(self._forget_through, through)
        self._write_next()

    def stop(self) -> defer.Deferred:
        """Refuse new packets, finish the writes under way, stop the thread."""
        self._stopped = True
        return stop_when_idle(self.reactor, lambda: self._writing or bool(self._waiting), self._worker)
