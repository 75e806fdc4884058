"""The responder's certificate chain and its check (mmtp.md sections 3 and 5).

Pure: DER bytes in, a KeyID or a :class:`TLSVerificationError` out, with
``cryptography`` only (no pyOpenSSL, no Twisted; the certificate fields
are read by :mod:`mixminion.mmtp.certificate`), so the node's Twisted
initiator and the client's standard-library sender check a peer with the
same code.
"""

from __future__ import annotations

import hmac

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from mixminion.codec.rsa import PUBLIC_EXPONENT, PublicKey
from mixminion.mmtp.certificate import (
    RSA_SIGNATURES,
    CertificateFields,
    CertificateFormatError,
    read_certificate,
)

KEYID_LEN = 20
#: "Do not authenticate the responder" (``mixminion ping``).
ZERO_KEYID = bytes(KEYID_LEN)

MODERN_LINK_BITS = 2048
LEGACY_LINK_BITS = 1024
IDENTITY_MIN_BITS = 2048
IDENTITY_MAX_BITS = 4096

#: link-certificate signature hashes accepted (names as in RSA_SIGNATURES)
_MODERN_SIGNATURE_HASHES: dict[str, hashes.HashAlgorithm] = {
    "sha256": hashes.SHA256(),
    "sha384": hashes.SHA384(),
    "sha512": hashes.SHA512(),
}
_LEGACY_SIGNATURE_HASHES = {**_MODERN_SIGNATURE_HASHES, "sha1": hashes.SHA1()}


# ---------------------------------------------------------------- errors


class TLSVerificationError(Exception):
    """The responder could not be authenticated; the connection must be
    closed and its packets retried later (mmtp.md section 5)."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").split("\n\n")[0].strip())


class KeyIdMismatch(TLSVerificationError):
    """The responder proved an identity key other than the one the routing
    information named."""

    def __init__(self, expected_keyid: bytes, found_keyid: bytes) -> None:
        # Key IDs are routing data: attributes only, never in the message.
        super().__init__()
        self.expected_keyid = expected_keyid
        self.found_keyid = found_keyid

    @property
    def expected_fingerprint(self) -> str:
        return self.expected_keyid.hex().upper()

    @property
    def found_fingerprint(self) -> str:
        return self.found_keyid.hex().upper()


class BadCertificateChain(TLSVerificationError):
    """The responder's certificate chain is malformed or does not certify
    its link key."""


class _ValidityError(TLSVerificationError):
    def __init__(self, not_before: float, not_after: float) -> None:
        super().__init__()
        self.not_before = not_before
        self.not_after = not_after


class CertificateNotYetValid(_ValidityError):
    """The responder's link certificate is not valid yet; one side's clock
    may be wrong."""


class CertificateExpired(_ValidityError):
    """The responder's link certificate has expired; one side's clock may
    be wrong."""


class LinkKeyIsIdentity(TLSVerificationError):
    """The responder's TLS key hashes to the expected KeyID: that is the
    pre-0.0.4 scheme, which is refused."""


# ---------------------------------------------------------- verification


def _parse(der: bytes, role: str) -> CertificateFields:
    try:
        return read_certificate(der)
    except CertificateFormatError:
        raise BadCertificateChain(f"the {role} certificate cannot be parsed") from None


def _check_validity(leaf: CertificateFields, now: float) -> None:
    if now < leaf.not_before:
        raise CertificateNotYetValid(leaf.not_before, leaf.not_after)
    if now > leaf.not_after:
        raise CertificateExpired(leaf.not_before, leaf.not_after)


def _rsa_key(cert: CertificateFields, role: str) -> rsa.RSAPublicKey:
    try:
        key = serialization.load_der_public_key(cert.public_key_info)
    except (ValueError, UnsupportedAlgorithm):
        raise BadCertificateChain(f"the {role} public key cannot be parsed") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise BadCertificateChain(f"the {role} key is not an RSA key")
    return key


def _check_link_key(key: rsa.RSAPublicKey, legacy: bool) -> None:
    minimum = LEGACY_LINK_BITS if legacy else MODERN_LINK_BITS
    if key.key_size < minimum:
        raise BadCertificateChain(f"the link key is shorter than {minimum} bits")


def _check_identity_key(key: rsa.RSAPublicKey) -> None:
    if not IDENTITY_MIN_BITS <= key.key_size <= IDENTITY_MAX_BITS:
        raise BadCertificateChain("the identity key is not 2048-4096 bits")
    if key.public_numbers().e != PUBLIC_EXPONENT:
        raise BadCertificateChain("the identity key's exponent is not 65537")


def _identity_der(chain: list[bytes]) -> bytes:
    if len(chain) != 2:
        raise BadCertificateChain(f"the chain has {len(chain)} certificates, not 2")
    others = [der for der in chain if der != chain[0]]
    if not others:
        raise BadCertificateChain("the chain repeats the link certificate")
    return others[0]


def _check_leaf_signature(
    leaf: CertificateFields, identity: rsa.RSAPublicKey, legacy: bool
) -> None:
    allowed = _LEGACY_SIGNATURE_HASHES if legacy else _MODERN_SIGNATURE_HASHES
    algorithm = allowed.get(RSA_SIGNATURES.get(leaf.signature_oid, ""))
    if algorithm is None:
        raise BadCertificateChain("the link certificate's signature algorithm is refused")
    try:
        identity.verify(leaf.signature, leaf.tbs, padding.PKCS1v15(), algorithm)
    except (InvalidSignature, ValueError):
        raise BadCertificateChain("the link certificate is not signed by the identity key") from None


def _keyid(key: rsa.RSAPublicKey) -> bytes:
    """SHA-1 of the PKCS#1 ``RSAPublicKey`` DER -- the one KeyID rule."""
    return PublicKey(key).keyid


def _match(found: bytes, expected: bytes) -> bytes:
    if not hmac.compare_digest(found, expected):
        raise KeyIdMismatch(expected, found)
    return found


def verify_chain(
    chain: list[bytes], expected_keyid: bytes, now: float, cache: dict[bytes, bytes],
    legacy: bool = False,
) -> bytes:
    """Authenticate a responder from its chain as sent, leaf first, as DER
    (mmtp.md section 5): the authenticated KeyID, or :data:`ZERO_KEYID`
    when none was asked for.  Every defect of the chain raises a
    :class:`TLSVerificationError`."""
    if len(expected_keyid) != KEYID_LEN:
        raise ValueError("a KeyID is 20 bytes")  # our caller's mistake
    try:
        return _verify(chain, expected_keyid, now, cache, legacy)
    except (ValueError, UnsupportedAlgorithm):
        # A parser corner not mapped above must still not crash a relay
        # (the reference did: section 13).
        raise BadCertificateChain() from None


def _verify(
    chain: list[bytes], expected: bytes, now: float, cache: dict[bytes, bytes], legacy: bool
) -> bytes:
    if not chain:
        raise BadCertificateChain("the responder sent no certificate")
    leaf = _parse(chain[0], "link")
    _check_validity(leaf, now)  # step 1
    link_key = _rsa_key(leaf, "link")
    _check_link_key(link_key, legacy)
    if expected == ZERO_KEYID:  # step 2
        return ZERO_KEYID
    link_digest = _keyid(link_key)
    if hmac.compare_digest(link_digest, expected):  # step 3
        raise LinkKeyIsIdentity()
    cached = cache.get(link_digest)
    if cached is not None:  # step 4
        return _match(cached, expected)
    identity_cert = _parse(_identity_der(chain), "identity")  # step 5
    identity_key = _rsa_key(identity_cert, "identity")
    _check_identity_key(identity_key)
    _check_leaf_signature(leaf, identity_key, legacy)
    found = _keyid(identity_key)  # step 6
    cache[link_digest] = found
    return _match(found, expected)  # step 7
