"""Uploading the pinger's signed reports to the authorities (doc/reliability.md §2).

Each report goes to every configured authority (``POST /report``, through
:func:`mixminion.server.publish.http_report_uploader`).  An authority that
could not be reached is tried again with the descriptors' backoff
(:func:`mixminion.server.publish.backoff_delay`), never later than the next
report, which replaces the pending one: only the latest report counts
(an authority votes with each pinger's latest).  An authority that refused
the report is not asked again with the same text: a refusal (unlisted
pinger, stale or malformed report) does not change by itself.

Every result is one INFO line naming the authority by its fingerprint; its
URL and the reason of a network failure, which may name addresses, are at
DEBUG only.
"""

from __future__ import annotations

import random
from typing import Callable, Optional, Sequence

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from mixminion.server.publish import Uploader, UploadResult, backoff_delay

log = Logger()


class ReportUploads:
    """Hands the latest report to every authority (``(url, fingerprint)``).

    ``clock`` times the retries; ``wall`` dates the last attempt and
    success for the status document; ``max_delay`` caps a retry's wait
    (the report interval)."""

    def __init__(self, authorities: Sequence[tuple[str, str]], clock: IReactorTime,
                 upload: Uploader, max_delay: float, *,
                 wall: Optional[IReactorTime] = None,
                 rng: Callable[[], float] = random.SystemRandom().random,
                 close: Optional[Callable[[], object]] = None) -> None:
        self.authorities = list(authorities)
        self.clock = clock
        self.wall = wall if wall is not None else clock
        self.upload = upload
        self.max_delay = max_delay
        self.rng = rng
        #: releases the uploader's connections when the pinger stops
        self.close = close
        self.failures = 0
        #: wall times of the last upload round and of the last acceptance,
        #: and the last failure or refusal since (``status.json``)
        self.last_attempt: Optional[float] = None
        self.last_success: Optional[float] = None
        self.last_error: Optional[str] = None
        self._text: Optional[str] = None
        self._missing: list[tuple[str, str]] = []
        self._retry: Optional[IDelayedCall] = None
        self._rounds: set[defer.Deferred] = set()

    def submit(self, text: str) -> defer.Deferred:
        """Upload ``text`` to every authority; it replaces the report still
        being retried, if any.  Fires when this first round is over."""
        self._cancel_retry()
        self.failures = 0
        self._text = text
        self._missing = list(self.authorities)
        return self._start()

    def stop(self) -> defer.Deferred:
        """Cancel the pending retry and the uploads under way; close the
        connections."""
        self._cancel_retry()
        self._text = None
        for d in list(self._rounds):
            d.cancel()
        return defer.maybeDeferred(self.close) if self.close is not None else defer.succeed(None)

    def _cancel_retry(self) -> None:
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None

    def _start(self) -> defer.Deferred:
        d = defer.ensureDeferred(self._round())
        self._rounds.add(d)
        d.addErrback(lambda f: None if f.check(defer.CancelledError) else
                     log.failure("Ping report upload failed", f))
        d.addBoth(lambda _: self._rounds.discard(d))
        return d

    async def _round(self) -> None:
        text, missing = self._text, self._missing
        if text is None or not missing:
            return
        self.last_attempt = self.wall.seconds()
        results: list[UploadResult] = await defer.gatherResults(
            [defer.maybeDeferred(self.upload, url, text) for url, _ in missing],
            consumeErrors=True)
        if text is not self._text:
            return  # a newer report took its place meanwhile
        unreached = []
        for (url, fingerprint), result in zip(missing, results):
            log.debug("Ping report upload to {authority} at {url}: {message}",
                      authority=fingerprint, url=url, message=result.message)
            if result.accepted:
                self.last_success = self.wall.seconds()
                log.info("Authority {authority} accepted the ping report: {message}",
                         authority=fingerprint, message=result.message)
            elif result.error:
                unreached.append((url, fingerprint))
                self.last_error = f"authority {fingerprint} not reached: {result.message}"
                log.info("Ping report not delivered to authority {authority} (network or "
                         "HTTP failure; details at debug level)", authority=fingerprint)
            else:
                self.last_error = f"authority {fingerprint} refused the report: {result.message}"
                log.info("Authority {authority} refused the ping report: {message}",
                         authority=fingerprint, message=result.message)
        self._missing = unreached
        if unreached:
            self.failures += 1
            delay = min(self.max_delay, backoff_delay(self.failures, self.rng))
            log.debug("Ping report: retry {n} for {k} authorities in {delay:.0f} s",
                     n=self.failures, k=len(unreached), delay=delay)
            self._cancel_retry()
            self._retry = self.clock.callLater(delay, self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        self._start()
