"""The value types of configuration files (server.md §14.2).

Each is a :class:`ValueType` that parses the text of a value (raising
ValueError whose message is the whole reason) and prints it back in its
canonical form.  Schemas (:mod:`mixminion.config.schema`) give each option
one of these; nothing else parses configuration values.
"""

from __future__ import annotations

import ipaddress
import math
import os
import pwd
import re
import shlex
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable, Mapping, Optional

from mixminion.codec.errors import ParseError
from mixminion.codec.routing import check_smtp_address
from mixminion.config.intervals import (
    format_interval,
    format_retry_schedule,
    parse_interval,
    parse_retry_schedule,
)
from mixminion.codec import textformat


@dataclass(frozen=True)
class ValueType:
    """How one kind of value is read and written back.

    ``parse`` raises ValueError whose message is the whole reason, e.g.
    ``"ten minutes" is not an interval (expected NUMBER UNIT, ...)``.
    """

    name: str
    parse: Callable[[str], Any]
    format: Callable[[Any], str] = str


def _not_a(text: str, what: str, hint: str) -> ValueError:
    return ValueError(f'"{text}" is not {what} ({hint})')


def _reword(check: Callable[[str], Any], error: Callable[[str, Exception], ValueError]) -> Callable[[str], Any]:
    """A parser reusing a validator from elsewhere, with our wording (``error(text, exc)``)."""
    def parse(text: str) -> Any:
        try:
            return check(text)
        except (ValueError, ParseError) as exc:
            raise error(text, exc) from None
    return parse


def _wrap(what: str, hint: str, check: Callable[[str], Any]) -> Callable[[str], Any]:
    """``check``, its failures worded ``"TEXT" is not WHAT (HINT)``."""
    return _reword(check, lambda text, _exc: _not_a(text, what, hint))


def _format_bool(value: bool) -> str:
    return "yes" if value else "no"


def _parse_int(text: str) -> int:
    if not re.fullmatch(r"[+-]?[0-9]+", text):
        raise _not_a(text, "an integer", "expected decimal digits, e.g. 16")
    return int(text)


def _parse_port(text: str) -> int:
    number = _parse_int(text)
    if not 1 <= number <= 65535:
        raise ValueError(f'"{text}" is not a TCP port (expected 1-65535)')
    return number


_SIZE_UNITS: Mapping[str, int] = {
    "": 1, "b": 1, "byte": 1, "octet": 1,
    "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
    "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
    "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30,
}
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)")


def _size_unit(unit: str) -> Optional[int]:
    unit = unit.lower()
    if unit in _SIZE_UNITS:
        return _SIZE_UNITS[unit]
    if unit.endswith("s") and unit[:-1] in _SIZE_UNITS and unit != "s":
        return _SIZE_UNITS[unit[:-1]]
    return None


def parse_size(text: str) -> int:
    """``NUMBER [UNIT]`` in bytes; K/M/G are powers of 1024; the whole text
    must be consumed (the reference read ``1 GB`` as 1 byte)."""
    match = _SIZE.fullmatch(text.strip())
    unit = _size_unit(match.group(2)) if match else None
    if match is None or unit is None:
        raise _not_a(text, "a size", 'expected NUMBER [b|KB|MB|GB], e.g. "100 KB"')
    return math.floor(Fraction(match.group(1)) * unit)


def format_size(value: int) -> str:
    """Canonical size (§14.11): ``100 KB``, ``1 GB``, ``12 bytes``."""
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if value and value % size == 0:
            return f"{value // size} {unit}"
    return f"{value} byte" if value == 1 else f"{value} bytes"


def _parse_fraction(text: str) -> float:
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(%?)", text.strip())
    if match is None:
        raise _not_a(text, "a fraction", 'expected a percentage such as "60%" or a number such as 0.6')
    value = Fraction(match.group(1)) / (100 if match.group(2) else 1)
    if value > 1:
        raise ValueError(f'"{text}" is not a fraction between 0 and 1 (0%-100%)')
    return float(value)


SEVERITIES = ("TRACE", "DEBUG", "INFO", "WARN", "ERROR", "FATAL", "NEVER")


def _parse_severity(text: str) -> str:
    if text.upper() not in SEVERITIES:
        raise _not_a(text, "a log severity", "expected one of " + " ".join(SEVERITIES))
    return text.upper()


def _parse_filename(text: str) -> str:
    """Quotes stripped, ``~`` expanded; made absolute later, when the base
    directory is known."""
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]
    if not text:
        raise ValueError('"" is not a filename (expected a path)')
    return os.path.expanduser(text)


def _parse_command(text: str) -> tuple[str, ...]:
    """Split like a shell would (quotes allowed); that the program exists
    is checked only for options in use."""
    try:
        argv = tuple(shlex.split(text))
    except ValueError as exc:
        raise _not_a(text, "a command", str(exc)) from None
    if not argv:
        raise _not_a(text, "a command", "expected PROGRAM [ARGUMENTS...]")
    return argv


def _parse_user(text: str) -> int:
    """A user name or numeric UID, as a UID."""
    if text.isdigit():
        return int(text)
    try:
        return pwd.getpwnam(text).pw_uid
    except KeyError:
        raise ValueError(f'"{text}" is not a user on this system (expected a user name or UID)') from None


def _parse_email(text: str) -> str:
    try:
        check_smtp_address(text.encode("ascii"))
    except ParseError as exc:
        raise _not_a(text, "an e-mail address", f"{exc}; expected local@domain") from None
    return text


def _parse_ipv6(text: str) -> str:
    try:
        return ipaddress.IPv6Address(text).compressed
    except ValueError:
        raise _not_a(text, "an IPv6 address", 'expected e.g. "::1" or "2001:db8::1"') from None


def _parse_any_ip(text: str) -> str:
    try:
        return ipaddress.ip_address(text).compressed
    except ValueError:
        raise _not_a(text, "an IP address", 'expected e.g. "127.0.0.1" or "::1"') from None


def _string(max_length: Optional[int] = None) -> Callable[[str], str]:
    """Any text of at most ``max_length`` characters (the descriptors' rule)."""
    return _reword(textformat.decode_string(max_length), lambda _text, exc: ValueError(f"value is {exc}"))


_CLASS_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+")


def _parse_class_name(text: str) -> str:
    if not _CLASS_NAME.fullmatch(text):
        raise _not_a(text, "a module class", "expected package.module.Class")
    return text


def _parse_path_list(text: str) -> tuple[str, ...]:
    return tuple(os.path.expanduser(p) for p in text.split(":") if p)


@dataclass(frozen=True)
class Authority:
    """A directory authority: where to fetch from/upload to, and the
    fingerprint (hex SHA-1 of its identity key) its signatures must match."""

    url: str
    fingerprint: str

    def __str__(self) -> str:
        return f"{self.url} {self.fingerprint}"


def _parse_authority(text: str) -> Authority:
    url, _, rest = text.partition(" ")
    fingerprint = "".join(rest.split()).upper()
    if not re.fullmatch(r"https?://\S+", url) or not re.fullmatch(r"[0-9A-F]{40}", fingerprint):
        raise _not_a(text, "a directory authority",
                     "expected URL FINGERPRINT, the fingerprint being 40 hex digits")
    return Authority(url, fingerprint)


_HOST_HINT = "expected letters, digits, '.' and '-', e.g. mix.example.org"

BOOLEAN = ValueType("boolean", _wrap("a boolean", "expected yes/no, true/false, on/off or 1/0",
                                     textformat.decode_bool), _format_bool)
INT = ValueType("int", _parse_int)
PORT = ValueType("port", _parse_port)
INTERVAL = ValueType("interval", parse_interval, format_interval)
INTERVAL_LIST = ValueType("interval list", parse_retry_schedule, format_retry_schedule)
SIZE = ValueType("size", parse_size, format_size)
FRACTION = ValueType("fraction", _parse_fraction, lambda v: f"{v * 100:.2f}%")
SEVERITY = ValueType("severity", _parse_severity)
FILENAME = ValueType("filename", _parse_filename)
COMMAND = ValueType("command", _parse_command, shlex.join)
USER = ValueType("user", _parse_user)
EMAIL = ValueType("email", _parse_email)
NICKNAME = ValueType("nickname", _wrap("a nickname", "expected 1-24 characters of A-Z a-z 0-9 -, "
                                                    "starting with a letter", textformat.decode_nickname))
HOST = ValueType("host", _wrap("a hostname", _HOST_HINT, textformat.decode_host))
IP = ValueType("IP", _wrap("an IPv4 address", "expected a dotted quad, e.g. 192.0.2.7", textformat.decode_ip))
IPV6 = ValueType("IPv6", _parse_ipv6)
ANY_IP = ValueType("IP or IPv6", _parse_any_ip)
STRING = ValueType("string", _string())
CLASS_NAME = ValueType("class name", _parse_class_name)
PATH_LIST = ValueType("path list", _parse_path_list, ":".join)
AUTHORITY = ValueType("authority", _parse_authority)


def limited(max_length: int) -> ValueType:
    return ValueType("string", _string(max_length))
