"""The restricted text format shared by descriptors and directories.

descriptors.md §2 (sections and ``Key: value`` lines), §3 (value types),
§5.1-§5.3 (canonical "cleaning", the digest over a text whose signature
lines are blanked, and signing).  Kept apart from the descriptor schema so
that a directory parser can reuse the section parser, the value decoders
and the digest/sign functions with its own field names
(``DirectoryDigest``/``DirectorySignature``).
"""

from __future__ import annotations

import base64
import binascii
import calendar
import datetime
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional, Tuple

from mixminion.codec.crypto import RandomSource, sha1
from mixminion.codec.errors import BuildError, CryptoError, ParseError
from mixminion.codec.rsa import MAX_PUBLIC_KEY_DER, PrivateKey, PublicKey

SECONDS_PER_DAY = 86400


class TextFormatError(ParseError):
    """The text breaks the restricted format or a value has the wrong type."""


# --- characters, line endings, canonical form -------------------------------

_FORBIDDEN_CHAR = re.compile(r"[^\x20-\x7e\t\n\x0b\r]")
_EDGE_BLANKS = re.compile(r"^[ \t]+|[ \t]+$", re.MULTILINE)


def normalise_newlines(text: str) -> str:
    """Every CR LF and every lone CR becomes LF (§2 rule 2, §5.1 step 1)."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def as_text(data: str | bytes) -> str:
    """Check §2 rule 1 (printing ASCII, TAB, LF, VT, CR only) and return a str.

    Bytes are decoded byte-for-character so that any 8-bit byte is reported
    as a forbidden character rather than as a decoding error.
    """
    text = data.decode("latin-1") if isinstance(data, (bytes, bytearray)) else data
    bad = _FORBIDDEN_CHAR.search(text)
    if bad is not None:
        line = normalise_newlines(text[: bad.start()]).count("\n") + 1
        raise TextFormatError(
            f"line {line}: character {ord(bad.group()):#04x} is not allowed "
            "(only printing ASCII, TAB, LF, VT and CR)"
        )
    return text


def clean(text: str) -> str:
    """The canonical form that digests are computed over (§5.1).

    Survives CRLF conversion and re-indentation in transit (§9).
    """
    cleaned = _EDGE_BLANKS.sub("", normalise_newlines(text))
    return cleaned if cleaned.endswith("\n") else cleaned + "\n"


def _signature_lines(digest_key: str, signature_key: str) -> re.Pattern[str]:
    keys = "|".join(re.escape(k) for k in (digest_key, signature_key))
    return re.compile(rf"^({keys}):.*$", re.MULTILINE)


def blank_signature_lines(
    cleaned: str, digest_key: str = "Digest", signature_key: str = "Signature"
) -> str:
    """Empty the values of the first two lines naming either key (§5.2 step 2)."""
    return _signature_lines(digest_key, signature_key).sub(r"\1:", cleaned, count=2)


def document_digest(
    text: str | bytes, digest_key: str = "Digest", signature_key: str = "Signature"
) -> bytes:
    """SHA-1 of the cleaned text with its digest and signature values blanked."""
    blanked = blank_signature_lines(clean(as_text(text)), digest_key, signature_key)
    return sha1(blanked.encode("ascii"))


def sign_document(
    unsigned: str,
    key: PrivateKey,
    rng: RandomSource,
    digest_key: str = "Digest",
    signature_key: str = "Signature",
) -> str:
    """Clean ``unsigned``, sign its digest and fill in both lines (§5.3).

    The first two lines naming either key must be one of each; their values
    (normally empty) are replaced.
    """
    pattern = _signature_lines(digest_key, signature_key)
    blanked = pattern.sub(r"\1:", clean(as_text(unsigned)), count=2)
    matches = list(pattern.finditer(blanked))[:2]
    if sorted(m.group(1) for m in matches) != sorted((digest_key, signature_key)):
        raise BuildError(
            f"the first two {digest_key}:/{signature_key}: lines must be one of each"
        )
    digest = sha1(blanked.encode("ascii"))
    values = {digest_key: encode_base64(digest), signature_key: encode_base64(key.sign(digest, rng))}
    out = blanked
    for m in reversed(matches):
        out = out[: m.start()] + f"{m.group(1)}: {values[m.group(1)]}" + out[m.end() :]
    return out


# --- sections ------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One ``Key: value`` line; ``line`` is 1-based, for error messages."""

    key: str
    value: str
    line: int


@dataclass(frozen=True)
class Section:
    """A ``[Name]`` header and the entries under it, in text order."""

    name: str
    line: int
    entries: Tuple[Entry, ...]


_SECTION_HEADER = re.compile(r"\[\s*([^\s\]]+)\s*\]")


def _split_lines(text: str) -> list[str]:
    lines = normalise_newlines(text).split("\n")
    if lines[-1] == "":
        lines.pop()
    if not any(line.strip() for line in lines):
        raise TextFormatError("the document is empty")
    return lines


def parse_sections(data: str | bytes) -> Tuple[Section, ...]:
    """Split a document into sections (§2 rules 1-6); values are not decoded."""
    sections: list[Section] = []
    seen: dict[str, int] = {}
    name: Optional[str] = None
    header_line = 0
    entries: list[Entry] = []
    for number, raw in enumerate(_split_lines(as_text(data)), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            what = "blank line" if not line else "comment"
            raise TextFormatError(f"line {number}: {what} (not allowed in this format)")
        if line.startswith("["):
            match = _SECTION_HEADER.match(line)
            if match is None:
                raise TextFormatError(f"line {number}: malformed section header {line!r}")
            if name is not None:
                sections.append(Section(name, header_line, tuple(entries)))
            name, header_line, entries = match.group(1), number, []
            if name in seen:
                raise TextFormatError(
                    f"line {number}: section [{name}] repeated (first at line {seen[name]})"
                )
            seen[name] = number
            continue
        colon = line.find(":")
        if colon < 1:
            raise TextFormatError(f"line {number}: expected 'Key: value' or '[Section]', got {line!r}")
        if name is None:
            raise TextFormatError(f"line {number}: entry before the first section header")
        entries.append(Entry(line[:colon].strip(), line[colon + 1 :].strip(), number))
    if name is not None:
        sections.append(Section(name, header_line, tuple(entries)))
    return tuple(sections)


# --- field schemas -------------------------------------------------------------------

Decoder = Callable[[str], Any]


@dataclass(frozen=True)
class Rule:
    """How one key of a section is read: its decoder and how often it occurs."""

    decode: Decoder
    required: bool = False
    many: bool = False


def required(decode: Decoder) -> Rule:
    return Rule(decode, required=True)


def optional(decode: Decoder) -> Rule:
    return Rule(decode)


def repeated(decode: Decoder) -> Rule:
    """Optional, may repeat; read as a tuple in text order."""
    return Rule(decode, many=True)


Schema = Mapping[str, Rule]


@dataclass(frozen=True)
class Fields:
    """The decoded values of one section; ``lines`` locate them for messages."""

    section: str
    values: Mapping[str, Any]
    lines: Mapping[str, int]

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def where(self, key: str, line_offset: int = 0) -> str:
        """``line N: [Section] Key`` - the prefix of every field error message.

        ``line_offset`` counts lines from the whole text when the section
        was parsed out of a part of it.
        """
        return f"line {self.lines[key] + line_offset}: [{self.section}] {key}"


def read_fields(section: Section, schema: Schema, *, strict: bool = False) -> tuple[Fields, list[str]]:
    """Decode ``section`` against ``schema`` (§2 rules 7-9).

    Unknown keys are errors when ``strict``, otherwise warnings (returned).
    Repeated keys (``many``) become tuples, possibly empty.
    """
    values: dict[str, Any] = {}
    lines: dict[str, int] = {}
    warnings: list[str] = []
    here = f"[{section.name}]"
    for entry in section.entries:
        rule = schema.get(entry.key)
        where = f"line {entry.line}: {here} {entry.key}"
        if rule is None:
            if strict:
                raise TextFormatError(f"{where}: unknown key")
            warnings.append(f"{where}: unknown key ignored")
            continue
        if entry.key in lines and not rule.many:
            raise TextFormatError(f"{where}: repeated (first at line {lines[entry.key]})")
        try:
            value = rule.decode(entry.value)
        except ValueError as exc:
            raise TextFormatError(f"{where}: {exc}") from None
        lines.setdefault(entry.key, entry.line)
        if rule.many:
            values.setdefault(entry.key, []).append(value)
        else:
            values[entry.key] = value
    for key, rule in schema.items():
        if rule.required and key not in values:
            raise TextFormatError(f"line {section.line}: {here} missing required field {key}")
        if rule.many:
            values[key] = tuple(values.get(key, ()))
    return Fields(section.name, values, lines), warnings


def read_sections(
    sections: Iterable[Section],
    schemas: Mapping[str, Schema],
    *,
    accept: Optional[Callable[[Section, list[str]], bool]] = None,
    line_offset: int = 0,
) -> tuple[dict[str, Fields], list[str]]:
    """Decode every section ``schemas`` names; the rest are warnings (§2 rule 7).

    ``accept`` may pass over a known section (adding its own warning);
    ``line_offset`` is added to the lines of the unknown-section warnings.
    Returns the fields by section name and all the warnings.
    """
    fields: dict[str, Fields] = {}
    warnings: list[str] = []
    for section in sections:
        schema = schemas.get(section.name)
        if schema is None:
            warnings.append(f"line {section.line + line_offset}: unknown section [{section.name}] ignored")
            continue
        if accept is not None and not accept(section, warnings):
            continue
        fields[section.name], unknown = read_fields(section, schema)
        warnings.extend(unknown)
    return fields, warnings


# --- value decoders (§3); each raises ValueError saying what is wrong ---------------


def decode_string(max_length: Optional[int] = None) -> Decoder:
    def decode(value: str) -> str:
        if max_length is not None and len(value) > max_length:
            raise ValueError(f"{len(value)} characters long; at most {max_length} allowed")
        return value

    return decode


_DIGITS = re.compile(r"[0-9]+")


def decode_int(value: str, low: int = 0, high: Optional[int] = None) -> int:
    """Non-negative decimal; no sign, no underscores (nothing here is negative)."""
    if not _DIGITS.fullmatch(value):
        raise ValueError(f"{value!r} is not a decimal integer")
    number = int(value)
    if number < low or (high is not None and number > high):
        bound = f"{low}..{high}" if high is not None else f">= {low}"
        raise ValueError(f"{number} is out of range ({bound})")
    return number


def decode_port(value: str) -> int:
    return decode_int(value, 1, 65535)


_TRUE = frozenset({"1", "yes", "y", "true", "on"})
_FALSE = frozenset({"0", "no", "n", "false", "off"})


def decode_bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"{value!r} is not a boolean (yes/no)")


def decode_list(value: str) -> Tuple[str, ...]:
    """Comma-separated, items stripped; an empty value is one empty item."""
    return tuple(item.strip() for item in value.split(","))


def decode_seq(value: str) -> Tuple[str, ...]:
    return tuple(value.split())


def decode_base64(value: str) -> bytes:
    """Standard base64; stray non-alphabet characters are ignored (§9 rule 3)."""
    try:
        return base64.b64decode(value.encode("ascii"))
    except (binascii.Error, ValueError):
        raise ValueError("not valid base64 (bad length or padding)") from None


def encode_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def load_public_key(der: bytes, min_bytes: int, max_bytes: int) -> PublicKey:
    """A publicKey value (§3) whose modulus is ``min_bytes..max_bytes`` long."""
    if len(der) > MAX_PUBLIC_KEY_DER:
        raise ValueError(f"key is {len(der)} bytes after base64 decoding; at most {MAX_PUBLIC_KEY_DER} allowed")
    try:
        key = PublicKey.from_der(der)
    except CryptoError as exc:
        raise ValueError(str(exc)) from None
    if not min_bytes <= key.size_bytes <= max_bytes:
        want = f"{min_bytes * 8} bits" if min_bytes == max_bytes else f"{min_bytes * 8}-{max_bytes * 8} bits"
        raise ValueError(f"modulus is {key.n.bit_length()} bits; must be {want}")
    return key


_TIME = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2}) ([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.[0-9]{3})?")
_DATE = re.compile(r"([0-9]{4})([-/])([0-9]{2})\2([0-9]{2})")


def _calendar_day(value: str, year: int, month: int, day: int) -> None:
    if year < 1970:
        raise ValueError(f"{value!r}: year before 1970")
    try:
        datetime.date(year, month, day)
    except ValueError:
        raise ValueError(f"{value!r} is not a calendar date") from None


def decode_time(value: str) -> int:
    """``YYYY-MM-DD HH:MM:SS[.ddd]`` GMT, as seconds (the fraction is dropped)."""
    match = _TIME.fullmatch(value)
    if match is None:
        raise ValueError(f"{value!r} is not a time (YYYY-MM-DD HH:MM:SS)")
    year, month, day, hour, minute, second = (int(g) for g in match.groups())
    _calendar_day(value, year, month, day)
    if hour > 23 or minute > 59 or second > 61:
        raise ValueError(f"{value!r}: time of day out of range")
    return calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))


def decode_date(value: str) -> int:
    """``YYYY-MM-DD`` (or legacy ``YYYY/MM/DD``): midnight GMT, as seconds."""
    match = _DATE.fullmatch(value)
    if match is None:
        raise ValueError(f"{value!r} is not a date (YYYY-MM-DD)")
    year, month, day = int(match.group(1)), int(match.group(3)), int(match.group(4))
    _calendar_day(value, year, month, day)
    return calendar.timegm((year, month, day, 0, 0, 0, 0, 0, 0))


_NICKNAME = re.compile(r"[A-Za-z][A-Za-z0-9-]{0,23}")
_HOSTNAME = re.compile(r"[A-Za-z0-9-][A-Za-z0-9.-]*")
MAX_HOSTNAME = 255


def decode_nickname(value: str) -> str:
    if not _NICKNAME.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a nickname (1-24 characters of A-Z a-z 0-9 -, starting with a letter)"
        )
    return value


def decode_host(value: str) -> str:
    if not _HOSTNAME.fullmatch(value) or ".." in value or len(value) > MAX_HOSTNAME:
        raise ValueError(
            f"{value!r} is not a hostname (A-Z a-z 0-9 . -, not starting with '.', "
            f"no '..', at most {MAX_HOSTNAME} characters)"
        )
    return value


_IPV4 = re.compile(r"([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})")


def decode_ip(value: str) -> str:
    match = _IPV4.fullmatch(value)
    if match is None or any(int(octet) > 255 for octet in match.groups()):
        raise ValueError(f"{value!r} is not a dotted-quad IPv4 address")
    return value


_ADDRESS_RULE = re.compile(r"(\*|[0-9.]+)(?:/([0-9.]+))?(?:\s+([0-9]+)(?:-([0-9]+))?)?")


def decode_address_rule(value: str) -> str:
    """``IP[/MASK] [PORT[-PORT]]`` or ``* [PORT[-PORT]]``; kept as written."""
    match = _ADDRESS_RULE.fullmatch(value)
    if match is None:
        raise ValueError(f"{value!r} is not an address rule (IP[/MASK] [PORT[-PORT]])")
    address, mask, low, high = match.groups()
    if address == "*":
        if mask is not None:
            raise ValueError(f"{value!r}: '*' cannot take a mask")
    else:
        decode_ip(address)
    if mask is not None:
        decode_ip(mask)
    if low is not None:
        first = decode_int(low, 1, 65535)
        if high is not None and decode_int(high, 1, 65535) < first:
            raise ValueError(f"{value!r}: empty port range")
    return value


# --- producing -------------------------------------------------------------------


def format_time(t: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))


def format_date(t: int) -> str:
    """The GMT day containing ``t + 1`` s (§3 date formatting rule)."""
    return time.strftime("%Y-%m-%d", time.gmtime(t + 1))


def format_bool(value: bool) -> str:
    return "yes" if value else "no"


def format_list(items: Iterable[str]) -> str:
    return ", ".join(items)


def previous_midnight(t: int) -> int:
    """Midnight GMT at or before ``t``."""
    return t - t % SECONDS_PER_DAY


def is_midnight(t: int) -> bool:
    return t % SECONDS_PER_DAY == 0


def require_midnights(**dates: int) -> None:
    """BuildError unless every date given (by its name) is a midnight GMT."""
    for name, value in dates.items():
        if not is_midnight(value):
            raise BuildError(f"{name} {value} is not a midnight GMT (dates have no time of day)")


_PRINTABLE_VALUE = re.compile(r"[\x20-\x7e]*")


class Line(NamedTuple):
    key: str
    value: str


def render_document(sections: Iterable[tuple[str, Iterable[Line]]]) -> str:
    """Emit sections in producer form (§2): no blanks, ``Key: value``, final LF.

    Values must already be what a reader will see: one line of printing
    ASCII without surrounding blanks.  An empty value is written ``Key:``.
    """
    out: list[str] = []
    for name, lines in sections:
        if not _SECTION_HEADER.fullmatch(f"[{name}]"):
            raise BuildError(f"bad section name {name!r}")
        out.append(f"[{name}]")
        for key, value in lines:
            _check_renderable(name, key, value)
            out.append(f"{key}: {value}" if value else f"{key}:")
    return "\n".join(out) + "\n"


def _check_renderable(section: str, key: str, value: str) -> None:
    if not key or ":" in key or key != key.strip() or key.startswith(("[", "#")):
        raise BuildError(f"[{section}]: bad key {key!r}")
    if not _PRINTABLE_VALUE.fullmatch(key + value):
        raise BuildError(f"[{section}] {key}: value must be one line of printing ASCII: {value!r}")
    if value != value.strip():
        raise BuildError(f"[{section}] {key}: value has leading or trailing blanks: {value!r}")
