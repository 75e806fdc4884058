"""Delivery: each exit module's queue, flushed after every mix.

A payload stays in its module's queue until the module answers OK or
NORETRY, or its per-message retry schedule runs out (server.md §6.3), so
an MTA that is down only delays mail.  Modules are flushed in ascending
priority: FRAGMENT first.  A message FRAGMENT completes is handed back
(:meth:`Delivery.hand_back`) to the queue of its exit type's module, as a
new item with that module's retry schedule, and that queue is read again
at the end of the round, so the message is first tried in the same round.

A module that writes local files (FRAGMENT, MBOX with ``MboxFile``) is
skipped while one of its folders has less free space than the later
stages keep (half of ``MinFreeDisk``: :mod:`mixminion.server.diskspace`),
checked before its round and before each of its items; its items wait in
its queue, their retry state untouched, and go at the first round after
space is back.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.task import deferLater
from twisted.logger import Logger

from mixminion.events import Event
from mixminion.codec.packet import PACKET_LEN
from mixminion.exits.context import ExitContext
from mixminion.exits.interfaces import local_paths
from mixminion.exits.items import DeliveryItem, DeliveryResult
from mixminion.exits.registry import Dispatcher, build_dispatcher, extra_factories, find_exit_modules
from mixminion.server.config import ServerConfig
from mixminion.server.diskspace import DiskPause, FreeSpace, Usage, later_floor, shortage
from mixminion.server.items import RetryTimes, decode_item, encode_item
from mixminion.server.mixing import READ_SLICE, queue_slices
from mixminion.server.packetstore import PacketStore
from mixminion.server.queues import QUARANTINE, delivery_queue
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
    # A nym's mail obeys the SMTP exit's blacklist unless given one of its own.
    nym, smtp = sections.get("Delivery/Nym"), sections.get("Delivery/SMTP", {})
    if nym is not None and "BlacklistFile" not in nym and "BlacklistFile" in smtp:
        nym["BlacklistFile"] = smtp["BlacklistFile"]
    return sections


def build_exits(config: ServerConfig, context: ExitContext) -> Dispatcher:
    """The configured exit modules: installed plugins plus the factories
    ``[Server] ModulePath``/``Module`` name."""
    server = config.server
    factories = {**find_exit_modules(), **extra_factories(server.module_path, server.modules)}
    return build_dispatcher(exit_sections(config), context, factories)


#: bytes an item is counted to write to a module's folders (a fragment, or
#: mail of about a packet's size), so the free-space estimate errs low
ITEM_BYTES = PACKET_LEN


class Delivery:
    """Hands queued payloads to their exit modules.

    Each module works on its own: its periodic work and its ready items
    run beside the other modules', so a slow MTA delays only its module.
    A round does not wait for the attempts an earlier round started (their
    items are skipped while they run), so a hung session never holds back
    the items behind it.  A module's queue is read a slice at a time and
    at most :attr:`max_attempts` of its attempts run at once (each holds
    its payload), so releasing a pool of tens of thousands of exit
    payloads neither blocks the reactor nor fills memory.
    """

    log = Logger()
    #: attempts of one module under way at once (each holds its payload)
    max_attempts = 64
    #: rows of a delivery queue read in one reactor call
    read_slice = READ_SLICE

    def __init__(self, store: PacketStore, dispatcher: Dispatcher, clock,
                 count: Callable[[str, int], None], usage: Usage = shutil.disk_usage) -> None:
        self.store = store
        self.dispatcher = dispatcher
        self.clock = clock
        self.count = count
        #: ``[Server] MinFreeDisk`` as the node has it now (bytes; 0: none)
        self.min_free_disk: Callable[[], int] = lambda: 0
        #: how a folder's free space is read (tests pass their own)
        self.usage = usage
        self._free: dict[str, FreeSpace] = {}
        #: per module name: whether its deliveries wait for disk space
        self.disk: dict[str, DiskPause] = {}
        self._busy: set[int] = set()
        #: messages of a module dropped this round, said in one line at its end
        self._expired_counts: dict[str, int] = {}
        #: modules whose queue is being scanned, and each module's attempt slots
        self._scanning: set[str] = set()
        self._slots: dict[str, defer.DeferredSemaphore] = {}
        #: set by :meth:`stop`: a scan under way starts no more attempts
        self._stopping = False
        #: rounds under way (their attempts included)
        self._rounds: set[defer.Deferred] = set()
        #: modules that were handed items back this round
        self._handed_back: set[str] = set()
        #: modules whose periodic work is under way
        self._flushing_modules: set[str] = set()
        dispatcher.context.hand_back.connect(self.hand_back)

    def hand_back(self, item: DeliveryItem) -> None:
        """Queue ``item``, which a module made (FRAGMENT: a reassembled
        message), for the module of its exit type: durably, before this
        returns, with a retry schedule counted from ``item.queued_at``.
        Raises if the store cannot take it (the module keeps it then)."""
        module = self.dispatcher.module_for(item.exit_type)
        if module is None:
            self.count(Event.EXIT_UNKNOWN_TYPE, 1)
            self.log.error("Dropping a payload for exit type 0x{exit_type:04x}: no module handles it",
                           exit_type=item.exit_type)
            return
        self.store.add_many(delivery_queue(module.name), [item.payload], self.clock.seconds(),
                            [encode_item(item, RetryTimes(queued=item.queued_at))])
        self._handed_back.add(module.name)

    def flush(self) -> defer.Deferred:
        """One delivery round; fires with the number delivered once the
        attempts this round started have ended."""
        d = defer.ensureDeferred(self._round())
        self._rounds.add(d)

        def done(result):
            self._rounds.discard(d)
            return result

        return d.addBoth(done)

    def idle(self) -> defer.Deferred:
        """Fires when every round under way has ended."""
        return defer.DeferredList(list(self._rounds), consumeErrors=True)

    async def _round(self) -> int:
        modules = list(self.dispatcher.modules)  # ascending priority: FRAGMENT first
        results = await defer.gatherResults(
            [defer.ensureDeferred(self._module_round(m)) for m in modules], consumeErrors=True)
        again, self._handed_back = self._handed_back, set()
        more = await defer.gatherResults(
            [defer.ensureDeferred(self._deliver_queue(m.name, m)) for m in modules
             if m.name in again and not self._short_of_disk(m)], consumeErrors=True)
        return sum(results) + sum(more)

    @property
    def paused_modules(self) -> list[str]:
        """The modules whose deliveries wait for disk space."""
        return sorted(name for name, pause in self.disk.items() if pause.paused)

    def _short_of_disk(self, module, writing: int = 0) -> bool:
        """Is one of the folders ``module`` writes to under the later
        stages' floor?  If not, ``writing`` bytes are counted spent there.
        A change is logged once (WARN when it starts, INFO when it ends)."""
        paths = local_paths(module)
        if not paths and module.name not in self.disk:
            return False
        spaces = [self._free.setdefault(p, FreeSpace(p, self.clock.seconds, usage=self.usage))
                  for p in paths]
        short = shortage(spaces, later_floor(self.min_free_disk()), writing)
        if module.name not in self.disk:
            self.disk[module.name] = DiskPause(self.log, f"Delivery by {module.name}",
                                               "its messages wait in its queue")
        self.disk[module.name].update(short)
        return short is not None

    async def _module_round(self, module) -> int:
        if self._short_of_disk(module):
            return 0
        if module.name not in self._flushing_modules:
            self._flushing_modules.add(module.name)
            try:
                await defer.maybeDeferred(module.flush)
            except Exception as exc:
                self.log.error("{module}: its periodic work failed: {error}",
                               module=module.name, error=f"{type(exc).__name__}: {exc}")
            finally:
                self._flushing_modules.discard(module.name)
        try:
            return await self._deliver_queue(module.name, module)
        except Exception as exc:  # the queue itself cannot be read: say so, try next round
            self.log.error("{module}: cannot read its delivery queue: {error}",
                           module=module.name, error=f"{type(exc).__name__}: {exc}")
            return 0

    async def _deliver_queue(self, name: str, module) -> int:
        """Start the attempts of ``module``'s ready items, at most
        :attr:`max_attempts` at once, reading its queue :attr:`read_slice`
        rows at a time; fires with how many were delivered once they end.
        One scan per module at a time: a round that finds one under way
        leaves the queue to it."""
        if name in self._scanning:
            return 0
        self._scanning.add(name)
        schedule = tuple(getattr(module, "retry_schedule", ()) or ())
        slots = self._slots.setdefault(name, defer.DeferredSemaphore(self.max_attempts))
        pending: set[defer.Deferred] = set()
        delivered = 0

        def ended(ok: bool, d: defer.Deferred) -> None:
            nonlocal delivered
            slots.release()
            pending.discard(d)
            delivered += bool(ok)

        try:
            for rows in queue_slices(self.store, delivery_queue(name), self.read_slice):
                for packet_id, meta, added in rows:
                    if self._stopping:
                        break
                    if packet_id in self._busy:
                        continue
                    try:
                        item, times = decode_item(meta)
                        if not isinstance(item, DeliveryItem):
                            raise ValueError(f"a {type(item).__name__} in a delivery queue")
                    except (ValueError, KeyError, TypeError) as exc:
                        self._quarantine(name, packet_id, f"its record is damaged ({exc})")
                        continue
                    now = self.clock.seconds()
                    retry = MessageRetryState(
                        schedule, added if times.queued is None else times.queued, times.last)
                    ready = retry.next_attempt(now)
                    if ready is None:
                        self.store.remove_many([packet_id])
                        self._expired(name)
                        continue
                    if ready > now:
                        continue
                    if self._short_of_disk(module, ITEM_BYTES):
                        return await self._settle(name, pending, lambda: delivered)
                    # Each attempt holds its payload in memory: a queue of
                    # 60,000 must not start 60,000 of them.
                    await slots.acquire()
                    if self._stopping:
                        slots.release()
                        break
                    d = defer.ensureDeferred(self._attempt(name, module, packet_id, item, retry,
                                                           now))
                    pending.add(d)
                    d.addCallbacks(ended, lambda f: ended(False, d), callbackArgs=(d,))
                if self._stopping:
                    break
                if len(rows) >= self.read_slice:  # let the reactor serve others between slices
                    await deferLater(self.clock, 0, lambda: None)
        finally:
            self._scanning.discard(name)
        return await self._settle(name, pending, lambda: delivered)

    async def _settle(self, name: str, pending: set[defer.Deferred],
                      delivered: Callable[[], int]) -> int:
        """Wait for a scan's attempts still running; say what expired."""
        if pending:
            await defer.DeferredList(list(pending), consumeErrors=True)
        expired = self._expired_counts.pop(name, 0)
        if expired:
            self.log.warn("{module}: dropped {n} undelivered message(s) whose retry schedule "
                          "ran out", module=name, n=expired)
        return delivered()

    async def _attempt(self, name, module, packet_id: int, item: DeliveryItem,
                       retry: MessageRetryState, started: float) -> bool:
        self._busy.add(packet_id)
        try:
            try:
                payload = self.store.get(packet_id)
            except KeyError:
                self._quarantine(name, packet_id, "its body cannot be read")
                return False
            # The dispatcher drops corrupt payloads and unknown types, and
            # turns a module's crash into NORETRY; it counts each outcome.
            result = await self.dispatcher.deliver(
                replace(item, payload=payload, queued_at=retry.queued))
            if result is DeliveryResult.RETRY:
                if retry.failed(started, self.clock.seconds()):
                    self.store.update_meta(packet_id, encode_item(
                        item, RetryTimes(retry.queued, retry.last_attempt)))
                else:
                    self.store.remove_many([packet_id])
                    self._expired(name)
                return False
            self.store.remove_many([packet_id])
            return result is DeliveryResult.OK
        except Exception as exc:  # the store failed us: the item stays and is tried again
            self.log.error("{module}: an item could not be settled after its attempt: {error}",
                           module=name, error=f"{type(exc).__name__}: {exc}")
            return False
        finally:
            self._busy.discard(packet_id)

    def _expired(self, name: str) -> None:
        """A message whose retry schedule ran out is dropped: counted, and
        said once per round (a message the node acknowledged is gone)."""
        self.count(Event.EXPIRED.of(name), 1)
        self._expired_counts[name] = self._expired_counts.get(name, 0) + 1

    def _quarantine(self, name: str, packet_id: int, why: str) -> None:
        self.store.move_many([packet_id], QUARANTINE)
        self.count(Event.QUARANTINED.of(name), 1)
        self.log.error("{module}: an item was moved aside because {why}; the other items "
                       "go on (queue {queue})", module=name, why=why, queue=QUARANTINE)

    def replace_dispatcher(self, dispatcher: Dispatcher) -> defer.Deferred:
        """Deliver through ``dispatcher`` (modules rebuilt from a new
        configuration) once the rounds under way have ended; the old
        modules are stopped then.  Fires when they have stopped."""
        def swap(_=None) -> defer.Deferred:
            old, self.dispatcher = self.dispatcher, dispatcher
            return old.stop()

        if not self._rounds:
            return swap()
        return self.idle().addCallback(swap)

    def stop(self) -> defer.Deferred:
        """Start no more attempts; fires once those under way have ended
        and the modules have stopped."""
        self._stopping = True
        return self.idle().addCallback(lambda _: self.dispatcher.stop())
