"""Counters of what the node did, kept across restarts.

Counts are named events (packets received, relayed, delivered, dropped,
rejected by reason...).  They are written atomically to a JSON file every
few minutes and at shutdown, and shown on the optional metrics page;
:class:`StatsReport` appends each period's counts to ``StatsFile``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Optional

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from mixminion.events import Event
from mixminion.mmtp.stats import MMTPStats


class NodeStats(MMTPStats):
    """MMTP's counters plus the pipeline's, loaded from and saved to
    ``path``."""

    def __init__(self, path: Optional[str] = None) -> None:
        super().__init__()
        self.path = path
        if path and os.path.exists(path):
            try:
                with open(path) as f:
                    saved = json.load(f)
            except (OSError, ValueError):
                saved = {}
            for name, value in saved.get("counts", {}).items():
                if isinstance(value, int):
                    self.counts[name] = value

    def save(self) -> None:
        """Write the counters atomically (temp file, fsync, rename)."""
        if not self.path:
            return
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"version": 1, "counts": dict(self.counts)}, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def event_counts(self) -> dict[str, int]:
        """Every event of :class:`~mixminion.events.Event` (0 if never
        counted) and every name counted (``ExitDelivered:SMTP``...)."""
        return {**{event.value: 0 for event in Event}, **self.counts}


class StatsReport:
    """``[Server] LogStats``, ``StatsInterval`` and ``StatsFile``: every
    interval, append to the file what the node counted in it.

    The summary gives counts, never addresses or message data, so it is
    safe to keep; intervals under two hours are flagged insecure in the
    descriptor (server.md §14.10) because short periods let an observer
    match a node's inputs to its outputs.
    """

    log = Logger()

    def __init__(self, stats: "NodeStats", path: str, clock: IReactorTime,
                 enabled: bool, interval: float, wall: Optional[IReactorTime] = None) -> None:
        self.stats, self.path, self.clock = stats, path, clock
        #: dates the summary: ``clock`` counts elapsed time, which a
        #: wall-clock step leaves apart from the calendar
        self.wall = wall if wall is not None else clock
        self.enabled, self.interval = enabled, interval
        self._call: Optional[IDelayedCall] = None
        self._since = 0.0
        self._base: dict[str, int] = {}

    def start(self) -> None:
        """Begin a period now (and schedule its end) if enabled."""
        self.stop()
        if not self.enabled:
            return
        self._since = self.clock.seconds()
        self._base = dict(self.stats.counts)
        self._call = self.clock.callLater(self.interval, self._period_ended)

    def configure(self, enabled: bool, interval: float) -> None:
        """A SIGHUP's new values; a changed setting starts a new period."""
        if (enabled, interval) == (self.enabled, self.interval):
            return
        self.enabled, self.interval = enabled, interval
        self.start()

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def summary(self, now: float) -> str:
        """The period's counts, one ``Event: N`` line each (none: a line saying so)."""
        to_wall = self.wall.seconds() - self.clock.seconds()
        start, end = (time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t + to_wall))
                      for t in (self._since, now))
        lines = [f"Statistics from {start} to {end} (UTC):"]
        for name in sorted(self.stats.counts):
            delta = self.stats.counts[name] - self._base.get(name, 0)
            if delta:
                lines.append(f"  {name}: {delta}")
        if len(lines) == 1:
            lines.append("  (nothing happened)")
        return "\n".join(lines) + "\n"

    def _period_ended(self) -> None:
        self._call = None
        now = self.clock.seconds()
        text = self.summary(now)
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            with os.fdopen(fd, "a") as f:
                f.write(text)
        except OSError as exc:
            self.log.warn("Could not write the statistics summary to {path}: {why}",
                          path=self.path, why=exc.strerror)
        self.start()
