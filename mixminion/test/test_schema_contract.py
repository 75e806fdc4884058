"""The manual is a contract: every option of the schema reaches the code.

Each option names what consumes it (``Option.consumer``), the SIGHUP
applier that changes it while running (``Option.reload``), or why it is
refused or not used yet.  These tests walk the whole schema and fail when
a named consumer or applier does not exist or never reads the option, when
a refused option starts anyway, and when the man page generated from the
schema is out of date.  The behaviour of each consumed option is shown by
its own tests (test_node_options and tests/test_node_process).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import re
import subprocess
import sys
import textwrap
from functools import lru_cache
from typing import Any

from twisted.trial import unittest

import mixminion
from mixminion.server import config as cfg
from mixminion.server import reload

REPO = os.path.dirname(os.path.dirname(os.path.abspath(mixminion.__file__)))
PACKAGE = os.path.dirname(os.path.abspath(mixminion.__file__))


def _resolve(name: str) -> Any:
    module, _, qualname = name.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


@lru_cache(maxsize=None)
def _definitions() -> dict[str, list[str]]:
    """Every function and class of the package (tests left out), by name:
    their sources, to follow a consumer's calls one level down."""
    found: dict[str, list[str]] = {}
    for folder, dirs, files in os.walk(PACKAGE):
        dirs[:] = [d for d in dirs if d != "test"]
        for name in files:
            if not name.endswith(".py"):
                continue
            with open(os.path.join(folder, name)) as f:
                source = f.read()
            tree = ast.parse(source)
            owners = {id(f): c.name for c in ast.walk(tree) if isinstance(c, ast.ClassDef)
                      for f in c.body}
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    segment = textwrap.dedent(ast.get_source_segment(source, node, padded=True) or "")
                    owner = _SECTION_CLASSES.get(owners.get(id(node), ""))
                    if owner:  # a section's own method reads it as self.x
                        segment = re.sub(r"\bself\.", f"{owner}.", segment)
                    found.setdefault(node.name, []).append(segment)
    return found


#: the classes of the typed sections, and the name ServerConfig gives each
_SECTION_CLASSES = {"HostSection": "host", "ServerSection": "server",
                    "IncomingSection": "incoming", "OutgoingSection": "outgoing",
                    "DirectorySection": "directory", "PingingSection": "pinging"}


#: the typed section objects of ServerConfig, by section name
_ATTRS = {"Host": "host", "Server": "server", "Incoming/MMTP": "incoming",
          "Outgoing/MMTP": "outgoing", "DirectoryServers": "directory", "Pinging": "pinging"}


def _reads(obj: Any, option: cfg.Option, depth: int = 1, section: str = "") -> bool:
    """True if ``obj``'s source, or that of a function or class it names
    (up to ``depth`` levels down), reads the option by its accessor
    (``.mix_interval``) or its key (``"MixInterval"``)."""
    needle = re.compile(rf"\.{option.name}\b|\"{re.escape(option.key)}\"")
    if section in _ATTRS:
        # The node's sections are typed: the accessor must be read from the
        # right one (``outgoing.legacy``, not ``incoming.legacy``).
        needle = re.compile(rf"\b{_ATTRS[section]}\.{option.name}\b|\"{re.escape(option.key)}\"")
    sources = [textwrap.dedent(inspect.getsource(obj))]
    seen: set[str] = set()
    for _ in range(depth + 1):
        if any(needle.search(source) for source in sources):
            return True
        names = set()
        for source in sources:
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, ast.Attribute):
                    names.add(node.attr)
                elif isinstance(node, ast.Name):
                    names.add(node.id)
        names -= seen
        seen |= names
        sources = [body for name in names for body in _definitions().get(name, ())]
    return False


def _exit_module_reads(section: str, option: cfg.Option) -> bool:
    """A delivery option reaches the exit module that owns its section:
    the module's class reads it (the node rebuilds modules on SIGHUP)."""
    from mixminion.exits.registry import find_exit_modules

    [factory] = [f for f in find_exit_modules().values() if f.section == section]
    return _reads(type(factory.create()), option, depth=3)


def _other_value(option: cfg.Option) -> str:
    """A valid value that differs from the option's default."""
    samples = {"boolean": ("yes", "no"), "filename": ("/nonexistent/x",),
               "command": ("/bin/true",), "interval": ("5 minutes", "7 minutes"),
               "string": ("x",)}
    default = option.type.parse(option.default) if option.default is not None else None
    for text in samples[option.type.name]:
        if option.type.parse(text) != default:
            return text
    raise AssertionError(f"no sample value for {option.key}")


ALL = [(spec.name, option) for spec in cfg.SCHEMA_SECTIONS for option in spec.options]


class EveryOptionHasAnEffect(unittest.TestCase):
    def test_exactly_one_effect_each(self) -> None:
        for section, option in ALL:
            given = [f for f in ("reload", "consumer", "refused", "pending") if getattr(option, f)]
            self.assertEqual(len(given), 1, f"[{section}] {option.key}: {given}")

    def test_consumers_exist_and_read_the_option(self) -> None:
        unread = [f"[{section}] {option.key}: {option.consumer}" for section, option in ALL
                  if option.consumer and not _reads(_resolve(option.consumer), option, section=section)]
        self.assertEqual(unread, [])

    def test_appliers_exist_and_read_the_option(self) -> None:
        unread = [f"[{section}] {option.key}: {option.reload}" for section, option in ALL
                  if option.reload and not _reads(reload.applier(option.reload), option, section=section)
                  and not section.startswith("Delivery/")]
        self.assertEqual(unread, [])

    def test_delivery_options_reach_their_exit_module(self) -> None:
        unread = [f"[{section}] {option.key}" for section, option in ALL
                  if section.startswith("Delivery/") and option.reload
                  and not _exit_module_reads(section, option)]
        self.assertEqual(unread, [])

    def test_reload_plan_names_the_appliers(self) -> None:
        for section, option in ALL:
            if option.reload:
                self.assertEqual(cfg._applier(section, option.key), option.reload)
            else:
                self.assertEqual(cfg._applier(section, option.key), "")

    def test_the_check_can_fail(self) -> None:
        """An option nobody reads is caught."""
        ghost = cfg.Option("Ghost", cfg.INT, "never read", consumer=cfg._NODE)
        self.assertFalse(_reads(_resolve(ghost.consumer), ghost))
        # read from another section only: [Outgoing/MMTP] Legacy is not incoming.legacy
        legacy = cfg.SCHEMA["Outgoing/MMTP"].option("Legacy")
        self.assertTrue(_reads(_resolve(cfg._NODE), legacy, section="Outgoing/MMTP"))
        self.assertFalse(_reads(_resolve("mixminion.server.config:ServerConfig.connection_limits"),
                                cfg.SCHEMA["Incoming/MMTP"].option("MaxConnections"),
                                section="Outgoing/MMTP"))


class RefusedAndPendingOptions(unittest.TestCase):
    """What the node cannot do stops start-up, in one line saying why and
    what to use instead; what it does not do yet says so."""

    BASE = ("[Server]\nBaseDir: /tmp/contract\nMode: relay\nNickname: c\n"
            "Contact-Email: c@example.org\n[Incoming/MMTP]\nEnabled: yes\nHostname: h\n"
            "[Outgoing/MMTP]\nEnabled: yes\n")

    def _with(self, section: str, line: str) -> str:
        if f"[{section}]\n" in self.BASE:
            return self.BASE.replace(f"[{section}]\n", f"[{section}]\n{line}\n")
        enabled = "Enabled: no\n" if section.startswith("Delivery/") else ""
        return self.BASE + f"[{section}]\n{enabled}{line}\n"

    def _parse(self, text: str) -> cfg.ServerConfig:
        return cfg.parse_config(text, "node.conf", config_dir="/tmp", plugin_sections={})

    def test_refused_options_stop_start_up(self) -> None:
        refused = [(s, o) for s, o in ALL if o.refused]
        self.assertGreater(len(refused), 5)
        for section, option in refused:
            text = self._with(section, f"{option.key}: {_other_value(option)}")
            exc = self.assertRaises(cfg.ConfigError, self._parse, text)
            self.assertIn(f"[{section}] {option.key}: not supported: {option.refused}", str(exc))
            self.assertNotIn("\n", str(exc))

    def test_refused_options_at_their_default_are_accepted(self) -> None:
        for section, option in ALL:
            if option.refused and option.default is not None:
                self._parse(self._with(section, f"{option.key}: {option.default}"))

    def test_pending_options_warn(self) -> None:
        for section, option in ALL:
            if option.pending:
                config = self._parse(self._with(section, f"{option.key}: {_other_value(option)}"))
                self.assertEqual(len([w for w in config.warnings if option.pending in w]), 1,
                                 option.key)


class ManualMatchesSchema(unittest.TestCase):
    def test_man_page_is_generated_from_the_schema(self) -> None:
        result = subprocess.run([sys.executable, os.path.join(REPO, "doc", "gen_conf_man.py"),
                                 "--check"], capture_output=True, text=True)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def test_man_page_states_each_effect(self) -> None:
        with open(os.path.join(REPO, "doc", "mixminiond.conf.5")) as f:
            page = f.read()
        for section, option in ALL:
            if option.refused:
                self.assertIn(option.refused.replace("-", "\\-")[:40], page, option.key)
