"""Finding exit modules (Twisted plugins) and routing items to them
(spec: server.md §9.2).

The node calls :func:`build_dispatcher` with its configuration; the
resulting :class:`Dispatcher` is what it hands delivery items to.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from typing import Any, Iterable, Mapping, Optional

from twisted.internet import defer
from twisted.plugin import getPlugins, pluginPackagePaths
from twisted.python.failure import Failure
from zope.interface.exceptions import Invalid
from zope.interface.verify import verifyObject

from mixminion.events import Event
import mixminion.plugins
from mixminion.exits.context import Advertisement, ExitContext
from mixminion.exits.errors import BrokenExitPlugin, ExitConfigError, MissingExitModule, UndeliverableItem
from mixminion.exits.interfaces import IExitModule, IExitModuleFactory
from mixminion.exits.items import DeliveryItem, DeliveryResult
from mixminion.config.values import BOOLEAN

#: providers of the interfaces (zope interfaces are not types to mypy)
ExitModule = Any
ExitModuleFactory = Any

#: sections owned by exit modules
DELIVERY_PREFIX = "Delivery/"
_MAIL_SECTIONS = ("Delivery/SMTP", "Delivery/MBOX")
_RESULT_EVENTS = {
    DeliveryResult.OK: Event.EXIT_DELIVERED,
    DeliveryResult.RETRY: Event.EXIT_RETRY,
    DeliveryResult.NORETRY: Event.EXIT_FAILED,
}


# --- discovery --------------------------------------------------------------------------


def refresh_plugin_path() -> None:
    """Add ``mixminion/plugins`` directories that appeared on ``sys.path``
    since :mod:`mixminion.plugins` was imported."""
    path = mixminion.plugins.__path__
    for entry in pluginPackagePaths(mixminion.plugins.__name__):
        if entry not in path:
            path.append(entry)


def _where(plugin: object) -> str:
    """``module.attribute`` of a plugin object, for error messages."""
    prefix = mixminion.plugins.__name__ + "."
    for name, module in list(sys.modules.items()):
        if name.startswith(prefix) and module is not None:
            for attr, value in list(vars(module).items()):
                if value is plugin:
                    return f"{name}.{attr}"
    return repr(plugin)


def check_factory(plugin: object) -> ExitModuleFactory:
    """Verify a plugin object against :class:`IExitModuleFactory`."""
    try:
        verifyObject(IExitModuleFactory, plugin)
    except Invalid as exc:
        raise BrokenExitPlugin(
            f"exit-module plugin {_where(plugin)} does not implement IExitModuleFactory: {exc}") from None
    name = plugin.name  # type: ignore[attr-defined]
    if not isinstance(name, str) or not name:
        raise BrokenExitPlugin(f"exit-module plugin {_where(plugin)} has no usable name")
    return plugin  # type: ignore[return-value]


def find_exit_modules(strict: bool = False, log: Any = None) -> dict[str, ExitModuleFactory]:
    """Every installed exit-module plugin, by module name.

    Broken plugins (not implementing the interface, or reusing a name) raise
    :class:`BrokenExitPlugin` when ``strict``, otherwise they are logged and
    left out.
    """
    from twisted.logger import Logger

    log = log or Logger(namespace="mixminion.exits.registry")
    refresh_plugin_path()
    with warnings.catch_warnings():
        # An editable install imports mixminion through a finder of its own,
        # which twisted.python.modules reports as a PEP 302 oddity; harmless.
        warnings.filterwarnings("ignore", message=r".*not in path importer cache", category=UserWarning)
        plugins = list(getPlugins(IExitModuleFactory, mixminion.plugins))
    found: dict[str, ExitModuleFactory] = {}
    for plugin in plugins:
        try:
            factory = check_factory(plugin)
            if factory.name in found:
                raise BrokenExitPlugin(
                    f"exit-module plugins {_where(found[factory.name])} and {_where(plugin)} "
                    f"both call themselves {factory.name!r}")
        except BrokenExitPlugin as exc:
            if strict:
                raise
            log.error("Ignoring a broken plugin: {error}", error=str(exc))
            continue
        found[factory.name] = factory
    return found


def extra_factories(module_path: Iterable[str], modules: Iterable[str]) -> dict[str, ExitModuleFactory]:
    """``[Server] ModulePath`` and ``Module``: factories loaded by name
    besides the installed plugins.

    Each folder of ``module_path`` is put on Python's path (ahead of what
    is there, so an operator's module wins over one of the same name), and
    each ``package.module.Name`` is imported and checked as an
    :class:`IExitModuleFactory`.  Raises :class:`MissingExitModule` for a
    name that cannot be imported and :class:`BrokenExitPlugin` for one
    that is not a factory.
    """
    for folder in reversed(list(module_path)):
        if folder not in sys.path:
            sys.path.insert(0, folder)
    found: dict[str, ExitModuleFactory] = {}
    for dotted in modules:
        module_name, _, attr = dotted.rpartition(".")
        try:
            obj = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise MissingExitModule(f"cannot load exit module {dotted}: {exc}") from None
        factory = check_factory(obj)
        found[factory.name] = factory
    return found


def check_module(module: object, origin: str = "") -> ExitModule:
    """Verify a built module against :class:`IExitModule`."""
    try:
        verifyObject(IExitModule, module)
    except Invalid as exc:
        where = f" (from {origin})" if origin else ""
        raise BrokenExitPlugin(f"exit module {module!r}{where} does not implement IExitModule: {exc}") from None
    return module  # type: ignore[return-value]


# --- dispatch ---------------------------------------------------------------------------


class Dispatcher:
    """Maps exit types to configured modules and delivers items.

    Items for an exit type no module handles, and corrupt payloads, are
    dropped (NORETRY) with a log line and a counter.  An exception or
    failure in a module also counts as NORETRY (server.md §9.2).
    """

    def __init__(self, context: ExitContext) -> None:
        self.context = context
        self.log = context.logger(self)
        self.modules: list[ExitModule] = []
        self._by_type: dict[int, ExitModule] = {}

    # -- set-up --------------------------------------------------------------------

    def add_module(self, module: object) -> None:
        checked = check_module(module)
        for exit_type in checked.exit_types:
            other = self._by_type.get(exit_type)
            if other is not None:
                raise ExitConfigError(
                    f"exit modules {other.name} and {checked.name} both handle exit type 0x{exit_type:04x}")
        for exit_type in checked.exit_types:
            self._by_type[exit_type] = checked
        self.modules.append(checked)
        self.modules.sort(key=lambda m: m.priority)

    def module_for(self, exit_type: int) -> Optional[ExitModule]:
        return self._by_type.get(exit_type)

    def routing_table(self) -> dict[int, str]:
        """Exit type -> the name of the module that takes it: how the
        mixer sorts exit payloads into the modules' queues."""
        return {exit_type: module.name for exit_type, module in self._by_type.items()}

    def module_named(self, name: str) -> Optional[ExitModule]:
        for module in self.modules:
            if module.name == name:
                return module
        return None

    # -- items ---------------------------------------------------------------------

    def deliver_payload(self, exit_type: int, routing_info: bytes, payload: bytes,
                        application_key: bytes = b"", queued_at: Optional[float] = None) -> defer.Deferred:
        """:meth:`deliver` an item made of these fields (queued now by default)."""
        when = self.context.now() if queued_at is None else queued_at
        return self.deliver(DeliveryItem(exit_type, routing_info, application_key, payload, when))

    def deliver(self, item: DeliveryItem) -> defer.Deferred:
        """Hand ``item`` to its module, split by the module's tag rule;
        fires with a :class:`DeliveryResult`."""
        module = self._by_type.get(item.exit_type)
        if module is None:
            self.context.count(Event.EXIT_UNKNOWN_TYPE)
            self.log.error("Dropping a payload for exit type 0x{exit_type:04x}: no module handles it",
                           exit_type=item.exit_type)
            return defer.succeed(DeliveryResult.NORETRY)
        item = item.for_module(module.uses_tag)
        try:
            item.tag  # noqa: B018 - the split of §9.1, checked once here
        except UndeliverableItem as exc:
            self.context.count(Event.EXIT_UNDELIVERABLE)
            self.log.error("Dropping an exit payload: {reason}", reason=str(exc))
            return defer.succeed(DeliveryResult.NORETRY)
        if item.is_corrupt:
            self.context.count(Event.EXIT_CORRUPT)
            self.log.warn("Dropping a corrupt payload for {module}: {reason}", module=module.name,
                          reason=item.classification.reason)  # type: ignore[union-attr]
            return defer.succeed(DeliveryResult.NORETRY)
        d = defer.maybeDeferred(module.deliver, item)
        d.addCallback(self._checked, module)
        d.addErrback(self._crashed, module)
        d.addCallback(self._counted, module)
        return d

    def _checked(self, result: object, module: ExitModule) -> DeliveryResult:
        if not isinstance(result, DeliveryResult):
            raise TypeError(f"{module.name}.deliver gave {result!r}, not a DeliveryResult")
        return result

    def _crashed(self, failure: Failure, module: ExitModule) -> DeliveryResult:
        self.context.count(Event.EXIT_MODULE_ERROR.of(module.name))
        self.log.error("Exit module {module} failed on an item: {error}", module=module.name,
                       error=failure.getErrorMessage())
        self.log.debug("Exit module failure:\n{traceback}", traceback=failure.getTraceback())
        return DeliveryResult.NORETRY

    def _counted(self, result: DeliveryResult, module: ExitModule) -> DeliveryResult:
        self.context.count(_RESULT_EVENTS[result].of(module.name))
        if result is DeliveryResult.NORETRY:
            self.log.error("{module} could not deliver a message; it is dropped", module=module.name)
        return result

    # -- rounds, descriptor, shutdown ---------------------------------------------------

    def flush(self) -> defer.Deferred:
        """Each module's periodic work, in ascending priority (FRAGMENT
        first); call once per delivery round before delivering items."""
        return defer.ensureDeferred(self._flush())

    async def _flush(self) -> None:
        for module in list(self.modules):
            try:
                await defer.maybeDeferred(module.flush)
            except Exception as exc:
                self.log.error("Flushing {module} failed: {error}", module=module.name, error=str(exc))

    def advertise(self) -> list[Advertisement]:
        return [ad for ad in (m.advertise() for m in self.modules) if ad is not None]

    def descriptor_fields(self) -> dict[str, Any]:
        """Keyword arguments for ``DescriptorFields`` (``mbox``, ``smtp``,
        ``max_fragments``, ``nym``) from the advertised sections."""
        keys = {"Delivery/MBOX": "mbox", "Delivery/SMTP": "smtp",
                "Delivery/Fragmented": "max_fragments", "Delivery/Nym": "nym"}
        return {keys[ad.section]: ad.descriptor_value for ad in self.advertise() if ad.section in keys}

    def stop(self) -> defer.Deferred:
        return defer.DeferredList([defer.maybeDeferred(m.stop) for m in self.modules], consumeErrors=True)


# --- building from the configuration ------------------------------------------------------


def build_dispatcher(
    config: Mapping[str, Mapping[str, Any]],
    context: ExitContext,
    factories: Optional[Mapping[str, ExitModuleFactory]] = None,
    required: Iterable[str] = (),
) -> Dispatcher:
    """Configure every enabled exit module and return the dispatcher.

    ``config`` maps section names to sections (other sections are
    ignored).  A module is enabled when its section is present with
    ``Enabled: yes``; modules without a section (DROP) always are.
    ``required`` names modules that must be installed (the node's
    ``Module`` option).  Raises :class:`MissingExitModule` for a module or
    a ``[Delivery/...]`` section no plugin provides, and
    :class:`ExitConfigError` for anything else wrong.
    """
    if factories is None:
        factories = find_exit_modules()
    installed = ", ".join(sorted(factories)) or "none"
    for name in required:
        if name not in factories:
            raise MissingExitModule(
                f"exit module {name!r} is configured but no installed plugin provides it "
                f"(installed: {installed})")
    by_section = {f.section: f for f in factories.values() if f.section}
    for section_name in config:
        if section_name.startswith(DELIVERY_PREFIX) and section_name not in by_section:
            raise MissingExitModule(
                f"section [{section_name}] is configured but no installed exit module handles it "
                f"(installed: {installed})")
    dispatcher = Dispatcher(context)
    try:
        _configure_modules(dispatcher, config, context, factories, required)
        _check_combination(dispatcher, config)
    except BaseException:
        dispatcher.stop()  # what was configured before the failure holds resources
        raise
    return dispatcher


def _configure_modules(dispatcher: Dispatcher, config: Mapping[str, Mapping[str, Any]],
                       context: ExitContext, factories: Mapping[str, ExitModuleFactory],
                       required: Iterable[str]) -> None:
    for name in sorted(factories):
        factory = factories[name]
        if factory.section is None:
            section: Mapping[str, Any] = {}
        elif factory.section in config:
            section = config[factory.section]
            if "Enabled" not in section:
                raise ExitConfigError(f"[{factory.section}] Enabled is required")
            try:
                enabled = section["Enabled"]
                if not (BOOLEAN.parse(enabled) if isinstance(enabled, str) else enabled):
                    continue
            except ValueError as exc:
                raise ExitConfigError(f"[{factory.section}] Enabled: {exc}") from None
        elif name in required:
            raise ExitConfigError(f"exit module {name!r} is required but [{factory.section}] is missing")
        else:
            continue
        module = check_module(factory.create(), _where(factory))
        module.configure(section, context.for_module(name))
        dispatcher.add_module(module)


def _check_combination(dispatcher: Dispatcher, config: Mapping[str, Mapping[str, Any]]) -> None:
    """server.md §9.7 "Validation"."""
    fragment = dispatcher.module_named("FRAGMENT")
    if fragment is None:
        return
    mail = [m for m in dispatcher.modules if getattr(m, "section_name", None) in _MAIL_SECTIONS]
    if not mail:
        raise ExitConfigError("[Delivery/Fragmented] needs [Delivery/SMTP] or [Delivery/MBOX] enabled: "
                              "reassembled messages have nowhere to go")
    frag_size = getattr(fragment, "max_size", 0)
    for module in mail:
        options = getattr(module, "options", None)
        size = getattr(options, "max_size", 0)
        if frag_size > size:
            dispatcher.log.warn("[Delivery/Fragmented] MaximumSize is larger than {module}'s",
                                module=module.name)
        elif size > 10 * frag_size:
            dispatcher.log.warn("{module}'s MaximumSize is over 10 times [Delivery/Fragmented]'s",
                                module=module.name)
