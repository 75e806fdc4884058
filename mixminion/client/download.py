"""Directory downloads over HTTP with Twisted (descriptors.md §8).

Kept apart from :mod:`mixminion.client.directory` so that reading the
cached directory, which every send does, never imports the reactor or
Twisted's web client; only a download does.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from twisted.internet import defer, error as net_error, protocol
from twisted.internet.endpoints import HostnameEndpoint
from twisted.python.failure import Failure
from twisted.web import client as web_client
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers

from mixminion import __version__
from mixminion.client.directory import proxy_for


@dataclass(frozen=True)
class Answer:
    """An authority's answer: status, and for 200 the (gunzipped) body and
    its ``Date`` header."""

    code: int
    phrase: str
    body: bytes = b""
    date: Optional[str] = None


class BodyTooLarge(Exception):
    """The answer (or its gunzipped form) is over the size limit."""


class _LimitedBody(protocol.Protocol):
    """Collects a response body, giving up beyond ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0
        self.done: defer.Deferred[bytes] = defer.Deferred(lambda _: self._stop())

    def _stop(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted naming
        if self.done.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.done.errback(BodyTooLarge(f"more than {self.limit} bytes"))
            self._stop()
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]  # noqa: N802
        if self.done.called:
            return
        if reason is None or reason.check(web_client.ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)


def _decompress(data: bytes, limit: int) -> bytes:
    """Gunzip ``data``, refusing anything that expands past the size limit."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    out = inflater.decompress(data, limit)
    if inflater.unconsumed_tail:
        raise BodyTooLarge(f"more than {limit} bytes once decompressed")
    if not inflater.eof:
        raise zlib.error("truncated gzip data")
    return out


def _timed_out(result: Any, timeout: float) -> None:
    """Whatever the cancelled request failed with, the cause was our deadline."""
    if isinstance(result, Failure):
        result.trap(Exception)  # consumed: the timeout is the story
    raise defer.TimeoutError(f"no answer within {timeout:g} s")


def describe_network_error(failure: BaseException) -> str:
    if isinstance(failure, defer.TimeoutError | defer.CancelledError):
        return f"no answer in time ({failure})."
    if isinstance(failure, web_client.ResponseNeverReceived):
        reasons = "; ".join(r.getErrorMessage() for r in failure.reasons)
        return f"the connection failed before an answer arrived ({reasons})."
    if isinstance(failure, net_error.ConnectError):
        return f"could not connect ({failure.__class__.__name__}: {failure})."
    if isinstance(failure, web_client.ResponseFailed):
        reasons = "; ".join(r.getErrorMessage() for r in failure.reasons)
        return f"the download broke off ({reasons})."
    return f"network error ({failure.__class__.__name__}: {failure})."


def connection_pool(reactor: Any) -> web_client.HTTPConnectionPool:
    """One pool per update, not persistent: each authority is asked once."""
    return web_client.HTTPConnectionPool(reactor, persistent=False)


def agent_for(url: str, reactor: Any, timeout: float, environ: Mapping[str, str],
              pool: web_client.HTTPConnectionPool) -> Any:
    """An agent for ``url``, through ``http_proxy`` when the environment says so."""
    proxy = proxy_for(url, environ)
    if proxy is None:
        return web_client.Agent(reactor, connectTimeout=timeout, pool=pool)
    endpoint = HostnameEndpoint(reactor, proxy[0], proxy[1], timeout=timeout)
    return web_client.ProxyAgent(endpoint, reactor=reactor, pool=pool)


async def _get(url: str, agent: Any, limit: int) -> Answer:
    headers = Headers({
        b"Pragma": [b"no-cache"],
        b"Cache-Control": [b"no-cache"],
        b"User-Agent": [f"Mixminion/{__version__}".encode("ascii")],
    })
    response: Any = await agent.request(b"GET", url.encode("ascii"), headers)
    phrase = response.phrase.decode("latin-1", "replace")
    if response.code != 200:
        discard = _LimitedBody(64 * 1024)  # read and drop, so the connection can close
        response.deliverBody(discard)
        discard.done.addErrback(lambda _: None)
        return Answer(response.code, phrase)
    collector = _LimitedBody(limit)
    response.deliverBody(collector)
    body = await collector.done
    if url.lower().endswith(".gz") or body[:2] == b"\x1f\x8b":
        body = _decompress(body, limit)
    dates = response.headers.getRawHeaders(b"date") or []
    return Answer(200, phrase, body, dates[0].decode("latin-1") if dates else None)


async def fetch(url: str, agent: Any, timeout: float, reactor: Any, limit: int) -> Answer:
    """GET ``url`` without caches within ``timeout`` seconds.  Raises
    :class:`BodyTooLarge`, ``zlib.error``, or whatever the network does
    (:func:`describe_network_error` words it)."""
    d = defer.ensureDeferred(_get(url, agent, limit))
    d.addTimeout(timeout, reactor, onTimeoutCancel=_timed_out)
    return await d
