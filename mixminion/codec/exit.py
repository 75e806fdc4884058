"""What an exit makes of a decrypted payload, and the text it delivers
(spec: packet.md §14, §14.1).

:func:`classify_payload` is step 4 of exit handling: plain message,
overcompressed message, fragment, encrypted (or junk), or corrupt.  The
``TYPE III ANONYMOUS MESSAGE`` text form is what SMTP/MBOX delivery puts in
the mail body and what a recipient's client parses back.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import ClassVar, Optional, Union

from mixminion.codec.armor import armor, decode_base64_body, dearmor_all
from mixminion.codec.compression import (
    DecompressionLimitExceeded,
    decompress,
    reassembled_limit,
    singleton_limit,
)
from mixminion.codec.errors import BuildError, CompressionError, ParseError
from mixminion.codec.exit_headers import parse_message
from mixminion.codec.payload import (
    ENC_PAYLOAD_LEN,
    PAYLOAD_LEN,
    FragmentPayload,
    checksum_ok,
    parse_payload,
)

MESSAGE_ARMOR_NAME = "TYPE III ANONYMOUS MESSAGE"
TAG_LEN = 20

PLAINTEXT = "plaintext"
BINARY = "binary"
OVERCOMPRESSED = "overcompressed"
ENCRYPTED = "encrypted"
FRAGMENT = "fragment"
MESSAGE_TYPES = (PLAINTEXT, BINARY, OVERCOMPRESSED, ENCRYPTED, FRAGMENT)


# --- classification (packet.md §14 step 4) ---------------------------------


@dataclass(frozen=True)
class Plain:
    """A checked singleton that decompressed within the limit."""

    kind: ClassVar[str] = "plain"
    headers: dict[str, str]
    body: bytes
    compressed: bytes


@dataclass(frozen=True)
class Overcompressed:
    """Decompresses past the bomb limit: delivered still compressed."""

    kind: ClassVar[str] = "overcompressed"
    compressed: bytes


@dataclass(frozen=True)
class FragmentPiece:
    """A checked fragment: for the FRAGMENT module, or delivered raw."""

    kind: ClassVar[str] = "fragment"
    fragment: FragmentPayload


@dataclass(frozen=True)
class Encrypted:
    """Bad checksum: a reply, an encrypted forward message, or junk."""

    kind: ClassVar[str] = "encrypted"
    payload: bytes


@dataclass(frozen=True)
class Corrupt:
    """Checksum fine but contents invalid; the exit drops it."""

    kind: ClassVar[str] = "corrupt"
    reason: str


Classification = Union[Plain, Overcompressed, FragmentPiece, Encrypted, Corrupt]


def classify_compressed(compressed: bytes, limit: Optional[int] = None) -> Union[Plain, Overcompressed, Corrupt]:
    """Decompress (default limit: reassembled message, ``20 x len``) and
    parse exit headers."""
    if limit is None:
        limit = reassembled_limit(len(compressed))
    try:
        message = decompress(compressed, limit)
    except DecompressionLimitExceeded:
        return Overcompressed(compressed)
    except CompressionError as exc:
        return Corrupt(str(exc))
    headers, body = parse_message(message)
    return Plain(headers, body, compressed)


def classify_payload(payload: bytes, limit: Optional[int] = None) -> Classification:
    """Classify a decrypted payload; ``limit`` overrides the singleton bomb
    limit ``max(20480, 20 x SIZE)``."""
    if len(payload) not in (PAYLOAD_LEN, ENC_PAYLOAD_LEN):
        return Corrupt(f"payload of {len(payload)} bytes")
    if not checksum_ok(payload):
        return Encrypted(payload)
    try:
        parsed = parse_payload(payload)
    except ParseError as exc:
        return Corrupt(str(exc))
    if isinstance(parsed, FragmentPayload):
        return FragmentPiece(parsed)
    compressed = parsed.compressed
    return classify_compressed(compressed, singleton_limit(len(compressed)) if limit is None else limit)


# --- text encoding (packet.md §14.1) ---------------------------------------

#: TAB, LF, VT, CR, 0x20-0x7E, 0x80-0xFE ("printing"; 0xFF excluded)
_PRINTING = bytes([9, 10, 11, 13]) + bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0xFF))
_DASH_LINE = re.compile(rb"^-", re.M)
_ESCAPED_LINE = re.compile(rb"^- ", re.M)


@dataclass(frozen=True)
class TextMessage:
    """A delivered message as text: its type, contents and decoding handle."""

    message_type: str
    contents: bytes
    tag: Optional[bytes] = None


def is_printing(data: bytes) -> bool:
    """Would the contents be sent as ``plaintext``?"""
    return not data.translate(None, _PRINTING)


def choose_message_type(
    contents: bytes, overcompressed: bool = False, encrypted: bool = False, fragment: bool = False
) -> str:
    """The reference's order: overcompressed, encrypted, printing,
    fragment, binary."""
    if overcompressed:
        return OVERCOMPRESSED
    if encrypted:
        return ENCRYPTED
    if is_printing(contents):
        return PLAINTEXT
    return FRAGMENT if fragment else BINARY


def encode_text_message(contents: bytes, message_type: str, tag: Optional[bytes] = None) -> bytes:
    """The armored ``TYPE III ANONYMOUS MESSAGE`` text (bytes, since a
    plaintext body may hold bytes 0x80-0xFE)."""
    if message_type not in MESSAGE_TYPES:
        raise BuildError(f"unknown message type {message_type!r}")
    headers = [("Message-type", message_type)]
    if message_type == ENCRYPTED:
        if tag is None or len(tag) != TAG_LEN:
            raise BuildError("an encrypted message needs a 20-byte decoding handle")
        headers.append(("Decoding-handle", base64.b64encode(tag).decode("ascii")))
    elif tag is not None:
        raise BuildError("only encrypted messages carry a decoding handle")
    if message_type == PLAINTEXT:
        if not is_printing(contents):
            raise BuildError("plaintext contents must be printing characters")
        text = armor(MESSAGE_ARMOR_NAME, headers, _DASH_LINE.sub(b"- -", contents), literal=True)
    else:
        text = armor(MESSAGE_ARMOR_NAME, headers, contents)
    return text.encode("latin-1")


def text_for_delivery(result: Classification, tag: Optional[bytes] = None) -> bytes:
    """The text an SMTP/MBOX exit delivers for a classified payload
    (``tag`` is needed for an encrypted one)."""
    if isinstance(result, Plain):
        return encode_text_message(result.body, choose_message_type(result.body))
    if isinstance(result, Overcompressed):
        return encode_text_message(result.compressed, OVERCOMPRESSED)
    if isinstance(result, Encrypted):
        return encode_text_message(result.payload, ENCRYPTED, tag)
    if isinstance(result, FragmentPiece):
        raw = result.fragment.to_bytes()
        return encode_text_message(raw, choose_message_type(raw, fragment=True))
    raise BuildError(f"a corrupt payload is not delivered ({result.reason})")


def _decode_block(headers: dict[str, str], raw: bytes) -> TextMessage:
    message_type = headers.get("Message-type", PLAINTEXT)
    tag = None
    if "Decoding-handle" in headers:
        message_type = ENCRYPTED
        try:
            tag = base64.b64decode(headers["Decoding-handle"].strip(), validate=True)
        except (binascii.Error, ValueError):
            raise ParseError("decoding handle is not base64") from None
        if len(tag) != TAG_LEN:
            raise ParseError("decoding handle is not 20 bytes")
    if message_type not in MESSAGE_TYPES:
        raise ParseError(f"unknown message type {message_type!r}")
    if message_type == PLAINTEXT:
        return TextMessage(PLAINTEXT, _ESCAPED_LINE.sub(b"", raw))
    return TextMessage(message_type, decode_base64_body(raw.decode("latin-1")), tag)


def parse_text_messages(text: Union[str, bytes]) -> list[TextMessage]:
    """Every ``TYPE III ANONYMOUS MESSAGE`` in ``text`` (e.g. an e-mail)."""
    return [
        _decode_block(block.headers, block.body)
        for block in dearmor_all(text, base64_body=False)
        if block.type_name == MESSAGE_ARMOR_NAME
    ]


def parse_text_message(text: Union[str, bytes]) -> TextMessage:
    """Exactly one armored message."""
    found = parse_text_messages(text)
    if len(found) != 1:
        raise ParseError(f"expected one anonymous message, found {len(found)}")
    return found[0]
