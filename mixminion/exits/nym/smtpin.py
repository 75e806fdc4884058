"""The nymserver's SMTP listener: mail for ``NAME@Domain`` (doc/nym.md §1, §3).

A Twisted ESMTP server that takes mail only for live nyms of its domain:
``RCPT`` asks the service whether the nym takes mail now (550 no such nym
or a ``drop`` nym without reply blocks; 452 over a rate or queue limit);
the end of ``DATA`` answers 250 only once the mail is on disk (552 too
large, or the refusal of the checks made again).  Every refusal is one
SMTP reply and, at most, one log line without the address.  Twisted's own
ESMTP would log a traceback and answer 550 for any failed message; ours
answers the code the nymserver chose.
"""

from __future__ import annotations

import email.utils
from typing import Any, Optional, Protocol

from twisted.internet import defer
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.python.failure import Failure
from zope.interface import implementer

from mixminion.nym.formats import NymFormatError, check_name

#: seconds a client may stay silent before the listener hangs up
TIMEOUT = 120
#: the longest line taken (RFC 5321 allows 1000; some mail is sloppier)
MAX_LINE = 16384


class Receiver(Protocol):
    """What the listener needs of the nymserver (its service)."""

    settings: Any

    def check_recipient(self, name: str) -> defer.Deferred: ...

    async def accept_mail(self, name: str, text: bytes) -> Optional[tuple[int, str]]: ...


class _Refused(smtp.SMTPServerError):
    """A mail the nymserver would not keep: its SMTP code and text."""


@implementer(smtp.IMessage)
class _Mail:
    """One mail for one nym, collected line by line up to the size limit."""

    def __init__(self, receiver: Receiver, name: str, origin: str) -> None:
        self.receiver = receiver
        self.name = name
        self.limit = receiver.settings.max_message_size
        self.lines: list[bytes] = [f"Return-Path: <{origin}>".encode("ascii", "replace")]
        self.size = 0

    def lineReceived(self, line: bytes) -> None:  # noqa: N802
        self.size += len(line) + 1
        if self.size <= self.limit:
            self.lines.append(line)

    def eomReceived(self) -> defer.Deferred:  # noqa: N802
        if self.size > self.limit:
            return defer.fail(_Refused(552, f"a mail for a nym is at most {self.limit} bytes"))
        d = defer.ensureDeferred(self.receiver.accept_mail(self.name, b"\n".join(self.lines)
                                                           + b"\n"))

        def judged(refusal: Optional[tuple[int, str]]) -> None:
            if refusal is not None:
                raise _Refused(*refusal)
        return d.addCallback(judged)

    def connectionLost(self) -> None:  # noqa: N802
        self.lines = []


@implementer(smtp.IMessageDelivery)
class _Delivery:
    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver

    def receivedHeader(self, helo: Any, origin: Any, recipients: Any) -> bytes:  # noqa: N802
        # No client address: the sender's MTA or ours in front records it.
        return (f"Received: by {self.receiver.settings.domain} (mixminion nymserver); "
                f"{email.utils.formatdate(usegmt=True)}").encode("ascii")

    def validateFrom(self, helo: Any, origin: smtp.Address) -> smtp.Address:  # noqa: N802
        return origin

    def validateTo(self, user: smtp.User) -> defer.Deferred:  # noqa: N802
        local = user.dest.local.decode("ascii", "replace").lower()
        domain = user.dest.domain.decode("ascii", "replace").lower()
        if domain != self.receiver.settings.domain:
            return defer.fail(smtp.SMTPBadRcpt(user, 550, "not a domain of this server"))
        try:
            name = check_name(local)
        except NymFormatError:
            return defer.fail(smtp.SMTPBadRcpt(user, 550, "no such nym here"))
        origin = str(user.orig) if user.orig else ""

        def judged(refusal: Optional[tuple[int, str]]) -> Any:
            if refusal is not None:
                raise smtp.SMTPBadRcpt(user, *refusal)
            return lambda: _Mail(self.receiver, name, origin)
        return self.receiver.check_recipient(name).addCallback(judged)


class NymESMTP(smtp.ESMTP):
    """ESMTP that answers a refused mail with the nymserver's code."""

    log = Logger(namespace="mixminion.exits.nym")
    MAX_LENGTH = MAX_LINE
    #: Twisted would log every mail's sender and recipients (server.md §11)
    noisy = False

    def _messageHandled(self, resultList: Any) -> None:  # noqa: N802
        if not isinstance(resultList, list):  # Twisted's "thrown away": no recipient
            self.sendCode(250, b"Nothing to keep")
            return
        for ok, result in resultList:
            if ok:
                continue
            assert isinstance(result, Failure)
            if result.check(smtp.SMTPServerError):
                self.sendCode(result.value.code, result.value.resp.encode("ascii", "replace"))
            else:
                self.log.warn("NYM: a mail could not be kept: {why}",
                              why=result.getErrorMessage())
                self.sendCode(451, b"Requested action aborted: try again later")
            return
        self.sendCode(250, b"Kept for the nym")


class NymSMTPFactory(ServerFactory):
    noisy = False

    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver

    def buildProtocol(self, addr: Any) -> NymESMTP:  # noqa: N802
        protocol = NymESMTP()
        protocol.factory = self
        protocol.delivery = _Delivery(self.receiver)
        protocol.host = self.receiver.settings.domain.encode("ascii")
        protocol.timeout = TIMEOUT
        return protocol


def nym_smtp_factory(receiver: Receiver) -> ServerFactory:
    return NymSMTPFactory(receiver)
