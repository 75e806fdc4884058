"""A ping as a packet (doc/reliability.md §1): which servers it may use,
and the Type III packet that carries it over ``X, S, Y`` back to us.

A ping must look like any relayed packet to everyone but its pinger: a
32 KiB forward packet with a random payload, built by the client's
builder, whose first hop is named the way processing names a relayed
packet's next hop (:meth:`NextHop.of` the hop's routing info), so it
waits in the same ``out`` queue and leaves over the same MMTP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from mixminion.client.paths import hop_for
from mixminion.codec.build import build_forward_packet
from mixminion.codec.crypto import RandomSource
from mixminion.codec.packet import PAYLOAD_LEN
from mixminion.codec.routing import PING_TYPE, NextHop
from mixminion.directory.descriptor import ServerDescriptor


@dataclass(frozen=True)
class PingPacket:
    """A built ping: the packet and where it goes first."""

    packet: bytes
    first_hop: NextHop


def relaying_servers(descriptors: Iterable[ServerDescriptor], now: float) -> list[ServerDescriptor]:
    """The descriptors a ping may go through: valid at ``now``, accepting
    MMTP, relaying, of our packet version; newest first (so
    :func:`.paths.others`, which keeps the first per fingerprint, takes each
    server's newest packet key)."""
    usable = [d for d in descriptors
              if d.is_valid_at(now) and d.can_start_at() and d.outgoing is not None
              and d.supports_packet_version()]
    return sorted(usable, key=lambda d: (d.valid_after, d.published), reverse=True)


def build_ping(x: ServerDescriptor, s: ServerDescriptor, y: ServerDescriptor,
               pinger: ServerDescriptor, handle: bytes, rng: RandomSource) -> PingPacket:
    """The packet of a ping over ``X, S, Y`` to ``pinger`` (our own
    descriptor), whose PING exit carries ``handle``.  The legs are
    ``X, S`` and ``Y, P``: the swap happens at the server measured, as
    anywhere else in a four-hop path."""
    x_hop, s_hop, y_hop, p_hop = (hop_for(d) for d in (x, s, y, pinger))
    built = build_forward_packet(rng(PAYLOAD_LEN), [x_hop, s_hop], [y_hop, p_hop],
                                 PING_TYPE, handle, rng)
    return PingPacket(built.packet, NextHop.of(x_hop.address))
