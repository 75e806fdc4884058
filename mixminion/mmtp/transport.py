"""Reaching the TCP transport under Twisted's TLS wrapper."""

from __future__ import annotations


def tcp_transport(transport):
    """The TCP transport under a TLS wrapper (for flow control)."""
    while hasattr(transport, "transport") and not hasattr(transport, "pauseProducing"):
        transport = transport.transport
    return transport


def set_no_delay(transport) -> None:
    """Send small writes (30-byte acks, the version line) at once: with
    Nagle's algorithm an ack can wait for the peer's delayed TCP ACK,
    which stalls the pipeline for tens of milliseconds."""
    tcp = tcp_transport(transport)
    if hasattr(tcp, "setTcpNoDelay"):
        tcp.setTcpNoDelay(True)
