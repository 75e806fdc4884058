"""``twistd mixminion -c mixminiond.conf``: options and ``makeService``.

Reads the configuration, loads or creates the keys, configures the exit
modules found as plugins, and returns the node's service tree.  A broken
configuration stops start-up with the file, line, option and reason.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
from typing import Any, Mapping, Optional

from twisted.application import service
from twisted.logger import Logger
from twisted.python import usage

from mixminion.directory.descriptor import DescriptorFields, IncomingMMTP, OutgoingMMTP
from mixminion.exits.context import ExitContext
from mixminion.exits.errors import ExitConfigError
from mixminion.server.clock import WALL, ClockWatch, ElapsedClock, install, load_skew, skew_path
from mixminion.server.config import ConfigError, ServerConfig, load_config
from mixminion.server.delivery import build_exits
from mixminion.server.incoming_log import IncomingLogError
from mixminion.server.keys import KeyStore, KeyStoreError
from mixminion.server.keyservice import KeyService
from mixminion.logfilter import apply_log_level
from mixminion.server.node import MixNode, node_stats_path
from mixminion.server.packetstore import PacketStoreError
from mixminion.server.paranoia import problems_for
from mixminion.server.pidfile import NodeAlreadyRunning, PidFile
from mixminion.server.pinging.store import PingStoreError
from mixminion.server.reload import ReloadService
from mixminion.signals import SignalService
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


def elapsed_clock(config: ServerConfig) -> ElapsedClock:
    """The node's clock for schedules, continuing the skew of earlier runs."""
    return ElapsedClock(skew=load_skew(skew_path(config.server.work_dir)))


def build_node(config: ServerConfig, reactor,
               clock: Optional[ElapsedClock] = None) -> service.MultiService:
    """The whole node from a parsed configuration.  Raises
    :class:`StartupError` for what an operator can fix.  ``clock`` is the
    elapsed clock the reactor counts on (:func:`makeService` installs it),
    watched for wall-clock steps."""
    for warning in config.warnings:
        log.warn("Configuration: {problem}", problem=warning)
    problems = problems_for(config)
    if problems:
        more = f" (and {len(problems) - 1} more; mixminiond check lists them)" if len(problems) > 1 else ""
        raise StartupError(f"{problems[0]}{more}")
    server = config.server
    now = WALL.seconds()
    for path in (server.base_dir, server.work_dir):
        os.makedirs(path, mode=0o700, exist_ok=True)
    pid_file = PidFile(server.pid_file)  # first: keys and queues are this node's alone
    stats = NodeStats(node_stats_path(config))
    context = ExitContext(base_dir=server.base_dir, clock=reactor, reactor=reactor, counters=stats,
                          wall=WALL)
    dispatcher = build_exits(config, context)
    keys = KeyStore(server.key_dir, server.hashlog_dir, server.identity_key_bits,
                    server.public_key_lifetime, server.public_key_overlap)
    keys.load(now)
    template = descriptor_template(config, dispatcher)
    keys.regenerate_descriptors(template, now)
    keys.ensure_keys(now, template)
    keys.rotate(now)
    node = MixNode(config, reactor, keys.identity,
                   lambda: [key for key, _path in keys.packet_keys(WALL.seconds())], dispatcher,
                   stats=stats, pid_file=pid_file)
    link_node_to_exits(context, node, keys)
    key_service = KeyService(keys, node.keys_rotated, template, reactor)
    key_service.setServiceParent(node)
    ClockWatch(clock if clock is not None else elapsed_clock(config),
               skew_path(server.work_dir), reactor).setServiceParent(node)

    def regenerate_descriptor(new: ServerConfig, dispatcher) -> None:
        key_service.republish(descriptor_template(new, dispatcher))

    reload_service = ReloadService(node, config, reactor, regenerate_descriptor)
    reload_service.setServiceParent(node)
    SignalService(signal.SIGHUP, reload_service.reload, reactor).setServiceParent(node)
    publisher = None
    if config.directory.publish:  # (the HTTP client and its imports only then)
        from mixminion.server.publish import publisher_for

        publisher = publisher_for(config.directory, keys, reactor, WALL)
    if publisher is not None:
        publisher.setServiceParent(node)
        key_service.listeners.append(lambda: publisher.kick("new keys"))
        reload_service.listeners.append(lambda: publisher.kick("SIGHUP"))
    SignalService(signal.SIGUSR2, lambda: republish(publisher), reactor).setServiceParent(node)
    if config.pinging.enabled:
        from mixminion.server.pinging.service import pinger_for

        pinger = pinger_for(config, node, keys, reactor)
        if pinger is not None:  # a later child: stopped (its worker joined) before the pipeline
            pinger.setServiceParent(node)
    node.keys = keys
    return node


def link_node_to_exits(context: ExitContext, node, keys: KeyStore) -> None:
    """What an exit module that sends packets as this node (NYM) needs:
    this node as a hop (its descriptor valid now), the incoming queue to
    put packets in, and the node to run its service."""
    def own_hop():
        from mixminion.client.paths import hop_for  # (only a module that sends asks)

        descriptor = keys.current_descriptor(WALL.seconds())
        return hop_for(descriptor) if descriptor is not None else None
    context.node_link.connect(own_hop=own_hop,
                              inject=lambda packet: node.sink.receivePacket(packet, "nymserver"),
                              adopt=lambda svc: svc.setServiceParent(node))


def republish(publisher) -> None:
    """SIGUSR2 (``mixminiond republish``): upload every descriptor again."""
    if publisher is None:
        log.warn("SIGUSR2: nothing to republish: this node publishes no descriptor "
                 "([DirectoryServers] names no Authority, or Publish is off)")
    else:
        publisher.republish()


class StartupError(Exception):
    """Something an operator can fix stops the node; ``str()`` is the one
    line to show."""


#: what start-up can meet that the operator caused (a damaged key, a file
#: where a folder should be, a full disk, a missing exit module...)
_OPERATOR_ERRORS = (ConfigError, StartupError, KeyStoreError, ExitConfigError,
                    NodeAlreadyRunning, PacketStoreError, IncomingLogError, PingStoreError,
                    OSError, sqlite3.Error)


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    if isinstance(exc, sqlite3.Error):
        return f"the packet database cannot be used: {exc}"
    return str(exc)


def makeService(options: Mapping[str, Any]) -> service.IService:  # noqa: N802
    from twisted.internet import reactor

    # Everything the node writes is private: queues, keys, the fragment
    # store, statistics, and twistd's own log, which it opens after this.
    os.umask(0o077)
    try:
        config = load_config(os.path.abspath(options["config"]))
        apply_log_level(config.server.log_level)
        clock = elapsed_clock(config)
        install(reactor, clock)
        return build_node(config, reactor, clock)
    except _OPERATOR_ERRORS as exc:
        raise SystemExit(f"mixminion: {_one_line(exc)}") from None
