"""Who may connect, and how many at once (mmtp.md §14.2).

The reference parsed ``Allow``/``Deny`` but never enforced them and put no
bound on inbound connections; one address could exhaust a server.  These
checks run when TCP accepts, before any TLS work is spent on the peer.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


def normalize_address(host: str) -> Optional[IPAddress]:
    """The peer's address as an ``ipaddress`` object; IPv4-mapped IPv6
    addresses become plain IPv4 so one rule covers both listeners."""
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _unmap(network: IPNetwork) -> IPNetwork:
    """A rule written for IPv4-mapped IPv6 addresses, as IPv4: peers are
    matched in IPv4 form (normalize_address), so otherwise the rule would
    silently never match."""
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


@dataclass(frozen=True)
class AddressRule:
    """``Allow``/``Deny`` one network; ``network=None`` matches everyone."""

    allow: bool
    network: Optional[IPNetwork]

    @classmethod
    def parse(cls, verb: str, text: str) -> "AddressRule":
        """``verb`` is ``allow`` or ``deny``; ``text`` an address, a CIDR
        network, or ``*`` for everything."""
        verb = verb.lower()
        if verb not in ("allow", "deny"):
            raise ValueError(f"address rule must be Allow or Deny, not {verb!r}")
        text = text.strip()
        if text in ("*", "all"):
            return cls(verb == "allow", None)
        try:
            network = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(f"not an address or network: {text!r}") from None
        return cls(verb == "allow", _unmap(network))

    def matches(self, addr: IPAddress) -> bool:
        if self.network is None:
            return True
        return addr.version == self.network.version and addr in self.network


class AddressRules:
    """First matching rule wins; with no match the default applies."""

    def __init__(self, rules: Iterable[AddressRule] = (), default_allow: bool = True) -> None:
        self.rules: Sequence[AddressRule] = tuple(rules)
        self.default_allow = default_allow

    def allows(self, host: str) -> bool:
        addr = normalize_address(host)
        if addr is None:
            return self.default_allow and not self.rules
        for rule in self.rules:
            if rule.matches(addr):
                return rule.allow
        return self.default_allow


@dataclass
class ConnectionLimits:
    """Inbound limits and timeouts, in seconds; 0 disables a timeout."""

    max_connections: int = 128
    max_per_source: int = 8
    handshake_timeout: float = 60.0
    line_timeout: float = 30.0
    frame_timeout: float = 60.0
    idle_timeout: float = 300.0
    max_line_length: int = 4096
    #: packets awaiting storage before we stop reading from the peer
    max_unacknowledged: int = 64


class ConnectionCounter:
    """Counts open inbound connections in total and per source address."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.total = 0
        self.per_source: dict[str, int] = {}

    def refusal(self, host: str) -> Optional[str]:
        """Why a new connection from ``host`` must be refused, or None."""
        if self.total >= self.limits.max_connections:
            return "too many connections"
        key = _source_key(host)
        if self.per_source.get(key, 0) >= self.limits.max_per_source:
            return "too many connections from one address"
        return None

    def opened(self, host: str) -> None:
        key = _source_key(host)
        self.total += 1
        self.per_source[key] = self.per_source.get(key, 0) + 1

    def closed(self, host: str) -> None:
        key = _source_key(host)
        if key not in self.per_source:
            return  # not counted as open: keep total equal to the per-source sum
        self.total = max(0, self.total - 1)
        left = self.per_source[key] - 1
        if left > 0:
            self.per_source[key] = left
        else:
            self.per_source.pop(key, None)


def _source_key(host: str) -> str:
    addr = normalize_address(host)
    return str(addr) if addr is not None else host
