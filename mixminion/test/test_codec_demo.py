"""The README's first command: the codec demo must really deliver."""

from __future__ import annotations

import io

from twisted.trial import unittest

from mixminion import codec_demo


class CodecDemoTests(unittest.TestCase):
    def test_demo_delivers_forward_and_reply_and_refuses_replay(self) -> None:
        out = io.StringIO()
        self.assertEqual(codec_demo.main(["--servers", "2", "--message", "hi there\n"], out), 0)
        text = out.getvalue()
        self.assertIn("mix0 relays by SWAP_FWD_HOST to mix1", text)
        self.assertIn("mix1 exits by SMTP to 'alice@example.com'", text)
        self.assertIn("delivered: Plain: {'SUBJECT': 'codec demo'} b'hi there\\n'", text)
        self.assertIn("the SURB's owner decodes a reply: b'A reply nobody can trace.\\n'", text)
        self.assertTrue(text.rstrip().endswith("mix0 rejects: replay"), text)

    def test_too_few_servers_is_a_usage_error(self) -> None:
        with self.assertRaises(SystemExit) as caught:
            codec_demo.main(["--servers", "1"], io.StringIO())
        self.assertEqual(caught.exception.code, 2)
