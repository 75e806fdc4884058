"""Decoding what an exit delivered, on the recipient's side (spec:
packet.md §15.4, §16).

A delivered payload is a plaintext forward message, a reply to one of our
SURBs, a message encrypted to one of our keys, or something we cannot
read.  Only the recipient can tell, by trying its keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

from mixminion.codec import crypto
from mixminion.codec.compression import decompress, singleton_limit
from mixminion.codec.errors import CodecError, CryptoError
from mixminion.codec.header import SECRET_LEN
from mixminion.codec.packet import PAYLOAD_LEN
from mixminion.codec.payload import (
    ENC_FWD_OVERHEAD,
    FragmentPayload,
    SingletonPayload,
    checksum_ok,
    parse_payload,
)
from mixminion.codec.rsa import PrivateKey
from mixminion.codec.routing import TAG_LEN
from mixminion.codec.surb import MAX_SURB_HOPS, secret_generator, seed_is_valid

ParsedPayload = Union[SingletonPayload, FragmentPayload]

#: what a user who forces decompression still gets at most (a singleton
#: of 28 KiB that expands past this is a bomb, whatever the user says)
FORCED_LIMIT = 64 * 1024 * 1024


class CorruptPayload(CodecError):
    """The payload was meant for us (its keys matched) but is damaged."""


@dataclass(frozen=True)
class Decoded:
    """A payload we could read.

    ``kind`` is ``"forward"``, ``"encrypted"`` or ``"reply"``; ``identity``
    names the SURB identity that decoded a reply (fragments of one reply
    must share it).
    """

    kind: str
    payload: ParsedPayload
    identity: Optional[str] = None

    @property
    def is_fragment(self) -> bool:
        return isinstance(self.payload, FragmentPayload)

    def message(self, force: bool = False) -> bytes:
        """Decompressed contents of a singleton (header block included)."""
        if not isinstance(self.payload, SingletonPayload):
            raise CodecError("a fragment has no message of its own")
        compressed = self.payload.data[:self.payload.size]
        limit = FORCED_LIMIT if force else singleton_limit(len(compressed))
        return decompress(compressed, limit)


def decode_reply(payload: bytes, tag: bytes, user_key: bytes) -> Optional[bytes]:
    """Undo a reply's layers with the secrets regenerated from ``tag``.

    Returns the plaintext payload, or None when this user key is not the
    one (the Validate test fails or no layer count makes the checksum hold).
    """
    if len(tag) != TAG_LEN or not seed_is_valid(tag, user_key):
        return None
    gen = secret_generator(tag, user_key)
    for _ in range(MAX_SURB_HOPS + 1):
        keys = crypto.lioness_keys(gen(SECRET_LEN), crypto.PAYLOAD_ENCRYPT_MODE)
        payload = crypto.lioness_encrypt(payload, keys)
        if checksum_ok(payload):
            return payload
    return None


def decode_encrypted(payload: bytes, tag: bytes, key: PrivateKey) -> Optional[bytes]:
    """Undo end-to-end encryption to ``key`` (§16).

    None when the RSA part is not for this key; CorruptPayload when it is
    but the rest does not check.
    """
    whole = tag + payload
    k = key.size_bytes
    try:
        head = key.decrypt(whole[:k])
    except CryptoError:
        return None
    if len(head) < SECRET_LEN:
        raise CorruptPayload("end-to-end block too short")
    session_key = head[:SECRET_LEN]
    tail = crypto.lioness_decrypt(whole[k:], crypto.lioness_keys(
        session_key, crypto.END_TO_END_ENCRYPT_MODE))
    inner = head[SECRET_LEN:] + tail
    if len(inner) != PAYLOAD_LEN - ENC_FWD_OVERHEAD or not checksum_ok(inner):
        raise CorruptPayload("encrypted message fails its checksum")
    return inner


def decode_payload(
    payload: bytes,
    tag: bytes,
    user_keys: Mapping[str, bytes] = {},
    rsa_keys: Sequence[PrivateKey] = (),
) -> Optional[Decoded]:
    """Classify and decode a delivered payload with our keys.

    Returns None when none of our keys reads it; raises CorruptPayload (or
    another CodecError) when it was for us but is damaged.
    """
    if len(payload) != PAYLOAD_LEN:
        raise CodecError(f"delivered payloads are {PAYLOAD_LEN} bytes")
    if checksum_ok(payload):
        return Decoded("forward", parse_payload(payload))
    if not tag:
        return None
    for identity, user_key in user_keys.items():
        plain = decode_reply(payload, tag, user_key)
        if plain is not None:
            return Decoded("reply", parse_payload(plain), identity)
    for key in rsa_keys:
        plain = decode_encrypted(payload, tag, key)
        if plain is not None:
            return Decoded("encrypted", parse_payload(plain))
    return None
