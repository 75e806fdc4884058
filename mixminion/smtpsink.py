"""A tiny SMTP server that accepts every message and writes it to a folder.

Used by ``mixminion-testnet`` as the mail server of the exit nodes when no
real MTA is given: it needs no root and no configuration.  Each message
becomes one file ``<folder>/<time>-<n>.eml`` (written to a temporary name
and renamed, so a reader never sees half a message), headed by
``X-Envelope-From`` and ``X-Envelope-To`` lines with the SMTP envelope.

Run under twistd from a ``.tac`` file (see :func:`tac_text`), or directly::

    python3 -m mixminion.smtpsink --port 2525 --dir ./mail
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from typing import Any, Optional

from twisted.application import internet, service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.mail import smtp
from zope.interface import implementer

log = Logger()
_counter = itertools.count(1)


@implementer(smtp.IMessage)
class _FileMessage:
    def __init__(self, folder: str, sender: str, recipients: list[str]) -> None:
        self.folder = folder
        self.lines = [f"X-Envelope-From: {sender}".encode(),
                      f"X-Envelope-To: {', '.join(recipients)}".encode()]

    def lineReceived(self, line: bytes) -> None:  # noqa: N802 - Twisted naming
        self.lines.append(line)

    def eomReceived(self) -> defer.Deferred:  # noqa: N802
        name = f"{time.time():.6f}-{os.getpid()}-{next(_counter)}.eml"
        tmp = os.path.join(self.folder, "." + name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(b"\n".join(self.lines) + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, os.path.join(self.folder, name))
        log.info("Stored a message in {name}", name=name)
        return defer.succeed(name)

    def connectionLost(self) -> None:  # noqa: N802
        self.lines = []


@implementer(smtp.IMessageDelivery)
class _Delivery:
    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.sender = ""
        self.recipients: list[str] = []

    def receivedHeader(self, helo: Any, origin: Any, recipients: Any) -> None:  # noqa: N802
        return None

    def validateFrom(self, helo: Any, origin: smtp.Address) -> smtp.Address:  # noqa: N802
        self.sender = str(origin)
        self.recipients = []
        return origin

    def validateTo(self, user: smtp.User) -> Any:  # noqa: N802
        self.recipients.append(str(user.dest))
        recipients = self.recipients
        return lambda: _FileMessage(self.folder, self.sender, list(recipients))


class _Factory(smtp.SMTPFactory):
    def __init__(self, folder: str) -> None:
        super().__init__()
        self.folder = folder

    def buildProtocol(self, addr: Any) -> smtp.ESMTP:  # noqa: N802
        proto = smtp.ESMTP()
        proto.factory = self
        proto.host = b"mixminion-smtpsink"
        proto.delivery = _Delivery(self.folder)
        return proto


def make_service(port: int, folder: str, interface: str = "127.0.0.1") -> service.IService:
    os.makedirs(folder, mode=0o700, exist_ok=True)
    return internet.TCPServer(port, _Factory(folder), interface=interface)


def tac_text(port: int, folder: str) -> str:
    """A ``.tac`` file running the sink under ``twistd -y``."""
    return (f"# Written by mixminion-testnet: the SMTP sink on 127.0.0.1:{port}\n"
            "from twisted.application import service\n"
            "from mixminion.smtpsink import make_service\n"
            "application = service.Application('mixminion-smtpsink')\n"
            f"make_service({port}, {folder!r}).setServiceParent(application)\n")


def main(argv: Optional[list[str]] = None) -> None:
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    p = argparse.ArgumentParser(prog="python3 -m mixminion.smtpsink",
                                description="Accept every SMTP message and store it in a folder.")
    p.add_argument("--port", type=int, default=2525)
    p.add_argument("--dir", default="mail")
    args = p.parse_args(argv)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)])
    svc = make_service(args.port, os.path.abspath(args.dir))
    svc.startService()
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":  # pragma: no cover
    main()
