"""Directories: the signed lists of descriptors clients build paths from
(descriptors.md §7).

Two formats.  The legacy 0.2 format (§7.1) has one signature over the whole
text; we read it with the reference's gaps closed (validity dates checked,
signer must be trusted, software lists split on commas and blanks).  The
0.3 format (§7.2) carries any number of ``[Signed-Directory]`` blocks in
front of a body they all sign; a client accepts it only with valid
signatures from ``threshold`` distinct trusted authorities (§8 step 7 as
fixed for 2026).  Authorities exchange votes in the same format; accepting
votes and merging them into the consensus is
:mod:`mixminion.directory.voting`.

Pure code: the validation time and the signing randomness are parameters.
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass, field
from typing import (
    TYPE_CHECKING,
    Collection,
    Container,
    Iterable,
    Mapping,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    Union,
)

from mixminion.codec.crypto import RandomSource, sha1
from mixminion.codec.errors import BuildError, ParseError
from mixminion.codec.rsa import PrivateKey, PublicKey
from mixminion.directory.descriptor import (
    IDENTITY_MAX_BYTES,
    IDENTITY_MIN_BYTES,
    DescriptorError,
    ServerDescriptor,
    check_date_order,
    check_published,
    load_key,
    parse_descriptor,
)
from mixminion.directory.reliability import (
    FINGERPRINT,
    ServerReliability,
    decode_reliability_line,
    format_reliability_line,
    normalised_reliability,
)
from mixminion.codec.textformat import (
    SECONDS_PER_DAY,
    Fields,
    Line,
    Schema,
    Section,
    TextFormatError,
    as_text,
    clean,
    decode_base64,
    decode_date,
    decode_list,
    decode_nickname,
    decode_string,
    decode_time,
    document_digest,
    encode_base64,
    format_date,
    format_list,
    format_time,
    load_public_key,
    optional,
    parse_sections,
    read_fields,
    read_sections,
    render_document,
    repeated,
    required,
    require_midnights,
)

LEGACY_VERSION = "0.2"
DIRECTORY_VERSION = "0.3"
STATUS_VOTE = "vote"
STATUS_CONSENSUS = "consensus"
STATUSES = (STATUS_VOTE, STATUS_CONSENSUS)
#: a consensus leaves out descriptors starting more than this after its day
MAX_FUTURE = 30 * SECONDS_PER_DAY

SIGNED = "Signed-Directory"
INFO = "Directory-Info"
SOFTWARE = "Recommended-Software"
RELIABILITY = "Reliability"
LEGACY_HEADER = "Directory"
LEGACY_SIGNATURE = "Signature"

_SIGNED_LINE = f"[{SIGNED}]\n"
_INFO_LINE = f"[{INFO}]\n"
_SERVER_LINE = "[Server]\n"


# --- errors ---------------------------------------------------------------------------


class DirectoryError(ParseError):
    """A directory (or vote) was rejected; the message says why."""


class MalformedDirectory(DirectoryError):
    """The text breaks the directory format or a field has a bad value."""


class UnsupportedDirectoryVersion(MalformedDirectory):
    """The directory's Version is not one this code reads."""


class NotEnoughSignatures(DirectoryError):
    """Fewer than ``required`` trusted authorities validly signed the directory.

    ``valid`` lists the fingerprints that counted; ``rejected`` the
    ``SignatureCheck`` of every block that did not.
    """

    def __init__(
        self,
        message: str,
        *,
        valid: Sequence[str] = (),
        required: int = 0,
        rejected: Sequence["SignatureCheck"] = (),
    ) -> None:
        super().__init__(message)
        self.valid = tuple(valid)
        self.required = required
        self.rejected = tuple(rejected)


class TamperedDirectory(NotEnoughSignatures):
    """Trusted authorities signed a different text: it was changed after signing."""


class DirectoryValidityError(DirectoryError):
    """The directory is authentic but not for the validation time."""


class DirectoryExpired(DirectoryValidityError):
    """The validation time is after Valid-Until."""


class DirectoryNotYetValid(DirectoryValidityError):
    """The validation time is before Valid-After (or Published is in the future)."""


class BadDirectoryDescriptor(DirectoryError):
    """An embedded descriptor failed verification; the whole directory is void."""

    def __init__(self, message: str, *, index: int, nickname: Optional[str]) -> None:
        super().__init__(message)
        self.index = index
        self.nickname = nickname


class BadSignatureBlock(DirectoryError):
    """A signature block offered for merging does not sign this directory."""


class VoteRejected(DirectoryError):
    """Another authority's vote breaks a vote-acceptance rule (§7.2)."""


class ConsensusError(ValueError):
    """The votes handed to :func:`compute_consensus` were not accepted votes."""


# --- fingerprints and trust -------------------------------------------------------------


Trusted = Union[Mapping[str, PublicKey], Collection[str]]
#: fingerprint -> (identity key, vote URL base) of every configured voter
Voters = Mapping[str, Tuple[PublicKey, str]]


def normalise_fingerprint(value: str) -> str:
    """Upper-case hex without the display spaces; ValueError if not 20 bytes."""
    fingerprint = "".join(value.split()).upper()
    if not FINGERPRINT.fullmatch(fingerprint):
        raise ValueError(f"{value!r} is not a key fingerprint (40 hexadecimal digits)")
    return fingerprint


def _trust_table(trusted: Trusted) -> dict[str, Optional[PublicKey]]:
    """Fingerprint -> configured key (None when only fingerprints are known)."""
    if isinstance(trusted, (str, bytes)):
        raise TypeError("trusted must be a collection of fingerprints, not a single string")
    if isinstance(trusted, Mapping):
        table: dict[str, Optional[PublicKey]] = {}
        for fingerprint, key in trusted.items():
            normal = normalise_fingerprint(fingerprint)
            if key is not None and key.fingerprint != normal:
                raise ValueError(f"trusted key for {normal} has fingerprint {key.fingerprint}")
            table[normal] = key
        return table
    return {normalise_fingerprint(fingerprint): None for fingerprint in trusted}


def voter_table(voters: Voters) -> dict[str, Tuple[PublicKey, str]]:
    table = {normalise_fingerprint(fp): (key, url) for fp, (key, url) in voters.items()}
    _trust_table({fp: key for fp, (key, _) in table.items()})  # keys match fingerprints
    return table


def _check_threshold(threshold: int) -> None:
    if threshold < 1:
        raise ValueError(f"threshold must be at least 1 (got {threshold}): unsigned directories are never trusted")


# --- version ordering ---------------------------------------------------------------------

_VERSION = re.compile(r"([0-9]+)\.([0-9]+)\.([0-9]+)(?:(alpha|beta|pre|rc)([0-9]*))?(?:\.([0-9]+))?")
_STATUS_RANK = {"alpha": 0, "beta": 1, "pre": 2, "rc": 3}
_RELEASE_RANK = 4


def version_key(version: str) -> tuple[int, Tuple[int, ...], str]:
    """Sort key of §7.2: major.minor.sub, alpha<beta<pre<rc<release, patch.

    Unparsable versions sort last; the string itself breaks ties so the
    order is total (every authority sorts alike).
    """
    match = _VERSION.fullmatch(version)
    if match is None:
        return (1, (), version)
    major, minor, sub, status, status_number, patch = match.groups()
    rank = _STATUS_RANK[status] if status else _RELEASE_RANK
    numbers = (int(major), int(minor), int(sub), rank, int(status_number or 0), int(patch or 0))
    return (0, numbers, version)


def sort_versions(versions: Iterable[str]) -> Tuple[str, ...]:
    """Unique versions in version order."""
    return tuple(sorted(set(versions), key=version_key))


def descriptor_sort_key(descriptor: ServerDescriptor) -> tuple[str, int, bytes]:
    """(lower-cased nickname, Valid-After, digest): the §7.2 producer order."""
    return (descriptor.nickname.lower(), descriptor.valid_after, descriptor.digest)


def is_superseded(descriptor: ServerDescriptor, others: Iterable[ServerDescriptor]) -> bool:
    """§5.5: every instant of [Valid-After, Valid-Until) is covered by another
    descriptor of the same nickname published strictly later."""
    nickname = descriptor.nickname.lower()
    intervals = sorted(
        (other.valid_after, other.valid_until)
        for other in others
        if other.digest != descriptor.digest
        and other.nickname.lower() == nickname
        and other.published > descriptor.published
    )
    covered = descriptor.valid_after
    for start, end in intervals:
        if start > covered:
            break
        covered = max(covered, end)
        if covered >= descriptor.valid_until:
            return True
    return covered >= descriptor.valid_until


# --- the directory contents -------------------------------------------------------------------


class VotingServer(NamedTuple):
    """One ``Voting-Server`` line: an authority's fingerprint and vote URL base."""

    fingerprint: str
    url: str


@dataclass(frozen=True)
class DirectoryInfo:
    """The ``[Directory-Info]``, ``[Recommended-Software]`` and
    ``[Reliability]`` content of a 0.3 directory.

    Parsed values are kept as written (a vote's order matters for
    acceptance); :func:`build_directory` writes them sorted.
    ``reliability`` maps a carried server's fingerprint to what the vote or
    consensus says of it (doc/reliability.md §3); empty writes no section.
    """

    status: str
    valid_after: int
    valid_until: int
    recommended_nicknames: Tuple[str, ...] = ()
    voting_servers: Tuple[VotingServer, ...] = ()
    client_versions: Tuple[str, ...] = ()
    server_versions: Tuple[str, ...] = ()
    reliability: Mapping[str, ServerReliability] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("recommended_nicknames", "client_versions", "server_versions"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "voting_servers", tuple(VotingServer(*v) for v in self.voting_servers))
        object.__setattr__(self, "reliability", dict(self.reliability))


class SignatureCheck(NamedTuple):
    """What became of one signature: ``status`` is one of the ``SIG_*`` names."""

    fingerprint: str
    status: str
    reason: str


SIG_VALID = "valid"
SIG_UNTRUSTED = "untrusted"
SIG_NOT_VOTING = "not-voting"
SIG_BAD = "bad"
SIG_OTHER_DIGEST = "other-digest"
SIG_DUPLICATE = "duplicate"


class _DirectoryView:
    """Lookups shared by both formats (subclasses provide the two attributes)."""

    if TYPE_CHECKING:

        @property
        def descriptors(self) -> Tuple[ServerDescriptor, ...]: ...

        @property
        def recommended_nicknames(self) -> Tuple[str, ...]: ...

    def recommended_servers(self) -> list[ServerDescriptor]:
        """Descriptors whose nickname is recommended (case-insensitive, §7.1)."""
        wanted = {nickname.lower() for nickname in self.recommended_nicknames}
        return [d for d in self.descriptors if d.nickname.lower() in wanted]

    def descriptors_for(self, nickname: str) -> list[ServerDescriptor]:
        """Every descriptor of the server named ``nickname`` (case-insensitive)."""
        lowered = nickname.lower()
        return [d for d in self.descriptors if d.nickname.lower() == lowered]

    def is_recommended(self, nickname: str) -> bool:
        return nickname.lower() in {n.lower() for n in self.recommended_nicknames}


@dataclass(frozen=True, eq=False)
class SignedDirectory(_DirectoryView):
    """A verified 0.3 directory (vote or consensus).

    ``text`` is the cleaned text (§5.1), which verifies exactly like the
    received one; ``signers`` are the trusted authorities whose signatures
    counted; ``signatures`` says what happened to every block.
    """

    info: DirectoryInfo
    descriptors: Tuple[ServerDescriptor, ...]
    digest: bytes
    signers: Tuple[str, ...]
    signatures: Tuple[SignatureCheck, ...]
    text: str
    warnings: Tuple[str, ...] = ()

    @property
    def status(self) -> str:
        return self.info.status

    @property
    def valid_after(self) -> int:
        return self.info.valid_after

    @property
    def valid_until(self) -> int:
        return self.info.valid_until

    @property
    def recommended_nicknames(self) -> Tuple[str, ...]:
        return self.info.recommended_nicknames

    @property
    def client_versions(self) -> Tuple[str, ...]:
        return self.info.client_versions

    @property
    def server_versions(self) -> Tuple[str, ...]:
        return self.info.server_versions

    @property
    def reliability(self) -> Mapping[str, ServerReliability]:
        """Fingerprint -> voted reliability of the measured servers it carries."""
        return self.info.reliability


@dataclass(frozen=True, eq=False)
class LegacyDirectory(_DirectoryView):
    """A verified legacy 0.2 directory (§7.1); ``signers`` holds its one signer."""

    published: int
    valid_after: int
    valid_until: int
    recommended_nicknames: Tuple[str, ...]
    client_versions: Tuple[str, ...]
    server_versions: Tuple[str, ...]
    descriptors: Tuple[ServerDescriptor, ...]
    digest: bytes
    signers: Tuple[str, ...]
    text: str
    warnings: Tuple[str, ...] = ()

    @property
    def reliability(self) -> Mapping[str, ServerReliability]:
        """The legacy format measures nothing: every server is unmeasured."""
        return {}


AnyDirectory = Union[SignedDirectory, LegacyDirectory]


# --- splitting the cleaned text ------------------------------------------------------------


def _cleaned(text: str | bytes) -> str:
    try:
        return clean(as_text(text))
    except TextFormatError as exc:
        raise MalformedDirectory(str(exc)) from None


def _line_of(text: str, position: int) -> int:
    return text.count("\n", 0, position) + 1


def _split_blocks(prefix: str) -> list[str]:
    """Cut a run of ``[Signed-Directory]`` blocks apart at their header lines."""
    if not prefix:
        return []
    if not prefix.startswith(_SIGNED_LINE):
        raise MalformedDirectory(
            f"line 1: expected [{SIGNED}] or [{INFO}], got {prefix.split(chr(10), 1)[0]!r}"
        )
    starts = [0] + [m.start() + 1 for m in re.finditer(r"\n(?=\[Signed-Directory\]\n)", prefix)]
    return [prefix[a:b] for a, b in zip(starts, starts[1:] + [len(prefix)])]


def _split_signatures(cleaned: str) -> tuple[list[str], str]:
    """Signature blocks and the signed body (§7.2 "Split")."""
    if cleaned.startswith(_INFO_LINE):
        return [], cleaned
    at = cleaned.find("\n" + _INFO_LINE)
    if at < 0:
        blocks = _split_blocks(cleaned)  # reports a text that starts wrongly
        raise MalformedDirectory(f"no [{INFO}] section after {len(blocks)} signature block(s)")
    return _split_blocks(cleaned[: at + 1]), cleaned[at + 1 :]


def signature_count(text: str | bytes) -> int:
    """How many signature blocks stand in front of the body."""
    blocks, _ = _split_signatures(_cleaned(text))
    return len(blocks)


def _split_body(body: str) -> tuple[str, list[tuple[int, str]]]:
    """The info part and each ``[Server]`` part with its offset in ``body``."""
    starts = [m.start() + 1 for m in re.finditer(r"\n(?=\[Server\]\n)", body)]
    bounds = starts + [len(body)]
    return body[: bounds[0]], [(a, body[a:b]) for a, b in zip(bounds, bounds[1:])]


# --- signature blocks -------------------------------------------------------------------------


@dataclass(frozen=True)
class SignatureBlock:
    """One parsed ``[Signed-Directory]`` block (not yet checked)."""

    identity: PublicKey
    digest: bytes
    signature: bytes
    text: str

    @property
    def fingerprint(self) -> str:
        return self.identity.fingerprint

    def signs(self, digest: bytes) -> bool:
        """True iff this block is a valid signature of ``digest``."""
        return hmac.compare_digest(self.digest, digest) and self.identity.check_signature(self.signature, digest)


_SIGNATURE_SCHEMA: Schema = {
    "Directory-Identity": required(decode_base64),
    "Directory-Digest": required(decode_base64),
    "Directory-Signature": required(decode_base64),
}


def parse_signature_block(block: str, first_line: int = 1) -> SignatureBlock:
    """Strictly parse one block: unknown keys or sections are errors (§7.2)."""
    where = f"signature block at line {first_line}"
    try:
        sections = parse_sections(block)
        if len(sections) != 1 or sections[0].name != SIGNED:
            names = ", ".join(f"[{s.name}]" for s in sections)
            raise MalformedDirectory(f"{where}: must be exactly one [{SIGNED}] section, got {names}")
        fields, _ = read_fields(sections[0], _SIGNATURE_SCHEMA, strict=True)
        identity = load_public_key(fields["Directory-Identity"], IDENTITY_MIN_BYTES, IDENTITY_MAX_BYTES)
    except (TextFormatError, ValueError) as exc:
        raise MalformedDirectory(f"{where}: {exc}") from None
    digest: bytes = fields["Directory-Digest"]
    if len(digest) != 20:
        raise MalformedDirectory(f"{where}: Directory-Digest is {len(digest)} bytes, not 20")
    return SignatureBlock(identity, digest, fields["Directory-Signature"], block)


def _parse_blocks(blocks: list[str]) -> list[SignatureBlock]:
    parsed, line = [], 1
    for block in blocks:
        parsed.append(parse_signature_block(block, line))
        line += block.count("\n")
    return parsed


def _check_signatures(
    blocks: Sequence[SignatureBlock],
    digest: bytes,
    trusted: Mapping[str, Optional[PublicKey]],
    voting: Optional[Collection[str]],
) -> list[SignatureCheck]:
    """Judge every block; only distinct trusted (voting) authorities count."""
    checks: list[SignatureCheck] = []
    counted: set[str] = set()
    for block in blocks:
        status, reason = _judge(block, digest, trusted, voting)
        if status == SIG_VALID and block.fingerprint in counted:
            status, reason = SIG_DUPLICATE, "a second signature by the same authority counts once"
        if status == SIG_VALID:
            counted.add(block.fingerprint)
        checks.append(SignatureCheck(block.fingerprint, status, reason))
    return checks


def _judge(
    block: SignatureBlock,
    digest: bytes,
    trusted: Mapping[str, Optional[PublicKey]],
    voting: Optional[Collection[str]],
) -> tuple[str, str]:
    fingerprint = block.fingerprint
    if fingerprint not in trusted:
        return SIG_UNTRUSTED, "not a trusted authority"
    if voting is not None and fingerprint not in voting:
        return SIG_NOT_VOTING, "trusted, but not listed as a Voting-Server of this directory"
    configured = trusted[fingerprint]
    if configured is not None and configured != block.identity:
        return SIG_BAD, "key differs from the configured key for this fingerprint"
    if not hmac.compare_digest(block.digest, digest):
        if block.identity.check_signature(block.signature, block.digest):
            return SIG_OTHER_DIGEST, (
                f"signed digest {block.digest.hex()}, but this text has digest {digest.hex()}: "
                "the directory was changed after it was signed"
            )
        return SIG_BAD, "Directory-Digest does not match the text and the signature is invalid"
    if not block.identity.check_signature(block.signature, digest):
        return SIG_BAD, "signature does not verify"
    return SIG_VALID, "valid"


def _require_threshold(checks: Sequence[SignatureCheck], threshold: int, what: str) -> Tuple[str, ...]:
    """The counted signers, or NotEnoughSignatures/TamperedDirectory saying why not."""
    valid = tuple(sorted(c.fingerprint for c in checks if c.status == SIG_VALID))
    if len(valid) >= threshold:
        return valid
    rejected = [c for c in checks if c.status != SIG_VALID]
    message = (
        f"{len(valid)} valid signature(s) from distinct trusted authorities{what}; {threshold} required"
        + (f" (counted: {', '.join(valid)})" if valid else "")
    )
    if rejected:
        message += "; not counted: " + "; ".join(f"{c.fingerprint}: {c.reason}" for c in rejected)
    elif not checks:
        message += "; the directory carries no signature at all"
    error = TamperedDirectory if any(c.status == SIG_OTHER_DIGEST for c in checks) else NotEnoughSignatures
    if error is TamperedDirectory:
        message = "directory altered after signing: " + message
    raise error(message, valid=valid, required=threshold, rejected=rejected)


def signature_block(text: str | bytes, key: PrivateKey, rng: RandomSource) -> str:
    """One ``[Signed-Directory]`` block by ``key`` over the body of ``text``.

    Existing blocks in ``text`` are ignored: signatures are outside the
    digest, so authorities sign independently and merge later.
    """
    _, body = _split_signatures(_cleaned(text))
    digest = sha1(body.encode("ascii"))
    return render_document([(SIGNED, [
        Line("Directory-Identity", encode_base64(key.public.der)),
        Line("Directory-Digest", encode_base64(digest)),
        Line("Directory-Signature", encode_base64(key.sign(digest, rng))),
    ])])


def add_signature_blocks(text: str | bytes, blocks: Iterable[str]) -> str:
    """Merge signature blocks into ``text``; each must validly sign its body.

    One block per authority (the first one kept), blocks ordered by
    fingerprint, so merging the same blocks in any order gives the same text.
    """
    cleaned = _cleaned(text)
    existing, body = _split_signatures(cleaned)
    digest = sha1(body.encode("ascii"))
    offered = list(existing)
    for chunk in blocks:
        offered.extend(_split_blocks(_cleaned(chunk)))
    merged: dict[str, SignatureBlock] = {}
    for raw in offered:
        block = parse_signature_block(raw)
        if not block.signs(digest):
            why = "signs a different directory" if block.digest != digest else "has an invalid signature"
            raise BadSignatureBlock(f"signature block by {block.fingerprint} {why}")
        merged.setdefault(block.fingerprint, block)
    return "".join(merged[fp].text for fp in sorted(merged)) + body


def sign_directory(text: str | bytes, key: PrivateKey, rng: RandomSource) -> str:
    """``text`` with one more signature block, by ``key`` (idempotent per key)."""
    return add_signature_blocks(text, [signature_block(text, key, rng)])


# --- the info block -----------------------------------------------------------------------------


def decode_voting_server(value: str) -> VotingServer:
    parts = value.split()
    if len(parts) != 2:
        raise ValueError(f"{value!r} is not '<40 hex digits> <URL>'")
    return VotingServer(normalise_fingerprint(parts[0]), parts[1])


def _items(values: Optional[Tuple[str, ...]]) -> Tuple[str, ...]:
    """A decoded list without its empty items (an empty value is one)."""
    return tuple(v for v in values or () if v)


_INFO_SCHEMA: Schema = {
    "Version": required(decode_string()),
    "Status": required(decode_string()),
    "Valid-After": required(decode_date),
    "Valid-Until": required(decode_date),
    "Recommended-Servers": required(decode_list),
    "Voting-Server": repeated(decode_voting_server),
}
_SOFTWARE_SCHEMA: Schema = {
    "MixminionClient": optional(decode_list),
    "MixminionServer": optional(decode_list),
}
_RELIABILITY_SCHEMA: Schema = {"Server": repeated(decode_reliability_line)}


def _check_version(section: Section, expected: str, line_offset: int) -> None:
    for entry in section.entries:
        if entry.key == "Version" and entry.value != expected:
            raise UnsupportedDirectoryVersion(
                f"line {entry.line + line_offset}: [{section.name}] Version is {entry.value!r}; "
                f"this reader understands only {expected}"
            )


def _read_header(
    part: str, first: str, schemas: Mapping[str, Schema], version: str, line_offset: int
) -> tuple[dict[str, Fields], list[str]]:
    """Decode a header part; unknown sections and keys are only warnings (§2 rule 7)."""
    try:
        sections = parse_sections(part)
        if sections[0].name != first:
            raise MalformedDirectory(f"line {sections[0].line + line_offset}: expected [{first}]")
        _check_version(sections[0], version, line_offset)
        return read_sections(sections, schemas, line_offset=line_offset)
    except TextFormatError as exc:
        raise MalformedDirectory(_shift_lines(str(exc), line_offset)) from None


def _shift_lines(message: str, offset: int) -> str:
    """Make the ``line N`` of a part's message count from the whole text."""
    return re.sub(r"^line ([0-9]+)", lambda m: f"line {int(m.group(1)) + offset}", message)


def _read_info(part: str, line_offset: int = 0) -> tuple[DirectoryInfo, list[str]]:
    fields, warnings = _read_header(
        part,
        INFO,
        {INFO: _INFO_SCHEMA, SOFTWARE: _SOFTWARE_SCHEMA, RELIABILITY: _RELIABILITY_SCHEMA},
        DIRECTORY_VERSION,
        line_offset,
    )
    info = fields[INFO]
    status = info["Status"]
    if status not in STATUSES:
        raise MalformedDirectory(f"{info.where('Status', line_offset)}: {status!r} is not 'vote' or 'consensus'")
    check_date_order(info, MalformedDirectory, line_offset)
    if not info["Voting-Server"]:
        raise MalformedDirectory(f"[{INFO}]: no Voting-Server line (at least one is required)")
    recommended = _items(info["Recommended-Servers"])
    for nickname in recommended:
        try:
            decode_nickname(nickname)
        except ValueError as exc:
            raise MalformedDirectory(f"{info.where('Recommended-Servers', line_offset)}: {exc}") from None
    software = fields.get(SOFTWARE)
    return DirectoryInfo(
        status=status,
        valid_after=info["Valid-After"],
        valid_until=info["Valid-Until"],
        recommended_nicknames=recommended,
        voting_servers=info["Voting-Server"],
        client_versions=_items(software.get("MixminionClient")) if software else (),
        server_versions=_items(software.get("MixminionServer")) if software else (),
        reliability=_reliability(fields.get(RELIABILITY)),
    ), warnings


def _reliability(section: Optional[Fields]) -> dict[str, ServerReliability]:
    """The ``Server:`` lines in text order; a server listed twice is malformed."""
    values: dict[str, ServerReliability] = {}
    for fingerprint, value in section["Server"] if section else ():
        if fingerprint in values:
            raise MalformedDirectory(f"[{RELIABILITY}] Server: {fingerprint} listed twice")
        values[fingerprint] = value
    return values


def _check_period(valid_after: int, valid_until: int, now: float) -> None:
    """``now`` must lie in [Valid-After, Valid-Until] (the reference never checked)."""
    if now < valid_after:
        raise DirectoryNotYetValid(
            f"directory is not valid before {format_date(valid_after)} "
            f"(validation time {format_time(int(now))}); is the clock right?"
        )
    if now > valid_until:
        raise DirectoryExpired(
            f"directory expired at {format_date(valid_until)} "
            f"(validation time {format_time(int(now))}); a newer one is needed"
        )


# --- embedded descriptors ------------------------------------------------------------------------

_NICKNAME_LINE = re.compile(r"^Nickname:[ \t]*(\S+)", re.MULTILINE)


def _read_descriptors(
    parts: Sequence[tuple[int, str]], now: float, verified: Container[bytes]
) -> Tuple[ServerDescriptor, ...]:
    """Verify every descriptor; one bad one voids the directory (§7.1 rule 4).

    ``parts`` pairs each text with its first line in the directory.
    """
    descriptors = []
    for index, (line, part) in enumerate(parts, start=1):
        try:
            descriptors.append(parse_descriptor(part, now, check_validity=False, verified_digests=verified))
        except DescriptorError as exc:
            match = _NICKNAME_LINE.search(part)
            nickname = match.group(1) if match else None
            name = f"server {nickname!r}" if nickname else "unnamed server"
            raise BadDirectoryDescriptor(
                f"descriptor {index} of {len(parts)} ({name}, starting at line {line} "
                f"of the directory) is invalid, so the whole directory is: {exc}",
                index=index,
                nickname=nickname,
            ) from exc
    return tuple(descriptors)


# --- 0.3: parsing -------------------------------------------------------------------------------


def parse_directory(
    text: str | bytes,
    now: float,
    *,
    trusted: Trusted,
    threshold: int,
    check_validity: bool = True,
    verified_digests: Container[bytes] = frozenset(),
) -> SignedDirectory:
    """Parse and verify a 0.3 directory (vote or consensus) at time ``now``.

    Valid only with valid signatures by at least ``threshold`` distinct
    authorities from ``trusted`` (fingerprints, or fingerprint -> key) that
    are also listed as ``Voting-Server``; every embedded descriptor must
    verify (``verified_digests`` skips only their RSA checks); ``now`` must
    lie within the validity dates unless ``check_validity`` is false.
    """
    _check_threshold(threshold)
    table = _trust_table(trusted)
    cleaned = _cleaned(text)
    raw_blocks, body = _split_signatures(cleaned)
    blocks = _parse_blocks(raw_blocks)
    offset = _line_of(cleaned, len(cleaned) - len(body)) - 1
    info_part, parts = _split_body(body)
    info, warnings = _read_info(info_part, offset)
    digest = sha1(body.encode("ascii"))
    checks = _check_signatures(blocks, digest, table, {v.fingerprint for v in info.voting_servers})
    warnings += [f"signature by {c.fingerprint} ignored: {c.reason}" for c in checks if c.status != SIG_VALID]
    signers = _require_threshold(checks, threshold, " listed as Voting-Server")
    if check_validity:
        _check_period(info.valid_after, info.valid_until, now)
    located = [(offset + _line_of(body, at), part) for at, part in parts]
    descriptors = _read_descriptors(located, now, verified_digests)
    _check_measured_carried(info, descriptors)
    return SignedDirectory(
        info=info,
        descriptors=descriptors,
        digest=digest,
        signers=signers,
        signatures=tuple(checks),
        text=cleaned,
        warnings=tuple(warnings),
    )


def _check_measured_carried(info: DirectoryInfo, descriptors: Sequence[ServerDescriptor]) -> None:
    """``[Reliability]`` speaks only of servers the directory carries."""
    stray = sorted(set(info.reliability) - {d.fingerprint for d in descriptors})
    if stray:
        raise MalformedDirectory(f"[{RELIABILITY}]: no descriptor in the directory for server(s) {', '.join(stray)}")


# --- 0.3: building ----------------------------------------------------------------------------------

_URL = re.compile(r"[\x21-\x7e]+")


def _normalised_info(info: DirectoryInfo, carried: Collection[str]) -> DirectoryInfo:
    """Check ``info`` is writable and put it in producer order (§7.2).

    Reliability values are rounded as they will be read, and kept only for
    the ``carried`` servers (doc/reliability.md §3).
    """
    if info.status not in STATUSES:
        raise BuildError(f"status {info.status!r} is not 'vote' or 'consensus'")
    require_midnights(valid_after=info.valid_after, valid_until=info.valid_until)
    if info.valid_until <= info.valid_after:
        raise BuildError("valid_until must be after valid_after")
    if not info.voting_servers:
        raise BuildError("a directory needs at least one voting server")
    reliability = {fp: _reliability_value(fp, value) for fp, value in sorted(info.reliability.items())}
    return DirectoryInfo(
        status=info.status,
        valid_after=info.valid_after,
        valid_until=info.valid_until,
        recommended_nicknames=tuple(sorted({_nickname(n).lower() for n in info.recommended_nicknames})),
        voting_servers=tuple(sorted({_voting_server(v) for v in info.voting_servers})),
        client_versions=sort_versions(_version(v) for v in info.client_versions),
        server_versions=sort_versions(_version(v) for v in info.server_versions),
        reliability={fp: value for fp, value in reliability.items() if fp in carried},
    )


def _reliability_value(fingerprint: str, value: ServerReliability) -> ServerReliability:
    try:
        return normalised_reliability(fingerprint, value)
    except ValueError as exc:
        raise BuildError(f"reliability: {exc}") from None


def _nickname(value: str) -> str:
    try:
        return decode_nickname(value)
    except ValueError as exc:
        raise BuildError(f"recommended nickname: {exc}") from None


def _voting_server(server: VotingServer) -> VotingServer:
    try:
        fingerprint = normalise_fingerprint(server.fingerprint)
    except ValueError as exc:
        raise BuildError(f"voting server: {exc}") from None
    if not _URL.fullmatch(server.url):
        raise BuildError(f"voting server URL {server.url!r} must be non-empty printing ASCII without blanks")
    return VotingServer(fingerprint, server.url)


_VERSION_TEXT = re.compile(r"[\x21-\x2b\x2d-\x7e]([\x20-\x2b\x2d-\x7e]*[\x21-\x2b\x2d-\x7e])?")


def _version(value: str) -> str:
    """Anything a comma-separated list reads back unchanged."""
    if not _VERSION_TEXT.fullmatch(value):
        raise BuildError(f"software version {value!r} must be non-empty printing ASCII without commas or edge blanks")
    return value


def _info_text(info: DirectoryInfo) -> str:
    reliability = [(RELIABILITY, [
        Line("Server", format_reliability_line(fp, value)) for fp, value in info.reliability.items()
    ])] if info.reliability else []
    return render_document([
        (INFO, [
            Line("Version", DIRECTORY_VERSION),
            Line("Status", info.status),
            Line("Valid-After", format_date(info.valid_after)),
            Line("Valid-Until", format_date(info.valid_until)),
            Line("Recommended-Servers", format_list(info.recommended_nicknames)),
            *(Line("Voting-Server", f"{v.fingerprint} {v.url}") for v in info.voting_servers),
        ]),
        (SOFTWARE, [
            Line("MixminionClient", format_list(info.client_versions)),
            Line("MixminionServer", format_list(info.server_versions)),
        ]),
        *reliability,
    ])


def unique_descriptors(descriptors: Iterable[ServerDescriptor]) -> list[ServerDescriptor]:
    """One descriptor per digest, in producer order.

    Copies with one digest differ at most in their signature bytes (a server
    may re-sign); the smallest cleaned text wins so every authority picks
    the same copy.
    """
    chosen: dict[bytes, ServerDescriptor] = {}
    for descriptor in descriptors:
        other = chosen.get(descriptor.digest)
        if other is None or clean(descriptor.text) < clean(other.text):
            chosen[descriptor.digest] = descriptor
    return sorted(chosen.values(), key=descriptor_sort_key)


def _embedded_text(descriptor: ServerDescriptor) -> str:
    """The descriptor's own text, cleaned (digest-preserving, §5.1)."""
    text = clean(descriptor.text)
    if not text.startswith(_SERVER_LINE) or f"\n{_SERVER_LINE}" in text:
        raise BuildError(f"{descriptor!r}: text must start with exactly one '[Server]' line to be embedded")
    return text


def build_directory(info: DirectoryInfo, descriptors: Sequence[ServerDescriptor]) -> str:
    """The unsigned 0.3 directory text in producer form (§7.2).

    Nicknames and voting servers sorted, versions in version order,
    descriptors by (lower nickname, Valid-After, digest) and copied from
    their own text, reliability lines by fingerprint and only for carried
    servers (the section left out when none is measured); equal inputs give
    equal bytes.
    """
    chosen = unique_descriptors(descriptors)
    normal = _normalised_info(info, {d.fingerprint for d in chosen})
    text = _info_text(normal) + "".join(_embedded_text(d) for d in chosen)
    _check_reads_back(text, normal, chosen)
    return text


def _check_reads_back(text: str, info: DirectoryInfo, descriptors: Sequence[ServerDescriptor]) -> None:
    info_part, parts = _split_body(text)
    try:
        parsed, _ = _read_info(info_part)
    except DirectoryError as exc:
        raise BuildError(f"directory would be rejected: {exc}") from exc
    if parsed != info:
        raise BuildError(f"directory info would read back as {parsed!r}, not {info!r}")
    digests = [document_digest(part) for _, part in parts]
    if digests != [d.digest for d in descriptors]:
        raise BuildError("embedded descriptors would not split back into the same descriptors")


# --- legacy 0.2 ---------------------------------------------------------------------------------------

_LEGACY_SERVER = re.compile(r"^\[[ \t]*Server[ \t]*\]$", re.MULTILINE)

_LEGACY_HEADER_SCHEMA: Schema = {
    "Version": required(decode_string()),
    "Published": required(decode_time),
    "Valid-After": required(decode_date),
    "Valid-Until": required(decode_date),
    "Recommended-Servers": required(decode_list),
}
_LEGACY_SIGNATURE_SCHEMA: Schema = {
    "DirectoryIdentity": required(decode_base64),
    "DirectoryDigest": required(decode_base64),
    "DirectorySignature": required(decode_base64),
}
_LEGACY_SOFTWARE_SCHEMA: Schema = {
    "MixminionClient": optional(decode_string()),
    "MixminionServer": optional(decode_string()),
}


def _split_software(value: Optional[str]) -> Tuple[str, ...]:
    """Commas and blanks both separate (the generator wrote ``a, b``; §10 item 7)."""
    return tuple(item for item in re.split(r"[,\s]+", value or "") if item)


def _split_legacy(cleaned: str) -> tuple[str, list[tuple[int, str]]]:
    """Header, then each descriptor re-headed ``[Server]`` with its first line."""
    matches = list(_LEGACY_SERVER.finditer(cleaned))
    header = cleaned[: matches[0].start()] if matches else cleaned
    ends = [m.start() for m in matches[1:]] + [len(cleaned)]
    parts = [
        (_line_of(cleaned, m.start()), _SERVER_LINE + cleaned[m.end() + 1 : end])
        for m, end in zip(matches, ends)
    ]
    return header, parts


def parse_legacy_directory(
    text: str | bytes,
    now: float,
    trusted_fingerprints: Collection[str],
    *,
    check_validity: bool = True,
    verified_digests: Container[bytes] = frozenset(),
) -> LegacyDirectory:
    """Parse and verify a legacy ``[Directory]`` (§7.1) at time ``now``.

    Unlike the reference: the signer must be in ``trusted_fingerprints``
    and ``now`` must lie within the validity dates (unless
    ``check_validity`` is false).
    """
    table = _trust_table(trusted_fingerprints)
    cleaned = _cleaned(text)
    header_part, parts = _split_legacy(cleaned)
    fields, warnings = _read_header(
        header_part,
        LEGACY_HEADER,
        {LEGACY_HEADER: _LEGACY_HEADER_SCHEMA, LEGACY_SIGNATURE: _LEGACY_SIGNATURE_SCHEMA, SOFTWARE: _LEGACY_SOFTWARE_SCHEMA},
        LEGACY_VERSION,
        0,
    )
    if LEGACY_SIGNATURE not in fields:
        raise MalformedDirectory(f"no [{LEGACY_SIGNATURE}] section: the directory is unsigned")
    header = fields[LEGACY_HEADER]
    check_date_order(header, MalformedDirectory)
    check_published(header, now, DirectoryNotYetValid)
    digest = document_digest(cleaned, "DirectoryDigest", "DirectorySignature")
    block = _legacy_block(fields[LEGACY_SIGNATURE])
    signers = _require_threshold(_check_signatures([block], digest, table, None), 1, "")
    if check_validity:
        _check_period(header["Valid-After"], header["Valid-Until"], now)
    software = fields.get(SOFTWARE)
    return LegacyDirectory(
        published=header["Published"],
        valid_after=header["Valid-After"],
        valid_until=header["Valid-Until"],
        recommended_nicknames=_items(header["Recommended-Servers"]),
        client_versions=_split_software(software.get("MixminionClient")) if software else (),
        server_versions=_split_software(software.get("MixminionServer")) if software else (),
        descriptors=_read_descriptors(parts, now, verified_digests),
        digest=digest,
        signers=signers,
        text=cleaned,
        warnings=tuple(warnings),
    )


def _legacy_block(signature: Fields) -> SignatureBlock:
    identity = load_key(signature, "DirectoryIdentity", IDENTITY_MIN_BYTES, IDENTITY_MAX_BYTES, MalformedDirectory)
    digest: bytes = signature["DirectoryDigest"]
    if len(digest) != 20:
        raise MalformedDirectory(f"{signature.where('DirectoryDigest')}: {len(digest)} bytes, not 20")
    return SignatureBlock(identity, digest, signature["DirectorySignature"], "")


# --- either format ---------------------------------------------------------------------------------------

_LEGACY_FIRST_LINE = re.compile(r"\[\s*Directory\s*\]")


def is_legacy_directory(text: str | bytes) -> bool:
    """§7: a first line ``[Directory]`` means the legacy format."""
    first = _cleaned(text).split("\n", 1)[0]
    return _LEGACY_FIRST_LINE.fullmatch(first) is not None


def parse_any_directory(
    text: str | bytes,
    now: float,
    *,
    trusted: Trusted,
    threshold: int,
    check_validity: bool = True,
    verified_digests: Container[bytes] = frozenset(),
) -> AnyDirectory:
    """Parse either format, chosen by the first line (§7).

    A legacy directory carries one signature, so it is refused when more
    than one is required: otherwise it would bypass the threshold.
    """
    _check_threshold(threshold)
    if not is_legacy_directory(text):
        return parse_directory(
            text, now, trusted=trusted, threshold=threshold,
            check_validity=check_validity, verified_digests=verified_digests,
        )
    if threshold > 1:
        raise NotEnoughSignatures(
            f"legacy (0.2) directory has a single signature; {threshold} trusted signatures are required",
            required=threshold,
        )
    return parse_legacy_directory(
        text, now, list(_trust_table(trusted)), check_validity=check_validity, verified_digests=verified_digests
    )
