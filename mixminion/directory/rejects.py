"""An authority's reject list: servers it keeps out of its votes.

The file ``[Authority] RejectFile`` names (relative to ``authority.conf``)
holds one entry a line; ``#`` starts a comment, blank lines are skipped::

    # a server's identity fingerprint: 40 hex digits, spaces allowed
    0123 4567 89AB CDEF 0123 4567 89AB CDEF 0123 4567
    # a nickname (compared without regard to case)
    BadNode
    # an address or network, IPv4 or IPv6 (CIDR)
    192.0.2.0/24
    2001:db8::/32

The three forms cannot be confused: a fingerprint is 40 hex digits, a
nickname at most 24 characters starting with a letter, and an address
holds a '.' or a ':'.  A line that is none of them is an error naming the
file and the line; the authority refuses to start with it, and a SIGHUP
keeps the list it had.

An address entry matches the addresses a descriptor advertises in its
``[Incoming/MMTP]`` section: ``IP``, and ``Hostname`` when it is an
address.  A host name is never resolved (the vote must not depend on what
a DNS server says at that moment), and descriptors carry no IPv6 address
(descriptors.md §4.1), so IPv6 entries only take effect for descriptors
that will.  See doc/decisions-directory.md, "The reject list".

Pure code: no Twisted, no clock.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

from mixminion.codec.textformat import decode_nickname
from mixminion.config.syntax import ConfigError
from mixminion.directory.descriptor import ServerDescriptor
from mixminion.directory.reliability import FINGERPRINT
from mixminion.mmtp.limits import IPAddress, NetworkRule, normalize_address

__all__ = ["RejectEntry", "RejectList", "descriptor_addresses", "load_reject_list", "parse_entry"]

KINDS = ("fingerprint", "nickname", "address")


@dataclass(frozen=True)
class RejectEntry:
    """One line of the list: ``kind`` is one of :data:`KINDS`; ``value`` the
    fingerprint (upper case), the nickname (lower case) or the network."""

    kind: str
    value: str
    filename: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.filename}:{self.line}"

    def __str__(self) -> str:
        return f"{self.kind} {self.value} ({self.where})"


def parse_entry(text: str) -> tuple[str, str]:
    """``(kind, value)`` of one entry (comment already removed); ValueError
    with the reason otherwise."""
    packed = "".join(text.split()).upper()
    if FINGERPRINT.fullmatch(packed):
        return "fingerprint", packed
    if re.fullmatch(r"[0-9A-F]{25,}", packed):  # longer than any nickname
        raise ValueError(f'"{text}" is not a fingerprint: {len(packed)} hex digits, not 40')
    if any(c in text for c in ".:/") or text[:1].isdigit():
        try:
            if " " in text:
                raise ValueError("one entry a line")
            network = NetworkRule.parse("deny", text).network
        except ValueError:
            raise ValueError(f'"{text}" is not an address or network (e.g. 192.0.2.7, '
                             "192.0.2.0/24, 2001:db8::/32); one entry a line") from None
        if network is None or network.prefixlen == 0:
            raise ValueError(f'"{text}" would reject every server')
        return "address", str(network)
    try:
        return "nickname", decode_nickname(text).lower()
    except ValueError:
        raise ValueError(f'"{text}" is not a fingerprint (40 hex digits), a nickname '
                         "(1-24 letters, digits and '-', starting with a letter) "
                         "or an address network (e.g. 192.0.2.0/24, 2001:db8::/32); "
                         "one entry a line") from None


def descriptor_addresses(descriptor: ServerDescriptor) -> list[IPAddress]:
    """The addresses a descriptor advertises (``IP``; ``Hostname`` if it is one)."""
    incoming = descriptor.incoming
    if incoming is None:
        return []
    found = []
    for text in (incoming.ip, incoming.hostname):
        address = normalize_address(text) if text else None
        if address is not None and address not in found:
            found.append(address)
    return found


class RejectList:
    """The entries of one reject file, matched against descriptors."""

    def __init__(self, entries: Sequence[RejectEntry] = (), filename: Optional[str] = None) -> None:
        self.entries: tuple[RejectEntry, ...] = tuple(entries)
        self.filename = filename
        self._fingerprints = {e.value: e for e in reversed(self.entries) if e.kind == "fingerprint"}
        self._nicknames = {e.value: e for e in reversed(self.entries) if e.kind == "nickname"}
        self._networks = [(NetworkRule.parse("deny", e.value), e)
                          for e in self.entries if e.kind == "address"]

    @classmethod
    def parse(cls, text: str | bytes, filename: str = "<string>") -> "RejectList":
        """Read a reject file's text; ConfigError ``file:line: reason`` at
        the first bad line."""
        data = text.encode("utf-8") if isinstance(text, str) else text
        entries = []
        for number, raw in enumerate(data.splitlines(), 1):
            try:
                line = raw.decode("ascii")
            except UnicodeDecodeError:
                raise ConfigError(filename, number, None, None, "not ASCII text") from None
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            try:
                kind, value = parse_entry(line)
            except ValueError as exc:
                raise ConfigError(filename, number, None, None, str(exc)) from None
            entries.append(RejectEntry(kind, value, filename, number))
        return cls(entries, filename)

    def __len__(self) -> int:
        return len(self.entries)

    def __eq__(self, other: object) -> bool:
        """Same entries (their line numbers aside)."""
        if not isinstance(other, RejectList):
            return NotImplemented
        return self.filename == other.filename and self._key() == other._key()

    def _key(self) -> tuple[tuple[str, str], ...]:
        return tuple((e.kind, e.value) for e in self.entries)

    def summary(self) -> str:
        """``3 entries (1 fingerprint, 1 nickname, 1 address)``."""
        counts = [(kind, sum(1 for e in self.entries if e.kind == kind)) for kind in KINDS]
        detail = ", ".join(f"{n} {kind}" for kind, n in counts if n)
        return f"{len(self)} {'entry' if len(self) == 1 else 'entries'}" + (f" ({detail})" if detail else "")

    def match(self, descriptor: ServerDescriptor) -> Optional[RejectEntry]:
        """An entry that rejects ``descriptor`` (by fingerprint, else by
        nickname, else the first address entry that matches), or None."""
        entry = self._fingerprints.get(descriptor.fingerprint.upper())
        if entry is None:
            entry = self._nicknames.get(descriptor.nickname.lower())
        if entry is None and self._networks:
            for address in descriptor_addresses(descriptor):
                entry = next((e for rule, e in self._networks if rule.matches(address)), None)
                if entry is not None:
                    break
        return entry


def load_reject_list(path: Optional[str]) -> RejectList:
    """The list in ``path`` (an empty one when ``path`` is None); OSError if
    it cannot be read, ConfigError at a bad line."""
    if path is None:
        return RejectList()
    with open(path, "rb") as f:
        return RejectList.parse(f.read(), path)
