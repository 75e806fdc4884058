"""The few fields of an X.509 certificate that the MMTP chain check reads.

mmtp.md section 5 needs, of each certificate, only its public key, its
validity window, and (of the link certificate) the signed bytes, the
signature and its algorithm; names, serials and extensions are ignored
(section 3).  Reading just those from the DER costs the client nothing at
start-up, where ``cryptography.x509`` cost a tenth of a one-packet send's
CPU (issue 15, ``benchmarks/client.py``).

The reader is strict DER (definite, minimal lengths; nothing after the
certificate) and refuses anything else with :class:`CertificateFormatError`;
the tests check it against ``cryptography.x509`` on every certificate we
and the reference make, and on corrupted ones.  The key itself is parsed
by ``cryptography`` (``load_der_public_key``).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

__all__ = ["CertificateFormatError", "CertificateFields", "read_certificate", "RSA_SIGNATURES"]

_SEQUENCE = 0x30
_INTEGER = 0x02
_BIT_STRING = 0x03
_OID = 0x06
_UTC_TIME = 0x17
_GENERALIZED_TIME = 0x18
_VERSION = 0xA0  # [0] EXPLICIT, constructed

_RSA_PKCS1 = bytes.fromhex("2a864886f70d0101")
#: signature AlgorithmIdentifier OIDs (DER contents) -> hash name
RSA_SIGNATURES: dict[bytes, str] = {
    _RSA_PKCS1 + b"\x05": "sha1",
    _RSA_PKCS1 + b"\x0b": "sha256",
    _RSA_PKCS1 + b"\x0c": "sha384",
    _RSA_PKCS1 + b"\x0d": "sha512",
}


class CertificateFormatError(ValueError):
    """Not a DER X.509 certificate this reader accepts."""


@dataclass(frozen=True)
class CertificateFields:
    """What the chain check reads.  ``signature_oid`` is the DER contents
    of the outer signature algorithm's OID (see :data:`RSA_SIGNATURES`)."""

    tbs: bytes
    signature_oid: bytes
    signature: bytes
    not_before: float
    not_after: float
    public_key_info: bytes


def _element(data: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """The tag at ``pos`` and where its contents start and end."""
    if pos + 2 > end:
        raise CertificateFormatError("truncated element")
    tag, first = data[pos], data[pos + 1]
    if tag & 0x1F == 0x1F:
        raise CertificateFormatError("multi-byte tags are not used in certificates")
    pos += 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or pos + count > end:
            raise CertificateFormatError("bad length")
        length = int.from_bytes(data[pos:pos + count], "big")
        if length < 0x80 or data[pos] == 0:
            raise CertificateFormatError("length not in its shortest form")
        pos += count
    if pos + length > end:
        raise CertificateFormatError("element longer than what holds it")
    return tag, pos, pos + length


def _expect(data: bytes, pos: int, end: int, tag: int) -> tuple[int, int]:
    found, start, stop = _element(data, pos, end)
    if found != tag:
        raise CertificateFormatError(f"expected tag {tag:#04x}, found {found:#04x}")
    return start, stop


def _algorithm_oid(data: bytes, pos: int, end: int) -> tuple[bytes, int]:
    """An AlgorithmIdentifier's OID contents, and where it ends."""
    start, stop = _expect(data, pos, end, _SEQUENCE)
    oid_start, oid_stop = _expect(data, start, stop, _OID)
    if oid_stop < stop:  # parameters: NULL for RSA
        if data[oid_stop:stop] != b"\x05\x00":
            raise CertificateFormatError("unexpected algorithm parameters")
    return data[oid_start:oid_stop], stop


def _time(data: bytes, pos: int, end: int) -> tuple[float, int]:
    tag, start, stop = _element(data, pos, end)
    text = data[start:stop]
    # bytes.isdigit: ASCII digits only
    if not (text.endswith(b"Z") and text[:-1].isdigit()):
        raise CertificateFormatError("validity time not YYMMDDHHMMSSZ in UTC")
    if tag == _UTC_TIME and len(text) == 13:
        year = int(text[0:2])
        year += 2000 if year < 50 else 1900
        rest = text[2:]
    elif tag == _GENERALIZED_TIME and len(text) == 15:
        year = int(text[0:4])
        rest = text[4:]
    else:
        raise CertificateFormatError("bad validity time")
    month, day, hour, minute, second = (int(rest[i:i + 2]) for i in range(0, 10, 2))
    try:
        when = datetime.datetime(year, month, day, hour, minute, second,
                                 tzinfo=datetime.timezone.utc)
    except ValueError:
        raise CertificateFormatError("validity time out of range") from None
    return when.timestamp(), stop


def read_certificate(der: bytes) -> CertificateFields:
    """The fields of one DER certificate; :class:`CertificateFormatError`
    if it is not one."""
    data = bytes(der)
    cert_start, cert_end = _expect(data, 0, len(data), _SEQUENCE)
    if cert_end != len(data):
        raise CertificateFormatError("data after the certificate")
    tbs_tag, tbs_start, tbs_end = _element(data, cert_start, cert_end)
    if tbs_tag != _SEQUENCE:
        raise CertificateFormatError("no to-be-signed part")
    tbs = data[cert_start:tbs_end]
    outer_oid, pos = _algorithm_oid(data, tbs_end, cert_end)
    sig_start, sig_end = _expect(data, pos, cert_end, _BIT_STRING)
    if sig_end != cert_end:
        raise CertificateFormatError("data after the signature")
    if sig_end == sig_start or data[sig_start] != 0:
        raise CertificateFormatError("signature is not a whole number of bytes")
    signature = data[sig_start + 1:sig_end]

    pos = tbs_start
    if data[pos] == _VERSION:
        _, pos = _expect(data, pos, tbs_end, _VERSION)
    _, pos = _expect(data, pos, tbs_end, _INTEGER)  # serial: not checked (section 3)
    inner_oid, pos = _algorithm_oid(data, pos, tbs_end)
    if inner_oid != outer_oid:
        raise CertificateFormatError("the two signature algorithms differ")
    _, pos = _expect(data, pos, tbs_end, _SEQUENCE)  # issuer: not checked
    validity_start, pos = _expect(data, pos, tbs_end, _SEQUENCE)
    not_before, after = _time(data, validity_start, pos)
    not_after, after = _time(data, after, pos)
    if after != pos:
        raise CertificateFormatError("extra data in the validity")
    _, pos = _expect(data, pos, tbs_end, _SEQUENCE)  # subject: not checked
    spki_tag, _, spki_end = _element(data, pos, tbs_end)
    if spki_tag != _SEQUENCE:
        raise CertificateFormatError("no public key")
    public_key_info = data[pos:spki_end]
    # Anything after (unique IDs, extensions) is ignored, as section 3 says.
    return CertificateFields(tbs, outer_oid, signature, not_before, not_after, public_key_info)
