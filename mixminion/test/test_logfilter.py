"""LogLevel reaches twistd's observers: debug lines (which may name
recipients) stay out of the log at the default WARN."""

from __future__ import annotations

import io
import sys
import warnings

from twisted.logger import Logger, LogBeginner, LogPublisher
from twisted.trial import unittest

from mixminion.logfilter import SeverityFilter, apply_log_level, set_log_level


class LogLevelTests(unittest.TestCase):
    def _emit(self, severity: str, then: str = "") -> list[str]:
        publisher = LogPublisher()
        beginner = LogBeginner(publisher, io.StringIO(), sys, warnings)
        log_filter = SeverityFilter()
        apply_log_level(severity, beginner, log_filter)
        seen: list = []
        beginner.beginLoggingTo([seen.append], redirectStandardIO=False)
        if then:
            set_log_level(then, log_filter)
        log = Logger(observer=publisher)
        log.debug("to {who}", who="alice@example.com")
        log.info("info")
        log.warn("warn")
        log.error("error")
        return [event["log_format"] for event in seen]

    def test_levels(self) -> None:
        self.assertEqual(self._emit("WARN"), ["warn", "error"])
        self.assertEqual(self._emit("debug"), ["to {who}", "info", "warn", "error"])
        self.assertEqual(self._emit("INFO"), ["info", "warn", "error"])
        self.assertEqual(self._emit("NEVER"), [])

    def test_level_changes_while_logging(self) -> None:
        """A SIGHUP's new LogLevel applies to observers already running."""
        self.assertEqual(self._emit("WARN", then="INFO"), ["info", "warn", "error"])
        self.assertEqual(self._emit("DEBUG", then="ERROR"), ["error"])
