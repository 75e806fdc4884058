"""Routing types and routing information (spec: packet.md §4, §5).

A subheader names what its hop does next with a u16 routing type and a
routing-info byte string.  Relay types carry the next hop's address and
identity key digest; exit types carry a decoding handle (tag) and an
address, or nothing.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from dataclasses import dataclass
from typing import Union

from mixminion.codec.crypto import RandomSource
from mixminion.codec.errors import BuildError, ParseError

DROP_TYPE = 0x0000
FWD_IPV4_TYPE = 0x0001
SWAP_FWD_IPV4_TYPE = 0x0002
FWD_HOST_TYPE = 0x0003
SWAP_FWD_HOST_TYPE = 0x0004
MIN_EXIT_TYPE = 0x0100
SMTP_TYPE = 0x0100
MBOX_TYPE = 0x0101
FRAGMENT_TYPE = 0x0103
NEWS_TYPE = 0x0104
PING_TYPE = 0x0105
MAX_EXIT_TYPE = 0xFFFF

TAG_LEN = 20
KEYID_LEN = 20
IPV4_INFO_LEN = 26

RELAY_TYPES = frozenset({FWD_IPV4_TYPE, SWAP_FWD_IPV4_TYPE, FWD_HOST_TYPE, SWAP_FWD_HOST_TYPE})
SWAP_TYPES = frozenset({SWAP_FWD_IPV4_TYPE, SWAP_FWD_HOST_TYPE})
#: exit types whose routing info carries no decoding handle; every other
#: exit type (SMTP, MBOX, and by default any module's) starts with a tag
TAGLESS_EXIT_TYPES = frozenset({FRAGMENT_TYPE, PING_TYPE})

TYPE_NAMES = {
    DROP_TYPE: "DROP",
    FWD_IPV4_TYPE: "FWD_IPV4",
    SWAP_FWD_IPV4_TYPE: "SWAP_FWD_IPV4",
    FWD_HOST_TYPE: "FWD_HOST",
    SWAP_FWD_HOST_TYPE: "SWAP_FWD_HOST",
    SMTP_TYPE: "SMTP",
    MBOX_TYPE: "MBOX",
    FRAGMENT_TYPE: "FRAGMENT",
    NEWS_TYPE: "NEWS",
    PING_TYPE: "PING",
}

_HOSTNAME = re.compile(rb"[A-Za-z0-9.\-]+\Z")


def type_name(routing_type: int) -> str:
    return TYPE_NAMES.get(routing_type, f"0x{routing_type:04x}")


def is_exit_type(routing_type: int) -> bool:
    return routing_type >= MIN_EXIT_TYPE


@dataclass(frozen=True)
class IPv4Info:
    """FWD_IPV4 / SWAP_FWD_IPV4 routing info: address, port, identity digest."""

    ip: str
    port: int
    keyinfo: bytes

    def pack(self) -> bytes:
        return ipaddress.IPv4Address(self.ip).packed + struct.pack(">H", self.port) + self.keyinfo

    @classmethod
    def parse(cls, data: bytes) -> "IPv4Info":
        if len(data) != IPV4_INFO_LEN:
            raise ParseError(f"IPv4 routing info must be {IPV4_INFO_LEN} bytes, not {len(data)}")
        ip = str(ipaddress.IPv4Address(data[:4]))
        (port,) = struct.unpack(">H", data[4:6])
        return cls(ip, port, data[6:])


@dataclass(frozen=True)
class HostInfo:
    """FWD_HOST / SWAP_FWD_HOST routing info: port, identity digest, hostname."""

    hostname: str
    port: int
    keyinfo: bytes

    def __post_init__(self) -> None:
        if len(self.keyinfo) != KEYID_LEN:
            raise BuildError("keyinfo must be a 20-byte identity key digest")
        if not 0 <= self.port <= 0xFFFF:
            raise BuildError("port out of range")
        check_hostname(self.hostname.encode("ascii", "replace"))

    def pack(self) -> bytes:
        return struct.pack(">H", self.port) + self.keyinfo + self.hostname.encode("ascii")

    @classmethod
    def parse(cls, data: bytes) -> "HostInfo":
        if len(data) < 2 + KEYID_LEN + 1:
            raise ParseError("host routing info too short")
        host = data[22:]
        check_hostname(host)
        (port,) = struct.unpack(">H", data[:2])
        return cls(host.decode("ascii").lower(), port, data[2:22])


#: the routing info of a relay type, as parsed
RelayInfo = Union[IPv4Info, HostInfo]


@dataclass(frozen=True)
class NextHop:
    """Where a relayed packet goes: the one form the node uses from
    processing to MMTP, whichever relay type named it."""

    host: str
    port: int
    keyid: bytes

    @classmethod
    def of(cls, info: RelayInfo) -> "NextHop":
        host = info.hostname if isinstance(info, HostInfo) else info.ip
        return cls(host, info.port, info.keyinfo)


def check_hostname(host: bytes) -> None:
    """Hostnames: ``A-Z a-z 0-9 . -``, non-empty, no leading dot, no ``..``."""
    if not _HOSTNAME.match(host) or host.startswith(b".") or b".." in host:
        raise ParseError("invalid hostname in routing info")


def parse_relay_info(routing_type: int, routing_info: bytes) -> RelayInfo:
    """Parse the routing info of a relay type; ParseError on any defect."""
    if routing_type in (FWD_IPV4_TYPE, SWAP_FWD_IPV4_TYPE):
        return IPv4Info.parse(routing_info)
    if routing_type in (FWD_HOST_TYPE, SWAP_FWD_HOST_TYPE):
        return HostInfo.parse(routing_info)
    raise ParseError(f"routing type {type_name(routing_type)} is not a relay type")


# --- exit addresses --------------------------------------------------------

_ATOM = rb"[^\x00-\x20()\[\]<>@,;:\\\".\x7f-\xff]+"
_DOT_ATOMS = rb"%s(?:\.%s)*" % (_ATOM, _ATOM)
_MAILBOX = re.compile(rb"(%s)@(%s)\Z" % (_DOT_ATOMS, _DOT_ATOMS))
_IP_LITERAL = re.compile(rb"[0-9.]+\Z")


def check_smtp_address(address: bytes) -> None:
    """Accept only ``local@domain`` of dot-separated atoms, no IP literal
    domains (packet.md §5.3); what both client and exit enforce."""
    m = _MAILBOX.match(address)
    if not m:
        raise ParseError("not a valid e-mail address")
    if _IP_LITERAL.match(m.group(2)):
        raise ParseError("e-mail domain must not be an IP literal")


def split_exit_info(routing_type: int, routing_info: bytes) -> tuple[bytes, bytes]:
    """``(tag, address)`` of an exit's routing info; tagless types give
    an empty tag and the info as the address."""
    if is_exit_type(routing_type) and routing_type not in TAGLESS_EXIT_TYPES:
        if len(routing_info) < TAG_LEN:
            raise ParseError("exit routing info shorter than its tag")
        return routing_info[:TAG_LEN], routing_info[TAG_LEN:]
    return b"", routing_info


def tag_from_random(random20: bytes) -> bytes:
    """A decoding handle from 20 random bytes: clear the top bit so plain,
    encrypted and reply tags look alike."""
    if len(random20) != TAG_LEN:
        raise BuildError("a tag needs 20 random bytes")
    return bytes((random20[0] & 0x7F,)) + random20[1:]


def make_tag(rng: RandomSource) -> bytes:
    """A random decoding handle, drawn as the reference does (1 + 19 bytes)."""
    return tag_from_random(rng(1) + rng(TAG_LEN - 1))
