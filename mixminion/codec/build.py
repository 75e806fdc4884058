"""Building packets on the client side (spec: packet.md §7, §15.3, §16, §17;
fragments.md §1-§2).

Every builder takes its randomness from ``rng`` and draws it in the
reference's order (packet.md §8), so a seeded ``rng`` reproduces packets
exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

from mixminion.codec import crypto
from mixminion.codec.compression import compress
from mixminion.codec.crypto import RandomSource
from mixminion.codec.errors import BuildError, ParseError
from mixminion.codec.exit_headers import encode_headers
from mixminion.codec.fragments import fragment_message, server_side_prefix
from mixminion.codec.header import SECRET_LEN, Hop, build_header, check_header_room, leg_routing
from mixminion.codec.packet import PAYLOAD_LEN, assemble_packet
from mixminion.codec.payload import ENC_FWD_OVERHEAD, encode_singleton, max_singleton_size
from mixminion.codec.routing import (
    DROP_TYPE,
    FRAGMENT_TYPE,
    MIN_EXIT_TYPE,
    SMTP_TYPE,
    TAG_LEN,
    TAGLESS_EXIT_TYPES,
    check_smtp_address,
    make_tag,
    type_name,
)
from mixminion.codec.rsa import OAEP_OVERHEAD, PublicKey
from mixminion.codec.surb import ReplyBlock

Path = Sequence[Hop]


@dataclass(frozen=True)
class BuiltPacket:
    """A packet ready for its first hop, with the handle its exit will see."""

    packet: bytes
    first_hop: Hop
    tag: bytes


def _secrets(rng: RandomSource, count: int) -> list[bytes]:
    return [rng(SECRET_LEN) for _ in range(count)]


def _check_exit(exit_type: int) -> None:
    if exit_type != DROP_TYPE and not MIN_EXIT_TYPE <= exit_type <= 0xFFFF:
        raise BuildError(f"exit type 0x{exit_type:04x} is neither DROP nor an exit type")


def _two_legs(
    payload: bytes,
    path1: Path,
    path2: Path,
    exit_type: int,
    exit_info: bytes,
    rng: RandomSource,
) -> bytes:
    """Secrets, both headers and the packet, in the reference's draw order."""
    if not path1 or not path2:
        raise BuildError("forward packets need two non-empty legs")
    secrets1 = _secrets(rng, len(path1))
    secrets2 = _secrets(rng, len(path2))
    header2 = build_header(leg_routing(path2, exit_type, exit_info), secrets2, rng)
    swap = path2[0]
    header1 = build_header(leg_routing(path1, swap.swap_type, swap.address.pack()), secrets1, rng)
    return assemble_packet(header1, header2, payload, secrets1, secrets2)


def build_forward_packet(
    payload: bytes,
    path1: Path,
    path2: Path,
    exit_type: int,
    exit_address: bytes,
    rng: RandomSource,
    *,
    tagged: Optional[bool] = None,
) -> BuiltPacket:
    """A plaintext forward packet (§7.1).

    DROP, FRAGMENT and PING exits carry no decoding handle, every other
    exit a random one; ``tagged`` may only confirm that, since an exit
    refuses a packet whose routing info does not match its type.
    """
    _check_exit(exit_type)
    if len(payload) != PAYLOAD_LEN:
        raise BuildError(f"payload must be {PAYLOAD_LEN} bytes")
    wants_tag = exit_type != DROP_TYPE and exit_type not in TAGLESS_EXIT_TYPES
    if tagged is not None and tagged != wants_tag:
        raise BuildError(f"exit type {type_name(exit_type)} "
                         f"{'needs' if wants_tag else 'takes no'} decoding handle")
    tag = make_tag(rng) if wants_tag else b""
    packet = _two_legs(payload, path1, path2, exit_type, tag + exit_address, rng)
    return BuiltPacket(packet, path1[0], tag)


def build_dummy_packet(path1: Path, path2: Path, rng: RandomSource) -> BuiltPacket:
    """A DROP packet with a random payload: looks like traffic until its exit."""
    return build_forward_packet(rng(PAYLOAD_LEN), path1, path2, DROP_TYPE, b"", rng)


def build_encrypted_forward_packet(
    payload: bytes,
    recipient: PublicKey,
    path1: Path,
    path2: Path,
    exit_type: int,
    exit_address: bytes,
    rng: RandomSource,
) -> BuiltPacket:
    """A forward packet whose payload only ``recipient`` can read (§16).

    ``payload`` is an encoded payload of 28634 bytes (overhead 38).
    """
    _check_exit(exit_type)
    if len(payload) != PAYLOAD_LEN - ENC_FWD_OVERHEAD:
        raise BuildError("encrypted-forward payloads are 28634 bytes")
    k = recipient.size_bytes
    if k < OAEP_OVERHEAD + SECRET_LEN:
        raise BuildError("recipient key too small for end-to-end encryption")
    session_key = rng(SECRET_LEN)
    whole = session_key + payload
    head, tail = whole[:k - OAEP_OVERHEAD], whole[k - OAEP_OVERHEAD:]
    while True:
        rsa_part = recipient.encrypt(head, rng)
        if rsa_part[0] & 0x80 == 0:
            break
    tail = crypto.lioness_encrypt(tail, crypto.lioness_keys(session_key,
                                                            crypto.END_TO_END_ENCRYPT_MODE))
    wrapped = rsa_part + tail
    tag, body = wrapped[:TAG_LEN], wrapped[TAG_LEN:]
    packet = _two_legs(body, path1, path2, exit_type, tag + exit_address, rng)
    return BuiltPacket(packet, path1[0], tag)


def build_reply_packet(
    payload: bytes, path1: Path, reply_block: ReplyBlock, rng: RandomSource
) -> BuiltPacket:
    """Answer through a SURB (§15.3): leg 1 is ours, leg 2 is the SURB."""
    if len(payload) != PAYLOAD_LEN:
        raise BuildError(f"payload must be {PAYLOAD_LEN} bytes")
    if not path1:
        raise BuildError("a reply needs at least one hop before the reply block")
    payload = crypto.lioness_decrypt(payload, crypto.lioness_keys(reply_block.key,
                                                                  crypto.PAYLOAD_ENCRYPT_MODE))
    secrets1 = _secrets(rng, len(path1))
    header1 = build_header(
        leg_routing(path1, reply_block.routing_type, reply_block.routing_info), secrets1, rng)
    packet = assemble_packet(header1, reply_block.header, payload, secrets1, None)
    return BuiltPacket(packet, path1[0], b"")


# --- messages: compression, headers, fragmentation ------------------------


def encode_message_payloads(
    body: bytes,
    rng: RandomSource,
    *,
    headers: Optional[Mapping[str, str]] = None,
    overhead: int = 0,
    exit_type: Optional[int] = None,
    exit_address: bytes = b"",
) -> list[bytes]:
    """Encode a message into one singleton payload or several fragments.

    The exit header block (always present, possibly empty) precedes the
    body before compression.  When the message must be fragmented and
    ``exit_type`` is given, the fragments carry the server-side prefix so
    the exit can reassemble and deliver it (fragments.md §1 way 1).
    """
    compressed = compress(encode_headers(headers or {}) + body)
    if len(compressed) <= max_singleton_size(overhead):
        return [encode_singleton(compressed, rng, overhead)]
    prefix = b"" if exit_type is None else server_side_prefix(exit_type, exit_address)
    return fragment_message(prefix + compressed, rng, overhead)


PathChooser = Callable[[int], tuple[Path, Path]]


def build_message_packets(
    body: bytes,
    exit_type: int,
    exit_address: bytes,
    paths: PathChooser,
    rng: RandomSource,
    *,
    headers: Optional[Mapping[str, str]] = None,
) -> list[BuiltPacket]:
    """All packets of a plaintext forward message.

    ``paths(i)`` gives the two legs of packet ``i``; for a fragmented
    message every leg 2 must end at the same exit, which reassembles.
    """
    _check_exit(exit_type)
    if exit_type == SMTP_TYPE:
        try:
            check_smtp_address(exit_address)
        except ParseError as exc:
            raise BuildError(f"cannot send to that address: {exc}") from None
    payloads = encode_message_payloads(body, rng, headers=headers, exit_type=exit_type,
                                       exit_address=exit_address)
    if len(payloads) == 1:
        path1, path2 = paths(0)
        return [build_forward_packet(payloads[0], path1, path2, exit_type, exit_address, rng)]
    built, exits = [], set()
    for i, payload in enumerate(payloads):
        path1, path2 = paths(i)
        exits.add(path2[-1].address)
        built.append(build_forward_packet(payload, path1, path2, FRAGMENT_TYPE, b"", rng))
    if len(exits) != 1:
        raise BuildError("all fragments of a message must reach the same exit")
    return built


def check_path_fits(path1: Path, path2: Path, exit_info_len: int) -> None:
    """Fail early when a path cannot fit in the two headers."""
    sizes1 = [84 + len(h.address.pack()) for h in path1[1:]] + [84 + len(path2[0].address.pack())]
    sizes2 = [84 + len(h.address.pack()) for h in path2[1:]] + [84 + exit_info_len]
    check_header_room(sizes1)
    check_header_room(sizes2)
