"""The file syntax of configuration files (server.md §14.1): sections,
``Key: value`` entries and continuation lines, read into
:class:`RawSection` objects with nothing interpreted; and
:class:`ConfigError`, whose text names the file, the line, the section
and option, and the reason.

The node, the directory authority, the client and the exit modules all
read their files with this one reader.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Optional, Union

from mixminion.config.values import BOOLEAN
from mixminion.codec import textformat


def _where(filename: str, line: int, section: Optional[str], key: Optional[str]) -> str:
    """``file:line: [Section] Key:`` -- the prefix of every error and warning."""
    text = f"{filename}:{line}:"
    if section:
        text += f" [{section}]"
    if key:
        text += f" {key}"
    return text + ":" if section or key else text


class ConfigError(Exception):
    """The configuration cannot be used; ``str()`` names the file, the line,
    the section/option and the reason."""

    def __init__(self, filename: str, line: int, section: Optional[str],
                 key: Optional[str], reason: str) -> None:
        super().__init__(f"{_where(filename, line, section, key)} {reason}")
        self.filename = filename
        self.line = line
        self.section = section
        self.key = key
        self.reason = reason
        #: every problem found in the same reading, this one first
        self.problems: tuple[str, ...] = (str(self),)


#: One ``Key: value`` entry, continuation lines already joined: the same
#: record as a descriptor's entry.
RawEntry = textformat.Entry


@dataclass(frozen=True)
class RawSection(textformat.Section):
    """A section as written: entries in file order, nothing interpreted.

    This is what a ``[Delivery/<Name>]`` plugin receives; :meth:`error`
    and :meth:`warning` let it report problems in our format.
    """

    filename: str = "<string>"

    def get(self, key: str) -> Optional[str]:
        """The value of a single-valued option, or None if absent."""
        for entry in self.entries:
            if entry.key == key:
                return entry.value
        return None

    def get_all(self, key: str) -> tuple[str, ...]:
        return tuple(e.value for e in self.entries if e.key == key)

    def keys(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(e.key for e in self.entries))

    def line_of(self, key: str) -> int:
        return next((e.line for e in self.entries if e.key == key), self.line)

    def error(self, key: Optional[str], reason: str) -> ConfigError:
        return ConfigError(self.filename, self.line_of(key) if key else self.line, self.name, key, reason)

    def warning(self, key: Optional[str], reason: str) -> str:
        line = self.line_of(key) if key else self.line
        return f"{_where(self.filename, line, self.name, key)} {reason}"

    @property
    def enabled(self) -> bool:
        """``Enabled`` as a boolean (absent = no); a bad value is an error."""
        text = self.get("Enabled")
        if text is None:
            return False
        try:
            return bool(BOOLEAN.parse(text))
        except ValueError as exc:
            raise self.error("Enabled", str(exc)) from None


_BAD_CHAR = re.compile(r"[^\x20-\x7e\t\n\x0b\r]")
_SECTION_LINE = re.compile(r"\[\s*([^\s\]]+)\s*\]\s*")
_ENTRY_LINE = re.compile(r"([^:=\s]+)(?:\s*[:=]\s*|\s+)(.*)", re.DOTALL)


def _check_characters(text: str, filename: str) -> None:
    """Rule 1: printing ASCII plus TAB, LF, VT, CR."""
    bad = _BAD_CHAR.search(text)
    if bad is not None:
        line = text.count("\n", 0, bad.start()) + 1
        raise ConfigError(filename, line, None, None,
                          f"character {ord(bad.group()):#04x} is not allowed "
                          "(only printing ASCII, TAB, LF, VT and CR)")


class _SyntaxReader:
    """Rules 2-5 and 7 (repeated sections) of §14.1, line by line."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.sections: list[tuple[str, int, list[RawEntry]]] = []
        self.seen: dict[str, int] = {}

    def error(self, line: int, reason: str) -> ConfigError:
        section = self.sections[-1][0] if self.sections else None
        return ConfigError(self.filename, line, section, None, reason)

    def feed(self, number: int, line: str) -> None:
        if not line.strip() or line.lstrip().startswith("#"):
            return
        if line[0] in " \t\x0b":
            self._continue(number, line.strip())
        elif line.startswith("["):
            self._section(number, line)
        else:
            self._entry(number, line.rstrip())

    def _section(self, number: int, line: str) -> None:
        match = _SECTION_LINE.fullmatch(line)
        if match is None:
            raise self.error(number, f'"{line.strip()}" is not a section header (expected "[Name]")')
        name = match.group(1)
        if name in self.seen:
            raise ConfigError(self.filename, number, name, None,
                              f"section appears twice (first on line {self.seen[name]})")
        self.seen[name] = number
        self.sections.append((name, number, []))

    def _entry(self, number: int, line: str) -> None:
        match = _ENTRY_LINE.fullmatch(line)
        if match is None:
            raise self.error(number, f'"{line}" is not an entry (expected "Key: value")')
        if not self.sections:
            raise ConfigError(self.filename, number, None, match.group(1),
                              "entry before the first [Section] header")
        self.sections[-1][2].append(RawEntry(match.group(1), match.group(2).strip(), number))

    def _continue(self, number: int, text: str) -> None:
        if not self.sections or not self.sections[-1][2]:
            raise self.error(number, "indented line does not continue an entry")
        entries = self.sections[-1][2]
        last = entries[-1]
        entries[-1] = dataclasses.replace(last, value=f"{last.value} {text}".strip())


def parse_sections(data: Union[str, bytes], filename: str = "<string>") -> tuple[RawSection, ...]:
    """The sections of a file in the syntax of §14.1, values uninterpreted."""
    text = data.decode("latin-1") if isinstance(data, (bytes, bytearray)) else data
    text = textformat.normalise_newlines(text)
    _check_characters(text, filename)
    reader = _SyntaxReader(filename)
    for number, line in enumerate(text.split("\n"), 1):
        reader.feed(number, line)
    return tuple(RawSection(name, line, tuple(entries), filename)
                 for name, line, entries in reader.sections)
