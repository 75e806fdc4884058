"""Uploading the node's descriptors to the directory authorities (server.md §8.6).

Every keyset without a ``published`` marker is POSTed (descriptors.md §7.3)
to every configured authority: at start-up, after key generation or
rotation (:meth:`Publisher.kick`), on SIGHUP, and on SIGUSR2
(``mixminiond republish``: every descriptor again, :meth:`Publisher.republish`).
A keyset counts as published once a majority of the authorities answered ``Status: 1`` -- the
authorities exchange descriptors among themselves, so the rest will have it
by their next round.  Anything short of that is retried with exponential
backoff (30 s doubling to 1 h, plus jitter so that many servers do not
hammer an authority in step), and every outcome is logged: a descriptor
that silently never reaches the directory makes the node invisible.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from mixminion.directory.http import HTTPClient, Response, join_url
from mixminion.server.keys import Keyset, KeyStore

log = Logger()

INITIAL_BACKOFF = 30.0
MAX_BACKOFF = 3600.0
#: the delay is stretched by up to this fraction, chosen by the RNG
JITTER = 0.1

_ANSWER = re.compile(r"^Status: ([0-9])[ \t]*\nMessage: (.*)$", re.MULTILINE)


@dataclass(frozen=True)
class UploadResult:
    """One authority's answer: ``accepted`` is ``Status: 1``; ``error`` means
    no usable answer at all (network, HTTP status, format)."""

    accepted: bool
    message: str
    error: bool = False


def parse_answer(response: Response) -> UploadResult:
    """§7.3 step 2: ``text/plain`` with ``Status: 0|1`` and ``Message: ...``."""
    if response.code != 200:
        return UploadResult(False, f"HTTP status {response.code}", error=True)
    if not response.content_type.lower().startswith("text/plain"):
        return UploadResult(False, f"answer is {response.content_type or 'untyped'}, not text/plain", error=True)
    match = _ANSWER.search(response.body.decode("ascii", "replace").replace("\r\n", "\n"))
    if match is None or match.group(1) not in "01":
        return UploadResult(False, "answer has no Status/Message lines", error=True)
    return UploadResult(match.group(1) == "1", match.group(2).strip())


Uploader = Callable[[str, str], "defer.Deferred[UploadResult]"]


def http_uploader(client: HTTPClient) -> Uploader:
    """POST ``desc`` to ``<authority URL>/publish``."""
    return _answered(lambda url, text: client.post_form(join_url(url, "publish"), {"desc": text}))


def http_report_uploader(client: HTTPClient) -> Uploader:
    """POST a ping report, its text as the body, to ``<authority URL>/report``
    (doc/reliability.md §2); the answer is read as ``/publish``'s."""
    return _answered(lambda url, text: client.post_text(join_url(url, "report"), text))


def _answered(post: Callable[[str, str], defer.Deferred]) -> Uploader:
    """An uploader that reads §7.3's answer to ``post(url, text)``; a failure
    to get one is an :class:`UploadResult` with ``error`` set."""
    def upload(url: str, text: str) -> defer.Deferred:
        d = post(url, text)
        d.addCallback(parse_answer)
        d.addErrback(lambda f: UploadResult(False, f.getErrorMessage() or f.type.__name__, error=True))
        return d
    return upload


def backoff_delay(failures: int, rng: Callable[[], float], initial: float = INITIAL_BACKOFF,
                  maximum: float = MAX_BACKOFF) -> float:
    """Delay before retry number ``failures`` (1-based): doubling, capped, jittered."""
    base = min(maximum, initial * 2 ** max(0, failures - 1))
    return base * (1 + JITTER * rng())


class Publisher(service.Service):
    """Publishes unpublished keysets to ``authorities`` (``(url, fingerprint)``).

    ``clock`` times the retries; ``wall`` (by default the same) dates
    publications, which are compared with descriptors' validity dates."""

    #: how the node finds it among its children (MixNode.publisher)
    name = "publisher"

    def __init__(self, keys: KeyStore, authorities: Sequence[tuple[str, str]], clock: IReactorTime,
                 uploader: Uploader, rng: Callable[[], float] = random.SystemRandom().random,
                 close: Optional[Callable[[], object]] = None,
                 wall: Optional[IReactorTime] = None) -> None:
        self.keys = keys
        self.authorities = [(url, fp) for url, fp in authorities]
        self.clock = clock
        self.wall = wall if wall is not None else clock
        self.upload = uploader
        self.rng = rng
        #: releases the uploader's connections when the service stops
        self.close = close
        #: keyset number -> fingerprints of authorities that accepted its current descriptor
        self.accepted: dict[int, set[str]] = {}
        self._accepted_digest: dict[int, bytes] = {}
        self.failures = 0
        self._retry: Optional[IDelayedCall] = None
        self._running: Optional[defer.Deferred] = None
        self._again = False
        #: wall times of the last round that uploaded and of the last that
        #: completed, and the last failure since (``status.json``)
        self.last_attempt: Optional[float] = None
        self.last_success: Optional[float] = None
        self.last_error: Optional[str] = None
        #: called after each round that uploaded something (the node's status)
        self.listeners: list[Callable[[], object]] = []

    @property
    def majority(self) -> int:
        return len(self.authorities) // 2 + 1

    def startService(self) -> None:  # noqa: N802
        super().startService()
        self.kick("start-up")

    def stopService(self):  # noqa: N802
        """Stop at once: a pending upload is cancelled (and retried at next start)."""
        super().stopService()
        self._cancel_retry()
        if self._running is not None:
            self._running.cancel()
        return defer.maybeDeferred(self.close) if self.close is not None else None

    def _cancel_retry(self) -> None:
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None

    def kick(self, reason: str = "new keys") -> defer.Deferred:
        """Publish now (start-up, key generation, SIGHUP); resets the backoff."""
        self._cancel_retry()
        self.failures = 0
        return self._start(reason)

    #: the next round uploads every current descriptor, published or not
    _everything = False

    def republish(self) -> defer.Deferred:
        """``mixminiond republish`` (SIGUSR2): upload every current
        descriptor again, to every authority, as if none had been published."""
        self._everything = True
        self.accepted.clear()
        self._accepted_digest.clear()
        return self.kick("republish")

    def _start(self, reason: str) -> defer.Deferred:
        if self._running is not None:
            self._again = True
            return self._running
        d = self._running = defer.ensureDeferred(self._round(reason))
        d.addErrback(lambda f: log.failure("Publication round failed", f))
        d.addBoth(self._finished)
        return d

    def _finished(self, _) -> None:
        self._running = None
        if self._again and self.running:
            self._again = False
            self._start("queued request")

    async def _round(self, reason: str) -> None:
        now = self.wall.seconds()
        everything, self._everything = self._everything, False
        candidates = self.keys.keysets if everything else self.keys.unpublished()
        pending = [k for k in candidates if k.valid_until >= now]
        if not pending:
            log.debug("Publication ({reason}): nothing to publish", reason=reason)
            return
        log.info("Publication ({reason}): {n} descriptors to {a} authorities",
                 reason=reason, n=len(pending), a=len(self.authorities))
        self.last_attempt = now
        complete = True
        for keyset in pending:
            complete = await self._publish(keyset) and complete
        if complete:
            self.failures = 0
            self.last_success, self.last_error = self.wall.seconds(), None
        elif self.running:
            self.failures += 1
            delay = backoff_delay(self.failures, self.rng)
            log.warn("Publication incomplete; retry {n} in {delay:.0f} s", n=self.failures, delay=delay)
            self._cancel_retry()
            self._retry = self.clock.callLater(delay, self._retry_now)
        for listener in self.listeners:
            listener()

    def _retry_now(self) -> None:
        self._retry = None
        self._start("retry")

    async def _publish(self, keyset: Keyset) -> bool:
        """Upload one keyset to the authorities still missing it; True once published."""
        digest = keyset.descriptor.digest
        if self._accepted_digest.get(keyset.number) != digest:
            self._accepted_digest[keyset.number] = digest
            self.accepted[keyset.number] = set()
        accepted = self.accepted[keyset.number]
        missing = [(url, fp) for url, fp in self.authorities if fp not in accepted]
        results = await defer.gatherResults(
            [defer.maybeDeferred(self.upload, url, keyset.descriptor.text) for url, _ in missing])
        for (url, fp), result in zip(missing, results):
            if result.accepted:
                accepted.add(fp)
                log.info("Authority {url} accepted descriptor of {keyset}: {message}",
                         url=url, keyset=keyset.name, message=result.message)
            elif result.error:
                log.warn("Upload of {keyset} to {url} failed: {why}", keyset=keyset.name, url=url,
                         why=result.message)
                self.last_error = f"upload of {keyset.name} to {url} failed: {result.message}"
            else:
                log.warn("Authority {url} rejected descriptor of {keyset}: {message}",
                         url=url, keyset=keyset.name, message=result.message)
                self.last_error = f"{url} rejected {keyset.name}: {result.message}"
        if len(accepted) < self.majority:
            return False
        self.accepted.pop(keyset.number, None)
        self._accepted_digest.pop(keyset.number, None)
        if not self.keys.mark_published(keyset, self.wall.seconds()):
            log.info("Descriptor of {keyset} changed during upload; publishing the new one",
                     keyset=keyset.name)
            return False
        log.info("Descriptor of {keyset} published ({n} of {a} authorities)",
                 keyset=keyset.name, n=len(accepted), a=len(self.authorities))
        return True


def publisher_for(directory, keys: KeyStore, reactor, wall=None) -> Optional[Publisher]:
    """The node's publisher from ``[DirectoryServers]``, or None if it does not publish."""
    if not directory.publish or not directory.authorities:
        return None
    authorities = [(a.url, a.fingerprint) for a in directory.authorities]
    client = HTTPClient(reactor, timeout=60.0)
    return Publisher(keys, authorities, reactor, http_uploader(client), close=client.close,
                     wall=wall)
