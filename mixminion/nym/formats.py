"""Requests to a nymserver and what it sends back (doc/nym.md §2, §3).

A request is checked in two steps, because who may be told of a refusal
depends on how far it got:

1. :func:`parse_envelope` splits off the signature and reads the header.
   Anything wrong here (:class:`MalformedRequest`) is refused without an
   answer: nothing says whose reply blocks an answer could use.
2. :meth:`Envelope.verifies` checks the signature with the nym's key (for
   ``create``, the key the request carries); the nymserver checks the
   counter.  A request that fails either is refused without an answer too:
   answering would let anybody spend a nym's reply blocks.
3. :meth:`Envelope.request` checks what the command needs (fields, body);
   a failure (:class:`InvalidRequest`) is answered, with its reason.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from mixminion.codec.errors import ParseError
from mixminion.codec.routing import check_smtp_address
from mixminion.codec.surb import ReplyBlock, parse_reply_blocks
from mixminion.codec.textformat import decode_base64, encode_base64

#: the exit type of requests to a nymserver (ours; packet.md §5.3 leaves it free)
NYM_TYPE = 0x0110
REQUEST_MAGIC = b"Mixminion-Nym-Request: 0.1\n"
MESSAGE_MAGIC = b"Mixminion-Nym: 0.1\n"
SIGNATURE_LEN = 64
PUBLIC_KEY_LEN = 32
#: a counter is a positive 63-bit integer
MAX_COUNTER = 2**63 - 1
MAX_RECIPIENTS = 20
MAX_NAME_LEN = 32
#: header lines of a request or a message, and their length
MAX_HEADER_LINES = 64
MAX_LINE_LEN = 1024
RESERVED_NAMES = frozenset({"postmaster", "abuse", "root", "admin", "hostmaster", "webmaster",
                            "mailer-daemon", "nobody", "nymserver"})
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,%d}\Z" % (MAX_NAME_LEN - 1))
_HEADER_NAME = re.compile(r"[A-Za-z][A-Za-z0-9-]*\Z")


class NymFormatError(ParseError):
    """Bytes that are not what a nym's format says."""


class MalformedRequest(NymFormatError):
    """Not a request whose owner can be known: refused without an answer."""


class InvalidRequest(NymFormatError):
    """A request that verified but cannot be done as written: its owner is
    told why."""


class Command(enum.Enum):
    CREATE = "create"
    ADD_SURBS = "add-surbs"
    SEND = "send"
    CONFIG = "config"
    STATUS = "status"
    DELETE = "delete"


class Policy(enum.Enum):
    """What happens to mail for a nym with no reply block left."""

    #: keep it (up to the nymserver's bounds) until the owner sends more
    HOLD = "hold"
    #: refuse it at once, so its sender learns
    DROP = "drop"


#: header lines each command takes besides Nym, Command and Counter: name
#: -> whether it is required
_FIELDS: dict[Command, dict[str, bool]] = {
    Command.CREATE: {"Key": True, "Policy": False},
    Command.ADD_SURBS: {},
    Command.SEND: {"To": True},
    Command.CONFIG: {"Policy": True},
    Command.STATUS: {},
    Command.DELETE: {},
}
_WITH_REPLY_BLOCKS = frozenset({Command.CREATE, Command.ADD_SURBS})
_WITH_BODY = _WITH_REPLY_BLOCKS | {Command.SEND}


def check_name(name: str) -> str:
    """``name`` if it can be a nym's name (doc/nym.md §2), else
    NymFormatError."""
    if not _NAME.match(name):
        raise NymFormatError(f"a nym's name is 1-{MAX_NAME_LEN} characters a-z 0-9 . _ -, "
                             "starting with a letter or a digit")
    if name in RESERVED_NAMES:
        raise NymFormatError(f"the name {name!r} is reserved")
    return name


def _read_headers(block: bytes, error: type[NymFormatError]) -> list[tuple[str, str]]:
    """``Name: value`` lines (ASCII, no control characters)."""
    try:
        text = block.decode("ascii")
    except UnicodeDecodeError:
        raise error("a header line is not ASCII") from None
    lines = text.split("\n") if text else []
    if len(lines) > MAX_HEADER_LINES:
        raise error("too many header lines")
    headers = []
    for line in lines:
        name, sep, value = line.partition(": ")
        if (not sep or not _HEADER_NAME.match(name) or len(line) > MAX_LINE_LEN
                or any(ord(c) < 0x20 or ord(c) == 0x7F for c in value)):
            raise error("a header line is not 'Name: value'")
        headers.append((name, value.strip()))
    return headers


def _split(data: bytes, magic: bytes, error: type[NymFormatError]) -> tuple[list[tuple[str, str]], bytes]:
    """The header lines after ``magic`` and the body after the empty line."""
    if not data.startswith(magic):
        raise error(f"does not start with {magic.decode().strip()!r}")
    head, sep, body = data[len(magic):].partition(b"\n\n")
    if not sep:
        raise error("no empty line after the header")
    return _read_headers(head, error), body


def _counter(value: str, error: type[NymFormatError]) -> int:
    if not value.isdigit() or value.startswith("0") or not 1 <= int(value) <= MAX_COUNTER:
        raise error("the counter is not a decimal number from 1 to 2^63-1")
    return int(value)


@dataclass(frozen=True)
class Request:
    """A request that verified and whose fields fit its command."""

    nym: str
    command: Command
    counter: int
    #: the nym's Ed25519 public key (create)
    key: Optional[bytes] = None
    policy: Optional[Policy] = None
    recipients: tuple[str, ...] = ()
    #: create, add-surbs: the reply blocks; send: the mail
    reply_blocks: tuple[ReplyBlock, ...] = field(default=(), repr=False)
    mail: bytes = field(default=b"", repr=False)


@dataclass(frozen=True)
class Envelope:
    """A request's header read, its signature not yet checked."""

    nym: str
    command: Command
    counter: int
    headers: tuple[tuple[str, str], ...]
    body: bytes = field(repr=False)
    signed: bytes = field(repr=False)
    signature: bytes = field(repr=False)

    @property
    def key(self) -> Optional[bytes]:
        """The key a ``create`` carries (None if absent or not one)."""
        values = [v for n, v in self.headers if n == "Key"]
        if len(values) != 1:
            return None
        try:
            raw = decode_base64(values[0])
        except ParseError:
            return None
        return raw if len(raw) == PUBLIC_KEY_LEN else None

    def verifies(self, public_key: bytes) -> bool:
        """Whether the signature is ``public_key``'s over the request."""
        try:
            Ed25519PublicKey.from_public_bytes(public_key).verify(self.signature, self.signed)
        except (InvalidSignature, ValueError):
            return False
        return True

    def request(self, now: int) -> Request:
        """The request, its fields checked against its command; reply
        blocks that expire before ``now`` refuse it (InvalidRequest)."""
        allowed = _FIELDS[self.command]
        seen: dict[str, list[str]] = {}
        for name, value in self.headers:
            if name in ("Nym", "Command", "Counter"):
                continue
            if name not in allowed:
                raise InvalidRequest(f"{self.command.value} takes no {name} line")
            seen.setdefault(name, []).append(value)
        for name, required in allowed.items():
            if required and name not in seen:
                raise InvalidRequest(f"{self.command.value} needs a {name} line")
            if name != "To" and len(seen.get(name, ())) > 1:
                raise InvalidRequest(f"more than one {name} line")
        policy = None
        if "Policy" in seen:
            try:
                policy = Policy(seen["Policy"][0])
            except ValueError:
                raise InvalidRequest("Policy is 'hold' or 'drop'") from None
        recipients = tuple(seen.get("To", ()))
        if len(recipients) > MAX_RECIPIENTS:
            raise InvalidRequest(f"at most {MAX_RECIPIENTS} recipients")
        for address in recipients:
            try:
                check_smtp_address(address.encode("ascii"))
            except (ParseError, UnicodeEncodeError):
                raise InvalidRequest(f"not an e-mail address: {address[:80]!r}") from None
        if self.command not in _WITH_BODY and self.body:
            raise InvalidRequest(f"{self.command.value} takes no body")
        blocks: tuple[ReplyBlock, ...] = ()
        if self.command in _WITH_REPLY_BLOCKS:
            if not self.body.strip():
                raise InvalidRequest(f"{self.command.value} needs at least one reply block")
            try:
                blocks = tuple(parse_reply_blocks(self.body))
            except ParseError as exc:
                raise InvalidRequest(f"the reply blocks do not parse: {exc}") from None
            expired = sum(1 for b in blocks if b.timestamp <= now)
            if expired:
                raise InvalidRequest(f"{expired} of the reply blocks have expired")
        if self.command is Command.SEND and not self.body.strip():
            raise InvalidRequest("send needs a mail")
        return Request(nym=self.nym, command=self.command, counter=self.counter,
                       key=self.key if self.command is Command.CREATE else None,
                       policy=policy, recipients=recipients, reply_blocks=blocks,
                       mail=self.body if self.command is Command.SEND else b"")


def parse_envelope(data: bytes) -> Envelope:
    """Step 1 (see the module's docstring); MalformedRequest if the bytes
    do not say whose request they are."""
    if len(data) < len(REQUEST_MAGIC) + SIGNATURE_LEN:
        raise MalformedRequest("too short to be a request")
    signed, signature = data[:-SIGNATURE_LEN], data[-SIGNATURE_LEN:]
    headers, body = _split(signed, REQUEST_MAGIC, MalformedRequest)
    single: dict[str, str] = {}
    for name, value in headers:
        if name in ("Nym", "Command", "Counter"):
            if name in single:
                raise MalformedRequest(f"more than one {name} line")
            single[name] = value
    missing = [n for n in ("Nym", "Command", "Counter") if n not in single]
    if missing:
        raise MalformedRequest(f"no {missing[0]} line")
    try:
        nym = check_name(single["Nym"])
        command = Command(single["Command"])
    except NymFormatError as exc:
        raise MalformedRequest(str(exc)) from None
    except ValueError:
        raise MalformedRequest("unknown command") from None
    counter = _counter(single["Counter"], MalformedRequest)
    if command is Command.CREATE:
        keys = [v for n, v in headers if n == "Key"]
        if len(keys) != 1:
            raise MalformedRequest("create needs one Key line")
    envelope = Envelope(nym, command, counter, tuple(headers), body, signed, signature)
    if command is Command.CREATE and envelope.key is None:
        raise MalformedRequest("the Key is not a base64 Ed25519 public key")
    return envelope


def build_request(key: Ed25519PrivateKey, nym: str, command: Command, counter: int, *,
                  policy: Optional[Policy] = None, recipients: Sequence[str] = (),
                  reply_blocks: Sequence[ReplyBlock] = (), mail: bytes = b"") -> bytes:
    """A signed request (the client's side; :meth:`Envelope.request`
    checks the same rules)."""
    check_name(nym)
    _counter(str(counter), NymFormatError)
    lines = [f"Nym: {nym}", f"Command: {command.value}", f"Counter: {counter}"]
    if command is Command.CREATE:
        lines.append("Key: " + encode_base64(public_bytes(key.public_key())))
    if policy is not None:
        lines.append(f"Policy: {policy.value}")
    lines += [f"To: {address}" for address in recipients]
    body = b"".join(b.pack() for b in reply_blocks) + mail
    signed = REQUEST_MAGIC + "\n".join(lines).encode("ascii") + b"\n\n" + body
    return signed + key.sign(signed)


def public_bytes(key: Ed25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# --- what the nymserver sends ------------------------------------------------------


class Kind(enum.Enum):
    ANSWER = "answer"
    MAIL = "mail"


@dataclass(frozen=True)
class NymMessage:
    """An answer to a request, or a mail for the nym (doc/nym.md §3)."""

    nym: str
    kind: Kind
    #: reply blocks left at the nymserver once this message is sent
    reply_blocks: int
    #: mails waiting at the nymserver for reply blocks
    queued: int
    #: answer: the request's counter, whether it was done, and why not
    counter: Optional[int] = None
    ok: bool = True
    reason: str = ""
    body: bytes = field(default=b"", repr=False)

    def to_bytes(self) -> bytes:
        lines = [f"Nym: {self.nym}", f"Kind: {self.kind.value}",
                 f"Reply-Blocks: {self.reply_blocks}", f"Queued: {self.queued}"]
        if self.kind is Kind.ANSWER:
            lines += [f"Counter: {self.counter}", f"Status: {'ok' if self.ok else 'refused'}"]
            if not self.ok:
                lines.append("Reason: " + " ".join(self.reason.split())[:MAX_LINE_LEN - 8])
        return MESSAGE_MAGIC + "\n".join(lines).encode("ascii") + b"\n\n" + self.body


def is_nym_message(data: bytes) -> bool:
    return data.startswith(MESSAGE_MAGIC)


def parse_nym_message(data: bytes) -> NymMessage:
    """A message from a nymserver (NymFormatError if it is not one)."""
    headers, body = _split(data, MESSAGE_MAGIC, NymFormatError)
    values = dict(headers)
    if len(values) != len(headers):
        raise NymFormatError("a header line repeats")
    try:
        kind = Kind(values.get("Kind", ""))
        nym = check_name(values.get("Nym", ""))
        counts = [int(values[n]) for n in ("Reply-Blocks", "Queued")
                  if values.get(n, "").isdigit()]
    except ValueError:
        raise NymFormatError("unknown Kind") from None
    if len(counts) != 2:
        raise NymFormatError("Reply-Blocks and Queued are counts")
    if kind is Kind.MAIL:
        return NymMessage(nym, kind, counts[0], counts[1], body=body)
    status = values.get("Status")
    if status not in ("ok", "refused"):
        raise NymFormatError("Status is 'ok' or 'refused'")
    return NymMessage(nym, kind, counts[0], counts[1],
                      counter=_counter(values.get("Counter", ""), NymFormatError),
                      ok=status == "ok", reason=values.get("Reason", ""), body=body)
