"""No package imports from a layer above it (doc/server.md, "Layers").

Each package is imported whole -- every module in it -- in a fresh
interpreter, and the packages of ours it pulled in are compared with what
its layer may use.  A fresh interpreter, because in this one the test
runner has imported everything already.
"""

from __future__ import annotations

import json
import subprocess
import sys

from twisted.trial import unittest

#: what each package may import of ours; ``mixminion.fileutil`` and the
#: other top-level utility modules count as their own "packages"
ALLOWED: dict[str, set[str]] = {
    "codec": set(),
    "mmtp": {"codec", "events"},
    "config": {"codec"},
    "nym": {"codec"},
    "directory": {"codec", "config", "mmtp", "events", "fileutil", "logfilter", "listening",
                  "signals"},
    "client": {"codec", "config", "mmtp", "events", "directory", "fileutil", "nym"},
    "exits": {"codec", "config", "mmtp", "events", "directory", "plugins", "fileutil", "nym",
              "sqlitefile", "listening"},
    "server": {"codec", "config", "mmtp", "events", "directory", "client", "exits", "plugins", "nym",
               "fileutil", "sqlitefile", "logfilter", "procinfo", "listening", "signals"},
}

_PROBE = """
import importlib, json, pkgutil, sys
name = sys.argv[1]
package = importlib.import_module("mixminion." + name)
for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
    importlib.import_module(info.name)
print(json.dumps(sorted({m.split(".")[1] for m in sys.modules
                         if m.startswith("mixminion.") and m.count(".") >= 1})))
"""


def imported_by(package: str) -> set[str]:
    """Our packages that importing every module of ``package`` loads."""
    out = subprocess.run([sys.executable, "-c", _PROBE, package], capture_output=True,
                         text=True, check=True).stdout
    return set(json.loads(out)) - {package}


class LayeringTests(unittest.TestCase):
    def test_no_package_imports_from_above(self) -> None:
        wrong = {}
        for package, allowed in ALLOWED.items():
            extra = imported_by(package) - allowed
            if extra:
                wrong[package] = sorted(extra)
        self.assertEqual(wrong, {}, "packages importing from a layer above them")

    def test_the_probe_sees_imports(self) -> None:
        """Not vacuous: the server pulls in the layers below it."""
        self.assertLessEqual({"codec", "mmtp", "config", "exits"}, imported_by("server"))
