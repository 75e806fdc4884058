"""The mix node: the service tree ``twistd mixminion`` runs.

Data flows one way::

    MMTP responder -> incoming queue -> processing (replay log first)
        -> mix pool -> outgoing queue -> MMTP client
                    -> exit module queues -> SMTP / MBOX / FRAGMENT / DROP

Received packets wait in an append-only log (``queues/incoming/``, see
:mod:`mixminion.server.incoming_log`), which only the reception thread
writes, so an acknowledgement waits for one short append and sync; every
later queue is a table of the main SQLite store (``packets.db``, WAL, an
fsync per commit).  Each hand-over between queues is one transaction
(processing's across the two stores is made safe by a consumed mark:
:mod:`mixminion.server.draining`), so a crash at any point loses no
acknowledged packet and relays none twice (a resent packet is refused by
the next hop's replay log).  Decryption runs in a child process
(:mod:`mixminion.server.processing`).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, globalLogPublisher

from mixminion.exits.registry import Dispatcher
from mixminion.mmtp.bandwidth import BandwidthLimiter
from mixminion.mmtp.initiator import InitiatorSettings, MMTPClient
from mixminion.mmtp.responder import responder_factory
from mixminion.mmtp.tls import InitiatorTLS, ResponderTLS
from mixminion.server.clock import WALL
from mixminion.server.delivery import Delivery
from mixminion.server.draining import consumed_through, open_incoming
from mixminion.server.durable import DurableSink
from mixminion.server.keys import KeyStore
from mixminion.server.keyservice import validity
from mixminion.listening import ListeningService
from mixminion.server.mixing import Mixer
from mixminion.server.config import ServerConfig
from mixminion.server.outgoing import Outgoing
from mixminion.server.packetstore import PacketStore, PacketStoreError
from mixminion.server.pidfile import PidFile
from mixminion.server.mix_algorithm import MixAlgorithm, make_mix_algorithm
from mixminion.server.processing import ProcessingWorkers
from mixminion.server.queues import MIX, OUT, delivery_queue
from mixminion.server.stats import NodeStats, StatsReport
from mixminion.server.status import (
    NOTICE,
    STATUS_INTERVAL,
    RecentErrors,
    health_facts,
    health_reasons,
    keysets,
    status_document,
    status_json,
    status_path,
    valid_now,
    write_status,
)
from mixminion.server.workers import run_in, worker_thread

if TYPE_CHECKING:  # imported when used: a node that neither pings nor publishes needs neither
    from mixminion.server.pinging.service import PingerService
    from mixminion.server.publish import Publisher


#: how often the counters are saved (they are also saved at a clean stop),
#: so a crash loses at most this much of the counts that /metrics and the
#: StatsFile summaries report
COUNTERS_SAVE_INTERVAL = 300.0


def node_stats_path(config: ServerConfig) -> str:
    """Where the counters are kept between runs."""
    return os.path.join(config.server.work_dir, "stats.json")


def initiator_settings(config: ServerConfig) -> InitiatorSettings:
    """The outgoing MMTP settings of ``[Outgoing/MMTP]`` and ``Timeout``."""
    return InitiatorSettings(
        max_packets_per_connection=config.outgoing.max_packets_per_connection,
        max_connections=config.outgoing.max_connections,
        idle_timeout=float(config.server.timeout),
        keep_open=float(config.outgoing.keep_open),
        # The queue hands over at most max_in_flight_per_destination per
        # next hop; this bounds the client's memory even if it did not.
        max_queued_per_destination=2 * Outgoing.max_in_flight_per_destination,
    )


def mix_algorithm(config: ServerConfig) -> MixAlgorithm:
    """The mixing algorithm of ``[Server] MixAlgorithm`` and its parameters."""
    server = config.server
    return make_mix_algorithm(server.mix_algorithm, server.mix_pool_min_size, server.mix_pool_rate)


def _private_dir(path: str) -> None:
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)


class PipelineService(service.Service):
    """Starts and stops the stages in order; the listeners are siblings
    started after it (children of :class:`MixNode`)."""

    log = Logger()

    def __init__(self, node: "MixNode") -> None:
        self.node = node

    def startService(self) -> None:  # noqa: N802
        super().startService()
        self.node.start_pipeline()

    def stopService(self) -> defer.Deferred:  # noqa: N802
        super().stopService()
        return defer.ensureDeferred(self.node.stop_pipeline())


class MixNode(service.MultiService):
    """A Type III mix: built from :class:`NodeSettings`, a key provider and
    the configured exit modules."""

    log = Logger()
    #: the key store (``build_node`` sets it; None in a node built without one)
    keys: Optional[KeyStore] = None

    def __init__(self, config: ServerConfig, reactor, identity, packet_keys: Callable[[], list],
                 dispatcher: Dispatcher, *, stats: Optional[NodeStats] = None,
                 pid_file: Optional[PidFile] = None) -> None:
        super().__init__()
        server, incoming, outgoing = config.server, config.incoming, config.outgoing
        self.config = config
        self.reactor = reactor
        #: wall time of the start (of this object until the node starts)
        self.started = WALL.seconds()
        self._started_elapsed = reactor.seconds()
        self.pipeline_running = False
        #: the node's last WARN/ERROR lines, while it runs
        self.recent_errors = RecentErrors()
        self.status_file = status_path(server.work_dir)
        self._status_loop: Optional[LoopingCall] = None
        self._status_failed = False
        self.identity = identity
        self.packet_keys = packet_keys
        queue_dir = server.queue_dir
        for path in (server.base_dir, server.work_dir, queue_dir):
            _private_dir(path)
        self.pid_file = pid_file if pid_file is not None else PidFile(server.pid_file)
        self.stats = stats if stats is not None else NodeStats(node_stats_path(config))
        self.stats_report = StatsReport(self.stats, server.stats_file, reactor,
                                        server.log_stats, server.stats_interval, wall=WALL)
        body_dir = os.path.join(queue_dir, "bodies")
        self.store = PacketStore(os.path.join(queue_dir, "packets.db"), body_dir=body_dir)
        # A pinging node's processing child queues returned pings for the
        # pinger (mixminion.server.pinging.service) instead of dropping them.
        self.processor = ProcessingWorkers(os.path.join(queue_dir, "incoming"), self.store.path,
                                           reactor, self.stats.count,
                                           workers=server.processing_workers,
                                           body_dir=body_dir, pings=config.pinging.enabled)
        with self.processor.locked() as waited:
            if waited:
                self.log.info("Waited for the processing child of the previous run to exit")
            stray = self.store.sweep_bodies()
            if stray:
                self.log.info("Overwrote {n} packet bodies left by a crash", n=stray)
            self.incoming = open_incoming(self.processor.incoming_path, self.store,
                                          server.processing_workers)
            if self.incoming.unreadable_at_start:
                self.log.warn(
                    "The incoming log holds {n} unreadable records before its last good one "
                    "(torn by a crash in a commit never acknowledged, or damaged on disk); "
                    "processing will drop them", n=self.incoming.unreadable_at_start)
        processed = self.processor.start_from(self.store, self.incoming.committed_through,
                                              self.incoming.removed_through)
        self.sink = DurableSink(self.incoming, reactor, max_queued=server.max_queued_packets,
                                min_free_bytes=server.min_free_disk,
                                on_stored=self.processor.stored,
                                unable=lambda: self.processor.failing)
        self.processor.on_consumed = self.sink.consumed
        self.sink.removed(processed)  # in the log until every worker passes them
        self.tls = ResponderTLS(identity, server.nickname, clock=WALL, legacy=incoming.legacy)
        self.limiter = BandwidthLimiter(reactor, server.max_bandwidth, server.max_bandwidth_spike)
        self.client = MMTPClient(reactor, InitiatorTLS(legacy=outgoing.legacy),
                                 initiator_settings(config), self.stats,
                                 allows=config.outgoing.allows,
                                 wrap_endpoint=self.limiter.wrap_endpoint)
        self.delivery = Delivery(self.store, dispatcher, reactor, self.stats.count)
        self.processor.min_free_disk = self.delivery.min_free_disk = lambda: self.sink.min_free_bytes
        self.outgoing = Outgoing(self.store, self.client, tuple(outgoing.retry), reactor,
                                 identity.public.keyid, self.stats.count, self.sink,
                                 allows=config.outgoing.allows)
        self._mixing_worker = worker_thread("mixminion-mixing")
        self.mixer = Mixer(self.store, mix_algorithm(config), server.mix_interval, reactor,
                           dispatcher.routing_table(), self.stats.count, self._after_mix,
                           run_write=self._mixing_write)
        PipelineService(self).setServiceParent(self)
        self.limits = config.connection_limits()
        self.responder = responder_factory(self.sink, self.tls, reactor, self.limits,
                                           incoming.connection_rules(), self.stats)
        factory = self.limiter.wrap_factory(self.responder)
        #: (kind, listener) of each port: the MMTP ones, then metrics
        self.listeners: list[tuple[str, ListeningService]] = []
        endpoint = TCP4ServerEndpoint(reactor, incoming.listen_port, backlog=128,
                                      interface=incoming.listen_ip)
        self._listen("MMTP", ListeningService(endpoint, factory))
        if incoming.listen_ip6:
            endpoint6 = TCP6ServerEndpoint(reactor, incoming.listen_port, backlog=128,
                                           interface=incoming.listen_ip6)
            self._listen("MMTP", ListeningService(endpoint6, factory))
        if server.metrics_port is not None:
            # prometheus_client and twisted.web only for a node that serves them
            from mixminion.server.metrics import QuietSite, http_root, node_registry

            self.metrics_registry = node_registry(self)
            site = QuietSite(http_root(self.metrics_registry, self.health, self.status_bytes))
            metrics = TCP4ServerEndpoint(reactor, server.metrics_port,
                                         interface=server.metrics_address)
            self._listen("metrics", ListeningService(metrics, site))
        self._stats_call = None
        self._first_flush = None

    def _listen(self, kind: str, svc: ListeningService) -> None:
        svc.setServiceParent(self)
        self.listeners.append((kind, svc))

    @property
    def mmtp_listeners(self) -> list[ListeningService]:
        """The MMTP ports, which /health requires."""
        return [svc for kind, svc in self.listeners if kind == "MMTP"]

    def startService(self) -> None:  # noqa: N802
        """Start every child (pipeline, listeners, keys, reload...), then
        say so in one WARN line and write the first status."""
        self.started = WALL.seconds()
        self._started_elapsed = self.reactor.seconds()
        globalLogPublisher.addObserver(self.recent_errors)
        super().startService()
        publisher = self.publisher
        if publisher is not None and self.status_changed not in publisher.listeners:
            publisher.listeners.append(self.status_changed)
        self.log.warn("{line}", line=self.start_line(), **{NOTICE: True})
        self.status_changed()
        self._status_loop = LoopingCall(self.status_changed)
        self._status_loop.clock = self.reactor
        self._status_loop.start(STATUS_INTERVAL, now=False)

    # --- pipeline ------------------------------------------------------------

    def start_pipeline(self) -> None:
        self.pid_file.write(os.getpid())
        # No child runs yet: entries of keys no longer live (a stop before
        # keys_rotated could remove them) go now.
        keys = self.packet_keys()
        live = {key.public.keyid for key in keys}
        self._forget_replay_logs([k for k in self.store.replay_logs() if k not in live])
        self.processor.set_keys(keys)
        self.mixer.start()
        self.processor.kick()
        self._first_flush = self.reactor.callLater(0, self.outgoing.flush)
        self._schedule_stats()
        self.stats_report.start()
        self.pipeline_running = True

    def keys_rotated(self, retired: Sequence[bytes]) -> None:
        """After a key rotation: decrypt with the live keys only, and
        forget the replay entries of the retired keys (ids ``retired``)
        once processing no longer decrypts with them (a drain under way
        ends with the keys it began with)."""
        self.processor.set_keys(self.packet_keys())
        if retired:
            d = self.processor.keys_in_use()
            d.addCallback(lambda _: self._forget_replay_logs(retired))
            d.addErrback(lambda failure: self.log.failure(
                "Could not remove the replay entries of a retired packet key", failure))
        self.status_changed()

    def _forget_replay_logs(self, keyids: Sequence[bytes]) -> None:
        """Remove the replay entries of these keys (no longer live); the
        next start tries again for any left."""
        try:
            for keyid in keyids:
                self.store.forget_replay_log(keyid)
        except PacketStoreError as exc:
            self.log.error("Could not remove the replay entries of a retired packet key "
                           "(the next start tries again): {why}", why=str(exc))
            return
        if keyids:
            self.log.info("Removed the replay entries of {n} retired packet keys",
                          n=len(keyids))

    def replace_exits(self, dispatcher: Dispatcher) -> defer.Deferred:
        """Route and deliver through ``dispatcher`` (modules rebuilt from a
        new configuration); fires once the old modules have stopped."""
        self.mixer.routes = dispatcher.routing_table()
        return self.delivery.replace_dispatcher(dispatcher)

    def _mixing_write(self, fn, *args) -> defer.Deferred:
        return run_in(self.reactor, self._mixing_worker, fn, *args)

    def _after_mix(self) -> None:
        self.outgoing.flush()
        self.delivery.flush()

    def _schedule_stats(self) -> None:
        self._stats_call = self.reactor.callLater(COUNTERS_SAVE_INTERVAL, self._save_stats)

    def _save_stats(self) -> None:
        try:
            self.stats.save()
        except OSError as exc:
            self.log.warn("Could not save statistics: {why}", why=str(exc))
        self._schedule_stats()

    async def stop_pipeline(self) -> None:
        for call in (self._stats_call, self._first_flush):
            if call is not None and call.active():
                call.cancel()
        if self._status_loop is not None and self._status_loop.running:
            self._status_loop.stop()
        self.stats_report.stop()
        self.pipeline_running = False
        try:
            await self.mixer.stop()
            if self._mixing_worker.started:
                self._mixing_worker.stop()
            await self.sink.stop()
            await self.processor.stop()
            # What processing consumed is overwritten now, not at the next start.
            self.incoming.remove_through(consumed_through(self.store,
                                                          len(self.processor.workers)))
            outgoing_stopped = self.outgoing.stop()  # before the close aborts its sends
            await self.client.close()
            await outgoing_stopped
            await self.delivery.stop()
        finally:
            # Whatever failed above, the counters, the stores and the pid
            # file are closed: the next start must not find them held.
            try:
                self.stats.save()
            finally:
                self._write_status(running=False)
                globalLogPublisher.removeObserver(self.recent_errors)
                self.store.close()
                self.incoming.close()
                self.pid_file.release()

    def queue_sizes(self) -> dict[str, int]:
        return {"incoming": self.processor.waiting(self.incoming.committed_through),
                "pool": self.store.count(MIX),
                "outgoing": self.store.count(OUT)}

    def deliver_sizes(self) -> dict[str, int]:
        """Payloads waiting in each exit module's queue."""
        return {m.name: self.store.count(delivery_queue(m.name))
                for m in self.delivery.dispatcher.modules}

    # --- what the node says about itself ------------------------------------------

    @property
    def publisher(self) -> Optional[Publisher]:
        """The publisher among the children, if the node publishes."""
        return self._named("publisher")  # Publisher.name

    @property
    def pinger(self) -> Optional[PingerService]:
        """The pinger among the children, if the node pings."""
        return self._named("pinger")  # PingerService.name

    def _named(self, name: str) -> Any:
        # By name, not by class: the node imports neither module unless
        # it publishes or pings.
        try:
            return self.getServiceNamed(name)
        except KeyError:
            return None

    def uptime(self) -> float:
        return self.reactor.seconds() - self._started_elapsed

    def ports(self) -> list[tuple[str, str]]:
        """(kind, ``host:port``) of each port listening: MMTP, then metrics."""
        ports = []
        for kind, svc in self.listeners:
            if svc.port is not None:
                host = svc.port.getHost()
                name = f"[{host.host}]" if ":" in host.host else host.host
                ports.append((kind, f"{name}:{host.port}"))
        return ports

    def listening(self) -> list[str]:
        """``host:port`` of each listening port: MMTP, then metrics."""
        return [address for _kind, address in self.ports()]

    def start_line(self) -> str:
        """What the node says once it started: nickname, identity, the
        ports it listens on and its packet key's validity."""
        ports = ", ".join(f"{address} ({kind})" for kind, address in self.ports())
        current = valid_now(keysets(self), WALL.seconds())
        if current:
            key = f"packet key valid {validity(current[-1])}"
        else:
            key = "no packet key valid now"
        return (f"Mix node {self.config.server.nickname} started: identity "
                f"{self.identity.public.fingerprint}, listening on {ports or 'nothing'}, {key}")

    def health(self) -> list[str]:
        """Why the node is unhealthy, one reason each (none: healthy)."""
        return health_reasons(health_facts(self, WALL.seconds()))

    def status(self, running: bool = True) -> dict:
        return status_document(self, WALL.seconds(), running)

    def status_bytes(self) -> bytes:
        return status_json(self.status())

    def status_changed(self) -> None:
        """Something worth telling happened (or time passed): rewrite
        ``WorkDir/status.json``.  Only while the pipeline runs."""
        if self.pipeline_running:
            self._write_status(running=True)

    def _write_status(self, running: bool) -> None:
        try:
            write_status(self.status_file, self.status(running))
        except Exception as exc:  # noqa: BLE001 - a status file never stops the node
            if not self._status_failed:
                self.log.warn("Could not write {path}: {why}", path=self.status_file,
                              why=getattr(exc, "strerror", None) or str(exc))
            self._status_failed = True
        else:
            self._status_failed = False
