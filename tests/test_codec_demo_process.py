"""The README's main job, run as a user would: the installed command."""

from __future__ import annotations

import shutil
import subprocess
import sys

from twisted.trial import unittest


class CodecDemoCommandTests(unittest.TestCase):
    def _demo(self, *args: str) -> subprocess.CompletedProcess:
        exe = shutil.which("mixminion-codec-demo")
        cmd = [exe] if exe else [sys.executable, "-m", "mixminion.codec_demo"]
        return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=120)

    def test_demo_command_delivers(self) -> None:
        done = self._demo("--servers", "4")
        self.assertEqual(done.returncode, 0, done.stderr)
        out = done.stdout
        self.assertIn("mix3 exits by SMTP to 'alice@example.com'", out)
        self.assertIn("b'Hello from the Type III codec.\\n'", out)
        self.assertIn("the SURB's owner decodes a reply", out)
        self.assertIn("rejects: replay", out)

    def test_bad_arguments_exit_2_with_a_reason(self) -> None:
        done = self._demo("--servers", "x")
        self.assertEqual(done.returncode, 2)
        self.assertIn("invalid int value", done.stderr)
