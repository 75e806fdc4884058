"""The node's pinger (doc/reliability.md §1, §2, §5): the service that puts
the pinger's logic -- schedule, paths, handles, store, inference -- to work
inside a running node.

* **The directory.**  A :class:`~mixminion.client.directory.ClientDirectory`
  under ``WorkDir/dir``, trusting the ``[DirectoryServers] Authority``
  lines (a consensus needs the signatures of half of them, rounded up, as
  the authorities' own threshold), downloaded at start, every
  ``ReportInterval`` and just after each midnight GMT; a failed download is
  tried again with the publisher's backoff, never later than the next
  ``ReportInterval``.  Pings go through the directory's recommended servers
  that relay (:func:`.packets.relaying_servers`), never through this node.
* **A ping**, at each tick of the Poisson schedule (``Interval``): choose
  ``X, S, Y`` (:func:`.paths.choose_path`), take a fresh handle, build the
  packet over ``X, S, Y, P`` with ``P`` this node's current descriptor, put
  it in the node's ``out`` queue as a :class:`NextHop` to ``X`` (what
  processing queues for a relayed packet), record it in ``WorkDir/pings.db``,
  and flush the queue: the ping leaves over the same MMTP as any packet.
  It is queued before it is recorded: a crash between the two sends a
  packet whose return nobody claims, rather than blaming three servers for
  a ping that never left.
* **Its first hop**: the outgoing stage tells the pinger how each attempt
  to hand a ping to ``X`` ended; the first attempt of each ping that
  failed at the link (connect, TLS, REJECTED:
  :func:`mixminion.mmtp.initiator.link_failure`) is recorded against
  ``X`` (:meth:`.store.PingStore.record_link_failure`).  One per ping, not
  one per retry: a first hop that is down for a while is one lost
  one-hop ping per ping that tried it, however often the queue retries.
  Which queued packets are pings is known only in memory: after a restart
  the pings still queued are no longer watched (their return still counts).
* **A return**: the processing child puts each PING exit carrying a handle
  in the ``ping`` queue, stamped with the time it processed it, on the
  same elapsed clock (:func:`mixminion.server.draining.pool_row`); after
  each batch that queued some, and at start, the pinger settles them
  (:meth:`.store.PingStore.mark_returned`) and removes them.  They never
  enter the pool: our own mixing delay is not part of what is measured.
* **Every ``ReportInterval``**: pings older than ``Window`` are
  forgotten, pings not back after ``Timeout`` settled as lost, the rest
  measured (:func:`.inference.measure`) and signed into a report
  (:func:`mixminion.directory.reliability.build_report`) that
  :class:`.reports.ReportUploads` hands to every authority.

Everything that blocks -- SQLite (``pings.db`` and the node's store), RSA
(building a packet, signing a report, checking the cached directory at
start) -- runs in one worker thread, so the writes to ``pings.db`` stay in
order.  A download of the directory is checked on the reactor
(``ClientDirectory`` is asynchronous); it comes once per ``ReportInterval``,
and descriptors already checked are not checked again.

``reactor`` is the node's elapsed clock: it stamps pings and times every
schedule; ``wall`` dates reports and judges descriptors' validity.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from mixminion.client.directory import ClientDirectory, ClientDirectoryError
from mixminion.codec.crypto import RandomSource
from mixminion.codec.rsa import PrivateKey
from mixminion.codec.textformat import SECONDS_PER_DAY, previous_midnight
from mixminion.config.intervals import format_interval
from mixminion.directory.descriptor import ServerDescriptor
from mixminion.directory.http import HTTPClient
from mixminion.directory.reliability import Measured, ReportFields, ServerReliability, build_report
from mixminion.events import Event
from mixminion.mmtp.initiator import link_failure
from mixminion.server.clock import WALL
from mixminion.server.config import ServerConfig
from mixminion.server.items import encode_item
from mixminion.server.keys import KeyStore
from mixminion.server.packetstore import PacketStore, PacketStoreError
from mixminion.server.pinging.handles import new_handle
from mixminion.server.pinging.inference import measure
from mixminion.server.pinging.packets import build_ping, relaying_servers
from mixminion.server.pinging.paths import choose_path, others
from mixminion.server.pinging.reports import ReportUploads
from mixminion.server.pinging.schedule import PingLoop, PoissonSchedule
from mixminion.server.pinging.store import PingStore, PingStoreError
from mixminion.server.publish import backoff_delay, http_report_uploader
from mixminion.server.queues import OUT, PING
from mixminion.server.workers import run_in, worker_thread

if TYPE_CHECKING:  # the node imports this module
    from mixminion.server.node import MixNode

#: seconds an authority has to answer a download or an upload
HTTP_TIMEOUT = 60.0
#: returned pings settled in one worker call (the rest in the next)
SETTLE_SLICE = 1024
#: how long after midnight GMT the day's directory is fetched: the
#: authorities publish the new day's consensus at midnight
AFTER_MIDNIGHT = 60.0


@dataclass(frozen=True)
class PingSettings:
    """``[Pinging]``, in seconds."""

    #: mean gap between two pings
    interval: float
    #: a ping not back by then is lost
    timeout: float
    #: how far back the inference looks
    window: float
    #: how often a report is uploaded and the directory downloaded
    report_interval: float


def consensus_threshold(authorities: int) -> int:
    """Signatures a consensus needs: half the authorities, rounded up (the
    authorities' own threshold, doc/reliability.md §3)."""
    return max(1, (authorities + 1) // 2)


class PingerService(service.MultiService):
    """Pings, settles returns, reports (see the module docstring).

    ``flush`` hands the ``out`` queue to MMTP (the node's
    ``Outgoing.flush``); ``count`` counts events; ``own_descriptor``
    gives this node's descriptor valid now (None while it has none).  Not
    restartable: stopping closes ``pings``."""

    #: how the node finds it among its children (MixNode.pinger)
    name = "pinger"

    log = Logger()

    def __init__(self, settings: PingSettings, *, nickname: str, identity: PrivateKey,
                 own_descriptor: Callable[[], Optional[ServerDescriptor]],
                 directory: ClientDirectory, pings: PingStore, store: PacketStore,
                 flush: Callable[[], object], count: Callable[[str, int], None],
                 uploads: ReportUploads, reactor: Any, wall: IReactorTime = WALL,
                 worker: Any = None, rng: Optional[random.Random] = None,
                 entropy: RandomSource = os.urandom) -> None:
        super().__init__()
        self.settings = settings
        self.nickname = nickname
        self.identity = identity
        #: this node's identity fingerprint: never on a ping's path
        self.fingerprint = identity.public.fingerprint
        self.own_descriptor = own_descriptor
        self.directory = directory
        self.pings = pings
        self.store = store
        self.flush = flush
        self.count = count
        self.uploads = uploads
        self.reactor = reactor
        self.wall = wall
        self._worker = worker if worker is not None else worker_thread("mixminion-pinger")
        #: path choice and the schedule; handles and packets take ``entropy``
        self.rng = rng if rng is not None else random.SystemRandom()
        self.entropy = entropy
        #: what the last directory says: servers a ping may use, nicknames
        #: by fingerprint, when it was downloaded (wall time), what it says
        #: of this node (None: unmeasured)
        self.servers: list[ServerDescriptor] = []
        self.nicknames: dict[str, str] = {}
        self.directory_downloaded: Optional[float] = None
        self.own_reliability: Optional[ServerReliability] = None
        #: the last measurement, by fingerprint (``/metrics``)
        self.measured: dict[str, Measured] = {}
        self._loaded = False
        self._refreshing: Optional[defer.Deferred] = None
        self._refresh_failures = 0
        self._refresh_retry: Optional[IDelayedCall] = None
        self._midnight: Optional[IDelayedCall] = None
        self._cycle = LoopingCall(self.cycle)
        self._cycle.clock = reactor
        self._collecting = False
        self._collect_again = False
        #: work under way (worker calls, downloads): cancelled at stop
        self._pending: set[defer.Deferred] = set()
        #: pings in the ``out`` queue whose first attempt has not ended, by
        #: packet id: ``X``'s fingerprint and when the ping left.  Written
        #: by the worker, read by the reactor (single dict operations).
        self._first_hops: dict[int, tuple[str, float]] = {}
        PingLoop(reactor, PoissonSchedule(settings.interval, self.rng), self.ping
                 ).setServiceParent(self)

    # --- lifecycle -------------------------------------------------------------------

    def startService(self) -> None:  # noqa: N802
        super().startService()
        self._cycle.start(self.settings.report_interval, now=False)
        self._arm_midnight()
        self.refresh("start-up")
        self.collect()  # returns queued before a restart

    def stopService(self) -> defer.Deferred:  # noqa: N802
        """Stop the schedules, cancel what is under way, let the worker
        finish its call (so the node's store is not closed under it), and
        close ``pings.db``."""
        stopped = super().stopService()
        if self._cycle.running:
            self._cycle.stop()
        for call in (self._refresh_retry, self._midnight):
            if call is not None and call.active():
                call.cancel()
        for d in list(self._pending):
            d.cancel()
        uploads = self.uploads.stop()
        if self._worker.started:
            self._worker.stop()
        self.pings.close()
        return defer.gatherResults([stopped, uploads], consumeErrors=True)

    def _run(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred:
        """``fn(*args)`` in the worker thread."""
        return run_in(self.reactor, self._worker, fn, *args)

    def _track(self, d: defer.Deferred, what: str) -> defer.Deferred:
        """Log ``d``'s failure (not a cancellation at stop) and cancel it if
        the pinger stops first."""
        self._pending.add(d)

        def done(result: Any) -> None:
            self._pending.discard(d)
            if not isinstance(result, Failure) or result.check(defer.CancelledError):
                return
            if result.check(PingStoreError, PacketStoreError, OSError):
                # the disk, not a bug: one line, and the next round tries again
                self.log.warn("Pinger: {what} failed: {why}", what=what,
                              why=result.getErrorMessage())
            else:
                self.log.failure("Pinger: {what} failed", result, what=what)
        d.addBoth(done)
        return d

    # --- the directory -------------------------------------------------------------------

    def refresh(self, why: str) -> None:
        """Download the directory now (unless a download is under way)."""
        if self._refreshing is not None:
            return
        if self._refresh_retry is not None and self._refresh_retry.active():
            self._refresh_retry.cancel()
        d = self._refreshing = defer.ensureDeferred(self._refresh(why))

        def over(result: Any) -> Any:
            self._refreshing = None
            return result
        d.addBoth(over)
        self._track(d, "directory download")

    async def _refresh(self, why: str) -> None:
        if not self._loaded:
            # The cached directory (its signatures checked again) lets
            # pinging start before the first download answers.
            await self._run(self.directory.load)
            self._loaded = True
            self._use_directory()
        try:
            await self.directory.update(force=True)
        except ClientDirectoryError as exc:
            self._refresh_failures += 1
            delay = min(self.settings.report_interval,
                        backoff_delay(self._refresh_failures, self.rng.random))
            usable = self.servers and any(d.is_valid_at(self.wall.seconds()) for d in self.servers)
            (self.log.info if usable else self.log.warn)(
                "Pinger: no authority gave a directory ({why}); {state}; trying again in "
                "{delay:.0f} s", why=why, delay=delay,
                state="pinging with the last one" if usable else "not pinging until one does")
            self.log.debug("Pinger: directory download: {detail}", detail=str(exc))
            if self.running:
                self._refresh_retry = self.reactor.callLater(delay, self.refresh, "retry")
            return
        self._refresh_failures = 0
        self._use_directory()
        self.log.info("Pinger: directory downloaded ({why}): {n} other relaying servers "
                      "to ping through", why=why, n=len(others(self.servers, self.fingerprint)))

    def _use_directory(self) -> None:
        directory, now = self.directory, self.wall.seconds()
        self.servers = relaying_servers(directory.recommended(now), now)
        self.nicknames = {d.fingerprint: d.nickname for d in directory.all_descriptors()}
        self.own_reliability = directory.reliability().get(self.fingerprint)
        self.directory_downloaded = directory.downloaded

    def _arm_midnight(self) -> None:
        """Download the new day's directory just after midnight GMT."""
        now = self.wall.seconds()
        delay = previous_midnight(int(now)) + SECONDS_PER_DAY + AFTER_MIDNIGHT - now
        self._midnight = self.reactor.callLater(delay, self._new_day)

    def _new_day(self) -> None:
        self._arm_midnight()
        self.refresh("a new day")

    # --- pings -----------------------------------------------------------------------------

    def ping(self) -> Optional[defer.Deferred]:
        """Send one ping, if the directory names enough servers and this
        node has a descriptor valid now (the last hop is itself)."""
        me = self.own_descriptor()
        if me is None:
            self.log.debug("Pinger: no descriptor of ours is valid now; no ping")
            return None
        now = self.wall.seconds()
        servers = [d for d in self.servers if d.is_valid_at(now)]
        d = self._run(self._send, servers, me, self.reactor.seconds())
        d.addCallback(self._sent)
        return self._track(d, "a ping")

    def _send(self, servers: Sequence[ServerDescriptor], me: ServerDescriptor,
              sent_at: float) -> Optional[tuple[ServerDescriptor, ...]]:
        """In the worker: choose, build, queue and record one ping; its
        path ``X, S, Y``, or None when no path is possible."""
        counts = self.pings.measured_counts(sent_at - self.settings.window)
        path = choose_path(servers, self.fingerprint, counts, self.rng)
        if path is None:
            return None
        handle = new_handle(self.entropy)
        ping = build_ping(*path, me, handle, self.entropy)
        packet_id = self.store.add(OUT, ping.packet, sent_at, encode_item(ping.first_hop))
        self._first_hops[packet_id] = (path[0].fingerprint, sent_at)
        self.pings.record_sent(handle, [d.fingerprint for d in path], sent_at)
        return path

    def _sent(self, path: Optional[tuple[ServerDescriptor, ...]]) -> None:
        if not self.running:
            return
        if path is None:
            self.log.debug("Pinger: fewer than 3 other relaying servers are known; no ping")
            return
        self.count(Event.PING_SENT, 1)
        self.log.debug("Pinger: ping through {path}", path=", ".join(d.nickname for d in path))
        self.flush()

    def attempted(self, packet_id: int, failure: Optional[Failure]) -> None:
        """The outgoing stage ended an attempt to send packet ``packet_id``
        (``failure`` None: acknowledged).  The first attempt of a ping
        that failed at the link is recorded against its first hop."""
        first_hop = self._first_hops.pop(packet_id, None)
        if first_hop is None or failure is None or not self.running:
            return
        reason = link_failure(failure)
        if reason is None:
            return
        fingerprint, _sent_at = first_hop
        self.count(Event.PING_LINK_FAILED, 1)
        self.log.debug("Pinger: first hop {name} failed ({reason})",
                       name=self.nicknames.get(fingerprint, fingerprint), reason=reason)
        self._track(self._run(self.pings.record_link_failure, fingerprint,
                              self.reactor.seconds(), reason), "recording a first-hop failure")

    # --- returns ---------------------------------------------------------------------------

    def batch_done(self, counts: Mapping[str, int]) -> None:
        """Processing committed a batch: settle the returns it queued."""
        if counts.get(Event.PROCESSED_PING):
            self.collect()

    def collect(self) -> None:
        """Settle the pings in the ``ping`` queue (once more after this
        round if asked again meanwhile)."""
        if self._collecting:
            self._collect_again = True
            return
        self._collecting = True
        d = self._run(self._settle_returns)
        d.addCallback(self._settled)
        self._track(d, "settling returned pings")

        def over(_: Any) -> None:
            self._collecting = False
            if self._collect_again and self.running:
                self._collect_again = False
                self.collect()
        d.addBoth(over)

    def _settle_returns(self) -> tuple[int, int, bool]:
        """In the worker: mark a slice of the queued returns, then remove
        them (a crash between the two finds them settled already, which
        changes nothing); (returned, unmatched, more left)."""
        rows = self.store.items(PING, limit=SETTLE_SLICE)
        returned = sum(1 for _id, handle, at in rows
                       if handle is not None and self.pings.mark_returned(handle, at))
        self.store.remove_many([row_id for row_id, _handle, _at in rows])
        return returned, len(rows) - returned, len(rows) == SETTLE_SLICE

    def _settled(self, result: tuple[int, int, bool]) -> None:
        returned, unmatched, more = result
        if returned:
            self.count(Event.PING_RETURNED, returned)
        if unmatched:
            self.count(Event.PING_UNMATCHED, unmatched)
            self.log.debug("Pinger: {n} PING exits matched no ping waiting", n=unmatched)
        if more:
            self._collect_again = True

    # --- reports -------------------------------------------------------------------------------

    def cycle(self) -> None:
        """Every ``ReportInterval``: download the directory, report."""
        self.refresh("every ReportInterval")
        self._track(defer.ensureDeferred(self.report()), "the ping report")

    async def report(self) -> None:
        """Settle the lost pings, forget the old, measure the rest, and
        upload the signed report (none when nothing was measured)."""
        window = self.settings.window
        lost, measured, text = await self._run(self._measure, self.reactor.seconds(),
                                               int(self.wall.seconds()))
        if not self.running:
            return
        if lost:
            self.count(Event.PING_LOST, lost)
        self.measured = measured
        if text is None:
            self.log.info("Pinger: nothing measured in the last {window}; no report",
                          window=format_interval(int(window)))
            return
        self.log.info("Pinger: report on {n} servers measured in the last {window}",
                      n=len(measured), window=format_interval(int(window)))
        await self.uploads.submit(text)

    def _measure(self, now: float, wall_now: int) -> tuple[int, dict[str, Measured], Optional[str]]:
        """In the worker: (pings settled as lost now, the measurement, the
        signed report or None)."""
        settings = self.settings
        # Forgotten first: a ping older than the window is not counted lost.
        self.pings.prune(now - settings.window)
        for packet_id, (_x, sent_at) in list(self._first_hops.items()):
            if sent_at < now - settings.window:  # still queued, or dropped unsent
                self._first_hops.pop(packet_id, None)
        lost = self.pings.expire(now, settings.timeout)
        measured = measure(self.pings.outcomes(now - settings.window))
        if not measured:
            return lost, measured, None
        fields = ReportFields(pinger=self.nickname, published=wall_now,
                              interval_start=wall_now - int(settings.window),
                              interval_end=wall_now, measured=tuple(measured.values()))
        return lost, measured, build_report(fields, self.identity, self.entropy)

    # --- what the node shows -----------------------------------------------------------------

    def peers(self) -> list[tuple[str, Measured]]:
        """(nickname, measurement) of each server measured, by fingerprint;
        a server the directory no longer lists goes by its fingerprint."""
        return [(self.nicknames.get(fp, fp), m) for fp, m in sorted(self.measured.items())]

    def status(self) -> dict[str, Any]:
        """The ``pinging`` part of the status document."""
        own = self.own_reliability
        return {
            "directory_downloaded": self.directory_downloaded,
            "servers": len(others(self.servers, self.fingerprint)),
            "reliability": None if own is None else {
                "reliability": own.reliability, "latency_ms": own.latency_ms,
                "pingers": own.pingers},
            "last_report": self.uploads.last_success,
            "last_report_attempt": self.uploads.last_attempt,
            "last_report_error": self.uploads.last_error,
        }


def _directory_report(level: str, message: str) -> None:
    """What the ClientDirectory says, in the node's log: its INFO lines
    name the authorities' URLs, so they go to DEBUG (the pinger says what
    matters in its own lines)."""
    log = PingerService.log
    if level == "WARN":
        log.warn("Pinger: {message}", message=message)
    else:
        log.debug("Pinger: {message}", message=message)


def pinger_for(config: ServerConfig, node: MixNode, keys: KeyStore, reactor: Any,
               wall: IReactorTime = WALL) -> Optional[PingerService]:
    """The node's pinger from ``[Pinging]`` (None when ``Enabled`` is no),
    wired to ``node``'s store, outgoing queue, counters and processing.
    Opens ``WorkDir/pings.db`` (PingStoreError if it cannot)."""
    pinging = config.pinging
    if not pinging.enabled:
        return None
    authorities = [(a.url, a.fingerprint) for a in config.directory.authorities]
    directory = ClientDirectory(config.server.directory_cache_dir, authorities, None,
                                consensus_threshold(len(authorities)), clock=wall,
                                reactor=reactor, timeout=HTTP_TIMEOUT, environ={},
                                report=_directory_report)
    client = HTTPClient(reactor, timeout=HTTP_TIMEOUT)
    uploads = ReportUploads(authorities, reactor, http_report_uploader(client),
                            float(pinging.report_interval), wall=wall, close=client.close)
    settings = PingSettings(interval=float(pinging.interval), timeout=float(pinging.timeout),
                            window=float(pinging.window),
                            report_interval=float(pinging.report_interval))
    pinger = PingerService(
        settings, nickname=config.server.nickname, identity=keys.identity,
        own_descriptor=lambda: keys.current_descriptor(wall.seconds()), directory=directory,
        pings=PingStore.in_work_dir(config.server.work_dir), store=node.store,
        flush=node.outgoing.flush, count=node.stats.count, uploads=uploads, reactor=reactor,
        wall=wall)
    node.processor.batch_listeners.append(pinger.batch_done)
    node.outgoing.attempt_listeners.append(pinger.attempted)
    return pinger
