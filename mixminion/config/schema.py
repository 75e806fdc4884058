"""Declaring options: :class:`Option` and :class:`SectionSpec`.

A schema is the one place an option is described: its type, default,
meaning, and how it reaches the program that reads it.  The node's schema
is in :mod:`mixminion.server.config`; exit modules declare the options of
their own ``[Delivery/<Name>]`` section with the same classes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional

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

    def default(self, key: str) -> Any:
        """The parsed default of ``key`` (None if it has none)."""
        option = self.option(key)
        if option is None:
            raise KeyError(key)
        return option.type.parse(option.default) if option.default is not None else None


def read_values(spec: SectionSpec, given: Mapping[str, Any]) -> dict[str, Any]:
    """A section's values by key, as its schema types them.

    ``given`` maps keys to the text of the file (a list of texts for a
    repeatable option) or to values already parsed by the same types (what
    the node passes after reading its file), which are kept as they are.
    Defaults are filled in (None where there is none).  Raises ValueError
    ``[Section] Key: reason`` for an unknown key, a value that does not
    parse, or a required option that is missing.
    """
    values: dict[str, Any] = {}
    for key, value in given.items():
        option = spec.option(key)
        if option is None:
            known = ", ".join(o.key for o in spec.options)
            raise ValueError(f"[{spec.name}] {key}: unknown option (known: {known})")
        try:
            values[key] = _typed(option, value)
        except ValueError as exc:
            raise ValueError(f"[{spec.name}] {key}: {exc}") from None
    for option in spec.options:
        if option.key in values:
            continue
        if option.required:
            raise ValueError(f"[{spec.name}] {option.key}: required option is missing")
        if option.many:
            values[option.key] = ()
        elif option.default is not None:
            values[option.key] = option.type.parse(option.default)
        else:
            values[option.key] = None
    return values


def _typed(option: Option, value: Any) -> Any:
    if option.many:
        items = value if isinstance(value, (list, tuple)) else (value,)
        return tuple(option.type.parse(v) if isinstance(v, str) else v for v in items)
    return option.type.parse(value) if isinstance(value, str) else value
