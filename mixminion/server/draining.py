"""Processing's batch logic: incoming queue → codec → mix pool (and, on a
pinging node, returned pings → ``ping`` queue).

No Twisted and no clock of its own: it runs inside the processing child
process (:mod:`mixminion.server.processing_child`) and in unit tests.

Received packets wait in the incoming log
(:class:`~mixminion.server.incoming_log.IncomingLog`), which only the
node's reception thread writes: an MMTP acknowledgement then waits for
that one short commit, never for processing's.  The results go to the main
store, ``packets.db``.  The log and SQLite cannot share a transaction, so
the main store records how far processing got: each batch's replay
entries, pool items and the highest incoming id it consumed commit
together.  The node removes incoming packets up to that id later (and at
start-up), and processing never reads below it; so a crash at any moment
either leaves a packet to be processed again or has it processed once.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

from mixminion.events import Event
from mixminion.codec.process import Drop, Exit, OpenedPacket, PacketProcessor, Reject, Relay
from mixminion.codec.routing import PING_TYPE
from mixminion.server.incoming_log import IncomingLog
from mixminion.server.items import DeliveryItem, encode_item
from mixminion.server.packetstore import PacketStore
from mixminion.server.pinging.handles import handle_of
from mixminion.server.queues import INCOMING, MIX, PING

#: kv name in the main store: the highest incoming id whose processing committed
CONSUMED_KEY = "incoming-consumed-through"


@dataclass(frozen=True)
class BatchDone:
    """One committed batch: incoming ids up to ``through`` are consumed."""

    through: int
    count: int
    counts: Counter


def consumed_through(store: PacketStore) -> int:
    """The highest incoming id processing has committed (0 if none)."""
    raw = store.get_value(CONSUMED_KEY)
    return int(raw) if raw else 0


def open_incoming(directory: str, store: PacketStore) -> IncomingLog:
    """The node's incoming log, recovered after whatever stopped the node:
    records processing consumed are removed, and packets an older version
    queued inside the main store are taken over (appended first, so a
    crash here leaves a copy for the replay log to refuse, never a loss)."""
    incoming = IncomingLog(directory, consumed_through(store))
    old = store.ids(INCOMING)
    if old:
        incoming.add_many(store.get_many(old))
        store.remove_many(old)
    return incoming


def drain(incoming: IncomingLog, store: PacketStore, processor: PacketProcessor,
          batch_size: int, now: Callable[[], float], opener: Optional[Executor] = None,
          through: Optional[int] = None, pings: bool = False) -> Iterator[BatchDone]:
    """Process every incoming packet above the consumed mark (and up to
    ``through``, the last id the writer committed), a batch per commit,
    yielding after each commit.

    With an ``opener``, batch k+1 is read and opened there (its RSA and
    LIONESS mostly run without the GIL) while batch k commits here.
    ``pings``: this node pings, so PING exits carrying a handle go to the
    ``ping`` queue (see :func:`pool_row`).
    """
    def open_(ids: list[int]) -> tuple[list[OpenedPacket], int]:
        """The batch opened, and how many of its records were unreadable."""
        packets = incoming.read_many(ids)
        readable = [p for p in packets if p is not None]
        return processor.open_batch(readable), len(packets) - len(readable)

    def batch_after(last: int) -> list[int]:
        return incoming.ids(after=last, limit=batch_size, through=through)

    ids = batch_after(consumed_through(store))
    opening = opener.submit(open_, ids) if opener and ids else None
    while ids:
        following = batch_after(ids[-1])
        next_opening = opener.submit(open_, following) if opener and following else None
        opened, damaged = opening.result() if opening else open_(ids)
        counts = commit_batch(store, processor, ids[-1], opened, now(), damaged, pings)
        yield BatchDone(ids[-1], len(ids), counts)
        ids, opening = following, next_opening


def commit_batch(store: PacketStore, processor: PacketProcessor, through: int,
                 opened: Sequence[OpenedPacket], now: float, damaged: int = 0,
                 pings: bool = False) -> Counter:
    """Replay entries, queued items and the consumed mark in one transaction
    (``damaged``: records of the batch that could not be read, counted as
    dropped)."""
    counts: Counter = Counter()
    if damaged:
        counts[Event.DROPPED_DAMAGED] = damaged
    with store.transaction():
        results = processor.finish_batch(opened)
        by_queue: dict[str, list[tuple[bytes, bytes]]] = {}
        for row in (pool_row(result, counts, pings) for result in results):
            if row is not None:
                queue, data, meta = row
                by_queue.setdefault(queue, []).append((data, meta))
        for queue, rows in by_queue.items():
            store.add_many(queue, [data for data, _ in rows], now, [meta for _, meta in rows])
        store.set_value(CONSUMED_KEY, str(through).encode())
    return counts


def pool_row(result, counts: Counter, pings: bool = False) -> Optional[tuple[str, bytes, bytes]]:
    """(queue, data, meta) to store for ``result``; None to drop it.

    Relay and exit items go to the pool.  A PING exit is dropped, unless
    this node pings (``pings``) and its routing info can be one of our
    handles: then it goes to the ``ping`` queue, stamped with the time it
    was processed, for the pinger to settle (doc/reliability.md §1).
    """
    if isinstance(result, Relay):
        counts[Event.PROCESSED_RELAY] += 1
        return MIX, result.packet, encode_item(result.next_hop)
    if isinstance(result, Exit):
        if result.exit_type == PING_TYPE:
            handle = handle_of(result.routing_info) if pings else None
            if handle is None:
                counts[Event.DROPPED_PING] += 1
                return None
            counts[Event.PROCESSED_PING] += 1
            return PING, b"", handle
        counts[Event.PROCESSED_EXIT] += 1
        item = DeliveryItem(result.exit_type, result.routing_info, result.application_key)
        return MIX, result.payload, encode_item(item)
    if isinstance(result, Drop):
        counts[Event.DROPPED_DUMMY] += 1
    elif isinstance(result, Reject):
        counts[Event.REJECTED.of(result.reason.value)] += 1
    return None
