"""The plugin object for an exit module: light to import, names the real
module by dotted path, builds it on demand.

A plugin file under ``mixminion/plugins/`` (ours or a third party's) can be
one line per module, in the manner of Twisted's ``twisted/plugins``::

    smtp = ExitModulePlugin("SMTP", "Delivery/SMTP", "mixminion.exits.smtp.SMTPModule",
                            "Mail to any address through the local MTA")
"""

from __future__ import annotations

from typing import Optional

from twisted.plugin import IPlugin
from twisted.python.reflect import namedAny
from zope.interface import implementer

from mixminion.exits.interfaces import IExitModuleFactory


@implementer(IPlugin, IExitModuleFactory)
class ExitModulePlugin:
    def __init__(self, name: str, section: Optional[str], module_class: str, description: str = "") -> None:
        self.name = name
        self.section = section
        self.module_class = module_class
        self.description = description

    def create(self):
        return namedAny(self.module_class)()

    def __repr__(self) -> str:
        return f"<ExitModulePlugin {self.name} ({self.module_class})>"
