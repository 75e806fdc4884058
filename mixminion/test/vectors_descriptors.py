"""Vector checks for descriptors.json: signed descriptors and corrupted copies."""

from __future__ import annotations

from typing import Any, Callable, Mapping

from mixminion.directory.descriptor import (
    BadDigest,
    BadSignature,
    DescriptorError,
    ServerDescriptor,
    parse_descriptor,
)
from mixminion.codec.textformat import document_digest
from mixminion.test.vectorkit import Entry, register

F = "descriptors"


def _eq(got: object, want: object, what: str) -> None:
    if got != want:
        raise AssertionError(f"{what}: got {got!r}, want {want!r}")


#: how to read each key of a vector's ``parsed`` object off a ServerDescriptor
_PARSED: Mapping[str, Callable[[ServerDescriptor], Any]] = {
    "nickname": lambda d: d.nickname,
    "identity_public_der_hex": lambda d: d.identity.der.hex(),
    "identity_digest_hex": lambda d: d.identity_digest.hex(),
    "identity_fingerprint": lambda d: d.fingerprint,
    "packet_public_der_hex": lambda d: d.packet_key.der.hex(),
    "signature_hex": lambda d: d.signature.hex(),
    "published": lambda d: d.published,
    "valid_after": lambda d: d.valid_after,
    "valid_until": lambda d: d.valid_until,
    "contact": lambda d: d.contact,
    "packet_versions": lambda d: list(d.packet_versions),
    "software": lambda d: d.software,
    "hostname": lambda d: d.hostname,
    "port": lambda d: d.port,
    "incoming_protocols": lambda d: list(d.incoming_protocols),
    "outgoing_protocols": lambda d: list(d.outgoing_protocols),
    "capabilities": lambda d: d.capabilities,
    "routing_info_hex": lambda d: d.routing_info.hex() if d.routing_info is not None else None,
}

#: values whose order carries no meaning
_AS_SET = frozenset({"capabilities"})


def _mangle(text: str) -> str:
    """CRLF line endings and indentation: canonicalisation must undo both."""
    body = text[:-1] if text.endswith("\n") else text
    return "\r\n".join("  \t" + line + " " for line in body.split("\n")) + "\r\n"


@register(F, "valid", "text validate_at digest_hex parsed")
def check_valid(e: Entry) -> None:
    unknown = set(e["parsed"]) - set(_PARSED)
    if unknown:
        raise AssertionError(f"parsed fields nobody checks: {sorted(unknown)}")
    desc = parse_descriptor(e["text"], e["validate_at"])
    _eq(desc.digest.hex(), e["digest_hex"], "digest")
    _eq(document_digest(e["text"]).hex(), e["digest_hex"], "document_digest")
    for key, want in e["parsed"].items():
        got = _PARSED[key](desc)
        if key in _AS_SET:
            got, want = set(got), set(want)
        _eq(got, want, key)
    _eq(desc.caps, " ".join(e["parsed"]["capabilities"]), "caps display order")
    _eq(desc.warnings, (), "warnings")
    mangled = parse_descriptor(_mangle(e["text"]), e["validate_at"])
    _eq(mangled.digest.hex(), e["digest_hex"], "digest of CRLF/indented copy")


_ERRORS = {"digest": BadDigest, "signature": BadSignature}


@register(F, "invalid", "text validate_at why expected_error")
def check_invalid(e: Entry) -> None:
    expected = _ERRORS[e["expected_error"]]
    try:
        parse_descriptor(e["text"], e["validate_at"])
    except expected:
        return
    except DescriptorError as exc:
        raise AssertionError(
            f"{e['why']}: wanted {expected.__name__}, got {type(exc).__name__}: {exc}"
        ) from None
    raise AssertionError(f"invalid descriptor accepted: {e['why']}")
