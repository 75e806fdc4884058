"""Run every known-answer vector in ``$TYPE3_VECTORS`` (default: our copy, tests/vectors).

One test method per vector file, made when this module is imported, so a new
file dropped into the folder is run without code changes.  Every array of
every file must have a registered checker and every entry may carry only the
fields its checker declares: anything unknown fails.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
import traceback
from pathlib import Path

from twisted.trial import unittest

import mixminion.test as test_package
from mixminion.test.vectorkit import ENVELOPE, REGISTRY, vectors_dir


def _load_checkers() -> None:
    for info in pkgutil.iter_modules(test_package.__path__):
        if info.name.startswith("vectors_"):
            importlib.import_module(f"{test_package.__name__}.{info.name}")


_load_checkers()


def run_vector_file(path: Path) -> list[str]:
    """Check every entry of one file; return a list of failure descriptions."""
    data = json.loads(path.read_text())
    failures: list[str] = []
    if data.get("format") != "mixminion-type3-test-vectors":
        return [f"{path.name}: unknown format {data.get('format')!r}"]
    if data.get("version") != 1:
        return [f"{path.name}: unknown version {data.get('version')!r}"]
    file_kind = data.get("file")
    arrays = {k: v for k, v in data.items() if k not in ENVELOPE}
    if not arrays:
        return [f"{path.name}: no vector arrays"]
    for array, entries in arrays.items():
        kind = REGISTRY.get((file_kind, array))
        if kind is None:
            failures.append(f"{path.name}: no checker for kind {file_kind}/{array}")
            continue
        if not isinstance(entries, list) or not entries:
            failures.append(f"{path.name}: {array} is not a non-empty list")
            continue
        for i, entry in enumerate(entries):
            where = f"{path.name}:{array}[{i}]"
            unknown = set(entry) - kind.fields
            if unknown:
                failures.append(f"{where}: unknown fields {sorted(unknown)}")
                continue
            try:
                kind.check(entry)
            except Exception:
                failures.append(f"{where}: {traceback.format_exc(limit=6)}")
    return failures


class VectorFolderTests(unittest.TestCase):
    """The folder itself: present and non-empty."""

    def test_folder_has_vectors(self) -> None:
        folder = vectors_dir()
        self.assertTrue(folder.is_dir(), f"vector folder {folder} missing")
        self.assertTrue(list(folder.glob("*.json")), f"no *.json in {folder}")

    def test_unknown_kind_fails(self) -> None:
        """A file with an array nobody checks is reported, not skipped."""
        tmp = Path(self.mktemp())
        tmp.write_text(json.dumps({"format": "mixminion-type3-test-vectors",
                                   "version": 1, "file": "primitives",
                                   "no_such_array": [{"x": 1}]}))
        self.assertEqual(len(run_vector_file(tmp)), 1)

    def test_unknown_field_fails(self) -> None:
        tmp = Path(self.mktemp())
        tmp.write_text(json.dumps({"format": "mixminion-type3-test-vectors",
                                   "version": 1, "file": "primitives",
                                   "sha1": [{"input_hex": "", "digest_hex":
                                             "da39a3ee5e6b4b0d3255bfef95601890afd80709",
                                             "surprise": 1}]}))
        self.assertIn("unknown fields", run_vector_file(tmp)[0])


class KnownAnswerVectors(unittest.TestCase):
    """One method per ``*.json`` file found at import time."""


def _make_test(path: Path):
    path = path.resolve()
    def test(self: unittest.TestCase) -> None:
        failures = run_vector_file(path)
        if failures:
            self.fail(f"{len(failures)} failing vector(s):\n" + "\n".join(failures[:20]))

    test.__doc__ = f"all vectors in {path.name}"
    return test


def _install_tests() -> None:
    folder = vectors_dir()
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        name = "test_" + re.sub(r"\W", "_", path.stem)
        setattr(KnownAnswerVectors, name, _make_test(path))


_install_tests()
