"""The FRAGMENT exit module: server-side reassembly (spec: server.md §9.7,
fragments.md §5.3).

Fragments are fed to a :class:`~mixminion.codec.fragments.Reassembler`
whose state lives in an SQLite file under ``BaseDir/deliver/FRAGMENT``
(:mod:`mixminion.exits.fragment_store`).  A completed message is parsed
(``RT | RL | RI | compressed``), checked against ``MaximumSize``, put in the
durable outbox in the same transaction that marks it COMPLETED, and then
handed to the dispatcher as an item for its real exit type.  If that module
answers RETRY the message stays in the outbox and is tried again at later
flushes, on the target module's retry schedule (server.md §6.3).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

from twisted.internet import defer
from zope.interface import implementer

from mixminion.codec.errors import ParseError
from mixminion.codec.exit import FragmentPiece
from mixminion.codec.fragments import (
    COMPLETED,
    REJECTED,
    SSF_PREFIX_LEN,
    FragmentParams,
    Outcome,
    parse_server_side_message,
)
from mixminion.codec.routing import FRAGMENT_TYPE
from mixminion.exits.context import Advertisement, ExitContext
from mixminion.exits.errors import ExitConfigError
from mixminion.exits.fragment_store import FragmentStore, OutboxEntry
from mixminion.exits.interfaces import IExitModule
from mixminion.exits.items import DeliveryItem, DeliveryResult, make_reassembled_item
from mixminion.exits.options import FRAGMENTED, section_values
from mixminion.exits.retry import DEFAULT_SCHEDULE, is_ready

DAY = 86400
STATE_FILE = "fragments.sqlite3"
#: room for the server-side prefix in front of the compressed message
PREFIX_ALLOWANCE = SSF_PREFIX_LEN + 0xFFFF


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
        self._reassembler: Any = None
        self.max_size = 0
        self.max_interval: int = FRAGMENTED.default("MaximumInterval")
        self.log: Any = None
        self._in_flight: set[int] = set()

    # -- configuration ---------------------------------------------------------------

    def configure(self, section: Mapping[str, Any], context: ExitContext) -> None:
        values = section_values(FRAGMENTED, section)
        self.max_size = values["MaximumSize"]
        if self.max_size < 1:
            raise ExitConfigError("[Delivery/Fragmented] MaximumSize must be positive")
        self.max_interval = values["MaximumInterval"]
        self.context = context
        self.log = context.logger(self)

    # The store is opened at first use, not in configure: a SIGHUP builds the
    # new modules while the old ones still deliver, and two live copies of
    # the same store would each hold a stale picture of the other's work.

    @property
    def store(self) -> FragmentStore:
        if self._store is None:
            assert self.context is not None, "configure() first"
            path = os.path.join(self.context.module_dir(self.name), STATE_FILE)
            self._store = FragmentStore(path)
            self._reassembler = self._store.load(self.max_size + PREFIX_ALLOWANCE)
            self.log.info("{pending} partial messages and {waiting} reassembled messages restored",
                          pending=len(self._reassembler.pending), waiting=len(self._store.outbox()))
        return self._store

    @property
    def reassembler(self) -> Any:
        self.store  # noqa: B018 - opens the store, which loads the reassembler
        return self._reassembler

    @reassembler.setter
    def reassembler(self, value: Any) -> None:
        self._reassembler = value

    # -- fragments -----------------------------------------------------------------

    def deliver(self, item: DeliveryItem) -> defer.Deferred:
        return defer.ensureDeferred(self._deliver(item))

    async def _deliver(self, item: DeliveryItem) -> DeliveryResult:
        assert self.context is not None and self.store is not None
        piece = item.classification
        if item.address or not isinstance(piece, FragmentPiece) or item.reassembled:
            self.context.count("FragmentRefused")
            self.log.warn("Dropping a {kind} FRAGMENT item: only plaintext fragments with empty "
                          "routing info are reassembled", kind=item.kind)
            return DeliveryResult.NORETRY
        today = midnight(self.context.now())
        fragment = piece.fragment
        result = self.reassembler.add(fragment, today)
        mid = result.message_id
        entry: Optional[OutboxEntry] = None
        try:
            entry = self._persist(mid, result, fragment, today)
        except BaseException:
            # Memory ran ahead of the file: go back to what was committed.
            self.reassembler = self.store.load(self.max_size + PREFIX_ALLOWANCE)
            raise
        self.context.count(f"Fragment{result.outcome.name.title()}")
        if result.outcome is Outcome.REJECTED:
            self.log.warn("Rejected a fragmented message: inconsistent or too large fragments")
            return DeliveryResult.NORETRY
        if entry is not None:
            await self._hand_off(entry)
        return DeliveryResult.OK

    def _persist(self, mid: bytes, result, fragment, today: int) -> Optional[OutboxEntry]:
        """Commit what :meth:`Reassembler.add` just did."""
        assert self.store is not None
        entry: Optional[OutboxEntry] = None
        with self.store.transaction():
            if result.outcome is Outcome.STORED:
                state = self.reassembler.pending[mid]
                chunk, pos = state.params.locate(fragment.index)
                self.store.save_message(mid, state)
                if chunk in state.chunks:
                    self.store.save_chunk(mid, chunk, state.chunks[chunk])
                else:
                    self.store.save_fragment(mid, chunk, pos, fragment.data)
            elif result.outcome is Outcome.REJECTED:
                self.store.delete_message(mid)
                self.store.set_status(mid, REJECTED, today)
            elif result.outcome is Outcome.COMPLETED:
                assert result.message is not None
                entry = self._completed(mid, result.message, today)
        return entry

    def _completed(self, mid: bytes, message: bytes, today: int) -> Optional[OutboxEntry]:
        """Inside the transaction: the message is whole; queue or reject it."""
        assert self.store is not None and self.context is not None
        self.store.delete_message(mid)
        try:
            exit_type, address, compressed = parse_server_side_message(message)
        except ParseError:
            reason = "malformed"
            compressed = b""
        else:
            reason = "too large" if len(compressed) > self.max_size else ""
        if reason:
            self.reassembler.reject(mid, today)
            self.store.set_status(mid, REJECTED, today)
            self.context.count("FragmentMessageRejected")
            self.log.warn("Dropping a reassembled message: {reason}", reason=reason)
            return None
        self.store.set_status(mid, COMPLETED, today)
        now = self.context.now()
        entry_id = self.store.add_outbox(exit_type, address, compressed, now)
        self.log.info("Reassembled a message of {size} compressed bytes", size=len(compressed))
        return OutboxEntry(entry_id, exit_type, address, compressed, now, None)

    async def _hand_off(self, entry: OutboxEntry) -> None:
        """Give a reassembled message to the module of its real exit type."""
        assert self.store is not None and self.context is not None
        if entry.id in self._in_flight:
            return
        self._in_flight.add(entry.id)
        try:
            started = self.context.now()
            item = make_reassembled_item(entry.exit_type, entry.address, entry.compressed, entry.queued_at)
            dispatcher = self.context.dispatcher
            if dispatcher is None:
                result = DeliveryResult.RETRY
                self.log.warn("No dispatcher to hand a reassembled message to; keeping it")
            else:
                result = await dispatcher.deliver(item)
            with self.store.transaction():
                if result is DeliveryResult.RETRY:
                    schedule = self._schedule_for(entry.exit_type)
                    if is_ready(started, entry.queued_at, schedule, started) is None:
                        self.store.delete_outbox(entry.id)
                        self.context.count("FragmentGaveUp")
                        self.log.warn("Giving up on a reassembled message after its last retry")
                    else:
                        self.store.mark_attempt(entry.id, started)
                else:
                    self.store.delete_outbox(entry.id)
        finally:
            self._in_flight.discard(entry.id)

    def _schedule_for(self, exit_type: int) -> list[int]:
        dispatcher = self.context.dispatcher if self.context is not None else None
        module = dispatcher.module_for(exit_type) if dispatcher is not None else None
        schedule = getattr(module, "retry_schedule", None)
        return list(schedule) if schedule else list(DEFAULT_SCHEDULE)

    # -- each round ----------------------------------------------------------------

    def flush(self) -> defer.Deferred:
        return defer.ensureDeferred(self._flush())

    async def _flush(self) -> None:
        assert self.store is not None and self.context is not None
        now = self.context.now()
        self.expire(now)
        for entry in self.store.outbox():
            if is_ready(entry.last_attempt, entry.queued_at, self._schedule_for(entry.exit_type), now):
                await self._hand_off(entry)

    def expire(self, now: float) -> list[bytes]:
        """Reject messages whose first fragment came before UTC midnight of
        today minus ``MaximumInterval``; forget the marks of messages older
        than twice that (their fragments would be stale by then)."""
        assert self.store is not None and self.context is not None
        today = midnight(now)
        cutoff = today - self.max_interval
        expired = self.reassembler.expire(cutoff, today)
        forgotten = self.reassembler.forget_status(cutoff - self.max_interval - DAY)
        if expired or forgotten:
            with self.store.transaction():
                for mid in expired:
                    self.store.delete_message(mid)
                    self.store.set_status(mid, REJECTED, today)
                for mid in forgotten:
                    self.store.delete_status(mid)
        if expired:
            self.context.count("FragmentExpired", len(expired))
            self.log.info("Expired {n} incomplete fragmented messages", n=len(expired))
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
