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

With ``[Server] ProcessingWorkers: N`` there are N children, and each
takes its :class:`Share` of the ids (``id % N``) with a consumed mark of
its own.  They share one replay log: each batch's test-and-set of replay
entries runs inside its commit, and SQLite lets one process write at a
time, so a packet that reaches two workers (a replay) is processed by
whichever commits first and refused by the other.
"""

from __future__ import annotations

import re
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

#: kv name in the main store: every incoming id up to this one is processed
#: (with one worker, its consumed mark; see :class:`Share`)
CONSUMED_KEY = "incoming-consumed-through"


@dataclass(frozen=True)
class Share:
    """The incoming ids one of ``of`` processing workers takes: those with
    ``id % of == index``.  Its consumed mark ``c`` says that every id of
    its share up to ``c`` is processed."""

    index: int = 0
    of: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.of:
            raise ValueError(f"no worker {self.index} of {self.of}")

    @property
    def key(self) -> str:
        """Its consumed mark's name in the main store's kv table."""
        return CONSUMED_KEY if self.of == 1 else f"{CONSUMED_KEY}/{self.index}/{self.of}"

    def takes(self, packet_id: int) -> bool:
        """Whether incoming id ``packet_id`` is this share's."""
        return packet_id % self.of == self.index

    def next_after(self, last: int) -> int:
        """The first id of this share above ``last``."""
        return last + (self.index - last - 1) % self.of + 1

    def ids(self, after: int, through: int, limit: int) -> list[int]:
        """Up to ``limit`` ids of this share in ``(after, through]``, in order."""
        first = self.next_after(after)
        return list(range(first, min(through, first + (limit - 1) * self.of) + 1, self.of))

    def count_between(self, after: int, through: int) -> int:
        """How many ids of this share lie in ``(after, through]``."""
        return len(range(self.next_after(after), through + 1, self.of))

    def __str__(self) -> str:
        return f"{self.index}/{self.of}"


def shares(workers: int) -> list[Share]:
    return [Share(i, workers) for i in range(workers)]


def everything_through(marks: Sequence[int]) -> int:
    """The highest id such that it and every id below it are processed,
    when worker ``i`` of ``len(marks)`` has processed its share through
    ``marks[i]``."""
    return min(share.next_after(mark) for share, mark in zip(shares(len(marks)), marks)) - 1


@dataclass(frozen=True)
class BatchDone:
    """One committed batch: incoming ids up to ``through`` are consumed."""

    through: int
    count: int
    counts: Counter


def _int(raw: Optional[bytes], default: int = 0) -> int:
    return int(raw) if raw else default


def worker_mark(store: PacketStore, share: Share) -> int:
    """The last id of ``share`` processed (at least the common mark)."""
    common = _int(store.get_value(CONSUMED_KEY))
    return max(common, _int(store.get_value(share.key), common))


def consumed_through(store: PacketStore, workers: int = 1) -> int:
    """The highest incoming id such that it and every id below it are
    processed, by ``workers`` workers (0 if none)."""
    return everything_through([worker_mark(store, share) for share in shares(workers)])


def _marks_of_others(store: PacketStore) -> dict[str, int]:
    """The per-worker marks in the store, by name, with how many workers
    wrote them; names that are not marks are left alone."""
    found = {}
    for name in store.values_named(CONSUMED_KEY + "/"):
        match = re.fullmatch(re.escape(CONSUMED_KEY) + r"/(\d+)/(\d+)", name)
        if match and int(match.group(1)) < int(match.group(2)):
            found[name] = int(match.group(2))
    return found


def settle_marks(store: PacketStore, workers: int) -> None:
    """At start-up, with no child running: marks left by a different
    number of workers become one common mark (what all of them had
    processed), so the new shares start from it.  Packets above it that
    an old worker had processed are met again and refused by the replay
    log, which holds their entries (they count as replays)."""
    old = _marks_of_others(store)
    counts = set(old.values())
    if not old or counts == {workers}:
        return
    with store.transaction():
        common = max(consumed_through(store, n) for n in counts)
        store.set_value(CONSUMED_KEY, str(common).encode())
        store.delete_values(list(old))


def open_incoming(directory: str, store: PacketStore, workers: int = 1) -> IncomingLog:
    """The node's incoming log, recovered after whatever stopped the node:
    records processing consumed are removed, and packets an older version
    queued inside the main store are taken over (appended first, so a
    crash here leaves a copy for the replay log to refuse, never a loss)."""
    settle_marks(store, workers)
    # A worker may be past the log's last good record (records it had
    # processed were damaged since, or the log's folder was lost): new ids
    # must start above every worker's mark, or it would skip them.
    used = max(worker_mark(store, share) for share in shares(workers))
    incoming = IncomingLog(directory, consumed_through(store, workers), used_through=used)
    old = store.ids(INCOMING)
    if old:
        incoming.add_many(store.get_many(old))
        store.remove_many(old)
    return incoming


def drain(incoming: IncomingLog, store: PacketStore, processor: PacketProcessor,
          batch_size: int, now: Callable[[], float], opener: Optional[Executor] = None,
          through: Optional[int] = None, pings: bool = False,
          share: Share = Share(),
          more: Optional[Callable[[], int]] = None) -> Iterator[BatchDone]:
    """Process every incoming packet of ``share`` above its consumed mark
    (and up to ``through``, the last id the writer committed), a batch per
    commit, yielding after each commit.  ``more``, asked before each batch
    is taken, says how far the writer has committed since: the drain goes
    on until a batch finds nothing new.

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

    last_committed = incoming.committed_through if through is None else through

    def batch_after(last: int) -> list[int]:
        nonlocal last_committed
        if more is not None:
            last_committed = max(last_committed, more())
        return share.ids(max(last, incoming.removed_through), last_committed, batch_size)

    def start_opening(ids: list[int]):
        return opener.submit(open_, ids) if opener and ids else None

    ids = batch_after(worker_mark(store, share))
    opening = start_opening(ids)
    while ids:
        following = batch_after(ids[-1])
        next_opening = start_opening(following)
        opened, damaged = opening.result() if opening else open_(ids)
        counts = commit_batch(store, processor, ids[-1], opened, now(), damaged, pings,
                              share)
        yield BatchDone(ids[-1], len(ids), counts)
        if not following:  # more may have come while this batch was opened
            following = batch_after(ids[-1])
            next_opening = start_opening(following)
        ids, opening = following, next_opening


def commit_batch(store: PacketStore, processor: PacketProcessor, through: int,
                 opened: Sequence[OpenedPacket], now: float, damaged: int = 0,
                 pings: bool = False, share: Share = Share()) -> Counter:
    """Replay entries, queued items and ``share``'s consumed mark in one
    transaction (``damaged``: records of the batch that could not be read,
    counted as dropped)."""
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
        store.set_value(share.key, str(through).encode())
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
