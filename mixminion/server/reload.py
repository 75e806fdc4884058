"""SIGHUP: re-read ``mixminiond.conf`` and apply what changed.

Each option that a SIGHUP can change names its applier here in the schema
(``Option.reload`` in :mod:`mixminion.server.config`); a test checks that
every name resolves to a function of this module that reads the option.
A reload calls the applier of every changed option once, so the log line
"applied N changed options" is true by construction.  A configuration
with any error is not applied at all: the node keeps running on the old
one and says why at WARN.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from mixminion.exits.errors import ExitConfigError
from mixminion.exits.registry import Dispatcher
from mixminion.server.config import (
    ConfigError,
    ServerConfig,
    load_config,
    reloadable_differences,
    running_config,
)
from mixminion.server.delivery import build_exits
from mixminion.logfilter import set_log_level
from mixminion.server.node import MixNode, initiator_settings, mix_algorithm

log = Logger()

Applier = Callable[[MixNode, ServerConfig], Any]


def apply_log_level(node: MixNode, config: ServerConfig) -> None:
    set_log_level(config.server.log_level)


def apply_mixing(node: MixNode, config: ServerConfig) -> None:
    """A new algorithm or parameters from the next mix on; a new interval
    restarts the timer."""
    server = config.server
    node.mixer.algorithm = mix_algorithm(config)
    if server.mix_interval != node.mixer.interval:
        node.mixer.restart(server.mix_interval)


def apply_incoming(node: MixNode, config: ServerConfig) -> None:
    """Limits and timeouts (``Timeout`` too, for both directions) for new
    connections and for the deadlines open ones arm next; address rules
    for the next connection accepted."""
    limits = config.connection_limits()
    for name in vars(limits):
        setattr(node.limits, name, getattr(limits, name))
    node.responder.rules = config.incoming.connection_rules()
    node.client.settings.idle_timeout = float(config.server.timeout)


def apply_outgoing(node: MixNode, config: ServerConfig) -> None:
    """Retry schedule (also for addresses already failing), connection
    limits and address rules, from the next packet sent."""
    schedule = tuple(config.outgoing.retry)
    node.outgoing.schedule = schedule
    for state in node.outgoing.addresses.values():
        state.schedule = schedule
    node.client.apply_settings(initiator_settings(config))
    node.outgoing.allows = node.client.allows = config.outgoing.allows


def apply_queue_limits(node: MixNode, config: ServerConfig) -> None:
    """The next packet offered is judged by the new limits."""
    node.sink.max_queued = config.server.max_queued_packets
    node.sink.min_free_bytes = config.server.min_free_disk


def apply_bandwidth(node: MixNode, config: ServerConfig) -> None:
    node.limiter.set_limits(config.server.max_bandwidth, config.server.max_bandwidth_spike)


def apply_stats(node: MixNode, config: ServerConfig) -> None:
    node.stats_report.configure(config.server.log_stats, config.server.stats_interval)


def apply_exits(node: MixNode, config: ServerConfig) -> Dispatcher:
    """The exit modules rebuilt from the new ``[Delivery/...]`` sections
    (which also re-reads the files they name: BlacklistFile, AddressFile);
    the reload hands them to delivery once everything else is applied.  A
    bad section raises here, before anything changed.  (The set of enabled
    modules is the running one: :func:`running_config` keeps it.)"""
    return build_exits(config, node.delivery.dispatcher.context)


def applier(name: str) -> Applier:
    """The function a schema entry names (``module:function``)."""
    module, _, function = name.partition(":")
    if module != __name__:
        raise ValueError(f"{name}: SIGHUP appliers live in {__name__}")
    return globals()[function]


class ReloadService(service.Service):
    """SIGHUP (a :class:`~mixminion.signals.SignalService` calls
    :meth:`reload`): re-read the configuration file and apply what can
    change while running; say which changes need a restart.  One reload at
    a time: a SIGHUP during one waits for it."""

    def __init__(self, node: MixNode, config: ServerConfig, reactor,
                 regenerate_descriptor: Callable[[ServerConfig, Any], None]) -> None:
        self.node, self.config, self.reactor = node, config, reactor
        self.regenerate_descriptor = regenerate_descriptor
        self._lock = defer.DeferredLock()
        #: called after every SIGHUP that was applied (the publisher)
        self.listeners: list = []

    def reload(self) -> defer.Deferred:
        """Fires once the changes are applied (or refused) and the exit
        modules swapped, and the node's status says so."""
        d = self._lock.run(lambda: defer.ensureDeferred(self._reload()))
        d.addBoth(self._reloaded)
        return d

    def _reloaded(self, result: Any) -> Any:
        self.node.status_changed()
        return result

    async def _reload(self) -> None:
        try:
            new = load_config(self.config.filename)
            plan = reloadable_differences(self.config, new)
            running = running_config(self.config, new, plan)
            waiting = reloadable_differences(running, new)
            applied = reloadable_differences(self.config, running)
            # The exit modules are built first, on every SIGHUP (they re-read
            # their files): the one step that can still fail, before any
            # other change is applied.
            dispatcher = apply_exits(self.node, running)
        except (ConfigError, ExitConfigError) as exc:
            log.warn("SIGHUP: configuration not reloaded, still running on the old one: "
                     "{why}", why=str(exc))
            return
        except Exception as exc:  # a module that cannot open what it needs, a bad import...
            log.warn("SIGHUP: configuration not reloaded, still running on the old one: "
                     "{why}", why=f"{type(exc).__name__}: {exc}")
            return
        for name in applied.appliers:
            if applier(name) is not apply_exits:
                applier(name)(self.node, running)
        for section, key in waiting.live + waiting.restart:
            log.warn("SIGHUP: [{section}] {key} changed; it takes effect after a restart",
                     section=section, key=key)
        if applied.changed:
            log.info("SIGHUP: applied {n} changed options", n=len(applied.live))
        else:
            log.info("SIGHUP: configuration unchanged; exit modules re-read their files")
        self.config = running
        if applied.descriptor_changed:
            self.regenerate_descriptor(running, dispatcher)
        else:
            for listener in self.listeners:
                listener()
        try:
            await self.node.replace_exits(dispatcher)
        except Exception as exc:
            log.error("SIGHUP: the previous exit modules did not stop cleanly: {why}",
                      why=str(exc))
