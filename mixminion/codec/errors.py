"""The codec's own exception types.

Every failure caused by bad input surfaces as a subclass of ``CodecError``,
so callers (and the fuzz tests) can tell "the bytes were wrong" from a bug.
"""

from __future__ import annotations


class CodecError(Exception):
    """Base class: the input bytes could not be used."""


class CryptoError(CodecError):
    """A cryptographic check failed (OAEP padding, signature, key size)."""


class ParseError(CodecError):
    """A structure did not have the format the spec requires."""


class BuildError(CodecError):
    """The caller asked for something that cannot be built (path too long,
    address invalid, message too large...)."""


class CompressionError(ParseError):
    """A compressed message was not a valid zlib stream of our settings."""


class ChecksumError(ParseError):
    """A payload's SHA-1 checksum did not match: it is encrypted (a reply or
    an end-to-end encrypted message), not for us, or junk -- as opposed to a
    payload that checks but is malformed."""
