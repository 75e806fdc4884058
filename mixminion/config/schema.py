"""Declaring options: :class:`Option` and :class:`SectionSpec`.

A schema is the one place an option is described: its type, default,
meaning, and how it reaches the program that reads it.  The node's schema
is in :mod:`mixminion.server.config`; exit modules declare the options of
their own ``[Delivery/<Name>]`` section with the same classes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from mixminion.config.values import ValueType


@dataclass(frozen=True)
class Option:
    """One option of one section, and how it reaches its effect.

    ``default`` is text in the option's own syntax (None: unset unless
    ``derived`` says how it is computed).  ``published``: the value shows
    in the server descriptor.  ``paths``: how a relative filename is
    resolved (``base`` = BaseDir, ``config`` = the config file's folder).

    Exactly one of the last four says what the option does, so that a test
    can check every option against the code (``module:qualname`` names):

    * ``reload``: the function a SIGHUP calls to apply a change (it also
      applies the value at start, or names the consumer that does);
    * ``consumer``: what reads the value once, at start (a restart
      applies a change);
    * ``refused``: not supported; a value other than the default stops
      start-up with this reason, which says what to use instead;
    * ``pending``: kept parseable for a feature not built yet; a value
      other than the default is accepted with a warning saying so.
    """

    key: str
    type: ValueType
    doc: str
    default: Optional[str] = None
    required: bool = False
    many: bool = False
    published: bool = False
    derived: str = ""
    paths: str = "config"
    attr: str = ""
    reload: str = ""
    consumer: str = ""
    refused: str = ""
    pending: str = ""

    @property
    def name(self) -> str:
        """The accessor name on the section object (``MixInterval`` ->
        ``mix_interval``)."""
        return self.attr or snake_case(self.key)

    @property
    def effect(self) -> str:
        """``reload``, ``restart``, ``refused`` or ``pending``."""
        if self.reload:
            return "reload"
        if self.refused:
            return "refused"
        if self.pending:
            return "pending"
        return "restart"


def snake_case(key: str) -> str:
    """``ListenIP6`` -> ``listen_ip6``, ``Contact-Email`` -> ``contact_email``."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", key)
    return spaced.replace("-", "_").lower()


@dataclass(frozen=True)
class SectionSpec:
    name: str
    doc: str
    options: tuple[Option, ...]
    required: bool = False

    def option(self, key: str) -> Optional[Option]:
        return next((o for o in self.options if o.key == key), None)
