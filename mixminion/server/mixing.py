"""Mixing: at each mix time, choose a batch from the pool and queue it.

Relay packets go to the outgoing queue, exit payloads to their exit
module's queue; both moves commit in one transaction.  Only packet ids and
their small metadata are read, so the pool can hold tens of thousands of
packets without holding them in memory.
"""

from __future__ import annotations

from typing import Callable, Optional

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from mixminion.server.items import ExitItem, RelayItem, decode_item
from mixminion.server.packetstore import PacketStore
from mixminion.server.processing import MIX

OUT = "out"


def delivery_queue(module_name: str) -> str:
    return f"deliver/{module_name}"


class Mixer:
    """Runs the configured pool algorithm every ``interval`` seconds."""

    log = Logger()

    def __init__(self, store: PacketStore, pool, interval: float, clock: IReactorTime,
                 module_for: Callable[[int], Optional[str]],
                 count: Callable[[str, int], None],
                 after_mix: Callable[[], None]) -> None:
        self.store = store
        self.pool = pool
        self.interval = interval
        self.clock = clock
        self.module_for = module_for
        self.count = count
        self.after_mix = after_mix
        self._loop: Optional[LoopingCall] = None

    def start(self) -> None:
        self._loop = LoopingCall(self.mix)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def mix(self) -> int:
        """One mix round; returns the number of items sent on."""
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
        with self.store.transaction():
            self.store.move_many(relays, OUT)
            for module, ids in exits.items():
                self.store.move_many(ids, delivery_queue(module))
            self.store.remove_many(dropped)
        if dropped:
            self.count("DroppedUnknownExitType", len(dropped))
            self.log.warn("Dropped {n} payloads for exit types with no module", n=len(dropped))
        self.count("Mixed", len(chosen))
        self.log.debug("Mix: {sent} of {pool} items sent on", sent=len(chosen), pool=len(items))
        self.after_mix()
        return len(chosen)
