"""Addresses an SMTP exit refuses to mail (spec: server.md §9.5).

The file holds ``deny TYPE ARG`` lines (blank and ``#`` lines ignored):

* ``deny address a@b.c`` -- that address, any case;
* ``deny user a``        -- that local part at any domain;
* ``deny onehost b.c``   -- that domain exactly;
* ``deny allhosts b.c``  -- that domain and every domain under it;
* ``deny pattern /RE/``  -- a regular expression found anywhere in the
  address, ignoring case.

There is no ``allow`` rule.  Any other line is a configuration error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Optional

from mixminion.codec.errors import ParseError
from mixminion.codec.routing import check_smtp_address
from mixminion.exits.errors import ExitConfigError

RULE_TYPES = ("address", "user", "onehost", "allhosts", "pattern")


@dataclass(frozen=True)
class Rule:
    kind: str
    argument: str
    line: int
    regex: Optional[re.Pattern] = None

    def matches(self, local: str, domain: str, address: str) -> bool:
        if self.kind == "address":
            return address == self.argument
        if self.kind == "user":
            return local == self.argument
        if self.kind == "onehost":
            return domain == self.argument
        if self.kind == "allhosts":
            return domain == self.argument or domain.endswith("." + self.argument)
        assert self.regex is not None
        return self.regex.search(address) is not None


def _valid(address: str) -> bool:
    try:
        check_smtp_address(address.encode("ascii"))
    except (ParseError, UnicodeEncodeError):
        return False
    return True


def parse_rule(line: str, number: int) -> Optional[Rule]:
    """One line of the file: a rule, or None for a blank/comment line."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    words = text.split(None, 2)
    if len(words) != 3 or words[0].lower() != "deny":
        raise ExitConfigError(f"blacklist line {number}: expected 'deny TYPE ARGUMENT'")
    kind, arg = words[1].lower(), words[2].strip()
    if kind not in RULE_TYPES:
        raise ExitConfigError(f"blacklist line {number}: unknown rule type {words[1]!r}")
    if kind == "pattern":
        if len(arg) < 2 or not (arg.startswith("/") and arg.endswith("/")):
            raise ExitConfigError(f"blacklist line {number}: a pattern must be written /REGEX/")
        try:
            regex = re.compile(arg[1:-1], re.I)
        except re.error as exc:
            raise ExitConfigError(f"blacklist line {number}: bad regular expression: {exc}") from None
        return Rule(kind, arg, number, regex)
    arg = arg.lower()
    sample = {"address": arg, "user": arg + "@x", "onehost": "x@" + arg, "allhosts": "x@" + arg}[kind]
    if not _valid(sample):
        raise ExitConfigError(f"blacklist line {number}: {arg!r} is not a valid {kind}")
    return Rule(kind, arg, number)


def routed_addresses(address: str) -> list[str]:
    """``address`` and each address its local part routes it on to: the
    "percent hack" (``a%b@relay`` -> ``a@b``, repeatedly) and UUCP bang
    paths (``b!a@relay`` -> ``a@b``)."""
    found = [address]
    local, _, _domain = address.rpartition("@")
    while "%" in local or "!" in local:
        if "!" in local:
            host, _, local = local.partition("!")
        else:
            local, _, host = local.rpartition("%")
        if not host or not local:
            break
        found.append(f"{local}@{host}")
    return found


class Blacklist:
    """The parsed rules; :meth:`match` says which one denies an address."""

    def __init__(self, rules: Iterable[Rule] = ()) -> None:
        self.rules = list(rules)

    @classmethod
    def from_text(cls, text: str) -> "Blacklist":
        rules = [parse_rule(line, n) for n, line in enumerate(text.splitlines(), 1)]
        return cls(r for r in rules if r is not None)

    @classmethod
    def from_file(cls, path: str) -> "Blacklist":
        try:
            with open(path, encoding="ascii") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ExitConfigError(f"cannot read blacklist file {path}: {exc}") from None
        return cls.from_text(text)

    def match(self, address: str) -> Optional[Rule]:
        """The first rule denying ``address`` (``local@domain``), or None.

        Every address the mail may be passed on to by routing in its local
        part counts too: ``victim%example.gov@relay.org`` and
        ``example.gov!victim@relay.org`` are refused by a rule against
        ``example.gov`` (the relay would hand them on to victim@example.gov).
        """
        for candidate in routed_addresses(address.lower()):
            local, _, domain = candidate.rpartition("@")
            for rule in self.rules:
                if rule.matches(local, domain, candidate):
                    return rule
        return None

    def __contains__(self, address: str) -> bool:
        return self.match(address) is not None

    def __len__(self) -> int:
        return len(self.rules)
