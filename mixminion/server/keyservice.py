"""Keys on time: generation ahead of need, rotation, descriptor rewrites.

The only writer of the key store while the node runs: each job runs in a
worker thread, one at a time.
"""

from __future__ import annotations

from typing import Callable, Sequence

from twisted.application import service
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from mixminion.codec.textformat import format_time
from mixminion.server.clock import WALL
from mixminion.server.keys import Keyset, KeyStore, RotationResult

log = Logger()


def validity(keyset: Keyset) -> str:
    """``from 2025-01-01 00:00:00 to 2025-02-01 00:00:00 UTC``."""
    return f"from {format_time(keyset.valid_after)} to {format_time(keyset.valid_until)} UTC"


class KeyService(service.Service):
    """Generates keysets ahead of need, rotates packet keys on time, and
    rewrites the descriptors when a SIGHUP changed what they publish: the
    only writer of the key store, one job at a time in a worker thread.
    Key lifetimes are dates: they are read on the wall clock."""

    def __init__(self, keys: KeyStore, rotated: Callable[[Sequence[bytes]], None], template,
                 reactor, wall=WALL) -> None:
        self.keys, self.template, self.reactor = keys, template, reactor
        #: told after each rotation, with the key ids of the packet keys
        #: retired (the node decrypts with the live keys only, and forgets
        #: the retired keys' replay entries)
        self.rotated = rotated
        self.wall = wall
        self._call = None
        self._busy = False
        #: a new template waiting for the job under way to end
        self._new_template = None
        #: called after each generation/rotation run (the publisher)
        self.listeners: list = []

    def startService(self) -> None:  # noqa: N802
        super().startService()
        self._schedule()

    def stopService(self):  # noqa: N802
        super().stopService()
        self._cancel()

    def _cancel(self) -> None:
        """Forget the next timed run, if one is pending."""
        if self._call is not None and self._call.active():
            self._call.cancel()

    def _schedule(self) -> None:
        self._cancel()
        now = self.wall.seconds()
        delay = max(1.0, self.keys.next_event(now) - now)
        self._call = self.reactor.callLater(delay, self._tick)

    def _tick(self) -> None:
        if self._busy:
            return
        self._busy = True
        d = deferToThread(self._work, self.wall.seconds())
        d.addCallback(self._rotated)
        d.addErrback(lambda f: log.failure("Key rotation failed; will retry", f))
        d.addBoth(self._done)

    def republish(self, template) -> None:
        """Rewrite the descriptors from ``template`` (after the job under
        way, if any), then tell the listeners (the publisher)."""
        self._new_template = template
        if self._busy:
            return
        self._busy = True
        template, self._new_template = self._new_template, None
        self.template = template
        d = deferToThread(self.keys.regenerate_descriptors, template, self.wall.seconds())
        d.addCallback(lambda _: [listener() for listener in self.listeners])
        d.addErrback(lambda f: log.error("Could not rewrite the descriptors: {why}",
                                         why=f.getErrorMessage()))
        d.addBoth(self._done)

    def _work(self, now: float) -> tuple[list[Keyset], RotationResult]:
        generated = self.keys.ensure_keys(now, self.template)
        return generated, self.keys.rotate(now)

    def _rotated(self, outcome: tuple[list[Keyset], RotationResult]) -> None:
        generated, result = outcome
        self.rotated([keyset.packet_key.public.keyid for keyset in result.removed])
        for keyset in generated:
            log.info("Generated packet key {keyset}, valid {validity}", keyset=keyset.name,
                     validity=validity(keyset))
        for keyset in result.added:
            log.info("Packet key {keyset} in use, valid {validity}", keyset=keyset.name,
                     validity=validity(keyset))
        for keyset in result.removed:
            log.info("Packet key {keyset} retired", keyset=keyset.name)
        for keyset in result.deleted:
            log.info("Packet key {keyset} expired and deleted", keyset=keyset.name)
        for listener in self.listeners:
            listener()

    def _done(self, _):
        self._busy = False
        if self._new_template is not None:
            self.republish(self._new_template)
        elif self.running:
            self._schedule()
