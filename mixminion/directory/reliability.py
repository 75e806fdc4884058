"""Reliability statistics: what pingers report and what directories carry
(doc/reliability.md).

Values are fixed-point so that every authority writes the same bytes:
reliability in thousandths, latency in whole milliseconds.

Three parts: the value codecs shared by reports and directories; the
signed ``[Ping-Report]`` (§2), signed and verified exactly like a
descriptor; and an authority's vote values (§3), one voice per group of
pingers and the lower median, so that no node and no single operator can
move what is voted about a server by more than one value.  Pure code: the
validation time and the signing randomness are parameters.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional, Sequence, Tuple, TypeVar

from mixminion.codec.crypto import RandomSource
from mixminion.codec.errors import BuildError, ParseError
from mixminion.codec.rsa import PrivateKey, PublicKey
from mixminion.codec.textformat import (
    Fields,
    Line,
    Schema,
    Section,
    TextFormatError,
    as_text,
    decode_base64,
    decode_int,
    decode_nickname,
    decode_string,
    decode_time,
    encode_base64,
    format_time,
    parse_sections,
    read_sections,
    render_document,
    repeated,
    required,
    sign_document,
)
from mixminion.directory.descriptor import (
    IDENTITY_MAX_BYTES,
    IDENTITY_MIN_BYTES,
    ServerDescriptor,
    check_digest,
    check_published,
    check_signature,
    load_key,
)

#: reliability is written with three decimals
RELIABILITY_SCALE = 1000


def format_reliability(value: float) -> str:
    """``0.000``..``1.000``, rounded to the nearest thousandth."""
    thousandths = min(RELIABILITY_SCALE, max(0, round(value * RELIABILITY_SCALE)))
    return f"{thousandths // RELIABILITY_SCALE}.{thousandths % RELIABILITY_SCALE:03d}"


@dataclass(frozen=True)
class Measured:
    """One pinger's measurement of one server over a report interval
    (a ``Measured:`` line of a ``[Ping-Report]``)."""

    #: the server's identity fingerprint, 40 upper-case hex digits
    fingerprint: str
    #: pings sent through the server, and how many came back
    sent: int
    returned: int
    #: inferred reliability (doc/reliability.md §1), 0..1
    reliability: float
    #: round-trip time of the returned pings through it, milliseconds
    median_ms: int
    p90_ms: int


@dataclass(frozen=True)
class ServerReliability:
    """What a vote or the consensus says of one server (a ``Server:`` line
    of a directory's ``[Reliability]`` section)."""

    reliability: float
    latency_ms: int
    #: how many (grouped) pingers the value rests on
    pingers: int


# --- value codecs (reports and directories) ------------------------------------------

#: an identity fingerprint as producers write it (directories use it too)
FINGERPRINT = re.compile(r"[0-9A-F]{40}")
_RELIABILITY = re.compile(r"([01])\.([0-9]{3})")


def decode_fingerprint(value: str) -> str:
    """An identity fingerprint as producers write it: 40 upper-case hex digits."""
    if not FINGERPRINT.fullmatch(value):
        raise ValueError(f"{value!r} is not a fingerprint (40 upper-case hexadecimal digits)")
    return value


def decode_reliability(value: str) -> float:
    """Exactly ``0.000``..``1.000``: any other spelling would digest differently."""
    match = _RELIABILITY.fullmatch(value)
    thousandths = int(match.group(1)) * RELIABILITY_SCALE + int(match.group(2)) if match else -1
    if not 0 <= thousandths <= RELIABILITY_SCALE:
        raise ValueError(f"{value!r} is not a reliability (0.000 to 1.000, three decimals)")
    return thousandths / RELIABILITY_SCALE


def fixed_point(value: float) -> float:
    """``value`` as it reads back from its three decimals; ValueError outside 0..1.

    Producers normalise with this so that what they build equals what
    readers parse.
    """
    if not 0.0 <= value <= 1.0:  # also false for NaN
        raise ValueError(f"reliability {value!r} is outside 0..1")
    return round(value * RELIABILITY_SCALE) / RELIABILITY_SCALE


def _columns(value: str, names: Sequence[str]) -> list[str]:
    parts = value.split()
    if len(parts) != len(names):
        raise ValueError(f"{value!r} has {len(parts)} fields, not {len(names)} ({' '.join(names)})")
    return parts


_MEASURED_COLUMNS = ("<fingerprint>", "<sent>", "<returned>", "<reliability>", "<median-ms>", "<p90-ms>")
_SERVER_COLUMNS = ("<fingerprint>", "<reliability>", "<latency-ms>", "<pingers>")


def decode_measured(value: str) -> Measured:
    """One ``Measured:`` value; ValueError says which column is wrong."""
    fingerprint, sent, returned, reliability, median_ms, p90_ms = _columns(value, _MEASURED_COLUMNS)
    measured = Measured(
        fingerprint=decode_fingerprint(fingerprint),
        sent=decode_int(sent),
        returned=decode_int(returned),
        reliability=decode_reliability(reliability),
        median_ms=decode_int(median_ms),
        p90_ms=decode_int(p90_ms),
    )
    if measured.returned > measured.sent:
        raise ValueError(f"{measured.returned} pings returned of {measured.sent} sent")
    if measured.p90_ms < measured.median_ms:
        raise ValueError(f"90th percentile {measured.p90_ms} ms is below the median {measured.median_ms} ms")
    return measured


def format_measured(measured: Measured) -> str:
    return (
        f"{measured.fingerprint} {measured.sent} {measured.returned} "
        f"{format_reliability(measured.reliability)} {measured.median_ms} {measured.p90_ms}"
    )


def decode_reliability_line(value: str) -> Tuple[str, ServerReliability]:
    """One ``Server:`` value of a directory's ``[Reliability]`` section."""
    fingerprint, reliability, latency_ms, pingers = _columns(value, _SERVER_COLUMNS)
    return decode_fingerprint(fingerprint), ServerReliability(
        reliability=decode_reliability(reliability),
        latency_ms=decode_int(latency_ms),
        pingers=decode_int(pingers, 1),
    )


def format_reliability_line(fingerprint: str, value: ServerReliability) -> str:
    return f"{fingerprint} {format_reliability(value.reliability)} {value.latency_ms} {value.pingers}"


def normalised_reliability(fingerprint: str, value: ServerReliability) -> ServerReliability:
    """``value`` as a directory line reads back; ValueError if it cannot be written."""
    decode_fingerprint(fingerprint)
    if value.latency_ms < 0 or value.pingers < 1:
        raise ValueError(f"{fingerprint}: latency {value.latency_ms} ms, {value.pingers} pingers")
    return dataclasses.replace(value, reliability=fixed_point(value.reliability))


_Value = TypeVar("_Value", int, float)


def lower_median(values: Iterable[_Value]) -> _Value:
    """The lower median: an actual value, so the result is never a fraction
    nobody measured, and one liar moves it by at most one rank."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    return ordered[(len(ordered) - 1) // 2]


def consensus_value(values: Sequence[ServerReliability]) -> ServerReliability:
    """The consensus of several votes' values: the lower median of each (§3)."""
    return ServerReliability(
        reliability=lower_median(v.reliability for v in values),
        latency_ms=lower_median(v.latency_ms for v in values),
        pingers=lower_median(v.pingers for v in values),
    )


# --- signed ping reports (§2) ----------------------------------------------------------

REPORT = "Ping-Report"
REPORT_VERSION = "0.1"


class ReportError(ParseError):
    """A ping report was refused; the message (one line) says which rule failed."""


class MalformedReport(ReportError):
    """The text breaks the format, or a field is missing or has a bad value."""


class UnsupportedReportVersion(MalformedReport):
    """``Version`` is not 0.1."""


class BadReportDigest(ReportError):
    """``Digest`` does not match the text: it was altered after signing."""


class BadReportSignature(ReportError):
    """``Signature`` does not verify to the digest under the ``Identity`` key."""


class ReportInFuture(ReportError):
    """``Published`` lies beyond the clock skew descriptors are allowed."""


class StaleReport(ReportError):
    """``Published`` is older than the authority accepts (two report intervals)."""


class UnlistedPinger(ReportError):
    """The ``Identity`` is not a listed node's."""


@dataclass(frozen=True)
class ReportFields:
    """What a pinger signs: the input of :func:`build_report`."""

    pinger: str
    published: int
    interval_start: int
    interval_end: int
    measured: Tuple[Measured, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "measured", _by_fingerprint(self.measured))


def _by_fingerprint(measured: Iterable[Measured]) -> Tuple[Measured, ...]:
    """Report lines in producer order, so equal reports are equal text."""
    return tuple(sorted(measured, key=lambda m: m.fingerprint))


@dataclass(frozen=True, eq=False)
class PingReport:
    """A verified report.  ``measured`` is sorted by fingerprint; two reports
    are the same iff their digests are."""

    pinger: str
    identity: PublicKey
    published: int
    interval_start: int
    interval_end: int
    measured: Tuple[Measured, ...]
    text: str
    digest: bytes
    #: unknown keys and sections, tolerated as in descriptors (descriptors.md §2 rule 7)
    warnings: Tuple[str, ...] = ()

    @property
    def fingerprint(self) -> str:
        """The pinger's identity fingerprint."""
        return self.identity.fingerprint

    def to_fields(self) -> ReportFields:
        return ReportFields(self.pinger, self.published, self.interval_start, self.interval_end, self.measured)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PingReport):
            return NotImplemented
        return self.digest == other.digest

    def __hash__(self) -> int:
        return hash(self.digest)


_REPORT_SCHEMA: Schema = {
    "Version": required(decode_string()),
    "Pinger": required(decode_nickname),
    "Identity": required(decode_base64),
    "Published": required(decode_time),
    "Interval-Start": required(decode_time),
    "Interval-End": required(decode_time),
    "Measured": repeated(decode_measured),
    "Digest": required(decode_base64),
    "Signature": required(decode_base64),
}


def parse_report(text: str | bytes, now: float) -> PingReport:
    """Parse and verify one report at validation time ``now``.

    Digest and signature are checked exactly as a descriptor's
    (descriptors.md §5.4, ``[Ping-Report]`` in place of ``[Server]``);
    ``Published`` may lie at most the descriptors' skew after ``now``.
    Staleness and listing are the authority's: :func:`accept_report`.
    """
    try:
        sections = parse_sections(text)
        fields, warnings = _read_report_sections(sections)
    except TextFormatError as exc:
        raise MalformedReport(str(exc)) from None
    report = fields[REPORT]
    source = as_text(text)
    digest = check_digest(source, report, BadReportDigest)
    identity = load_key(report, "Identity", IDENTITY_MIN_BYTES, IDENTITY_MAX_BYTES, MalformedReport)
    _check_report_content(report)
    check_published(report, now, ReportInFuture)
    check_signature(report, identity, digest, BadReportSignature)
    return PingReport(
        pinger=report["Pinger"],
        identity=identity,
        published=report["Published"],
        interval_start=report["Interval-Start"],
        interval_end=report["Interval-End"],
        measured=_by_fingerprint(report["Measured"]),
        text=source,
        digest=digest,
        warnings=tuple(warnings),
    )


def _read_report_sections(sections: Tuple[Section, ...]) -> tuple[dict[str, Fields], list[str]]:
    first = sections[0]
    if first.name != REPORT:
        raise MalformedReport(f"line {first.line}: a ping report must start with [{REPORT}], not [{first.name}]")
    for entry in first.entries:
        if entry.key == "Version" and entry.value != REPORT_VERSION:
            raise UnsupportedReportVersion(
                f"line {entry.line}: [{REPORT}] Version is {entry.value!r}; "
                f"this reader understands only {REPORT_VERSION}"
            )
    return read_sections(sections, {REPORT: _REPORT_SCHEMA})


def _check_report_content(report: Fields) -> None:
    """The interval ends by the time it was published; one line per server."""
    start, end, published = report["Interval-Start"], report["Interval-End"], report["Published"]
    if not start < end <= published:
        raise MalformedReport(
            f"{report.where('Interval-End')}: the interval {format_time(start)} .. {format_time(end)} must be "
            f"non-empty and end by Published {format_time(published)}"
        )
    seen: set[str] = set()
    for measured in report["Measured"]:
        if measured.fingerprint in seen:
            raise MalformedReport(f"[{REPORT}] Measured: server {measured.fingerprint} appears twice")
        seen.add(measured.fingerprint)


def accept_report(
    text: str | bytes, now: float, max_age: float, is_listed: Callable[[str], bool]
) -> PingReport:
    """What an authority does with an uploaded report (§2): verify it, and
    refuse it if published more than ``max_age`` seconds before ``now``
    (two report intervals) or if its identity is not a listed node's."""
    report = parse_report(text, now)
    if report.published < now - max_age:
        raise StaleReport(
            f"report by {report.pinger} published {format_time(report.published)}, more than "
            f"{int(max_age)} s before {format_time(int(now))}"
        )
    if not is_listed(report.fingerprint):
        raise UnlistedPinger(f"report by {report.pinger}: identity {report.fingerprint} is not a listed node's")
    return report


def format_report(fields: ReportFields, identity: PublicKey) -> str:
    """The unsigned text, Digest/Signature blank.

    No checks; :func:`build_report` is the safe entry point.  Exposed so
    tests can sign deliberately bad reports.
    """
    return render_document([(REPORT, [
        Line("Version", REPORT_VERSION),
        Line("Pinger", fields.pinger),
        Line("Identity", encode_base64(identity.der)),
        Line("Published", format_time(fields.published)),
        Line("Interval-Start", format_time(fields.interval_start)),
        Line("Interval-End", format_time(fields.interval_end)),
        *(Line("Measured", format_measured(m)) for m in fields.measured),
        Line("Digest", ""),
        Line("Signature", ""),
    ])])


def build_report(fields: ReportFields, identity_key: PrivateKey, rng: RandomSource) -> str:
    """Signed report text for ``fields``, reliabilities rounded to three decimals.

    The result is parsed again; a report the authorities would refuse
    (bad nickname, interval, counts...) is a :class:`BuildError` here.
    """
    try:
        wanted = dataclasses.replace(fields, measured=tuple(
            dataclasses.replace(m, reliability=fixed_point(m.reliability)) for m in fields.measured
        ))
    except ValueError as exc:
        raise BuildError(f"report would be refused: {exc}") from None
    signed = sign_document(format_report(wanted, identity_key.public), identity_key, rng)
    try:
        parsed = parse_report(signed, fields.published)
    except ReportError as exc:
        raise BuildError(f"report would be refused: {exc}") from exc
    if parsed.to_fields() != wanted:
        raise BuildError(f"report would read back as {parsed.to_fields()!r}, not {wanted!r}")
    return signed


# --- an authority's vote values (§3) ----------------------------------------------------


@dataclass(frozen=True)
class ReliabilitySettings:
    """The authority's ``[Reliability]`` options."""

    #: pings through a server a report needs to count for it
    min_pings: int
    #: grouped pingers needed for a server to be measured
    min_pingers: int
    #: when set, only these fingerprints count as pingers
    pingers: Optional[frozenset[str]] = None

    def __post_init__(self) -> None:
        if self.min_pings < 1 or self.min_pingers < 1:
            raise ValueError(f"MinPings {self.min_pings} and MinPingers {self.min_pingers} must be at least 1")
        if self.pingers is not None:
            object.__setattr__(self, "pingers", frozenset(decode_fingerprint(fp) for fp in self.pingers))


@dataclass(frozen=True)
class PingerInfo:
    """What groups a listed node with others: its /16 network and its operator."""

    #: ``a.b.0.0/16`` for a literal IPv4 hostname, ``host <name>`` otherwise,
    #: None for a node nobody can connect to
    network: Optional[str]
    #: the descriptor's ``Contact``, lower-cased
    operator: str

    @classmethod
    def of(cls, descriptor: ServerDescriptor) -> PingerInfo:
        """From the ``Hostname`` (where nodes really connect), not the legacy
        ``IP`` line, which readers must not rely on (descriptors.md §4.1)."""
        return cls(network=network_of(descriptor.hostname), operator=descriptor.contact.lower())



_IPV4 = re.compile(r"([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})")


def network_of(hostname: Optional[str]) -> Optional[str]:
    """The /16 of a literal IPv4 hostname; any other name is a network of its own."""
    if hostname is None:
        return None
    match = _IPV4.fullmatch(hostname)
    octets = [int(octet) for octet in match.groups()] if match else []
    if octets and max(octets) <= 255:
        return f"{octets[0]}.{octets[1]}.0.0/16"
    return f"host {hostname.lower()}"


def _latest(reports: Iterable[PingReport]) -> dict[str, PingReport]:
    """Each pinger's latest report (ties broken by digest, so every order agrees)."""
    latest: dict[str, PingReport] = {}
    for report in reports:
        other = latest.get(report.fingerprint)
        if other is None or (report.published, report.digest) > (other.published, other.digest):
            latest[report.fingerprint] = report
    return latest


def vote_values(
    reports: Iterable[PingReport],
    pinger_info: Mapping[str, PingerInfo],
    servers: Iterable[str],
    settings: ReliabilitySettings,
) -> dict[str, ServerReliability]:
    """An authority's ``[Reliability]`` values for ``servers`` (§3).

    ``reports`` are accepted reports (the latest of each pinger counts);
    ``pinger_info`` has every listed node (servers too: a server's own group
    is found through it).  Reports by nodes not in it are ignored.
    Servers measured by fewer than ``min_pingers`` groups are left out.
    """
    counted = {
        fp: report for fp, report in _latest(reports).items()
        if fp in pinger_info and (settings.pingers is None or fp in settings.pingers)
    }
    by_pinger = {fp: {m.fingerprint: m for m in report.measured} for fp, report in counted.items()}
    values: dict[str, ServerReliability] = {}
    for server in sorted(set(servers)):
        voices = [by_pinger[fp][server] for fp in _voices_on(server, counted, by_pinger,
                                                               pinger_info, settings)]
        if len(voices) >= settings.min_pingers:
            values[server] = _vote_value(voices)
    return values


def _voices_on(server: str, counted: Mapping[str, PingReport],
               by_pinger: Mapping[str, Mapping[str, Measured]],
               pinger_info: Mapping[str, PingerInfo], settings: ReliabilitySettings) -> list[str]:
    """The pingers heard on ``server``: no two share a /16 network or a
    declared operator (the lowest fingerprint first), and none is the
    server itself or in its network.

    Not merged transitively: a Contact line costs nothing to copy, so a
    chain of shared keys would let a few nodes in one network fold many
    honest operators into one voice.  Here nodes in one network get one
    voice, whatever they declare; copying an operator's Contact can take
    that operator's place, never more than once per network.  Exclusion
    is by network only: a dropping server that claimed the honest
    pingers' operator would otherwise silence every report on it."""
    info = pinger_info.get(server)
    own_network = info.network if info is not None else None
    networks: set[str] = set()
    operators: set[str] = set()
    heard = []
    for fp in sorted(counted):
        measured = by_pinger[fp].get(server)
        if fp == server or measured is None or measured.sent < settings.min_pings:
            continue
        pinger = pinger_info[fp]
        if pinger.network is not None and (pinger.network == own_network
                                           or pinger.network in networks):
            continue
        if pinger.operator in operators:
            continue
        heard.append(fp)
        operators.add(pinger.operator)
        if pinger.network is not None:
            networks.add(pinger.network)
    return heard


def _vote_value(voices: Sequence[Measured]) -> ServerReliability:
    """Lower medians; latency only from pingers that got a ping back (a
    pinger with none has no latency to report, and its 0 is not one)."""
    latencies = [m.median_ms for m in voices if m.returned > 0]
    return ServerReliability(
        reliability=lower_median(m.reliability for m in voices),
        latency_ms=lower_median(latencies) if latencies else 0,
        pingers=len(voices),
    )
