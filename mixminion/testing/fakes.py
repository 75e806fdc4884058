"""Small stand-ins for unit tests of logic (never the only test of a part)."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer
from zope.interface import implementer

from mixminion.mmtp.initiator import NextHop
from mixminion.mmtp.interfaces import IPacketSink
from mixminion.server.packetstore import PacketStore


class HeldClient:
    """An MMTP client whose sends stay pending until the test answers them."""

    def __init__(self) -> None:
        self.sent: list[tuple[NextHop, defer.Deferred[Any]]] = []

    def send_packet(self, dest: NextHop, packet: bytes) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.sent.append((dest, d))
        return d

    def to(self, dest: NextHop) -> list[defer.Deferred[Any]]:
        """The pending sends to ``dest``."""
        return [d for where, d in self.sent if where == dest]

    @property
    def hosts(self) -> list[tuple[str, int]]:
        return [(dest.host, dest.port) for dest, _ in self.sent]


@implementer(IPacketSink)
class ListSink:
    """A packet sink that keeps what it is handed, in order, and
    acknowledges at once, or refuses everything while ``refusing``."""

    def __init__(self) -> None:
        self.packets: list[bytes] = []
        self.refusing = False

    def receivePacket(self, packet: bytes, peer: str) -> defer.Deferred[int]:  # noqa: N802
        if self.refusing:
            return defer.fail(OSError("refused"))
        self.packets.append(packet)
        return defer.succeed(len(self.packets))


def scratch_store(test: Any, body_dir: bool = False) -> PacketStore:
    """A packet store in a fresh folder of ``test``'s, closed at its end."""
    path = os.path.abspath(test.mktemp())
    os.makedirs(path)
    store = PacketStore(os.path.join(path, "packets.db"),
                        body_dir=os.path.join(path, "bodies") if body_dir else None)
    test.addCleanup(store.close)
    return store
