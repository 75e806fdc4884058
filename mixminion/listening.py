"""A listening port as a service, with a port in use said in one line.

Twisted's ``StreamServerEndpointService`` only raises a listening error
at start when a private flag is set; without it the error is logged and
the node would run deaf.  This service listens in
``privilegedStartService`` (as root, if twistd starts as root) and turns
a port it cannot have into one line and an exit.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.application import service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure


class ListeningService(service.Service):
    """Listens on ``endpoint`` with ``factory`` while running; ``program``
    starts the line said when the port cannot be had."""

    def __init__(self, endpoint: IStreamServerEndpoint, factory: Factory,
                 program: str = "mixminion") -> None:
        self.endpoint = endpoint
        self.program = program
        self.factory = factory
        self.port: Optional[IListeningPort] = None
        self._listening: Optional[defer.Deferred[Any]] = None

    def privilegedStartService(self) -> None:  # noqa: N802
        super().privilegedStartService()
        outcome: list[Any] = []
        self._listening = self.endpoint.listen(self.factory)
        self._listening.addBoth(outcome.append)
        if not outcome:  # an endpoint that listens later: keep its port when it comes
            self._listening.addCallback(self._listened)
            return
        if isinstance(outcome[0], Failure):
            exc = outcome[0].value
            if isinstance(exc, CannotListenError):
                why = getattr(exc.socketError, "strerror", None) or str(exc.socketError)
                raise SystemExit(f"{self.program}: cannot listen on {exc.interface or '*'}:{exc.port}: "
                                 f"{why}")
            outcome[0].raiseException()
        self._listened(outcome[0])

    def _listened(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        return port

    def startService(self) -> None:  # noqa: N802
        if self._listening is None:  # started without the privileged step (tests)
            self.privilegedStartService()
        super().startService()

    def stopService(self) -> defer.Deferred[None]:  # noqa: N802
        super().stopService()
        port, self.port, self._listening = self.port, None, None
        if port is None:
            return defer.succeed(None)
        return defer.maybeDeferred(port.stopListening)
