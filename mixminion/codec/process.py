"""Server-side processing of one packet (spec: packet.md §9, §10, §14).

A mix receives a 32768-byte packet, opens its own subheader with one of its
packet keys, checks it, records the replay value, and then either drops the
packet, hands the decrypted payload to an exit module, or re-forms the
packet for the next hop.  This module is pure: no clock, no I/O of its own
(the replay log it is given may write to disk), no Twisted.  Every defect of
the input is reported as a :class:`Reject`; nothing about the bytes can make
:meth:`PacketProcessor.process` raise.

The checks run in the order of the spec, and the order matters: the replay
value is recorded before the routing is looked at, so a packet rejected
afterwards still uses up its entry.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

from mixminion.codec.crypto import (
    APPLICATION_KEY_MODE,
    HEADER_ENCRYPT_MODE,
    HEADER_SECRET_MODE,
    PAYLOAD_ENCRYPT_MODE,
    RANDOM_JUNK_MODE,
    REPLAY_PREVENTION_MODE,
    ctr,
    derive_key,
    digests_equal,
    keys_from_header,
    keys_from_payload,
    lioness_decrypt,
    lioness_keys,
    prng,
    sha1,
)
from mixminion.codec.errors import CodecError, CryptoError
from mixminion.codec.header import (
    ENC_SUBHEADER_LEN,
    HEADER_LEN,
    MAJOR_NO,
    MAX_ROUTING_INFO_LEN,
    MINOR_NO,
    PER_HOP_OVERHEAD,
    SUBHEADER_LEN,
    SYMMETRIC_LEN,
    Subheader,
)
from mixminion.codec.packet import PACKET_LEN
from mixminion.codec.replay import ENTRY_LEN, ReplayLog
from mixminion.codec.routing import (
    DROP_TYPE,
    MIN_EXIT_TYPE,
    RELAY_TYPES,
    SWAP_TYPES,
    NextHop,
    RelayInfo,
    parse_relay_info,
    split_exit_info,
)
from mixminion.codec.rsa import PrivateKey

_H2_START = HEADER_LEN
_PAYLOAD_START = 2 * HEADER_LEN


def replay_value(secret: bytes) -> bytes:
    """``Key(s, "REPLAY PREVENTION", 20)``: what a replay log records for a
    subheader whose secret is ``secret`` (packet.md §10)."""
    return derive_key(secret, REPLAY_PREVENTION_MODE, ENTRY_LEN)


class RejectReason(enum.Enum):
    """Why a packet was refused.  Values are the reason codes of the
    known-answer vectors; ``description`` is for logs."""

    description: str

    BAD_PACKET_LENGTH = ("bad_packet_length", "packet is not 32768 bytes long")
    RSA_OAEP = ("rsa_oaep", "no packet key decrypts the first subheader")
    BAD_SUBHEADER_LENGTH = ("bad_subheader_length", "decrypted subheader is not 214 bytes")
    BAD_VERSION = ("bad_version", "subheader is not packet version 0.3")
    BAD_DIGEST = ("bad_digest", "header digest does not match")
    REPLAY = ("replay", "replay value already in the replay log")
    UNKNOWN_ROUTING_TYPE = ("unknown_routing_type", "routing type is neither relay, exit nor drop")
    BAD_ROUTING_INFO = ("bad_routing_info", "routing info does not parse for its type")

    def __new__(cls, code: str, description: str) -> "RejectReason":
        member = object.__new__(cls)
        member._value_ = code
        member.description = description
        return member


@dataclass(frozen=True, slots=True)
class Relay:
    """Send ``packet`` to the hop ``relay_info`` names.  ``routing_info`` is complete
    (overflow included) and ``subheader`` is as decrypted."""

    routing_type: int
    routing_info: bytes
    relay_info: RelayInfo
    packet: bytes = field(repr=False)
    subheader: Subheader = field(repr=False)
    key_index: int

    @property
    def next_hop(self) -> NextHop:
        return NextHop.of(self.relay_info)


@dataclass(frozen=True, slots=True)
class Exit:
    """Hand ``payload`` to the module for ``exit_type`` (packet.md §14).

    ``routing_info`` is all of it, tag included; ``tag``/``address`` are its
    split (an empty tag for FRAGMENT and PING)."""

    exit_type: int
    routing_info: bytes
    tag: bytes
    address: bytes
    application_key: bytes = field(repr=False)
    payload: bytes = field(repr=False)
    subheader: Subheader = field(repr=False)
    key_index: int


@dataclass(frozen=True, slots=True)
class Drop:
    """A dummy packet: discarded after its replay value was recorded."""

    subheader: Subheader = field(repr=False)
    key_index: int


@dataclass(frozen=True, slots=True)
class Reject:
    """A refused packet; ``subheader`` is set once one was decrypted and
    parsed (it holds the hop's secret: log it with care)."""

    reason: RejectReason
    subheader: Optional[Subheader] = field(default=None, repr=False)


ProcessResult = Union[Relay, Exit, Drop, Reject]

_REJECT_LENGTH = Reject(RejectReason.BAD_PACKET_LENGTH)
_REJECT_RSA = Reject(RejectReason.RSA_OAEP)
_REJECT_SUBHEADER_LENGTH = Reject(RejectReason.BAD_SUBHEADER_LENGTH)


@dataclass(frozen=True, slots=True)
class _Opened:
    """A packet whose subheader passed every check before the replay log."""

    packet: bytes
    subheader: Subheader
    key_index: int
    replay: bytes
    #: the routing result, worked out ahead by :meth:`PacketProcessor.open_batch`
    #: (pure, so it is only used once the replay log has said "fresh")
    routed: Optional[ProcessResult] = None


#: a packet after the checks before the replay log: opaque outside this module
OpenedPacket = Union[_Opened, Reject]


class PacketProcessor:
    """One server's packet keys, each with its own replay log (packet.md
    §9 step 2: during key rotation several keys are live, and the first one
    that decrypts the subheader is used together with *its* log)."""

    def __init__(self, keys: Sequence[tuple[PrivateKey, ReplayLog]]) -> None:
        if not keys:
            raise ValueError("a packet processor needs at least one packet key")
        for key, _ in keys:
            if key.size_bytes != ENC_SUBHEADER_LEN:
                raise ValueError("packet keys must be 2048-bit RSA keys")
        self._keys = tuple(key for key, _ in keys)
        self._logs = tuple(log for _, log in keys)

    def process(self, packet: bytes) -> ProcessResult:
        """Process one packet; the replay log has recorded (durably, if it is
        durable) the packet's replay value before this returns."""
        opened = self._open(packet)
        if isinstance(opened, Reject):
            return opened
        if self._logs[opened.key_index].seen_or_add(opened.replay):
            return Reject(RejectReason.REPLAY, opened.subheader)
        return self._route(opened)

    def process_batch(self, packets: Sequence[bytes]) -> list[ProcessResult]:
        """Process several packets with one replay-log call per key (one
        commit for a durable log), as if :meth:`process` had been called on
        each in order."""
        return self.finish_batch(self.open_batch(packets))

    def open_batch(self, packets: Sequence[bytes]) -> list[OpenedPacket]:
        """All the cryptography of each packet, with no log touched: the
        checks before the replay log (steps 1-6) and, for a packet that
        passes them, its routing as if it were fresh.  A server runs this
        before it takes the lock its durable log needs; :meth:`finish_batch`
        then consults the log and keeps the routing of the fresh packets
        only, so the results are those of :meth:`process`."""
        opened = []
        for packet in packets:
            item = self._open(packet)
            if isinstance(item, _Opened):
                item = _Opened(item.packet, item.subheader, item.key_index, item.replay,
                               self._route(item))
            opened.append(item)
        return opened

    def finish_batch(self, opened: Sequence[OpenedPacket]) -> list[ProcessResult]:
        """The rest of :meth:`process_batch` for what :meth:`open_batch`
        returned: one replay-log call per key, and the routing of the
        packets the logs had not seen."""
        by_key: dict[int, list[int]] = {}
        for pos, item in enumerate(opened):
            if isinstance(item, _Opened):
                by_key.setdefault(item.key_index, []).append(pos)
        seen: dict[int, bool] = {}
        for key_index, positions in by_key.items():
            entries = [opened[pos].replay for pos in positions]  # type: ignore[union-attr]
            flags = self._logs[key_index].seen_or_add_many(entries)
            seen.update(zip(positions, flags))
        results: list[ProcessResult] = []
        for pos, item in enumerate(opened):
            if isinstance(item, Reject):
                results.append(item)
            elif seen[pos]:
                results.append(Reject(RejectReason.REPLAY, item.subheader))
            else:
                results.append(item.routed if item.routed is not None else self._route(item))
        return results

    # --- checks before the replay log (steps 1-6) --------------------------

    def _open(self, packet: bytes) -> Union[_Opened, Reject]:
        if not isinstance(packet, bytes):
            packet = bytes(memoryview(packet))
        if len(packet) != PACKET_LEN:
            return _REJECT_LENGTH
        found = self._decrypt_subheader(packet[:ENC_SUBHEADER_LEN])
        if found is None:
            return _REJECT_RSA
        key_index, plaintext = found
        if len(plaintext) != SUBHEADER_LEN:
            return _REJECT_SUBHEADER_LENGTH
        sub = Subheader.parse(plaintext)
        if sub.major != MAJOR_NO or sub.minor != MINOR_NO:
            return Reject(RejectReason.BAD_VERSION, sub)
        if not digests_equal(sub.digest, sha1(packet[ENC_SUBHEADER_LEN:HEADER_LEN])):
            return Reject(RejectReason.BAD_DIGEST, sub)
        return _Opened(packet, sub, key_index, replay_value(sub.secret))

    def _decrypt_subheader(self, block: bytes) -> Optional[tuple[int, bytes]]:
        """The first key that OAEP-decrypts ``block``, and the plaintext."""
        for index, key in enumerate(self._keys):
            try:
                return index, key.decrypt(block)
            except CryptoError:
                continue
        return None

    # --- after the replay log (steps 8-20) -------------------------------

    def _route(self, opened: _Opened) -> ProcessResult:
        routing_type = opened.subheader.routing_type
        if routing_type == DROP_TYPE:
            return Drop(opened.subheader, opened.key_index)
        if routing_type >= MIN_EXIT_TYPE:
            return _exit(opened)
        if routing_type not in RELAY_TYPES:
            # Steps 9-14 cannot fail, so rejecting before them changes
            # nothing but the time spent.
            return Reject(RejectReason.UNKNOWN_ROUTING_TYPE, opened.subheader)
        return _relay(opened)


def _relay(opened: _Opened) -> ProcessResult:
    """Steps 9-14 and 16-20 for a relay type."""
    packet, sub = opened.packet, opened.subheader
    secret = sub.secret
    # X = CTR(HK, H1[256:] || PRNG(JK, 84 + RL)): the header minus this
    # hop's block, with junk appended to keep it 2048 bytes long.
    junk = prng(derive_key(secret, RANDOM_JUNK_MODE), PER_HOP_OVERHEAD + sub.routing_length)
    rest = ctr(derive_key(secret, HEADER_SECRET_MODE), packet[ENC_SUBHEADER_LEN:HEADER_LEN] + junk)
    info = sub.routing_info
    overflow = sub.routing_length - MAX_ROUTING_INFO_LEN
    if overflow > 0:
        info += rest[:overflow]
        rest = rest[overflow:]
    try:
        relay_info = parse_relay_info(sub.routing_type, info)
    except CodecError:
        # Parsing is step 19; nothing in between can fail, so doing it
        # before the LIONESS work gives the same answer sooner.
        return Reject(RejectReason.BAD_ROUTING_INFO, sub)
    header1 = sub.underflow + rest
    payload = lioness_decrypt(packet[_PAYLOAD_START:], lioness_keys(secret, PAYLOAD_ENCRYPT_MODE))
    header2 = lioness_decrypt(packet[_H2_START:_PAYLOAD_START],
                              lioness_keys(secret, HEADER_ENCRYPT_MODE))
    if sub.routing_type in SWAP_TYPES:
        payload = lioness_decrypt(payload, keys_from_header(header2))
        header2 = lioness_decrypt(header2, keys_from_payload(payload))
        header1, header2 = header2, header1
    return Relay(sub.routing_type, info, relay_info, b"".join((header1, header2, payload)),
                 sub, opened.key_index)


def _exit(opened: _Opened) -> ProcessResult:
    """Steps 12, 14 and 15 for an exit type: header 1's remainder is only
    decrypted as far as the routing info's overflow reaches."""
    packet, sub = opened.packet, opened.subheader
    secret = sub.secret
    info = sub.routing_info
    overflow = sub.routing_length - MAX_ROUTING_INFO_LEN
    if overflow > 0:
        info += _exit_overflow(packet, secret, overflow)
    try:
        tag, address = split_exit_info(sub.routing_type, info)
    except CodecError:
        # A tagged exit type needs 20 bytes of tag; the module would refuse
        # the packet (packet.md §14 step 3), so refuse it here.
        return Reject(RejectReason.BAD_ROUTING_INFO, sub)
    payload = lioness_decrypt(packet[_PAYLOAD_START:], lioness_keys(secret, PAYLOAD_ENCRYPT_MODE))
    return Exit(sub.routing_type, info, tag, address, derive_key(secret, APPLICATION_KEY_MODE),
                payload, sub, opened.key_index)


def _exit_overflow(packet: bytes, secret: bytes, length: int) -> bytes:
    """The first ``length`` bytes of step 11's ``X``."""
    header_key = derive_key(secret, HEADER_SECRET_MODE)
    if length <= SYMMETRIC_LEN:
        return ctr(header_key, packet[ENC_SUBHEADER_LEN:ENC_SUBHEADER_LEN + length])
    # A routing length beyond the header reaches into the junk; the
    # reference allows it, so do the same rather than invent a limit.
    junk = prng(derive_key(secret, RANDOM_JUNK_MODE), length - SYMMETRIC_LEN)
    return ctr(header_key, packet[ENC_SUBHEADER_LEN:HEADER_LEN] + junk)
