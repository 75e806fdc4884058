"""Single-use reply blocks (spec: packet.md §15).

A SURB is a ready-made header 2 plus what the replier needs to reach its
first hop.  Its secrets are not stored: they are regenerated from the
decoding handle (the *seed*) and the owner's user key, so the owner can
decode a reply with nothing but its keyring.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterator, Sequence

from mixminion.codec import crypto
from mixminion.codec.armor import armor, dearmor_all
from mixminion.codec.crypto import RandomSource
from mixminion.codec.errors import BuildError, ParseError
from mixminion.codec.header import HEADER_LEN, SECRET_LEN, Hop, build_header, leg_routing
from mixminion.codec.routing import TAG_LEN, tag_from_random

SURB_MAGIC = b"SURB"
SURB_MAJOR, SURB_MINOR = 0, 1
MIN_RB_LEN = 4 + 1 + 1 + 4 + HEADER_LEN + 2 + 2 + SECRET_LEN  # 2078
RB_ARMOR_NAME = "TYPE III REPLY BLOCK"
RB_TEXT_VERSION = "0.2"
#: a SURB's path has at most 16 hops (17 secrets with the end-to-end key)
MAX_SURB_HOPS = 16

_HEAD = struct.Struct(">4sBBL")
_TAIL = struct.Struct(">HH16s")
_WHITESPACE = b" \t\r\n"

VALIDATE_SUFFIX = b"Validate"
GENERATE_SUFFIX = b"Generate"


@dataclass(frozen=True)
class ReplyBlock:
    """A parsed SURB: expiry, header, the route to its first hop, and the
    end-to-end key the replier wraps the payload with."""

    timestamp: int
    header: bytes
    routing_type: int
    routing_info: bytes
    key: bytes

    def pack(self) -> bytes:
        return (
            _HEAD.pack(SURB_MAGIC, SURB_MAJOR, SURB_MINOR, self.timestamp)
            + self.header
            + _TAIL.pack(len(self.routing_info), self.routing_type, self.key)
            + self.routing_info
        )

    @property
    def digest(self) -> bytes:
        """``H(binary SURB)``: how a used-SURB log names it."""
        return crypto.sha1(self.pack())

    def to_text(self) -> str:
        return armor(RB_ARMOR_NAME, [("Version", RB_TEXT_VERSION)], self.pack())

    @classmethod
    def parse(cls, data: bytes) -> "ReplyBlock":
        """Parse exactly one binary SURB (trailing bytes are an error)."""
        block, end = _parse_one(data, 0)
        if end != len(data):
            raise ParseError("extra data after reply block")
        return block


def _parse_one(data: bytes, pos: int) -> tuple[ReplyBlock, int]:
    if len(data) - pos < MIN_RB_LEN:
        raise ParseError("reply block truncated")
    magic, major, minor, timestamp = _HEAD.unpack_from(data, pos)
    if magic != SURB_MAGIC:
        raise ParseError("not a reply block (bad magic)")
    if (major, minor) != (SURB_MAJOR, SURB_MINOR):
        raise ParseError(f"unsupported reply block version {major}.{minor}")
    header = data[pos + 10:pos + 10 + HEADER_LEN]
    rlen, rtype, key = _TAIL.unpack_from(data, pos + 10 + HEADER_LEN)
    start = pos + MIN_RB_LEN
    if len(data) - start < rlen:
        raise ParseError("reply block truncated (routing info)")
    return ReplyBlock(timestamp, header, rtype, data[start:start + rlen], key), start + rlen


def parse_reply_blocks(data: bytes) -> list[ReplyBlock]:
    """Parse binary SURBs concatenated with optional whitespace between,
    or one or more text-armored SURBs."""
    stripped = data.lstrip(_WHITESPACE)
    if stripped.startswith(b"-----BEGIN"):
        blocks = [ReplyBlock.parse(body) for body in _text_bodies(stripped)]
        if not blocks:
            raise ParseError("no reply block found")
        return blocks
    blocks, pos = [], 0
    while True:
        while pos < len(data) and data[pos] in _WHITESPACE:
            pos += 1
        if pos == len(data):
            break
        block, pos = _parse_one(data, pos)
        blocks.append(block)
    if not blocks:
        raise ParseError("no reply block found")
    return blocks


def _text_bodies(text: bytes) -> Iterator[bytes]:
    try:
        decoded = text.decode("ascii")
    except UnicodeDecodeError:
        raise ParseError("armored reply block is not ASCII") from None
    for name, _headers, body in dearmor_all(decoded):
        if name != RB_ARMOR_NAME:
            raise ParseError(f"unexpected armored object {name!r}")
        yield body


# --- secrets derived from the seed (packet.md §15.2, §15.4) ---------------


def seed_is_valid(seed: bytes, user_key: bytes) -> bool:
    """``H(seed || userKey || "Validate")`` ends in a zero byte."""
    return crypto.sha1(seed + user_key + VALIDATE_SUFFIX)[-1] == 0


def secret_generator(seed: bytes, user_key: bytes) -> crypto.AESCounterPRNG:
    """The PRNG whose successive 16-byte outputs are the SURB's secrets."""
    return crypto.AESCounterPRNG(crypto.sha1(seed + user_key + GENERATE_SUFFIX)[:16])


def find_seed(user_key: bytes, rng: RandomSource) -> bytes:
    """Draw 20-byte seeds (top bit clear) until one validates (~256 tries)."""
    while True:
        seed = tag_from_random(rng(TAG_LEN))
        if seed_is_valid(seed, user_key):
            return seed


def build_reply_block(
    path: Sequence[Hop],
    exit_type: int,
    exit_address: bytes,
    user_key: bytes,
    expiry: int,
    rng: RandomSource,
) -> tuple[ReplyBlock, bytes]:
    """Make a state-carrying SURB; returns it with its seed (decoding handle).

    The last hop delivers ``(exit_type, seed || exit_address)``; the
    replier's packet reaches ``path[0]`` by a SWAP relay.
    """
    if not 1 <= len(path) <= MAX_SURB_HOPS:
        raise BuildError(f"a reply block path has 1..{MAX_SURB_HOPS} hops")
    seed = find_seed(user_key, rng)
    gen = secret_generator(seed, user_key)
    drawn = [gen(SECRET_LEN) for _ in range(len(path) + 1)]
    secrets = list(reversed(drawn[:len(path)]))
    routing = leg_routing(path, exit_type, seed + exit_address)
    header = build_header(routing, secrets, rng)
    first = path[0]
    block = ReplyBlock(expiry, header, first.swap_type, first.address.pack(), drawn[-1])
    return block, seed
