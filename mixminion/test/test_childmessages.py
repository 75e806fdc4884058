"""The node <-> processing child messages: each survives its line, and a
line that is not one is refused with ValueError (the node logs it)."""

from __future__ import annotations

import os

from twisted.trial import unittest

from mixminion.server.childmessages import (
    Batch,
    Drain,
    Failed,
    Idle,
    Keys,
    More,
    Paused,
    Ready,
    decode,
    encode,
)
from mixminion.server.processing_child import Requests


class ChildMessageTests(unittest.TestCase):
    def test_every_message_round_trips_on_one_line(self) -> None:
        for message in (Keys((b"\x30\x82der1", b"der2")), Drain(17), Drain(9, 12.5, 1 << 20),
                        Ready(), Batch(4, {"Relay": 3, "Rejected:replay": 1}), Idle(),
                        Paused("/var/q", 10, 50), Failed("disk I/O error"), More(12)):
            line = encode(message)
            self.assertEqual(line.count(b"\n"), 1)
            self.assertTrue(line.endswith(b"\n"))
            self.assertEqual(decode(line), message)

    def test_lines_that_are_no_message_are_refused(self) -> None:
        for line in (b"", b"not json", b"[]", b'{"kind": "shutdown"}', b'{"through": 3}',
                     b'{"kind": "drain"}', b'{"kind": "keys", "keys": ["zz"]}',
                     b'{"kind": "idle", "extra": 1}'):
            self.assertRaises(ValueError, decode, line)


class RequestsTests(unittest.TestCase):
    """The child's reading of the node's pipe."""

    def setUp(self) -> None:
        read, self.write = os.pipe()
        self.requests = Requests(read)
        self.addCleanup(os.close, read)

    def send(self, *messages) -> None:
        os.write(self.write, b"".join(encode(m) for m in messages))

    def test_more_takes_the_more_messages_at_the_head_only(self) -> None:
        """A More behind new keys waits for the drain to end: packets
        committed after the keys changed are not processed before them."""
        self.assertEqual(self.requests.more(), 0)  # nothing came: no wait
        keys = Keys((b"der",))
        self.send(More(5), More(7), keys, More(9))
        self.assertEqual(self.requests.more(), 7)
        self.assertEqual(self.requests.more(), 0)
        os.close(self.write)
        self.assertEqual(list(self.requests), [keys, More(9)])

    def test_a_line_split_across_reads_is_one_message(self) -> None:
        line = encode(Drain(3))
        os.write(self.write, line[:5])
        self.assertEqual(self.requests.more(), 0)
        os.write(self.write, line[5:] + encode(More(4)))
        os.close(self.write)
        self.assertEqual(list(self.requests), [Drain(3), More(4)])
