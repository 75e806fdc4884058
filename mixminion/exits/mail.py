"""The e-mail an SMTP or MBOX exit sends (spec: server.md §9.3, packet.md
§14.2), and the module code both share.

Header injection is impossible by construction: every header value, from
the sender or from the configuration, goes through :func:`one_line`, which
keeps printable ASCII only (no CR, LF, NUL or other controls, no non-ASCII)
and never folds a sender's value.  The message is built as bytes here;
nothing downstream re-parses or re-folds it.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from twisted.internet import defer

from mixminion.codec.errors import BuildError
from mixminion.codec.exit import (
    BINARY,
    ENCRYPTED,
    FRAGMENT,
    OVERCOMPRESSED,
    PLAINTEXT,
    Classification,
    Corrupt,
    Encrypted,
    FragmentPiece,
    Overcompressed,
    Plain,
    choose_message_type,
    encode_text_message,
    text_for_delivery,
)
from mixminion.codec.exit_headers import MAX_HEADER_LEN
from mixminion.codec.payload import PAYLOAD_LEN
from mixminion.exits.context import Advertisement, ExitContext, mail_advertisement
from mixminion.exits.errors import ExitConfigError
from mixminion.exits.items import DeliveryItem, DeliveryResult
from mixminion.exits.options import (
    SectionReader,
    parse_bool,
    parse_command,
    parse_int,
    parse_schedule,
    parse_size,
    parse_text,
)
from mixminion.exits.retry import DEFAULT_SCHEDULE

DEFAULT_SUBJECT = "Type III Anonymous Message"
DEFAULT_FROM_TAG = "[Anon]"
DEFAULT_MAX_SIZE = 100 * 1024
MIN_MAX_SIZE = 32 * 1024
WRAP = 70

#: options every mail module reads (server.md §14.9)
COMMON_MAIL_KEYS = frozenset({
    "MaximumSize", "AllowFromAddress", "SubjectLine", "X-Abuse", "Comments", "Message",
    "FromTag", "ReturnAddress",
})
#: options of a module that talks to an MTA
TRANSPORT_KEYS = frozenset({"SMTPServer", "SMTPPort", "SendmailCommand"})
MODULE_KEYS = frozenset({"Enabled", "Advertise", "Retry"})

EXPLANATIONS = {
    ENCRYPTED: (
        "This message is not in plaintext. It is a reply to one of your reply "
        "blocks, a message encrypted to you, or junk; only your Type III client "
        "can tell which, and decode it."
    ),
    OVERCOMPRESSED: (
        "This message shrank by more than a factor of 20 when it was compressed, "
        "so this server delivers it still compressed rather than risk inflating "
        "a compression bomb. Your Type III client can decompress it."
    ),
    BINARY: (
        "This message contains bytes that are not text, so it has been "
        "base64-encoded. Your Type III client can decode it."
    ),
    FRAGMENT: (
        "This is one fragment of a larger message, base64-encoded. Your Type III "
        "client can put the message back together once it has enough fragments."
    ),
}
LONG_LINES_EXPLANATION = (
    "This message is text, but some of its lines are too long for e-mail, so "
    "it has been base64-encoded. Your Type III client can decode it."
)
#: longest line SMTP carries (RFC 5321: 1000 octets with the CRLF)
MAX_LINE = 998
#: longest address we mail (RFC 5321 path limit, less the brackets)
MAX_ADDRESS = 254

_NOT_PRINTABLE = re.compile(r"[^\x20-\x7e]")
_SPACES = re.compile(r" {2,}")
_QUOTE_BREAKERS = re.compile(r'["\\]')
_CR = re.compile(rb"\r\n?")


# --- header values ------------------------------------------------------------------


def one_line(value: Any, limit: int = MAX_HEADER_LEN) -> str:
    """A header value reduced to one line of printable ASCII.

    Control characters (CR, LF, TAB, NUL, ...) become spaces, anything
    outside ASCII becomes ``?``, runs of spaces shrink to one, and the
    result is stripped and cut to ``limit`` characters.
    """
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    text = "".join(
        c if " " <= c <= "~" else (" " if ord(c) < 0x80 or c.isspace() else "?")
        for c in str(value)
    )
    text = _SPACES.sub(" ", text).strip()
    return text[:limit].rstrip()


def quoted_display_part(value: Any) -> str:
    """A value safe inside a quoted display name: :func:`one_line` without
    ``"`` or backslash."""
    return one_line(_QUOTE_BREAKERS.sub("", one_line(value)))


def fold(name: str, value: str) -> str:
    """``Name: value`` folded at 70 columns, continuation lines indented
    four spaces (for configured values only)."""
    return textwrap.fill(f"{name}: {one_line(value, 10000)}", WRAP, subsequent_indent="    ",
                         break_long_words=False, break_on_hyphens=False)


# --- message contents -----------------------------------------------------------------


def message_type(classification: Classification) -> str:
    """The ``Message-type`` the text encoding will carry (packet.md §14.1)."""
    if isinstance(classification, Plain):
        return choose_message_type(classification.body)
    if isinstance(classification, Overcompressed):
        return OVERCOMPRESSED
    if isinstance(classification, Encrypted):
        return ENCRYPTED
    if isinstance(classification, FragmentPiece):
        return choose_message_type(classification.fragment.to_bytes(), fragment=True)
    raise BuildError("a corrupt payload has no message type")


def _contents(classification: Classification) -> bytes:
    """What a plain message or fragment delivers."""
    if isinstance(classification, Plain):
        return classification.body
    if isinstance(classification, FragmentPiece):
        return classification.fragment.to_bytes()
    raise BuildError("only plain messages and fragments can be delivered as text")


def _has_long_line(body: bytes) -> bool:
    """Would a line of the plaintext armor exceed what SMTP carries?  (The
    armor may add two characters: ``- `` before a dash.)"""
    return any(len(line) > MAX_LINE - 2 for line in _CR.sub(b"\n", body).split(b"\n"))


def contents_size(classification: Classification) -> int:
    """The size checked against ``MaximumSize`` (server.md §9.3 rule 4):
    the decompressed body, the compressed data of an overcompressed
    message, or the raw payload."""
    if isinstance(classification, Plain):
        return len(classification.body)
    if isinstance(classification, Overcompressed):
        return len(classification.compressed)
    if isinstance(classification, Encrypted):
        return len(classification.payload)
    if isinstance(classification, FragmentPiece):
        return PAYLOAD_LEN
    raise BuildError("a corrupt payload has no size")


@dataclass(frozen=True)
class MailOptions:
    """The common mail options of server.md §14.9, already checked."""

    return_address: str
    max_size: int = DEFAULT_MAX_SIZE
    allow_from: bool = True
    subject_line: str = DEFAULT_SUBJECT
    x_abuse: Optional[str] = None
    comments: Optional[str] = None
    disclaimer: Optional[str] = None
    from_tag: str = DEFAULT_FROM_TAG


def format_mail(item: DeliveryItem, recipient: str, options: MailOptions) -> bytes:
    """The message text handed to the MTA (LF line endings).

    Raises :class:`BuildError` for an item that must not be mailed (corrupt,
    or encrypted without a decoding handle).
    """
    cls = item.classification
    if isinstance(cls, Corrupt):
        raise BuildError("a corrupt payload is never mailed")
    headers = dict(cls.headers) if isinstance(cls, Plain) else {}
    subject = one_line(headers.get("SUBJECT", "")) or one_line(options.subject_line) or DEFAULT_SUBJECT
    sender_name = quoted_display_part(headers.get("FROM", "")) if options.allow_from else ""
    return_address = one_line(options.return_address)
    if sender_name:
        tag = quoted_display_part(options.from_tag)
        display = one_line(f"{tag} {sender_name}" if tag else sender_name)
        from_line = f'"{display}" <{return_address}>'
    else:
        from_line = return_address
    lines = [f"To: {one_line(recipient, MAX_ADDRESS)}", f"From: {from_line}", f"Subject: {subject}"]
    for key, name in (("IN-REPLY-TO", "In-Reply-To"), ("REFERENCES", "References")):
        value = one_line(headers.get(key, ""))
        if value:
            lines.append(f"{name}: {value}")
    lines.append("X-Anonymous: yes")
    if options.x_abuse:
        lines.append(fold("X-Abuse", options.x_abuse))
    if options.comments:
        lines.append(fold("Comments", options.comments))
    lines.append("")
    if options.disclaimer:
        lines.append(textwrap.fill(one_line(options.disclaimer, 10000), WRAP))
        lines.append("")
    kind = message_type(cls)
    explanation = EXPLANATIONS.get(kind)
    long_text = kind == PLAINTEXT and _has_long_line(_contents(cls))
    if long_text:
        kind = BINARY if isinstance(cls, Plain) else FRAGMENT
        explanation = LONG_LINES_EXPLANATION
    if explanation:
        lines.append(textwrap.fill(explanation, WRAP))
        lines.append("")
    head = ("\n".join(lines) + "\n").encode("ascii")
    if long_text:
        body = encode_text_message(_contents(cls), kind)
    else:
        body = text_for_delivery(cls, item.tag if isinstance(cls, Encrypted) else None)
    # Mail text is LF-only: a CR in a plaintext body must not reach the MTA
    # as a bare CR (it could end the DATA phase on a lenient server).
    return head + _CR.sub(b"\n", body)


# --- the shared module ------------------------------------------------------------------


class Drop(Exception):
    """An item the module refuses for good (NORETRY); ``counter`` names the
    event to count."""

    def __init__(self, reason: str, counter: str) -> None:
        super().__init__(reason)
        self.counter = counter


def read_max_size(reader: SectionReader, log) -> int:
    """``MaximumSize``: at least 32 KiB, rounded up to whole KiB."""
    size = reader.get("MaximumSize", parse_size, DEFAULT_MAX_SIZE)
    assert size is not None
    if size < MIN_MAX_SIZE:
        log.warn("[{section}] MaximumSize raised to 32K", section=reader.name)
        size = MIN_MAX_SIZE
    if size % 1024:
        size = -(-size // 1024) * 1024
        log.warn("[{section}] MaximumSize rounded up to {kib}K", section=reader.name, kib=size // 1024)
    return size


def read_mail_options(reader: SectionReader, log, from_tag: Optional[str] = None) -> MailOptions:
    return_address = reader.require("ReturnAddress", parse_text)
    if not return_address or one_line(return_address) != return_address or " " in return_address:
        raise ExitConfigError(f"[{reader.name}] ReturnAddress must be one address without spaces")
    return MailOptions(
        return_address=return_address,
        max_size=read_max_size(reader, log),
        allow_from=bool(reader.get("AllowFromAddress", parse_bool, True)),
        subject_line=reader.get("SubjectLine", parse_text, DEFAULT_SUBJECT) or DEFAULT_SUBJECT,
        x_abuse=reader.get("X-Abuse", parse_text),
        comments=reader.get("Comments", parse_text),
        disclaimer=reader.get("Message", parse_text),
        from_tag=from_tag if from_tag is not None else (reader.get("FromTag", parse_text) or DEFAULT_FROM_TAG),
    )


class MailModule:
    """What the SMTP and MBOX modules share: options, checks in the order
    of server.md §9.3, formatting, and the transport to the MTA.

    Subclasses set ``name``, ``exit_types``, ``section_name``,
    ``extra_keys`` and implement :meth:`_configure_more` and
    :meth:`recipient`.
    """

    name = "MAIL"
    section_name = "Delivery/MAIL"
    exit_types: frozenset[int] = frozenset()
    priority = 0
    uses_tag = True
    extra_keys: frozenset[str] = frozenset()
    #: the MBOX module always uses the default tag
    fixed_from_tag: Optional[str] = None

    def __init__(self) -> None:
        self.retry_schedule: list[int] = list(DEFAULT_SCHEDULE)
        self.options: Optional[MailOptions] = None
        self.transport: Any = None
        self.advertised = True
        self.context: Optional[ExitContext] = None
        self.log: Any = None

    # -- configuration ---------------------------------------------------------------

    def configure(self, section: Mapping[str, Any], context: ExitContext) -> None:
        self.context = context
        self.log = context.logger(self)
        reader = SectionReader(self.section_name, section,
                               MODULE_KEYS | COMMON_MAIL_KEYS | TRANSPORT_KEYS | self.extra_keys)
        self.advertised = bool(reader.get("Advertise", parse_bool, True))
        self.retry_schedule = reader.get("Retry", parse_schedule, list(DEFAULT_SCHEDULE)) or []
        self.options = read_mail_options(reader, self.log, self.fixed_from_tag)
        self._configure_more(reader, context)
        if self.transport is None:
            self.transport = self._make_mta_transport(reader, context)

    def _configure_more(self, reader: SectionReader, context: ExitContext) -> None:
        """Module-specific options; may set ``self.transport``."""

    def _make_mta_transport(self, reader: SectionReader, context: ExitContext) -> Any:
        from mixminion.exits import mta

        if reader.has("SendmailCommand"):
            # SMTPPort alone is ignored: a parsed configuration fills in its default.
            if reader.has("SMTPServer"):
                raise ExitConfigError(f"[{reader.name}] SendmailCommand and SMTPServer are exclusive")
            argv = reader.get("SendmailCommand", parse_command)
            assert argv is not None
            return mta.SendmailCommand(argv, context.reactor, context.logger())
        host = reader.get("SMTPServer", parse_text, "localhost") or "localhost"
        port = reader.get("SMTPPort", parse_int, 25)
        assert port is not None
        if not 1 <= port <= 65535:
            raise ExitConfigError(f"[{reader.name}] SMTPPort out of range")
        return mta.SMTPRelay(host, port, context.reactor, context.logger())

    # -- delivery --------------------------------------------------------------------

    def recipient(self, item: DeliveryItem) -> str:
        """The address to mail, or raise :class:`Drop`."""
        raise NotImplementedError

    def deliver(self, item: DeliveryItem) -> defer.Deferred:
        assert self.options is not None and self.context is not None
        try:
            if item.is_corrupt:
                raise Drop("the payload is corrupt", "ExitCorrupt")
            recipient = self.recipient(item)
            if contents_size(item.classification) > self.options.max_size:
                raise Drop("the message is larger than MaximumSize", "ExitOversize")
            text = format_mail(item, recipient, self.options)
        except Drop as drop:
            self.context.count(drop.counter)
            self.log.warn("{module}: dropping a {kind} message: {reason}",
                          module=self.name, kind=item.kind, reason=str(drop))
            return defer.succeed(DeliveryResult.NORETRY)
        except BuildError as exc:
            self.log.warn("{module}: cannot format a {kind} message: {reason}",
                          module=self.name, kind=item.kind, reason=str(exc))
            return defer.succeed(DeliveryResult.NORETRY)
        self.log.debug("{module}: sending {size} bytes to {recipient}", module=self.name,
                       size=len(text), recipient=recipient)
        return self.transport.send(self.options.return_address, recipient, text)

    def flush(self) -> defer.Deferred:
        return defer.succeed(None)

    def advertise(self) -> Optional[Advertisement]:
        if not self.advertised or self.options is None:
            return None
        return mail_advertisement(self.section_name, self.options.max_size, self.options.allow_from)

    def stop(self) -> defer.Deferred:
        """Wait for the MTA sessions under way."""
        stop = getattr(self.transport, "stop", None)
        return defer.maybeDeferred(stop) if stop is not None else defer.succeed(None)
