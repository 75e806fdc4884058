"""Apply ``[Server] LogLevel`` to what twistd writes.

A plugin's ``makeService`` runs before twistd starts logging and cannot
choose twistd's observer, so the level is applied by wrapping the
observers twistd hands to the global log beginner.  Debug lines may name
recipients and routing data (server.md §11); at the default level WARN
they never reach the log file.
"""

from __future__ import annotations

from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
)

#: server.md §14.2 severities to Twisted's levels
SEVERITIES = {
    "TRACE": LogLevel.debug,
    "DEBUG": LogLevel.debug,
    "INFO": LogLevel.info,
    "WARN": LogLevel.warn,
    "ERROR": LogLevel.error,
    "FATAL": LogLevel.critical,
    "NEVER": None,
}


def level_filter(severity: str) -> LogLevelFilterPredicate:
    level = SEVERITIES[severity.upper()]
    predicate = LogLevelFilterPredicate(defaultLogLevel=level or LogLevel.critical)
    if level is None:
        predicate.setLogLevelForNamespace("", LogLevel.critical)
    return predicate


def apply_log_level(severity: str, beginner=globalLogBeginner) -> None:
    """Filter every observer twistd starts logging to by ``severity``.

    Twisted's own lines about starting up and shutting down are INFO; they
    obey the same level.
    """
    predicate = level_filter(severity)
    begin = beginner.beginLoggingTo

    def filtered(observers, *args, **kwargs):
        wrapped = [FilteringLogObserver(observer, [predicate]) for observer in observers]
        return begin(wrapped, *args, **kwargs)

    beginner.beginLoggingTo = filtered
