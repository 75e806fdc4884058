"""ASCII armor shared by delivered messages and reply blocks.

::

    -----BEGIN <TYPE>-----
    Name: value
    <empty line>
    <body>
    -----END <TYPE>-----

Every line ends in ``\\n``.  Binary bodies are base64 in lines of 64
characters (48 bytes); a literal body (dash-escaped plaintext, packet.md
§14.1) is inserted as is.  Text is handled as ``str``; bytes 0x80-0xFF of a
literal body map to the same code points (latin-1), so callers that need
bytes encode the result with ``"latin-1"``.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Iterable, Mapping, NamedTuple, Union

from mixminion.codec.errors import BuildError, ParseError

BASE64_LINE_BYTES = 48  # 64 characters per line
TRUNCATION_MARK = "[...]"

Headers = Union[Mapping[str, str], Iterable[tuple[str, str]]]

_BEGIN = re.compile(r"^-----BEGIN ([^\r\n]+?)-----\r?$", re.M)
_HEADER = re.compile(r"([^:\s]+):[ \t]*(.*?)\r?\Z")
_ARMOR_LINE = re.compile(r"^-----(?:BEGIN|END) ", re.M)
_TRUNCATED = re.compile(r"^[ \t]*\[\.\.\.\]", re.M)
_WHITESPACE = re.compile(r"\s+")


class Armored(NamedTuple):
    """One armored block; ``body`` is decoded bytes for base64 bodies, or
    the raw body text (latin-1 bytes) when parsed with ``base64_body=False``."""

    type_name: str
    headers: dict[str, str]
    body: bytes


def base64_lines(data: bytes) -> str:
    """Base64 in 64-character lines, each ending in ``\\n``."""
    return "".join(
        base64.b64encode(data[i : i + BASE64_LINE_BYTES]).decode("ascii") + "\n"
        for i in range(0, len(data), BASE64_LINE_BYTES)
    )


def decode_base64_body(text: str) -> bytes:
    """Decode a base64 body, refusing one marked as truncated."""
    if _TRUNCATED.search(text):
        raise ParseError("armored body was truncated ([...])")
    try:
        return base64.b64decode(_WHITESPACE.sub("", text), validate=True)
    except (binascii.Error, ValueError):
        raise ParseError("armored body is not valid base64") from None


def _header_items(headers: Headers) -> list[tuple[str, str]]:
    items = list(headers.items()) if isinstance(headers, Mapping) else list(headers)
    for name, value in items:
        if not name or ":" in name or any(c.isspace() for c in name):
            raise BuildError(f"invalid armor header name {name!r}")
        if "\n" in value or "\r" in value:
            raise BuildError(f"armor header {name} contains a line break")
    return items


def armor(type_name: str, headers: Headers, body: bytes, literal: bool = False) -> str:
    """Armor ``body``: base64 unless ``literal``, in which case ``body`` is
    already escaped text and only gets a final newline if it lacks one."""
    if not type_name or "\n" in type_name or "-----" in type_name:
        raise BuildError(f"invalid armor type {type_name!r}")
    out = [f"-----BEGIN {type_name}-----\n"]
    out.extend(f"{name}: {value}\n" for name, value in _header_items(headers))
    out.append("\n")
    if literal:
        text = body.decode("latin-1")
        if not text.endswith("\n"):
            text += "\n"
        if _ARMOR_LINE.search(text):
            raise BuildError("literal armor body contains an armor line; escape it")
        out.append(text)
    else:
        out.append(base64_lines(body))
    out.append(f"-----END {type_name}-----\n")
    return "".join(out)


def _as_text(text: Union[str, bytes]) -> str:
    if isinstance(text, (bytes, bytearray, memoryview)):
        return bytes(text).decode("latin-1")
    if any(ord(c) > 0xFF for c in text):
        raise ParseError("armored text contains characters beyond latin-1")
    return text


def _parse_headers(text: str, pos: int) -> tuple[dict[str, str], int]:
    """Header lines from ``pos`` up to the empty line; returns the position
    after that empty line."""
    headers: dict[str, str] = {}
    while True:
        nl = text.find("\n", pos)
        if nl < 0:
            raise ParseError("armored block ends inside its headers")
        line = text[pos:nl]
        pos = nl + 1
        if line in ("", "\r"):
            return headers, pos
        m = _HEADER.match(line)
        if m is None:
            raise ParseError(f"malformed armor header line {line[:40]!r}")
        headers[m.group(1)] = m.group(2)


def dearmor_all(text: Union[str, bytes], base64_body: bool = True) -> list[Armored]:
    """Every armored block in ``text`` (text around them is ignored)."""
    text = _as_text(text)
    blocks: list[Armored] = []
    pos = 0
    while True:
        begin = _BEGIN.search(text, pos)
        if begin is None:
            return blocks
        type_name = begin.group(1)
        start = begin.end() + 1
        if start > len(text):
            raise ParseError("armored block ends after its BEGIN line")
        headers, body_start = _parse_headers(text, start)
        end_re = re.compile(rf"^-----END {re.escape(type_name)}-----\r?$", re.M)
        end = end_re.search(text, body_start)
        if end is None:
            raise ParseError(f"missing END line for {type_name}")
        raw = text[body_start : end.start()]
        body = decode_base64_body(raw) if base64_body else raw.encode("latin-1")
        blocks.append(Armored(type_name, headers, body))
        pos = end.end()


def dearmor(text: Union[str, bytes], base64_body: bool = True) -> Armored:
    """Exactly one armored block."""
    blocks = dearmor_all(text, base64_body)
    if len(blocks) != 1:
        raise ParseError(f"expected one armored block, found {len(blocks)}")
    return blocks[0]
