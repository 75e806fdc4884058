"""Symmetric primitives of Type III (spec: crypto.md §1-§9).

SHA-1, AES-128 in the protocol's counter mode, the keystream PRNG, key
derivation from a master secret, Mixminion's own LIONESS and BEAR, and
whitening.  All through ``cryptography``; byte strings in, byte strings
out.  Not ``hashlib``: it loads the system's libcrypto beside
cryptography's own, which cost the processing child 3.7 MB of its memory
(issue 18), for hashing the same library does.
"""

from __future__ import annotations

from typing import Callable, Tuple

try:
    # What ``hmac.compare_digest`` is, imported from where it lives:
    # importing ``hmac`` (or cryptography's ``constant_time``, which
    # imports it) loads ``_hashlib`` and with it the system's libcrypto.
    from _operator import _compare_digest as _constant_time_equal
except ImportError:  # an interpreter without CPython's _operator
    from hmac import compare_digest as _constant_time_equal

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from mixminion.codec.errors import CryptoError

DIGEST_LEN = 20
AES_KEY_LEN = 16

#: A source of random bytes: ``rng(n)`` returns ``n`` bytes.  Injected
#: everywhere randomness is needed so that the codec stays deterministic
#: under test and pure in production.
RandomSource = Callable[[int], bytes]

LionessKeys = Tuple[bytes, bytes, bytes, bytes]
BearKeys = Tuple[bytes, bytes]

# Mode strings of crypto.md §5, byte-exact.
HEADER_SECRET_MODE = b"HEADER SECRET KEY"
RANDOM_JUNK_MODE = b"RANDOM JUNK"
HEADER_ENCRYPT_MODE = b"HEADER ENCRYPT"
PAYLOAD_ENCRYPT_MODE = b"PAYLOAD ENCRYPT"
HIDE_HEADER_MODE = b"HIDE HEADER"
HIDE_PAYLOAD_MODE = b"HIDE PAYLOAD"
REPLAY_PREVENTION_MODE = b"REPLAY PREVENTION"
APPLICATION_KEY_MODE = b"APPLICATION KEY"
END_TO_END_ENCRYPT_MODE = b"END-TO-END ENCRYPT"
WHITEN_MODE = b"WHITEN"

_ZERO_BLOCKS = bytes(16)


_SHA1 = hashes.SHA1()


def sha1(*parts: bytes) -> bytes:
    """``H(x)``: the protocol's only hash, of ``parts`` one after the
    other (hashed in turn, never joined into a copy)."""
    h = hashes.Hash(_SHA1)
    for part in parts:
        h.update(part)
    return h.finalize()


def digests_equal(a: bytes, b: bytes) -> bool:
    """Compare two digests in constant time."""
    return _constant_time_equal(a, b)


def strxor(a: bytes, b: bytes) -> bytes:
    """Byte-wise XOR of two strings of the same length."""
    if len(a) != len(b):
        raise ValueError("strxor needs strings of equal length")
    n = len(a)
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(n, "big")


def _keystream_encryptor(key: bytes, idx: int):
    if len(key) != AES_KEY_LEN:
        raise ValueError("AES-128 key must be 16 bytes")
    block = idx >> 4
    counter = (block & ((1 << 128) - 1)).to_bytes(16, "big")
    return Cipher(algorithms.AES(key), modes.CTR(counter)).encryptor()


def ctr(key: bytes, data: bytes, idx: int = 0) -> bytes:
    """``CTR(K, data, idx)``: XOR ``data`` with the keystream from byte ``idx``.

    The counter block is the 128-bit big-endian block number with no nonce
    (crypto.md §3); ``idx`` is a byte offset, so a partial first block is
    skipped.
    """
    if idx < 0:
        raise ValueError("negative keystream offset")
    enc = _keystream_encryptor(key, idx)
    skip = idx & 15
    if skip:
        enc.update(_ZERO_BLOCKS[:skip])
    return enc.update(data)


def prng(key: bytes, n: int, idx: int = 0) -> bytes:
    """``PRNG(K, n, idx)``: ``n`` keystream bytes from offset ``idx``."""
    return ctr(key, bytes(n), idx)


def aes_block_encrypt(key: bytes, block: bytes) -> bytes:
    """One AES-128 block encryption (used by the vector runner only)."""
    enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return enc.update(block) + enc.finalize()


def aes_block_decrypt(key: bytes, block: bytes) -> bytes:
    """One AES-128 block decryption (used by the vector runner only)."""
    dec = Cipher(algorithms.AES(key), modes.ECB()).decryptor()
    return dec.update(block) + dec.finalize()


class AESCounterPRNG:
    """The keystream of one 16-byte seed handed out sequentially (§4).

    A state-carrying reply block's secrets come from one of these, so the
    exact sequence matters; it is simply ``PRNG(seed, ·, 0)`` read in order.
    """

    #: total keystream the reference allows before it declares the period
    #: exhausted (it refills in 16 KiB steps and stops before 2**32).
    PERIOD = 1 << 32

    def __init__(self, seed: bytes) -> None:
        self._enc = _keystream_encryptor(seed, 0)
        self._drawn = 0

    def __call__(self, n: int) -> bytes:
        return self.get_bytes(n)

    def get_bytes(self, n: int) -> bytes:
        if n < 0:
            raise ValueError("negative length")
        if self._drawn + n >= self.PERIOD:
            raise CryptoError("AES counter PRNG exhausted its period")
        self._drawn += n
        return self._enc.update(bytes(n))


# --- key derivation (crypto.md §5) ---------------------------------------


def derive_key(master: bytes, mode: bytes, n: int = AES_KEY_LEN) -> bytes:
    """``Key(M, mode, n) = H(M || mode)[0:n]``."""
    if not 1 <= n <= DIGEST_LEN:
        raise ValueError("derived keys are 1..20 bytes")
    return sha1(master + mode)[:n]


def lioness_keys(master: bytes, mode: bytes) -> LionessKeys:
    """Four 20-byte LIONESS keys: K1 = H(M||mode), then K1 with its last
    byte XORed with 1, 2, 3."""
    k1 = sha1(master + mode)
    head, last = k1[:19], k1[19]
    return (k1, head + bytes((last ^ 1,)), head + bytes((last ^ 2,)), head + bytes((last ^ 3,)))


def bear_keys(master: bytes, mode: bytes) -> BearKeys:
    """The first two LIONESS keys, as BEAR uses them."""
    k1, k2, _, _ = lioness_keys(master, mode)
    return (k1, k2)


# --- LIONESS and BEAR (crypto.md §6, §7) ----------------------------------


def _keyed_hash(key: bytes, data: bytes) -> bytes:
    return sha1(key, data, key)


def _stream_key(key: bytes, left: bytes) -> bytes:
    return sha1(key, left, key)[:AES_KEY_LEN]


def _xor20(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(DIGEST_LEN, "big")


def _check_wide(block: bytes) -> None:
    if len(block) <= DIGEST_LEN:
        raise CryptoError("LIONESS/BEAR need more than 20 bytes of input")


def lioness_encrypt(block: bytes, keys: LionessKeys) -> bytes:
    """Mixminion's LIONESS (not the textbook construction), encrypt."""
    _check_wide(block)
    k1, k2, k3, k4 = keys
    left, right = block[:DIGEST_LEN], block[DIGEST_LEN:]
    right = ctr(_stream_key(k1, left), right)
    left = _xor20(left, _keyed_hash(k2, right))
    right = ctr(_stream_key(k3, left), right)
    left = _xor20(left, _keyed_hash(k4, right))
    return left + right


def lioness_decrypt(block: bytes, keys: LionessKeys) -> bytes:
    """Inverse of :func:`lioness_encrypt`: the same rounds in reverse."""
    _check_wide(block)
    k1, k2, k3, k4 = keys
    left, right = block[:DIGEST_LEN], block[DIGEST_LEN:]
    left = _xor20(left, _keyed_hash(k4, right))
    right = ctr(_stream_key(k3, left), right)
    left = _xor20(left, _keyed_hash(k2, right))
    right = ctr(_stream_key(k1, left), right)
    return left + right


def bear_encrypt(block: bytes, keys: BearKeys) -> bytes:
    """BEAR as the reference defines it (unused by the protocol)."""
    k1, k2 = keys
    return _bear(block, k1, k2)


def bear_decrypt(block: bytes, keys: BearKeys) -> bytes:
    """Inverse of :func:`bear_encrypt`: the same rounds, keys swapped."""
    k1, k2 = keys
    return _bear(block, k2, k1)


def _bear(block: bytes, first: bytes, last: bytes) -> bytes:
    """BEAR's three rounds: hash with ``first``, stream, hash with ``last``."""
    _check_wide(block)
    left, right = block[:DIGEST_LEN], block[DIGEST_LEN:]
    left = _xor20(left, _keyed_hash(first, right))
    right = ctr(sha1(left)[:AES_KEY_LEN], right)
    left = _xor20(left, _keyed_hash(last, right))
    return left + right


# --- swap point and whitening (crypto.md §8, §9) --------------------------


def keys_from_payload(payload: bytes) -> LionessKeys:
    """LIONESS keys for header 2 at the swap point, from the payload."""
    return lioness_keys(sha1(payload), HIDE_HEADER_MODE)


def keys_from_header(header: bytes) -> LionessKeys:
    """LIONESS keys for the payload at the swap point, from header 2."""
    return lioness_keys(sha1(header), HIDE_PAYLOAD_MODE)


WHITEN_KEYS: LionessKeys = lioness_keys(WHITEN_MODE, WHITEN_MODE)


def whiten(data: bytes) -> bytes:
    """All-or-nothing transform of a fragmented message (public keys)."""
    return lioness_encrypt(data, WHITEN_KEYS)


def unwhiten(data: bytes) -> bytes:
    """Inverse of :func:`whiten`."""
    return lioness_decrypt(data, WHITEN_KEYS)
