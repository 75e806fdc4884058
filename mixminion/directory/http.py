"""A small HTTP client for authorities and publishing servers.

Every request has a deadline on an injected clock (a stalled peer must not
stall a voting round or a publication), and connections come from one pool
that :meth:`HTTPClient.close` empties, so a stopped service leaves nothing
open behind it.
"""

from __future__ import annotations

from dataclasses import dataclass
from io import BytesIO
from typing import Any, Mapping, Optional
from urllib.parse import urlencode

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

class HTTPError(Exception):
    """The peer answered, but not with 200, or the answer was unusable."""


@dataclass(frozen=True)
class Response:
    code: int
    content_type: str
    body: bytes


def join_url(base: str, path: str) -> str:
    """``http://a:1/`` + ``vote`` -> ``http://a:1/vote`` (one slash, whatever the base)."""
    return base.rstrip("/") + "/" + path.lstrip("/")


class HTTPClient:
    """GET and POST (a form, or a text body) with timeouts, on ``reactor`` for I/O and ``clock`` for deadlines."""

    def __init__(self, reactor, clock: Optional[IReactorTime] = None, timeout: float = 60.0) -> None:
        self.clock = clock or reactor
        self.timeout = timeout
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 2
        self.pool.retryAutomatically = False
        self.agent = Agent(reactor, connectTimeout=timeout, pool=self.pool)

    def get(self, url: str) -> defer.Deferred:
        return self._request(b"GET", url, None, {})

    def post_form(self, url: str, fields: Mapping[str, str]) -> defer.Deferred:
        body = urlencode(fields).encode("ascii")
        headers = {b"Content-Type": [b"application/x-www-form-urlencoded"]}
        return self._request(b"POST", url, body, headers)

    def post_text(self, url: str, text: str) -> defer.Deferred:
        """POST ``text`` as the whole body (``text/plain``): a signed
        document that is its own format, such as a ping report."""
        headers = {b"Content-Type": [b"text/plain; charset=utf-8"]}
        return self._request(b"POST", url, text.encode("utf-8"), headers)

    def _request(self, method: bytes, url: str, body: Optional[bytes],
                 headers: Mapping[bytes, list[bytes]]) -> defer.Deferred:
        """Fires with a :class:`Response`, whatever its HTTP status."""
        all_headers = Headers({b"Pragma": [b"no-cache"], b"Cache-Control": [b"no-cache"], **headers})
        producer: Any = FileBodyProducer(BytesIO(body)) if body is not None else None
        d = self.agent.request(method, url.encode("ascii"), all_headers, producer)
        d.addCallback(self._read)
        d.addTimeout(self.timeout, self.clock)
        return d

    @staticmethod
    def _read(response) -> defer.Deferred:
        content_type = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
        d = readBody(response)
        d.addCallback(lambda body: Response(response.code, content_type.decode("latin-1"), body))
        return d

    def close(self) -> defer.Deferred:
        return self.pool.closeCachedConnections()

