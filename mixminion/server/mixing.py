"""Mixing: at each mix time, choose a batch from the pool and queue it.

Relay packets go to the outgoing queue, exit payloads to their exit
module's queue; both moves commit in one transaction.  Only packet ids and
their small metadata are read, so the pool can hold tens of thousands of
packets without holding them in memory.

A round runs off the reactor thread (issue 12: releasing a pool of 60,000
packets blocked the reactor for seconds): the worker reads the pool's ids,
lets the mix algorithm choose among all of them, reads the chosen items'
metadata a slice at a time (each distinct record decoded once), sorts the
exit payloads into their modules' queues by the routing table the node
hands it, and moves the batch in one transaction.  A crash before that
commit leaves the whole pool in place; after it, the whole batch is in
its queues.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable, Iterator, Mapping, Optional

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from mixminion.events import Event
from mixminion.server.items import Item, NextHop, decode_item
from mixminion.server.packetstore import PacketStore
from mixminion.server.queues import MIX, OUT, delivery_queue

#: rows of a queue read in one query when a long queue is walked: bounds
#: the metadata held at once (about 1 MB) and, on the reactor thread, the
#: time one slice takes (tens of milliseconds at most)
READ_SLICE = 4096


def queue_slices(store: PacketStore, queue: str,
                 size: int) -> Iterator[list[tuple[int, Optional[bytes], float]]]:
    """The (id, meta, added) rows of ``queue`` in id order, ``size`` at a
    time: a queue of any length is read in bounded memory.  Each slice is
    read when asked for, so rows added meanwhile above the last one read
    are seen too."""
    after = 0
    while True:
        rows = store.items(queue, limit=size, after=after)
        if rows:
            yield rows
        if len(rows) < size:
            return
        after = rows[-1][0]


def item_decoder(size: int) -> Callable[[bytes], Item]:
    """``decode_item`` (the item alone) remembering the last ``size``
    records: every packet for one next hop carries the same bytes, so a
    queue of 60,000 packets for a few hundred next hops decodes a few
    hundred records."""
    return lru_cache(maxsize=size)(lambda meta: decode_item(meta)[0])


class Mixer:
    """Runs the configured mix algorithm every ``interval`` seconds."""

    log = Logger()
    #: pool rows read in one query (in the worker) while sorting a batch
    read_slice = READ_SLICE

    def __init__(self, store: PacketStore, algorithm, interval: float, clock: IReactorTime,
                 routes: Mapping[int, str],
                 count: Callable[[str, int], None],
                 after_mix: Callable[[], None],
                 run_write: Optional[Callable[..., defer.Deferred]] = None) -> None:
        self.store = store
        self.algorithm = algorithm
        self.interval = interval
        self.clock = clock
        #: the routing table: exit type -> the module whose queue takes
        #: it (the node replaces it when the modules are rebuilt)
        self.routes = routes
        self.count = count
        self.after_mix = after_mix
        #: runs the round's reading, choosing and store transaction: the
        #: node passes a worker thread, since choosing among 60,000 packets
        #: takes a second and a commit may wait for processing's (the
        #: reactor would not serve MMTP meanwhile); by default it runs in
        #: place
        self.run_write = run_write or (lambda fn, *args: defer.maybeDeferred(fn, *args))
        self._loop: Optional[LoopingCall] = None
        self._stopping = False
        #: the round under way, if any
        self._round: Optional[defer.Deferred] = None

    def start(self) -> None:
        self._stopping = False
        self._loop = LoopingCall(self.mix)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False)

    def stop(self) -> defer.Deferred:
        """Stop mixing; fires once a round under way has been written, or
        given up before its moves (its items are then not handed on: they
        wait in their queues)."""
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
        if self._round is not None:
            # Still choosing or moving (a restart at a new interval does not
            # wait for it): a second round would choose the same items.
            return defer.succeed(0)
        d = self.run_write(self._choose, self.algorithm)
        d.addCallback(self._route)
        d.addErrback(self._failed)
        self._round = d

        def finished(result):
            if self._round is d:
                self._round = None
            return result

        return d.addBoth(finished)

    def _choose(self, algorithm) -> tuple[int, list[int], dict[int, list[int]]]:
        """In the worker: the pool's size, and the batch ``algorithm`` chooses
        among all its items, sorted into relay packets and exit payloads
        by exit type (in id order: queues are sent oldest first anyway)."""
        pool_ids = self.store.ids(MIX)
        chosen = set(algorithm.choose_batch(pool_ids))
        decode = item_decoder(self.read_slice)
        relays: list[int] = []
        exits: dict[int, list[int]] = {}
        for rows in queue_slices(self.store, MIX, self.read_slice):
            for packet_id, meta, _ in rows:
                if packet_id not in chosen:
                    continue  # not chosen, or arrived after the choice
                item = decode(meta)
                if isinstance(item, NextHop):
                    relays.append(packet_id)
                else:
                    exits.setdefault(item.exit_type, []).append(packet_id)
        return len(pool_ids), relays, exits

    def _route(self, sorted_batch: tuple[int, list[int], dict[int, list[int]]]) -> defer.Deferred:
        """Each exit type's module by the routing table (payloads of a type
        no module takes are dropped), then the moves, in the worker."""
        pool_size, relays, by_type = sorted_batch
        exits: dict[str, list[int]] = {}
        dropped: list[int] = []
        for exit_type, ids in by_type.items():
            module = self.routes.get(exit_type)
            if module is None:
                dropped += ids
            else:
                exits.setdefault(module, []).extend(ids)
        if self._stopping:
            return defer.succeed(0)  # nothing moved: the batch stays in the pool
        sent = len(relays) + sum(map(len, exits.values())) + len(dropped)

        def moved(_) -> int:
            if dropped:
                self.count(Event.DROPPED_UNKNOWN_EXIT_TYPE, len(dropped))
                self.log.warn("Dropped {n} payloads for exit types with no module",
                              n=len(dropped))
            self.count(Event.MIXED, sent)
            self.log.debug("Mix: {sent} of {pool} items sent on", sent=sent, pool=pool_size)
            if not self._stopping:
                try:
                    self.after_mix()
                except Exception:  # a failed flush must not stop the mixing timer
                    self.log.failure("Handing on the mixed items failed; next round retries")
            return sent

        return self.run_write(self._move, relays, exits, dropped).addCallback(moved)

    def _failed(self, failure) -> int:
        self.log.failure("Could not mix; the items stay in the pool", failure)
        return 0

    def _move(self, relays: list[int], exits: dict[str, list[int]], dropped: list[int]) -> None:
        with self.store.transaction():
            self.store.move_many(relays, OUT)
            for module, ids in exits.items():
                self.store.move_many(ids, delivery_queue(module))
            self.store.remove_many(dropped)
