"""``twistd mixminion -c mixminiond.conf``: options and ``makeService``.

Reads the configuration, loads or creates the keys, configures the exit
modules found as plugins, and returns the node's service tree.  A broken
configuration stops start-up with the file, line, option and reason.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from typing import Any, Mapping

from twisted.application import service
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python import usage

from mixminion.directory.descriptor import DescriptorFields, IncomingMMTP, OutgoingMMTP
from mixminion.exits.context import ExitContext
from mixminion.exits.registry import build_dispatcher
from mixminion.mmtp.initiator import InitiatorSettings
from mixminion.server.config import (
    ConfigError,
    ServerConfig,
    load_config,
    reloadable_differences,
)
from mixminion.server.keys import KeyStore
from mixminion.server.logfilter import apply_log_level
from mixminion.server.node import MixNode, NodeSettings, node_stats_path
from mixminion.server.publish import publisher_for
from mixminion.server.stats import NodeStats

log = Logger()


class Options(usage.Options):
    synopsis = "-c mixminiond.conf"
    longdesc = "Run a Type III (Mixminion) mix node."
    optParameters = [
        ["config", "c", None, "the node's configuration file (mixminiond.conf)"],
    ]

    def postOptions(self) -> None:  # noqa: N802
        if not self["config"]:
            raise usage.UsageError("a configuration file is required: -c mixminiond.conf")


def exit_sections(config: ServerConfig) -> dict[str, dict[str, Any]]:
    """``[Delivery/...]`` sections for the exit modules: built-in ones with
    the values the configuration already parsed (paths made absolute,
    sizes in bytes), plugin ones as raw strings for the plugin to parse."""
    sections: dict[str, dict[str, Any]] = {}
    for (section, key), value in config.values.items():
        if section.startswith("Delivery/") and section in config.present and value is not None:
            sections.setdefault(section, {})[key] = value
    for name, raw in config.plugin_sections.items():
        sections[name] = {entry.key: entry.value for entry in raw.entries}
    return sections


def node_settings(config: ServerConfig) -> NodeSettings:
    server, incoming, outgoing = config.server, config.incoming, config.outgoing
    initiator = InitiatorSettings(max_packets_per_connection=outgoing.max_packets_per_connection)
    return NodeSettings(
        base_dir=server.base_dir,
        nickname=server.nickname,
        listen_ip=incoming.listen_ip,
        listen_port=incoming.listen_port,
        listen_ip6=incoming.listen_ip6,
        mix_algorithm=server.mix_algorithm,
        mix_interval=server.mix_interval,
        pool_min_size=server.mix_pool_min_size,
        pool_rate=server.mix_pool_rate,
        outgoing_retry=tuple(outgoing.retry),
        limits=config.connection_limits(),
        rules=incoming.connection_rules(),
        initiator=initiator,
        max_queued=server.max_queued_packets,
        min_free_disk=server.min_free_disk,
        metrics_port=server.metrics_port,
        metrics_address=server.metrics_address,
        legacy_in=incoming.legacy,
        legacy_out=outgoing.legacy,
    )


def descriptor_template(config: ServerConfig, dispatcher) -> DescriptorFields:
    """What this node publishes, apart from the per-keyset fields."""
    incoming = config.incoming
    hostname = incoming.hostname or socket.getfqdn()
    return DescriptorFields(
        nickname=config.server.nickname,
        contact=config.server.contact_email,
        packet_key=None,  # type: ignore[arg-type] - filled per keyset
        published=0, valid_after=0, valid_until=0,
        incoming=IncomingMMTP(hostname=hostname, port=incoming.port,
                              ip=incoming.ip if incoming.ip != "0.0.0.0" else None,
                              address_rules=incoming.published_rules()),
        outgoing=OutgoingMMTP(address_rules=config.outgoing.published_rules())
        if config.outgoing.enabled else None,
        insecurities=config.insecurities(),
        contact_fingerprint=config.server.contact_fingerprint,
        comments=config.server.comments,
        configuration=config.configuration_summary(),
        **dispatcher.descriptor_fields(),
    )


class KeyService(service.Service):
    """Generates keysets ahead of need and rotates packet keys on time."""

    def __init__(self, keys: KeyStore, node: MixNode, template, reactor) -> None:
        self.keys, self.node, self.template, self.reactor = keys, node, template, reactor
        self._call = None
        self._busy = False
        #: called after each generation/rotation run (the publisher)
        self.listeners: list = []

    def startService(self) -> None:  # noqa: N802
        super().startService()
        self._schedule()

    def stopService(self):  # noqa: N802
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()

    def _schedule(self) -> None:
        now = self.reactor.seconds()
        delay = max(1.0, self.keys.next_event(now) - now)
        self._call = self.reactor.callLater(delay, self._tick)

    def _tick(self) -> None:
        if self._busy:
            return
        self._busy = True
        d = deferToThread(self._work, self.reactor.seconds())
        d.addCallback(self._rotated)
        d.addErrback(lambda f: log.failure("Key rotation failed; will retry", f))
        d.addBoth(self._done)

    def _work(self, now: float):
        self.keys.ensure_keys(now, self.template)
        return self.keys.rotate(now)

    def _rotated(self, result) -> None:
        self.node.refresh_keys()
        for keyset in getattr(result, "removed", ()):
            self.node.store.forget_replay_log(keyset.packet_key.public.keyid)
        log.info("Packet keys rotated")
        for listener in self.listeners:
            listener()

    def _done(self, _):
        self._busy = False
        if self.running:
            self._schedule()


class ReloadService(service.Service):
    """SIGHUP: re-read the configuration file and apply what can change
    while running; say which changes need a restart."""

    def __init__(self, node: MixNode, config: ServerConfig, reactor) -> None:
        self.node, self.config, self.reactor = node, config, reactor
        self._previous = None
        #: called on every SIGHUP, whatever the configuration says (the publisher)
        self.listeners: list = []

    def startService(self) -> None:  # noqa: N802
        super().startService()
        self._previous = signal.signal(
            signal.SIGHUP, lambda signum, frame: self.reactor.callFromThread(self.reload))

    def stopService(self):  # noqa: N802
        super().stopService()
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)

    def reload(self) -> None:
        for listener in self.listeners:
            listener()
        try:
            new = load_config(self.config.filename)
        except (ConfigError, OSError) as exc:
            log.error("SIGHUP: configuration not reloaded: {why}", why=str(exc))
            return
        plan = reloadable_differences(self.config, new)
        if not plan.changed:
            log.info("SIGHUP: configuration unchanged")
            return
        self.node.apply_settings(node_settings(new))
        for section, key in plan.restart:
            log.warn("SIGHUP: [{section}] {key} changed; it takes effect after a restart",
                     section=section, key=key)
        log.info("SIGHUP: applied {n} changed options", n=len(plan.live))
        self.config = new


def build_node(config: ServerConfig, reactor) -> service.MultiService:
    """The whole node from a parsed configuration."""
    for warning in config.warnings:
        log.warn("Configuration: {problem}", problem=warning)
    server = config.server
    now = time.time()
    settings = node_settings(config)
    for path in (settings.base_dir, settings.work_dir):
        os.makedirs(path, mode=0o700, exist_ok=True)
    stats = NodeStats(node_stats_path(settings))
    context = ExitContext(base_dir=server.base_dir, clock=reactor, reactor=reactor, counters=stats)
    dispatcher = build_dispatcher(exit_sections(config), context, required=server.modules)
    keys = KeyStore(server.key_dir, server.hashlog_dir, server.identity_key_bits,
                    server.public_key_lifetime, server.public_key_overlap)
    keys.load(now)
    template = descriptor_template(config, dispatcher)
    keys.regenerate_descriptors(template, now)
    keys.ensure_keys(now, template)
    keys.rotate(now)
    node = MixNode(settings, reactor, keys.identity,
                   lambda: [key for key, _path in keys.packet_keys(reactor.seconds())], dispatcher,
                   stats=stats)
    key_service = KeyService(keys, node, template, reactor)
    key_service.setServiceParent(node)
    reload_service = ReloadService(node, config, reactor)
    reload_service.setServiceParent(node)
    publisher = publisher_for(config.directory, keys, reactor)
    if publisher is not None:
        publisher.setServiceParent(node)
        key_service.listeners.append(lambda: publisher.kick("new keys"))
        reload_service.listeners.append(lambda: publisher.kick("SIGHUP"))
    node.keys = keys
    return node


def makeService(options: Mapping[str, Any]) -> service.IService:  # noqa: N802
    from twisted.internet import reactor

    try:
        config = load_config(os.path.abspath(options["config"]))
    except ConfigError as exc:
        raise SystemExit(f"mixminion: {exc}") from None
    except OSError as exc:
        raise SystemExit(f"mixminion: cannot read {options['config']}: {exc.strerror}") from None
    apply_log_level(config.server.log_level)
    return build_node(config, reactor)
