"""The DER certificate reader of the chain check, against ``cryptography.x509``.

Every certificate we make and every kind the reference made (SHA-1
signed, 1024-bit link keys, UTCTime and GeneralizedTime validity) must
read the same as ``cryptography`` reads it; corrupted certificates must be
refused with :class:`CertificateFormatError` or, where they still parse,
read exactly as ``cryptography`` reads them.
"""

from __future__ import annotations

import datetime
import random
import warnings

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.x509.oid import NameOID
from twisted.trial import unittest

from mixminion.mmtp.certificate import (
    RSA_SIGNATURES,
    CertificateFormatError,
    read_certificate,
)
from mixminion.mmtp.tls import make_link_credentials
from mixminion.testing.certs import der_tlv, sha1_signed
from mixminion.testing.keys import key

NOW = 1_800_000_000.0


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def samples() -> list[bytes]:
    creds = make_link_credentials(key("cert-identity"), "Reader", NOW)
    legacy = make_link_credentials(key("cert-identity"), "Reader", NOW, 1024)
    ident = key("cert-identity").key
    far = datetime.datetime(2051, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    generalized = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "g")]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "g")]))
                   .public_key(ident.public_key()).serial_number(7)
                   .not_valid_before(far).not_valid_after(far.replace(year=2052))
                   .sign(ident, hashes.SHA512()))
    return [der(creds.link_cert), der(creds.identity_cert), der(legacy.link_cert),
            sha1_signed(legacy.link_cert, ident), sha1_signed(legacy.identity_cert, ident),
            der(generalized)]


def same_as_cryptography(test: unittest.TestCase, data: bytes) -> None:
    mine = read_certificate(data)
    theirs = x509.load_der_x509_certificate(data)
    test.assertEqual(mine.tbs, theirs.tbs_certificate_bytes)
    test.assertEqual(mine.signature, theirs.signature)
    test.assertEqual(RSA_SIGNATURES.get(mine.signature_oid),
                     theirs.signature_hash_algorithm.name)  # type: ignore[union-attr]
    test.assertEqual(mine.not_before, theirs.not_valid_before_utc.timestamp())
    test.assertEqual(mine.not_after, theirs.not_valid_after_utc.timestamp())
    test.assertEqual(serialization.load_der_public_key(mine.public_key_info),
                     theirs.public_key())


class ReaderTests(unittest.TestCase):

    def test_reads_what_cryptography_reads(self) -> None:
        for data in samples():
            same_as_cryptography(self, data)

    def test_the_signature_verifies_over_the_bytes_read(self) -> None:
        creds = make_link_credentials(key("cert-identity"), "Reader", NOW)
        fields = read_certificate(der(creds.link_cert))
        key("cert-identity").key.public_key().verify(
            fields.signature, fields.tbs, padding.PKCS1v15(), hashes.SHA256())

    def test_refusals(self) -> None:
        good = samples()[0]
        cases = {
            "empty": b"",
            "truncated": good[:-1],
            "trailing data": good + b"\x00",
            "not a sequence": b"\x31" + good[1:],
            "indefinite length": b"\x30\x80" + good[4:] + b"\x00\x00",
        }
        for name, data in cases.items():
            with self.assertRaises(CertificateFormatError, msg=name):
                read_certificate(data)

    def test_lengths_must_be_in_their_shortest_form(self) -> None:
        """A real certificate with one length (the version's) in long form."""
        good = samples()[0]
        tbs = x509.load_der_x509_certificate(good).tbs_certificate_bytes
        rest = good[good.index(tbs) + len(tbs):]
        short, long_form = bytes.fromhex("a003020102"), bytes.fromhex("a08103020102")
        self.assertEqual(tbs[4:9], short)
        stretched = der_tlv(0x30, der_tlv(0x30, long_form + tbs[9:]) + rest)
        with self.assertRaisesRegex(CertificateFormatError, "shortest form"):
            read_certificate(stretched)
        # the same rebuilt with the short form reads fine
        self.assertEqual(read_certificate(der_tlv(0x30, der_tlv(0x30, tbs[4:]) + rest)).tbs, tbs)

    def test_mismatched_signature_algorithms_are_refused(self) -> None:
        legacy = make_link_credentials(key("cert-identity"), "Reader", NOW, 1024)
        data = sha1_signed(legacy.link_cert, key("cert-identity").key)
        inner_only = data.replace(bytes.fromhex("300d06092a864886f70d0101050500"),
                                  bytes.fromhex("300d06092a864886f70d01010b0500"), 1)
        with self.assertRaises(CertificateFormatError):
            read_certificate(inner_only)

    def test_corrupted_certificates_are_refused_or_read_like_cryptography(self) -> None:
        """Any other exception fails the test: a peer's bytes must only
        ever become a CertificateFormatError."""
        rng = random.Random(15)
        originals = samples()
        compared = 0
        for _ in range(3000):
            data = bytearray(rng.choice(originals))
            for _ in range(rng.randint(1, 3)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            try:
                mine = read_certificate(bytes(data))
            except CertificateFormatError:
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # e.g. a serial made negative
                    theirs = x509.load_der_x509_certificate(bytes(data))
                    their_key = theirs.public_key()
                    before = theirs.not_valid_before_utc.timestamp()
                    after = theirs.not_valid_after_utc.timestamp()
            except Exception:  # noqa: BLE001 - damage in a part we skip (names,
                continue  # serial, extensions): section 3 ignores those
            compared += 1
            self.assertEqual(mine.tbs, theirs.tbs_certificate_bytes)
            self.assertEqual(mine.signature, theirs.signature)
            self.assertEqual((mine.not_before, mine.not_after), (before, after))
            self.assertEqual(serialization.load_der_public_key(mine.public_key_info), their_key)
        self.assertGreater(compared, 100)  # the comparison did happen
