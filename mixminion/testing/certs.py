"""Certificates as the original Mixminion made them, for tests.

``cryptography`` no longer signs certificates with SHA-1, but 0.0.8 nodes
present SHA-1-signed chains; :func:`sha1_signed` re-signs one by hand.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

__all__ = ["der_tlv", "sha1_signed"]


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def der_tlv(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + _der_len(len(body)) + body


_ALG_SHA256_RSA = bytes.fromhex("300d06092a864886f70d01010b0500")
_ALG_SHA1_RSA = bytes.fromhex("300d06092a864886f70d0101050500")


def sha1_signed(cert: x509.Certificate, signer: rsa.RSAPrivateKey) -> bytes:
    """``cert`` re-signed with sha1WithRSAEncryption, as 0.0.8 did.
    ``cryptography`` no longer signs certificates with SHA-1, so the TBS is
    edited (the two algorithm identifiers have the same length) and the
    certificate reassembled by hand."""
    tbs = cert.tbs_certificate_bytes
    assert tbs.count(_ALG_SHA256_RSA) == 1
    tbs = tbs.replace(_ALG_SHA256_RSA, _ALG_SHA1_RSA)
    signature = signer.sign(tbs, padding.PKCS1v15(), hashes.SHA1())
    return der_tlv(0x30, tbs + _ALG_SHA1_RSA + der_tlv(0x03, b"\x00" + signature))
