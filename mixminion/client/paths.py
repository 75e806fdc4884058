"""Destinations, path syntax and path selection (client.md §3.2-§3.5).

Three steps, each testable alone: :func:`parse_address` turns ``-t`` into
an exit type and address; :func:`parse_path` turns ``-P`` into a
:class:`PathSpec` of elements; :class:`PathSelector` resolves named
servers once and then draws one concrete path per packet.  Path choice
decides anonymity, so every rule of §3.3 is enforced here, in one place,
and every refusal says which rule and what to change.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

from mixminion.client.config import DEFAULT_RELIABILITY_FLOOR
from mixminion.codec.errors import BuildError, ParseError
from mixminion.codec.header import PER_HOP_OVERHEAD, Hop, check_header_room
from mixminion.codec.routing import (
    DROP_TYPE,
    MBOX_TYPE,
    SMTP_TYPE,
    TAG_LEN,
    HostInfo,
    check_smtp_address,
)
from mixminion.directory.descriptor import (
    MMTP_PROTOCOL,
    PACKET_VERSION,
    DescriptorError,
    ServerDescriptor,
    parse_descriptor,
)
from mixminion.directory.reliability import ServerReliability, format_reliability

TEST_TYPE = 0xFFFE
#: software whose exits mishandle exit headers (client.md §3.5 step 1)
NO_HEADER_SOFTWARE = ("Mixminion 0.0.4", "Mixminion 0.0.5alpha1")


class PathError(Exception):
    """A path or address the user gave cannot be used; the message says why
    and what to change."""


# --- destinations (§3.5) ----------------------------------------------------------------


@dataclass(frozen=True)
class Address:
    """Where the exit delivers: routing type and address (no tag), and the
    server an ``mbox:NAME@SERVER`` address forces as last hop."""

    exit_type: int
    address: bytes
    text: str
    forced_server: Optional[str] = None

    @property
    def kind(self) -> str:
        return {DROP_TYPE: "drop", SMTP_TYPE: "smtp", MBOX_TYPE: "mbox"}.get(self.exit_type, "other")


def parse_address(text: str) -> Address:
    """Parse a ``-t`` address; PathError explains a bad one."""
    text = text.strip()
    lower = text.lower()
    if lower == "drop":
        return Address(DROP_TYPE, b"", text)
    if lower == "test" or lower.startswith("test:"):
        return Address(TEST_TYPE, text[5:].encode("latin-1"), text)
    if re.fullmatch(r"0x[0-9a-fA-F]{4}(:.*)?", text, re.DOTALL):
        rtype = int(text[2:6], 16)
        if rtype < 0x0100:
            raise PathError(f"{text!r}: routing type 0x{rtype:04x} is not an exit type "
                            "(use 0x0100 or above).")
        return Address(rtype, text[7:].encode("latin-1"), text)
    if lower.startswith("mbox:"):
        rest = text[5:]
        name, at, server = rest.partition("@")
        if not name or (at and not server):
            raise PathError(f"{text!r} is not a mailbox address: write mbox:NAME or "
                            "mbox:NAME@SERVER.")
        return Address(MBOX_TYPE, name.encode("ascii", "replace"), text, server or None)
    mailbox = text[5:] if lower.startswith("smtp:") else text
    try:
        check_smtp_address(mailbox.encode("ascii"))
    except (ParseError, UnicodeEncodeError) as exc:
        raise PathError(f"{text!r} is not an address I can send to ({exc}): use user@domain, "
                        "mbox:NAME@SERVER, drop or 0xTTTT:DATA.") from None
    return Address(SMTP_TYPE, mailbox.encode("ascii"), text)


# --- path syntax (§3.2) -------------------------------------------------------------------


@dataclass(frozen=True)
class Element:
    """One element of a path: a named server (``name``), or random hops:
    ``exact`` N of them (``?`` = 1, ``*N``), or ``approx`` about N (``~N``)."""

    kind: str  # "name", "exact" or "approx"
    name: str = ""
    count: int = 1

    @property
    def min_length(self) -> int:
        return self.count if self.kind == "exact" else 1

    def __str__(self) -> str:
        if self.kind == "name":
            return self.name
        if self.kind == "approx":
            return f"~{self.count}"
        return "?" if self.count == 1 else f"*{self.count}"


@dataclass(frozen=True)
class PathSpec:
    """A parsed path; ``swap`` is the number of elements before ``:``
    (None when the path has no swap point)."""

    elements: tuple[Element, ...]
    swap: Optional[int] = None

    def __str__(self) -> str:
        parts = [str(e) for e in self.elements]
        if self.swap is None:
            return ",".join(parts)
        return ",".join(parts[:self.swap]) + ":" + ",".join(parts[self.swap:])


def _split_path(text: str) -> tuple[list[str], list[str]]:
    """Tokens and the separator after each (``,``, ``:`` or end)."""
    tokens: list[str] = []
    seps: list[str] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i] in " \t":
            i += 1
        if i < n and text[i] in "'\"":
            quote, i, buf = text[i], i + 1, []
            while i < n and text[i] != quote:
                if text[i] == "\\" and i + 1 < n:
                    i += 1
                buf.append(text[i])
                i += 1
            if i >= n:
                raise PathError(f"path {text!r}: unterminated quoted element.")
            i += 1
            while i < n and text[i] in " \t":
                i += 1
            if i < n and text[i] not in ",:":
                raise PathError(f"path {text!r}: a quoted element must be followed by ',' "
                                "or ':' or the end.")
            token = "".join(buf)
            quoted = True
        else:
            start = i
            while i < n and text[i] not in ",:":
                i += 1
            token = text[start:i].strip()
            quoted = False
        if not token and not quoted:
            raise PathError(f"path {text!r} has an empty element; separate servers with "
                            "single commas.")
        tokens.append(("\0" if quoted else "") + token)
        if i >= n:
            seps.append("")
            return tokens, seps
        seps.append(text[i])
        i += 1


def _element(token: str, text: str) -> Element:
    if token.startswith("\0"):
        return Element("name", token[1:])
    if token == "?":
        return Element("exact", count=1)
    if token == "*":
        raise PathError(f"path {text!r}: a lone '*' is no longer supported; write *N for "
                        "exactly N random servers.")
    m = re.fullmatch(r"([*~])([0-9]+)", token)
    if m:
        count = int(m.group(2))
        if count > 32:
            raise PathError(f"path {text!r}: {token} asks for too many hops (at most 32).")
        return Element("exact" if m.group(1) == "*" else "approx", count=count)
    if token[0] in "*~?":
        raise PathError(f"path {text!r}: {token!r} is not ?, *N or ~N.")
    return Element("name", token)


def parse_path(text: str, kind: str = "forward") -> PathSpec:
    """Parse ``-P``; ``kind`` is ``forward``, ``reply`` or ``surb``."""
    tokens, seps = _split_path(text)
    elements = [_element(t, text) for t in tokens]
    colons = [i for i, s in enumerate(seps) if s == ":"]
    if len(colons) > 1:
        raise PathError(f"path {text!r} has more than one ':' swap point.")
    swap = colons[0] + 1 if colons else None
    if kind != "forward":
        if swap is not None:
            what = "replies" if kind == "reply" else "reply blocks"
            raise PathError(f"path {text!r}: a swap point ':' makes no sense for {what}, "
                            "whose path is a single leg; use commas only.")
        return PathSpec(tuple(e for e in elements if not (e.kind == "exact" and e.count == 0)))
    if swap is not None:
        if swap == 0 or swap == len(elements):
            raise PathError(f"path {text!r}: both sides of ':' need at least one server.")
        if sum(e.min_length for e in elements) < 2:
            raise PathError(f"path {text!r} is too short: a forward path needs at least 2 hops.")
        return PathSpec(tuple(elements), swap)
    if sum(e.min_length for e in elements) < 2:
        if len(elements) == 1 and elements[0].kind == "approx":
            # ~N alone: one certain hop plus ~(N-1), so both legs can be filled
            n = elements[0].count
            return PathSpec((Element("exact", count=1), Element("approx", count=max(n - 1, 0))))
        raise PathError(f"path {text!r} is too short: a forward path needs at least 2 hops "
                        "(e.g. -P '*2' or -P '~5').")
    return PathSpec(tuple(elements))


# --- exits and capabilities (§3.5) ------------------------------------------------------


@dataclass(frozen=True)
class ExitNeeds:
    """What the exit must support: the real destination, the size of the
    whole message, exit headers, and the fragment count if the exit must
    reassemble (server-side fragmentation)."""

    address: Address
    size: int = 0
    headers: frozenset[str] = frozenset()
    fragments: int = 0

    def problem(self, d: ServerDescriptor) -> Optional[str]:
        """Why ``d`` cannot be this message's exit, or None if it can."""
        if self.headers and d.software and d.software.startswith(NO_HEADER_SOFTWARE):
            return f"its software ({d.software}) mishandles exit headers"
        kb = -(-self.size // 1024)
        if self.fragments:
            if d.max_fragments is None:
                return "it does not reassemble fragmented messages"
            if d.max_fragments < self.fragments:
                return (f"it reassembles at most {d.max_fragments} fragments, this message "
                        f"needs {self.fragments}")
        else:
            kb = min(kb, 32)
        kind = self.address.kind
        if kind in ("smtp", "mbox"):
            info = d.smtp if kind == "smtp" else d.mbox
            if info is None:
                return f"it does not deliver {kind.upper()}"
            if "FROM" in self.headers and not info.allow_from:
                return "it does not allow a chosen From address"
            if kb > info.max_size_kib:
                return f"it delivers at most {info.max_size_kib} KB, this message is {kb} KB"
        return None


# --- choosing paths (§3.3) -------------------------------------------------------------


def hop_for(d: ServerDescriptor) -> Hop:
    """What the packet builder needs of a server: packet key and address."""
    if d.hostname is None or d.port is None:
        raise PathError(f"server {d.nickname} accepts no connections (no [Incoming/MMTP]).")
    return Hop(d.packet_key, HostInfo(d.hostname.lower(), d.port, d.identity_digest))


@dataclass
class Legs:
    """One packet's path: ``leg1`` and (forward only) ``leg2``."""

    leg1: list[ServerDescriptor]
    leg2: list[ServerDescriptor] = field(default_factory=list)

    @property
    def hops(self) -> list[ServerDescriptor]:
        return self.leg1 + self.leg2

    def __str__(self) -> str:
        first = ",".join(d.nickname for d in self.leg1)
        return first + (":" + ",".join(d.nickname for d in self.leg2) if self.leg2 else "")


_FILL_ATTEMPTS = 20


class _Cornered(Exception):
    """A random fill left a hop with no candidate; draw the path again."""


class PathSelector:
    """Draws concrete paths from a spec against a set of known servers.

    ``servers`` are the descriptors random hops may come from (the
    recommended ones); ``lookup(name)`` resolves a named server for the
    whole window (raising with a helpful message); ``blocked`` holds the
    ``BlockServers``/``BlockEntries``/``BlockExits`` nickname sets.

    ``reliability`` (identity fingerprint -> what the directory measured)
    and ``floor`` steer random hops only (doc/reliability.md §4): a
    measured server below ``floor`` is skipped, and among the rest each is
    drawn with weight equal to its reliability, an unmeasured one with the
    median of the measured ones, so that a new server is neither shunned
    nor favoured.  Named hops are the user's choice: used, with a warning.
    """

    def __init__(self, servers: Sequence[ServerDescriptor],
                 lookup: Callable[[str], ServerDescriptor],
                 start: float, end: float,
                 block_servers: frozenset[str] = frozenset(),
                 block_entries: frozenset[str] = frozenset(),
                 block_exits: frozenset[str] = frozenset(),
                 rng: Optional[random.Random] = None,
                 warn: Callable[[str], None] = lambda _: None,
                 reliability: Optional[Mapping[str, ServerReliability]] = None,
                 floor: float = DEFAULT_RELIABILITY_FLOOR) -> None:
        self.start, self.end = start, end
        self.lookup_fn = lookup
        self.servers = [d for d in servers if d.is_valid_over(start, end)
                        and d.supports_packet_version(PACKET_VERSION)]
        self.block_servers = block_servers
        self.block_entries = block_entries
        self.block_exits = block_exits
        self.rng = rng or random.SystemRandom()
        self.warn = warn
        self._resolved: dict[str, ServerDescriptor] = {}
        self.reliability = {fp.upper(): r for fp, r in (reliability or {}).items()}
        self.floor = floor
        eligible = {d.fingerprint: self.measured(d) for d in self.servers
                    if d.nickname.lower() not in block_servers and not self.below_floor(d)}
        median = _median([r.reliability for r in eligible.values() if r is not None])
        self._unmeasured_weight = 1.0 if median is None else median

    # -- reliability (doc/reliability.md §4) -------------------------------------

    def measured(self, d: ServerDescriptor) -> Optional[ServerReliability]:
        """What the directory measured of ``d``'s identity (None: unmeasured)."""
        return self.reliability.get(d.fingerprint)

    def below_floor(self, d: ServerDescriptor) -> bool:
        """Measured and less reliable than the floor (never with floor 0)."""
        r = self.measured(d)
        return r is not None and r.reliability < self.floor

    def weight(self, d: ServerDescriptor) -> float:
        """How likely a random hop is ``d``, relative to the other candidates."""
        r = self.measured(d)
        return r.reliability if r is not None else self._unmeasured_weight

    def _pick(self, candidates: Sequence[ServerDescriptor]) -> ServerDescriptor:
        """One of ``candidates``, weighted by reliability.  Equal weights (as
        when nothing is measured) draw exactly as before reliability existed."""
        weights = [self.weight(d) for d in candidates]
        if len(set(weights)) <= 1 or sum(weights) <= 0:
            return self.rng.choice(candidates)
        return self.rng.choices(candidates, weights=weights)[0]

    def _floor_note(self) -> str:
        """Why fewer servers qualify than are known, when the floor is why."""
        below = {d.nickname.lower() for d in self.servers if self.below_floor(d)}
        if not below:
            return ""
        return (f" {len(below)} server(s) are skipped as less reliable than [Security] "
                f"ReliabilityFloor {format_reliability(self.floor)}; lower it (0 disables it) "
                "to use them.")

    # -- named servers -----------------------------------------------------------

    def resolve(self, name: str) -> ServerDescriptor:
        """A nickname (case-insensitive), else a file holding a descriptor."""
        key = name.lower()
        if key in self._resolved:
            return self._resolved[key]
        try:
            d = self.lookup_fn(name)
        except Exception as exc:
            if not os.path.isfile(name):
                raise PathError(str(exc)) from None
            try:
                with open(name, "rb") as f:
                    d = parse_descriptor(f.read(), self.start)
            except (OSError, DescriptorError) as exc2:
                raise PathError(f"{name}: not a usable descriptor file ({exc2}).") from None
            if not d.is_valid_over(self.start, self.end):
                raise PathError(f"{name}: the descriptor of {d.nickname} is not valid for the "
                                "whole time this message needs; get a current one.")
        if d.nickname.lower() in self.block_servers:
            self.warn(f"Using {d.nickname} although it is in BlockServers, because the path "
                      "names it.")
        r = self.measured(d)
        if r is not None and self.below_floor(d):
            self.warn(f"Using {d.nickname} although its measured reliability is "
                      f"{format_reliability(r.reliability)}, below [Security] ReliabilityFloor "
                      f"{format_reliability(self.floor)}, because the path names it.")
        self._resolved[key] = d
        return d

    # -- validation before any drawing ------------------------------------------

    def exit_candidates(self, needs: Optional[ExitNeeds],
                        apply_floor: bool = True) -> list[ServerDescriptor]:
        """Servers a random exit may be (``apply_floor`` False: as if every
        server were reliable enough, to explain an empty answer)."""
        out = [d for d in self.servers
               if d.nickname.lower() not in self.block_servers
               and d.nickname.lower() not in self.block_exits
               and not (apply_floor and self.below_floor(d))]
        if needs is not None:
            out = [d for d in out if needs.problem(d) is None]
        return out

    def validate(self, spec: PathSpec, needs: Optional[ExitNeeds], kind: str) -> None:
        """The checks of ``validatePath``: fail before drawing, with reasons."""
        named = [self.resolve(e.name) for e in spec.elements if e.kind == "name"]
        first = spec.elements[0] if spec.elements else None
        if first is not None and first.kind == "name" and not named[0].can_start_at():
            raise PathError(f"{named[0].nickname} does not accept connections from clients "
                            f"(MMTP {MMTP_PROTOCOL}); choose another first hop.")
        for a, b in zip(spec.elements, spec.elements[1:]):
            if a.kind == "name" and b.kind == "name":
                da, db = self.resolve(a.name), self.resolve(b.name)
                if not da.can_relay_to(db):
                    raise PathError(f"{da.nickname} cannot relay to {db.nickname}; put "
                                    "another server between them.")
        if needs is None or kind == "reply":
            return
        forced = needs.address.forced_server
        last = spec.elements[-1] if spec.elements else None
        if needs.address.kind == "mbox" and forced is None and (last is None or last.kind != "name"):
            raise PathError(f"{needs.address.text}: an mbox address needs a fixed last hop; "
                            "write mbox:NAME@SERVER or end the path with that server.")
        if forced is not None:
            exit_server = self.resolve(forced)
        elif last is not None and last.kind == "name":
            exit_server = self.resolve(last.name)
        else:
            if not self.exit_candidates(needs):
                raise PathError(self._no_exit_message(needs))
            return
        why = needs.problem(exit_server)
        if why:
            raise PathError(f"{exit_server.nickname} cannot be the exit for this message: {why}. "
                            "Choose another last hop.")

    def _no_exit_message(self, needs: ExitNeeds) -> str:
        what = needs.address.kind.upper()
        if not self.servers:
            return ("No usable servers are known: run update-servers (and check the Authority "
                    "lines of your configuration), or import descriptors with import-server.")
        if self.exit_candidates(needs, apply_floor=False):
            return (f"Every recommended server that can deliver this {what} message is less "
                    "reliable than [Security] ReliabilityFloor "
                    f"{format_reliability(self.floor)}: lower the floor (0 disables it), or "
                    "name an exit with -P.")
        if needs.fragments:
            return (f"No recommended server can deliver this message: it needs {needs.fragments} "
                    f"fragments reassembled and {what} delivery of {-(-needs.size // 1024)} KB. "
                    "Send a smaller message, or name an exit that can with -P.")
        return (f"No recommended server can deliver {what} messages of this size. "
                "Run update-servers, or name an exit with -P.")

    # -- drawing ---------------------------------------------------------------

    def _approx(self, n: int) -> int:
        return max(0, int(round(n + 1.5 * self.rng.gauss(0.0, 1.0))))

    def _slots(self, spec: PathSpec, kind: str) -> tuple[list[Optional[ServerDescriptor]], Optional[int]]:
        """Expand random elements into empty slots; the split point if fixed."""
        slots: list[Optional[ServerDescriptor]] = []
        swap_slot: Optional[int] = None
        for i, e in enumerate(spec.elements):
            if spec.swap == i:
                swap_slot = len(slots)
            if e.kind == "name":
                slots.append(self.resolve(e.name))
            else:
                slots.extend([None] * (e.count if e.kind == "exact" else self._approx(e.count)))
        return slots, swap_slot

    def choose(self, spec: PathSpec, kind: str = "forward",
               needs: Optional[ExitNeeds] = None,
               fixed_exit: Optional[ServerDescriptor] = None,
               swap_at: Optional[int] = None) -> Legs:
        """Draw one path.  ``fixed_exit`` pins the last hop (all fragments of
        a server-side-reassembled message share one exit); ``swap_at`` ends
        the first leg after that many hops (``--swap-at``)."""
        slots, swap_slot = self._slots(spec, kind)
        forced = needs.address.forced_server if needs is not None else None
        if forced is not None:
            target = self.resolve(forced)
            if not slots or slots[-1] is not target:
                slots.append(target)
        if kind != "reply" and slots and slots[-1] is None:
            if fixed_exit is not None:
                slots[-1] = fixed_exit
            elif needs is not None:
                candidates = self.exit_candidates(needs)
                if not candidates:
                    raise PathError(self._no_exit_message(needs))
                slots[-1] = self._pick(candidates)
        if kind == "forward":
            if swap_at is not None:
                if not 1 <= swap_at < len(slots):
                    raise PathError(f"--swap-at {swap_at} does not fit a path of {len(slots)} "
                                    "hops: both legs need at least one hop.")
                swap_slot = swap_at
            if swap_slot is None:
                swap_slot = -(-len(slots) // 2)
            if swap_slot == 0:
                slots.insert(0, None)
                swap_slot = 1
            if swap_slot >= len(slots):
                slots.append(None)
        elif not slots:
            slots.append(None)
        if fixed_exit is None and kind != "reply" and slots[-1] is None and needs is not None:
            # Padding for the swap point may have put this slot after an
            # exit drawn above: never draw the same server twice in a row.
            before = slots[-2] if len(slots) > 1 else None
            exits = self.exit_candidates(needs)
            candidates = [d for d in exits if before is None
                          or d.nickname.lower() != before.nickname.lower()] or exits
            if candidates:
                slots[-1] = self._pick(candidates)
        hops = self._fill_retrying(slots, reply=(kind == "reply"))
        if kind == "forward":
            legs = Legs(hops[:swap_slot], hops[swap_slot:])
        else:
            legs = Legs(hops)
        self._check_fits(legs, kind, needs)
        return legs

    def _fill_retrying(self, slots: list[Optional[ServerDescriptor]],
                       reply: bool) -> list[ServerDescriptor]:
        """Random choices made hop by hop can corner themselves (a hop whose
        neighbours leave no candidate); draw again a few times before
        accepting a path that repeats a server."""
        for _ in range(_FILL_ATTEMPTS):
            try:
                return self._fill(slots, reply, strict=True)
            except _Cornered:
                continue
        return self._fill(slots, reply, strict=False)

    def _fill(self, slots: list[Optional[ServerDescriptor]], reply: bool,
              strict: bool = False) -> list[ServerDescriptor]:
        if not self.servers and any(s is None for s in slots):
            raise PathError("No usable servers are known: run update-servers (and check the "
                            "Authority lines of your configuration), or import descriptors.")
        usable = {d.nickname.lower() for d in self.servers if not self.below_floor(d)}
        if self.servers and len(usable) < 3:
            self.warn(f"Only {len(usable)} server(s) are known: your anonymity is weak."
                      + self._floor_note())
        out: list[Optional[ServerDescriptor]] = list(slots)
        last = len(out) - 1
        for i, slot in enumerate(out):
            if slot is not None:
                continue
            prev = out[i - 1] if i > 0 else None
            nxt = out[i + 1] if i < last else None
            candidates = []
            for d in self.servers:
                name = d.nickname.lower()
                if name in self.block_servers or self.below_floor(d):
                    continue
                if i == 0 and (name in self.block_entries or not d.can_start_at()):
                    continue
                if i == last and name in self.block_exits:
                    continue
                if prev is not None and (prev.nickname.lower() == name or not prev.can_relay_to(d)):
                    continue
                if nxt is not None and (nxt.nickname.lower() == name or not d.can_relay_to(nxt)):
                    continue
                if i == last and reply and MMTP_PROTOCOL not in d.outgoing_protocols:
                    continue  # a reply's first leg ends by relaying to the reply block
                candidates.append(d)
            if candidates:
                out[i] = self._pick(candidates)
                continue
            if strict:
                raise _Cornered()
            if prev is not None and (nxt is None or prev.can_relay_to(nxt)):
                self.warn(f"No suitable server for hop {i + 1}; reusing {prev.nickname}.")
                out[i] = prev
            elif nxt is not None:
                self.warn(f"No suitable server for hop {i + 1}; reusing {nxt.nickname}.")
                out[i] = nxt
            else:
                raise PathError(f"No server can fill hop {i + 1} of the path; name servers "
                                "with -P, or run update-servers." + self._floor_note())
        return [d for d in out if d is not None]

    def _check_fits(self, legs: Legs, kind: str, needs: Optional[ExitNeeds]) -> None:
        exit_len = TAG_LEN + (len(needs.address.address) if needs is not None else 0)
        try:
            if kind == "forward":
                sizes1 = [PER_HOP_OVERHEAD + len(hop_for(d).address.pack()) for d in legs.leg1[1:]]
                sizes1.append(PER_HOP_OVERHEAD + len(hop_for(legs.leg2[0]).address.pack()))
                sizes2 = [PER_HOP_OVERHEAD + len(hop_for(d).address.pack()) for d in legs.leg2[1:]]
                sizes2.append(PER_HOP_OVERHEAD + exit_len)
                check_header_room(sizes1)
                check_header_room(sizes2)
            else:
                sizes = [PER_HOP_OVERHEAD + len(hop_for(d).address.pack()) for d in legs.leg1[1:]]
                # a reply's leg ends at a swap to the SURB's host (~ one host info)
                final = 2 + 20 + 64 if kind == "reply" else exit_len
                sizes.append(PER_HOP_OVERHEAD + final)
                check_header_room(sizes)
        except BuildError:
            raise PathError("Address and path will not fit in one header: use fewer hops per "
                            f"leg (path was {legs}).") from None
        if kind == "surb" and len(legs.leg1) > 16:
            raise PathError("A reply block path has at most 16 hops.")


def _median(values: Sequence[float]) -> Optional[float]:
    """The median (mean of the middle two for an even count); None if empty."""
    ordered = sorted(values)
    n = len(ordered)
    if not n:
        return None
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def count_fragments(message_len: int) -> int:
    """Packets a compressed message of this size needs (1 for a singleton)."""
    from mixminion.codec.fragments import FragmentParams
    from mixminion.codec.payload import max_singleton_size

    if message_len <= max_singleton_size(0):
        return 1
    return FragmentParams.for_message(message_len).fragment_count


def log_path(legs: Legs) -> str:
    return f"Selected path is {legs}"


