"""Delivery: each exit module's queue, flushed after every mix.

A payload stays in its module's queue until the module answers OK or
NORETRY, or its per-message retry schedule runs out (server.md §6.3), so
an MTA that is down only delays mail.  Modules are flushed in ascending
priority: FRAGMENT first, so the messages it completes are delivered in
the same round.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.internet import defer
from twisted.logger import Logger

from mixminion.exits.context import ExitContext
from mixminion.exits.items import DeliveryResult
from mixminion.exits.registry import Dispatcher, build_dispatcher, extra_factories, find_exit_modules
from mixminion.server.config import ServerConfig
from mixminion.server.items import ExitItem, decode_item, encode_item
from mixminion.server.mixing import delivery_queue
from mixminion.server.packetstore import PacketStore
from mixminion.server.schedule import MessageRetryState


def exit_sections(config: ServerConfig) -> dict[str, dict[str, Any]]:
    """``[Delivery/...]`` sections for the exit modules: the values the
    configuration parsed with each module's schema (paths made absolute,
    sizes in bytes), or the text of the file for a plugin that declares no
    schema and parses it itself."""
    sections: dict[str, dict[str, Any]] = {}
    for (section, key), value in config.values.items():
        if section.startswith("Delivery/") and section in config.present and value is not None:
            sections.setdefault(section, {})[key] = value
    for name, raw in config.plugin_sections.items():
        sections["Delivery/" + name] = {entry.key: entry.value for entry in raw.entries}
    return sections


def build_exits(config: ServerConfig, context: ExitContext) -> Dispatcher:
    """The configured exit modules: installed plugins plus the factories
    ``[Server] ModulePath``/``Module`` name."""
    server = config.server
    factories = {**find_exit_modules(), **extra_factories(server.module_path, server.modules)}
    return build_dispatcher(exit_sections(config), context, factories)


class Delivery:
    """Hands queued payloads to their exit modules."""

    log = Logger()

    def __init__(self, store: PacketStore, dispatcher: Dispatcher, clock,
                 count: Callable[[str, int], None]) -> None:
        self.store = store
        self.dispatcher = dispatcher
        self.clock = clock
        self.count = count
        self._busy: set[int] = set()
        self._flushing: Optional[defer.Deferred] = None

    def module_for(self, exit_type: int) -> Optional[str]:
        """The queue an exit payload of this type waits in (its module's)."""
        module = self.dispatcher.module_for(exit_type)
        return None if module is None else module.name

    def flush(self) -> defer.Deferred:
        """One delivery round; a round already running is not doubled."""
        if self._flushing is not None:
            return self._flushing
        self._flushing = defer.ensureDeferred(self._round())

        def done(result):
            self._flushing = None
            return result

        return self._flushing.addBoth(done)

    async def _round(self) -> int:
        delivered = 0
        try:
            await self.dispatcher.flush()
        except Exception:
            self.log.failure("Exit modules failed their periodic work")
        for module in self.dispatcher.modules:  # ascending priority: FRAGMENT first
            delivered += await self._deliver_queue(module.name, module)
        return delivered

    async def _deliver_queue(self, name: str, module) -> int:
        now = self.clock.seconds()
        schedule = tuple(getattr(module, "retry_schedule", ()) or ())
        attempts = []
        for packet_id, meta, added in self.store.items(delivery_queue(name)):
            if packet_id in self._busy:
                continue
            item, extra = decode_item(meta)
            assert isinstance(item, ExitItem)
            retry = MessageRetryState(schedule, extra.get("queued", added), extra.get("last"))
            ready = retry.next_attempt(now)
            if ready is None:
                self.store.remove_many([packet_id])
                self.count(f"Expired:{name}", 1)
                continue
            if ready > now:
                continue
            attempts.append(defer.ensureDeferred(
                self._attempt(name, module, packet_id, item, retry, now)))
        results = await defer.gatherResults(attempts, consumeErrors=True) if attempts else []
        return sum(1 for r in results if r)

    async def _attempt(self, name, module, packet_id: int, item: ExitItem,
                       retry: MessageRetryState, started: float) -> bool:
        self._busy.add(packet_id)
        try:
            payload = self.store.get(packet_id)
            # The dispatcher drops corrupt payloads and unknown types, and
            # turns a module's crash into NORETRY; it counts each outcome.
            result = await self.dispatcher.deliver_payload(
                item.exit_type, item.routing_info, payload, item.application_key, retry.queued)
            if result is DeliveryResult.RETRY:
                if retry.failed(started, self.clock.seconds()):
                    self.store.update_meta(packet_id, encode_item(
                        item, queued=retry.queued, last=retry.last_attempt))
                else:
                    self.store.remove_many([packet_id])
                    self.count(f"Expired:{name}", 1)
                return False
            self.store.remove_many([packet_id])
            return result is DeliveryResult.OK
        finally:
            self._busy.discard(packet_id)

    def replace_dispatcher(self, dispatcher: Dispatcher) -> defer.Deferred:
        """Deliver through ``dispatcher`` (modules rebuilt from a new
        configuration) from the end of the running round on; the old
        modules are stopped then.  Fires when they have stopped."""
        def swap(_=None) -> defer.Deferred:
            old, self.dispatcher = self.dispatcher, dispatcher
            return old.stop()

        if self._flushing is None:
            return swap()
        ended: defer.Deferred = defer.Deferred()

        def round_ended(result):
            ended.callback(None)
            return result

        self._flushing.addBoth(round_ended)
        return ended.addCallback(swap)

    def stop(self) -> defer.Deferred:
        d = self._flushing if self._flushing is not None else defer.succeed(None)
        return d.addBoth(lambda _: self.dispatcher.stop())


