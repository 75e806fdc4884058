"""The exit header block carried inside a message (spec: packet.md §13.1).

The sender prepends ``NAME:VALUE\\n`` lines (sorted by name) and an empty
line to the body before compressing; the exit parses them back off so it
can set the e-mail's Subject, From, In-Reply-To and References.  Parsing
mirrors the reference exactly, including its leniency: a line that does not
match ends header parsing and the whole message becomes the body.
"""

from __future__ import annotations

import re
from typing import Mapping

from mixminion.codec.errors import BuildError

MAX_HEADER_LEN = 900
#: the names the reference client uses
STANDARD_HEADERS = ("SUBJECT", "FROM", "IN-REPLY-TO", "REFERENCES")
FROM_FORBIDDEN = frozenset('"[]:')

_NAME = re.compile(r"[!-9;-~]+\Z")
_VALUE = re.compile(r"[ -~]*\Z")
_LINE = re.compile(rb"([!-9;-~]+):([ -~]*)\n")


def _check_header(name: str, value: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise BuildError(f"invalid exit header name {name!r}")
    if not isinstance(value, str) or not _VALUE.match(value):
        raise BuildError(f"invalid characters in exit header {name}")
    if len(value) > MAX_HEADER_LEN:
        raise BuildError(f"exit header {name} is longer than {MAX_HEADER_LEN} characters")
    if name.upper() == "FROM" and FROM_FORBIDDEN.intersection(value):
        raise BuildError('FROM header must not contain ", [, ] or :')


def encode_headers(headers: Mapping[str, str]) -> bytes:
    """The header block: sorted ``NAME:VALUE\\n`` lines, then ``\\n``."""
    lines = []
    for name in sorted(headers):
        value = headers[name]
        _check_header(name, value)
        lines.append(f"{name}:{value}\n")
    lines.append("\n")
    return "".join(lines).encode("ascii")


def encode_message(headers: Mapping[str, str], body: bytes) -> bytes:
    """What the client compresses: header block followed by the body."""
    return encode_headers(headers) + body


def parse_message(message: bytes, partial_headers: bool = True) -> tuple[dict[str, str], bytes]:
    """Split a decompressed message into ``(headers, body)``.

    Repeat: a ``\\n`` ends the headers and the body is what follows; a
    matching line is recorded (values over 900 characters are skipped; a
    repeated name keeps its last value); anything else abandons parsing and
    the *whole* message is the body.  In that last case the reference still
    reports the headers it had parsed (``partial_headers=True``, as in the
    vectors); ``False`` drops them as packet.md §13.1 words it.
    """
    headers: dict[str, str] = {}
    pos = 0
    while True:
        if message[pos : pos + 1] == b"\n":
            return headers, message[pos + 1 :]
        m = _LINE.match(message, pos)
        if m is None:
            return (headers if partial_headers else {}), message
        value = m.group(2)
        if len(value) <= MAX_HEADER_LEN:
            headers[m.group(1).decode("ascii")] = value.decode("ascii")
        pos = m.end()
