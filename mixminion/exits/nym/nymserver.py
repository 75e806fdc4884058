"""What the nymserver does (doc/nym.md §2-§4), synchronously, on its store.

The NYM exit module (:mod:`mixminion.exits.nym.module`) runs these
methods in a worker thread and does the I/O around them: it hands each
exit payload to :meth:`Nymserver.receive`, each mail from its SMTP
listener to :meth:`Nymserver.accept_mail`, and writes the packets
:meth:`Nymserver.next_delivery` builds to the node's incoming queue before
calling :meth:`Nymserver.delivered`.
"""

from __future__ import annotations

import email.parser
import email.policy
import email.utils
import enum
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from mixminion.codec.build import build_reply_packet, encode_message_payloads
from mixminion.codec.compression import decompress
from mixminion.codec.crypto import RandomSource
from mixminion.codec.decode import CorruptPayload, decode_encrypted
from mixminion.codec.errors import CodecError
from mixminion.codec.exit_headers import parse_message
from mixminion.codec.fragments import Outcome
from mixminion.codec.header import Hop
from mixminion.codec.payload import FragmentPayload, SingletonPayload, parse_payload
from mixminion.codec.rsa import PrivateKey
from mixminion.codec.surb import ReplyBlock
from mixminion.exits.fragment_store import DiskReassembler
from mixminion.exits.mail import one_line
from mixminion.exits.nym.store import RECEIVED, SENT, NameTaken, NymStore
from mixminion.nym.formats import (
    Command,
    Envelope,
    InvalidRequest,
    Kind,
    MalformedRequest,
    NymMessage,
    Policy,
    Request,
    parse_envelope,
)

DAY = 86400
HOUR = 3600
#: mail headers a nym's ``send`` keeps (doc/nym.md §2); From and the rest go
KEPT_HEADERS = ("Subject", "In-Reply-To", "References", "Content-Type",
                "Content-Transfer-Encoding", "MIME-Version")


@dataclass(frozen=True)
class NymSettings:
    """``[Delivery/Nym]``'s limits (doc/nym.md §4)."""

    domain: str
    max_nyms: int = 1000
    max_reply_blocks: int = 100
    max_message_size: int = 64 * 1024
    sends_per_day: int = 50
    incoming_per_hour: int = 60
    max_queued: int = 100
    max_queued_bytes: int = 10 * 1024 * 1024
    #: a reply block is not used this close to its expiry
    expiry_margin: int = HOUR

    @property
    def max_request(self) -> int:
        """Largest request, decompressed: the largest mail with room for
        headers, or 100 reply blocks (about 2.1 KB each)."""
        return max(2 * self.max_message_size, 256 * 1024)


class Handled(enum.Enum):
    """What became of an exit payload (counted per value)."""

    #: not a request to this nymserver's key, or damaged
    UNREADABLE = "unreadable"
    #: a fragment of a request that is not complete yet
    FRAGMENT = "fragment"
    #: refused without an answer (doc/nym.md §2): malformed, unknown nym,
    #: a signature that does not verify, a counter that is not new
    IGNORED = "ignored"
    #: refused with an answer that says why
    REFUSED = "refused"
    DONE = "done"


@dataclass(frozen=True)
class Result:
    outcome: Handled
    #: why (for the log, at DEBUG: it may name the nym)
    detail: str = ""
    #: an answer that must leave at once through blocks the store does not
    #: hold (a refused create, the answer to a delete)
    immediate: Optional["Delivery"] = None


@dataclass(frozen=True)
class Delivery:
    """One message for an owner, as packets through its reply blocks."""

    nym: str
    packets: tuple[bytes, ...]
    #: the outbox row and the stored reply blocks to remove once the
    #: packets are queued (None and () for an immediate answer)
    message_id: Optional[int] = None
    block_ids: tuple[int, ...] = ()


class Nymserver:
    """See the module docstring.  ``blocked(address)``: the SMTP exit's
    blacklist; ``own_hop()``: this node as the first leg of a reply (None
    while it has no valid descriptor: deliveries wait); ``rng``: entropy
    for packets and Message-IDs."""

    def __init__(self, store: NymStore, fragments: DiskReassembler, key: PrivateKey,
                 settings: NymSettings, blocked: Callable[[str], bool],
                 own_hop: Callable[[], Optional[Hop]], rng: RandomSource) -> None:
        self.own_hop = own_hop
        self.store = store
        self.fragments = fragments
        self.key = key
        self.settings = settings
        self.blocked = blocked
        self.rng = rng

    # --- requests ---------------------------------------------------------------------------

    def receive(self, tag: bytes, payload: bytes, now: float) -> Result:
        """An exit payload for the NYM type: decrypt, reassemble, handle."""
        try:
            plain = decode_encrypted(payload, tag, self.key)
        except CorruptPayload as exc:
            return Result(Handled.UNREADABLE, str(exc))
        if plain is None:
            return Result(Handled.UNREADABLE, "not encrypted to this nymserver's key")
        try:
            parsed = parse_payload(plain)
            if isinstance(parsed, FragmentPayload):
                with self.fragments.store.transaction():
                    added = self.fragments.add(parsed, int(now // DAY))
                if added.outcome is not Outcome.COMPLETED:
                    return Result(Handled.FRAGMENT, added.outcome.value)
                assert added.message is not None
                compressed = added.message
            else:
                assert isinstance(parsed, SingletonPayload)
                compressed = parsed.data[:parsed.size]
            message = decompress(compressed, self.settings.max_request)
        except CodecError as exc:
            return Result(Handled.UNREADABLE, f"the request does not decode: {exc}")
        _headers, body = parse_message(message)
        return self.handle(body, now)

    def handle(self, data: bytes, now: float) -> Result:
        """One whole request (doc/nym.md §2)."""
        try:
            envelope = parse_envelope(data)
        except MalformedRequest as exc:
            return Result(Handled.IGNORED, f"malformed: {exc}")
        if envelope.command is Command.CREATE:
            return self._create(envelope, now)
        record = self.store.get(envelope.nym)
        if record is None:
            return Result(Handled.IGNORED, f"{envelope.command.value} for an unknown nym")
        if not envelope.verifies(record.key):
            return Result(Handled.IGNORED, f"{envelope.command.value} for {envelope.nym}: "
                                           "the signature does not verify")
        with self.store.transaction():
            if not self.store.use_counter(envelope.nym, envelope.counter):
                return Result(Handled.IGNORED, f"{envelope.command.value} for {envelope.nym}: "
                                               f"counter {envelope.counter} is not new")
            try:
                request = envelope.request(int(now))
            except InvalidRequest as exc:
                self._answer(envelope.nym, envelope.counter, False, str(exc), now)
                return Result(Handled.REFUSED, str(exc))
            if request.command is Command.DELETE:
                return self._delete(request, now)
            done = {Command.ADD_SURBS: self._add_surbs, Command.SEND: self._send,
                    Command.CONFIG: self._config, Command.STATUS: self._status}
            return done[request.command](request, now)

    def _answer(self, nym: str, counter: int, ok: bool, text: str, now: float,
                body: bytes = b"") -> None:
        self.store.queue_answer(nym, counter, ok, "" if ok else text,
                                body or (text.encode("ascii", "replace") + b"\n" if ok else b""),
                                now)

    def _create(self, envelope: Envelope, now: float) -> Result:
        key = envelope.key
        assert key is not None  # parse_envelope checked it
        if not envelope.verifies(key):
            return Result(Handled.IGNORED, "create: the signature does not verify")
        try:
            request = envelope.request(int(now))
        except InvalidRequest as exc:
            # No reply blocks to answer through, or none that work.
            return Result(Handled.IGNORED, f"create: {exc}")
        reason = None
        if self.store.get(request.nym) is not None:
            reason = f"the name {request.nym} is taken"
        elif self.store.count() >= self.settings.max_nyms:
            reason = "this nymserver holds as many nyms as it takes"
        if reason is not None:
            refusal = NymMessage(request.nym, Kind.ANSWER, 0, 0, counter=request.counter,
                                 ok=False, reason=reason)
            return Result(Handled.REFUSED, reason, self._through(
                request.nym, refusal, [b.pack() for b in request.reply_blocks], now))
        try:
            with self.store.transaction():
                self.store.create(request.nym, key, request.counter,
                                  request.policy or Policy.HOLD, now)
                held = self._keep_blocks(request)
                self._answer(request.nym, request.counter, True,
                             f"created {request.nym}@{self.settings.domain} with {held} reply "
                             "blocks", now)
        except NameTaken:  # (only if two creates raced: the worker is one thread)
            return Result(Handled.IGNORED, f"create: the name {request.nym} is taken")
        return Result(Handled.DONE, f"created {request.nym}")

    def _keep_blocks(self, request: Request) -> int:
        return self.store.add_reply_blocks(
            request.nym, [(b.pack(), b.timestamp) for b in request.reply_blocks],
            self.settings.max_reply_blocks)

    def _add_surbs(self, request: Request, now: float) -> Result:
        held = self._keep_blocks(request)
        self._answer(request.nym, request.counter, True, f"{held} reply blocks held", now)
        return Result(Handled.DONE, f"add-surbs for {request.nym}")

    def _config(self, request: Request, now: float) -> Result:
        assert request.policy is not None
        self.store.set_policy(request.nym, request.policy)
        self._answer(request.nym, request.counter, True, f"policy {request.policy.value}", now)
        return Result(Handled.DONE, f"config for {request.nym}")

    def _status(self, request: Request, now: float) -> Result:
        record = self.store.get(request.nym)
        assert record is not None
        mails, size = self.store.mails_waiting(request.nym)
        held = self.store.count_reply_blocks(request.nym, self._usable_after(now))
        sent = self.store.usage(request.nym, SENT, int(now // DAY))
        lines = [f"Nym: {request.nym}@{self.settings.domain}",
                 f"Policy: {record.policy.value}",
                 f"Created: {email.utils.formatdate(record.created, usegmt=True)}",
                 f"Reply blocks held: {held}",
                 f"Mails waiting: {mails} ({size} bytes)",
                 f"Mails sent today: {sent} of {self.settings.sends_per_day}"]
        self._answer(request.nym, request.counter, True, "status", now,
                     body="\n".join(lines).encode("ascii") + b"\n")
        return Result(Handled.DONE, f"status for {request.nym}")

    def _delete(self, request: Request, now: float) -> Result:
        blocks = [packed for _id, packed in
                  self.store.reply_blocks(request.nym, self._usable_after(now))]
        answer = NymMessage(request.nym, Kind.ANSWER, 0, 0, counter=request.counter,
                            body=f"deleted {request.nym}@{self.settings.domain}\n".encode())
        self.store.delete(request.nym)
        return Result(Handled.DONE, f"deleted {request.nym}",
                      self._through(request.nym, answer, blocks, now))

    def _send(self, request: Request, now: float) -> Result:
        settings = self.settings
        day = int(now // DAY)
        reason = None
        if len(request.mail) > settings.max_message_size:
            reason = f"the mail is larger than {settings.max_message_size} bytes"
        elif self.store.usage(request.nym, SENT, day) >= settings.sends_per_day:
            reason = f"this nym sent {settings.sends_per_day} mails today already"
        allowed = [r for r in request.recipients if not self.blocked(r)]
        refused = [r for r in request.recipients if self.blocked(r)]
        if reason is None and not allowed:
            reason = "every recipient is on this nymserver's blacklist"
        if reason is not None:
            self._answer(request.nym, request.counter, False, reason, now)
            return Result(Handled.REFUSED, reason)
        text = self.compose(request.nym, allowed, request.mail, now)
        self.store.add_mail_out(request.nym, allowed, text, now)
        self.store.use(request.nym, SENT, day)
        summary = f"sent to {len(allowed)} recipient(s)"
        if refused:
            summary += "; not sent to (blacklisted): " + ", ".join(refused)
        self._answer(request.nym, request.counter, True, summary, now)
        return Result(Handled.DONE, f"send for {request.nym}")

    def compose(self, nym: str, recipients: Sequence[str], mail: bytes, now: float) -> bytes:
        """The mail as it leaves: From the nym, the kept headers of the
        owner's, a Date and a Message-ID of ours (doc/nym.md §2)."""
        parsed = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(mail)
        address = f"{nym}@{self.settings.domain}"
        lines = [f"From: {address}", "To: " + ", ".join(recipients),
                 f"Date: {email.utils.formatdate(now, usegmt=True)}",
                 f"Message-ID: <{self.rng(12).hex()}@{self.settings.domain}>"]
        for name in KEPT_HEADERS:
            value = parsed.get(name)
            if value is not None:
                lines.append(f"{name}: {one_line(str(value), 900)}")
        body = parsed.get_payload(decode=False)
        if not isinstance(body, str):
            body = ""
        text = "\n".join(lines) + "\n\n" + body
        return text.encode("utf-8", "replace")

    # --- mail for a nym ----------------------------------------------------------------------

    def check_recipient(self, name: str, now: float) -> Optional[tuple[int, str]]:
        """Whether mail for ``name`` is taken now: None, or the SMTP answer
        that refuses it (code, text)."""
        record = self.store.get(name)
        if record is None:
            return 550, "no such nym here"
        if self.store.usage(name, RECEIVED, int(now // HOUR)) >= self.settings.incoming_per_hour:
            return 452, "this nym takes no more mail this hour; try later"
        if record.policy is Policy.DROP and not self.store.count_reply_blocks(
                name, self._usable_after(now)):
            return 550, "this nym has no reply block left and does not hold mail"
        count, size = self.store.mails_waiting(name)
        if count >= self.settings.max_queued or size >= self.settings.max_queued_bytes:
            return 452, "this nym holds as much mail as it can; try later"
        return None

    def accept_mail(self, name: str, text: bytes, now: float) -> Optional[tuple[int, str]]:
        """Keep a mail for ``name`` (durably) unless the checks, made again
        in the same transaction, refuse it now."""
        if len(text) > self.settings.max_message_size:
            return 552, f"a mail for a nym is at most {self.settings.max_message_size} bytes"
        with self.store.transaction():
            refusal = self.check_recipient(name, now)
            if refusal is not None:
                return refusal
            self.store.queue_mail(name, text, now)
            self.store.use(name, RECEIVED, int(now // HOUR))
        return None

    # --- deliveries ---------------------------------------------------------------------------

    def _usable_after(self, now: float) -> int:
        return int(now) + self.settings.expiry_margin

    def next_delivery(self, name: str, now: float) -> Optional[Delivery]:
        """The nym's first waiting message as packets, if it has reply
        blocks enough; None otherwise (it waits)."""
        waiting = self.store.waiting(name)
        own_hop = self.own_hop()
        if not waiting or own_hop is None:
            return None
        first = waiting[0]
        blocks = self.store.reply_blocks(name, self._usable_after(now))
        mails_after = sum(1 for m in waiting if m.kind is Kind.MAIL) - (first.kind is Kind.MAIL)
        k = 1
        for _ in range(3):  # the count of blocks left is in the message: settle its size
            message = NymMessage(name, first.kind, max(0, len(blocks) - k), mails_after,
                                 counter=first.counter, ok=first.ok, reason=first.reason,
                                 body=first.body)
            payloads = encode_message_payloads(message.to_bytes(), self.rng)
            if len(payloads) == k:
                break
            k = len(payloads)
        if k > len(blocks) or len(payloads) != k:
            return None
        used = blocks[:k]
        packets = tuple(build_reply_packet(p, [own_hop], ReplyBlock.parse(packed), self.rng).packet
                        for p, (_id, packed) in zip(payloads, used))
        return Delivery(name, packets, first.id, tuple(i for i, _ in used))

    def _through(self, name: str, message: NymMessage, blocks: Sequence[bytes],
                 now: float) -> Optional["Delivery"]:
        """An answer that leaves at once through ``blocks``, which the store
        does not hold (None if they are too few, or expire too soon, or this
        node has no descriptor now)."""
        parsed = [ReplyBlock.parse(b) for b in blocks]
        usable = [b for b in parsed if b.timestamp > self._usable_after(now)]
        payloads = encode_message_payloads(message.to_bytes(), self.rng)
        own_hop = self.own_hop()
        if len(payloads) > len(usable) or own_hop is None:
            return None
        return Delivery(name, tuple(build_reply_packet(p, [own_hop], b, self.rng).packet
                                    for p, b in zip(payloads, usable)))

    def delivered(self, delivery: Delivery) -> None:
        """The packets are in the node's incoming queue: the message and
        the reply blocks they used are gone."""
        if delivery.message_id is not None:
            self.store.sent_to_owner(delivery.message_id, delivery.block_ids)
