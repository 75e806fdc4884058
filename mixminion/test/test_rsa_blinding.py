"""The private-key operation behind every signature is blinded and checked
(issue 12 point 11; see ``mixminion/codec/rsa.py``).

Blinding must not change any signature: each one is compared with plain
``pow(c, d, n)`` and with the known answers of ``rsa_oaep.json``, for several
keys and random sources.  The value that reaches the CRT exponentiation is
recorded through ``rsa._crt_private`` to show that it is blinded, and by a
factor drawn from the injected source.  A fault in one CRT half (a ``pow``
that is wrong modulo ``p`` only) is shown to be worth the key -- its output
factors ``n`` -- and then to be stopped before any output leaves ``rsa.py``.
"""

from __future__ import annotations

import builtins
import json
import math
from contextlib import contextmanager
from typing import Callable, Iterator

from twisted.trial import unittest

from mixminion.codec import rsa
from mixminion.codec.crypto import AESCounterPRNG, RandomSource
from mixminion.codec.errors import CryptoError
from mixminion.codec.rsa import PrivateKey, RSAFaultError, oaep_encode
from mixminion.test.vectorkit import vectors_dir
from mixminion.test.vectors_crypto import key_by_id

KEY_IDS = ("S-rsa2048-0", "S-rsa1024-0", "S-rsa512-0", "S-rsa2048-1", "S-rsa1024-1")
MESSAGES = (b"", b"x", bytes(range(20)), b"digest \xff" * 2)
SEED = bytes(range(100, 120))


def prng(label: bytes) -> RandomSource:
    """A deterministic source: the AES-CTR keystream of ``label``."""
    return AESCounterPRNG(label.ljust(16, b"\0")[:16])


def scripted(*chunks: bytes) -> Callable[[int], bytes]:
    """A source that hands out ``chunks`` in order, each exactly as long as
    asked for, and fails if asked for more."""
    it: Iterator[bytes] = iter(chunks)

    def draw(n: int) -> bytes:
        chunk = next(it)
        assert len(chunk) == n, (len(chunk), n)
        return chunk

    draw.left = lambda: list(it)  # type: ignore[attr-defined]
    return draw


def plain_signature(key: PrivateKey, data: bytes, seed: bytes) -> bytes:
    """The reference: OAEP then ``pow(c, d, n)``, no CRT, no blinding."""
    k = key.size_bytes
    c = int.from_bytes(oaep_encode(data, k, seed), "big")
    return pow(c, key.key.private_numbers().d, key.public.n).to_bytes(k, "big")


class BlindingKeepsSignatures(unittest.TestCase):
    def test_equal_to_plain_pow(self) -> None:
        """Several keys, messages and random sources: every blinded CRT
        signature is the number plain ``pow`` gives."""
        for key_id in KEY_IDS:
            key = key_by_id(key_id)
            longest = b"\xa5" * (key.size_bytes - rsa.OAEP_OVERHEAD)
            for i, data in enumerate(MESSAGES + (longest,)):
                want = plain_signature(key, data, SEED)
                for label in (b"one", b"two", key_id.encode()):
                    rng = prng(label + bytes([i]))
                    self.assertEqual(key.sign_with_seed(data, SEED, rng), want, (key_id, i, label))
                # sign(): the source gives the OAEP seed first, then r
                rng = prng(b"sign" + bytes([i]))
                seed = prng(b"sign" + bytes([i]))(20)
                self.assertEqual(key.sign(data, rng), plain_signature(key, data, seed))

    def test_known_answers_with_injected_sources(self) -> None:
        entries = json.loads((vectors_dir() / "rsa_oaep.json").read_text())["pk_sign"]
        self.assertTrue(entries)
        for e in entries:
            key = key_by_id(e["key_id"])
            data, seed = bytes.fromhex(e["data_hex"]), bytes.fromhex(e["seed_hex"])
            for label in (b"a", b"b"):
                sig = key.sign_with_seed(data, seed, prng(label))
                self.assertEqual(sig.hex(), e["signature_hex"])
            self.assertEqual(plain_signature(key, data, seed).hex(), e["signature_hex"])

    def test_constant_sources_of_other_tests(self) -> None:
        """The constant sources other test modules pass to ``sign`` still
        give a blinding factor at the first draw."""
        key = key_by_id("S-rsa2048-0")
        for byte in (0x42, 0x5A, 0x17):
            calls = []

            def rng(n: int, byte: int = byte) -> bytes:
                calls.append(n)
                return bytes([byte]) * n

            sig = key.sign(b"digest", rng)
            self.assertEqual(sig, plain_signature(key, b"digest", bytes([byte]) * 20))
            self.assertEqual(calls, [20, key.size_bytes])


class BlindingFactor(unittest.TestCase):
    def record_crt_inputs(self) -> list[int]:
        seen: list[int] = []
        real = rsa._crt_private

        def recording(key: PrivateKey, c: int) -> int:
            seen.append(c)
            return real(key, c)

        self.patch(rsa, "_crt_private", recording)
        return seen

    def test_crt_input_is_blinded_by_the_source(self) -> None:
        """Two sources: different values reach the CRT step, each is
        ``c * r^e mod n`` for the ``r`` that source gave, and the outputs are
        equal."""
        seen = self.record_crt_inputs()
        for key_id in KEY_IDS:
            key = key_by_id(key_id)
            n, e, k = key.public.n, key.public.e, key.size_bytes
            c = int.from_bytes(oaep_encode(b"vote", k, SEED), "big")
            del seen[:]
            sig_a = key.sign_with_seed(b"vote", SEED, prng(b"A"))
            sig_b = key.sign_with_seed(b"vote", SEED, prng(b"B"))
            self.assertEqual(sig_a, sig_b)
            self.assertEqual(sig_a, plain_signature(key, b"vote", SEED))
            self.assertEqual(len(seen), 2)
            self.assertNotEqual(seen[0], seen[1])
            self.assertNotIn(c, seen)
            mask = (1 << n.bit_length()) - 1
            for label, blinded in zip((b"A", b"B"), seen):
                r = int.from_bytes(prng(label)(k), "big") & mask
                self.assertTrue(0 < r < n)
                self.assertEqual(blinded, c * pow(r, e, n) % n)

    def test_fresh_factor_for_each_operation(self) -> None:
        """One source used twice: a new factor each time."""
        seen = self.record_crt_inputs()
        key = key_by_id("S-rsa1024-0")
        rng = prng(b"stateful")
        first = key.sign_with_seed(b"same", SEED, rng)
        second = key.sign_with_seed(b"same", SEED, rng)
        self.assertEqual(first, second)
        self.assertEqual(len(seen), 2)
        self.assertNotEqual(seen[0], seen[1])

    def test_unusable_draws_are_drawn_again(self) -> None:
        """0, n, a multiple of p and q itself are refused; the first unit of
        ``[1, n)`` drawn is the one used."""
        seen = self.record_crt_inputs()
        key = key_by_id("S-rsa1024-0")
        nums = key.key.private_numbers()
        n, e, k = key.public.n, key.public.e, key.size_bytes
        self.assertEqual(n.bit_length(), 8 * k)  # no masking in play
        good = 0x1234567 * nums.p + 1
        self.assertEqual(math.gcd(good, n), 1)
        rng = scripted(
            SEED,
            bytes(k),
            n.to_bytes(k, "big"),
            (3 * nums.p).to_bytes(k, "big"),
            nums.q.to_bytes(k, "big"),
            good.to_bytes(k, "big"),
        )
        sig = key.sign(b"descriptor", rng)
        self.assertEqual(rng.left(), [])  # type: ignore[attr-defined]
        self.assertEqual(sig, plain_signature(key, b"descriptor", SEED))
        c = int.from_bytes(oaep_encode(b"descriptor", k, SEED), "big")
        self.assertEqual(seen, [c * pow(good, e, n) % n])

    def test_source_that_never_gives_a_factor(self) -> None:
        """A broken source is refused after a bounded number of draws: a
        :class:`CryptoError`, not a loop and not a fault report."""
        key = key_by_id("S-rsa512-0")
        for fill in (0x00, 0xFF):
            calls = []

            def rng(n: int, fill: int = fill) -> bytes:
                calls.append(n)
                return bytes([fill]) * n

            exc = self.assertRaises(CryptoError, key.sign_with_seed, b"x", SEED, rng)
            self.assertNotIsInstance(exc, RSAFaultError)
            self.assertEqual(len(calls), rsa.BLINDING_DRAWS)


@contextmanager
def pow_fault(key: PrivateKey, half: str) -> Iterator[list[int]]:
    """While active, ``pow`` inside ``rsa.py`` is off by one modulo ``p`` (or
    ``q``): a fault in one CRT half and nowhere else.  Yields the list of
    faults injected so far."""
    nums = key.key.private_numbers()
    modulus = {"p": nums.p, "q": nums.q}[half]
    faults: list[int] = []

    def faulty_pow(base: int, exp: int, mod: int | None = None) -> int:
        result = builtins.pow(base, exp, mod)
        if mod == modulus and exp > 0:
            faults.append(result)
            return (result + 1) % modulus
        return result

    assert "pow" not in vars(rsa)
    rsa.pow = faulty_pow  # type: ignore[attr-defined]
    try:
        yield faults
    finally:
        del rsa.pow  # type: ignore[attr-defined]


class FaultIsCaught(unittest.TestCase):
    def test_unchecked_fault_would_give_away_the_key(self) -> None:
        """Why the check exists: the raw CRT result under the fault factors
        ``n`` (Boneh-DeMillo-Lipton)."""
        key = key_by_id("S-rsa1024-1")
        nums = key.key.private_numbers()
        n, e, k = key.public.n, key.public.e, key.size_bytes
        c = int.from_bytes(oaep_encode(b"vote", k, SEED), "big")
        with pow_fault(key, "p"):
            bad = rsa._crt_private(key, c)
        self.assertEqual(math.gcd((pow(bad, e, n) - c) % n, n), nums.q)

    def test_fault_in_either_half_raises_and_emits_nothing(self) -> None:
        for key_id in ("S-rsa2048-0", "S-rsa1024-1", "S-rsa512-0"):
            key = key_by_id(key_id)
            block = oaep_encode(b"digest", key.size_bytes, SEED)
            good = key.sign_with_seed(b"digest", SEED, prng(b"r"))
            calls = (
                lambda: key.sign(b"digest", prng(b"r")),
                lambda: key.sign_with_seed(b"digest", SEED, prng(b"r")),
                lambda: key.raw_private(block, prng(b"r")),
            )
            for half in ("p", "q"):
                emitted: list[bytes] = []
                with pow_fault(key, half) as faults:
                    for call in calls:
                        exc = self.assertRaises(RSAFaultError, lambda: emitted.append(call()))
                        self.assertIsInstance(exc, CryptoError)
                        # the wrong value is not carried out in the exception
                        self.assertEqual(len(exc.args), 1)
                        self.assertIsInstance(exc.args[0], str)
                        self.assertIsNone(exc.__cause__)
                        self.assertIsNone(exc.__context__)
                self.assertEqual(emitted, [])
                self.assertEqual(len(faults), len(calls))
            # fault gone: the same call signs again, unchanged
            self.assertEqual(key.sign_with_seed(b"digest", SEED, prng(b"r")), good)

    def test_fault_after_the_crt_step(self) -> None:
        """A wrong value from the CRT step as a whole (the hook) is caught
        the same way."""
        key = key_by_id("S-rsa2048-1")
        real = rsa._crt_private
        self.patch(rsa, "_crt_private", lambda key, c: real(key, c) ^ 1)
        self.assertRaises(RSAFaultError, key.sign, b"directory", prng(b"z"))
