"""What a node loads is what it is configured to do (issue 18, point 3):
a node that neither publishes, pings nor serves metrics imports no HTTP
client or server, no prometheus_client and no client code.  Checked in a
fresh interpreter, where nothing was imported before."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from twisted.trial import unittest

from mixminion.testing.daemon import node_config

_PROBE = """
import json, sys
from twisted.internet import reactor
from mixminion.server.config import load_config
from mixminion.server import tap
tap.build_node(load_config(sys.argv[1]), reactor)
print(json.dumps(sorted(sys.modules)))
"""

#: what only publishing, pinging or /metrics need
OPTIONAL = ("twisted.web.client", "twisted.web.server", "twisted.spread.pb", "prometheus_client",
            "mixminion.client.directory", "mixminion.client.paths", "mixminion.server.publish",
            "mixminion.server.pinging.service", "mixminion.server.metrics")


class NodeImportTests(unittest.TestCase):
    def loaded(self, server: str = "") -> set[str]:
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        conf = os.path.join(base, "node.conf")
        with open(conf, "w") as f:
            f.write(node_config(os.path.join(base, "base"), 48099, server=server))
        out = subprocess.run([sys.executable, "-c", _PROBE, conf], capture_output=True, text=True,
                             check=True).stdout
        return set(json.loads(out.splitlines()[-1]))

    def test_a_plain_relay_loads_none_of_it(self) -> None:
        self.assertEqual(sorted(set(OPTIONAL) & self.loaded()), [])

    def test_metrics_load_what_they_need(self) -> None:
        """Not vacuous: a node with a metrics port loads prometheus_client
        and twisted.web's server."""
        loaded = self.loaded("MetricsPort: 48100\n")
        self.assertIn("prometheus_client", loaded)
        self.assertIn("twisted.web.server", loaded)


class ChildImportTests(unittest.TestCase):
    """The processing child hashes through cryptography alone: ``hashlib``
    and ``hmac`` load ``_hashlib``, and with it the system's libcrypto
    beside cryptography's own (3.7 MB of the child's memory)."""

    def test_the_child_loads_no_second_libcrypto(self) -> None:
        probe = ("import json, sys, mixminion.server.processing_child; "
                 "print(json.dumps(sorted(sys.modules)))")
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                             check=True).stdout
        loaded = set(json.loads(out.splitlines()[-1]))
        self.assertIn("cryptography.hazmat.primitives.hashes", loaded)
        self.assertEqual(sorted({"hashlib", "_hashlib", "hmac"} & loaded), [])
