"""Reading a delivery section (spec: server.md §14.2 value formats, §14.9).

Sections may arrive as the raw strings of the configuration file or with
values the node has already parsed; every reader accepts both.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import shutil
from typing import Any, Callable, Iterable, Mapping, Optional, TypeVar

from mixminion.exits.errors import ExitConfigError

T = TypeVar("T")

_TRUE = frozenset({"yes", "y", "true", "on", "1"})
_FALSE = frozenset({"no", "n", "false", "off", "0"})

_DAY = 86400
_INTERVAL_UNITS = {
    "sec": 1, "second": 1, "min": 60, "minute": 60, "hour": 3600, "day": _DAY,
    "week": 7 * _DAY, "mon": 30 * _DAY, "month": 30 * _DAY, "year": 365 * _DAY,
}
_INTERVAL = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s+([a-z]+?)s?\s*\Z", re.I)
_SIZE_UNITS = {"": 1, "b": 1, "byte": 1, "octet": 1, "k": 1024, "kb": 1024,
               "m": 1 << 20, "mb": 1 << 20, "g": 1 << 30, "gb": 1 << 30}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*?)s?\s*\Z", re.I)
_EVERY_FOR = re.compile(r"\s*(?:every\s+)?(.+?)\s+for\s+(.+?)\s*\Z", re.I)


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"expected a boolean (yes/no), not {value!r}")


def parse_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("expected an integer")
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if not re.fullmatch(r"[+-]?\d+", text):
        raise ValueError(f"expected an integer, not {value!r}")
    return int(text)


def parse_interval(value: Any) -> int:
    """``NUMBER UNIT`` (fractions allowed, truncated to whole seconds); an
    int or float is taken as seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    m = _INTERVAL.match(str(value))
    if not m or m.group(2).lower() not in _INTERVAL_UNITS:
        raise ValueError(f"expected an interval such as '2 days', not {value!r}")
    return int(float(m.group(1)) * _INTERVAL_UNITS[m.group(2).lower()])


def parse_schedule(value: Any) -> list[int]:
    """A retry schedule: comma-separated ``INTERVAL`` or
    ``[every] INTERVAL for DURATION`` items (server.md §6.1); a list of
    seconds is taken as it is."""
    if isinstance(value, (list, tuple)):
        return [parse_interval(v) for v in value]
    out: list[int] = []
    for item in str(value).split(","):
        if not item.strip():
            raise ValueError("empty item in retry schedule")
        m = _EVERY_FOR.match(item)
        if m:
            step, duration = parse_interval(m.group(1)), parse_interval(m.group(2))
            if step < 1:
                raise ValueError("a repeated retry interval must be at least 1 second")
            out.extend([step] * math.ceil(duration / step))
        elif item.strip().lower().startswith("every"):
            raise ValueError(f"'every INTERVAL' needs 'for DURATION': {item.strip()!r}")
        else:
            out.append(parse_interval(item))
    return out


def parse_size(value: Any) -> int:
    """``NUMBER [UNIT]`` with B, K/KB, M/MB, G/GB (1024-based); anything
    after the unit is an error (the reference's unanchored match is not
    kept)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    m = _SIZE.match(str(value))
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"expected a size such as '100K', not {value!r}")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def parse_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        value = " ".join(str(v) for v in value)
    return str(value).strip()


def parse_filename(value: Any, base_dir: Optional[str] = None) -> str:
    """Quotes stripped, ``~`` expanded, relative to ``base_dir``."""
    text = str(value).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1]
    if not text:
        raise ValueError("empty file name")
    text = os.path.expanduser(text)
    if base_dir and not os.path.isabs(text):
        text = os.path.join(base_dir, text)
    return text


def parse_command(value: Any) -> list[str]:
    """A program and its arguments.  The program must be an absolute path
    that exists or be found in ``$PATH``.  The words come from the
    configuration only; they are never given to a shell."""
    words = [str(w) for w in value] if isinstance(value, (list, tuple)) else shlex.split(str(value))
    if not words:
        raise ValueError("empty command")
    program = words[0]
    if os.path.isabs(program):
        if not os.access(program, os.X_OK):
            raise ValueError(f"{program} is not an executable file")
    else:
        found = shutil.which(program)
        if found is None:
            raise ValueError(f"{program} not found in $PATH")
        program = found
    return [program] + words[1:]


class SectionReader:
    """Typed access to one configuration section, refusing unknown keys
    (server.md §14.1 rule 7)."""

    def __init__(self, name: str, section: Mapping[str, Any], known: Iterable[str]) -> None:
        self.name = name
        self.section = dict(section or {})
        unknown = sorted(set(self.section) - set(known))
        if unknown:
            raise ExitConfigError(f"[{name}]: unknown option(s) {', '.join(unknown)}")

    def has(self, key: str) -> bool:
        return key in self.section and self.section[key] is not None

    def get(self, key: str, parse: Callable[[Any], T], default: Optional[T] = None) -> Optional[T]:
        if not self.has(key):
            return default
        try:
            return parse(self.section[key])
        except ValueError as exc:
            raise ExitConfigError(f"[{self.name}] {key}: {exc}") from None

    def require(self, key: str, parse: Callable[[Any], T]) -> T:
        if not self.has(key):
            raise ExitConfigError(f"[{self.name}] {key} is required")
        value = self.get(key, parse)
        assert value is not None
        return value
