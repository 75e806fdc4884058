"""The keyring passphrase asked on a real terminal (issue 15, point 1).

Each test runs the real ``mixminion-client`` in a pseudo-terminal with
``pexpect`` (its controlling terminal, as in a person's shell), answers
its prompts as a person would and reads what it says.  No passphrase
comes from the environment here.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pexpect
from twisted.trial import unittest

from mixminion.client import keyring
from mixminion.test.test_client_cli import PASSPHRASE_VAR, Env

#: seconds for one client run (start-up, scrypt, writing the keyring)
RUN_TIMEOUT = 60
SURB = ["generate-surb", "-t", "me@example.org", "-P", "Alpha,Gamma,Beta", "-D", "no"]


class PassphrasePromptTests(unittest.TestCase):
    def setUp(self) -> None:
        self.env = Env(self)
        self.environ = {k: v for k, v in dict(os.environ, **self.env.environ).items()
                        if k != PASSPHRASE_VAR}
        self.keyring = keyring.keyring_path(self.env.user_dir)

    def client(self, *argv: str) -> pexpect.spawn:
        child = pexpect.spawn(sys.executable, ["-m", "mixminion.client.cli", *argv],
                              env=self.environ, timeout=RUN_TIMEOUT, encoding="utf-8")
        self.addCleanup(child.close, force=True)
        return child

    def finished(self, child: pexpect.spawn) -> tuple[int, str]:
        """Its exit status and what it wrote after the last answer."""
        child.expect(pexpect.EOF)
        child.close()
        return child.exitstatus, child.before

    def create(self, passphrase: str, again: str) -> tuple[int, str]:
        child = self.client(*SURB)
        child.expect_exact("New passphrase for your keyring: ")
        child.sendline(passphrase)
        child.expect_exact("Again, to confirm: ")
        child.sendline(again)
        return self.finished(child)

    def unlock(self, passphrase: str) -> tuple[int, str]:
        child = self.client(*SURB)
        child.expect_exact("Passphrase for your keyring: ")
        child.sendline(passphrase)
        return self.finished(child)

    def test_a_new_keyring_with_confirmation(self) -> None:
        status, out = self.create("correct horse", "correct horse")
        self.assertEqual(status, 0, out)
        self.assertIn("BEGIN TYPE III REPLY BLOCK", out)
        self.assertNotIn("correct horse", out, "the passphrase was echoed")
        self.assertTrue(os.path.exists(self.keyring))

    def test_confirmation_that_differs_changes_nothing(self) -> None:
        status, out = self.create("correct horse", "correct hose")
        self.assertEqual(status, 1, out)
        self.assertIn("The two passphrases differ; nothing was changed.", out)
        self.assertNotIn("Traceback", out)
        self.assertFalse(os.path.exists(self.keyring))

    def test_unlock_and_a_wrong_passphrase(self) -> None:
        self.assertEqual(self.create("correct horse", "correct horse")[0], 0)
        with open(self.keyring, "rb") as f:
            before = f.read()
        status, out = self.unlock("correct horse")
        self.assertEqual(status, 0, out)
        self.assertIn("BEGIN TYPE III REPLY BLOCK", out)
        with open(self.keyring, "rb") as f:
            unlocked = f.read()
        status, out = self.unlock("battery staple")
        self.assertEqual(status, 1, out)
        errors = [line for line in out.splitlines() if "[ERROR]" in line]
        self.assertEqual(len(errors), 1, out)
        self.assertIn("passphrase", errors[0])
        self.assertNotIn("Traceback", out)
        with open(self.keyring, "rb") as f:
            self.assertEqual(f.read(), unlocked, "a wrong passphrase overwrote the keyring")
        self.assertNotEqual(before, b"")

    def test_no_terminal_says_how_to_give_one(self) -> None:
        """Without a controlling terminal (a new session, input from
        nowhere): one line naming the other ways, nothing read from stdin."""
        done = subprocess.run([sys.executable, "-m", "mixminion.client.cli", *SURB],
                              env=self.environ, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, start_new_session=True, timeout=RUN_TIMEOUT)
        self.assertEqual(done.returncode, 1, done.stderr)
        self.assertIn("no terminal to ask on: use --passphrase-fd N or set "
                      f"{PASSPHRASE_VAR}", done.stderr)
        self.assertNotIn("Traceback", done.stderr)
        self.assertFalse(os.path.exists(self.keyring))
