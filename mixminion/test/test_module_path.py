"""``[Server] ModulePath`` and ``Module``: an operator's own exit module,
loaded by name from a folder of their choosing, with its section read by
the schema it declares."""

from __future__ import annotations

import os
import sys
import textwrap

from twisted.internet import task
from twisted.trial import unittest

from mixminion.exits.context import ExitContext
from mixminion.server.config import ConfigError, load_config
from mixminion.server.delivery import build_exits

MODULE = '''\
from twisted.internet import defer

from mixminion.config.schema import Option, SectionSpec
from mixminion.config.values import BOOLEAN, STRING
from mixminion.exits.interfaces import ExitModuleBase
from mixminion.exits.plugin import ExitModulePlugin

OPTIONS = SectionSpec("Delivery/Archive", "keeps a copy", (
    Option("Enabled", BOOLEAN, "run it", required=True),
    Option("Label", STRING, "written on each copy", default="copy"),
))


class Archive(ExitModuleBase):
    name = "ARCHIVE"
    exit_types = frozenset({0x7FF0})
    uses_tag = False

    def configure(self, section, context):
        self.label = section["Label"]

    def deliver(self, item):
        return defer.succeed(None)


factory = ExitModulePlugin("ARCHIVE", "Delivery/Archive", "{package}.archive.Archive",
                           "keeps a copy", options=OPTIONS)
'''


class ModulePathTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        self.package = f"operator_modules_{id(self)}"
        folder = os.path.join(self.dir, "modules", self.package)
        os.makedirs(folder)
        open(os.path.join(folder, "__init__.py"), "w").close()
        with open(os.path.join(folder, "archive.py"), "w") as f:
            f.write(MODULE.replace("{package}", self.package))
        self.addCleanup(self._forget)

    def _forget(self) -> None:
        for name in [n for n in sys.modules if n.startswith(self.package)]:
            del sys.modules[name]
        folder = os.path.join(self.dir, "modules")
        if folder in sys.path:
            sys.path.remove(folder)

    def config(self, section: str) -> str:
        path = os.path.join(self.dir, "node.conf")
        with open(path, "w") as f:
            f.write(textwrap.dedent(f"""\
                [Server]
                BaseDir: {self.dir}/base
                Mode: relay
                Nickname: op
                Contact-Email: op@example.org
                ModulePath: {self.dir}/modules
                Module: {self.package}.archive.factory
                [Incoming/MMTP]
                Enabled: yes
                Hostname: localhost
                [Outgoing/MMTP]
                Enabled: yes
                """) + section)
        return path

    def test_module_is_loaded_and_its_section_read(self) -> None:
        config = load_config(self.config("[Delivery/Archive]\nEnabled: yes\nLabel: kept\n"))
        self.assertEqual(config["Delivery/Archive", "Label"], "kept")
        context = ExitContext(base_dir=config.server.base_dir, clock=task.Clock())
        dispatcher = build_exits(config, context)
        module = dispatcher.module_named("ARCHIVE")
        self.assertIsNotNone(module)
        self.assertEqual(module.label, "kept")
        self.assertIs(dispatcher.module_for(0x7FF0), module)

    def test_its_schema_refuses_a_typo(self) -> None:
        exc = self.assertRaises(ConfigError, load_config,
                                self.config("[Delivery/Archive]\nEnabled: yes\nLabell: x\n"))
        self.assertIn("[Delivery/Archive] Labell: unknown option; did you mean Label?", str(exc))
