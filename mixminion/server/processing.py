"""Processing: incoming queue → codec → mix pool, one transaction a batch.

Packets are decrypted in a worker thread so the reactor keeps serving
MMTP.  For each batch, the replay entries, the items the packets became
and the removal of the packets from the incoming queue commit together
(see :mod:`mixminion.server.store_replay`), so a crash at any moment
either leaves a packet to be processed again or has it processed once.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Optional, Sequence

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from mixminion.codec.process import Drop, Exit, PacketProcessor, Reject, Relay
from mixminion.codec.routing import PING_TYPE
from mixminion.codec.rsa import PrivateKey
from mixminion.server.items import ExitItem, RelayItem, encode_item
from mixminion.server.packetstore import PacketStore
from mixminion.server.store_replay import StoreReplayLog
from mixminion.server.workers import worker_pool

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
        self.idle = deferToThreadPool(self.reactor, self._pool, self._drain, self._processor)
        self.idle.addCallbacks(self._done, self._failed)

    def _drain(self, processor: PacketProcessor) -> Counter:
        """Worker thread: process every incoming packet, a batch per commit."""
        totals: Counter = Counter()
        while True:
            ids = self.store.ids(INCOMING)[:self.batch_size]
            if not ids:
                return totals
            totals.update(self._process_batch(processor, ids))
            totals["_drained"] += len(ids)

    def _process_batch(self, processor: PacketProcessor, ids: list[int]) -> Counter:
        counts: Counter = Counter()
        now = self.reactor.seconds()
        with self.store.transaction():
            packets = [self.store.get(i) for i in ids]
            results = processor.process_batch(packets)
            for result in results:
                self._queue_result(result, now, counts)
            self.store.remove_many(ids)
        return counts

    def _queue_result(self, result, now: float, counts: Counter) -> None:
        if isinstance(result, Relay):
            item = RelayItem.from_next_hop(result.next_hop)
            self.store.add(MIX, result.packet, now, encode_item(item))
            counts["ProcessedRelay"] += 1
        elif isinstance(result, Exit):
            if result.exit_type == PING_TYPE:
                counts["DroppedPing"] += 1
                return
            item = ExitItem(result.exit_type, result.routing_info, result.application_key)
            self.store.add(MIX, result.payload, now, encode_item(item))
            counts["ProcessedExit"] += 1
        elif isinstance(result, Drop):
            counts["DroppedDummy"] += 1
        elif isinstance(result, Reject):
            counts[f"Rejected:{result.reason.value}"] += 1

    def _done(self, counts: Counter) -> None:
        self._running = False
        drained = counts.pop("_drained", 0)
        if drained and self.on_drained is not None:
            self.on_drained(drained)
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
            self._pool.stop()

        return d.addBoth(stop_pool)
