"""TLS for MMTP: link certificates, TLS contexts, and the responder check.

Spec: mmtp.md sections 2-5, 10 and 14.1.  A responder proves its identity
by sending the chain ``[link certificate, identity certificate]`` where the
short-lived link key is certified by the long-lived identity key; the
initiator accepts any chain during the handshake and then checks, with
:func:`verify_responder`, that the identity key hashes to the KeyID its
routing information named.  Names, serials and the identity certificate's
self-signature are deliberately not checked (section 3): only keys, the
leaf's signature and the leaf's validity window matter.

Legacy mode (off by default, ``doc/mmtp-legacy.md``) additionally speaks
TLS 1.0 with ``DHE-RSA-AES128-SHA`` and accepts 1024-bit link keys and
SHA-1 certificate signatures; it lowers OpenSSL's security level for that
context only.
"""

from __future__ import annotations

import datetime
import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLContextFactory,
    IOpenSSLServerConnectionCreator,
)
from twisted.logger import Logger
from zope.interface import implementer

from mixminion.codec.rsa import PUBLIC_EXPONENT, PrivateKey, PublicKey
from mixminion.mmtp.chain import (
    IDENTITY_MAX_BITS,
    IDENTITY_MIN_BITS,
    MODERN_LINK_BITS,
    ZERO_KEYID,
    BadCertificateChain,
    CertificateExpired,
    CertificateNotYetValid,
    KeyIdMismatch,
    LinkKeyIsIdentity,
    TLSVerificationError,
    verify_chain,
)

__all__ = [
    "BadCertificateChain",
    "CERTIFICATE_LIFETIME",
    "CERTIFICATE_SKEW",
    "CertificateExpired",
    "CertificateNotYetValid",
    "InitiatorTLS",
    "KeyIdMismatch",
    "LinkCredentials",
    "LinkKeyIsIdentity",
    "ResponderContextFactory",
    "ResponderTLS",
    "TLSVerificationError",
    "ZERO_KEYID",
    "make_certificate",
    "make_initiator_context",
    "make_link_credentials",
    "make_responder_context",
    "peer_chain",
    "verify_responder",
]

_log = Logger()

#: A certificate pair is replaced after this long (mmtp.md section 4.1).
CERTIFICATE_LIFETIME = 86400
#: Validity slack on both sides so skewed peers still accept (section 10).
CERTIFICATE_SKEW = 7200
#: Serial numbers count seconds from 2003-01-01 05:00:00 UTC (section 3).
SERIAL_EPOCH = 1041397200
ORGANIZATION = "Mixminion network"
LINK_CN_SUFFIX = "<MMTP>"
#: The initiator keeps at most this many link-key -> KeyID entries.
DEFAULT_CACHE_LIMIT = 4096

# TLS 1.2 suites: ECDHE + AEAD only.  The link key is always RSA.
_MODERN_TLS12_CIPHERS = (
    "ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-RSA-CHACHA20-POLY1305"
)
# TLS 1.3 suites are all AEAD; named so that a changed OpenSSL default
# (CCM, say) cannot slip in unnoticed.
_TLS13_SUITES = b"TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
# The one suite 0.0.8-era nodes speak (TLS_DHE_RSA_WITH_AES_128_CBC_SHA).
# OpenSSL 3 refuses TLS < 1.2 and SHA-1 above security level 0, so legacy
# contexts run at level 0; the cipher list still limits what is offered.
LEGACY_CIPHER = "DHE-RSA-AES128-SHA"
_LEGACY_CIPHERS = f"{_MODERN_TLS12_CIPHERS}:{LEGACY_CIPHER}:@SECLEVEL=0"

# RFC 7919 "ffdhe2048" (p = 2^2048 - 2^1984 + (floor(2^1918 e) + 560316)
# 2^64 - 1, g = 2), used for DHE in legacy mode.  A fixed, published group:
# generating parameters at run time takes seconds to minutes, and 2048 bits
# keeps even legacy mode above the section 14.1 floor for finite-field DH.
# 0.0.8-era OpenSSL accepts any group size the server picks.
FFDHE2048_PEM = b"""-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""

#: What :func:`verify_responder` accepts as one certificate.
CertificateLike = bytes | crypto.X509 | x509.Certificate


# ---------------------------------------------------------- certificates


@dataclass(frozen=True, eq=False)
class LinkCredentials:
    """One link key and its two-certificate chain; held only in memory."""

    link_key: rsa.RSAPrivateKey = field(repr=False)
    link_cert: x509.Certificate
    identity_cert: x509.Certificate
    created_at: float
    not_before: float
    expires_at: float

    @property
    def chain(self) -> tuple[x509.Certificate, x509.Certificate]:
        """What the responder sends: leaf first, then the identity cert."""
        return (self.link_cert, self.identity_cert)

    @property
    def chain_der(self) -> list[bytes]:
        return [c.public_bytes(serialization.Encoding.DER) for c in self.chain]

    @property
    def link_digest(self) -> bytes:
        """SHA-1 of the link public key's DER: the initiator's cache key."""
        return PublicKey(self.link_key.public_key()).keyid

    def needs_rotation(self, now: float, max_age: float = CERTIFICATE_LIFETIME) -> bool:
        """True once the pair is ``max_age`` old, or if the clock went back
        so far that peers would see it as not yet valid."""
        return now >= self.created_at + max_age or now < self.not_before


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _utc(seconds: int) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, tz=datetime.timezone.utc)


def make_certificate(
    subject_key: rsa.RSAPublicKey,
    signer: rsa.RSAPrivateKey,
    subject_cn: str,
    issuer_cn: str,
    now: float,
) -> x509.Certificate:
    """A v3 certificate with no extensions, following section 3's rules for
    serial and validity, signed with sha256WithRSAEncryption."""
    base = math.floor(now)
    serial = base - SERIAL_EPOCH
    if serial <= 0:
        raise ValueError("clock is before 2003: cannot number the certificate")
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject_cn))
        .issuer_name(_name(issuer_cn))
        .public_key(subject_key)
        .serial_number(serial)
        .not_valid_before(_utc(base - CERTIFICATE_SKEW))
        .not_valid_after(_utc(base + CERTIFICATE_LIFETIME + CERTIFICATE_SKEW))
    )
    return builder.sign(signer, hashes.SHA256())


def _check_nickname(nickname: str) -> None:
    # X.509 caps a CN at 64 characters and "<MMTP>" takes 6 of them.
    if not nickname or len(nickname) + len(LINK_CN_SUFFIX) > 64:
        raise ValueError("nickname must be 1-58 characters to fit a certificate")


def make_link_credentials(
    identity: PrivateKey,
    nickname: str,
    now: float,
    link_bits: int = MODERN_LINK_BITS,
    *,
    link_key: rsa.RSAPrivateKey | None = None,
) -> LinkCredentials:
    """A fresh link key plus ``[link cert, identity cert]`` valid from
    ``now - 2 h`` to ``now + 26 h``.  ``link_key`` is for tests only;
    normally a new key is generated so rotation really changes the key."""
    _check_nickname(nickname)
    if link_key is None:
        link_key = rsa.generate_private_key(public_exponent=PUBLIC_EXPONENT, key_size=link_bits)
    ident = identity.key
    link_cert = make_certificate(
        link_key.public_key(), ident, nickname + LINK_CN_SUFFIX, nickname, now
    )
    identity_cert = make_certificate(ident.public_key(), ident, nickname, nickname, now)
    base = math.floor(now)
    return LinkCredentials(
        link_key=link_key,
        link_cert=link_cert,
        identity_cert=identity_cert,
        created_at=now,
        not_before=base - CERTIFICATE_SKEW,
        expires_at=base + CERTIFICATE_LIFETIME + CERTIFICATE_SKEW,
    )


# -------------------------------------------------------------- contexts


def _accept_any_chain(conn: SSL.Connection, cert: Any, errno: int, depth: int, ok: int) -> bool:
    """MMTP peers are known by key, not by CA: accept here, check the chain
    with :func:`verify_responder` once the handshake is done."""
    return True


def _load_fixed_dh(ctx: SSL.Context) -> None:
    # pyOpenSSL only loads DH parameters from a file; they are public.
    with tempfile.TemporaryDirectory(prefix="mixminion-dh-") as tmp:
        path = os.path.join(tmp, "ffdhe2048.pem")
        with open(path, "wb") as out:
            out.write(FFDHE2048_PEM)
        ctx.load_tmp_dh(path.encode())


def _base_context(legacy: bool) -> SSL.Context:
    """Protocol versions, suites and the no-resumption settings both sides
    share.  The cipher list goes first: it sets the security level that
    later certificate and DH checks are made against."""
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_cipher_list((_LEGACY_CIPHERS if legacy else _MODERN_TLS12_CIPHERS).encode())
    ctx.set_tls13_ciphersuites(_TLS13_SUITES)
    ctx.set_min_proto_version(SSL.TLS1_VERSION if legacy else SSL.TLS1_2_VERSION)
    ctx.set_max_proto_version(SSL.TLS1_3_VERSION)
    # No tickets and no session cache: resumption would let a connection
    # outlive the link key it was authenticated with (sections 4.1, 14.1).
    ctx.set_options(SSL.OP_NO_TICKET | SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    return ctx


def make_responder_context(credentials: LinkCredentials, legacy: bool = False) -> SSL.Context:
    """The listening side's context for one certificate pair."""
    ctx = _base_context(legacy)
    ctx.set_options(SSL.OP_CIPHER_SERVER_PREFERENCE)
    if legacy:
        # TLS 1.0 for 0.0.8-era peers, but not 1.1, which none of them
        # speaks (a server may leave this hole in its version range).
        ctx.set_options(SSL.OP_NO_TLSv1_1)
        _load_fixed_dh(ctx)
    ctx.set_verify(SSL.VERIFY_NONE)  # the initiator is never authenticated
    ctx.use_certificate(credentials.link_cert)
    ctx.add_extra_chain_cert(credentials.identity_cert)
    ctx.use_privatekey(credentials.link_key)
    ctx.check_privatekey()
    return ctx


def make_initiator_context(legacy: bool = False) -> SSL.Context:
    """The connecting side's context: no client certificate, any chain."""
    ctx = _base_context(legacy)
    ctx.set_verify(SSL.VERIFY_PEER, _accept_any_chain)
    return ctx


@implementer(IOpenSSLContextFactory, IOpenSSLServerConnectionCreator)
class ResponderContextFactory:
    """A Twisted context factory for one certificate pair.  The context is
    built once and never mutated afterwards (OpenSSL forbids changing a
    context that connections already use)."""

    def __init__(self, credentials: LinkCredentials, legacy: bool = False) -> None:
        self.credentials = credentials
        self.legacy = legacy
        self._context: SSL.Context | None = None

    def getContext(self) -> SSL.Context:  # noqa: N802 - Twisted interface
        if self._context is None:
            self._context = make_responder_context(self.credentials, self.legacy)
        return self._context

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:  # noqa: N802,N803
        return SSL.Connection(self.getContext(), None)


class TimeSource(Protocol):
    """What the responder needs of ``IReactorTime``."""

    def seconds(self) -> float: ...


def _default_clock() -> TimeSource:
    from twisted.internet import reactor

    return reactor  # type: ignore[return-value]


def _check_identity_private(identity: PrivateKey) -> None:
    bits = identity.key.key_size
    if not IDENTITY_MIN_BITS <= bits <= IDENTITY_MAX_BITS or identity.public.e != PUBLIC_EXPONENT:
        raise ValueError("identity key must be RSA 2048-4096 bits with e = 65537")


@implementer(IOpenSSLContextFactory, IOpenSSLServerConnectionCreator)
class ResponderTLS:
    """The listening server's TLS: owns the identity key and nickname and
    replaces the link key and certificates at least every ``max_age``
    seconds.  A new pair applies to connections accepted afterwards;
    existing connections keep the context they started with."""

    def __init__(
        self,
        identity: PrivateKey,
        nickname: str,
        *,
        legacy: bool = False,
        clock: TimeSource | None = None,
        max_age: float = CERTIFICATE_LIFETIME,
        link_bits: int = MODERN_LINK_BITS,
    ) -> None:
        _check_identity_private(identity)
        _check_nickname(nickname)
        if link_bits < MODERN_LINK_BITS:
            raise ValueError("a responder's link key must be at least 2048 bits")
        if not 0 < max_age <= CERTIFICATE_LIFETIME:
            raise ValueError("link keys must be rotated at least every 24 hours")
        self.identity = identity
        self.nickname = nickname
        self.legacy = legacy
        self.max_age = max_age
        self.link_bits = link_bits
        self._clock = clock if clock is not None else _default_clock()
        self._factory = self._new_factory(self._clock.seconds())

    @property
    def keyid(self) -> bytes:
        """Our KeyID, as initiators expect it."""
        return self.identity.public.keyid

    @property
    def credentials(self) -> LinkCredentials:
        return self._factory.credentials

    @property
    def context_factory(self) -> ResponderContextFactory:
        return self._factory

    def _new_factory(self, now: float) -> ResponderContextFactory:
        creds = make_link_credentials(self.identity, self.nickname, now, self.link_bits)
        factory = ResponderContextFactory(creds, self.legacy)
        factory.getContext()  # fail here, not on the first connection
        return factory

    def maybe_rotate(self, now: float) -> bool:
        """Replace the link key and certificates if they are due; True if
        they were replaced.  Key generation blocks for a fraction of a
        second, once a day."""
        if not self.credentials.needs_rotation(now, self.max_age):
            return False
        self._factory = self._new_factory(now)
        _log.info(
            "MMTP link key rotated; certificates valid until {expires}",
            expires=_utc(int(self.credentials.expires_at)).isoformat(),
        )
        return True

    def getContext(self) -> SSL.Context:  # noqa: N802 - Twisted interface
        self.maybe_rotate(self._clock.seconds())
        return self._factory.getContext()

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:  # noqa: N802,N803
        self.maybe_rotate(self._clock.seconds())
        return self._factory.serverConnectionForTLS(tlsProtocol)


@implementer(IOpenSSLClientConnectionCreator)
class InitiatorTLS:
    """The connecting side's TLS: same versions and suites as the
    responder, no SNI (peers are addressed by key), no client certificate,
    and a per-process cache of already-verified link keys."""

    def __init__(
        self,
        *,
        legacy: bool = False,
        cache: dict[bytes, bytes] | None = None,
        cache_limit: int = DEFAULT_CACHE_LIMIT,
    ) -> None:
        self.legacy = legacy
        self.cache: dict[bytes, bytes] = {} if cache is None else cache
        self.cache_limit = cache_limit
        self._context = make_initiator_context(legacy)

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:  # noqa: N802,N803
        return SSL.Connection(self._context, None)

    def authenticate(self, tls_transport: Any, expected_keyid: bytes, now: float) -> bytes:
        """Run section 5 on a connection whose handshake has completed."""
        found = verify_responder(
            peer_chain(tls_transport), expected_keyid, now, self.cache, legacy=self.legacy
        )
        self._trim_cache()
        return found

    def _trim_cache(self) -> None:
        # One entry per peer per day accumulates; drop the oldest.
        while len(self.cache) > self.cache_limit:
            del self.cache[next(iter(self.cache))]


# ---------------------------------------------------------- verification


def _to_der(cert: CertificateLike) -> bytes:
    if isinstance(cert, bytes):
        return cert
    if isinstance(cert, x509.Certificate):
        return cert.public_bytes(serialization.Encoding.DER)
    if isinstance(cert, crypto.X509):
        return crypto.dump_certificate(crypto.FILETYPE_ASN1, cert)
    raise TypeError(f"not a certificate: {type(cert).__name__}")


def peer_chain(tls_transport: Any) -> list[bytes]:
    """The responder's chain as sent, leaf first, as DER.

    Call after the handshake (with TLS 1.3 the chain is only known then).
    DER rather than parsed objects so that a certificate ``cryptography``
    cannot parse becomes a :class:`BadCertificateChain` in
    :func:`verify_responder`, not an exception here."""
    conn = tls_transport.getHandle()
    try:
        chain: Sequence[CertificateLike] | None = conn.get_peer_cert_chain(as_cryptography=True)
    except (TypeError, ValueError, x509.InvalidVersion):
        # older pyOpenSSL, or a certificate cryptography refuses to parse
        chain = conn.get_peer_cert_chain()
    return [_to_der(c) for c in chain or ()]


def verify_responder(
    chain: Iterable[CertificateLike],
    expected_keyid: bytes,
    now: float,
    cache: dict[bytes, bytes],
    *,
    legacy: bool = False,
) -> bytes:
    """Authenticate a responder from its chain as sent (mmtp.md section 5).

    Returns the authenticated KeyID (``expected_keyid``), or
    :data:`ZERO_KEYID` when no identity check was asked for.  Every defect
    of the peer's chain raises a :class:`TLSVerificationError`; ``cache``
    maps link-key digests to identity KeyIDs across connections."""
    try:
        ders = [_to_der(c) for c in chain]
    except crypto.Error:
        raise BadCertificateChain("a certificate in the chain cannot be encoded") from None
    return verify_chain(ders, expected_keyid, now, cache, legacy)
