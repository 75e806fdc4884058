"""The node's status document and health rules (:mod:`mixminion.server.status`),
on a stand-in node; ``tests/test_health.py`` shows them on a real one."""

from __future__ import annotations

import json
import os
import stat
from types import SimpleNamespace
from typing import Any, Optional

from twisted.internet import task
from twisted.logger import Logger, LogLevel, LogPublisher, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest

import mixminion
from mixminion.logfilter import SeverityFilter
from mixminion.server.diskspace import FreeSpace, Shortage
from mixminion.server.keys import RotationResult
from mixminion.server.keyservice import KeyService
from mixminion.server.publish import Publisher
from mixminion.server.status import (
    MAX_ERRORS,
    NOTICE,
    HealthFacts,
    RecentErrors,
    health_facts,
    health_reasons,
    status_document,
    write_status,
)
from mixminion.test.test_authority import AUTHS, FakeAuthorities, FakeKeys
from mixminion.test.test_authority import NOW as T0

#: the keys of the document, as the contract between the node and
#: ``mixminiond status`` lists them
CONTRACT_KEYS = {"version", "running", "pid", "nickname", "fingerprint", "started", "updated",
                 "listening", "keys", "next_rotation", "publication", "queues", "processing",
                 "health", "last_errors", "pinging"}

MB = 1 << 20


class HealthRuleTests(unittest.TestCase):
    def test_healthy(self) -> None:
        self.assertEqual(health_reasons(HealthFacts()), [])

    def test_one_reason_per_failing_condition(self) -> None:
        cases = {
            "not listening on the MMTP port": HealthFacts(not_listening=1),
            "no packet key is valid now": HealthFacts(key_valid=False),
            "processing not running: the child exited 3 times":
                HealthFacts(processing="the child exited 3 times"),
            "disk space under MinFreeDisk: 10.0 MB free on the disk of /q, floor 100.0 MB":
                HealthFacts(disk=Shortage("/q", 10 * MB, 100 * MB)),
            "delivery by MBOX paused for disk space": HealthFacts(paused=("delivery by MBOX",)),
        }
        for reason, facts in cases.items():
            self.assertEqual(health_reasons(facts), [reason])

    def test_every_failing_condition_is_said(self) -> None:
        facts = HealthFacts(not_listening=2, key_valid=False, processing="stopped",
                            disk=Shortage("/q", 0, MB), paused=("processing", "delivery by SMTP"))
        reasons = health_reasons(facts)
        self.assertEqual(len(reasons), 6)
        self.assertEqual(reasons[0], "not listening on the MMTP ports")
        for reason in reasons:
            self.assertNotIn("\n", reason)


class Keyset(SimpleNamespace):
    """A keyset as the status reads it."""


def fake_node(free: int = 500 * MB, min_free: int = 100 * MB, listening: bool = True,
              keysets: Optional[list] = None, failing: Optional[str] = None,
              running: bool = True, publisher: Any = None) -> SimpleNamespace:
    """Just what :func:`status_document` reads of a MixNode."""
    now = 1_700_000_000
    if keysets is None:
        keysets = [Keyset(name="key_0001", valid_after=now - 100, valid_until=now + 100,
                          published_at=now - 50),
                   Keyset(name="key_0002", valid_after=now + 100, valid_until=now + 200,
                          published_at=None)]
    keys = SimpleNamespace(keysets=keysets, next_event=lambda t: float(now + 100))
    usage = SimpleNamespace(free=free)
    return SimpleNamespace(
        config=SimpleNamespace(server=SimpleNamespace(nickname="fake")),
        identity=SimpleNamespace(public=SimpleNamespace(fingerprint="AB" * 20)),
        started=float(now - 3600), listening=lambda: ["127.0.0.1:48099", "127.0.0.1:48100"],
        keys=keys, publisher=publisher, pipeline_running=running, packet_keys=lambda: [],
        queue_sizes=lambda: {"incoming": 1, "pool": 2, "outgoing": 3},
        deliver_sizes=lambda: {"SMTP": 4},
        processor=SimpleNamespace(failing=failing, disk=SimpleNamespace(paused=False)),
        delivery=SimpleNamespace(paused_modules=[]),
        mmtp_listeners=[SimpleNamespace(port=object() if listening else None)],
        sink=SimpleNamespace(free_space=FreeSpace("/queues", lambda: 0.0, usage=lambda p: usage),
                             min_free_bytes=min_free),
        recent_errors=RecentErrors(),
    )


NOW = 1_700_000_000.0


class StatusDocumentTests(unittest.TestCase):
    def test_contract_keys_and_values(self) -> None:
        doc = status_document(fake_node(), NOW)
        self.assertEqual(set(doc), CONTRACT_KEYS)
        self.assertEqual(doc["version"], mixminion.__version__)
        self.assertIs(doc["running"], True)
        self.assertEqual(doc["pid"], os.getpid())
        self.assertEqual((doc["nickname"], doc["fingerprint"]), ("fake", "AB" * 20))
        self.assertEqual((doc["started"], doc["updated"]), (NOW - 3600, NOW))
        self.assertEqual(doc["listening"], ["127.0.0.1:48099", "127.0.0.1:48100"])
        self.assertEqual(doc["keys"], [{"valid_after": NOW - 100, "valid_until": NOW + 100},
                                       {"valid_after": NOW + 100, "valid_until": NOW + 200}])
        self.assertEqual(doc["next_rotation"], NOW + 100)
        self.assertEqual(doc["publication"], {"authorities": [], "last_attempt": None,
                                              "last_success": NOW - 50, "last_error": None})
        self.assertEqual(doc["queues"], {"incoming": 1, "pool": 2, "outgoing": 3,
                                         "deliver": {"SMTP": 4}})
        self.assertEqual(doc["processing"], {"running": True, "failing": None,
                                             "paused_for_disk": False})
        self.assertEqual(doc["health"], {"ok": True, "reasons": []})
        self.assertEqual(doc["last_errors"], [])
        json.dumps(doc)  # all of it is JSON

    def test_publication_from_the_publisher(self) -> None:
        publisher = SimpleNamespace(authorities=[("http://a.example/", "F" * 40)],
                                    last_attempt=NOW - 10, last_success=None,
                                    last_error="http://a.example/ rejected key_0002: no")
        doc = status_document(fake_node(publisher=publisher, keysets=[]), NOW)
        self.assertEqual(doc["publication"], {
            "authorities": ["http://a.example/"], "last_attempt": NOW - 10,
            "last_success": None, "last_error": "http://a.example/ rejected key_0002: no"})

    def test_unhealthy_node(self) -> None:
        expired = [Keyset(name="key_0001", valid_after=NOW - 200, valid_until=NOW - 100,
                          published_at=None)]
        node = fake_node(free=50 * MB, listening=False, keysets=expired,
                         failing="the processing child exited")
        doc = status_document(node, NOW)
        self.assertEqual(doc["health"], {"ok": False, "reasons": [
            "not listening on the MMTP port", "no packet key is valid now",
            "processing not running: the processing child exited",
            "disk space under MinFreeDisk: 50.0 MB free on the disk of /queues, floor 100.0 MB"]})
        self.assertEqual(doc["processing"]["running"], False)

    def test_stopped_node(self) -> None:
        doc = status_document(fake_node(running=False), NOW, running=False)
        self.assertIs(doc["running"], False)
        self.assertEqual(doc["health"]["reasons"], ["processing not running: stopped"])

    def test_min_free_disk_zero_turns_the_disk_rule_off(self) -> None:
        self.assertIsNone(health_facts(fake_node(free=0, min_free=0), NOW).disk)

    def test_written_atomically_and_private(self) -> None:
        folder = self.mktemp()
        os.makedirs(folder)
        path = os.path.join(folder, "status.json")
        write_status(path, status_document(fake_node(), NOW))
        write_status(path, status_document(fake_node(running=False), NOW + 10, running=False))
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(os.listdir(folder), ["status.json"])
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        self.assertEqual((doc["running"], doc["updated"]), (False, NOW + 10))


class RecentErrorsTests(unittest.TestCase):
    def _log(self, namespace: str = "mixminion.server.node",
             log_filter: Optional[SeverityFilter] = None) -> tuple[Logger, RecentErrors]:
        publisher = LogPublisher()
        errors = RecentErrors(log_filter=log_filter or SeverityFilter("INFO"))
        publisher.addObserver(errors)
        return Logger(namespace=namespace, observer=publisher), errors

    def test_keeps_the_nodes_warnings_and_errors(self) -> None:
        log, errors = self._log()
        log.info("fine")
        log.warn("Refusing a packet: {reason}", reason="incoming queue is full")
        log.error("boom")
        self.assertEqual([(e["level"], e["message"]) for e in errors.items()],
                         [("warn", "Refusing a packet: incoming queue is full"),
                          ("error", "boom")])
        for entry in errors.items():
            self.assertIsInstance(entry["time"], float)

    def test_not_others_nor_notices(self) -> None:
        log, errors = self._log()
        Logger(namespace="twisted.internet.tcp", observer=log.observer).warn("someone else's")
        Logger(namespace="mixminionish", observer=log.observer).warn("not ours either")
        log.warn("Mix node x started", **{NOTICE: True})
        self.assertEqual(errors.items(), [])

    def test_without_traceback(self) -> None:
        log, errors = self._log()
        try:
            raise ValueError("inner detail")
        except ValueError:
            log.failure("Key rotation failed; will retry", Failure())
        [entry] = errors.items()
        self.assertEqual(entry["message"], "Key rotation failed; will retry")

    def test_the_last_ten_oldest_first(self) -> None:
        log, errors = self._log()
        for n in range(MAX_ERRORS + 5):
            log.warn("warning {n}", n=n)
        self.assertEqual([e["message"] for e in errors.items()],
                         [f"warning {n}" for n in range(5, MAX_ERRORS + 5)])

    def test_what_log_level_keeps_out_of_the_log_stays_out(self) -> None:
        log, errors = self._log(log_filter=SeverityFilter("ERROR"))
        log.warn("not in the log")
        log.error("in the log")
        self.assertEqual([e["message"] for e in errors.items()], ["in the log"])
        self.assertEqual(LogLevel.error.name, errors.items()[0]["level"])


class PublicationFactsTests(unittest.TestCase):
    """What the publisher remembers for the status: its last attempt,
    success and error, and a word to the node after each round."""

    def test_attempt_error_then_success(self) -> None:
        clock = task.Clock()
        clock.advance(T0)
        authorities = FakeAuthorities({AUTHS[0][0]: "1", AUTHS[1][0]: "0", AUTHS[2][0]: "error"})
        publisher = Publisher(FakeKeys(), AUTHS, clock, authorities, rng=lambda: 0.0)
        told: list[float] = []
        publisher.listeners.append(lambda: told.append(clock.seconds()))
        publisher.startService()
        self.addCleanup(publisher.stopService)
        self.assertEqual((publisher.last_attempt, publisher.last_success), (T0, None))
        self.assertEqual(publisher.last_error,
                         f"upload of key_0001 to {AUTHS[2][0]} failed: connection refused")
        self.assertEqual(told, [T0])
        authorities.answers[AUTHS[2][0]] = "1"
        clock.advance(30)
        self.assertEqual((publisher.last_attempt, publisher.last_success, publisher.last_error),
                         (T0 + 30, T0 + 30, None))
        self.assertEqual(told, [T0, T0 + 30])
        doc = status_document(fake_node(publisher=publisher, keysets=[]), T0 + 31)
        self.assertEqual(doc["publication"]["authorities"], [url for url, _ in AUTHS])


class KeyLifecycleLogTests(unittest.TestCase):
    """Key generation and rotation are INFO lines naming the keysets and
    their validity, never an object's repr; the node hears of each run."""

    def test_lines(self) -> None:
        def keyset(number: int, after: int, until: int) -> Any:
            return SimpleNamespace(name=f"key_{number:04d}", valid_after=after, valid_until=until,
                                   packet_key=SimpleNamespace(
                                       public=SimpleNamespace(keyid=bytes([number]) * 20)))

        day = 86400
        new = keyset(3, 20 * day, 30 * day)
        live = keyset(2, 10 * day, 20 * day)
        old = keyset(1, 0, 10 * day)
        result = RotationResult(added=(live,), removed=(old,), deleted=(old,))
        keys = SimpleNamespace(ensure_keys=lambda now, template: [new],
                               rotate=lambda now: result)
        retired: list = []
        service = KeyService(keys, retired.append, None, task.Clock())
        events: list = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        service._rotated(service._work(10 * day))
        lines = [formatEvent(e) for e in events if e.get("log_namespace", "").startswith(
            "mixminion.server.keyservice")]
        self.assertEqual(lines, [
            "Generated packet key key_0003, valid from 1970-01-21 00:00:00 to "
            "1970-01-31 00:00:00 UTC",
            "Packet key key_0002 in use, valid from 1970-01-11 00:00:00 to "
            "1970-01-21 00:00:00 UTC",
            "Packet key key_0001 retired",
            "Packet key key_0001 expired and deleted"])
        self.assertTrue(all(e["log_level"] == LogLevel.info for e in events
                            if e.get("log_namespace") == "mixminion.server.keyservice"))
        self.assertEqual(retired, [[bytes([1]) * 20]])
