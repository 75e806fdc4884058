"""Processing: incoming queue → codec → mix pool, one transaction a batch.

Packets are decrypted in a worker thread so the reactor keeps serving
MMTP.  For each batch, the replay entries, the items the packets became
and the removal of the packets from the incoming queue commit together
(see :mod:`mixminion.server.store_replay`), so a crash at any moment
either leaves a packet to be processed again or has it processed once.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Sequence

from twisted.internet import defer
from twisted.logger import Logger

from mixminion.codec.process import Drop, Exit, OpenedPacket, PacketProcessor, Reject, Relay
from mixminion.codec.routing import PING_TYPE
from mixminion.codec.rsa import PrivateKey
from mixminion.server.items import ExitItem, RelayItem, encode_item
from mixminion.server.packetstore import PacketStore
from mixminion.server.store_replay import StoreReplayLog
from mixminion.server.workers import run_in, worker_pool

INCOMING = "incoming"
MIX = "mix"


class Processor:
    """Drains the incoming queue into the mix pool."""

    log = Logger()

    def __init__(self, store: PacketStore, reactor, count: Callable[[str, int], None],
                 batch_size: int = 16, on_drained: Optional[Callable[[int], None]] = None) -> None:
        self.store = store
        #: told how many packets left the incoming queue (the sink bounds it)
        self.on_drained = on_drained
        self.reactor = reactor
        self.count = count
        self.batch_size = batch_size
        self._processor: Optional[PacketProcessor] = None
        self._running = False
        self._again = False
        self._pool = worker_pool("mixminion-processing")
        #: opens the next batch (all its cryptography) while the worker
        #: commits the current one; its thread starts on first use
        self._opener = ThreadPoolExecutor(1, thread_name_prefix="mixminion-opening")
        self.idle: defer.Deferred = defer.succeed(None)

    def set_keys(self, keys: Sequence[PrivateKey]) -> None:
        """Use these packet keys (newest first) from now on."""
        logs = [(key, StoreReplayLog(self.store, key.public.keyid)) for key in keys]
        self._processor = PacketProcessor(logs) if logs else None
        self.kick()

    def kick(self, _ignored: object = None) -> None:
        """Process whatever is in the incoming queue, soon."""
        if self._running:
            self._again = True
            return
        if self._processor is None:
            return
        self._running = True
        self._again = False
        self.idle = run_in(self.reactor, self._pool, self._drain, self._processor)
        self.idle.addCallbacks(self._done, self._failed)

    def _drain(self, processor: PacketProcessor) -> Counter:
        """Worker thread: process every incoming packet, a batch per commit.

        Batch k+1 is read and opened in the helper thread while batch k
        commits here: the RSA and LIONESS work mostly runs without the GIL,
        so it overlaps with the store's writes instead of adding to them.
        """
        totals: Counter = Counter()
        ids = self.store.ids(INCOMING, self.batch_size)
        opening = self._opener.submit(self._open, processor, ids)
        while ids:
            following = self.store.ids(INCOMING, self.batch_size, after=ids[-1])
            next_opening = self._opener.submit(self._open, processor, following)
            totals.update(self._process_batch(processor, ids, opening.result()))
            if self.on_drained is not None:
                self.reactor.callFromThread(self.on_drained, len(ids))
            ids, opening = following, next_opening
        return totals

    def _open(self, processor: PacketProcessor, ids: list[int]) -> list[OpenedPacket]:
        return processor.open_batch(self.store.get_many(ids)) if ids else []

    def _process_batch(self, processor: PacketProcessor, ids: list[int],
                       opened: Optional[list[OpenedPacket]] = None) -> Counter:
        counts: Counter = Counter()
        now = self.reactor.seconds()
        # Only this worker takes packets out of the incoming queue, so they
        # can be read, and all their cryptography done, before the
        # transaction: the store's lock is held for the replay log and the
        # writes alone.
        if opened is None:
            opened = self._open(processor, ids)
        with self.store.transaction():
            results = processor.finish_batch(opened)
            pooled, dropped = [], []
            for packet_id, result in zip(ids, results):
                row = self._pool_row(result, counts)
                if row is None:
                    dropped.append(packet_id)
                else:
                    pooled.append((packet_id, *row))
            # What a packet became replaces it in its own row: one write of
            # 32 KiB instead of an insert and a secure delete.
            self.store.replace_many(MIX, pooled, now)
            self.store.remove_many(dropped)
        return counts

    def _pool_row(self, result, counts: Counter) -> Optional[tuple[bytes, bytes]]:
        """(data, meta) to put in the pool for ``result``; None to drop it."""
        if isinstance(result, Relay):
            counts["ProcessedRelay"] += 1
            return result.packet, encode_item(RelayItem.from_next_hop(result.next_hop))
        if isinstance(result, Exit):
            if result.exit_type == PING_TYPE:
                counts["DroppedPing"] += 1
                return None
            counts["ProcessedExit"] += 1
            item = ExitItem(result.exit_type, result.routing_info, result.application_key)
            return result.payload, encode_item(item)
        if isinstance(result, Drop):
            counts["DroppedDummy"] += 1
        elif isinstance(result, Reject):
            counts[f"Rejected:{result.reason.value}"] += 1
        return None

    def _done(self, counts: Counter) -> None:
        self._running = False
        for name, n in counts.items():
            self.count(name, n)
        if sum(n for name, n in counts.items() if name.startswith("Rejected:")):
            self.log.info("Processing rejected {n} packets",
                          n=sum(n for k, n in counts.items() if k.startswith("Rejected:")))
        if self._again:
            self.kick()

    def _failed(self, failure) -> None:
        self._running = False
        self.log.failure("Packet processing failed; will retry", failure)
        self.reactor.callLater(1.0, self.kick)

    def stop(self) -> defer.Deferred:
        d = self.idle if self._running else defer.succeed(None)

        def stop_pool(_):
            if self._pool.started:
                self._pool.stop()
            self._opener.shutdown(wait=True)

        return d.addBoth(stop_pool)
