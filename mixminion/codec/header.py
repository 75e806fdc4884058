"""Subheaders and header construction (spec: packet.md §3, §6).

A header is 2048 bytes: one RSA-OAEP block per hop, each hiding the hop's
secret, a digest of the rest of the header, and its routing; every hop
peels its block and appends junk, so the client precomputes that junk to
make each hop's digest check.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Optional, Sequence

from mixminion.codec import crypto
from mixminion.codec.crypto import RandomSource
from mixminion.codec.errors import BuildError, ParseError
from mixminion.codec.routing import (
    FWD_HOST_TYPE,
    FWD_IPV4_TYPE,
    SWAP_FWD_HOST_TYPE,
    SWAP_FWD_IPV4_TYPE,
    IPv4Info,
    RelayInfo,
)
from mixminion.codec.rsa import OAEP_OVERHEAD, PublicKey

HEADER_LEN = 2048
ENC_SUBHEADER_LEN = 256
SYMMETRIC_LEN = HEADER_LEN - ENC_SUBHEADER_LEN  # 1792
SUBHEADER_LEN = ENC_SUBHEADER_LEN - OAEP_OVERHEAD  # 214
MIN_SUBHEADER_LEN = 42
MAX_ROUTING_INFO_LEN = SUBHEADER_LEN - MIN_SUBHEADER_LEN  # 172
PER_HOP_OVERHEAD = OAEP_OVERHEAD + MIN_SUBHEADER_LEN  # 84
SECRET_LEN = 16
MAJOR_NO, MINOR_NO = 0, 3

_FIXED = struct.Struct(">BB16s20sHH")


@dataclass(frozen=True)
class Subheader:
    """One hop's decrypted subheader.

    ``routing_info`` holds what fits in the RSA block (at most 172 bytes);
    when ``routing_length`` is larger the rest arrives in the symmetric part
    (an *extended* subheader).  ``underflow`` is the start of the next
    header, carried in the unused tail of the RSA block.
    """

    major: int
    minor: int
    secret: bytes
    digest: bytes
    routing_length: int
    routing_type: int
    routing_info: bytes
    underflow: bytes = b""

    @property
    def overflow_length(self) -> int:
        """Bytes of routing info still to be read from the symmetric part."""
        return max(0, self.routing_length - MAX_ROUTING_INFO_LEN)

    def pack(self) -> bytes:
        fixed = _FIXED.pack(
            self.major, self.minor, self.secret, self.digest,
            self.routing_length, self.routing_type,
        )
        return fixed + self.routing_info[:MAX_ROUTING_INFO_LEN] + self.underflow

    @classmethod
    def parse(cls, data: bytes) -> "Subheader":
        """Parse 42..214 bytes of subheader plaintext (packet.md §3.2)."""
        if not MIN_SUBHEADER_LEN <= len(data) <= SUBHEADER_LEN:
            raise ParseError(f"subheader of {len(data)} bytes (need 42..214)")
        major, minor, secret, digest, rlen, rtype = _FIXED.unpack_from(data)
        info = data[MIN_SUBHEADER_LEN:]
        underflow = b""
        if rlen < len(info):
            info, underflow = info[:rlen], info[rlen:]
        return cls(major, minor, secret, digest, rlen, rtype, info, underflow)


@dataclass(frozen=True)
class HopRouting:
    """What one hop of a header must do: its packet key, and the routing
    type and info of the hop after it (or of the leg's end)."""

    packet_key: PublicKey
    routing_type: int
    routing_info: bytes

    @property
    def size(self) -> int:
        """Header bytes this hop's subheader occupies (84 + routing info)."""
        return PER_HOP_OVERHEAD + len(self.routing_info)


def check_header_room(sizes: Sequence[int]) -> None:
    """Raise BuildError unless subheaders of these sizes fit one header.

    The last subheader must also be able to borrow its underflow from the
    padding (packet.md §6 step 2).
    """
    if not sizes:
        raise BuildError("a header needs at least one hop")
    total = sum(sizes)
    if total > HEADER_LEN or HEADER_LEN - total + sizes[-1] < ENC_SUBHEADER_LEN:
        raise BuildError(f"routing of {len(sizes)} hops does not fit in one header")


def header_junk(secrets: Sequence[bytes], sizes: Sequence[int]) -> list[bytes]:
    """``J_0 .. J_n``: the junk hop ``i`` finds at the end of its header."""
    junk = [b""]
    for secret, size in zip(secrets, sizes):
        prev = junk[-1]
        hk = crypto.derive_key(secret, crypto.HEADER_SECRET_MODE)
        jk = crypto.derive_key(secret, crypto.RANDOM_JUNK_MODE)
        junk.append(crypto.ctr(hk, prev + crypto.prng(jk, size), SYMMETRIC_LEN - len(prev)))
    return junk


def build_header(
    hops: Sequence[HopRouting],
    secrets: Sequence[bytes],
    rng: RandomSource,
    padding: Optional[bytes] = None,
    oaep_seeds: Optional[Sequence[bytes]] = None,
) -> bytes:
    """Build a 2048-byte header (packet.md §6).

    ``padding`` and ``oaep_seeds`` exist for known-answer tests; by default
    both come from ``rng`` in the reference's order (padding, then one OAEP
    seed per hop, last hop first).
    """
    if len(secrets) != len(hops):
        raise BuildError("one secret per hop is needed")
    if any(len(s) != SECRET_LEN for s in secrets):
        raise BuildError("hop secrets are 16 bytes")
    sizes = [hop.size for hop in hops]
    check_header_room(sizes)
    padding_len = HEADER_LEN - sum(sizes)
    rest = rng(padding_len) if padding is None else padding
    if len(rest) != padding_len:
        raise BuildError(f"header padding must be {padding_len} bytes")
    junk = header_junk(secrets, sizes)
    for i in range(len(hops) - 1, -1, -1):
        hop, secret = hops[i], secrets[i]
        info = hop.routing_info
        under = max(0, MAX_ROUTING_INFO_LEN - len(info))
        underflow, rest = rest[:under], rest[under:]
        rest = crypto.ctr(crypto.derive_key(secret, crypto.HEADER_SECRET_MODE),
                          info[MAX_ROUTING_INFO_LEN:] + rest)
        digest = crypto.sha1(rest + junk[i])
        sub = Subheader(MAJOR_NO, MINOR_NO, secret, digest, len(info),
                        hop.routing_type, info, underflow).pack()
        seed = rng(20) if oaep_seeds is None else oaep_seeds[i]
        rest = hop.packet_key.encrypt_with_seed(sub, seed) + rest
    if len(rest) != HEADER_LEN:  # pragma: no cover - construction invariant
        raise AssertionError("header construction lost its length")
    return rest


@dataclass(frozen=True)
class Hop:
    """A server on a path, as a packet's builder needs it: the packet key
    to encrypt its subheader to, and the address that reaches it."""

    packet_key: PublicKey
    address: RelayInfo

    @property
    def forward_type(self) -> int:
        return FWD_IPV4_TYPE if isinstance(self.address, IPv4Info) else FWD_HOST_TYPE

    @property
    def swap_type(self) -> int:
        return SWAP_FWD_IPV4_TYPE if isinstance(self.address, IPv4Info) else SWAP_FWD_HOST_TYPE


def leg_routing(path: Sequence[Hop], final_type: int, final_info: bytes) -> list[HopRouting]:
    """Per-hop routing of one leg: each hop forwards to the next, the last
    one does ``(final_type, final_info)``."""
    routing = [
        HopRouting(hop.packet_key, nxt.forward_type, nxt.address.pack())
        for hop, nxt in zip(path, path[1:])
    ]
    if path:
        routing.append(HopRouting(path[-1].packet_key, final_type, final_info))
    return routing
