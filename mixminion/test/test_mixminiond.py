"""``mixminiond`` without a node: its arguments, what it prints, how it
finds (or refuses to trust) a pid file, and ``keys`` on a key store made
here.  The commands against a real ``twistd`` node are in
``tests/test_mixminiond.py``."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import time
from types import SimpleNamespace
from typing import Optional
from unittest import mock

from twisted.internet import task
from twisted.trial import unittest

from mixminion.server import control, mixminiond
from mixminion.server.config import load_config
from mixminion.server.control import EXIT_FAILED, EXIT_NOT_RUNNING, EXIT_OK, EXIT_USAGE, NodeProcess
from mixminion.server.keys import KeyStore
from mixminion.server.pidfile import PidFile
from mixminion.server.publish import Publisher
from mixminion.signals import SignalService
from mixminion.server.statusview import duration, judge_status, key_state, keys_lines, relative
from mixminion.test.test_authority import AUTHS, FakeAuthorities, FakeKeys
from mixminion.test.test_authority import NOW as KEYS_NOW
from mixminion.test.test_keys import KeyFactory, make_template
from mixminion.testing.daemon import node_config

NOW = 1_750_000_000.0
DAY = 86400
FINGERPRINT = "0123456789ABCDEF0123456789ABCDEF01234567"


def document(**changes) -> dict:
    """A status document as the node writes it (contract fields)."""
    doc = {
        "version": "0.1.0", "running": True, "pid": 4242, "nickname": "quince",
        "fingerprint": FINGERPRINT, "started": NOW - 3 * 3600 - 120, "updated": NOW - 4,
        "listening": ["127.0.0.1:48099", "127.0.0.1:9100"],
        "keys": [{"valid_after": NOW - 2 * DAY, "valid_until": NOW + 5 * DAY},
                 {"valid_after": NOW + 5 * DAY, "valid_until": NOW + 35 * DAY}],
        "next_rotation": NOW + 5 * DAY,
        "publication": {"authorities": ["http://a.example/"], "last_attempt": NOW - 60,
                        "last_success": NOW - 59, "last_error": None},
        "queues": {"incoming": 0, "pool": 3, "outgoing": 1, "deliver": {"SMTP": 2}},
        "processing": {"running": True, "failing": None, "paused_for_disk": False},
        "health": {"ok": True, "reasons": []},
        "last_errors": [],
    }
    doc.update(changes)
    return doc


RUNNING = NodeProcess("/base/pid", 4242, True)
STOPPED = NodeProcess("/base/pid", None, False)


def run(*argv: str) -> tuple[int, str, str]:
    """``mixminiond ARGV`` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = mixminiond.main(list(argv))
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else 2
    return code, out.getvalue(), err.getvalue()


class ArgumentTests(unittest.TestCase):
    def test_every_command_needs_a_configuration(self) -> None:
        for command in ("check", "fingerprint", "status", "reload", "stop", "republish", "keys"):
            code, _out, err = run(command)
            self.assertEqual(code, 2, command)
            self.assertIn("-c/--config", err)

    def test_options(self) -> None:
        args = mixminiond.parser().parse_args(["stop", "-c", "f", "--timeout", "2.5"])
        self.assertEqual((args.config, args.timeout), ("f", 2.5))
        self.assertEqual(mixminiond.parser().parse_args(["reload", "-c", "f"]).timeout,
                         mixminiond.RELOAD_TIMEOUT)
        self.assertTrue(mixminiond.parser().parse_args(["status", "-c", "f", "--json"]).json)
        self.assertTrue(mixminiond.parser().parse_args(
            ["keys", "-c", "f", "--delete-expired"]).delete_expired)
        self.assertEqual(run("status", "-c", "f", "--timeout", "1")[0], 2)
        self.assertEqual(run("frobnicate", "-c", "f")[0], 2)

    def test_a_missing_configuration_is_one_line(self) -> None:
        for command in ("fingerprint", "status", "reload", "stop", "republish", "keys"):
            code, out, err = run(command, "-c", "/nonexistent/mixminiond.conf")
            self.assertEqual(code, EXIT_USAGE, command)
            self.assertEqual(out, "")
            self.assertEqual(len(err.splitlines()), 1, err)
            self.assertIn("/nonexistent/mixminiond.conf", err)
            self.assertIn("cannot read the file", err)

    def test_an_invalid_configuration_is_one_line(self) -> None:
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("[Server]\nNickname: x\nBogus: 1\n")
        code, _out, err = run("status", "-c", path)
        self.assertEqual(code, EXIT_USAGE)
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertTrue(err.startswith("mixminiond: "), err)
        self.assertNotIn("Traceback", err)


class FormatTests(unittest.TestCase):
    def test_duration(self) -> None:
        self.assertEqual(duration(0), "0 s")
        self.assertEqual(duration(59.6), "1 min")
        self.assertEqual(duration(90), "1 min 30 s")
        self.assertEqual(duration(3600), "1 h")
        self.assertEqual(duration(3 * 3600 + 120 + 7), "3 h 2 min")
        self.assertEqual(duration(DAY + 60), "1 d")
        self.assertEqual(duration(29 * DAY + 12 * 3600), "29 d 12 h")

    def test_relative(self) -> None:
        self.assertEqual(relative(NOW + 3600, NOW), "2025-06-15 16:06:40 UTC (in 1 h)")
        self.assertEqual(relative(NOW - 5, NOW), "2025-06-15 15:06:35 UTC (5 s ago)")
        self.assertEqual(relative(None, NOW), "unknown")

    def test_key_state(self) -> None:
        self.assertEqual(key_state(NOW + 1, NOW + DAY, NOW), "future")
        self.assertEqual(key_state(NOW - DAY, NOW, NOW), "live")
        self.assertEqual(key_state(NOW - DAY, NOW - 1, NOW), "overlap")
        self.assertEqual(key_state(NOW - DAY, NOW - 1, NOW, overlap=10), "overlap")
        self.assertEqual(key_state(NOW - DAY, NOW - 11, NOW, overlap=10), "expired")


class StatusTests(unittest.TestCase):
    def facts(self, lines: list[str]) -> dict[str, str]:
        return dict(line.split(": ", 1) for line in lines[1:] if not line.startswith("  "))

    def test_running_and_healthy(self) -> None:
        lines, code = judge_status(document(), RUNNING, NOW)
        self.assertEqual(code, EXIT_OK)
        self.assertEqual(lines[0], "running (pid 4242), healthy")
        facts = self.facts(lines)
        self.assertEqual(facts["nickname"], "quince")
        self.assertEqual(facts["fingerprint"], FINGERPRINT)
        self.assertEqual(facts["started"], "2025-06-15 12:04:40 UTC (up 3 h 2 min)")
        self.assertEqual(facts["listening"], "127.0.0.1:48099, 127.0.0.1:9100")
        self.assertEqual(facts["keys"], "2025-06-13 15:06:40 UTC to 2025-06-20 15:06:40 UTC (live); "
                                        "2025-06-20 15:06:40 UTC to 2025-07-20 15:06:40 UTC (future)")
        self.assertEqual(facts["next key event"], "2025-06-20 15:06:40 UTC (in 5 d)")
        self.assertIn("to http://a.example/; last success 2025-06-15 15:05:41 UTC",
                      facts["publication"])
        self.assertNotIn("last error", facts["publication"])
        self.assertEqual(facts["queues"], "incoming 0, pool 3, outgoing 1, deliver/SMTP 2")
        self.assertEqual(facts["processing"], "running")
        self.assertEqual(facts["last errors"], "none")
        self.assertEqual(facts["status written"], "2025-06-15 15:06:36 UTC (4 s ago)")
        self.assertEqual(len(facts), len(lines) - 1, "one fact a line")

    def test_running_and_unhealthy(self) -> None:
        doc = document(health={"ok": False, "reasons": ["no packet key is valid now",
                                                        "processing not running: crashed"]},
                       processing={"running": False, "failing": "crashed",
                                   "paused_for_disk": False},
                       publication={"authorities": ["http://a/"], "last_attempt": NOW - 9,
                                    "last_success": None, "last_error": "a rejected key_0001"},
                       last_errors=[{"time": NOW - 9, "level": "warn", "message": "oops"}])
        lines, code = judge_status(doc, RUNNING, NOW)
        self.assertEqual(code, EXIT_FAILED)
        self.assertEqual(lines[0], "running (pid 4242), unhealthy: no packet key is valid now; "
                                   "processing not running: crashed")
        facts = self.facts(lines)
        self.assertEqual(facts["processing"], "failing: crashed")
        self.assertTrue(facts["publication"].endswith("last error: a rejected key_0001"),
                        facts["publication"])
        self.assertIn("last success unknown", facts["publication"])
        self.assertEqual(facts["last errors"], "1")
        self.assertIn("  2025-06-15 15:06:31 UTC warn: oops", lines)

    def test_a_stale_status_is_unhealthy(self) -> None:
        lines, code = judge_status(document(updated=NOW - 600), RUNNING, NOW)
        self.assertEqual(code, EXIT_FAILED)
        self.assertEqual(lines[0], "running (pid 4242), unhealthy: status not updated for "
                                   "10 min (is the node stuck?)")

    def test_running_without_a_status_of_its_own(self) -> None:
        for doc in (None, document(pid=17)):
            lines, code = judge_status(doc, RUNNING, NOW, "/w/status.json")
            self.assertEqual(code, EXIT_FAILED)
            self.assertEqual(lines, ["running (pid 4242); no status written by this process yet "
                                     "(/w/status.json)"])

    def test_not_running(self) -> None:
        lines, code = judge_status(document(running=False), STOPPED, NOW)
        self.assertEqual(code, EXIT_NOT_RUNNING)
        self.assertEqual(lines[0], "not running; last status written 2025-06-15 15:06:36 UTC "
                                   "(4 s ago)")
        self.assertEqual(self.facts(lines)["started"], "2025-06-15 12:04:40 UTC")
        lines, code = judge_status(None, NodeProcess("/b/pid", 99, False), NOW, "/w/status.json")
        self.assertEqual(code, EXIT_NOT_RUNNING)
        self.assertEqual(lines, ["not running (the pid file /b/pid names process 99, which is "
                                 "not a running mixminion node); no status written "
                                 "(/w/status.json)"])

    def test_a_partial_document_does_not_break_the_view(self) -> None:
        lines, code = judge_status({"pid": 4242, "updated": NOW}, RUNNING, NOW)
        self.assertEqual(code, EXIT_FAILED)
        self.assertEqual(lines[0], "running (pid 4242), unhealthy: no reason given")
        self.assertIn("keys: none", lines)


class PidFileTests(unittest.TestCase):
    """A pid is trusted only if the process is alive, looks like a node and
    holds the pid file's lock."""

    def setUp(self) -> None:
        self.path = os.path.join(os.path.abspath(self.mktemp()), "pid")

    def write(self, pid: int) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "w") as f:
            f.write(f"{pid}\n")

    def locked(self, pid: int) -> None:
        lock = PidFile(self.path)
        self.addCleanup(lock.release)
        lock.write(pid)

    def stranger(self) -> int:
        proc = subprocess.Popen(["sleep", "30"])
        self.addCleanup(proc.wait)
        self.addCleanup(proc.kill)
        return proc.pid

    def test_no_file(self) -> None:
        self.assertEqual(control.find_node(self.path), NodeProcess(self.path, None, False))
        with self.assertRaises(control.OperatorError) as caught:
            control.running_node(self.path)
        self.assertEqual(caught.exception.code, EXIT_NOT_RUNNING)

    def test_locked_by_a_live_node(self) -> None:
        self.locked(os.getpid())
        with mock.patch.object(control, "looks_like_node", lambda pid: True):
            self.assertEqual(control.running_node(self.path), os.getpid())

    def test_not_locked(self) -> None:
        """A pid file left by a crash: the process may be anything now."""
        self.write(os.getpid())
        with mock.patch.object(control, "looks_like_node", lambda pid: True):
            self.assertFalse(control.find_node(self.path).running)

    def test_a_stranger_holding_the_number(self) -> None:
        pid = self.stranger()
        self.locked(pid)
        self.assertFalse(control.looks_like_node(pid))
        node = control.find_node(self.path)
        self.assertEqual((node.pid, node.running), (pid, False))
        self.assertIn(f"names process {pid}, which is not a running mixminion node",
                      node.describe())

    def test_an_ended_process(self) -> None:
        """Gone, or a zombie (ended, not yet reaped by its parent)."""
        proc = subprocess.Popen(["true"])
        control.wait_for(lambda: not control.pid_alive(proc.pid), 10)
        self.locked(proc.pid)
        with mock.patch.object(control, "looks_like_node", lambda pid: True):
            self.assertFalse(control.find_node(self.path).running)
        proc.wait()
        with mock.patch.object(control, "looks_like_node", lambda pid: True):
            self.assertFalse(control.find_node(self.path).running)

    def test_garbage(self) -> None:
        os.makedirs(os.path.dirname(self.path))
        with open(self.path, "w") as f:
            f.write("twelve\n")
        self.assertEqual(control.find_node(self.path), NodeProcess(self.path, None, False))


class ConfiguredTestCase(unittest.TestCase):
    """A configuration file (and its folders) of a node that never ran."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.base = os.path.join(self.dir, "base")
        self.conf = os.path.join(self.dir, "node.conf")
        self.write()

    def write(self, server: str = "", extra: str = "") -> None:
        with open(self.conf, "w") as f:
            f.write(node_config(self.base, 48099, server=server, extra=extra))
        self.config = load_config(self.conf)

    def store(self) -> KeyStore:
        server = self.config.server
        return KeyStore(server.key_dir, server.hashlog_dir, lifetime=server.public_key_lifetime,
                        overlap=server.public_key_overlap, generate_key=KeyFactory())

    def status(self, doc: Optional[dict]) -> None:
        os.makedirs(self.config.server.work_dir, exist_ok=True)
        with open(control.status_path(self.config.server.work_dir), "w") as f:
            f.write(json.dumps(doc))


class StatusCommandTests(ConfiguredTestCase):
    def test_never_ran(self) -> None:
        code, out, err = run("status", "-c", self.conf)
        self.assertEqual(code, EXIT_NOT_RUNNING)
        self.assertEqual(out.splitlines(), [
            f"not running (no process id in {self.base}/pid); no status written "
            f"({self.base}/work/status.json)"])
        code, out, err = run("status", "-c", self.conf, "--json")
        self.assertEqual((code, out), (EXIT_NOT_RUNNING, ""))
        self.assertIn("not running", err)

    def test_json_says_whether_it_runs_now(self) -> None:
        """A node killed without a clean stop left ``"running": true``."""
        self.status(document(updated=time.time() - 30))
        code, out, _err = run("status", "-c", self.conf, "--json")
        self.assertEqual(code, EXIT_NOT_RUNNING)
        self.assertEqual(json.loads(out), {**document(updated=json.loads(out)["updated"]),
                                           "running": False})

    def test_signals_need_a_running_node(self) -> None:
        for command in ("stop", "reload"):
            code, out, err = run(command, "-c", self.conf)
            self.assertEqual((code, out), (EXIT_NOT_RUNNING, ""), command)
            self.assertEqual(err, f"mixminiond: not running (no process id in {self.base}/pid)\n")

    def test_republish_needs_authorities(self) -> None:
        code, out, err = run("republish", "-c", self.conf)
        self.assertEqual((code, out), (EXIT_FAILED, ""))
        self.assertEqual(err, "mixminiond: this node publishes no descriptor ([DirectoryServers] "
                              "needs Publish: yes and an Authority line)\n")


class KeyCommandTests(ConfiguredTestCase):
    def test_fingerprint_without_a_key(self) -> None:
        code, out, err = run("fingerprint", "-c", self.conf)
        self.assertEqual((code, out), (EXIT_FAILED, ""))
        self.assertEqual(err, f"mixminiond: no identity key at {self.base}/keys/identity.key "
                              "(the node creates it at its first start)\n")
        self.assertEqual(run("keys", "-c", self.conf)[0], EXIT_FAILED)

    def make_keys(self) -> KeyStore:
        """Keysets from 200 days ago (expired) and from now (live, future)."""
        store = self.store()
        past, now = time.time() - 200 * DAY, time.time()
        store.load(past)
        store.ensure_keys(past, make_template())
        store.ensure_keys(now, make_template())
        return store

    def test_fingerprint_and_listing(self) -> None:
        store = self.make_keys()
        code, out, err = run("fingerprint", "-c", self.conf)
        self.assertEqual((code, out, err), (EXIT_OK, store.identity.public.fingerprint + "\n", ""))
        code, out, err = run("keys", "-c", self.conf)
        self.assertEqual((code, err), (EXIT_OK, ""))
        lines = out.splitlines()
        self.assertEqual(lines[0], f"identity: {store.identity.public.fingerprint}")
        states = [line.split("  ")[2].split(" ")[0] for line in lines[1:]]
        self.assertIn("expired", states)
        self.assertIn("live", states)
        self.assertEqual(len(lines) - 1, len(store.keysets))
        self.assertTrue(all("not published" in line for line in lines[1:]))
        # Listing changes nothing.
        self.assertEqual(len(self.store().inspect()), 0)

    def test_delete_expired(self) -> None:
        store = self.make_keys()
        expired = [k.name for k in store.keysets if k.is_dead(time.time(), store.overlap)]
        kept = [k.name for k in store.keysets if k.name not in expired]
        self.assertTrue(expired and kept)
        code, out, err = run("keys", "-c", self.conf, "--delete-expired")
        self.assertEqual((code, err), (EXIT_OK, ""))
        self.assertEqual([line.split()[1] for line in out.splitlines() if line.startswith("deleted")],
                         expired)
        left = self.store()
        left.inspect()
        self.assertEqual([k.name for k in left.keysets], kept)
        self.assertFalse(os.path.exists(self.config.server.pid_file))
        code, out, _err = run("keys", "-c", self.conf, "--delete-expired")
        self.assertEqual(code, EXIT_OK)
        self.assertEqual(out.splitlines()[-1], "no expired keysets to delete")

    def test_delete_expired_while_the_node_runs(self) -> None:
        store = self.make_keys()
        lock = PidFile(self.config.server.pid_file)
        self.addCleanup(lock.release)
        code, out, err = run("keys", "-c", self.conf, "--delete-expired")
        self.assertEqual((code, out), (EXIT_FAILED, ""))
        self.assertEqual(err, "mixminiond: the node is running: it deletes expired keysets "
                              "itself, at each key rotation; stop it to delete them now\n")
        left = self.store()
        left.inspect()
        self.assertEqual(len(left.keysets), len(store.keysets))

    def test_unusable_keysets_are_listed(self) -> None:
        store = self.make_keys()
        victim = store.keysets[-1]
        os.unlink(victim.key_path)
        code, out, _err = run("keys", "-c", self.conf)
        self.assertEqual(code, EXIT_OK)
        [line] = [ln for ln in out.splitlines() if ln.startswith(victim.name)]
        self.assertIn("unusable: ", line)
        self.assertTrue(os.path.isdir(victim.directory), "listing deletes nothing")


class KeysViewTests(unittest.TestCase):
    def test_lines(self) -> None:
        live = SimpleNamespace(name="key_0001", valid_after=NOW - DAY, valid_until=NOW + DAY,
                               published=True, published_at=NOW - DAY)
        old = SimpleNamespace(name="key_0002", valid_after=NOW - 3 * DAY, valid_until=NOW - 3600,
                              published=False, published_at=None)
        lines = keys_lines(FINGERPRINT, [old, live], {"key_0003": "no mix.key"}, NOW, DAY)
        self.assertEqual(lines, [
            f"identity: {FINGERPRINT}",
            "key_0002  2025-06-12 15:06:40 UTC to 2025-06-15 14:06:40 UTC  overlap (descriptor "
            "expired; the key decrypts until 2025-06-16 14:06:40 UTC)  not published",
            "key_0001  2025-06-14 15:06:40 UTC to 2025-06-16 15:06:40 UTC  live  published "
            "2025-06-14 15:06:40 UTC",
            "key_0003  unusable: no mix.key (the node deletes it at its next start)",
        ])
        self.assertEqual(keys_lines(FINGERPRINT, [], {}, NOW, DAY)[1:],
                         ["no keysets (the node creates them at start)"])


class RepublishTests(unittest.TestCase):
    """What the node does on SIGUSR2."""

    def test_every_descriptor_again_to_every_authority(self) -> None:
        class Keys(FakeKeys):
            @property
            def keysets(self):
                return self.sets

        keys, clock = Keys(count=2), task.Clock()
        clock.advance(KEYS_NOW)
        uploads = FakeAuthorities({url: "1" for url, _ in AUTHS})
        publisher = Publisher(keys, AUTHS, clock, uploads, rng=lambda: 0.0)
        publisher.startService()
        self.addCleanup(publisher.stopService)
        self.assertEqual(len(uploads.calls), 2 * len(AUTHS))
        publisher.kick("SIGHUP")
        self.assertEqual(len(uploads.calls), 2 * len(AUTHS), "published: nothing to do")
        publisher.republish()
        self.assertEqual(len(uploads.calls), 4 * len(AUTHS))
        self.assertEqual([number for number, _ in keys.marked], [1, 2, 1, 2])
        publisher.kick("SIGHUP")
        self.assertEqual(len(uploads.calls), 4 * len(AUTHS), "once, not every round after")

    def test_signal_service(self) -> None:
        """The handler is in from privilegedStartService (SIGUSR2 would end
        the process otherwise) and out again at stop."""
        called: list = []
        reactor = SimpleNamespace(callFromThread=called.append)
        before = signal.getsignal(signal.SIGUSR2)
        service = SignalService(signal.SIGUSR2, "republish", reactor)
        service.privilegedStartService()
        service.startService()
        os.kill(os.getpid(), signal.SIGUSR2)
        control.wait_for(lambda: called, 5, interval=0.01)
        self.assertEqual(called, ["republish"])
        service.stopService()
        self.assertEqual(signal.getsignal(signal.SIGUSR2), before)
