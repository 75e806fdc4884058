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
from dataclasses import dataclass, field
from typing import Callable, Optional

from twisted.application import internet, service
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.logger import Logger
from twisted.web.server import Site

from mixminion.exits.registry import Dispatcher
from mixminion.mmtp.initiator import InitiatorSettings, MMTPClient
from mixminion.mmtp.limits import AddressRules, ConnectionLimits
from mixminion.mmtp.responder import responder_factory
from mixminion.mmtp.tls import InitiatorTLS, ResponderTLS
from mixminion.server.delivery import Delivery
from mixminion.server.draining import MIX, consumed_through, open_incoming
from mixminion.server.durable import DurableSink
from mixminion.server.metrics import metrics_root
from mixminion.server.mixing import OUT, Mixer
from mixminion.server.outgoing import Outgoing
from mixminion.server.packetstore import PacketStore
from mixminion.server.pool import make_pool
from mixminion.server.processing import Processor
from mixminion.server.processing_child import processing_lock
from mixminion.server.stats import NodeStats
from mixminion.server.workers import run_in, worker_pool

DEFAULT_OUTGOING_RETRY = (3600,) * 24 + (7 * 3600,) * 18


@dataclass
class NodeSettings:
    """Everything the node needs, already parsed and validated (the
    configuration file maps onto this; tests build it directly)."""

    base_dir: str
    nickname: str
    listen_ip: str = "127.0.0.1"
    listen_port: int = 48099
    listen_ip6: Optional[str] = None
    mix_algorithm: str = "Timed"
    mix_interval: float = 1800.0
    pool_min_size: int = 5
    pool_rate: float = 0.6
    outgoing_retry: tuple[int, ...] = DEFAULT_OUTGOING_RETRY
    limits: ConnectionLimits = field(default_factory=ConnectionLimits)
    rules: AddressRules = field(default_factory=AddressRules)
    initiator: InitiatorSettings = field(default_factory=InitiatorSettings)
    max_queued: Optional[int] = 50000
    min_free_disk: int = 0
    metrics_port: Optional[int] = None
    metrics_address: str = "127.0.0.1"
    legacy_in: bool = False
    legacy_out: bool = False
    stats_interval: float = 300.0

    @property
    def work_dir(self) -> str:
        return os.path.join(self.base_dir, "work")

    @property
    def queue_dir(self) -> str:
        return os.path.join(self.work_dir, "queues")


def node_stats_path(settings: NodeSettings) -> str:
    return os.path.join(settings.work_dir, "stats.json")


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

    def __init__(self, settings: NodeSettings, reactor, identity, packet_keys: Callable[[], list],
                 dispatcher: Dispatcher, *, stats: Optional[NodeStats] = None) -> None:
        super().__init__()
        self.settings = settings
        self.reactor = reactor
        self.identity = identity
        self.packet_keys = packet_keys
        for path in (settings.base_dir, settings.work_dir, settings.queue_dir):
            _private_dir(path)
        self.stats = stats if stats is not None else NodeStats(node_stats_path(settings))
        self.store = PacketStore(os.path.join(settings.queue_dir, "packets.db"),
                                 body_dir=os.path.join(settings.queue_dir, "bodies"))
        self.processor = Processor(os.path.join(settings.queue_dir, "incoming"), self.store.path,
                                   reactor, self.stats.count,
                                   body_dir=os.path.join(settings.queue_dir, "bodies"))
        with processing_lock(self.processor.lock_path) as waited:
            if waited:
                self.log.info("Waited for the processing child of the previous run to exit")
            stray = self.store.sweep_bodies()
            if stray:
                self.log.info("Overwrote {n} packet bodies left by a crash", n=stray)
            self.incoming = open_incoming(self.processor.incoming_path, self.store)
            if self.incoming.unreadable_at_start:
                self.log.warn(
                    "The incoming log holds {n} unreadable records before its last good one "
                    "(torn by a crash in a commit never acknowledged, or damaged on disk); "
                    "processing will drop them", n=self.incoming.unreadable_at_start)
        self.processor.committed_through = self.incoming.committed_through
        self.processor.consumed_through = self.incoming.removed_through
        self.sink = DurableSink(self.incoming, reactor, max_queued=settings.max_queued,
                                min_free_bytes=settings.min_free_disk,
                                on_stored=self.processor.stored)
        self.processor.on_consumed = self.sink.consumed
        self.tls = ResponderTLS(identity, settings.nickname, clock=reactor,
                                legacy=settings.legacy_in)
        self.client = MMTPClient(reactor, InitiatorTLS(legacy=settings.legacy_out),
                                 settings.initiator, self.stats)
        self.delivery = Delivery(self.store, dispatcher, reactor, self.stats.count)
        self.outgoing = Outgoing(self.store, self.client, settings.outgoing_retry, reactor,
                                 identity.public.keyid, self.stats.count, self._relay_to_self)
        self._mixing_pool = worker_pool("mixminion-mixing")
        self.mixer = Mixer(self.store, make_pool(settings.mix_algorithm, settings.pool_min_size,
                                                 settings.pool_rate),
                           settings.mix_interval, reactor, self.delivery.module_for,
                           self.stats.count, self._after_mix, run_write=self._mixing_write)
        PipelineService(self).setServiceParent(self)
        factory = responder_factory(self.sink, self.tls, reactor, settings.limits,
                                    settings.rules, self.stats)
        self.listeners = []
        endpoint = TCP4ServerEndpoint(reactor, settings.listen_port, backlog=128,
                                      interface=settings.listen_ip)
        self._listen(internet.StreamServerEndpointService(endpoint, factory))
        if settings.listen_ip6:
            endpoint6 = TCP6ServerEndpoint(reactor, settings.listen_port, backlog=128,
                                           interface=settings.listen_ip6)
            self._listen(internet.StreamServerEndpointService(endpoint6, factory))
        if settings.metrics_port is not None:
            site = Site(metrics_root(self.metrics_text))
            metrics = TCP4ServerEndpoint(reactor, settings.metrics_port,
                                         interface=settings.metrics_address)
            self._listen(internet.StreamServerEndpointService(metrics, site))
        self._stats_call = None
        self._first_flush = None

    def _listen(self, svc: internet.StreamServerEndpointService) -> None:
        svc._raiseSynchronously = True
        svc.setServiceParent(self)
        self.listeners.append(svc)

    # --- pipeline ------------------------------------------------------------

    def _relay_to_self(self, packets: list[bytes]) -> None:
        ids = self.incoming.add_many(packets, self.reactor.seconds())
        self.sink.added(len(packets))
        self.processor.stored(ids)

    def start_pipeline(self) -> None:
        self.processor.set_keys(self.packet_keys())
        self.mixer.start()
        self.processor.kick()
        self._first_flush = self.reactor.callLater(0, self.outgoing.flush)
        self._schedule_stats()
        self.log.info("Mix node {nickname} started", nickname=self.settings.nickname)

    def refresh_keys(self) -> None:
        """After a key rotation: decrypt with the live keys only."""
        self.processor.set_keys(self.packet_keys())

    def apply_settings(self, settings: NodeSettings) -> None:
        """Apply what a SIGHUP may change without a restart: mixing,
        retry schedules, connection limits and address rules."""
        self.settings.mix_algorithm = settings.mix_algorithm
        self.settings.pool_min_size = settings.pool_min_size
        self.settings.pool_rate = settings.pool_rate
        self.mixer.pool = make_pool(settings.mix_algorithm, settings.pool_min_size,
                                    settings.pool_rate)
        if settings.mix_interval != self.mixer.interval:
            self.settings.mix_interval = settings.mix_interval
            self.mixer.restart(settings.mix_interval)
        self.outgoing.schedule = self.settings.outgoing_retry = settings.outgoing_retry
        for state in self.outgoing.addresses.values():
            state.schedule = settings.outgoing_retry
        limits = self.settings.limits
        for name in vars(settings.limits):
            setattr(limits, name, getattr(settings.limits, name))
        self.settings.rules = settings.rules
        for listener in self.listeners:
            factory = getattr(listener, "factory", None)
            if hasattr(factory, "rules"):
                factory.rules = settings.rules

    def _mixing_write(self, fn, *args) -> defer.Deferred:
        return run_in(self.reactor, self._mixing_pool, fn, *args)

    def _after_mix(self) -> None:
        self.outgoing.flush()
        self.delivery.flush()

    def _schedule_stats(self) -> None:
        self._stats_call = self.reactor.callLater(self.settings.stats_interval, self._save_stats)

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
        await self.mixer.stop()
        if self._mixing_pool.started:
            self._mixing_pool.stop()
        await self.sink.stop()
        await self.processor.stop()
        # What processing consumed is overwritten now, not at the next start.
        self.incoming.remove_through(consumed_through(self.store))
        outgoing_stopped = self.outgoing.stop()  # before the close aborts its sends
        await self.client.close()
        await outgoing_stopped
        await self.delivery.stop()
        self.stats.save()
        self.store.close()
        self.incoming.close()

    def queue_sizes(self) -> dict[str, int]:
        return {"incoming": self.incoming.count(), "pool": self.store.count(MIX),
                "outgoing": self.store.count(OUT)}

    def metrics_text(self) -> str:
        gauges = {f"queue_{k}_packets": v for k, v in self.queue_sizes().items()}
        return self.stats.prometheus_text(gauges)
