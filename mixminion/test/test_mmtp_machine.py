"""Tests of the sans-IO MMTP machines (spec: mmtp.md §6, §7, §8, §11).

Expected bytes are built here independently, from the spec's hex and
``hashlib``, never from ``mixminion.mmtp.frames``.  Whole conversations are
run by pumping an initiator and a responder into each other, as h11's tests
do, with a small "application" on the responder that stores and acks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from mixminion.mmtp import frames
from mixminion.mmtp.machine import (
    NEED_DATA,
    Acknowledged,
    InitiatorMachine,
    JunkReceived,
    LocalProtocolError,
    PacketReceived,
    RemoteProtocolError,
    ResponderMachine,
    VersionAccepted,
    VersionAgreed,
)

# -- the spec's bytes, written out independently ----------------------------

VERSION_LINE = bytes.fromhex("4D 4D 54 50 20 30 2E 33 0D 0A")  # MMTP 0.3\r\n
SEND = bytes.fromhex("53 45 4E 44 0D 0A")
JUNK = bytes.fromhex("4A 55 4E 4B 0D 0A")
RECEIVED = bytes.fromhex("52 45 43 45 49 56 45 44 0D 0A")
REJECTED = bytes.fromhex("52 45 4A 45 43 54 45 44 0D 0A")
PACKET_LEN = 32768
FRAME_LEN = 32794
ACK_LEN = 30


def unit(seed: int) -> bytes:
    """A deterministic 32768-byte packet or junk block."""
    return random.Random(seed).randbytes(PACKET_LEN)


def ref_frame(junk: bool, data: bytes) -> bytes:
    if junk:
        return JUNK + data + hashlib.sha1(data + b"JUNK").digest()
    return SEND + data + hashlib.sha1(data + b"SEND").digest()


def ref_ack(junk: bool, data: bytes, accepted: bool) -> bytes:
    if not accepted:
        return REJECTED + hashlib.sha1(data + b"REJECTED").digest()
    suffix = b"RECEIVED JUNK" if junk else b"RECEIVED"
    return RECEIVED + hashlib.sha1(data + suffix).digest()


def drain(machine: ResponderMachine | InitiatorMachine[Any]) -> list[object]:
    events: list[object] = []
    while (event := machine.next_event()) is not NEED_DATA:
        events.append(event)
    return events


def cut(data: bytes, positions: Iterable[int]) -> list[bytes]:
    """``data`` split at the given offsets (chunks never empty)."""
    points = sorted({p for p in positions if 0 < p < len(data)})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:]) if b > a]


def whole(data: bytes) -> Iterator[bytes]:
    if data:
        yield data


def bytewise(data: bytes) -> Iterator[bytes]:
    for i in range(len(data)):
        yield data[i:i + 1]


def random_chunks(seed: int, largest: int = 50000) -> Callable[[bytes], Iterator[bytes]]:
    rng = random.Random(seed)

    def chunker(data: bytes) -> Iterator[bytes]:
        at = 0
        while at < len(data):
            n = rng.randint(1, largest)
            yield data[at:at + n]
            at += n
    return chunker


def accepted_responder() -> ResponderMachine:
    responder = ResponderMachine()
    responder.receive_data(VERSION_LINE)
    assert responder.next_event() == VersionAccepted("0.3")
    assert responder.data_to_send() == VERSION_LINE
    return responder


def agreed_initiator(writeahead: int = 6) -> InitiatorMachine[int]:
    initiator: InitiatorMachine[int] = InitiatorMachine(writeahead=writeahead)
    assert initiator.start() == VERSION_LINE
    initiator.receive_data(VERSION_LINE)
    assert initiator.next_event() == VersionAgreed("0.3")
    return initiator


# -- a whole conversation ----------------------------------------------------


@dataclasses.dataclass
class Outcome:
    initiator_events: list[object]
    responder_events: list[object]
    responder_wire: list[bytes]
    initiator_wire: list[bytes]
    max_pending: int


def converse(items: Sequence[tuple[bool, bytes]], *, writeahead: int = 6,
             to_responder: Callable[[bytes], Iterable[bytes]] = whole,
             to_initiator: Callable[[bytes], Iterable[bytes]] = whole,
             reject: Callable[[int], bool] = lambda seq: False,
             ack_seed: Optional[int] = None) -> Outcome:
    """Pump ``items`` ((junk?, data) pairs) from an initiator to a responder.

    The responder's application acks every frame it has seen; with
    ``ack_seed`` it acks a random subset in random order each round, so acks
    are decided out of order.  SENDs whose seq satisfies ``reject`` are
    rejected.
    """
    initiator: InitiatorMachine[int] = InitiatorMachine(writeahead=writeahead)
    responder = ResponderMachine()
    for index, (junk, data) in enumerate(items):
        (initiator.queue_junk if junk else initiator.queue_packet)(data, index)
    rng = random.Random(ack_seed)
    out = Outcome([], [], [], [], 0)
    awaiting: list[int] = []
    kinds: dict[int, bool] = {}

    def feed_responder(data: bytes) -> None:
        out.initiator_wire.append(data)
        for piece in to_responder(data):
            responder.receive_data(piece)
            for event in drain(responder):
                out.responder_events.append(event)
                if isinstance(event, (PacketReceived, JunkReceived)):
                    awaiting.append(event.seq)
                    kinds[event.seq] = isinstance(event, JunkReceived)

    def feed_initiator(data: bytes) -> None:
        out.responder_wire.append(data)
        for piece in to_initiator(data):
            initiator.receive_data(piece)
            out.initiator_events.extend(drain(initiator))

    def application_acks() -> None:
        if not awaiting:
            return
        if ack_seed is None:
            batch = awaiting[:]
        else:
            rng.shuffle(awaiting)
            batch = awaiting[:rng.randint(1, len(awaiting))]
        for seq in batch:
            awaiting.remove(seq)
            if not kinds[seq] and reject(seq):
                responder.reject(seq)
            else:
                responder.accept(seq)

    feed_responder(initiator.start())
    for _ in range(10 * len(items) + 10):
        feed_initiator(responder.data_to_send())
        if initiator.finished:
            break
        feed_responder(initiator.data_to_send())
        out.max_pending = max(out.max_pending, initiator.pending)
        application_acks()
    else:
        raise AssertionError("conversation made no progress")
    assert responder.pending_acks == 0
    assert initiator.outstanding() == []
    return out


def mixed(count: int, junk_every: int = 3, seed: int = 0) -> list[tuple[bool, bytes]]:
    return [(i % junk_every == junk_every - 1, unit(seed * 100000 + i)) for i in range(count)]


class ConversationTests(unittest.TestCase):
    def check(self, items: Sequence[tuple[bool, bytes]], outcome: Outcome,
              reject: Callable[[int], bool] = lambda seq: False,
              writeahead: int = 6) -> None:
        accepted = [junk or not reject(i) for i, (junk, _) in enumerate(items)]
        # Responder saw every frame in order, with the right payload.
        self.assertEqual(outcome.responder_events[0], VersionAccepted("0.3"))
        expected_rx: list[object] = [
            JunkReceived(i) if junk else PacketReceived(i, data)
            for i, (junk, data) in enumerate(items)]
        self.assertEqual(outcome.responder_events[1:], expected_rx)
        # The initiator heard one ack per item, in order.
        self.assertEqual(outcome.initiator_events,
                         [VersionAgreed("0.3")]
                         + [Acknowledged(i, ok) for i, ok in enumerate(accepted)])
        # Byte-exact wire in both directions, acks in frame order.
        self.assertEqual(b"".join(outcome.initiator_wire),
                         VERSION_LINE + b"".join(ref_frame(j, d) for j, d in items))
        self.assertEqual(b"".join(outcome.responder_wire), VERSION_LINE + b"".join(
            ref_ack(j, d, ok) for (j, d), ok in zip(items, accepted)))
        self.assertLessEqual(outcome.max_pending, writeahead)

    def test_no_packets_finishes_at_once(self) -> None:
        outcome = converse([])
        self.assertEqual(outcome.initiator_events, [VersionAgreed("0.3")])
        self.assertEqual(b"".join(outcome.initiator_wire), VERSION_LINE)

    def test_counts(self) -> None:
        for count in (1, 6, 7, 100):
            items = mixed(count, seed=count)
            self.check(items, converse(items))

    def test_out_of_order_application_acks(self) -> None:
        for count, seed in ((6, 1), (7, 2), (100, 3)):
            items = mixed(count, seed=seed)
            self.check(items, converse(items, ack_seed=seed))

    def test_rejected(self) -> None:
        items = mixed(20, seed=4)
        reject = lambda seq: seq % 4 == 0  # noqa: E731
        self.check(items, converse(items, reject=reject, ack_seed=5), reject=reject)

    def test_all_rejected(self) -> None:
        items = [(False, unit(i)) for i in range(7)]
        reject = lambda seq: True  # noqa: E731
        self.check(items, converse(items, reject=reject), reject=reject)

    def test_byte_at_a_time(self) -> None:
        items = mixed(7, seed=6)
        reject = lambda seq: seq == 3  # noqa: E731
        outcome = converse(items, to_responder=bytewise, to_initiator=bytewise,
                           reject=reject, ack_seed=7)
        self.check(items, outcome, reject=reject)

    def test_everything_in_one_chunk(self) -> None:
        items = mixed(100, seed=8)
        outcome = converse(items, writeahead=100)
        self.check(items, outcome, writeahead=100)
        self.assertEqual(outcome.max_pending, 100)

    def test_random_chunks(self) -> None:
        items = mixed(30, junk_every=2, seed=9)
        outcome = converse(items, to_responder=random_chunks(10), writeahead=11,
                           to_initiator=random_chunks(11, largest=70), ack_seed=12)
        self.check(items, outcome, writeahead=11)

    def test_queue_while_active(self) -> None:
        """Packets appended to a live connection are sent on it (§7.4)."""
        initiator = agreed_initiator(writeahead=2)
        responder = accepted_responder()
        initiator.queue_packet(unit(1), 1)
        responder.receive_data(initiator.data_to_send())
        [event] = drain(responder)
        initiator.queue_junk(unit(2), 2)
        initiator.queue_packet(unit(3), 3)
        responder.receive_data(initiator.data_to_send())  # window: 1 more
        self.assertEqual(initiator.unsent, 1)
        self.assertEqual([e.seq for e in drain(responder)], [1])  # type: ignore[attr-defined]
        responder.accept(1)
        responder.accept(0)
        initiator.receive_data(responder.data_to_send())
        self.assertEqual(drain(initiator), [Acknowledged(1, True), Acknowledged(2, True)])
        responder.receive_data(initiator.data_to_send())
        [last] = drain(responder)
        self.assertEqual(last, PacketReceived(2, unit(3)))
        responder.reject(2)
        initiator.receive_data(responder.data_to_send())
        self.assertEqual(drain(initiator), [Acknowledged(3, False)])
        self.assertTrue(initiator.finished)


# -- frames ------------------------------------------------------------------


class FrameTests(unittest.TestCase):
    def test_constants(self) -> None:
        self.assertEqual(frames.VERSION_LINE, VERSION_LINE)
        self.assertEqual(frames.VERSION_LINE, b"MMTP 0.3\r\n")
        self.assertEqual(frames.FRAME_LEN, FRAME_LEN)
        self.assertEqual(frames.ACK_LEN, ACK_LEN)
        self.assertEqual(frames.SEND_COMMAND, SEND)
        self.assertEqual(frames.JUNK_COMMAND, JUNK)
        self.assertEqual(frames.RECEIVED_COMMAND, RECEIVED)
        self.assertEqual(frames.REJECTED_COMMAND, REJECTED)
        self.assertEqual(frames.MAX_LINE_LENGTH, 4096)

    def test_send_frame_layout(self) -> None:
        packet = unit(1)
        frame = frames.send_frame(packet)
        self.assertEqual(len(frame), 32794)
        self.assertEqual(frame[0:6], b"SEND\r\n")
        self.assertEqual(frame[6:32774], packet)
        self.assertEqual(frame[32774:32794], hashlib.sha1(packet + b"SEND").digest())
        self.assertEqual(frames.send_frame(bytearray(packet)), frame)
        self.assertEqual(frames.send_frame(memoryview(packet)), frame)

    def test_junk_frame_layout(self) -> None:
        junk = unit(2)
        frame = frames.junk_frame(junk)
        self.assertEqual(len(frame), 32794)
        self.assertEqual(frame[0:6], b"JUNK\r\n")
        self.assertEqual(frame[6:32774], junk)
        self.assertEqual(frame[32774:], hashlib.sha1(junk + b"JUNK").digest())

    def test_acks(self) -> None:
        data = unit(3)
        accept, reject = frames.expected_acks(data)
        self.assertEqual(accept, b"RECEIVED\r\n" + hashlib.sha1(data + b"RECEIVED").digest())
        self.assertEqual(reject, b"REJECTED\r\n" + hashlib.sha1(data + b"REJECTED").digest())
        accept, reject = frames.expected_acks(data, junk=True)
        self.assertEqual(accept,
                         b"RECEIVED\r\n" + hashlib.sha1(data + b"RECEIVED JUNK").digest())
        self.assertEqual(reject, b"REJECTED\r\n" + hashlib.sha1(data + b"REJECTED").digest())
        self.assertEqual({len(accept), len(reject)}, {30})

    def test_wrong_sizes(self) -> None:
        for size in (0, 32767, 32769, 32794):
            self.assertRaises(ValueError, frames.send_frame, b"x" * size)
            self.assertRaises(ValueError, frames.junk_frame, b"x" * size)
            self.assertRaises(ValueError, frames.expected_acks, b"x" * size)

    def test_version_lines(self) -> None:
        self.assertEqual(frames.version_line(["0.3"]), VERSION_LINE)
        self.assertEqual(frames.version_line(["0.3", "0.4"]), b"MMTP 0.3,0.4\r\n")
        for bad in ([], ["0.3,0.4"], ["0 3"], [""], ["0.3\r\n"], ["é"]):
            self.assertRaises(ValueError, frames.version_line, bad)
        self.assertEqual(frames.parse_version_line(b"MMTP 0.3,0.4\r\n"), ["0.3", "0.4"])
        self.assertEqual(frames.parse_version_line(b"MMTP ,0.3,\r\n"), ["0.3"])
        for line in (b"MMTP\r\n", b"MMTP \r\n", b"MMTP 0.3", b"MMTP  0.3\r\n",
                     b"MMTP 0.3 0.4\r\n", b"mmtp 0.3\r\n", b"MMTP 0.3\n\r\n",
                     b"MMTP 0.\xff\r\n", b"MMTP\t0.3\r\n"):
            self.assertIsNone(frames.parse_version_line(line), line)


# -- responder ---------------------------------------------------------------


class ResponderTests(unittest.TestCase):
    def assertPeerError(self, code: str, call: Callable[..., object], *args: object) -> None:
        error = self.assertRaises(RemoteProtocolError, call, *args)
        self.assertEqual(error.code, code, str(error))

    def assertDead(self, responder: ResponderMachine) -> None:
        self.assertTrue(responder.dead)
        for call, args in ((responder.next_event, ()), (responder.receive_data, (b"x",)),
                           (responder.data_to_send, ()), (responder.accept, (0,)),
                           (responder.reject, (0,)), (responder.receive_eof, ())):
            error = self.assertRaises(LocalProtocolError, call, *args)
            self.assertEqual(error.code, "dead")

    def test_version_accepted(self) -> None:
        responder = ResponderMachine()
        self.assertIs(responder.next_event(), NEED_DATA)
        self.assertEqual(responder.data_to_send(), b"")
        responder.receive_data(b"MMTP 0.")
        self.assertIs(responder.next_event(), NEED_DATA)
        responder.receive_data(b"3\r")
        self.assertIs(responder.next_event(), NEED_DATA)
        responder.receive_data(b"\n")
        self.assertEqual(responder.next_event(), VersionAccepted("0.3"))
        self.assertEqual(responder.version, "0.3")
        self.assertEqual(responder.data_to_send(), VERSION_LINE)
        self.assertEqual(responder.data_to_send(), b"")
        self.assertIs(responder.next_event(), NEED_DATA)

    def test_our_preference_wins(self) -> None:
        responder = ResponderMachine(versions=("0.4", "0.3"))
        responder.receive_data(b"MMTP 0.3,0.4,0.9\r\n")
        self.assertEqual(responder.next_event(), VersionAccepted("0.4"))
        self.assertEqual(responder.data_to_send(), b"MMTP 0.4\r\n")

    def test_no_common_version(self) -> None:
        responder = ResponderMachine()
        responder.receive_data(b"MMTP 0.1,0.2\r\n")
        self.assertPeerError("no_common_version", responder.next_event)
        self.assertDead(responder)

    def test_bad_version_lines(self) -> None:
        for line in (b"MMTP\r\n", b"MMTP \r\n", b"MMTP 0.3 x\r\n", b"mmtp 0.3\r\n",
                     b"MMTP  0.3\r\n", b"MMTP 0.3\n\r\n", b"\r\n", b"GET / HTTP/1.0\r\n",
                     b"MMTP 0.3\x00\r\n", b"\x16\x03\x01\x02\x00\x01\r\n"):
            responder = ResponderMachine()
            responder.receive_data(line)
            self.assertPeerError("bad_version_line", responder.next_event)
            self.assertEqual(responder.error.code, "bad_version_line")  # type: ignore[union-attr]

    def test_line_too_long(self) -> None:
        responder = ResponderMachine()
        responder.receive_data(b"M" * 4095)
        self.assertIs(responder.next_event(), NEED_DATA)
        responder.receive_data(b"M")
        self.assertPeerError("line_too_long", responder.next_event)
        self.assertDead(responder)

    def test_line_length_limit_is_chunking_independent(self) -> None:
        """A line of 4096 bytes with its CRLF passes; 4097 fails, however
        the bytes arrive."""
        for size, ok in ((4096, True), (4097, False)):
            line = b"MMTP 0.3," + b"x" * (size - 11) + b"\r\n"
            self.assertEqual(len(line), size)
            for chunker in (whole, bytewise):
                responder = ResponderMachine()
                try:
                    for piece in chunker(line):
                        responder.receive_data(piece)
                        drain(responder)
                except RemoteProtocolError as error:
                    self.assertFalse(ok)
                    self.assertEqual(error.code, "line_too_long")
                else:
                    self.assertTrue(ok)
                    self.assertEqual(responder.version, "0.3")

    def test_pipelined_before_version(self) -> None:
        for extra in (b"S", SEND, ref_frame(False, unit(1))):
            responder = ResponderMachine()
            responder.receive_data(VERSION_LINE + extra)
            self.assertPeerError("pipelined_before_version", responder.next_event)
            self.assertDead(responder)
        # Arriving in a separate chunk before we answered is just as early.
        responder = ResponderMachine()
        responder.receive_data(VERSION_LINE)
        responder.receive_data(b"SEND")
        self.assertPeerError("pipelined_before_version", responder.next_event)

    def test_send(self) -> None:
        responder = accepted_responder()
        packet = unit(1)
        responder.receive_data(ref_frame(False, packet))
        event = responder.next_event()
        self.assertEqual(event, PacketReceived(0, packet))
        self.assertIs(type(event.packet), bytes)  # type: ignore[union-attr]
        self.assertIs(responder.next_event(), NEED_DATA)
        self.assertEqual(responder.pending_acks, 1)
        self.assertEqual(responder.data_to_send(), b"")  # nothing before storage
        responder.accept(0)
        self.assertEqual(responder.pending_acks, 0)
        self.assertEqual(responder.data_to_send(),
                         b"RECEIVED\r\n" + hashlib.sha1(packet + b"RECEIVED").digest())

    def test_send_rejected(self) -> None:
        responder = accepted_responder()
        packet = unit(2)
        responder.receive_data(ref_frame(False, packet))
        self.assertEqual(responder.next_event(), PacketReceived(0, packet))
        responder.reject(0)
        self.assertEqual(responder.data_to_send(),
                         b"REJECTED\r\n" + hashlib.sha1(packet + b"REJECTED").digest())

    def test_junk(self) -> None:
        responder = accepted_responder()
        junk = unit(3)
        responder.receive_data(ref_frame(True, junk))
        self.assertEqual(responder.next_event(), JunkReceived(0))
        error = self.assertRaises(LocalProtocolError, responder.reject, 0)
        self.assertEqual(error.code, "reject_junk")
        responder.accept(0)
        self.assertEqual(responder.data_to_send(),
                         b"RECEIVED\r\n" + hashlib.sha1(junk + b"RECEIVED JUNK").digest())

    def test_acks_leave_in_frame_order(self) -> None:
        responder = accepted_responder()
        items = [(False, unit(10)), (True, unit(11)), (False, unit(12)), (False, unit(13))]
        responder.receive_data(b"".join(ref_frame(j, d) for j, d in items))
        self.assertEqual([getattr(e, "seq") for e in drain(responder)], [0, 1, 2, 3])
        self.assertEqual(responder.pending_acks, 4)
        responder.accept(3)
        responder.reject(2)
        self.assertEqual(responder.data_to_send(), b"")
        self.assertEqual(responder.pending_acks, 4)
        responder.accept(0)
        self.assertEqual(responder.data_to_send(), ref_ack(False, unit(10), True))
        self.assertEqual(responder.pending_acks, 3)
        responder.accept(1)
        self.assertEqual(responder.data_to_send(), ref_ack(True, unit(11), True)
                         + ref_ack(False, unit(12), False) + ref_ack(False, unit(13), True))
        self.assertEqual(responder.pending_acks, 0)

    def test_bad_seq(self) -> None:
        responder = accepted_responder()
        responder.receive_data(ref_frame(False, unit(1)))
        drain(responder)
        for seq in (1, -1, 99):
            error = self.assertRaises(LocalProtocolError, responder.accept, seq)
            self.assertEqual(error.code, "bad_seq")
        responder.accept(0)
        for call in (responder.accept, responder.reject):
            error = self.assertRaises(LocalProtocolError, call, 0)
            self.assertEqual(error.code, "bad_seq")
        self.assertFalse(responder.dead)  # our mistakes do not kill the machine

    def test_unknown_command(self) -> None:
        for command in (b"SENT\r\n", b"send\r\n", b"SEND\n\n", b"QUIT\r\n", b"RENEGO"):
            responder = accepted_responder()
            responder.receive_data(command[:5])
            self.assertIs(responder.next_event(), NEED_DATA)
            responder.receive_data(command[5:])
            self.assertPeerError("unknown_command", responder.next_event)
            self.assertDead(responder)

    def test_bad_digest(self) -> None:
        packet = unit(4)
        good_send, good_junk = ref_frame(False, packet), ref_frame(True, packet)
        flipped_digest = good_send[:-1] + bytes([good_send[-1] ^ 1])
        flipped_data = good_send[:100] + bytes([good_send[100] ^ 0x80]) + good_send[101:]
        send_with_junk_digest = SEND + good_junk[6:]
        junk_with_send_digest = JUNK + good_send[6:]
        for frame in (flipped_digest, flipped_data, send_with_junk_digest,
                      junk_with_send_digest):
            responder = accepted_responder()
            responder.receive_data(frame[:-1])
            self.assertIs(responder.next_event(), NEED_DATA)
            responder.receive_data(frame[-1:])
            self.assertPeerError("bad_digest", responder.next_event)
            self.assertEqual(responder.pending_acks, 0)
            self.assertDead(responder)

    def test_bad_frame_after_good_ones(self) -> None:
        responder = accepted_responder()
        bad = ref_frame(False, unit(2))[:-1] + b"\x00"
        responder.receive_data(ref_frame(False, unit(1)) + bad)
        self.assertEqual(responder.next_event(), PacketReceived(0, unit(1)))
        self.assertPeerError("bad_digest", responder.next_event)

    def test_truncated_frame_then_close(self) -> None:
        for size in (1, 6, 32793):
            responder = accepted_responder()
            responder.receive_data(ref_frame(False, unit(5))[:size])
            self.assertIs(responder.next_event(), NEED_DATA)
            self.assertPeerError("truncated_frame", responder.receive_eof)
            self.assertDead(responder)
        # a partial frame after whole ones
        responder = accepted_responder()
        responder.receive_data(ref_frame(False, unit(5)) + SEND)
        self.assertPeerError("truncated_frame", responder.receive_eof)

    def test_clean_close(self) -> None:
        responder = ResponderMachine()
        responder.receive_eof()  # nothing at all
        self.assertTrue(responder.peer_closed)
        self.assertIs(responder.next_event(), NEED_DATA)
        responder = accepted_responder()
        responder.receive_data(ref_frame(False, unit(6)) * 2)
        responder.receive_eof()  # whole frames: clean, and still readable
        self.assertEqual(len(drain(responder)), 2)
        responder.accept(1)
        responder.accept(0)  # storage may finish after the peer left
        self.assertEqual(len(responder.data_to_send()), 60)

    def test_truncated_version_line(self) -> None:
        responder = ResponderMachine()
        responder.receive_data(b"MMTP 0.3\r")
        self.assertPeerError("truncated_line", responder.receive_eof)

    def test_data_after_close(self) -> None:
        responder = accepted_responder()
        responder.receive_eof()
        responder.receive_data(b"")  # empty data is not an event
        self.assertPeerError("data_after_close", responder.receive_data, b"x")
        self.assertDead(responder)

    def test_accepts_buffer_types(self) -> None:
        responder = ResponderMachine()
        responder.receive_data(bytearray(VERSION_LINE))
        self.assertEqual(responder.next_event(), VersionAccepted("0.3"))
        responder.receive_data(memoryview(ref_frame(False, unit(7))))
        self.assertEqual(responder.next_event(), PacketReceived(0, unit(7)))

    def test_buffer_stays_small(self) -> None:
        """After draining, only the incomplete next frame is held, whatever
        the chunk size; even a 10-frame chunk is not kept whole."""
        stream = b"".join(ref_frame(i % 2 == 0, unit(i)) for i in range(10))
        for size in (1000, 16384, 40000, 100000, len(stream)):
            responder = accepted_responder()
            for at in range(0, len(stream), size):
                responder.receive_data(stream[at:at + size])
                largest = responder._rbuf.allocated
                while responder.next_event() is not NEED_DATA:
                    largest = max(largest, responder._rbuf.allocated)
                self.assertLess(largest, FRAME_LEN + size)
                self.assertLess(responder._rbuf.allocated, FRAME_LEN)
                self.assertEqual(responder._rbuf.allocated, responder.buffered)
            self.assertEqual(responder.pending_acks, 10)

    def test_bad_arguments(self) -> None:
        for versions in ((), ("0.3,0.4",), ("",), ("0 3",)):
            self.assertRaises(ValueError, ResponderMachine, versions=versions)
        self.assertRaises(ValueError, ResponderMachine, max_line_length=5)

    def test_events_are_frozen(self) -> None:
        event = PacketReceived(0, b"x")
        self.assertRaises(dataclasses.FrozenInstanceError, setattr, event, "seq", 1)
        self.assertEqual(repr(PacketReceived(0, b"x" * 100)), "PacketReceived(seq=0)")
        self.assertEqual(repr(NEED_DATA), "NEED_DATA")


# -- initiator ---------------------------------------------------------------


class InitiatorTests(unittest.TestCase):
    def assertPeerError(self, code: str, call: Callable[..., object], *args: object) -> None:
        error = self.assertRaises(RemoteProtocolError, call, *args)
        self.assertEqual(error.code, code, str(error))

    def assertLocalError(self, code: str, call: Callable[..., object], *args: object) -> None:
        error = self.assertRaises(LocalProtocolError, call, *args)
        self.assertEqual(error.code, code, str(error))

    def assertDead(self, initiator: InitiatorMachine[int]) -> None:
        self.assertTrue(initiator.dead)
        self.assertFalse(initiator.finished)
        for call, args in ((initiator.next_event, ()), (initiator.receive_data, (b"x",)),
                           (initiator.data_to_send, ()), (initiator.start, ()),
                           (initiator.queue_packet, (unit(0), 0)), (initiator.receive_eof, ())):
            self.assertLocalError("dead", call, *args)

    def test_start(self) -> None:
        initiator: InitiatorMachine[int] = InitiatorMachine()
        self.assertEqual(initiator.start(), bytes.fromhex("4D4D5450 20302E33 0D0A"))
        self.assertLocalError("already_started", initiator.start)
        offered: InitiatorMachine[int] = InitiatorMachine(versions=("0.4", "0.3"))
        self.assertEqual(offered.start(), b"MMTP 0.4,0.3\r\n")

    def test_version_agreed(self) -> None:
        initiator: InitiatorMachine[int] = InitiatorMachine(versions=("0.4", "0.3"))
        initiator.start()
        self.assertIs(initiator.next_event(), NEED_DATA)
        self.assertFalse(initiator.finished)
        for byte in bytewise(VERSION_LINE):
            self.assertIs(initiator.next_event(), NEED_DATA)
            initiator.receive_data(byte)
        self.assertEqual(initiator.next_event(), VersionAgreed("0.3"))
        self.assertEqual(initiator.version, "0.3")
        self.assertTrue(initiator.finished)  # nothing queued: close at once (§7.4)

    def test_bad_version_reply(self) -> None:
        for reply in (b"MMTP 0.4\r\n", b"MMTP 0.3,0.4\r\n", b"MMTP  0.3\r\n",
                      b"mmtp 0.3\r\n", b"MMTP 0.3 \r\n", b"\r\n", b"RECEIVED\r\n"):
            initiator: InitiatorMachine[int] = InitiatorMachine()
            initiator.queue_packet(unit(1), 1)
            initiator.start()
            initiator.receive_data(reply)
            self.assertPeerError("bad_version_reply", initiator.next_event)
            self.assertEqual(initiator.outstanding(), [1])
            self.assertDead(initiator)

    def test_reply_too_long(self) -> None:
        initiator: InitiatorMachine[int] = InitiatorMachine()
        initiator.start()
        initiator.receive_data(b"MMTP " + b"9" * 4090)
        self.assertIs(initiator.next_event(), NEED_DATA)
        initiator.receive_data(b"9")
        self.assertPeerError("line_too_long", initiator.next_event)
        self.assertDead(initiator)

    def test_data_before_version(self) -> None:
        initiator: InitiatorMachine[int] = InitiatorMachine()
        self.assertPeerError("data_before_version", initiator.receive_data, VERSION_LINE)
        self.assertDead(initiator)
        initiator = InitiatorMachine()
        initiator.start()
        initiator.receive_data(VERSION_LINE + b"R")
        self.assertPeerError("data_before_version", initiator.next_event)

    def test_no_frames_before_version(self) -> None:
        initiator: InitiatorMachine[int] = InitiatorMachine()
        initiator.queue_packet(unit(1), 1)
        self.assertEqual(initiator.data_to_send(), b"")
        initiator.start()
        self.assertEqual(initiator.data_to_send(), b"")
        initiator.receive_data(VERSION_LINE)
        self.assertEqual(initiator.data_to_send(), b"")  # event not read yet
        self.assertEqual(initiator.next_event(), VersionAgreed("0.3"))
        self.assertEqual(initiator.data_to_send(), ref_frame(False, unit(1)))

    def test_frames(self) -> None:
        initiator = agreed_initiator()
        initiator.queue_packet(unit(1), 1)
        initiator.queue_junk(unit(2), 2)
        initiator.queue_packet(bytearray(unit(3)), 3)
        self.assertEqual(initiator.unsent, 3)
        wire = initiator.data_to_send()
        self.assertEqual(wire, ref_frame(False, unit(1)) + ref_frame(True, unit(2))
                         + ref_frame(False, unit(3)))
        self.assertEqual((initiator.unsent, initiator.pending), (0, 3))
        self.assertEqual(initiator.data_to_send(), b"")

    def test_acknowledgements(self) -> None:
        initiator = agreed_initiator()
        initiator.queue_packet(unit(1), 1)
        initiator.queue_junk(unit(2), 2)
        initiator.queue_packet(unit(3), 3)
        initiator.data_to_send()
        self.assertEqual(initiator.outstanding(), [1, 2, 3])
        initiator.receive_data(ref_ack(False, unit(1), True)[:29])
        self.assertIs(initiator.next_event(), NEED_DATA)
        initiator.receive_data(ref_ack(False, unit(1), True)[29:]
                               + ref_ack(True, unit(2), True) + ref_ack(False, unit(3), False))
        self.assertEqual(drain(initiator), [Acknowledged(1, True), Acknowledged(2, True),
                                            Acknowledged(3, False)])
        self.assertTrue(initiator.finished)
        self.assertEqual(initiator.outstanding(), [])

    def test_junk_may_be_rejected(self) -> None:
        """The reference initiator understands REJECTED for junk (§7.4)."""
        initiator = agreed_initiator()
        initiator.queue_junk(unit(2), "ping")  # type: ignore[arg-type]
        initiator.data_to_send()
        initiator.receive_data(ref_ack(True, unit(2), False))
        self.assertEqual(initiator.next_event(), Acknowledged("ping", False))

    def test_writeahead(self) -> None:
        initiator = agreed_initiator()
        for i in range(8):
            initiator.queue_packet(unit(i), i)
        self.assertEqual(initiator.data_to_send(),
                         b"".join(ref_frame(False, unit(i)) for i in range(6)))
        self.assertEqual(initiator.data_to_send(), b"")
        self.assertEqual(initiator.outstanding(), list(range(8)))
        initiator.receive_data(ref_ack(False, unit(0), True))
        self.assertEqual(initiator.next_event(), Acknowledged(0, True))
        self.assertEqual(initiator.data_to_send(), ref_frame(False, unit(6)))
        self.assertEqual(initiator.data_to_send(), b"")
        self.assertEqual(initiator.pending, 6)
        initiator.receive_data(ref_ack(False, unit(1), True))
        initiator.next_event()
        self.assertEqual(initiator.data_to_send(), ref_frame(False, unit(7)))

    def test_writeahead_one(self) -> None:
        initiator = agreed_initiator(writeahead=1)
        initiator.queue_packet(unit(1), 1)
        initiator.queue_packet(unit(2), 2)
        self.assertEqual(initiator.data_to_send(), ref_frame(False, unit(1)))
        self.assertEqual(initiator.data_to_send(), b"")

    def test_unexpected_ack(self) -> None:
        initiator = agreed_initiator()
        initiator.receive_data(b"R")
        self.assertPeerError("unexpected_ack", initiator.next_event)
        self.assertDead(initiator)
        # one ack too many
        initiator = agreed_initiator()
        initiator.queue_packet(unit(1), 1)
        initiator.data_to_send()
        ack = ref_ack(False, unit(1), True)
        initiator.receive_data(ack + ack)
        self.assertEqual(initiator.next_event(), Acknowledged(1, True))
        self.assertPeerError("unexpected_ack", initiator.next_event)

    def test_bad_ack(self) -> None:
        packet = unit(1)
        for ack in (b"\x00" * 30,
                    ref_ack(True, packet, True),  # junk's ack for a packet
                    ref_ack(False, unit(2), True),  # the next packet's ack
                    RECEIVED + hashlib.sha1(packet + b"REJECTED").digest(),
                    REJECTED + hashlib.sha1(packet + b"RECEIVED").digest(),
                    ref_ack(False, packet, True)[:-1] + b"\x00"):
            initiator = agreed_initiator()
            initiator.queue_packet(packet, 1)
            initiator.queue_packet(unit(2), 2)
            initiator.queue_packet(unit(3), 3)
            initiator.data_to_send()
            initiator.receive_data(ack)
            self.assertPeerError("bad_ack", initiator.next_event)
            self.assertEqual(initiator.outstanding(), [1, 2, 3])
            self.assertDead(initiator)

    def test_acks_out_of_order_are_bad(self) -> None:
        initiator = agreed_initiator()
        initiator.queue_packet(unit(1), 1)
        initiator.queue_packet(unit(2), 2)
        initiator.data_to_send()
        initiator.receive_data(ref_ack(False, unit(2), True) + ref_ack(False, unit(1), True))
        self.assertPeerError("bad_ack", initiator.next_event)

    def test_receive_eof(self) -> None:
        initiator = agreed_initiator(writeahead=2)
        initiator.queue_packet(unit(1), 1)
        initiator.queue_packet(unit(2), 2)
        initiator.queue_packet(unit(4), 4)
        initiator.data_to_send()
        initiator.receive_data(ref_ack(False, unit(1), True))
        initiator.receive_eof()  # clean: whole acks only
        self.assertEqual(initiator.next_event(), Acknowledged(1, True))
        self.assertIs(initiator.next_event(), NEED_DATA)
        self.assertEqual(initiator.data_to_send(), b"")  # nobody is listening
        self.assertEqual(initiator.outstanding(), [2, 4])  # for the protocol to fail
        self.assertFalse(initiator.finished)
        self.assertLocalError("closed", initiator.queue_packet, unit(3), 3)
        self.assertPeerError("data_after_close", initiator.receive_data, b"x")

    def test_truncated_ack(self) -> None:
        initiator = agreed_initiator()
        initiator.queue_packet(unit(1), 1)
        initiator.data_to_send()
        initiator.receive_data(ref_ack(False, unit(1), True)[:12])
        self.assertPeerError("truncated_ack", initiator.receive_eof)
        self.assertEqual(initiator.outstanding(), [1])

    def test_truncated_reply(self) -> None:
        initiator: InitiatorMachine[int] = InitiatorMachine()
        initiator.start()
        initiator.receive_data(b"MMTP 0")
        self.assertPeerError("truncated_line", initiator.receive_eof)
        initiator = InitiatorMachine()
        initiator.start()
        initiator.receive_eof()  # closed before answering: clean but unfinished
        self.assertFalse(initiator.finished)

    def test_close(self) -> None:
        initiator = agreed_initiator()
        initiator.queue_packet(unit(1), 1)
        initiator.close()
        self.assertEqual(initiator.data_to_send(), b"")
        self.assertEqual(initiator.outstanding(), [1])
        self.assertLocalError("closed", initiator.queue_packet, unit(2), 2)
        self.assertLocalError("closed", initiator.queue_junk, unit(2), 2)

    def test_bad_packets(self) -> None:
        initiator: InitiatorMachine[int] = InitiatorMachine()
        for size in (0, 32767, 32769, 32794):
            self.assertLocalError("bad_packet_length", initiator.queue_packet, b"x" * size, 1)
            self.assertLocalError("bad_packet_length", initiator.queue_junk, b"x" * size, 1)
        self.assertLocalError("bad_packet", initiator.queue_packet, "x" * 32768, 1)
        self.assertEqual(initiator.outstanding(), [])

    def test_bad_arguments(self) -> None:
        self.assertRaises(ValueError, InitiatorMachine, writeahead=0)
        self.assertRaises(ValueError, InitiatorMachine, versions=())
        self.assertRaises(ValueError, InitiatorMachine, versions=("a b",))


# -- properties --------------------------------------------------------------

item_lists = st.lists(st.tuples(st.booleans(), st.integers(0, 2**32)), min_size=1, max_size=4)


class PropertyTests(unittest.TestCase):
    @settings(max_examples=40, deadline=None)
    @given(items=item_lists, data=st.data())
    def test_responder_chunking(self, items: list[tuple[bool, int]], data: st.DataObject) -> None:
        frames_ = [(junk, unit(seed)) for junk, seed in items]
        stream = b"".join(ref_frame(junk, d) for junk, d in frames_)
        line_cuts = data.draw(st.lists(st.integers(1, 9), max_size=9))
        stream_cuts = data.draw(st.lists(st.integers(1, len(stream) - 1), max_size=25))
        responder = ResponderMachine()
        events = []
        for piece in cut(VERSION_LINE, line_cuts):
            responder.receive_data(piece)
            events += drain(responder)
        for piece in cut(stream, stream_cuts):
            responder.receive_data(piece)
            events += drain(responder)
        responder.receive_eof()
        expected: list[object] = [VersionAccepted("0.3")] + [
            JunkReceived(i) if junk else PacketReceived(i, d)
            for i, (junk, d) in enumerate(frames_)]
        self.assertEqual(events, expected)
        for i in reversed(range(len(frames_))):
            responder.accept(i)
        self.assertEqual(responder.data_to_send(), VERSION_LINE
                         + b"".join(ref_ack(j, d, True) for j, d in frames_))

    @settings(max_examples=40, deadline=None)
    @given(items=item_lists, data=st.data())
    def test_initiator_chunking(self, items: list[tuple[bool, int]], data: st.DataObject) -> None:
        units = [(junk, unit(seed)) for junk, seed in items]
        verdicts = [junk or data.draw(st.booleans()) for junk, _ in units]
        initiator: InitiatorMachine[int] = InitiatorMachine(writeahead=len(units))
        for i, (junk, d) in enumerate(units):
            (initiator.queue_junk if junk else initiator.queue_packet)(d, i)
        initiator.start()
        events = []
        for piece in cut(VERSION_LINE, data.draw(st.lists(st.integers(1, 9), max_size=9))):
            initiator.receive_data(piece)
            events += drain(initiator)
        self.assertEqual(initiator.data_to_send(),
                         b"".join(ref_frame(j, d) for j, d in units))
        acks = b"".join(ref_ack(j, d, ok) for (j, d), ok in zip(units, verdicts))
        for piece in cut(acks, data.draw(st.lists(st.integers(1, len(acks) - 1), max_size=30))):
            initiator.receive_data(piece)
            events += drain(initiator)
        initiator.receive_eof()
        self.assertEqual(events, [VersionAgreed("0.3")]
                         + [Acknowledged(i, ok) for i, ok in enumerate(verdicts)])
        self.assertTrue(initiator.finished)

    def feed_garbage(self, machine: ResponderMachine | InitiatorMachine[Any],
                     chunks: list[bytes], eof: bool) -> None:
        """Only RemoteProtocolError may come out, and it kills the machine."""
        try:
            for chunk in chunks:
                machine.receive_data(chunk)
                drain(machine)
            if eof:
                machine.receive_eof()
                drain(machine)
        except RemoteProtocolError as error:
            self.assertTrue(machine.dead)
            self.assertIs(machine.error, error)
            self.assertRaises(LocalProtocolError, machine.next_event)

    @settings(max_examples=200, deadline=None)
    @given(prefix=st.sampled_from([b"", VERSION_LINE, VERSION_LINE + SEND, VERSION_LINE + JUNK]),
           chunks=st.lists(st.binary(max_size=300), max_size=6), eof=st.booleans())
    def test_responder_garbage(self, prefix: bytes, chunks: list[bytes], eof: bool) -> None:
        responder = ResponderMachine()
        if prefix:
            responder.receive_data(VERSION_LINE)
            drain(responder)
            chunks = [prefix[len(VERSION_LINE):]] + chunks
        self.feed_garbage(responder, chunks, eof)

    @settings(max_examples=60, deadline=None)
    @given(junk=st.booleans(), seed=st.integers(0, 2**32),
           where=st.integers(0, FRAME_LEN - 1), flip=st.integers(1, 255))
    def test_responder_damaged_frame(self, junk: bool, seed: int, where: int, flip: int) -> None:
        frame = bytearray(ref_frame(junk, unit(seed)))
        frame[where] ^= flip
        responder = accepted_responder()
        responder.receive_data(bytes(frame))
        error = self.assertRaises(RemoteProtocolError, drain, responder)
        self.assertEqual(error.code, "unknown_command" if where < 6 else "bad_digest")

    @settings(max_examples=200, deadline=None)
    @given(agreed=st.booleans(), pending=st.integers(0, 3),
           chunks=st.lists(st.binary(max_size=100), max_size=6), eof=st.booleans())
    def test_initiator_garbage(self, agreed: bool, pending: int, chunks: list[bytes],
                               eof: bool) -> None:
        initiator: InitiatorMachine[int] = InitiatorMachine()
        for i in range(pending):
            initiator.queue_packet(unit(i), i)
        initiator.start()
        if agreed:
            initiator.receive_data(VERSION_LINE)
            drain(initiator)
            initiator.data_to_send()
        self.feed_garbage(initiator, chunks, eof)
        self.assertLessEqual(len(initiator.outstanding()), pending)
