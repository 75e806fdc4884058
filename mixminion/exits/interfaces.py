"""The zope interfaces of exit modules, all in one place.

An exit module is found at run time as a Twisted plugin: the plugin object
(an :class:`IExitModuleFactory`, living in a module under
``mixminion/plugins/``) is cheap to import and only names the real module,
which it builds on demand.  Built-in modules and third-party ones are found
the same way (see :mod:`mixminion.exits.registry`).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from twisted.internet import defer
from zope.interface import Attribute, Interface, implementer


class IExitModule(Interface):
    """Delivers the payloads of one or more exit routing types.

    Life cycle: built by its factory, :meth:`configure` once, then
    :meth:`flush` once per delivery round and :meth:`deliver` for each item,
    :meth:`stop` at shutdown.

    A module that writes local files when it delivers (FRAGMENT's store,
    MBOX's ``MboxFile``) also has ``local_paths()``: the folders it writes
    to.  The node skips its rounds while one of them has less free space
    than the later stages keep (half of ``MinFreeDisk``); its items wait in
    their queue, their retry schedule untouched (see :func:`local_paths`).
    """

    name = Attribute("Module name as used in logs and counters, e.g. 'SMTP'.")
    exit_types = Attribute("frozenset of the exit routing types it handles.")
    priority = Attribute(
        "int; modules are flushed in ascending priority: FRAGMENT is -1, so its "
        "periodic work comes before the other modules' (0).")
    uses_tag = Attribute(
        "bool; true if the first 20 bytes of the routing info are a decoding "
        "handle (server.md §9.1).")
    retry_schedule = Attribute(
        "list of int seconds: the per-message retry schedule (server.md §6.3) "
        "the node applies to items this module answered RETRY.")

    def configure(section, context):
        """Read the module's configuration section and prepare to deliver.

        ``section`` maps option names to values: typed by the factory's
        ``options`` schema when it has one (the node read the file with
        it; a module given text, as in tests, types it with the same
        schema through :func:`mixminion.exits.options.section_values`), or
        the text of the file otherwise.  ``context`` is an
        :class:`~mixminion.exits.context.ExitContext`.
        Raises :class:`~mixminion.exits.errors.ExitConfigError`.
        """

    def deliver(item):
        """Deliver one :class:`~mixminion.exits.items.DeliveryItem`.

        Returns a Deferred firing with a
        :class:`~mixminion.exits.items.DeliveryResult`.  A failure (or an
        exception) counts as NORETRY.
        """

    def flush():
        """Once per delivery round, before the round's items: periodic work
        (expiry, retries of internal queues).  Returns a Deferred."""

    def advertise():
        """The descriptor section this module publishes, as an
        :class:`~mixminion.exits.context.Advertisement`, or None."""

    def stop():
        """Release resources at shutdown.  Returns a Deferred."""


@implementer(IExitModule)
class ExitModuleBase:
    """What a module with no periodic work, no descriptor section and
    nothing to release has: a module (built in or a plugin) inherits it
    and writes ``name``, ``exit_types`` and :meth:`deliver`, and what else
    it does differently."""

    priority = 0
    uses_tag = True
    retry_schedule: list[int] = []
    context: Any = None

    def configure(self, section: Mapping[str, Any], context: Any) -> None:
        self.context = context

    def deliver(self, item: Any) -> defer.Deferred:
        raise NotImplementedError

    def flush(self) -> defer.Deferred:
        return defer.succeed(None)

    def advertise(self) -> Optional[Any]:
        return None

    def stop(self) -> defer.Deferred:
        return defer.succeed(None)


def local_paths(provider: Any) -> list[str]:
    """The folders a module (or an MTA transport) writes to when it
    delivers: what its optional ``local_paths()`` says, none without one."""
    paths = getattr(provider, "local_paths", None)
    return list(paths()) if callable(paths) else []


class IExitModuleFactory(Interface):
    """What an exit-module plugin file provides (with ``IPlugin``).

    A factory may also have ``options``: the schema of its section (a
    :class:`mixminion.config.schema.SectionSpec` named like ``section``).
    With it the node checks the section when it reads its configuration
    (unknown keys, types, required options) and ``configure`` receives typed
    values; without it, ``configure`` receives the text of the file and must
    check it itself.
    """

    name = Attribute("Module name, unique among the installed plugins, e.g. 'SMTP'.")
    section = Attribute(
        "Name of the configuration section that enables the module, e.g. "
        "'Delivery/SMTP', or None for a module that is always enabled.")
    description = Attribute("One line for operators.")

    def create():
        """Build a new, unconfigured :class:`IExitModule` provider."""
