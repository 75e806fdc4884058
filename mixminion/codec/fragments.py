"""Fragmentation, FEC and reassembly of large messages (spec: fragments.md).

A message too large for one payload is whitened (an all-or-nothing
transform), padded, cut into chunks of ``k`` blocks, and each chunk is
expanded to ``n`` FEC fragments of which any ``k`` recover it.  The FEC code
is Rizzo's Vandermonde code as packaged by ``zfec`` (byte-identical to the
reference for every ``(k, n)`` it uses).

The :class:`Reassembler` is a pure state machine: the caller feeds it parsed
fragments together with the receiving identity and a day number, and
persists its plain-data state (see :meth:`Reassembler.snapshot`).
"""

from __future__ import annotations

import enum
import math
import struct
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import zfec

from mixminion.codec.crypto import RandomSource, unwhiten, whiten
from mixminion.codec.errors import BuildError, ParseError
from mixminion.codec.payload import (
    ENC_FWD_OVERHEAD,
    FRAGMENT_OVERHEAD,
    MAX_FRAGMENT_INDEX,
    MAX_MESSAGE_LEN,
    MESSAGE_ID_LEN,
    OVERHEADS,
    PAYLOAD_LEN,
    FragmentPayload,
    encode_fragment,
    parse_payload,
)

#: largest k
MAX_FRAGMENTS_PER_CHUNK = 16
#: the reference's n = ceil(EXP_FACTOR * k)
EXP_FACTOR = 1.3333333333333333
SSF_PREFIX_LEN = 4
#: limits of the FEC code: 1 <= k <= n <= 255
MAX_FEC_N = 255

_SSF = struct.Struct(">HH")


# --- parameters (fragments.md §3) ------------------------------------------


@dataclass(frozen=True)
class FragmentParams:
    """How a message of ``length`` bytes is cut up (fragments.md §3)."""

    length: int
    overhead: int
    capacity: int
    k: int
    n: int
    chunks: int
    chunk_size: int
    padded_length: int
    padding_length: int

    @classmethod
    def for_message(cls, length: int, overhead: int = 0) -> "FragmentParams":
        if overhead not in OVERHEADS:
            raise BuildError(f"overhead must be 0 or {ENC_FWD_OVERHEAD}")
        if not 1 <= length <= MAX_MESSAGE_LEN:
            raise BuildError(f"message length {length} out of range")
        cap = PAYLOAD_LEN - FRAGMENT_OVERHEAD - overhead
        min_fragments = -(-length // cap)
        k = 2
        while k < min_fragments and k < MAX_FRAGMENTS_PER_CHUNK:
            k *= 2
        chunks = -(-min_fragments // k)
        n = int(math.ceil(EXP_FACTOR * k))
        chunk_size = k * cap
        padded = chunks * chunk_size
        return cls(length, overhead, cap, k, n, chunks, chunk_size, padded, padded - length)

    @property
    def fragment_count(self) -> int:
        """Packets needed to send every fragment."""
        return self.chunks * self.n

    def locate(self, index: int) -> tuple[int, int]:
        """``(chunk, position in chunk)`` of fragment ``index``."""
        return divmod(index, self.n)


# --- FEC (fragments.md §4) -------------------------------------------------


def _check_fec(k: int, n: int) -> None:
    if not 1 <= k <= n <= MAX_FEC_N:
        raise BuildError(f"invalid FEC parameters k={k}, n={n} (need 1 <= k <= n <= 255)")


def fec_encode(blocks: Sequence[bytes], n: int, indices: Optional[Sequence[int]] = None) -> list[bytes]:
    """The ``n`` fragments (or those at ``indices``) of ``k`` equal blocks."""
    k = len(blocks)
    _check_fec(k, n)
    if len({len(b) for b in blocks}) != 1:
        raise BuildError("FEC blocks must all have the same length")
    wanted = list(range(n)) if indices is None else list(indices)
    if any(not 0 <= i < n for i in wanted):
        raise BuildError("FEC fragment index out of range")
    return [bytes(b) for b in zfec.Encoder(k, n).encode(tuple(bytes(b) for b in blocks), wanted)]


def fec_decode(k: int, n: int, fragments: Iterable[tuple[int, bytes]]) -> list[bytes]:
    """The ``k`` data blocks from exactly ``k`` ``(index, fragment)`` pairs.

    Everything is checked first: zfec silently returns garbage for an
    out-of-range index and never returns for a repeated one.
    """
    _check_fec(k, n)
    pairs = sorted(fragments)
    indices = [i for i, _ in pairs]
    if len(pairs) != k:
        raise ParseError(f"FEC decoding needs exactly {k} fragments, got {len(pairs)}")
    if len(set(indices)) != k or any(not 0 <= i < n for i in indices):
        raise ParseError("FEC fragment indices must be distinct and below n")
    if len({len(b) for _, b in pairs}) != 1:
        raise ParseError("FEC fragments must all have the same length")
    blocks = zfec.Decoder(k, n).decode(tuple(bytes(b) for _, b in pairs), indices)
    return [bytes(b) for b in blocks]


# --- sender (fragments.md §2) ----------------------------------------------


def server_side_prefix(routing_type: int, routing_info: bytes) -> bytes:
    """``u16 RT || u16 len(RI) || RI``: the real exit, carried inside the
    message when the exit server reassembles (type first, then length)."""
    if not 0 <= routing_type <= 0xFFFF:
        raise BuildError("routing type must fit 16 bits")
    if len(routing_info) > 0xFFFF:
        raise BuildError("routing info too long for a server-side prefix")
    return _SSF.pack(routing_type, len(routing_info)) + routing_info


def parse_server_side_message(message: bytes) -> tuple[int, bytes, bytes]:
    """Split a reassembled server-side message into ``(RT, RI, compressed)``."""
    if len(message) < SSF_PREFIX_LEN:
        raise ParseError("server-side fragmented message shorter than its prefix")
    routing_type, rlen = _SSF.unpack_from(message)
    end = SSF_PREFIX_LEN + rlen
    if len(message) < end:
        raise ParseError("server-side fragmented message shorter than its routing info")
    return routing_type, message[SSF_PREFIX_LEN:end], message[end:]


def _take(rng: RandomSource, n: int, given: Optional[bytes], what: str) -> bytes:
    value = rng(n) if given is None else given
    if len(value) != n:
        raise BuildError(f"{what} must be {n} bytes, not {len(value)}")
    return value


def fragment_message(
    message: bytes,
    rng: RandomSource,
    overhead: int = 0,
    message_id: Optional[bytes] = None,
    padding: Optional[bytes] = None,
) -> list[bytes]:
    """Every fragment payload of ``message`` (= prefix || compressed), in
    index order.  Randomness is drawn as the reference does: the 20-byte
    message id first, then the padding; either can be given instead."""
    params = FragmentParams.for_message(len(message), overhead)
    if params.length <= params.capacity:
        raise BuildError("a message that fits one fragment must not be fragmented")
    if params.fragment_count - 1 > MAX_FRAGMENT_INDEX:
        raise BuildError("message needs more fragments than indices allow")
    msgid = _take(rng, MESSAGE_ID_LEN, message_id, "message id")
    pad = _take(rng, params.padding_length, padding, "padding")
    whitened = whiten(message) + pad
    payloads: list[bytes] = []
    encoder = zfec.Encoder(params.k, params.n)
    all_indices = list(range(params.n))
    cap = params.capacity
    for ch in range(params.chunks):
        base = ch * params.chunk_size
        blocks = tuple(whitened[base + i * cap : base + (i + 1) * cap] for i in range(params.k))
        for j, data in enumerate(encoder.encode(blocks, all_indices)):
            payloads.append(encode_fragment(ch * params.n + j, msgid, params.length, bytes(data)))
    return payloads


# --- reassembly (fragments.md §5) ------------------------------------------


COMPLETED = "COMPLETED"
REJECTED = "REJECTED"


class Outcome(enum.Enum):
    """What :meth:`Reassembler.add` did with a fragment."""

    STORED = "stored"  # kept; the message is not complete yet
    UNNEEDED = "unneeded"  # duplicate, or its chunk is already decoded
    DROPPED = "dropped"  # the message is already COMPLETED or REJECTED
    REJECTED = "rejected"  # inconsistent with the message: all of it discarded
    COMPLETED = "completed"  # this fragment completed the message


@dataclass(frozen=True)
class AddResult:
    outcome: Outcome
    message_id: bytes
    #: the unwhitened, unpadded message (prefix || compressed) when completed
    message: Optional[bytes] = None


@dataclass
class PendingMessage:
    """State of one partly received message; plain data only.

    ``fragments`` maps chunk -> position -> fragment data for chunks not yet
    decoded; ``chunks`` maps chunk -> decoded chunk (``chunk_size`` bytes).
    """

    length: int
    overhead: int
    nym: Optional[str]
    day: int
    fragments: dict[int, dict[int, bytes]] = field(default_factory=dict)
    chunks: dict[int, bytes] = field(default_factory=dict)

    @property
    def params(self) -> FragmentParams:
        return FragmentParams.for_message(self.length, self.overhead)


class Reassembler:
    """Per-message reassembly state (fragments.md §5.1-§5.2), no I/O.

    State (all plain data, see :meth:`snapshot`):

    * ``pending``: message id -> :class:`PendingMessage`;
    * ``status``: message id -> ``(COMPLETED | REJECTED, day)``; fragments of
      these messages are dropped until :meth:`forget_status` removes them.

    ``day`` is any monotonic day number chosen by the caller (e.g. days since
    the epoch of the UTC midnight before arrival); ``nym`` is the receiving
    identity (a client's SURB identity, ``None`` on a server).
    ``max_length``, if set, rejects messages declaring a larger ``MSGLEN`` at
    their first fragment instead of storing them (a local policy; the
    reference only checks the size once reassembled).
    """

    def __init__(self, max_length: Optional[int] = None) -> None:
        self.pending: dict[bytes, PendingMessage] = {}
        self.status: dict[bytes, tuple[str, int]] = {}
        self.max_length = max_length

    # -- feeding ------------------------------------------------------------

    def add_payload(self, payload: bytes, day: int, nym: Optional[str] = None) -> AddResult:
        """Parse a decrypted payload and :meth:`add` it; singletons and bad
        payloads raise :class:`ParseError` (or its ``ChecksumError``)."""
        parsed = parse_payload(payload)
        if not isinstance(parsed, FragmentPayload):
            raise ParseError("payload is a singleton, not a fragment")
        return self.add(parsed, day, nym)

    def add(self, fragment: FragmentPayload, day: int, nym: Optional[str] = None) -> AddResult:
        """Apply the rules of fragments.md §5.2 to one checked fragment."""
        mid = fragment.message_id
        if mid in self.status:
            return AddResult(Outcome.DROPPED, mid)
        state = self.pending.get(mid)
        if state is None:
            if self.max_length is not None and fragment.message_length > self.max_length:
                return self._reject(mid, day)
            state = PendingMessage(fragment.message_length, fragment.overhead, nym, day)
        elif (fragment.message_length, fragment.overhead, nym) != (state.length, state.overhead, state.nym):
            return self._reject(mid, day)
        params = state.params
        chunk, pos = params.locate(fragment.index)
        if chunk >= params.chunks:
            return self._reject(mid, day)
        if chunk in state.chunks:
            return AddResult(Outcome.UNNEEDED, mid)
        stored = state.fragments.setdefault(chunk, {})
        if pos in stored:
            if stored[pos] != fragment.data:
                return self._reject(mid, day)
            return AddResult(Outcome.UNNEEDED, mid)
        stored[pos] = fragment.data
        self.pending[mid] = state
        if len(stored) >= params.k:
            blocks = fec_decode(params.k, params.n, stored.items())
            state.chunks[chunk] = b"".join(blocks)
            del state.fragments[chunk]
        if len(state.chunks) < params.chunks:
            return AddResult(Outcome.STORED, mid)
        joined = b"".join(state.chunks[c] for c in range(params.chunks))
        del self.pending[mid]
        self.status[mid] = (COMPLETED, day)
        return AddResult(Outcome.COMPLETED, mid, unwhiten(joined[: params.length]))

    def _reject(self, mid: bytes, day: int) -> AddResult:
        self.reject(mid, day)
        return AddResult(Outcome.REJECTED, mid)

    # -- status and expiry --------------------------------------------------

    def reject(self, message_id: bytes, day: int) -> None:
        """Discard a message and drop its future fragments (also for a
        completed message the caller could not deliver)."""
        self.pending.pop(message_id, None)
        self.status[message_id] = (REJECTED, day)

    def status_of(self, message_id: bytes) -> Optional[str]:
        """``COMPLETED``, ``REJECTED``, ``"PENDING"`` or ``None`` (unknown)."""
        if message_id in self.status:
            return self.status[message_id][0]
        return "PENDING" if message_id in self.pending else None

    def missing(self, message_id: bytes) -> int:
        """How many more fragments a pending message needs at least."""
        state = self.pending[message_id]
        params = state.params
        return sum(
            params.k - len(state.fragments.get(c, {}))
            for c in range(params.chunks)
            if c not in state.chunks
        )

    def expire(self, before_day: int, today: Optional[int] = None) -> list[bytes]:
        """Reject pending messages whose first fragment came before
        ``before_day``; their status is recorded at ``today`` (default
        ``before_day``).  Returns their ids."""
        when = before_day if today is None else today
        old = [mid for mid, st in self.pending.items() if st.day < before_day]
        for mid in old:
            self.reject(mid, when)
        return old

    def forget_status(self, before_day: int) -> list[bytes]:
        """Forget COMPLETED/REJECTED marks recorded before ``before_day``, so
        the status table does not grow forever."""
        old = [mid for mid, (_, d) in self.status.items() if d < before_day]
        for mid in old:
            del self.status[mid]
        return old

    # -- persistence --------------------------------------------------------

    def snapshot(self) -> dict:
        """The whole state as plain dicts, ints, strings and bytes."""
        return {
            "max_length": self.max_length,
            "status": {mid: list(v) for mid, v in self.status.items()},
            "pending": {
                mid: {
                    "length": st.length,
                    "overhead": st.overhead,
                    "nym": st.nym,
                    "day": st.day,
                    "fragments": {c: dict(f) for c, f in st.fragments.items()},
                    "chunks": dict(st.chunks),
                }
                for mid, st in self.pending.items()
            },
        }

    @classmethod
    def restore(cls, state: dict) -> "Reassembler":
        """Inverse of :meth:`snapshot`."""
        r = cls(state.get("max_length"))
        r.status = {mid: (v[0], v[1]) for mid, v in state["status"].items()}
        for mid, st in state["pending"].items():
            r.pending[mid] = PendingMessage(
                st["length"], st["overhead"], st["nym"], st["day"],
                {c: dict(f) for c, f in st["fragments"].items()}, dict(st["chunks"]),
            )
        return r


def reassemble(fragments: Iterable[FragmentPayload], nym: Optional[str] = None) -> bytes:
    """The message (prefix || compressed) of one complete set of fragments;
    raises :class:`ParseError` when they are inconsistent or not enough."""
    r = Reassembler()
    first: Optional[bytes] = None
    for frag in fragments:
        if first is None:
            first = frag.message_id
        elif frag.message_id != first:
            raise ParseError("fragments of different messages")
        result = r.add(frag, 0, nym)
        if result.outcome is Outcome.REJECTED:
            raise ParseError("inconsistent fragments")
        if result.outcome is Outcome.COMPLETED:
            assert result.message is not None
            return result.message
    raise ParseError("not enough fragments to reassemble the message")
