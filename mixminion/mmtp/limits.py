"""Who may connect, and how many at once (mmtp.md §14.2).

The reference parsed ``Allow``/``Deny`` but never enforced them and put no
bound on inbound connections; one address could exhaust a server.  These
checks run when TCP accepts, before any TLS work is spent on the peer.

Caps per address and per network.  A peer may hold ``max_per_source``
connections from one address and ``max_per_network`` from one network:
the /``ipv4_prefix`` (default /24) or /``ipv6_prefix`` (default /48)
around its address, the blocks one operator, hosting customer or home
line usually gets.  A newcomer over either cap is refused (closing one of
its own network's connections for it would gain nothing).

Loopback is the exception: for a loopback peer (127.0.0.0/8, ::1) the
unit of the per-network cap is the address itself (/32, /128).  A test
network runs every node on 127.0.0.1, or on a few 127.x addresses chosen
by hand; lumping them into one /24 would let one node's connections
crowd out the others' (or, with the per-network cap below the nodes'
total, starve some of them outright), and no remote attacker can
connect from loopback.  Loopback peers keep the per-address cap.

When the table is full (``max_connections``) a newcomer that passes its
caps is not refused: the connection that has made the least progress is
closed to make room (:func:`eviction_order`; :mod:`mixminion.mmtp.responder`
does it).  Refusing the newcomer instead, as before, let 128 idle sockets
that reconnect when closed lock every honest sender out (issue 12: 0 of
34 sends got through); with eviction an idle socket can only push out
another idle socket.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

from mixminion.mmtp.frames import MAX_LINE_LENGTH

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
class NetworkRule:
    """``Allow``/``Deny`` one network; ``network=None`` matches everyone."""

    allow: bool
    network: Optional[IPNetwork]

    @classmethod
    def parse(cls, verb: str, text: str) -> "NetworkRule":
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


class NetworkRules:
    """First matching rule wins; with no match the default applies."""

    def __init__(self, rules: Iterable[NetworkRule] = (), default_allow: bool = True) -> None:
        self.rules: Sequence[NetworkRule] = tuple(rules)
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
    #: connections from one network (see the module docstring)
    max_per_network: int = 16
    #: the prefix lengths that make a network, IPv4 and IPv6
    ipv4_prefix: int = 24
    ipv6_prefix: int = 48
    handshake_timeout: float = 60.0
    line_timeout: float = 30.0
    #: from the protocol line to the first complete frame
    first_frame_timeout: float = 30.0
    frame_timeout: float = 60.0
    #: since the last packet (JUNK frames do not count; see responder)
    idle_timeout: float = 300.0
    #: a protocol line, CRLF included (mmtp.md §6)
    max_line_length: int = MAX_LINE_LENGTH
    #: packets awaiting storage before we stop reading from the peer
    max_unacknowledged: int = 64


class Stage(enum.IntEnum):
    """How far an inbound connection has come, in order."""

    #: TCP accepted; nothing received yet
    ACCEPTED = 0
    #: TLS bytes received: the handshake is under way
    HANDSHAKING = 1
    #: TLS done; waiting for the protocol line
    NEGOTIATING = 2
    #: protocol line accepted; no packet yet (JUNK frames do not count)
    READY = 3
    #: at least one packet (a SEND frame) received
    DELIVERING = 4


#: what the eviction order makes of the stages: silent, spoke, delivered
_LEVEL = {Stage.ACCEPTED: 0, Stage.HANDSHAKING: 1, Stage.NEGOTIATING: 1, Stage.READY: 1,
          Stage.DELIVERING: 2}


@dataclass(frozen=True)
class Progress:
    """What a connection has achieved: ``busy`` (a frame half received,
    or packets being stored), the ``stage`` reached, and ``since`` when it
    last progressed (reached its stage or, once delivering, completed its
    last packet)."""

    busy: bool
    stage: Stage
    since: float


def eviction_order(progress: Progress, crowd: int) -> tuple[bool, int, int, float]:
    """Sort key of the connections of a full table: the lowest is closed
    to make room.  ``crowd`` is how many connections its network holds.

    ``busy`` first: a connection in the middle of receiving a frame, or
    whose packets are being stored, is closed only when every connection
    is busy (closing it would waste the frame, or leave a stored packet
    unacknowledged so that the peer sends it twice).

    Then three levels: silent (nothing received), spoke (TLS bytes
    received, but no packet yet) and delivering (a packet received).  An
    honest peer speaks at once (its TLS hello), so it climbs above every
    socket that never says anything.  The stages in between (handshake
    done, protocol line accepted) do not count for more: an honest peer
    goes through them in a few round trips, so a connection that stays in
    one is stalling, and one that had done a TLS handshake and then
    parked would otherwise outrank, and through its reconnections push
    out, an honest newcomer still in its handshake.

    Within a level, the network holding the most connections gives one
    up first, and then the connection that progressed least recently.
    The crowd matters for a newcomer that has not spoken yet: with age
    alone it lives only until as many newcomers have come after it as
    there are silent connections older than it, and under the issue's
    flood (every socket reconnected as soon as it is closed) that is tens
    of milliseconds: on a real node 11 to 48 of 40 honest connections
    were closed before their TLS hello was read, costing up to 26 s of
    retries (tests/test_attack_incoming.py); with the crowd, none.  A peer
    holding one slot keeps it unless every network is down to one; for
    that case the responder also looks, when it accepts, for a hello
    already waiting in the socket (under a flood it usually is)."""
    return (progress.busy, _LEVEL[progress.stage], -crowd, progress.since)


class ConnectionCounter:
    """Counts open inbound connections in total, per source address and
    per network (see the module docstring for what a network is)."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.total = 0
        self.per_source: dict[str, int] = {}
        self.per_network: dict[str, int] = {}
        #: the network each address with open connections is counted in
        self._network_of: dict[str, str] = {}

    @property
    def full(self) -> bool:
        return self.total >= self.limits.max_connections

    def refusal(self, host: str) -> Optional[str]:
        """Why a new connection from ``host`` must be refused, or None.
        When the table is full this says so; the responder then makes
        room instead of refusing (:meth:`source_refusal` first)."""
        if self.full:
            return "too many connections"
        return self.source_refusal(host)

    def source_refusal(self, host: str) -> Optional[str]:
        """Why ``host``'s own caps refuse a new connection, or None."""
        key = _source_key(host)
        if self.per_source.get(key, 0) >= self.limits.max_per_source:
            return "too many connections from one address"
        if self.per_network.get(self.network(host), 0) >= self.limits.max_per_network:
            return "too many connections from one network"
        return None

    def network(self, host: str) -> str:
        """The per-network cap's unit for ``host`` (``"192.0.2.0/24"``).
        An address keeps the network it was first counted in while it has
        connections open, so a SIGHUP that changes the prefixes cannot
        make the counts disagree."""
        key = _source_key(host)
        counted = self._network_of.get(key)
        if counted is not None:
            return counted
        return network_key(host, self.limits.ipv4_prefix, self.limits.ipv6_prefix)

    def opened(self, host: str) -> str:
        """Count a connection from ``host``; returns its network."""
        key, network = _source_key(host), self.network(host)
        self.total += 1
        self.per_source[key] = self.per_source.get(key, 0) + 1
        self.per_network[network] = self.per_network.get(network, 0) + 1
        self._network_of[key] = network
        return network

    def closed(self, host: str) -> None:
        key = _source_key(host)
        if key not in self.per_source:
            return  # not counted as open: keep total equal to the per-source sum
        self.total = max(0, self.total - 1)
        _decrement(self.per_network, self._network_of[key])
        if not _decrement(self.per_source, key):
            del self._network_of[key]


def _decrement(counts: dict[str, int], key: str) -> int:
    """One less for ``key``; returns what is left (none: forgotten)."""
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)
    return max(left, 0)


def network_key(host: str, ipv4_prefix: int = 24, ipv6_prefix: int = 48) -> str:
    """The network ``host`` counts in: its /``ipv4_prefix`` or
    /``ipv6_prefix``, but only itself for a loopback address (module
    docstring).  A prefix beyond the address's length means the address."""
    addr = normalize_address(host)
    if addr is None:
        return host
    bits = 32 if addr.version == 4 else 128
    prefix = bits if addr.is_loopback else (ipv4_prefix if addr.version == 4 else ipv6_prefix)
    prefix = min(max(prefix, 0), bits)
    return str(ipaddress.ip_network((addr, prefix), strict=False))


def _source_key(host: str) -> str:
    addr = normalize_address(host)
    return str(addr) if addr is not None else host
