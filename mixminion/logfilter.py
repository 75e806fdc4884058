"""Apply the configured ``LogLevel`` (a node's or an authority's) to what twistd writes.

A plugin's ``makeService`` runs before twistd starts logging and cannot
choose twistd's observer, so the level is applied by wrapping the
observers twistd hands to the global log beginner.  Debug lines may name
recipients and routing data (server.md §11); at the default level WARN
they never reach the log file.
"""

from __future__ import annotations

from typing import Optional

from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    LogLevel,
    PredicateResult,
    globalLogBeginner,
)
from zope.interface import implementer

#: server.md §14.2 severities to Twisted's levels (None: log nothing)
SEVERITIES = {
    "TRACE": LogLevel.debug,
    "DEBUG": LogLevel.debug,
    "INFO": LogLevel.info,
    "WARN": LogLevel.warn,
    "ERROR": LogLevel.error,
    "FATAL": LogLevel.critical,
    "NEVER": None,
}


@implementer(ILogFilterPredicate)
class SeverityFilter:
    """Passes events at or above a severity that can change while the
    node runs (``LogLevel`` on SIGHUP)."""

    def __init__(self, severity: str = "WARN") -> None:
        self.level: Optional[LogLevel] = None
        self.set(severity)

    def set(self, severity: str) -> None:
        self.level = SEVERITIES[severity.upper()]

    def __call__(self, event: dict) -> PredicateResult:
        level = event.get("log_level")
        if self.level is None or level is None or level < self.level:
            return PredicateResult.no
        return PredicateResult.maybe


#: the filter twistd's observers go through once :func:`apply_log_level` ran
LOG_FILTER = SeverityFilter()

#: Twisted's INFO lines that say nothing an operator can use and name an
#: object by its address in memory (``Starting factory <... at 0x7f...>``,
#: one pair per outgoing connection and per upload)
NOISE = frozenset({"Starting factory {factory!r}", "Stopping factory {factory!r}"})


def drop_noise(event: dict) -> PredicateResult:
    """Keeps the :data:`NOISE` lines out of the log."""
    if event.get("log_format") in NOISE:
        return PredicateResult.no
    return PredicateResult.maybe


def apply_log_level(severity: str, beginner=globalLogBeginner,
                    log_filter: SeverityFilter = LOG_FILTER) -> None:
    """Filter every observer twistd starts logging to by ``severity``.

    Twisted's own lines about starting up and shutting down are INFO; they
    obey the same level, and its factories' start and stop lines
    (:data:`NOISE`) never show.
    """
    log_filter.set(severity)
    begin = beginner.beginLoggingTo

    def filtered(observers, *args, **kwargs):
        wrapped = [FilteringLogObserver(observer, [log_filter, drop_noise])
                   for observer in observers]
        return begin(wrapped, *args, **kwargs)

    beginner.beginLoggingTo = filtered


def set_log_level(severity: str, log_filter: SeverityFilter = LOG_FILTER) -> None:
    """Change the level of the running node's log (SIGHUP)."""
    log_filter.set(severity)
