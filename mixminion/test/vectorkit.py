"""Shared plumbing for the known-answer vector checks.

Each ``vectors_*.py`` module in this package registers, for one
``(file, array)`` pair of the vector format, the function that checks one
entry and the exact set of fields an entry may carry.  The runner in
``test_vectors.py`` walks every ``*.json`` file in ``$TYPE3_VECTORS`` and
fails on any file, array or field nobody registered: an unknown kind is a
failure, never a skip.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, FrozenSet, Mapping, Tuple

Entry = Mapping[str, Any]
Checker = Callable[[Entry], None]

#: the project's own copy of ../shared/vectors, so a clone alone passes
PROJECT_VECTORS = Path(__file__).resolve().parents[2] / "tests" / "vectors"


def vectors_dir() -> Path:
    """The folder named by ``TYPE3_VECTORS``, else the project's copy."""
    env = os.environ.get("TYPE3_VECTORS")
    if env:
        return Path(env).resolve()
    return PROJECT_VECTORS


@dataclass(frozen=True)
class Kind:
    check: Checker
    fields: FrozenSet[str]


REGISTRY: Dict[Tuple[str, str], Kind] = {}

#: top-level keys every vector file carries besides its arrays
ENVELOPE = frozenset({"format", "version", "file"})


def register(file: str, array: str, fields: str) -> Callable[[Checker], Checker]:
    """Decorator: ``fields`` is a whitespace-separated list of allowed keys."""

    def wrap(fn: Checker) -> Checker:
        key = (file, array)
        if key in REGISTRY:
            raise RuntimeError(f"two checkers for {key}")
        REGISTRY[key] = Kind(fn, frozenset(fields.split()))
        return fn

    return wrap


def unhex(value: str) -> bytes:
    return bytes.fromhex(value)


def unb64(value: str) -> bytes:
    return base64.b64decode(value, validate=True)


def blob(entry: Entry, stem: str) -> bytes:
    """The bytes of field ``stem`` whether given as ``_hex`` or ``_b64``."""
    if stem + "_hex" in entry:
        return unhex(entry[stem + "_hex"])
    return unb64(entry[stem + "_b64"])
