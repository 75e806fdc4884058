"""Packet assembly (spec: packet.md §1, §7).

Header 2 and the payload are wrapped in LIONESS layers so that any change
to either one destroys both after the swap point.
"""

from __future__ import annotations

from typing import Optional, Sequence

from mixminion.codec import crypto
from mixminion.codec.errors import BuildError
from mixminion.codec.header import HEADER_LEN

PACKET_LEN = 32768
PAYLOAD_LEN = PACKET_LEN - 2 * HEADER_LEN  # 28672


def split_packet(packet: bytes) -> tuple[bytes, bytes, bytes]:
    """``(header1, header2, payload)`` of a 32768-byte packet."""
    return packet[:HEADER_LEN], packet[HEADER_LEN:2 * HEADER_LEN], packet[2 * HEADER_LEN:]


def assemble_packet(
    header1: bytes,
    header2: bytes,
    payload: bytes,
    secrets1: Sequence[bytes],
    secrets2: Optional[Sequence[bytes]],
) -> bytes:
    """Wrap header 2 and the payload for both legs and join the parts.

    ``secrets2`` is ``None`` when header 2 is a reply block's header, whose
    secrets only the reply block's owner knows (packet.md §15.3).
    """
    if len(header1) != HEADER_LEN or len(header2) != HEADER_LEN:
        raise BuildError("headers must be 2048 bytes")
    if len(payload) != PAYLOAD_LEN:
        raise BuildError(f"payload must be {PAYLOAD_LEN} bytes")
    if not secrets1:
        raise BuildError("the first leg needs at least one hop")
    if secrets2 is not None:
        for secret in reversed(secrets2):
            payload = crypto.lioness_encrypt(
                payload, crypto.lioness_keys(secret, crypto.PAYLOAD_ENCRYPT_MODE))
    header2 = crypto.lioness_encrypt(header2, crypto.keys_from_payload(payload))
    payload = crypto.lioness_encrypt(payload, crypto.keys_from_header(header2))
    for secret in reversed(secrets1):
        header2 = crypto.lioness_encrypt(
            header2, crypto.lioness_keys(secret, crypto.HEADER_ENCRYPT_MODE))
        payload = crypto.lioness_encrypt(
            payload, crypto.lioness_keys(secret, crypto.PAYLOAD_ENCRYPT_MODE))
    return header1 + header2 + payload
