"""Exit headers (packet.md §13.1), exit classification (§14) and the
delivered text format and armor (§14.1, §15.1)."""

from __future__ import annotations

import base64
import random

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from mixminion.codec.armor import armor, dearmor, dearmor_all
from mixminion.codec.compression import compress
from mixminion.codec.errors import BuildError, CodecError, ParseError
from mixminion.codec.exit import (
    BINARY,
    ENCRYPTED,
    FRAGMENT,
    OVERCOMPRESSED,
    PLAINTEXT,
    Corrupt,
    Encrypted,
    FragmentPiece,
    Overcompressed,
    Plain,
    TextMessage,
    choose_message_type,
    classify_compressed,
    classify_payload,
    encode_text_message,
    is_printing,
    parse_text_message,
    parse_text_messages,
    text_for_delivery,
)
from mixminion.codec.exit_headers import encode_headers, encode_message, parse_message
from mixminion.codec.fragments import fragment_message
from mixminion.codec.payload import ENC_PAYLOAD_LEN, PAYLOAD_LEN, encode_singleton

BEGIN = b"-----BEGIN TYPE III ANONYMOUS MESSAGE-----\n"
END = b"-----END TYPE III ANONYMOUS MESSAGE-----\n"
BIN96 = bytes.fromhex("00D1E50FED1F1CE5") * 12
BIN96_LINE = b"ANHlD+0fHOUA0eUP7R8c5QDR5Q/tHxzlANHlD+0fHOUA0eUP7R8c5QDR5Q/tHxzl\n"


def rng_of(seed: int):
    return random.Random(seed).randbytes


class ExitHeaders(unittest.TestCase):
    def test_known_answers(self) -> None:
        self.assertEqual(encode_headers({"ABC": "x y zzy", "X": "<42>"}), b"ABC:x y zzy\nX:<42>\n\n")
        self.assertEqual(encode_headers({}), b"\n")
        self.assertEqual(
            encode_headers({"SUBJECT": "d", "FROM": "a", "IN-REPLY-TO": "b", "REFERENCES": "c"}),
            b"FROM:a\nIN-REPLY-TO:b\nREFERENCES:c\nSUBJECT:d\n\n",
        )

    def test_encoder_refuses(self) -> None:
        for bad in ({"FROM": 'a "quoted" name'}, {"FROM": "[x]"}, {"FROM": "a:b"},
                    {"SUBJECT": "x" * 910}, {"SUB JECT": "x"}, {"SUB:JECT": "x"}, {"": "x"},
                    {"SUBJECT": "line\nbreak"}, {"SUBJECT": "caf\u00e9"}, {"SUBJECT": "tab\t"}):
            self.assertRaises(BuildError, encode_headers, bad)
        encode_headers({"SUBJECT": "x" * 900, "FROM": "Mr. Nobody <ok>", "EMPTY": ""})

    def test_parse(self) -> None:
        self.assertEqual(parse_message(b"\nbody"), ({}, b"body"))
        self.assertEqual(parse_message(b"A:1\nB:two words\n\nbody\nA:3\n"),
                         ({"A": "1", "B": "two words"}, b"body\nA:3\n"))
        self.assertEqual(parse_message(b""), ({}, b""))
        self.assertEqual(parse_message(b"A:1\nA:2\n\n"), ({"A": "2"}, b""))

    def test_long_value_skipped(self) -> None:
        msg = b"SUBJECT:" + b"x" * 1000 + b"\nFROM:me\n\nbody"
        self.assertEqual(parse_message(msg), ({"FROM": "me"}, b"body"))
        msg = b"SUBJECT:" + b"x" * 900 + b"\n\nbody"
        self.assertEqual(parse_message(msg), ({"SUBJECT": "x" * 900}, b"body"))

    def test_non_matching_line(self) -> None:
        """The whole message becomes the body; earlier headers are kept
        (reference and vectors) unless asked otherwise (packet.md wording)."""
        msg = b"SUBJECT:hi\nnot a header\n\nbody"
        self.assertEqual(parse_message(msg), ({"SUBJECT": "hi"}, msg))
        self.assertEqual(parse_message(msg, partial_headers=False), ({}, msg))
        self.assertEqual(parse_message(b"Hello world"), ({}, b"Hello world"))
        self.assertEqual(parse_message(b"A:1\n"), ({"A": "1"}, b"A:1\n"))
        self.assertEqual(parse_message(b"A:\xff\n\n"), ({}, b"A:\xff\n\n"))
        self.assertEqual(parse_message(b"A :1\n\n"), ({}, b"A :1\n\n"))

    @settings(max_examples=40, deadline=None)
    @given(st.dictionaries(st.from_regex(r"[!-9;-~]{1,12}", fullmatch=True),
                           st.from_regex(r"[ -~]{0,40}", fullmatch=True), max_size=5),
           st.binary(max_size=200))
    def test_round_trip(self, headers: dict, body: bytes) -> None:
        headers = {k: v for k, v in headers.items() if k.upper() != "FROM"}
        self.assertEqual(parse_message(encode_message(headers, body)), (headers, body))


def _singleton(message: bytes, overhead: int = 0) -> bytes:
    return encode_singleton(compress(message), rng_of(len(message)), overhead)


class Classify(unittest.TestCase):
    def test_plain(self) -> None:
        payload = _singleton(encode_message({"SUBJECT": "hi"}, b"Hello\n"))
        self.assertEqual(classify_payload(payload),
                         Plain({"SUBJECT": "hi"}, b"Hello\n", compress(b"SUBJECT:hi\n\nHello\n")))
        got = classify_payload(_singleton(b"\nx", 38))
        self.assertIsInstance(got, Plain)

    def test_overcompressed_zeros(self) -> None:
        """25 KiB of zeros fit one payload but are refused as a bomb."""
        z = compress(bytes(25 * 1024))
        self.assertEqual(classify_payload(_singleton(bytes(25 * 1024))), Overcompressed(z))
        # with a larger limit it is a plain message
        self.assertIsInstance(classify_payload(_singleton(bytes(25 * 1024)), limit=25 * 1024), Plain)

    def test_limit_boundary(self) -> None:
        msg = b"\n" + b"a" * 20479
        self.assertIsInstance(classify_payload(_singleton(msg)), Plain)
        self.assertIsInstance(classify_payload(_singleton(msg + b"a")), Overcompressed)

    def test_fragment(self) -> None:
        payloads = fragment_message(random.Random(1).randbytes(40000), rng_of(2))
        got = classify_payload(payloads[1])
        assert isinstance(got, FragmentPiece)
        self.assertEqual(got.fragment.index, 1)
        self.assertEqual(got.fragment.to_bytes(), payloads[1])

    def test_encrypted(self) -> None:
        junk = random.Random(3).randbytes(PAYLOAD_LEN)
        self.assertEqual(classify_payload(junk), Encrypted(junk))

    def test_corrupt(self) -> None:
        not_zlib = encode_singleton(b"this is not zlib", rng_of(4))
        self.assertIsInstance(classify_payload(not_zlib), Corrupt)
        truncated = encode_singleton(compress(b"x" * 1000)[:-3], rng_of(4))
        self.assertIsInstance(classify_payload(truncated), Corrupt)
        self.assertIsInstance(classify_payload(b"short"), Corrupt)
        self.assertIsInstance(classify_payload(bytes(PAYLOAD_LEN + 1)), Corrupt)
        # SIZE larger than the data, with a valid checksum
        big = bytearray(encode_singleton(b"", rng_of(5)))
        big[0:2] = b"\x7f\xff"
        self.assertIsInstance(classify_payload(bytes(big)), Corrupt)

    def test_classify_compressed(self) -> None:
        z = compress(b"\n" + b"a" * 10000)
        self.assertIsInstance(classify_compressed(z), Overcompressed)  # 20 x len
        self.assertIsInstance(classify_compressed(z, limit=10001), Plain)
        self.assertIsInstance(classify_compressed(b"junk"), Corrupt)

    @settings(max_examples=60, deadline=None)
    @given(st.one_of(st.binary(max_size=100),
                     st.sampled_from([PAYLOAD_LEN, ENC_PAYLOAD_LEN]).map(lambda n: random.Random(n).randbytes(n))))
    def test_never_raises(self, data: bytes) -> None:
        self.assertIsInstance(classify_payload(data), (Corrupt, Encrypted))


class TextFormat(unittest.TestCase):
    def test_hello_whirled(self) -> None:
        self.assertEqual(encode_text_message(b"Hello, whirled", PLAINTEXT),
                         BEGIN + b"Message-type: plaintext\n\nHello, whirled\n" + END)

    def test_binary(self) -> None:
        self.assertEqual(encode_text_message(BIN96, BINARY),
                         BEGIN + b"Message-type: binary\n\n" + BIN96_LINE * 2 + END)

    def test_encrypted(self) -> None:
        text = encode_text_message(BIN96, ENCRYPTED, b"9" * 20)
        self.assertEqual(text, BEGIN + b"Message-type: encrypted\n"
                         b"Decoding-handle: OTk5OTk5OTk5OTk5OTk5OTk5OTk=\n\n" + BIN96_LINE * 2 + END)
        self.assertEqual(parse_text_message(text), TextMessage(ENCRYPTED, BIN96, b"9" * 20))
        self.assertRaises(BuildError, encode_text_message, BIN96, ENCRYPTED)
        self.assertRaises(BuildError, encode_text_message, BIN96, ENCRYPTED, b"short")
        self.assertRaises(BuildError, encode_text_message, BIN96, BINARY, b"9" * 20)

    def test_line_lengths(self) -> None:
        text = encode_text_message(bytes(range(256)) * 3, BINARY)
        body = text.split(b"\n\n", 1)[1].split(b"-----END")[0]
        lines = body.split(b"\n")[:-1]
        self.assertEqual([len(x) for x in lines], [64] * 16)

    def test_dash_escaping(self) -> None:
        contents = b"-----END TYPE III ANONYMOUS MESSAGE-----\n--x\nok - fine\n- y"
        text = encode_text_message(contents, PLAINTEXT)
        self.assertIn(b"\n- -----END TYPE III ANONYMOUS MESSAGE-----\n- --x\nok - fine\n- - y\n" + END, text)
        self.assertEqual(parse_text_message(text).contents, contents + b"\n")

    def test_printing(self) -> None:
        self.assertTrue(is_printing(b"\t\n\x0b\r ~\x80\xfe"))
        for bad in (b"\x00", b"\x0c", b"\x7f", b"\xff", b"\x1b"):
            self.assertFalse(is_printing(b"abc" + bad))
        self.assertRaises(BuildError, encode_text_message, b"\xff", PLAINTEXT)
        latin = b"caf\xe9\n"
        self.assertEqual(parse_text_message(encode_text_message(latin, PLAINTEXT)).contents, latin)

    def test_type_order(self) -> None:
        self.assertEqual(choose_message_type(b"text", overcompressed=True, encrypted=True), OVERCOMPRESSED)
        self.assertEqual(choose_message_type(b"text", encrypted=True, fragment=True), ENCRYPTED)
        self.assertEqual(choose_message_type(b"text", fragment=True), PLAINTEXT)
        self.assertEqual(choose_message_type(b"\x00", fragment=True), FRAGMENT)
        self.assertEqual(choose_message_type(b"\x00"), BINARY)

    def test_parse_rules(self) -> None:
        no_type = BEGIN + b"\nhello\n- -dash\n" + END
        self.assertEqual(parse_text_message(no_type), TextMessage(PLAINTEXT, b"hello\n-dash\n"))
        b64 = base64.b64encode(b"hi").decode()
        forced = BEGIN + f"Message-type: binary\nDecoding-handle: {'A' * 27}=\n\n{b64}\n".encode() + END
        self.assertEqual(parse_text_message(forced).message_type, ENCRYPTED)
        short = BEGIN + b"Message-type: binary\nDecoding-handle: AAAA\n\naGk=\n" + END
        self.assertRaises(ParseError, parse_text_message, short)
        truncated = BEGIN + b"Message-type: binary\n\naGk=\n[...]\n" + END
        self.assertRaises(ParseError, parse_text_message, truncated)
        unknown = BEGIN + b"Message-type: poetry\n\naGk=\n" + END
        self.assertRaises(ParseError, parse_text_message, unknown)
        bad64 = BEGIN + b"Message-type: binary\n\na!Gk=\n" + END
        self.assertRaises(ParseError, parse_text_message, bad64)
        self.assertRaises(ParseError, parse_text_message, BEGIN + b"Message-type: binary\n\naGk=\n")

    def test_in_mail(self) -> None:
        a = encode_text_message(b"first", PLAINTEXT)
        b = encode_text_message(BIN96, BINARY)
        mail = b"To: x@y\nSubject: s\n\nDisclaimer.\n\n" + a + b"\nbetween\n" + b.replace(b"\n", b"\r\n")
        self.assertEqual(parse_text_messages(mail),
                         [TextMessage(PLAINTEXT, b"first\n"), TextMessage(BINARY, BIN96)])
        self.assertRaises(ParseError, parse_text_message, mail)

    @settings(max_examples=50, deadline=None)
    @given(st.binary(max_size=300), st.sampled_from([PLAINTEXT, BINARY, OVERCOMPRESSED, FRAGMENT, ENCRYPTED]))
    def test_round_trip(self, contents: bytes, kind: str) -> None:
        if kind == PLAINTEXT:
            contents = bytes(c for c in contents if is_printing(bytes([c])))
            if not contents.endswith(b"\n"):
                contents += b"\n"
        tag = b"T" * 20 if kind == ENCRYPTED else None
        got = parse_text_message(encode_text_message(contents, kind, tag))
        self.assertEqual(got, TextMessage(kind, contents, tag))

    @settings(max_examples=100, deadline=None)
    @given(st.binary(max_size=300))
    def test_random_text_only_codec_errors(self, junk: bytes) -> None:
        for text in (junk, BEGIN + junk, BEGIN + junk + b"\n" + END, BEGIN + b"\n" + junk + END):
            try:
                parse_text_messages(text)
            except CodecError:
                pass


class Delivery(unittest.TestCase):
    def test_each_kind(self) -> None:
        plain = classify_payload(_singleton(encode_message({}, b"Hello, whirled")))
        self.assertEqual(text_for_delivery(plain), BEGIN + b"Message-type: plaintext\n\nHello, whirled\n" + END)
        binary = classify_payload(_singleton(encode_message({}, BIN96)))
        self.assertEqual(parse_text_message(text_for_delivery(binary)), TextMessage(BINARY, BIN96))
        over = classify_payload(_singleton(bytes(25 * 1024)))
        assert isinstance(over, Overcompressed)
        self.assertEqual(parse_text_message(text_for_delivery(over)),
                         TextMessage(OVERCOMPRESSED, over.compressed))
        junk = random.Random(6).randbytes(PAYLOAD_LEN)
        self.assertEqual(parse_text_message(text_for_delivery(classify_payload(junk), b"t" * 20)),
                         TextMessage(ENCRYPTED, junk, b"t" * 20))
        frag = fragment_message(random.Random(7).randbytes(40000), rng_of(8))[0]
        self.assertEqual(parse_text_message(text_for_delivery(classify_payload(frag))),
                         TextMessage(FRAGMENT, frag))
        self.assertRaises(BuildError, text_for_delivery, Corrupt("bad"))


class Armor(unittest.TestCase):
    def test_reply_block_style(self) -> None:
        text = armor("TYPE III REPLY BLOCK", [("Version", "0.2")], b"SURB" + bytes(60))
        self.assertTrue(text.startswith("-----BEGIN TYPE III REPLY BLOCK-----\nVersion: 0.2\n\n"))
        self.assertTrue(text.endswith("\n-----END TYPE III REPLY BLOCK-----\n"))
        block = dearmor(text)
        self.assertEqual(block, ("TYPE III REPLY BLOCK", {"Version": "0.2"}, b"SURB" + bytes(60)))
        self.assertEqual(dearmor(text.encode()), block)

    def test_several_blocks(self) -> None:
        one = armor("X", {"A": "1"}, b"one")
        two = armor("Y", {}, b"")
        blocks = dearmor_all("junk\n" + one + "\nmore junk\n" + two)
        self.assertEqual([(b.type_name, b.headers, b.body) for b in blocks],
                         [("X", {"A": "1"}, b"one"), ("Y", {}, b"")])
        self.assertRaises(ParseError, dearmor, one + two)
        self.assertEqual(dearmor_all("nothing here"), [])

    def test_build_errors(self) -> None:
        self.assertRaises(BuildError, armor, "X", {"A:B": "1"}, b"")
        self.assertRaises(BuildError, armor, "X", {"A": "1\n2"}, b"")
        self.assertRaises(BuildError, armor, "", {}, b"")
        self.assertRaises(BuildError, armor, "X", {}, b"-----END X-----\n", literal=True)

    def test_parse_errors(self) -> None:
        self.assertRaises(ParseError, dearmor, "-----BEGIN X-----\nA: 1\n\nb25l\n")
        self.assertRaises(ParseError, dearmor, "-----BEGIN X-----\nno colon\n\nb25l\n-----END X-----\n")
        self.assertRaises(ParseError, dearmor, "-----BEGIN X-----")
        self.assertRaises(ParseError, dearmor, "-----BEGIN X-----\n\nb25l\n-----END Y-----\n")
        self.assertRaises(ParseError, dearmor, "-----BEGIN X-----\n\n\u0100\n-----END X-----\n")
