"""The node <-> processing child messages: each survives its line, and a
line that is not one is refused with ValueError (the node logs it)."""

from __future__ import annotations

from twisted.trial import unittest

from mixminion.server.childmessages import (
    Batch,
    Drain,
    Failed,
    Idle,
    Keys,
    Paused,
    Ready,
    decode,
    encode,
)


class ChildMessageTests(unittest.TestCase):
    def test_every_message_round_trips_on_one_line(self) -> None:
        for message in (Keys((b"\x30\x82der1", b"der2")), Drain(17), Drain(9, 12.5, 1 << 20),
                        Ready(), Batch(4, {"Relay": 3, "Rejected:replay": 1}), Idle(),
                        Paused("/var/q", 10, 50), Failed("disk I/O error")):
            line = encode(message)
            self.assertEqual(line.count(b"\n"), 1)
            self.assertTrue(line.endswith(b"\n"))
            self.assertEqual(decode(line), message)

    def test_lines_that_are_no_message_are_refused(self) -> None:
        for line in (b"", b"not json", b"[]", b'{"kind": "shutdown"}', b'{"through": 3}',
                     b'{"kind": "drain"}', b'{"kind": "keys", "keys": ["zz"]}',
                     b'{"kind": "idle", "extra": 1}'):
            self.assertRaises(ValueError, decode, line)
