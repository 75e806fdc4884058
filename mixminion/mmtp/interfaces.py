"""The interface between MMTP and the rest of the node: where received packets go."""

from __future__ import annotations

from zope.interface import Interface


class IPacketSink(Interface):
    """Where a responder puts the packets it receives.

    MMTP acknowledges a packet with RECEIVED only once the sink says it is
    durably stored: the sender deletes its copy on that acknowledgement.
    """

    def receivePacket(packet: bytes, peer: str):  # noqa: N802,N805 - zope style
        """Store ``packet`` (32768 bytes) durably.

        Return a Deferred that fires (with anything) once the packet is on
        stable storage, or fails if it could not be stored; a failure makes
        the responder answer REJECTED.  ``peer`` is the remote address, for
        per-source accounting only; it must not be logged above debug.
        """
