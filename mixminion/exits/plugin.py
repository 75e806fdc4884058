"""The plugin object for an exit module: light to import, names the real
module by dotted path, builds it on demand.

A plugin file under ``mixminion/plugins/`` (ours or a third party's) can be
one line per module, in the manner of Twisted's ``twisted/plugins``::

    smtp = ExitModulePlugin("SMTP", "Delivery/SMTP", "mixminion.exits.smtp.SMTPModule",
                            "Mail to any address through the local MTA", options=SMTP)

``options`` is the schema of the module's section (a
:class:`mixminion.config.schema.SectionSpec`): with it the node checks the
section when it reads its file, exactly as its own options.
"""

from __future__ import annotations

from typing import Optional

from mixminion.config.schema import SectionSpec

from twisted.plugin import IPlugin
from twisted.python.reflect import namedAny
from zope.interface import implementer

from mixminion.exits.interfaces import IExitModuleFactory


@implementer(IPlugin, IExitModuleFactory)
class ExitModulePlugin:
    def __init__(self, name: str, section: Optional[str], module_class: str, description: str = "",
                 options: Optional[SectionSpec] = None) -> None:
        self.name = name
        self.section = section
        self.module_class = module_class
        self.description = description
        self.options = options

    def create(self):
        return namedAny(self.module_class)()

    def __repr__(self) -> str:
        return f"<ExitModulePlugin {self.name} ({self.module_class})>"
