"""The FRAGMENT exit module: server-side reassembly (spec: server.md §9.7,
fragments.md §5.3).

Fragments are stored in an SQLite file under ``BaseDir/deliver/FRAGMENT``
(:mod:`mixminion.exits.fragment_store`); memory holds only the metadata
the reassembly rules need (a :class:`~mixminion.exits.fragment_store.DiskReassembler`),
and fragment bodies are read back from the file when a chunk can be
decoded or a message completes.  A completed message is parsed
(``RT | RL | RI | compressed``), checked against ``MaximumSize``, put in the
durable outbox in the same transaction that marks it COMPLETED, and then
handed back to the node (``ExitContext.hand_back``), which queues it for
the module of its real exit type like any exit payload, with that
module's retry schedule (server.md §6.3); only then is it deleted from the
outbox, so a crash in between hands it back again at the next round.

Pending messages are bounded (``MaximumPendingMessages``, default 10,000,
which bounds memory to a few MB of metadata; ``MaximumPendingBytes``,
default 256 MB of fragment data on disk, about 9,000 fragments): when a
new fragment takes the exit over either bound, the *oldest* pending
messages (by arrival of their first fragment) are evicted first, each
counted as ``FragmentEvicted``, and one WARN line per flush says how many
(no message ids).  Oldest first, because an honest message's fragments
arrive within a few mix intervals of each other, so the message that has
waited longest is the least likely to complete; evicting the largest would
favour a flood of one-fragment messages over honest ones that have more.
An evicted message is forgotten, not rejected: its later fragments may
still complete it.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

from twisted.internet import defer
from zope.interface import implementer

from mixminion.events import Event
from mixminion.codec.errors import ParseError
from mixminion.codec.exit import FragmentPiece
from mixminion.codec.fragments import (
    SSF_PREFIX_LEN,
    FragmentParams,
    Outcome,
    parse_server_side_message,
)
from mixminion.codec.payload import OVERHEADS
from mixminion.codec.routing import FRAGMENT_TYPE
from mixminion.config.values import format_size
from mixminion.exits.context import Advertisement, ExitContext
from mixminion.exits.errors import ExitConfigError
from mixminion.exits.fragment_store import DiskReassembler, FragmentStore, OutboxEntry
from mixminion.exits.interfaces import IExitModule
from mixminion.exits.items import DeliveryItem, DeliveryResult, make_reassembled_item
from mixminion.exits.options import FRAGMENTED, section_values

DAY = 86400
STATE_FILE = "fragments.sqlite3"
#: room for the server-side prefix in front of the compressed message
PREFIX_ALLOWANCE = SSF_PREFIX_LEN + 0xFFFF


#: the event counted for each reassembly outcome
FRAGMENT_OUTCOME = {
    Outcome.STORED: Event.FRAGMENT_STORED,
    Outcome.UNNEEDED: Event.FRAGMENT_UNNEEDED,
    Outcome.DROPPED: Event.FRAGMENT_DROPPED,
    Outcome.REJECTED: Event.FRAGMENT_REJECTED,
    Outcome.COMPLETED: Event.FRAGMENT_COMPLETED,
}


def midnight(t: float) -> int:
    """The UTC midnight at or before ``t``."""
    return int(t // DAY) * DAY


@implementer(IExitModule)
class FragmentModule:
    name = "FRAGMENT"
    section_name = "Delivery/Fragmented"
    exit_types = frozenset({FRAGMENT_TYPE})
    priority = -1
    uses_tag = False
    #: a fragment is never retried: it is stored at once or refused
    retry_schedule: list[int] = []

    def __init__(self) -> None:
        self.context: Optional[ExitContext] = None
        self._store: Optional[FragmentStore] = None
        self._reassembler: Optional[DiskReassembler] = None
        self.max_size = 0
        self.max_interval: int = FRAGMENTED.default("MaximumInterval")
        self.max_pending_messages: int = FRAGMENTED.default("MaximumPendingMessages")
        self.max_pending_bytes: int = FRAGMENTED.default("MaximumPendingBytes")
        self.log: Any = None
        #: evictions not yet reported (one WARN line per flush)
        self._evicted = 0
        #: the module's folder, once created
        self._dir: Optional[str] = None

    # -- configuration ---------------------------------------------------------------

    def configure(self, section: Mapping[str, Any], context: ExitContext) -> None:
        values = section_values(FRAGMENTED, section)
        self.max_size = values["MaximumSize"]
        if self.max_size < 1:
            raise ExitConfigError("[Delivery/Fragmented] MaximumSize must be positive")
        self.max_interval = values["MaximumInterval"]
        self.max_pending_messages = values["MaximumPendingMessages"]
        if self.max_pending_messages < 1:
            raise ExitConfigError("[Delivery/Fragmented] MaximumPendingMessages must be at least 1")
        self.max_pending_bytes = values["MaximumPendingBytes"]
        need = self.largest_pending()
        if self.max_pending_bytes < need:
            raise ExitConfigError(
                f"[Delivery/Fragmented] MaximumPendingBytes ({format_size(self.max_pending_bytes)}) "
                f"cannot hold one message of MaximumSize: raise it to at least "
                f"{format_size(-(-need // 1024) * 1024)}, or lower MaximumSize")
        self.context = context
        self.log = context.logger(self)

    @property
    def max_length(self) -> int:
        """Largest ``MSGLEN`` stored: ``MaximumSize`` and room for the prefix."""
        return self.max_size + PREFIX_ALLOWANCE

    def largest_pending(self) -> int:
        """Bytes on disk of the largest message the exit stores (its padded
        length: decoded chunks, or fragments up to ``k`` per chunk)."""
        return max(FragmentParams.for_message(self.max_length, o).padded_length for o in OVERHEADS)

    # The store is opened at first use, not in configure: a SIGHUP builds the
    # new modules while the old ones still deliver, and two live copies of
    # the same store would each hold a stale picture of the other's work.

    @property
    def store(self) -> FragmentStore:
        if self._store is None:
            assert self.context is not None, "configure() first"
            path = os.path.join(self.context.module_dir(self.name), STATE_FILE)
            self._store = FragmentStore(path)
            self._reassembler = DiskReassembler.load(self._store, self.max_length)
            self.log.info("{pending} partial messages ({size}) and {waiting} reassembled messages restored",
                          pending=len(self._reassembler.pending),
                          size=f"{self._reassembler.pending_bytes / (1 << 20):.1f} MB",
                          waiting=len(self._store.outbox_waiting()))
            # The bounds may have been lowered since the last run.
            with self._store.transaction():
                self._evict()
        return self._store

    @property
    def reassembler(self) -> DiskReassembler:
        self.store  # noqa: B018 - opens the store, which loads the reassembler
        assert self._reassembler is not None
        return self._reassembler

    def _reload(self) -> None:
        """Memory ran ahead of the file (a failed transaction): read back
        what was committed."""
        self._reassembler = DiskReassembler.load(self.store, self.max_length)

    def _evict(self, keep: Optional[bytes] = None) -> None:
        """Inside a transaction: back under the bounds, oldest first."""
        assert self._reassembler is not None and self.context is not None
        n = self._reassembler.evict(self.max_pending_messages, self.max_pending_bytes, keep)
        if n:
            self.context.count(Event.FRAGMENT_EVICTED, n)
            self._evicted += n

    # -- fragments -----------------------------------------------------------------

    def deliver(self, item: DeliveryItem) -> defer.Deferred:
        return defer.ensureDeferred(self._deliver(item))

    async def _deliver(self, item: DeliveryItem) -> DeliveryResult:
        assert self.context is not None
        piece = item.classification
        if item.address or not isinstance(piece, FragmentPiece) or item.reassembled:
            self.context.count(Event.FRAGMENT_REFUSED)
            self.log.warn("Dropping a {kind} FRAGMENT item: only plaintext fragments with empty "
                          "routing info are reassembled", kind=item.kind)
            return DeliveryResult.NORETRY
        today = midnight(self.context.now())
        entry: Optional[OutboxEntry] = None
        try:
            with self.store.transaction():
                result = self.reassembler.add(piece.fragment, today)
                if result.outcome is Outcome.STORED:
                    self._evict(keep=result.message_id)
                elif result.outcome is Outcome.COMPLETED:
                    assert result.message is not None
                    entry = self._completed(result.message_id, result.message, today)
        except BaseException:
            self._reload()
            raise
        self.context.count(FRAGMENT_OUTCOME[result.outcome])
        if result.outcome is Outcome.REJECTED:
            self.log.warn("Rejected a fragmented message: inconsistent or too large fragments")
            return DeliveryResult.NORETRY
        if entry is not None:
            self._hand_back(entry)
        return DeliveryResult.OK

    def _completed(self, mid: bytes, message: bytes, today: int) -> Optional[OutboxEntry]:
        """Inside the transaction: the message is whole (its fragments are
        gone and it is marked COMPLETED); queue or reject it."""
        assert self.context is not None
        try:
            exit_type, address, compressed = parse_server_side_message(message)
        except ParseError:
            reason = "malformed"
            compressed = b""
        else:
            reason = "too large" if len(compressed) > self.max_size else ""
        if reason:
            self.reassembler.reject(mid, today)
            self.context.count(Event.FRAGMENT_MESSAGE_REJECTED)
            self.log.warn("Dropping a reassembled message: {reason}", reason=reason)
            return None
        now = self.context.now()
        entry_id = self.store.add_outbox(exit_type, address, compressed, now)
        self.log.info("Reassembled a message of {size} compressed bytes", size=len(compressed))
        return OutboxEntry(entry_id, exit_type, address, compressed, now, None)

    def _hand_back(self, entry: OutboxEntry) -> None:
        """Give a reassembled message to the node's delivery queues (the
        module of its real exit type takes it from there, on its own retry
        schedule), then forget it here.  If the node cannot take it now,
        it stays in the outbox and the next round tries again."""
        assert self.context is not None
        item = make_reassembled_item(entry.exit_type, entry.address, entry.compressed, entry.queued_at)
        try:
            self.context.hand_back(item)
        except Exception as exc:
            self.log.error("Could not queue a reassembled message for delivery; it waits in "
                           "the outbox: {error}", error=f"{type(exc).__name__}: {exc}")
            return
        with self.store.transaction():
            self.store.delete_outbox(entry.id)

    def local_paths(self) -> list[str]:
        """Its store's folder."""
        assert self.context is not None
        if self._dir is None:
            self._dir = self.context.module_dir(self.name)
        return [self._dir]

    # -- each round ----------------------------------------------------------------

    def flush(self) -> defer.Deferred:
        return defer.ensureDeferred(self._flush())

    async def _flush(self) -> None:
        assert self.context is not None
        now = self.context.now()
        self.expire(now)
        if self._evicted:
            self.log.warn("Evicted {n} pending fragmented messages, oldest first, to stay within "
                          "MaximumPendingMessages ({messages}) and MaximumPendingBytes ({size})",
                          n=self._evicted, messages=self.max_pending_messages,
                          size=format_size(self.max_pending_bytes))
            self._evicted = 0
        # Messages a crash (or a full queue) left between this store and the
        # node's; one in memory at a time: the list is metadata.
        for entry_id, _, _, _ in self.store.outbox_waiting():
            entry = self.store.outbox_entry(entry_id)
            if entry is not None:
                self._hand_back(entry)

    def expire(self, now: float) -> int:
        """Reject messages whose first fragment came before UTC midnight of
        today minus ``MaximumInterval``; forget the marks of messages older
        than twice that (their fragments would be stale by then).  Returns
        how many messages expired."""
        assert self.context is not None
        today = midnight(now)
        cutoff = today - self.max_interval
        reassembler = self.reassembler
        forget_before = cutoff - self.max_interval - DAY
        if not (reassembler.has_older(cutoff) or self.store.has_status_before(forget_before)):
            return 0
        try:
            with self.store.transaction():
                expired = reassembler.expire(cutoff, today)
                reassembler.forget_status(forget_before)
        except BaseException:
            self._reload()
            raise
        if expired:
            self.context.count(Event.FRAGMENT_EXPIRED, expired)
            self.log.info("Expired {n} incomplete fragmented messages", n=expired)
        return expired

    # -- descriptor and shutdown ------------------------------------------------------

    def max_fragments(self) -> int:
        """Fragments of a ``MaximumSize`` message (fragments.md §5.3)."""
        return FragmentParams.for_message(self.max_size, 0).fragment_count

    def advertise(self) -> Optional[Advertisement]:
        n = self.max_fragments()
        return Advertisement(self.section_name, (("Version", "0.1"), ("Maximum-Fragments", str(n))), n)

    def stop(self) -> defer.Deferred:
        if self._store is not None:
            self._store.close()
            self._store = None
        return defer.succeed(None)
