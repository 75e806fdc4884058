"""RSA keys for unit tests, each made once per test run.

Making a 2048-bit key takes a noticeable fraction of a second, and trial has
no ``setUpClass``, so tests name the keys they need and share them: the same
name, size and exponent give the same key for the whole run, different names
give different keys.  The keys are random (not reproducible between runs),
like the keys a node makes for itself.
"""

from __future__ import annotations

import functools

from cryptography.hazmat.primitives.asymmetric import rsa

from mixminion.codec.rsa import PUBLIC_EXPONENT, PrivateKey

__all__ = ["key"]


@functools.cache
def key(name: str, bits: int = 2048, exponent: int = PUBLIC_EXPONENT) -> PrivateKey:
    """The test key called ``name`` (of ``bits`` bits and public exponent
    ``exponent``: a weak key for a test of refusals is still named)."""
    return PrivateKey(rsa.generate_private_key(public_exponent=exponent, key_size=bits))
