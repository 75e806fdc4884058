"""The e-mail an SMTP or MBOX exit sends (spec: server.md §9.3, packet.md
§14.2), and the module code both share.

Header injection is impossible by construction: every header value, from
the sender or from the configuration, goes through :func:`one_line`, which
keeps printable ASCII only (no CR, LF, NUL or other controls, no non-ASCII)
and never folds a sender's value.  The message is built as bytes here;
nothing downstream re-parses or re-folds it.
"""

from __future__ import annotations

import os
import re
import shutil
import textwrap
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from twisted.internet import defer

from mixminion.events import Event
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
from mixminion.exits.interfaces import local_paths
from mixminion.exits.items import DeliveryItem, DeliveryResult
from mixminion.config.schema import SectionSpec
from mixminion.exits.options import DEFAULT_FROM_TAG, SMTP, section_values

#: the schema's defaults, for messages formatted without a configuration
DEFAULT_SUBJECT: str = SMTP.default("SubjectLine")
DEFAULT_MAX_SIZE: int = SMTP.default("MaximumSize")
MIN_MAX_SIZE = 32 * 1024
WRAP = 70

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


def read_max_size(section: Mapping[str, Any], name: str, log) -> int:
    """``MaximumSize``: at least 32 KiB, rounded up to whole KiB (the node's
    reading of the file has already done so, with a warning)."""
    size = section["MaximumSize"]
    if size < MIN_MAX_SIZE:
        log.warn("[{section}] MaximumSize raised to 32K", section=name)
        size = MIN_MAX_SIZE
    if size % 1024:
        size = -(-size // 1024) * 1024
        log.warn("[{section}] MaximumSize rounded up to {kib}K", section=name, kib=size // 1024)
    return size


def read_mail_options(section: Mapping[str, Any], name: str, log) -> MailOptions:
    """The common options of a typed mail section."""
    return_address = section["ReturnAddress"]
    if not return_address or one_line(return_address) != return_address or " " in return_address:
        raise ExitConfigError(f"[{name}] ReturnAddress must be one address without spaces")
    return MailOptions(
        return_address=return_address,
        max_size=read_max_size(section, name, log),
        allow_from=section["AllowFromAddress"],
        subject_line=section["SubjectLine"] or DEFAULT_SUBJECT,
        x_abuse=section["X-Abuse"],
        comments=section["Comments"],
        disclaimer=section["Message"],
        from_tag=section["FromTag"] or DEFAULT_FROM_TAG,
    )


def _program(argv: tuple[str, ...], name: str) -> list[str]:
    """``SendmailCommand``'s program, absolute and executable."""
    program = argv[0] if os.path.isabs(argv[0]) else shutil.which(argv[0])
    if program is None or not os.access(program, os.X_OK) or not os.path.isfile(program):
        raise ExitConfigError(f"[{name}] SendmailCommand: {argv[0]} is not an executable program")
    return [program, *argv[1:]]


def mta_transport(values: Mapping[str, Any], section_name: str, context: ExitContext) -> Any:
    """The MTA a section's ``SMTPServer``/``SMTPPort``/``SendmailCommand``/
    ``MaxSMTPConnections`` name (:func:`mixminion.exits.options.mta_options`)."""
    from mixminion.exits import mta

    if values["MaxSMTPConnections"] < 1:
        raise ExitConfigError(f"[{section_name}] MaxSMTPConnections must be at least 1")
    sessions = values["MaxSMTPConnections"]
    if values["SendmailCommand"] is not None:
        # SMTPPort alone is ignored: it always has a value (its default).
        if values["SMTPServer"] is not None:
            raise ExitConfigError(f"[{section_name}] SendmailCommand and SMTPServer "
                                  "are exclusive")
        argv = _program(values["SendmailCommand"], section_name)
        return mta.SendmailCommand(argv, context.reactor, context.logger(), max_sessions=sessions)
    host = values["SMTPServer"] or "localhost"
    return mta.SMTPRelay(host, values["SMTPPort"], context.reactor, context.logger(),
                         max_sessions=sessions)


class MailModule:
    """What the SMTP and MBOX modules share: options, checks in the order
    of server.md §9.3, formatting, and the transport to the MTA.

    Subclasses set ``name``, ``exit_types`` and ``spec`` (the section's
    schema, which names the section) and implement :meth:`_configure_more`
    and :meth:`recipient`.
    """

    name = "MAIL"
    exit_types: frozenset[int] = frozenset()
    priority = 0
    uses_tag = True
    spec: SectionSpec = SMTP

    @property
    def section_name(self) -> str:
        return self.spec.name

    def __init__(self) -> None:
        self.retry_schedule: list[int] = list(self.spec.default("Retry"))
        self.options: Optional[MailOptions] = None
        self.transport: Any = None
        self.advertised = True
        self.context: Optional[ExitContext] = None
        self.log: Any = None

    # -- configuration ---------------------------------------------------------------

    def configure(self, section: Mapping[str, Any], context: ExitContext) -> None:
        """``section``: the values of the file (text, or as the node parsed
        them), typed here by :attr:`spec`."""
        self.context = context
        self.log = context.logger(self)
        values = section_values(self.spec, section)
        self.advertised = values["Advertise"]
        self.retry_schedule = list(values["Retry"])
        self.options = read_mail_options(values, self.section_name, self.log)
        self._configure_more(values, context)
        if self.transport is None:
            self.transport = self._make_mta_transport(values, context)

    def _configure_more(self, values: Mapping[str, Any], context: ExitContext) -> None:
        """Module-specific options; may set ``self.transport``."""

    def _make_mta_transport(self, values: Mapping[str, Any], context: ExitContext) -> Any:
        return mta_transport(values, self.section_name, context)

    # -- delivery --------------------------------------------------------------------

    def recipient(self, item: DeliveryItem) -> str:
        """The address to mail, or raise :class:`Drop`."""
        raise NotImplementedError

    def deliver(self, item: DeliveryItem) -> defer.Deferred:
        assert self.options is not None and self.context is not None
        try:
            if item.is_corrupt:
                raise Drop("the payload is corrupt", Event.EXIT_CORRUPT)
            recipient = self.recipient(item)
            if contents_size(item.classification) > self.options.max_size:
                raise Drop("the message is larger than MaximumSize", Event.EXIT_OVERSIZE)
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

    def local_paths(self) -> list[str]:
        """Where the transport writes (an ``MboxFile``'s folder; an MTA:
        nowhere of ours)."""
        return local_paths(self.transport)

    def advertise(self) -> Optional[Advertisement]:
        if not self.advertised or self.options is None:
            return None
        return mail_advertisement(self.section_name, self.options.max_size, self.options.allow_from)

    def stop(self) -> defer.Deferred:
        """Wait for the MTA sessions under way."""
        stop = getattr(self.transport, "stop", None)
        return defer.maybeDeferred(stop) if stop is not None else defer.succeed(None)
