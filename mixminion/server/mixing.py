"""Mixing: at each mix time, choose a batch from the pool and queue it.

Relay packets go to the outgoing queue, exit payloads to their exit
module's queue; both moves commit in one transaction.  Only packet ids and
their small metadata are read, so the pool can hold tens of thousands of
packets without holding them in memory.
"""

from __future__ import annotations

from typing import Callable, Optional

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from mixminion.server.items import ExitItem, RelayItem, decode_item
from mixminion.server.packetstore import PacketStore
from mixminion.server.draining import MIX

OUT = "out"


def delivery_queue(module_name: str) -> str:
    return f"deliver/{module_name}"


class Mixer:
    """Runs the configured pool algorithm every ``interval`` seconds."""

    log = Logger()

    def __init__(self, store: PacketStore, pool, interval: float, clock: IReactorTime,
                 module_for: Callable[[int], Optional[str]],
                 count: Callable[[str, int], None],
                 after_mix: Callable[[], None],
                 run_write: Optional[Callable[..., defer.Deferred]] = None) -> None:
        self.store = store
        self.pool = pool
        self.interval = interval
        self.clock = clock
        self.module_for = module_for
        self.count = count
        self.after_mix = after_mix
        #: runs the round's store transaction: the node passes a worker
        #: thread, since a commit may wait for processing's (tens of
        #: milliseconds the reactor would not serve MMTP); by default it
        #: runs in place
        self.run_write = run_write or (lambda fn, *args: defer.maybeDeferred(fn, *args))
        self._loop: Optional[LoopingCall] = None
        self._stopping = False
        #: the round whose moves are being written, if any
        self._round: Optional[defer.Deferred] = None

    def start(self) -> None:
        self._stopping = False
        self._loop = LoopingCall(self.mix)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False)

    def stop(self) -> defer.Deferred:
        """Stop mixing; fires once a round under way has been written
        (its items are then not handed on: they wait in their queues)."""
        self._stopping = True
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._round is None:
            return defer.succeed(None)
        done: defer.Deferred = defer.Deferred()
        self._round.addBoth(lambda result: (done.callback(None), result)[1])
        return done

    def restart(self, interval: float) -> None:
        """Mix every ``interval`` seconds from now on."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self.interval = interval
        self.start()

    def mix(self) -> defer.Deferred:
        """One mix round; fires with the number of items sent on once
        their moves are committed."""
        items = self.store.items(MIX)
        by_id = {packet_id: meta for packet_id, meta, _ in items}
        chosen = self.pool.choose_batch(list(by_id))
        relays, exits, dropped = [], {}, []
        for packet_id in chosen:
            item, _extra = decode_item(by_id[packet_id])
            if isinstance(item, RelayItem):
                relays.append(packet_id)
            else:
                assert isinstance(item, ExitItem)
                module = self.module_for(item.exit_type)
                if module is None:
                    dropped.append(packet_id)
                else:
                    exits.setdefault(module, []).append(packet_id)

        def moved(_) -> int:
            if dropped:
                self.count("DroppedUnknownExitType", len(dropped))
                self.log.warn("Dropped {n} payloads for exit types with no module",
                              n=len(dropped))
            self.count("Mixed", len(chosen))
            self.log.debug("Mix: {sent} of {pool} items sent on", sent=len(chosen),
                           pool=len(items))
            if not self._stopping:
                try:
                    self.after_mix()
                except Exception:  # a failed flush must not stop the mixing timer
                    self.log.failure("Handing on the mixed items failed; next round retries")
            return len(chosen)

        def failed(failure) -> int:
            self.log.failure("Could not move the mixed items; they stay in the pool", failure)
            return 0

        d = self.run_write(self._move, relays, exits, dropped).addCallbacks(moved, failed)
        self._round = d

        def finished(result):
            if self._round is d:
                self._round = None
            return result

        return d.addBoth(finished)

    def _move(self, relays: list[int], exits: dict[str, list[int]], dropped: list[int]) -> None:
        with self.store.transaction():
            self.store.move_many(relays, OUT)
            for module, ids in exits.items():
                self.store.move_many(ids, delivery_queue(module))
            self.store.remove_many(dropped)
