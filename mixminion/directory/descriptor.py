"""Server descriptors: parse and verify, build and sign (descriptors.md §4-§5).

A descriptor is how a server tells clients and other servers its identity,
its current packet key, where to reach it and what it delivers.  Everything
a client trusts about a server comes through :func:`parse_descriptor`, so it
checks every rule of the spec and says exactly which one failed.  Pure code:
the validation time and the signing randomness are parameters.
"""

from __future__ import annotations

import dataclasses
import hmac
import struct
from dataclasses import dataclass
from typing import Any, Container, Iterable, Mapping, NamedTuple, Optional, Tuple

from mixminion import __version__
from mixminion.codec.crypto import RandomSource
from mixminion.codec.errors import BuildError, ParseError
from mixminion.codec.rsa import PACKET_KEY_BYTES, PrivateKey, PublicKey
from mixminion.codec.textformat import (
    Fields,
    Line,
    Schema,
    Section,
    TextFormatError,
    decode_address_rule,
    decode_base64,
    decode_bool,
    decode_date,
    decode_host,
    decode_int,
    decode_ip,
    decode_list,
    decode_nickname,
    decode_port,
    decode_string,
    decode_time,
    document_digest,
    encode_base64,
    format_bool,
    format_date,
    format_list,
    format_time,
    load_public_key,
    optional,
    parse_sections,
    read_sections,
    render_document,
    repeated,
    required,
    require_midnights,
    sign_document,
)

DESCRIPTOR_VERSION = "0.2"
SECTION_VERSION = "0.1"
PACKET_VERSION = "0.3"
MMTP_PROTOCOL = "0.3"
DEFAULT_MMTP_PORT = 48099
#: how far in the future ``Published`` may lie (clock skew allowance)
PUBLISHED_SKEW = 600
IDENTITY_MIN_BYTES = 256
IDENTITY_MAX_BYTES = 512
MAX_CONTACT = 256
MAX_CONTACT_FINGERPRINT = 128
MAX_COMMENTS = 1024
DEFAULT_SOFTWARE = f"Mixminion {__version__}"

#: capability names in the order of the ``caps`` display string (§5.6)
CAPABILITIES = ("mbox", "smtp", "relay", "frag")

SERVER = "Server"
INCOMING = "Incoming/MMTP"
OUTGOING = "Outgoing/MMTP"
MBOX = "Delivery/MBOX"
SMTP = "Delivery/SMTP"
FRAGMENTED = "Delivery/Fragmented"
#: ours (doc/nym.md §1): this node runs a nymserver
NYM = "Delivery/Nym"
TESTING = "Testing"


# --- errors ---------------------------------------------------------------------


class DescriptorError(ParseError):
    """A server descriptor was rejected; the message says which rule failed."""


class MalformedDescriptor(DescriptorError):
    """The text breaks the format, or a field is missing or has a bad value."""


class UnsupportedVersion(MalformedDescriptor):
    """``Descriptor-Version`` is not 0.2: a format this code cannot read."""


class BadKey(MalformedDescriptor):
    """``Identity`` or ``Packet-Key`` is not an acceptable RSA key."""


class BadDigest(DescriptorError):
    """``Digest`` does not match the text: it was altered after signing."""


class BadSignature(DescriptorError):
    """``Signature`` does not verify to the digest under the ``Identity`` key."""


class ValidityError(DescriptorError):
    """The descriptor's times do not fit the validation time."""


class PublishedInFuture(ValidityError):
    """``Published`` is more than 10 minutes after the validation time."""


class NotYetValid(ValidityError):
    """The validation time is before ``Valid-After``."""


class Expired(ValidityError):
    """The validation time is after ``Valid-Until``."""


# --- section contents, shared by parsing and building ---------------------------------


class PublishedRule(NamedTuple):
    """An advisory ``Allow``/``Deny`` line, kept as written (never enforced)."""

    action: str  # "Allow" or "Deny"
    pattern: str


def _tuple(obj: Any, name: str) -> None:
    """Coerce a sequence field to a tuple so equality works after a round trip."""
    object.__setattr__(obj, name, tuple(getattr(obj, name)))


def _freeze_mmtp(obj: Any) -> None:
    _tuple(obj, "protocols")
    object.__setattr__(obj, "address_rules", tuple(PublishedRule(*r) for r in obj.address_rules))


@dataclass(frozen=True)
class IncomingMMTP:
    """``[Incoming/MMTP]``: where other nodes connect to this server."""

    hostname: str
    port: int = DEFAULT_MMTP_PORT
    protocols: Tuple[str, ...] = (MMTP_PROTOCOL,)
    ip: Optional[str] = None
    address_rules: Tuple[PublishedRule, ...] = ()

    def __post_init__(self) -> None:
        _freeze_mmtp(self)


@dataclass(frozen=True)
class OutgoingMMTP:
    """``[Outgoing/MMTP]``: this server relays to other servers."""

    protocols: Tuple[str, ...] = (MMTP_PROTOCOL,)
    address_rules: Tuple[PublishedRule, ...] = ()

    def __post_init__(self) -> None:
        _freeze_mmtp(self)


@dataclass(frozen=True)
class DeliveryInfo:
    """``[Delivery/MBOX]`` or ``[Delivery/SMTP]``."""

    max_size_kib: int
    allow_from: bool = True


@dataclass(frozen=True)
class NymInfo:
    """``[Delivery/Nym]``: the nymserver's mail domain and the RSA key its
    requests are encrypted to (doc/nym.md §1)."""

    domain: str
    key: PublicKey


@dataclass(frozen=True)
class DescriptorFields:
    """Everything a server chooses to publish; the input of :func:`build_descriptor`.

    ``valid_after``/``valid_until`` are midnights GMT; ``insecurities`` empty
    means ``Secure-Configuration: yes``.
    """

    nickname: str
    contact: str
    packet_key: PublicKey
    published: int
    valid_after: int
    valid_until: int
    incoming: Optional[IncomingMMTP] = None
    outgoing: Optional[OutgoingMMTP] = None
    mbox: Optional[DeliveryInfo] = None
    smtp: Optional[DeliveryInfo] = None
    max_fragments: Optional[int] = None
    nym: Optional[NymInfo] = None
    packet_versions: Tuple[str, ...] = (PACKET_VERSION,)
    software: Optional[str] = DEFAULT_SOFTWARE
    insecurities: Tuple[str, ...] = ()
    contact_fingerprint: Optional[str] = None
    comments: Optional[str] = None
    platform: Optional[str] = None
    configuration: Optional[str] = None

    def __post_init__(self) -> None:
        _tuple(self, "packet_versions")
        _tuple(self, "insecurities")


# --- the parsed descriptor ----------------------------------------------------------


@dataclass(frozen=True, eq=False, repr=False)
class ServerDescriptor:
    """A verified descriptor.  Two are the same iff their digests are (§5.5)."""

    text: str
    digest: bytes
    signature: bytes
    nickname: str
    identity: PublicKey
    packet_key: PublicKey
    published: int
    valid_after: int
    valid_until: int
    contact: str
    packet_versions: Tuple[str, ...]
    software: Optional[str]
    secure_configuration: Optional[bool]
    why_insecure: Optional[str]
    contact_fingerprint: Optional[str]
    comments: Optional[str]
    incoming: Optional[IncomingMMTP]
    outgoing: Optional[OutgoingMMTP]
    mbox: Optional[DeliveryInfo]
    smtp: Optional[DeliveryInfo]
    max_fragments: Optional[int]
    platform: Optional[str]
    configuration: Optional[str]
    #: the nymserver this node runs, if any
    nym: Optional[NymInfo]
    #: every section of the text, including unknown and skipped ones
    sections: Tuple[Section, ...]
    #: what was tolerated: unknown keys/sections, sections with other versions
    warnings: Tuple[str, ...]

    @property
    def identity_digest(self) -> bytes:
        """KeyID of the identity key: what routing info names this server by."""
        return self.identity.keyid

    @property
    def fingerprint(self) -> str:
        return self.identity.fingerprint

    @property
    def hostname(self) -> Optional[str]:
        return self.incoming.hostname if self.incoming else None

    @property
    def port(self) -> Optional[int]:
        return self.incoming.port if self.incoming else None

    @property
    def incoming_protocols(self) -> Tuple[str, ...]:
        return self.incoming.protocols if self.incoming else ()

    @property
    def outgoing_protocols(self) -> Tuple[str, ...]:
        return self.outgoing.protocols if self.outgoing else ()

    @property
    def capabilities(self) -> frozenset[str]:
        """Subset of :data:`CAPABILITIES`; empty if nobody can connect to it."""
        if self.incoming is None:
            return frozenset()
        present = (self.mbox, self.smtp, self.outgoing, self.max_fragments)
        return frozenset(c for c, p in zip(CAPABILITIES, present) if p is not None)

    @property
    def caps(self) -> str:
        """The capability display string of §5.6 (``mbox smtp relay frag``)."""
        return " ".join(c for c in CAPABILITIES if c in self.capabilities)

    @property
    def routing_info(self) -> Optional[bytes]:
        """FWD_HOST routing info addressing this server (packet.md §5.2)."""
        if self.incoming is None:
            return None
        host = self.incoming.hostname.lower().encode("ascii")
        return struct.pack(">H", self.incoming.port) + self.identity_digest + host

    def is_valid_at(self, t: float) -> bool:
        return self.valid_after <= t <= self.valid_until

    def is_valid_over(self, start: float, end: float) -> bool:
        return self.valid_after <= start and end <= self.valid_until

    def supports_packet_version(self, version: str = PACKET_VERSION) -> bool:
        return version in self.packet_versions

    def can_start_at(self) -> bool:
        """A client can hand packets to this server directly."""
        return MMTP_PROTOCOL in self.incoming_protocols

    def can_relay_to(self, other: ServerDescriptor) -> bool:
        if self.nickname.lower() == other.nickname.lower():
            return True
        return bool(set(self.outgoing_protocols) & set(other.incoming_protocols))

    def to_fields(self) -> DescriptorFields:
        """What to pass to :func:`build_descriptor` to publish the same content."""
        return DescriptorFields(
            nickname=self.nickname,
            contact=self.contact,
            packet_key=self.packet_key,
            published=self.published,
            valid_after=self.valid_after,
            valid_until=self.valid_until,
            incoming=self.incoming,
            outgoing=self.outgoing,
            mbox=self.mbox,
            smtp=self.smtp,
            max_fragments=self.max_fragments,
            nym=self.nym,
            packet_versions=self.packet_versions,
            software=self.software,
            insecurities=tuple(self.why_insecure.split(", ")) if self.why_insecure else (),
            contact_fingerprint=self.contact_fingerprint,
            comments=self.comments,
            platform=self.platform,
            configuration=self.configuration,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ServerDescriptor):
            return NotImplemented
        return hmac.compare_digest(self.digest, other.digest)

    def __hash__(self) -> int:
        return hash(self.digest)

    def __repr__(self) -> str:
        return (
            f"<ServerDescriptor {self.nickname} {self.digest.hex()} "
            f"{format_date(self.valid_after)}..{format_date(self.valid_until)}>"
        )


# --- schemas (§4.1) -----------------------------------------------------------------

_SERVER: Schema = {
    "Descriptor-Version": required(decode_string()),
    "Nickname": required(decode_nickname),
    "Identity": required(decode_base64),
    "Digest": required(decode_base64),
    "Signature": required(decode_base64),
    "Published": required(decode_time),
    "Valid-After": required(decode_date),
    "Valid-Until": required(decode_date),
    "Packet-Key": required(decode_base64),
    "Packet-Versions": required(decode_list),
    "Software": optional(decode_string()),
    "Secure-Configuration": optional(decode_bool),
    "Why-Insecure": optional(decode_string()),
    "Contact": required(decode_string(MAX_CONTACT)),
    "Contact-Fingerprint": optional(decode_string(MAX_CONTACT_FINGERPRINT)),
    "Comments": optional(decode_string(MAX_COMMENTS)),
}
_ADDRESS_RULES: Schema = {"Allow": repeated(decode_address_rule), "Deny": repeated(decode_address_rule)}
_INCOMING: Schema = {
    "Version": required(decode_string()),
    "IP": optional(decode_ip),
    "Hostname": required(decode_host),
    "Port": required(decode_port),
    "Key-Digest": optional(decode_base64),
    "Protocols": required(decode_list),
    **_ADDRESS_RULES,
}
_OUTGOING: Schema = {
    "Version": required(decode_string()),
    "Protocols": required(decode_list),
    **_ADDRESS_RULES,
}
_DELIVERY: Schema = {
    "Version": required(decode_string()),
    "Maximum-Size": required(decode_int),
    "Allow-From": required(decode_bool),
}
_FRAGMENTED: Schema = {
    "Version": required(decode_string()),
    "Maximum-Fragments": required(decode_int),
}
_NYM: Schema = {
    "Version": required(decode_string()),
    "Domain": required(decode_host),
    "Key": required(decode_base64),
}
_TESTING: Schema = {
    "Platform": optional(decode_string()),
    "Configuration": optional(decode_string()),
}
_SCHEMAS: Mapping[str, Schema] = {
    SERVER: _SERVER,
    INCOMING: _INCOMING,
    OUTGOING: _OUTGOING,
    MBOX: _DELIVERY,
    SMTP: _DELIVERY,
    FRAGMENTED: _FRAGMENTED,
    NYM: _NYM,
    TESTING: _TESTING,
}
#: sections whose version field selects whether we can read them (§4.1)
_VERSIONED: Mapping[str, tuple[str, str]] = {
    SERVER: ("Descriptor-Version", DESCRIPTOR_VERSION),
    INCOMING: ("Version", SECTION_VERSION),
    OUTGOING: ("Version", SECTION_VERSION),
    MBOX: ("Version", SECTION_VERSION),
    SMTP: ("Version", SECTION_VERSION),
    FRAGMENTED: ("Version", SECTION_VERSION),
    NYM: ("Version", SECTION_VERSION),
}


# --- parsing and verification (§5.4) ---------------------------------------------------


def parse_descriptor(
    text: str | bytes,
    now: float,
    *,
    check_validity: bool = True,
    verified_digests: Container[bytes] = frozenset(),
) -> ServerDescriptor:
    """Parse and fully verify one descriptor at validation time ``now``.

    ``check_validity=False`` accepts descriptors outside their validity
    interval (a server's future keysets; directories, which judge validity
    at use).  A digest in ``verified_digests`` skips only the RSA signature
    check (§5.4 step 4); every other rule is still applied.
    """
    try:
        sections = parse_sections(text)
        fields, warnings = _read_sections(sections)
    except TextFormatError as exc:
        raise MalformedDescriptor(str(exc)) from None
    server = fields[SERVER]
    source = _source_text(text)
    digest = check_digest(source, server)
    identity = load_key(server, "Identity", IDENTITY_MIN_BYTES, IDENTITY_MAX_BYTES)
    packet_key = load_key(server, "Packet-Key", PACKET_KEY_BYTES, PACKET_KEY_BYTES)
    # §5.4 step 5: ordering of the validity dates, and no publishing ahead.
    check_date_order(server, MalformedDescriptor)
    check_published(server, now, PublishedInFuture)
    if digest not in verified_digests:
        check_signature(server, identity, digest)
    descriptor = _assemble(source, digest, identity, packet_key, fields, sections, warnings)
    if check_validity:
        _check_validity(descriptor, now)
    return descriptor


def _source_text(text: str | bytes) -> str:
    # parse_sections has already rejected anything that is not ASCII.
    return text.decode("ascii") if isinstance(text, (bytes, bytearray)) else text


def _read_sections(sections: Tuple[Section, ...]) -> tuple[dict[str, Fields], list[str]]:
    """Select the sections we can read (§4.1 version rule) and decode them."""
    if sections[0].name != SERVER:
        raise MalformedDescriptor(
            f"line {sections[0].line}: a descriptor must start with [Server], not [{sections[0].name}]"
        )
    return read_sections(sections, _SCHEMAS, accept=_version_ok)


def _version_ok(section: Section, warnings: list[str]) -> bool:
    """False (with a warning) for a section of another version; [Server] rejects."""
    if section.name not in _VERSIONED:
        return True
    key, expected = _VERSIONED[section.name]
    for entry in section.entries:
        if entry.key == key and entry.value != expected:
            message = f"line {entry.line}: [{section.name}] {key} is {entry.value!r}, not {expected}"
            if section.name == SERVER:
                raise UnsupportedVersion(message)
            warnings.append(message + "; section ignored")
            return False
    return True


def check_digest(text: str, fields: Fields, error: type[ParseError] = BadDigest) -> bytes:
    """The digest of ``text`` (§5.2), which must be the one its ``Digest`` field claims.

    Shared with every document signed like a descriptor (ping reports).
    """
    digest = document_digest(text)
    claimed: bytes = fields["Digest"]
    if not hmac.compare_digest(digest, claimed):
        detail = f"is {len(claimed)} bytes, not 20" if len(claimed) != len(digest) else (
            f"{encode_base64(claimed)} does not match the text (digest {encode_base64(digest)})"
        )
        raise error(f"{fields.where('Digest')}: {detail}")
    return digest


def load_key(
    fields: Fields, key: str, min_bytes: int, max_bytes: int, error: type[ParseError] = BadKey
) -> PublicKey:
    """The RSA public key in field ``key``; ``error`` names the field if it is unacceptable."""
    try:
        return load_public_key(fields[key], min_bytes, max_bytes)
    except ValueError as exc:
        raise error(f"{fields.where(key)}: {exc}") from None


def check_date_order(fields: Fields, error: type[ParseError], line_offset: int = 0) -> None:
    """``Valid-Until`` must be after ``Valid-After`` (descriptors and directories alike)."""
    if fields["Valid-Until"] <= fields["Valid-After"]:
        raise error(
            f"{fields.where('Valid-Until', line_offset)}: {format_date(fields['Valid-Until'])} is not after "
            f"Valid-After {format_date(fields['Valid-After'])}"
        )


def check_published(fields: Fields, now: float, error: type[ParseError]) -> None:
    """``Published`` may lie at most :data:`PUBLISHED_SKEW` after the validation time."""
    if fields["Published"] > now + PUBLISHED_SKEW:
        raise error(
            f"{fields.where('Published')}: {format_time(fields['Published'])} is more than "
            f"{PUBLISHED_SKEW} s after the validation time {format_time(int(now))}"
        )


def check_signature(
    fields: Fields, identity: PublicKey, digest: bytes, error: type[ParseError] = BadSignature
) -> None:
    """``Signature`` must verify to ``digest`` under ``identity`` (§5.4 step 6)."""
    signature: bytes = fields["Signature"]
    if len(signature) != identity.size_bytes:
        raise error(
            f"{fields.where('Signature')}: {len(signature)} bytes, but the Identity key "
            f"needs {identity.size_bytes}"
        )
    if not identity.check_signature(signature, digest):
        raise error(f"{fields.where('Signature')}: does not verify to the digest under the Identity key")


def _check_validity(descriptor: ServerDescriptor, now: float) -> None:
    if now < descriptor.valid_after:
        raise NotYetValid(
            f"{descriptor.nickname}: not valid before {format_date(descriptor.valid_after)} "
            f"(validation time {format_time(int(now))})"
        )
    if now > descriptor.valid_until:
        raise Expired(
            f"{descriptor.nickname}: expired at {format_date(descriptor.valid_until)} "
            f"(validation time {format_time(int(now))})"
        )


def _address_rules(section: Optional[Fields], sections: Tuple[Section, ...]) -> Tuple[PublishedRule, ...]:
    """Allow/Deny lines in text order (they interleave, so read the raw entries)."""
    if section is None:
        return ()
    raw = next(s for s in sections if s.name == section.section)
    return tuple(PublishedRule(e.key, e.value) for e in raw.entries if e.key in ("Allow", "Deny"))


def _incoming(fields: Optional[Fields], sections: Tuple[Section, ...]) -> Optional[IncomingMMTP]:
    if fields is None:
        return None
    return IncomingMMTP(
        hostname=fields["Hostname"],
        port=fields["Port"],
        protocols=fields["Protocols"],
        ip=fields.get("IP"),
        address_rules=_address_rules(fields, sections),
    )


def _outgoing(fields: Optional[Fields], sections: Tuple[Section, ...]) -> Optional[OutgoingMMTP]:
    if fields is None:
        return None
    return OutgoingMMTP(protocols=fields["Protocols"], address_rules=_address_rules(fields, sections))


def _delivery(fields: Optional[Fields]) -> Optional[DeliveryInfo]:
    if fields is None:
        return None
    return DeliveryInfo(max_size_kib=fields["Maximum-Size"], allow_from=fields["Allow-From"])


def _assemble(
    text: str,
    digest: bytes,
    identity: PublicKey,
    packet_key: PublicKey,
    fields: Mapping[str, Fields],
    sections: Tuple[Section, ...],
    warnings: list[str],
) -> ServerDescriptor:
    server = fields[SERVER]
    fragmented = fields.get(FRAGMENTED)
    testing = fields.get(TESTING)
    nym = fields.get(NYM)
    return ServerDescriptor(
        text=text,
        digest=digest,
        signature=server["Signature"],
        nickname=server["Nickname"],
        identity=identity,
        packet_key=packet_key,
        published=server["Published"],
        valid_after=server["Valid-After"],
        valid_until=server["Valid-Until"],
        contact=server["Contact"],
        packet_versions=server["Packet-Versions"],
        software=server.get("Software"),
        secure_configuration=server.get("Secure-Configuration"),
        why_insecure=server.get("Why-Insecure"),
        contact_fingerprint=server.get("Contact-Fingerprint"),
        comments=server.get("Comments"),
        incoming=_incoming(fields.get(INCOMING), sections),
        outgoing=_outgoing(fields.get(OUTGOING), sections),
        mbox=_delivery(fields.get(MBOX)),
        smtp=_delivery(fields.get(SMTP)),
        max_fragments=fragmented["Maximum-Fragments"] if fragmented else None,
        platform=testing.get("Platform") if testing else None,
        configuration=testing.get("Configuration") if testing else None,
        nym=NymInfo(nym["Domain"], load_key(nym, "Key", IDENTITY_MIN_BYTES, IDENTITY_MAX_BYTES))
        if nym else None,
        sections=sections,
        warnings=tuple(warnings),
    )


# --- building and signing (§4.2, §5.3) -----------------------------------------------


def format_descriptor(fields: DescriptorFields, identity: PublicKey) -> str:
    """The unsigned text in the reference's order, Digest/Signature blank.

    Does no checking beyond what rendering needs; :func:`build_descriptor`
    is the safe entry point.  Exposed so tests can sign deliberately bad
    descriptors.
    """
    sections: list[tuple[str, list[Line]]] = [(SERVER, _server_lines(fields, identity))]
    if fields.incoming is not None:
        sections.append((INCOMING, _incoming_lines(fields.incoming, identity)))
    if fields.outgoing is not None:
        sections.append((OUTGOING, _outgoing_lines(fields.outgoing)))
    for name, info in ((MBOX, fields.mbox), (SMTP, fields.smtp)):
        if info is not None:
            sections.append((name, _delivery_lines(info)))
    if fields.max_fragments is not None:
        sections.append((FRAGMENTED, [
            Line("Version", SECTION_VERSION),
            Line("Maximum-Fragments", str(fields.max_fragments)),
        ]))
    if fields.nym is not None:
        sections.append((NYM, [
            Line("Version", SECTION_VERSION),
            Line("Domain", fields.nym.domain),
            Line("Key", encode_base64(fields.nym.key.der)),
        ]))
    testing = _optional_lines(("Platform", fields.platform), ("Configuration", fields.configuration))
    if testing:
        sections.append((TESTING, testing))
    return render_document(sections)


def _optional_lines(*pairs: tuple[str, Optional[str]]) -> list[Line]:
    return [Line(key, value) for key, value in pairs if value is not None]


def _server_lines(fields: DescriptorFields, identity: PublicKey) -> list[Line]:
    lines = [
        Line("Descriptor-Version", DESCRIPTOR_VERSION),
        Line("Nickname", fields.nickname),
        Line("Identity", encode_base64(identity.der)),
        Line("Digest", ""),
        Line("Signature", ""),
        Line("Published", format_time(fields.published)),
        Line("Valid-After", format_date(fields.valid_after)),
        Line("Valid-Until", format_date(fields.valid_until)),
        Line("Packet-Key", encode_base64(fields.packet_key.der)),
        Line("Packet-Versions", format_list(fields.packet_versions)),
    ]
    lines += _optional_lines(("Software", fields.software))
    lines.append(Line("Secure-Configuration", format_bool(not fields.insecurities)))
    lines.append(Line("Contact", fields.contact))
    why = format_list(fields.insecurities) if fields.insecurities else None
    return lines + _optional_lines(
        ("Why-Insecure", why),
        ("Contact-Fingerprint", fields.contact_fingerprint),
        ("Comments", fields.comments),
    )


def _rule_lines(rules: Iterable[PublishedRule]) -> list[Line]:
    return [Line(rule.action, rule.pattern) for rule in rules]


def _incoming_lines(incoming: IncomingMMTP, identity: PublicKey) -> list[Line]:
    lines = [Line("Version", SECTION_VERSION)]
    lines += _optional_lines(("IP", incoming.ip))
    lines += [
        Line("Hostname", incoming.hostname),
        Line("Port", str(incoming.port)),
        Line("Key-Digest", encode_base64(identity.keyid)),
        Line("Protocols", format_list(incoming.protocols)),
    ]
    return lines + _rule_lines(incoming.address_rules)


def _outgoing_lines(outgoing: OutgoingMMTP) -> list[Line]:
    lines = [Line("Version", SECTION_VERSION), Line("Protocols", format_list(outgoing.protocols))]
    return lines + _rule_lines(outgoing.address_rules)


def _delivery_lines(info: DeliveryInfo) -> list[Line]:
    return [
        Line("Version", SECTION_VERSION),
        Line("Maximum-Size", str(info.max_size_kib)),
        Line("Allow-From", format_bool(info.allow_from)),
    ]


def build_descriptor(fields: DescriptorFields, identity_key: PrivateKey, rng: RandomSource) -> str:
    """Signed descriptor text for ``fields``, guaranteed to read back as ``fields``.

    The result is parsed again (validity interval not checked, since a
    server publishes keysets ahead of time); any rule it breaks, or any
    value that would read back differently, is a :class:`BuildError`.
    """
    require_midnights(valid_after=fields.valid_after, valid_until=fields.valid_until)
    signed = sign_document(format_descriptor(fields, identity_key.public), identity_key, rng)
    try:
        parsed = parse_descriptor(signed, fields.published, check_validity=False)
    except DescriptorError as exc:
        raise BuildError(f"descriptor would be rejected: {exc}") from exc
    if parsed.identity != identity_key.public:
        raise BuildError("descriptor identity does not match the signing key")
    _check_reads_back(fields, parsed.to_fields())
    return signed


def _check_reads_back(wanted: DescriptorFields, got: DescriptorFields) -> None:
    for item in dataclasses.fields(wanted):
        if getattr(wanted, item.name) != getattr(got, item.name):
            raise BuildError(
                f"{item.name} would read back as {getattr(got, item.name)!r}, "
                f"not {getattr(wanted, item.name)!r}"
            )
