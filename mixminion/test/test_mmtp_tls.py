"""Tests of MMTP's TLS layer: certificates, the responder check (every
outcome of mmtp.md section 5), link-key rotation under a fake clock, and
real handshakes -- in memory and over loopback TCP (IPv4 and IPv6)."""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dh, ec, padding, rsa
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID
from OpenSSL import SSL, crypto
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test.iosim import connectedServerAndClient
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mixminion.codec.rsa import PrivateKey
from mixminion.mmtp import tls
from mixminion.mmtp.tls import (
    BadCertificateChain,
    CertificateExpired,
    CertificateNotYetValid,
    InitiatorTLS,
    KeyIdMismatch,
    LinkCredentials,
    LinkKeyIsIdentity,
    ResponderContextFactory,
    ResponderTLS,
    TLSVerificationError,
    ZERO_KEYID,
    make_certificate,
    make_initiator_context,
    make_link_credentials,
    peer_chain,
    verify_responder,
)
from mixminion.testing.certs import sha1_signed
from mixminion.testing.keys import key
from mixminion.testing.sockets import have_ipv6_loopback

E = TypeVar("E", bound=TLSVerificationError)

NOW = 1767225600.25  # 2026-01-01 00:00:00.25 UTC
NICK = "Lisbon"


# ------------------------------------------------------------ key material


def identity(name: str = "A", bits: int = 2048, e: int = 65537) -> PrivateKey:
    return key("identity " + name, bits, e)


def link_key(name: str, bits: int = 2048) -> rsa.RSAPrivateKey:
    return key("link " + name, bits).key


def keyid(name: str = "A") -> bytes:
    return identity(name).public.keyid


@functools.lru_cache(maxsize=None)
def creds(ident: str = "A", link: str = "1", link_bits: int = 2048, now: float = NOW) -> LinkCredentials:
    return make_link_credentials(
        identity(ident), NICK, now, link_bits, link_key=link_key(link, link_bits)
    )


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


@functools.lru_cache(maxsize=None)
def reference_like_creds() -> LinkCredentials:
    """What a 0.0.8 node sends: a 1024-bit link key, SHA-1 signatures."""
    base = creds("A", "legacy", 1024)
    ident = identity("A").key
    link = x509.load_der_x509_certificate(sha1_signed(base.link_cert, ident))
    ident_cert = x509.load_der_x509_certificate(sha1_signed(base.identity_cert, ident))
    return replace(base, link_cert=link, identity_cert=ident_cert)


def ec_leaf(signer: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> x509.Certificate:
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    return make_certificate(leaf_key.public_key(), signer, NICK + "<MMTP>", NICK, NOW)  # type: ignore[arg-type]


def rfc7919_ffdhe2048() -> int:
    """p = 2^2048 - 2^1984 + (floor(2^1918 * e) + 560316) * 2^64 - 1."""
    guard = 64
    scale = 1 << (1918 + guard)
    total, term, k = 0, scale, 0
    while term:
        total += term
        k += 1
        term //= k
    return (1 << 2048) - (1 << 1984) + ((total >> guard) + 560316) * (1 << 64) - 1


# ------------------------------------------------------------ certificates


class CertificateTests(unittest.TestCase):
    def setUp(self) -> None:
        self.creds = creds()
        self.link, self.ident = self.creds.chain

    def test_names(self) -> None:
        def expected(cn: str) -> x509.Name:
            return x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Mixminion network"),
                    x509.NameAttribute(NameOID.COMMON_NAME, cn),
                ]
            )

        self.assertEqual(self.link.subject, expected("Lisbon<MMTP>"))
        self.assertEqual(self.link.issuer, expected("Lisbon"))
        self.assertEqual(self.ident.subject, expected("Lisbon"))
        self.assertEqual(self.ident.issuer, expected("Lisbon"))
        # O then CN, each a UTF8String (tag 0x0C), as observed on the wire
        self.assertIn(b"\x0c\x11Mixminion network", self.link.subject.public_bytes())
        self.assertIn(b"\x0c\x0cLisbon<MMTP>", self.link.subject.public_bytes())

    def test_version_serial_and_no_extensions(self) -> None:
        serial = math.floor(NOW) - 1041397200
        for cert in self.creds.chain:
            self.assertEqual(cert.version, x509.Version.v3)
            self.assertEqual(len(cert.extensions), 0)
            self.assertEqual(cert.serial_number, serial)

    def test_validity_window(self) -> None:
        for cert in self.creds.chain:
            start = cert.not_valid_before_utc.timestamp()
            end = cert.not_valid_after_utc.timestamp()
            self.assertEqual(start, math.floor(NOW) - 7200)
            self.assertEqual(end - start, 100800)
        self.assertEqual(self.creds.expires_at, math.floor(NOW) + 86400 + 7200)
        self.assertEqual(self.creds.not_before, math.floor(NOW) - 7200)

    def test_signatures(self) -> None:
        ident_pub = identity().key.public_key()
        for cert in self.creds.chain:
            self.assertEqual(cert.signature_algorithm_oid, SignatureAlgorithmOID.RSA_WITH_SHA256)
            ident_pub.verify(
                cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), hashes.SHA256()
            )

    def test_keys(self) -> None:
        self.assertEqual(self.ident.public_key(), identity().key.public_key())
        self.assertEqual(self.link.public_key(), self.creds.link_key.public_key())
        self.assertEqual(self.creds.link_key.key_size, 2048)
        self.assertNotEqual(self.creds.link_digest, keyid())
        self.assertEqual(self.creds.chain_der, [der(self.link), der(self.ident)])

    def test_fresh_link_key_each_time(self) -> None:
        a = make_link_credentials(identity(), NICK, NOW)
        self.assertEqual(a.link_key.key_size, 2048)
        self.assertNotEqual(a.link_digest, creds().link_digest)

    def test_needs_rotation(self) -> None:
        c = self.creds
        self.assertFalse(c.needs_rotation(NOW))
        self.assertFalse(c.needs_rotation(NOW + 86399))
        self.assertTrue(c.needs_rotation(NOW + 86400))
        self.assertTrue(c.needs_rotation(NOW + 3600, max_age=3600))
        self.assertFalse(c.needs_rotation(NOW - 7000))
        self.assertTrue(c.needs_rotation(NOW - 7201))  # clock went back

    def test_bad_nickname(self) -> None:
        for nick in ("", "x" * 59):
            self.assertRaises(ValueError, make_link_credentials, identity(), nick, NOW,
                              link_key=link_key("1"))

    def test_clock_before_2003(self) -> None:
        self.assertRaises(ValueError, make_link_credentials, identity(), NICK, 1e9,
                          link_key=link_key("1"))


# ---------------------------------------------------------- verification


class VerifyResponderTests(unittest.TestCase):
    def setUp(self) -> None:
        self.cache: dict[bytes, bytes] = {}
        self.chain = creds().chain_der

    def verify(self, chain: list[Any], expected: bytes | None = None, now: float = NOW,
               legacy: bool = False) -> bytes:
        return verify_responder(chain, keyid() if expected is None else expected, now,
                                self.cache, legacy=legacy)

    def refused(self, error: type[E], chain: list[Any], **kw: Any) -> E:
        err = self.assertRaises(error, self.verify, chain, **kw)
        self.assertIsInstance(err, TLSVerificationError)
        return err

    def test_good(self) -> None:
        self.assertEqual(self.verify(self.chain), keyid())
        self.assertEqual(self.cache, {creds().link_digest: keyid()})

    def test_accepts_pyopenssl_and_cryptography_objects(self) -> None:
        as_x509 = [crypto.load_certificate(crypto.FILETYPE_ASN1, d) for d in self.chain]
        self.assertEqual(self.verify(as_x509), keyid())
        self.assertEqual(self.verify(list(creds().chain), now=NOW), keyid())

    def test_keyid_is_sha1_of_pkcs1_der(self) -> None:
        pkcs1 = identity().key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
        import hashlib
        self.assertEqual(self.verify(self.chain), hashlib.sha1(pkcs1).digest())

    def test_wrong_identity(self) -> None:
        err = self.refused(KeyIdMismatch, self.chain, expected=keyid("B"))
        self.assertEqual(err.expected_keyid, keyid("B"))
        self.assertEqual(err.found_keyid, keyid())
        self.assertEqual(err.found_fingerprint, keyid().hex().upper())
        # routing data stays out of the message
        for text in (keyid().hex(), keyid("B").hex()):
            self.assertNotIn(text.lower(), str(err).lower())
        # the proven binding is cached all the same (step 6 before step 7)
        self.assertEqual(self.cache, {creds().link_digest: keyid()})

    def test_zero_keyid_skips_identity(self) -> None:
        self.assertEqual(self.verify(self.chain[:1], expected=ZERO_KEYID), ZERO_KEYID)
        self.assertEqual(self.cache, {})

    def test_zero_keyid_still_checks_validity(self) -> None:
        self.refused(CertificateExpired, self.chain, expected=ZERO_KEYID, now=NOW + 200000)

    def test_link_key_is_identity(self) -> None:
        self.refused(LinkKeyIsIdentity, self.chain, expected=creds().link_digest)

    def test_expired(self) -> None:
        end = creds().expires_at
        self.assertEqual(self.verify(self.chain, now=end), keyid())
        err = self.refused(CertificateExpired, self.chain, now=end + 1)
        self.assertIn("clock", str(err))
        self.assertEqual(err.not_after, end)

    def test_not_yet_valid(self) -> None:
        start = creds().not_before
        self.assertEqual(self.verify(self.chain, now=start), keyid())
        err = self.refused(CertificateNotYetValid, self.chain, now=start - 1)
        self.assertIn("clock", str(err))

    def test_one_certificate(self) -> None:
        self.refused(BadCertificateChain, self.chain[:1])

    def test_three_certificates(self) -> None:
        self.refused(BadCertificateChain, self.chain + [der(creds("B").identity_cert)])

    def test_no_certificate(self) -> None:
        self.refused(BadCertificateChain, [])
        self.refused(BadCertificateChain, [], expected=ZERO_KEYID)

    def test_leaf_repeated(self) -> None:
        self.refused(BadCertificateChain, [self.chain[0], self.chain[0]])

    def test_leaf_not_signed_by_identity(self) -> None:
        # link cert signed by B, sent with A's identity certificate
        forged = make_certificate(link_key("1").public_key(), identity("B").key,
                                  NICK + "<MMTP>", NICK, NOW)
        self.refused(BadCertificateChain, [der(forged), self.chain[1]])
        self.assertEqual(self.cache, {})

    def test_identity_chain_swapped(self) -> None:
        # B's identity cert presented for a link cert A signed
        self.refused(BadCertificateChain, [self.chain[0], der(creds("B").identity_cert)],
                     expected=keyid("B"))

    def test_unparsable_der(self) -> None:
        self.refused(BadCertificateChain, [b"not a certificate", self.chain[1]])
        self.refused(BadCertificateChain, [self.chain[0], b"\x30\x03\x02\x01\x00"])
        self.refused(BadCertificateChain, [b""], expected=ZERO_KEYID)

    def test_non_rsa_link_key(self) -> None:
        self.refused(BadCertificateChain, [der(ec_leaf(identity().key)), self.chain[1]])

    def test_non_rsa_identity_key(self) -> None:
        ec_ident = ec.generate_private_key(ec.SECP256R1())
        leaf = make_certificate(link_key("1").public_key(), ec_ident, "x<MMTP>", "x", NOW)  # type: ignore[arg-type]
        root = make_certificate(ec_ident.public_key(), ec_ident, "x", "x", NOW)  # type: ignore[arg-type]
        self.refused(BadCertificateChain, [der(leaf), der(root)])

    def test_identity_key_policy(self) -> None:
        for weak in (identity("small", 1024), identity("e3", 2048, 3)):
            c = make_link_credentials(weak, NICK, NOW, link_key=link_key("1"))
            for legacy in (False, True):
                self.refused(BadCertificateChain, c.chain_der, expected=weak.public.keyid,
                             legacy=legacy)

    def test_small_link_key_modern_vs_legacy(self) -> None:
        chain = creds("A", "small", 1024).chain_der
        self.refused(BadCertificateChain, chain)
        self.refused(BadCertificateChain, chain, expected=ZERO_KEYID)
        self.assertEqual(self.verify(chain, legacy=True), keyid())

    def test_sha1_signature_modern_vs_legacy(self) -> None:
        chain = reference_like_creds().chain_der
        self.assertEqual(
            x509.load_der_x509_certificate(chain[0]).signature_algorithm_oid,
            SignatureAlgorithmOID.RSA_WITH_SHA1,
        )
        self.refused(BadCertificateChain, chain, legacy=False)
        self.assertEqual(self.verify(chain, legacy=True), keyid())

    def test_cache_hit_skips_chain(self) -> None:
        self.verify(self.chain)
        # step 4: a known link key needs no chain at all
        self.assertEqual(self.verify(self.chain[:1]), keyid())
        self.refused(KeyIdMismatch, self.chain[:1], expected=keyid("B"))

    def test_cache_is_consulted(self) -> None:
        self.cache[creds().link_digest] = keyid("B")
        self.assertEqual(self.verify(self.chain, expected=keyid("B")), keyid("B"))
        self.refused(KeyIdMismatch, self.chain)

    def test_bad_expected_keyid_is_a_caller_error(self) -> None:
        self.assertRaises(ValueError, self.verify, self.chain, expected=b"short")

    def test_damaged_chains_never_crash(self) -> None:
        """Section 13: every corruption is an authentication failure."""
        for target in (0, 1):
            outcomes = set()
            for i in range(len(self.chain[target])):
                chain = [bytearray(c) for c in self.chain]
                chain[target][i] ^= 0x41
                try:
                    verify_responder([bytes(c) for c in chain], keyid(), NOW, {})
                except TLSVerificationError as err:
                    outcomes.add(type(err).__name__)
                else:
                    outcomes.add("ok")
            self.assertIn("BadCertificateChain", outcomes)
            if target == 0:
                # any change to the leaf breaks its signature or its parse;
                # the identity cert's own signature is never checked (s. 3)
                self.assertNotIn("ok", outcomes)


# --------------------------------------------------------------- contexts


class ContextTests(unittest.TestCase):
    def ciphers(self, ctx: SSL.Context) -> list[str]:
        return SSL.Connection(ctx, None).get_cipher_list()

    def test_modern_suites(self) -> None:
        for ctx in (ResponderContextFactory(creds()).getContext(), make_initiator_context()):
            for name in self.ciphers(ctx):
                if name.startswith("TLS_"):
                    self.assertRegex(name, "GCM|CHACHA20")
                else:
                    self.assertRegex(name, r"^ECDHE-RSA-(AES\d+-GCM|CHACHA20-POLY1305)")

    def test_legacy_adds_one_suite(self) -> None:
        for ctx in (ResponderContextFactory(creds(), legacy=True).getContext(),
                    make_initiator_context(legacy=True)):
            extra = [n for n in self.ciphers(ctx)
                     if not n.startswith(("TLS_", "ECDHE-RSA-"))]
            self.assertEqual(extra, ["DHE-RSA-AES128-SHA"])

    def test_no_session_cache(self) -> None:
        ctx = ResponderContextFactory(creds()).getContext()
        self.assertEqual(ctx.get_session_cache_mode(), SSL.SESS_CACHE_OFF)
        self.assertEqual(ctx.get_verify_mode(), SSL.VERIFY_NONE)
        self.assertEqual(make_initiator_context().get_verify_mode(), SSL.VERIFY_PEER)

    def test_interfaces(self) -> None:
        verifyObject(IOpenSSLServerConnectionCreator, ResponderContextFactory(creds()))
        verifyObject(IOpenSSLClientConnectionCreator, InitiatorTLS())

    def test_dh_group_is_rfc7919_ffdhe2048(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # cryptography deprecates FFDH
            params = serialization.load_pem_parameters(tls.FFDHE2048_PEM)
            assert isinstance(params, dh.DHParameters)
            numbers = params.parameter_numbers()
        self.assertEqual(numbers.g, 2)
        self.assertEqual(numbers.p, rfc7919_ffdhe2048())


# --------------------------------------------------------------- rotation


class RotationTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.responder = ResponderTLS(identity(), NICK, clock=self.clock)

    def test_initial_credentials(self) -> None:
        c = self.responder.credentials
        self.assertEqual(c.created_at, NOW)
        self.assertEqual(self.responder.keyid, keyid())
        self.assertEqual(verify_responder(c.chain_der, keyid(), NOW, {}), keyid())

    def test_rotates_after_a_day(self) -> None:
        first = self.responder.credentials
        ctx = self.responder.getContext()
        self.assertFalse(self.responder.maybe_rotate(NOW + 86399))
        self.assertIs(self.responder.getContext(), ctx)
        self.assertTrue(self.responder.maybe_rotate(NOW + 86400))
        second = self.responder.credentials
        self.assertNotEqual(second.link_digest, first.link_digest)
        self.assertEqual(second.created_at, NOW + 86400)
        self.assertEqual(verify_responder(second.chain_der, keyid(), NOW + 86400, {}), keyid())
        self.assertFalse(self.responder.maybe_rotate(NOW + 86401))

    def test_new_connections_use_the_injected_clock(self) -> None:
        old = self.responder.serverConnectionForTLS(None)
        self.clock.advance(86400)
        new = self.responder.serverConnectionForTLS(None)
        self.assertIsNot(new.get_context(), old.get_context())
        self.assertEqual(self.responder.credentials.created_at, NOW + 86400)
        # the older connection keeps its own context and certificate
        self.assertEqual(old.get_context(), old.get_context())
        self.assertNotEqual(old.get_context(), self.responder.getContext())

    def test_shorter_max_age(self) -> None:
        r = ResponderTLS(identity(), NICK, clock=self.clock, max_age=3600)
        self.assertTrue(r.maybe_rotate(NOW + 3600))

    def test_clock_jumps_back(self) -> None:
        self.assertTrue(self.responder.maybe_rotate(NOW - 8000))

    def test_refused_settings(self) -> None:
        self.assertRaises(ValueError, ResponderTLS, identity(), NICK, clock=self.clock,
                          max_age=86401)
        self.assertRaises(ValueError, ResponderTLS, identity(), NICK, clock=self.clock,
                          link_bits=1024)
        self.assertRaises(ValueError, ResponderTLS, identity("small", 1024), NICK,
                          clock=self.clock)


# ------------------------------------------------------------- handshakes

READ_SERVER_CERT = b"SSLv3/TLS read server certificate"
READ_TICKET = b"SSLv3/TLS read server session ticket"


@implementer(IOpenSSLClientConnectionCreator)
class ClientCreator:
    """A test initiator: one context, optional version cap and session to
    offer, and a record of the handshake states each connection went
    through."""

    def __init__(self, ctx: SSL.Context | None = None, legacy: bool = False,
                 max_version: int | None = None, min_version: int | None = None) -> None:
        self.ctx = ctx or make_initiator_context(legacy)
        if max_version is not None:
            self.ctx.set_max_proto_version(max_version)
        if min_version is not None:
            self.ctx.set_min_proto_version(min_version)
        self.session: SSL.Session | None = None
        self.states: list[list[bytes]] = []

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:  # noqa: N802
        conn = SSL.Connection(self.ctx, None)
        if self.session is not None:
            conn.set_session(self.session)
        states: list[bytes] = []
        conn.set_info_callback(lambda c, where, ret: states.append(c.get_state_string()))
        self.states.append(states)
        return conn


def tls10_only() -> ClientCreator:
    """An initiator that speaks TLS 1.0 with DHE-RSA-AES128-SHA only."""
    return ClientCreator(legacy=True, max_version=SSL.TLS1_VERSION)


def resumed(conn: SSL.Connection, states: list[bytes]) -> bool:
    """Did ``conn`` resume a session?  A full handshake carries the server
    Certificate; pyOpenSSL does not wrap SSL_session_reused, so its binding
    is consulted only where present."""
    reused = not (READ_SERVER_CERT in states)
    try:
        from OpenSSL._util import lib  # private, best effort
        reused = reused or bool(lib.SSL_session_reused(conn._ssl))
    except (ImportError, AttributeError):
        pass
    return reused


@implementer(IHandshakeListener)
class Peer(Protocol):
    """Records what each side saw.  The responder greets after the
    handshake so that the initiator also reads any NewSessionTicket."""

    def __init__(self, greet: bool) -> None:
        self.greet = greet
        self.handshake: defer.Deferred[Peer] = defer.Deferred()
        self.data: defer.Deferred[bytes] = defer.Deferred()
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.received = b""

    def handshakeCompleted(self) -> None:  # noqa: N802
        conn = self.transport.getHandle()
        self.version = conn.get_protocol_version_name()
        self.cipher = conn.get_cipher_name()
        if self.greet:
            self.transport.write(b"MMTP 0.3\r\n")
        else:
            self.chain = peer_chain(self.transport)
        self.handshake.callback(self)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.received += data
        if not self.data.called:
            self.session = self.transport.getHandle().get_session()
            self.data.callback(data)

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        if not self.handshake.called:
            self.handshake.errback(reason)
        self.lost.callback(None)


class PeerFactory(Factory):
    def __init__(self, greet: bool) -> None:
        self.greet = greet
        self.peers: list[Peer] = []

    def buildProtocol(self, addr: Any) -> Peer:  # noqa: N802
        peer = Peer(self.greet)
        peer.factory = self
        self.peers.append(peer)
        return peer


@dataclass
class Link:
    client: Peer
    server: Peer


@functools.lru_cache(maxsize=None)
def tls10_skip_reason() -> str | None:
    """None if this OpenSSL can do TLS 1.0 with DHE-RSA-AES128-SHA at
    security level 0, else the reason the TLS 1.0 tests skip."""
    server = SSL.Connection(tls.make_responder_context(creds(), legacy=True), None)
    server.set_accept_state()
    client = SSL.Connection(tls10_only().ctx, None)
    client.set_connect_state()
    try:
        for _ in range(8):
            for a, b in ((client, server), (server, client)):
                try:
                    a.do_handshake()
                except SSL.WantReadError:
                    pass
                try:
                    b.bio_write(a.bio_read(1 << 16))
                except SSL.WantReadError:
                    pass
        if client.get_protocol_version_name() == "TLSv1":
            return None
        detail = "handshake did not finish"
    except SSL.Error as err:
        detail = str(err)
    return (f"{SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()} cannot negotiate "
            f"TLS 1.0 with {tls.LEGACY_CIPHER} even at @SECLEVEL=0: {detail}")


if TYPE_CHECKING:
    _MixinBase = unittest.TestCase
else:
    _MixinBase = object


class HandshakeMixin(_MixinBase):
    """Real handshakes; ``connect`` and ``close`` come from the transport
    variant (memory, TCP over IPv4, TCP over IPv6)."""

    def connect(self, server: Any, client: Any) -> defer.Deferred[Link]:
        raise NotImplementedError

    def close(self, link: Link) -> defer.Deferred[None]:
        raise NotImplementedError

    def need_tls10(self) -> None:
        reason = tls10_skip_reason()
        if reason:
            raise unittest.SkipTest(reason)

    @defer.inlineCallbacks
    def handshake(self, server: Any, client: Any) -> Any:
        link = yield self.connect(server, client)
        yield link.client.handshake
        yield link.server.handshake
        yield link.client.data
        return link

    @defer.inlineCallbacks
    def assert_refused(self, server: Any, client: Any) -> Any:
        link = yield self.connect(server, client)
        link.server.handshake.addErrback(lambda _: None)
        failure = None
        try:
            yield link.client.handshake
        except Exception as err:
            failure = err
        self.assertIsInstance(failure, SSL.Error)
        yield link.client.lost
        yield link.server.lost

    @defer.inlineCallbacks
    def test_tls13_by_default(self) -> Any:
        responder = ResponderTLS(identity(), NICK, clock=self.fake_clock())
        initiator = InitiatorTLS()
        link = yield self.handshake(responder, initiator)
        self.assertEqual(link.client.version, "TLSv1.3")
        self.assertEqual(link.server.version, "TLSv1.3")
        self.assertEqual(len(link.client.chain), 2)
        self.assertEqual(link.client.chain, responder.credentials.chain_der)
        self.assertEqual(initiator.authenticate(link.client.transport, keyid(), NOW), keyid())
        self.assertRaises(KeyIdMismatch, verify_responder, link.client.chain, keyid("B"), NOW, {})
        server_conn = link.server.transport.getHandle()
        self.assertIsNone(server_conn.get_peer_certificate())  # no client cert
        self.assertIsNone(server_conn.get_servername())  # no SNI
        self.assertEqual(link.client.received, b"MMTP 0.3\r\n")
        yield self.close(link)

    @defer.inlineCallbacks
    def test_tls12_ecdhe_aead(self) -> Any:
        client = ClientCreator(max_version=SSL.TLS1_2_VERSION)
        link = yield self.handshake(ResponderContextFactory(creds()), client)
        self.assertEqual(link.client.version, "TLSv1.2")
        self.assertRegex(link.client.cipher, r"^ECDHE-RSA-(AES\d+-GCM|CHACHA20)")
        self.assertNotIn(READ_TICKET, client.states[0])  # no ticket at all
        self.assertEqual(verify_responder(link.client.chain, keyid(), NOW, {}), keyid())
        yield self.close(link)

    @defer.inlineCallbacks
    def check_no_resumption(self, max_version: int | None, expected: str) -> Any:
        server = ResponderContextFactory(creds())
        client = ClientCreator(max_version=max_version)
        first = yield self.handshake(server, client)
        self.assertEqual(first.client.version, expected)
        client.session = first.client.session
        yield self.close(first)
        second = yield self.handshake(server, client)
        conn = second.client.transport.getHandle()
        self.assertFalse(resumed(conn, client.states[1]))
        self.assertEqual(len(second.client.chain), 2)
        yield self.close(second)
        return client

    @defer.inlineCallbacks
    def test_no_resumption_tls13(self) -> Any:
        # OpenSSL still sends a TLS 1.3 NewSessionTicket with OP_NO_TICKET:
        # a stateful one naming a cache entry that, with the cache off,
        # does not exist -- so offering it back yields a full handshake.
        yield self.check_no_resumption(None, "TLSv1.3")

    @defer.inlineCallbacks
    def test_no_resumption_tls12(self) -> Any:
        client = yield self.check_no_resumption(SSL.TLS1_2_VERSION, "TLSv1.2")
        for states in client.states:
            self.assertNotIn(READ_TICKET, states)

    def test_tls10_client_refused_in_modern_mode(self) -> Any:
        return self.assert_refused(ResponderContextFactory(creds()), tls10_only())

    @defer.inlineCallbacks
    def test_tls10_client_accepted_in_legacy_mode(self) -> Any:
        self.need_tls10()
        responder = ResponderTLS(identity(), NICK, clock=self.fake_clock(), legacy=True)
        link = yield self.handshake(responder, tls10_only())
        self.assertEqual(link.server.version, "TLSv1")
        self.assertEqual(link.server.cipher, "DHE-RSA-AES128-SHA")
        self.assertEqual(verify_responder(link.client.chain, keyid(), NOW, {}, legacy=True),
                         keyid())
        yield self.close(link)

    @defer.inlineCallbacks
    def test_legacy_responder_still_prefers_tls13(self) -> Any:
        link = yield self.handshake(ResponderContextFactory(creds(), legacy=True), InitiatorTLS())
        self.assertEqual(link.client.version, "TLSv1.3")
        yield self.close(link)

    def fake_clock(self) -> Clock:
        clock = Clock()
        clock.advance(NOW)
        return clock


class MemoryHandshakeTests(HandshakeMixin, unittest.TestCase):
    """In memory: iosim with TLSMemoryBIOFactory and an explicit clock."""

    def connect(self, server: Any, client: Any) -> defer.Deferred[Link]:
        clock = Clock()
        server_factory = TLSMemoryBIOFactory(server, False, PeerFactory(True), clock=clock)
        client_factory = TLSMemoryBIOFactory(client, True, PeerFactory(False), clock=clock)
        _, _, self.pump = connectedServerAndClient(
            lambda: server_factory.buildProtocol(None),
            lambda: client_factory.buildProtocol(None),
            greet=False,
            clock=clock,
        )
        self.pump.flush()
        peers = (client_factory.wrappedFactory.peers, server_factory.wrappedFactory.peers)
        return defer.succeed(Link(peers[0][0], peers[1][0]))

    def close(self, link: Link) -> defer.Deferred[None]:
        link.client.transport.loseConnection()
        self.pump.flush()
        return defer.gatherResults([link.client.lost, link.server.lost]).addCallback(
            lambda _: None)

    @defer.inlineCallbacks
    def test_resumption_detected_when_allowed(self) -> Any:
        """Control for the no-resumption tests: a server with a session
        cache and tickets is resumed, so the check can see resumption."""
        c = creds()
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.use_certificate(c.link_cert)
        ctx.add_extra_chain_cert(c.identity_cert)
        ctx.use_privatekey(c.link_key)
        ctx.set_session_id(b"control")
        server = ResponderContextFactory(c)
        server._context = ctx
        client = ClientCreator()
        first = yield self.handshake(server, client)
        client.session = first.client.session
        yield self.close(first)
        second = yield self.handshake(server, client)
        self.assertTrue(resumed(second.client.transport.getHandle(), client.states[1]))
        yield self.close(second)

    @defer.inlineCallbacks
    def test_tls11_client_refused_by_legacy_responder(self) -> Any:
        self.need_tls10()
        client = ClientCreator(legacy=True, max_version=SSL.TLS1_1_VERSION,
                               min_version=SSL.TLS1_1_VERSION)
        yield self.assert_refused(ResponderContextFactory(creds(), legacy=True), client)

    @defer.inlineCallbacks
    def test_reference_like_responder(self) -> Any:
        """A 0.0.8-style chain (1024-bit link key, SHA-1 signatures) over
        TLS 1.0: the legacy initiator accepts it, a modern one does not."""
        self.need_tls10()
        server = ResponderContextFactory(reference_like_creds(), legacy=True)
        link = yield self.handshake(server, tls10_only())
        self.assertEqual((link.client.version, link.client.cipher),
                         ("TLSv1", "DHE-RSA-AES128-SHA"))
        legacy = InitiatorTLS(legacy=True)
        self.assertEqual(legacy.authenticate(link.client.transport, keyid(), NOW), keyid())
        self.assertRaises(BadCertificateChain, InitiatorTLS().authenticate,
                          link.client.transport, keyid(), NOW)
        yield self.close(link)

    @defer.inlineCallbacks
    def test_modern_initiator_refuses_small_link_key(self) -> Any:
        """Even if OpenSSL completes the handshake (we accept any chain),
        the check afterwards refuses a 1024-bit link key."""
        server = ResponderContextFactory(creds("A", "small", 1024), legacy=True)
        link = yield self.handshake(server, InitiatorTLS())
        self.assertRaises(BadCertificateChain, InitiatorTLS().authenticate,
                          link.client.transport, keyid(), NOW)
        yield self.close(link)


class TCPHandshakeMixin(HandshakeMixin):
    """Over real loopback sockets on the global reactor."""

    host = "127.0.0.1"
    endpoint: Any = TCP4ClientEndpoint

    @defer.inlineCallbacks
    def connect(self, server: Any, client: Any) -> Any:
        server_peers = PeerFactory(True)
        port = reactor.listenTCP(0, TLSMemoryBIOFactory(server, False, server_peers),
                                 interface=self.host)
        self.addCleanup(port.stopListening)
        client_peers = PeerFactory(False)
        endpoint = self.endpoint(reactor, self.host, port.getHost().port)
        yield endpoint.connect(TLSMemoryBIOFactory(client, True, client_peers))
        while not server_peers.peers:  # accept() may trail connect()
            yield deferLater(0.001)
        return Link(client_peers.peers[0], server_peers.peers[0])

    def close(self, link: Link) -> defer.Deferred[None]:
        link.client.transport.loseConnection()
        return defer.gatherResults([link.client.lost, link.server.lost]).addCallback(
            lambda _: None)


def deferLater(delay: float) -> defer.Deferred[None]:  # noqa: N802
    from twisted.internet.task import deferLater as later

    return later(reactor, delay, lambda: None)


class TCP4HandshakeTests(TCPHandshakeMixin, unittest.TestCase):
    pass


class TCP6HandshakeTests(TCPHandshakeMixin, unittest.TestCase):
    host = "::1"
    endpoint = TCP6ClientEndpoint
    if not have_ipv6_loopback():
        skip = "this machine has no ::1"
