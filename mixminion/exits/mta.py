"""Handing a formatted message to the mail system (spec: server.md §9.3
"Delivery transport"): an SMTP session with a configured MTA, a sendmail
-like command, or (for local tests) an mbox file.

Each transport's :meth:`send` returns a Deferred firing with a
:class:`~mixminion.exits.items.DeliveryResult`; it never errbacks.
Failing to reach the MTA is a RETRY, so no message is lost while the MTA is
down (the reference lost them: server.md §18 item 3).
"""

from __future__ import annotations

import fcntl
import os
import time
from io import BytesIO
from typing import Any, Sequence

from twisted.internet import defer, error, protocol
from twisted.mail import smtp
from twisted.python.failure import Failure

from mixminion.exits.items import DeliveryResult
from mixminion.exits.options import SMTP

#: seconds to wait for each response of the MTA, or for a command to finish
DEFAULT_TIMEOUT = 300
#: the schema's MaxSMTPConnections, for transports built without a configuration
DEFAULT_MAX_SESSIONS: int = SMTP.default("MaxSMTPConnections")


def smtp_data(text: bytes) -> bytes:
    """The DATA section for ``text``: CRLF line endings (any CR or LF ends
    a line) and every line starting with ``.`` dot-stuffed, the first one
    included.  Done on the whole message at once: Twisted's own
    ``transformChunk`` works chunk by chunk and would miss a ``.`` at the
    start of a chunk, which a sender could place to end DATA early and
    smuggle SMTP commands."""
    lines = text.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)


class _Sender(smtp.ESMTPSender):
    """One message, one session; timeouts on the factory's clock; the data
    arrives already in wire form (:func:`smtp_data`)."""

    def transformChunk(self, chunk: bytes) -> bytes:  # noqa: N802 - Twisted naming
        self.resetTimeout()
        return chunk


class _SenderFactory(smtp.ESMTPSenderFactory):
    protocol = _Sender

    def __init__(self, *args, clock, **kw) -> None:
        super().__init__(*args, **kw)
        self._clock = clock
        #: fires once the connection is gone (or never came)
        self.closed: defer.Deferred = defer.Deferred()

    def buildProtocol(self, addr):  # noqa: N802 - Twisted naming
        p = super().buildProtocol(addr)
        p.callLater = self._clock.callLater
        return p

    def clientConnectionFailed(self, connector, err) -> None:  # noqa: N802
        super().clientConnectionFailed(connector, err)
        self._closed()

    def clientConnectionLost(self, connector, err) -> None:  # noqa: N802
        super().clientConnectionLost(connector, err)
        self._closed()

    def _closed(self) -> None:
        if not self.closed.called:
            self.closed.callback(None)


def classify_smtp_failure(failure: Failure) -> DeliveryResult:
    """5xx refusals of the message are permanent; everything else (no
    connection, timeouts, lost connections, 4xx, garbled replies, a refusing
    greeting) is temporary."""
    exc = failure.value
    if isinstance(exc, smtp.SMTPClientError) and not isinstance(exc, smtp.SMTPConnectError):
        code = exc.code if isinstance(exc.code, int) else -1
        if 500 <= code <= 599:
            return DeliveryResult.NORETRY
    return DeliveryResult.RETRY


class SMTPRelay:
    """Delivers through an MTA over SMTP, one session per message
    (``ESMTPSenderFactory`` without authentication or STARTTLS: a local MTA
    wants neither), at most ``max_sessions`` at once: with a thousand
    messages queued, opening a thousand sessions overflowed the MTA's
    backlog and left them hanging until the timeout."""

    def __init__(self, host: str, port: int, reactor, log, timeout: float = DEFAULT_TIMEOUT,
                 max_sessions: int = DEFAULT_MAX_SESSIONS) -> None:
        self.host = host
        self.port = port
        self.reactor = reactor
        self.log = log
        self.timeout = timeout
        self.slots = defer.DeferredSemaphore(max_sessions)
        self._sessions: set[_SenderFactory] = set()

    def send(self, sender: str, recipient: str, text: bytes) -> defer.Deferred:
        """Fires with a :class:`DeliveryResult` once a session had its turn
        and ended (the timeout counts from the session's start)."""
        return self.slots.run(self._send, sender, recipient, text)

    def _send(self, sender: str, recipient: str, text: bytes) -> defer.Deferred:
        done: defer.Deferred = defer.Deferred()
        factory = _SenderFactory(
            None, None, sender.encode("ascii"), [recipient.encode("ascii")], BytesIO(smtp_data(text)), done,
            retries=0, timeout=self.timeout, heloFallback=True,
            requireAuthentication=False, requireTransportSecurity=False, clock=self.reactor,
        )
        try:
            self.reactor.connectTCP(self.host, self.port, factory, timeout=self.timeout)
        except Exception:
            done.errback()
            factory._closed()
        self._sessions.add(factory)
        factory.closed.addBoth(lambda _: self._sessions.discard(factory))
        done.addCallbacks(self._sent, self._failed)
        return done

    def stop(self) -> defer.Deferred:
        """Fires when every session under way has closed."""
        return defer.DeferredList([f.closed for f in list(self._sessions)])

    def _sent(self, _result) -> DeliveryResult:
        return DeliveryResult.OK

    def _failed(self, failure: Failure) -> DeliveryResult:
        result = classify_smtp_failure(failure)
        code = getattr(failure.value, "code", None)
        self.log.warn("SMTP delivery failed ({result}): {error} (code {code})",
                      result=result.name, error=failure.type.__name__, code=code)
        return result


class _CommandProtocol(protocol.ProcessProtocol):
    def __init__(self, text: bytes, done: defer.Deferred) -> None:
        self.text = text
        self.done = done
        self.output = 0

    def connectionMade(self) -> None:  # noqa: N802
        transport: Any = self.transport
        transport.write(self.text)
        transport.closeStdin()

    def outReceived(self, data: bytes) -> None:  # noqa: N802
        self.output += len(data)

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:  # noqa: N802
        if not self.done.called:
            self.done.callback(reason.value)


class SendmailCommand:
    """Delivers by running a command such as ``sendmail -i -t``: the
    message on its standard input, recipients taken from its headers, at
    most ``max_sessions`` processes at once.  The argument vector comes
    from the configuration alone; it is spawned directly, never through a
    shell."""

    def __init__(self, argv: Sequence[str], reactor, log, timeout: float = DEFAULT_TIMEOUT,
                 max_sessions: int = DEFAULT_MAX_SESSIONS) -> None:
        self.argv = list(argv)
        self.reactor = reactor
        self.log = log
        self.timeout = timeout
        self.slots = defer.DeferredSemaphore(max_sessions)

    def send(self, sender: str, recipient: str, text: bytes) -> defer.Deferred:
        return self.slots.run(self._send, sender, recipient, text)

    def _send(self, sender: str, recipient: str, text: bytes) -> defer.Deferred:
        done: defer.Deferred = defer.Deferred()
        proto = _CommandProtocol(text, done)
        try:
            process = self.reactor.spawnProcess(proto, self.argv[0], self.argv, env=dict(os.environ))
        except Exception as exc:
            self.log.warn("Cannot run the sendmail command: {error}", error=str(exc))
            return defer.succeed(DeliveryResult.RETRY)
        timer = self.reactor.callLater(self.timeout, self._kill, process)

        def ended(reason: Exception) -> DeliveryResult:
            if timer.active():
                timer.cancel()
            if isinstance(reason, error.ProcessDone):
                return DeliveryResult.OK
            status = getattr(reason, "exitCode", None)
            self.log.warn("Sendmail command failed (exit status {status}); will retry", status=status)
            return DeliveryResult.RETRY

        return done.addCallback(ended)

    def _kill(self, process) -> None:
        self.log.warn("Sendmail command timed out; killing it")
        try:
            process.signalProcess("KILL")
        except error.ProcessExitedAlready:
            pass


def mbox_quote(text: bytes) -> bytes:
    """mboxrd quoting: one more ``>`` before every line that is ``From ``
    after any number of ``>``."""
    lines = text.split(b"\n")
    return b"\n".join(b">" + line if line.lstrip(b">").startswith(b"From ") else line for line in lines)


class MboxFile:
    """Appends each message to a local mbox file, under an exclusive lock,
    flushed to disk before reporting success (meant for tests and for
    hosts without an MTA)."""

    def __init__(self, path: str, clock, log) -> None:
        self.path = path
        #: dates each message's ``From`` line: a wall clock
        self.clock = clock
        self.log = log

    def local_paths(self) -> list[str]:
        """The mbox file's folder: its disk's free space is checked before
        a delivery round (see :func:`mixminion.exits.interfaces.local_paths`)."""
        return [os.path.dirname(os.path.abspath(self.path))]

    def send(self, sender: str, recipient: str, text: bytes) -> defer.Deferred:
        stamp = time.asctime(time.gmtime(self.clock.seconds()))
        envelope = (sender.split()[0] if sender.split() else "MAILER-DAEMON")
        body = mbox_quote(text)
        if not body.endswith(b"\n"):
            body += b"\n"
        record = f"From {envelope} {stamp}\n".encode("ascii", "replace") + body + b"\n"
        try:
            self._append(record)
        except OSError as exc:
            self.log.warn("Cannot append to the mbox file: {error}", error=str(exc))
            return defer.succeed(DeliveryResult.RETRY)
        return defer.succeed(DeliveryResult.OK)

    def _append(self, record: bytes) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            try:
                view = memoryview(record)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                fcntl.lockf(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

