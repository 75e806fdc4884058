"""RSA as Type III uses it (spec: crypto.md §10).

OAEP with SHA-1, MGF1-SHA-1 and the Thomas Paine label; PKCS#1 DER keys;
key IDs; and the "OAEP then private-key exponentiation" signature with
message recovery.  Decryption goes through OpenSSL (``cryptography``); the
encoding side is written out here so that the OAEP seed can be injected
(known-answer vectors, deterministic tests) and so that signatures, which no
library offers, share one implementation with encryption.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass, field
from functools import cached_property

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from mixminion.codec.crypto import RandomSource, sha1
from mixminion.codec.errors import CryptoError

OAEP_LABEL = (
    b"He who would make his own liberty secure, must guard even his enemy "
    b"from oppression."
)
OAEP_LABEL_HASH = sha1(OAEP_LABEL)
OAEP_OVERHEAD = 42
PUBLIC_EXPONENT = 65537
PACKET_KEY_BYTES = 256
#: the descriptor parser's bound on a base64-decoded public key (§10.4)
MAX_PUBLIC_KEY_DER = 550

_OAEP_PADDING = padding.OAEP(
    mgf=padding.MGF1(algorithm=hashes.SHA1()),
    algorithm=hashes.SHA1(),
    label=OAEP_LABEL,
)


def mgf1(seed: bytes, length: int) -> bytes:
    """MGF1 with SHA-1."""
    out = bytearray()
    counter = 0
    while len(out) < length:
        out += hashlib.sha1(seed + counter.to_bytes(4, "big")).digest()
        counter += 1
    return bytes(out[:length])


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")


def oaep_encode(message: bytes, k: int, seed: bytes, label: bytes = OAEP_LABEL) -> bytes:
    """RSAES-OAEP encoding (PKCS#1 v2.0) to a ``k``-byte block."""
    if len(seed) != 20:
        raise ValueError("OAEP seed must be 20 bytes")
    if len(message) > k - OAEP_OVERHEAD:
        raise CryptoError("message too long for OAEP with this modulus")
    db = sha1(label) + bytes(k - OAEP_OVERHEAD - len(message)) + b"\x01" + message
    masked_db = _xor(db, mgf1(seed, k - 21))
    masked_seed = _xor(seed, mgf1(masked_db, 20))
    return b"\x00" + masked_seed + masked_db


def oaep_decode(block: bytes, k: int, label: bytes = OAEP_LABEL) -> bytes:
    """Inverse of :func:`oaep_encode`; any defect is a :class:`CryptoError`."""
    if len(block) != k or k < OAEP_OVERHEAD:
        raise CryptoError("OAEP block has the wrong length")
    masked_seed, masked_db = block[1:21], block[21:]
    seed = _xor(masked_seed, mgf1(masked_db, 20))
    db = _xor(masked_db, mgf1(seed, k - 21))
    ok = block[0] == 0
    ok &= hmac.compare_digest(db[:20], sha1(label))
    rest = db[20:].lstrip(b"\x00")
    ok &= rest[:1] == b"\x01"
    if not ok:
        raise CryptoError("OAEP decoding failed")
    return rest[1:]


def _int_to_bytes(value: int, k: int) -> bytes:
    return value.to_bytes(k, "big")


@dataclass(frozen=True, eq=False)
class PublicKey:
    """An RSA public key with the protocol's encodings attached."""

    key: rsa.RSAPublicKey
    n: int = field(init=False)
    e: int = field(init=False)

    def __post_init__(self) -> None:
        numbers = self.key.public_numbers()
        object.__setattr__(self, "n", numbers.n)
        object.__setattr__(self, "e", numbers.e)

    @classmethod
    def from_der(cls, der: bytes) -> "PublicKey":
        """Parse a PKCS#1 ``RSAPublicKey`` DER (not SubjectPublicKeyInfo)."""
        try:
            key = serialization.load_der_public_key(der)
        except (ValueError, UnsupportedAlgorithm, TypeError) as exc:
            raise CryptoError(f"not a DER RSA public key: {exc}") from None
        if not isinstance(key, rsa.RSAPublicKey):
            raise CryptoError("not an RSA public key")
        pub = cls(key)
        if pub.der != der:
            raise CryptoError("public key is not in PKCS#1 RSAPublicKey DER form")
        if pub.e != PUBLIC_EXPONENT:
            raise CryptoError("RSA public exponent must be 65537")
        return pub

    @property
    def size_bytes(self) -> int:
        """Modulus length in bytes (``k``)."""
        return (self.n.bit_length() + 7) // 8

    @cached_property
    def der(self) -> bytes:
        return self.key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.PKCS1
        )

    @cached_property
    def keyid(self) -> bytes:
        """``H(DER public key)``: the key digest used in routing info."""
        return sha1(self.der)

    @property
    def fingerprint(self) -> str:
        return self.keyid.hex().upper()

    def raw_public(self, block: bytes) -> bytes:
        """Raw ``m^e mod n`` as ``k`` bytes."""
        k = self.size_bytes
        m = int.from_bytes(block, "big")
        if len(block) != k or m >= self.n:
            raise CryptoError("RSA input too large for modulus")
        return _int_to_bytes(pow(m, self.e, self.n), k)

    def encrypt(self, message: bytes, rng: RandomSource = os.urandom) -> bytes:
        """OAEP-encrypt ``message`` with a seed drawn from ``rng``."""
        return self.encrypt_with_seed(message, rng(20))

    def encrypt_with_seed(self, message: bytes, seed: bytes) -> bytes:
        """OAEP-encrypt with an explicit 20-byte seed."""
        return self.raw_public(oaep_encode(message, self.size_bytes, seed))

    def verify(self, signature: bytes) -> bytes:
        """Recover the data of an OAEP signature; raise if malformed."""
        k = self.size_bytes
        if len(signature) != k:
            raise CryptoError("signature has the wrong length")
        return oaep_decode(self.raw_public(signature), k)

    def check_signature(self, signature: bytes, expected: bytes) -> bool:
        """True when ``signature`` recovers exactly ``expected``."""
        try:
            data = self.verify(signature)
        except CryptoError:
            return False
        return hmac.compare_digest(data, expected)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicKey) and self.n == other.n and self.e == other.e

    def __hash__(self) -> int:
        return hash((self.n, self.e))


@dataclass(frozen=True, eq=False)
class PrivateKey:
    """An RSA private key: fast OAEP decryption through OpenSSL, and the
    raw private operation (CRT) for signing."""

    key: rsa.RSAPrivateKey

    @classmethod
    def from_der(cls, der: bytes) -> "PrivateKey":
        """Parse a PKCS#1 ``RSAPrivateKey`` (or PKCS#8) DER."""
        try:
            key = serialization.load_der_private_key(der, password=None)
        except (ValueError, UnsupportedAlgorithm, TypeError) as exc:
            raise CryptoError(f"not a DER RSA private key: {exc}") from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise CryptoError("not an RSA private key")
        return cls(key)

    @classmethod
    def generate(cls, bits: int = 2048) -> "PrivateKey":
        return cls(rsa.generate_private_key(public_exponent=PUBLIC_EXPONENT, key_size=bits))

    @cached_property
    def public(self) -> PublicKey:
        return PublicKey(self.key.public_key())

    @property
    def size_bytes(self) -> int:
        return self.public.size_bytes

    @cached_property
    def der(self) -> bytes:
        """PKCS#1 ``RSAPrivateKey`` DER."""
        return self.key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )

    @cached_property
    def _crt(self) -> tuple[int, int, int, int, int]:
        nums = self.key.private_numbers()
        return (nums.p, nums.q, nums.dmp1, nums.dmq1, nums.iqmp)

    def raw_private(self, block: bytes) -> bytes:
        """Raw ``c^d mod n`` as ``k`` bytes (CRT)."""
        pub = self.public
        k = pub.size_bytes
        c = int.from_bytes(block, "big")
        if len(block) != k or c >= pub.n:
            raise CryptoError("RSA input too large for modulus")
        p, q, dp, dq, qinv = self._crt
        m1 = pow(c, dp, p)
        m2 = pow(c, dq, q)
        h = (qinv * (m1 - m2)) % p
        return _int_to_bytes(m2 + h * q, k)

    def decrypt(self, ciphertext: bytes) -> bytes:
        """OAEP-decrypt; any failure is a :class:`CryptoError`."""
        try:
            return self.key.decrypt(ciphertext, _OAEP_PADDING)
        except ValueError:
            raise CryptoError("RSA/OAEP decryption failed") from None

    def sign(self, data: bytes, rng: RandomSource = os.urandom) -> bytes:
        """Type III signature: OAEP-encode ``data``, then the private op."""
        return self.sign_with_seed(data, rng(20))

    def sign_with_seed(self, data: bytes, seed: bytes) -> bytes:
        return self.raw_private(oaep_encode(data, self.size_bytes, seed))
