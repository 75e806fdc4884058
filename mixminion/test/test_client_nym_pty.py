"""``mixminion-client nym`` run as a person runs it (issue 17): the real
console script, and the keyring passphrase asked on a terminal.

The terminal tests run the client in a pseudo-terminal with ``pexpect``,
as test_client_pty does for reply blocks; the others run the console
script's entry point (:func:`mixminion.client.launch.main`) in a fresh
interpreter and read its exit status and output.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Sequence

import pexpect
from twisted.trial import unittest

from mixminion.client import keyring
from mixminion.test.test_client_cli import PASSPHRASE, PASSPHRASE_VAR
from mixminion.test.test_client_nym import OWNER, nym_env, stored_nym
from mixminion.test.test_client_pty import RUN_TIMEOUT

CREATE = ["nym", "create", "alice", "--to", OWNER, "-D", "no", "--queue"]
_SCRIPT = "from mixminion.client.launch import main; main()"


def in_terminal(test: unittest.TestCase, environ: dict[str, str], argv: Sequence[str],
                answers: Sequence[tuple[str, str]] = ()) -> tuple[int, str]:
    """Run the client in a pseudo-terminal, answer each prompt in turn;
    its exit status and what it wrote after the last answer."""
    child = pexpect.spawn(sys.executable, ["-c", _SCRIPT, *argv], env=environ,
                          timeout=RUN_TIMEOUT, encoding="utf-8")
    test.addCleanup(child.close, force=True)
    for prompt, answer in answers:
        child.expect_exact(prompt)
        child.sendline(answer)
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus, child.before


class NymPassphraseTests(unittest.TestCase):
    def setUp(self) -> None:
        self.env = nym_env(self)
        self.environ = {k: v for k, v in dict(os.environ, **self.env.environ).items()
                        if k != PASSPHRASE_VAR}
        self.keyring = keyring.keyring_path(self.env.user_dir)

    def unlock(self, passphrase: str, *argv: str) -> tuple[int, str]:
        return in_terminal(self, self.environ, argv,
                           [("Passphrase for your keyring: ", passphrase)])

    def test_create_asks_for_a_new_passphrase_then_list_and_a_wrong_one(self) -> None:
        status, out = in_terminal(self, self.environ, CREATE,
                                  [("New passphrase for your keyring: ", PASSPHRASE),
                                   ("Again, to confirm: ", PASSPHRASE)])
        self.assertEqual(status, 0, out)
        self.assertIn("Queued 1 packet(s)", out)
        self.assertNotIn(PASSPHRASE, out, "the passphrase was echoed")
        self.assertEqual(stored_nym(self.env).counter, 1)
        status, out = self.unlock(PASSPHRASE, "nym", "list")
        self.assertEqual(status, 0, out)
        self.assertIn("alice@nym.example.org (nymserver Omega): counter 1", out)
        with open(self.keyring, "rb") as f:
            before = f.read()
        for argv in (["nym", "list"], ["nym", "status", "alice", "-D", "no", "--queue"]):
            status, out = self.unlock("battery staple", *argv)
            self.assertEqual(status, 1, out)
            errors = [line for line in out.splitlines() if line.strip()]
            self.assertEqual(len(errors), 1, out)
            self.assertIn("[ERROR]", errors[0])
            self.assertIn("passphrase", errors[0])
            self.assertNotIn("Traceback", out)
        with open(self.keyring, "rb") as f:
            self.assertEqual(f.read(), before, "a wrong passphrase changed the keyring")
        self.assertEqual(len(self.env.queued()), 1, "a request left with a wrong passphrase")


class ConsoleScriptTests(unittest.TestCase):

    def run_client(self, environ: dict[str, str], *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", _SCRIPT, *argv], env=environ,
                              capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              timeout=RUN_TIMEOUT)

    def test_help_usage_errors_and_a_request(self) -> None:
        env = nym_env(self)
        environ = dict(os.environ, **env.environ)
        done = self.run_client(environ, "nym", "create", "--help")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("usage: mixminion-client nym create", done.stdout)
        for argv in (["nym"], ["nym", "create", "Root", "--to", OWNER], ["nym", "list", "-x"]):
            done = self.run_client(environ, *argv)
            self.assertEqual((done.returncode, done.stdout), (2, ""), done.stderr)
            self.assertEqual(len(done.stderr.strip().splitlines()), 1, done.stderr)
        done = self.run_client(environ, *CREATE)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(len(env.queued()), 1)
        done = self.run_client(environ, "nym", "list")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("alice@nym.example.org", done.stdout)
        wrong = dict(environ, **{PASSPHRASE_VAR: "not it"})
        done = self.run_client(wrong, "nym", "status", "alice", "-D", "no", "--queue")
        self.assertEqual((done.returncode, done.stdout), (1, ""), done.stderr)
        self.assertEqual(len(done.stderr.strip().splitlines()), 1, done.stderr)
        self.assertIn("passphrase", done.stderr)
