"""``mixminiond.conf``: the node's schema and validation (server.md §14).

The file syntax and the value types are :mod:`mixminion.config`'s, shared
with the authority, the client and the exit modules.  :data:`SCHEMA` is
every section and option the node understands, with its type, default,
meaning and how it reaches its effect -- the one place an option is
described; :func:`parse_config` applies it and the cross-field rules and
returns a :class:`ServerConfig`.

Deviations from the reference, on purpose: unknown sections and options
are errors (the reference warned; a typo must not leave an option at its
default unnoticed); a ``[Delivery/<Name>]`` section must belong to an
installed exit module; options the reference parsed and ignored are
implemented or refused at start with what to use instead; sizes accept
G/GB and refuse trailing garbage; the MMTP limits of mmtp.md §14.2 are
added.

No Twisted here: the node turns these values into listeners and queues.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import socket
import shutil
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

from mixminion.config import intervals as sched
from mixminion.config.schema import Option, SectionSpec, snake_case
from mixminion.config.syntax import ConfigError, RawEntry, RawSection, _where, parse_sections
from mixminion.config.values import (
    ANY_IP,
    AUTHORITY,
    BOOLEAN,
    CLASS_NAME,
    COMMAND,
    EMAIL,
    FILENAME,
    FRACTION,
    HOST,
    INT,
    INTERVAL,
    INTERVAL_LIST,
    IP,
    IPV6,
    NICKNAME,
    PATH_LIST,
    PORT,
    SEVERITY,
    SIZE,
    STRING,
    USER,
    Authority,
    ValueType,
    _not_a,
    _parse_email,
    format_size,
    limited,
    parse_size,
)
from mixminion.codec import textformat
from mixminion.directory.descriptor import (
    DEFAULT_MMTP_PORT,
    MAX_COMMENTS,
    MAX_CONTACT,
    MAX_CONTACT_FINGERPRINT,
)
from mixminion.directory.descriptor import PublishedRule
from mixminion.exits import options as exit_options
from mixminion.mmtp.limits import ConnectionLimits, NetworkRule, NetworkRules
from mixminion.server.schedule import schedule_warnings

__all__ = ["ConfigError", "RawEntry", "RawSection", "parse_sections", "Option", "SectionSpec",
           "snake_case", "ValueType", "BOOLEAN", "INT", "PORT", "INTERVAL", "INTERVAL_LIST",
           "SIZE", "FRACTION", "SEVERITY", "FILENAME", "COMMAND", "USER", "EMAIL", "NICKNAME",
           "HOST", "IP", "IPV6", "ANY_IP", "STRING", "CLASS_NAME", "PATH_LIST", "AUTHORITY",
           "Authority", "parse_size", "format_size", "ServerConfig", "parse_config",
           "load_config", "SCHEMA", "SCHEMA_SECTIONS"]

Key = tuple[str, str]  # (section, option)


# --- errors ------------------------------------------------------------------------


# --- value types (§14.2) --------------------------------------------------------------


# Mix algorithms (§5): accepted names, case-insensitive -> canonical name.
MIX_ALGORITHMS: Mapping[str, str] = {
    "timed": "Timed",
    "cottrell": "Cottrell", "mixmaster": "Cottrell", "dynamicpool": "Cottrell",
    "binomial": "Binomial", "binomialcottrell": "Binomial", "binomialdynamicpool": "Binomial",
}


def _parse_mix_algorithm(text: str) -> str:
    try:
        return MIX_ALGORITHMS[text.lower()]
    except KeyError:
        raise _not_a(text, "a mix algorithm", "expected Timed, Cottrell or Binomial") from None


def _parse_mode(text: str) -> str:
    if text.lower() not in ("relay", "local"):
        raise _not_a(text, "a server mode", "expected relay")
    return text.lower()


@dataclass(frozen=True)
class AddressRule:
    """One ``Allow``/``Deny`` line: an IPv4 network (None = ``*``) and a
    port range.  Kept with its text because descriptors publish it as
    written."""

    allow: bool
    network: Optional[ipaddress.IPv4Network]
    low_port: int
    high_port: int
    text: str
    line: int = field(default=0, compare=False)

    def matches(self, ip: str, port: Optional[int] = None) -> bool:
        """True if ``ip`` (and ``port``, when given) fall under this rule."""
        if port is not None and not self.low_port <= port <= self.high_port:
            return False
        if self.network is None:
            return True
        try:
            return ipaddress.ip_address(ip) in self.network
        except (ValueError, TypeError):
            return False

    def link_rule(self) -> NetworkRule:
        """The rule for the MMTP listener (addresses only; see
        :meth:`IncomingSection.connection_rules`)."""
        return NetworkRule(self.allow, self.network)

    def published(self) -> PublishedRule:
        return PublishedRule("Allow" if self.allow else "Deny", self.text)


def _address_rule(allow: bool) -> Callable[[str], AddressRule]:
    """``IP[/MASK] [PORT[-PORT]]`` or ``* [PORT[-PORT]]``; default ports:
    Allow 48099 only, Deny all."""
    def parse(text: str) -> AddressRule:
        hint = "expected IP[/MASK] [PORT[-PORT]] or * [PORT[-PORT]]"
        try:
            textformat.decode_address_rule(text)
        except ValueError:
            raise _not_a(text, "an address rule", hint) from None
        address, _, rest = text.partition(" ")
        ip, _, mask = address.partition("/")
        network = None
        if ip != "*":
            try:
                network = ipaddress.IPv4Network(f"{ip}/{mask or '255.255.255.255'}", strict=False)
            except ValueError:
                raise ValueError(f'"{text}": the mask must be contiguous, e.g. 255.255.255.0') from None
        ports = rest.strip()
        if ports:
            low, _, high = ports.partition("-")
            low_port, high_port = int(low), int(high or low)
        else:
            low_port, high_port = (DEFAULT_MMTP_PORT, DEFAULT_MMTP_PORT) if allow else (0, 65535)
        return AddressRule(allow, network, low_port, high_port, " ".join(text.split()))
    return parse


ALLOW_RULE = ValueType("address rule", _address_rule(True), lambda r: r.text)
DENY_RULE = ValueType("address rule", _address_rule(False), lambda r: r.text)
MIX_ALGORITHM = ValueType("mix algorithm", _parse_mix_algorithm)
MODE = ValueType("mode", _parse_mode)


# --- the schema ------------------------------------------------------------------------


# Who consumes what (``module:qualname``; see Option).  The appliers of a
# SIGHUP live in mixminion.server.reload.
_NODE = "mixminion.server.node:MixNode"
_BUILD = "mixminion.server.tap:build_node"
_DESCRIPTOR = "mixminion.server.tap:descriptor_template"
_PARANOIA = "mixminion.server.paranoia:problems_for"
_EXITS = "mixminion.server.reload:apply_exits"
_BUILD_EXITS = "mixminion.exits.registry:build_dispatcher"
_MIXING = "mixminion.server.reload:apply_mixing"
_INCOMING = "mixminion.server.reload:apply_incoming"
_OUTGOING = "mixminion.server.reload:apply_outgoing"
_TWISTD = "twistd owns the process: "


def _path(key: str, default: Optional[str], doc: str, derived: str = "", **effect: str) -> Option:
    return Option(key, FILENAME, doc, default=default, paths="base", derived=derived, **effect)


_PINGER = "mixminion.server.pinging.service:pinger_for"
_CHAINS = ("every ping is a chain X, S, Y sent at random times; use Interval (the mean gap "
           "between pings) instead")


def _old_pinging(key: str, doc: str, instead: str) -> Option:
    """An option of the reference's pinger, which worked otherwise: refused
    at start with the option to use instead (no default, so any value is)."""
    return Option(key, INTERVAL, f"not supported: {doc}", refused=instead)


NODE_SECTIONS: tuple[SectionSpec, ...] = (
    SectionSpec("Host", "this machine (§14.3)", (
        Option("ShredCommand", COMMAND, "not supported: the node overwrites packet data in "
               "place itself",
               refused="the node overwrites queued packets in place and runs no external "
               "delete program; remove ShredCommand"),
        Option("EntropySource", FILENAME, "randomness device; only the kernel's pool "
               "(/dev/urandom, read through getrandom) is supported", default="/dev/urandom",
               refused="the node draws randomness from the kernel (getrandom, the pool behind "
               "/dev/urandom); remove EntropySource or set it to /dev/urandom"),
        Option("TrustedUser", USER, "owners besides root allowed on the folders above "
               "BaseDir and KeyDir", many=True, attr="trusted_users", consumer=_PARANOIA),
        Option("FileParanoia", BOOLEAN, "at start, refuse private keys that are not 0600 "
               "and owned by the node's user, key folders that are not 0700, and stores "
               "writable by others (MM_NO_FILE_PARANOIA in the environment also turns it "
               "off)", default="yes", consumer=_PARANOIA),
    )),
    SectionSpec("Server", "the node itself (§14.4)", required=True, options=(
        _path("BaseDir", None, "root of every server file",
              derived="Homedir, else /var/spool/minion (with a warning)", consumer=_NODE),
        _path("Homedir", None, "obsolete name of BaseDir",
              consumer="mixminion.server.config:_Builder.derive_base_dir"),
        _path("LogFile", None, "not supported: twistd writes the log",
              refused=_TWISTD + "give it --logfile=PATH (or run it with -n to log to the "
              "terminal); remove LogFile"),
        _path("StatsFile", "stats", "traffic statistics: a summary of the node's counters "
              "is appended every StatsInterval", consumer=_NODE),
        _path("KeyDir", "keys", "identity key and keysets", consumer=_BUILD),
        _path("WorkDir", "work", "TLS, hash logs, counters", consumer=_NODE),
        _path("QueueDir", None, "packet queues", derived="${WorkDir}/queues", consumer=_NODE),
        _path("PidFile", "pid", "the node's process id, locked while it runs so that a "
              "second node cannot use the same BaseDir", consumer=_NODE),
        Option("LogLevel", SEVERITY, "least severe message logged; TRACE and DEBUG are "
               "insecure", default="WARN", reload="mixminion.server.reload:apply_log_level"),
        Option("EchoMessages", BOOLEAN, "not supported: twistd decides where the log goes",
               refused=_TWISTD + "run it with -n to log to the terminal; remove EchoMessages"),
        Option("Daemon", BOOLEAN, "not supported: twistd decides whether to detach",
               refused=_TWISTD + "it detaches unless run with -n (--nodaemon); remove Daemon"),
        Option("LogStats", BOOLEAN, "append a traffic summary to StatsFile every "
               "StatsInterval", default="yes", reload="mixminion.server.reload:apply_stats"),
        Option("StatsInterval", INTERVAL, "period of the StatsFile summary; under 2 hours is "
               "insecure", default="1 day", reload="mixminion.server.reload:apply_stats"),
        Option("EncryptIdentityKey", BOOLEAN, "not supported: keys are stored unencrypted "
               "(mode 0600)", default="no",
               refused="encrypted keys are not implemented; keys are stored unencrypted with "
               "mode 0600; set EncryptIdentityKey to no"),
        Option("IdentityKeyBits", INT, "identity key size, 2048-4096", default="2048",
               consumer=_BUILD),
        Option("PublicKeyLifetime", INTERVAL, "lifetime of each packet key, at least 1 day",
               default="30 days", consumer=_BUILD),
        Option("PublicKeyOverlap", INTERVAL, "how long an expired packet key is still "
               "accepted, 6-72 hours", default="24 hours", consumer=_BUILD),
        Option("EncryptPrivateKey", BOOLEAN, "not supported: keys are stored unencrypted "
               "(mode 0600)", default="no",
               refused="encrypted keys are not implemented; keys are stored unencrypted with "
               "mode 0600; set EncryptPrivateKey to no"),
        Option("Mode", MODE, "only relay is implemented", required=True,
               consumer="mixminion.server.config:_check_server"),
        Option("Nickname", NICKNAME, "published server name", required=True, published=True,
               consumer=_DESCRIPTOR),
        Option("Contact-Email", EMAIL, "administrator address, published as Contact",
               required=True, published=True, consumer=_DESCRIPTOR),
        Option("Contact-Fingerprint", limited(MAX_CONTACT_FINGERPRINT),
               "administrator's PGP fingerprint, published", published=True,
               consumer=_DESCRIPTOR),
        Option("Comments", limited(MAX_COMMENTS), "published free text", published=True,
               consumer=_DESCRIPTOR),
        Option("ModulePath", PATH_LIST, "colon-separated folders added to Python's path "
               "before the Module lines are imported", default="",
               consumer="mixminion.server.delivery:build_exits"),
        Option("Module", CLASS_NAME, "an exit-module factory to load besides the installed "
               "plugins, package.module.Name (an IExitModuleFactory provider)",
               many=True, attr="modules", consumer="mixminion.server.delivery:build_exits"),
        Option("MixAlgorithm", MIX_ALGORITHM, "Timed, Cottrell or Binomial (§5); Timed is "
               "insecure", default="Timed", reload=_MIXING),
        Option("MixInterval", INTERVAL, "time between mixes", default="30 minutes",
               reload=_MIXING),
        Option("MixPoolRate", FRACTION, "share of the pool sent per mix (Cottrell, Binomial)",
               default="60%", reload=_MIXING),
        Option("MixPoolMinSize", INT, "packets kept back in the pool (Cottrell, Binomial)",
               default="5", reload=_MIXING),
        Option("Timeout", INTERVAL, "MMTP idle timeout, both directions; an incoming "
               "connection must deliver a packet in that time (JUNK frames do not count)",
               default="5 minutes", reload=_INCOMING),
        Option("MaxBandwidth", SIZE, "bytes per second of MMTP traffic, in and out together, "
               "counted below TLS (unset: no limit)",
               reload="mixminion.server.reload:apply_bandwidth"),
        Option("MaxBandwidthSpike", SIZE, "token-bucket capacity",
               derived="5 x MaxBandwidth", reload="mixminion.server.reload:apply_bandwidth"),
        Option("MaxQueuedPackets", INT, "ours: packets held before MMTP answers REJECTED",
               default="50000", reload="mixminion.server.reload:apply_queue_limits"),
        Option("MinFreeDisk", SIZE, "ours: free space kept on the node's disks; below it MMTP "
               "answers REJECTED, and below half of it processing and the exits that write "
               "local files (FRAGMENT, MBOX's MboxFile) wait, keeping what they hold, until "
               "space is back (0: no floor)", default="100 MB",
               reload="mixminion.server.reload:apply_queue_limits"),
        Option("ProcessingWorkers", INT, "ours: processing children (decryption), each taking "
               "its share of the received packets; one per core the node may use",
               default="1", consumer=_NODE),
        Option("MetricsPort", PORT, "ours: serve Prometheus metrics on this port (unset: off)",
               consumer=_NODE),
        Option("MetricsAddress", ANY_IP, "ours: address of the metrics listener; keep it on "
               "loopback", default="127.0.0.1", consumer=_NODE),
    )),
    SectionSpec("Incoming/MMTP", "accepting packets from other nodes (§14.5)", required=True,
                options=(
        Option("Enabled", BOOLEAN, "accept MMTP connections (must be yes)", required=True,
               published=True, consumer="mixminion.server.config:_check_incoming"),
        Option("IP", IP, "published IPv4 address (0.0.0.0: guess); default listen address",
               default="0.0.0.0", published=True, consumer=_DESCRIPTOR),
        Option("Hostname", HOST, "published name other nodes connect to",
               derived="this host's fully-qualified name (with a warning)", published=True,
               consumer=_DESCRIPTOR),
        Option("Port", PORT, "published port", default=str(DEFAULT_MMTP_PORT), published=True,
               consumer=_DESCRIPTOR),
        Option("ListenIP", IP, "IPv4 address to bind", derived="IP", consumer=_NODE),
        Option("ListenPort", PORT, "port to bind", derived="Port", consumer=_NODE),
        Option("ListenIP6", IPV6, "ours, now implemented: also listen on this IPv6 address "
               "(unset: IPv4 only)", consumer=_NODE),
        Option("Allow", ALLOW_RULE, "addresses that may connect; enforced and published",
               many=True, published=True, reload=_INCOMING),
        Option("Deny", DENY_RULE, "addresses refused; enforced and published",
               many=True, published=True, reload=_INCOMING),
        Option("MaxConnections", INT, "ours: simultaneous inbound connections",
               default="128", reload=_INCOMING),
        Option("MaxConnectionsPerAddress", INT, "ours: simultaneous inbound connections from "
               "one address", default="8", reload=_INCOMING),
        Option("MaxConnectionsPerNetwork", INT, "ours: simultaneous inbound connections from "
               "one network (NetworkPrefix, NetworkPrefix6; a loopback address counts alone); "
               "when all MaxConnections are taken, a newcomer within its caps closes the "
               "connection that has made the least progress instead of being refused",
               default="16", reload=_INCOMING),
        Option("NetworkPrefix", INT, "ours: prefix length (bits) of an IPv4 network for "
               "MaxConnectionsPerNetwork", default="24", reload=_INCOMING),
        Option("NetworkPrefix6", INT, "ours: prefix length (bits) of an IPv6 network for "
               "MaxConnectionsPerNetwork", default="48", reload=_INCOMING),
        Option("HandshakeTimeout", INTERVAL, "ours: time allowed for the TLS handshake",
               default="60 seconds", reload=_INCOMING),
        Option("LineTimeout", INTERVAL, "ours: time allowed for the protocol line",
               default="30 seconds", reload=_INCOMING),
        Option("FirstFrameTimeout", INTERVAL, "ours: time allowed from the protocol line to "
               "the first complete frame", default="30 seconds", reload=_INCOMING),
        Option("FrameTimeout", INTERVAL, "ours: time allowed to finish a started frame",
               default="60 seconds", reload=_INCOMING),
        Option("Legacy", BOOLEAN, "ours: also accept TLS 1.0 peers of the 0.0.8 era "
               "(doc/mmtp-legacy.md)", default="no", consumer=_NODE),
    )),
    SectionSpec("Outgoing/MMTP", "relaying packets to other nodes (§14.6)", (
        Option("Enabled", BOOLEAN, "relay to other nodes; without it, packets for other "
               "nodes are dropped and counted as RelayDenied", required=True, published=True,
               consumer="mixminion.server.config:OutgoingSection.allows"),
        Option("Retry", INTERVAL_LIST, "per-address retry schedule (§6.4)",
               default=sched.DEFAULT_OUTGOING_RETRY, reload=_OUTGOING),
        Option("MaxConnections", INT, "simultaneous outgoing connections; a quarter of them "
               "is kept for next hops that have acknowledged packets before, so new or "
               "silent ones (anyone can name thousands) never hold them all",
               default="16", reload=_OUTGOING),
        Option("MaxPacketsPerConnection", INT, "ours: packets sent on one connection before "
               "a fresh one is opened", default="1000", reload=_OUTGOING),
        Option("KeepOpen", INTERVAL, "ours: how long a connection to a next hop stays open "
               "once all its packets are acknowledged, so that packets for it soon after "
               "need no new TLS handshake; closed sooner when another next hop waits for "
               "its slot (0 seconds: close at once, as the reference does; at most 1 minute, "
               "well under a next hop's own idle timeout)",
               default="5 seconds", reload=_OUTGOING),
        Option("Allow", ALLOW_RULE, "destinations we relay to; enforced (a packet for a "
               "refused next hop is dropped and counted as RelayDenied) and published",
               many=True, published=True, reload=_OUTGOING),
        Option("Deny", DENY_RULE, "destinations we refuse; enforced and published",
               many=True, published=True, reload=_OUTGOING),
        Option("Legacy", BOOLEAN, "ours: also speak TLS 1.0 to 0.0.8-era peers",
               default="no", consumer=_NODE),
    )),
    SectionSpec("DirectoryServers", "publication and directories (§14.7)", (
        Option("Publish", BOOLEAN, "upload our descriptors to the authorities",
               default="no", consumer="mixminion.server.publish:publisher_for"),
        Option("Authority", AUTHORITY, "ours: a directory authority, URL FINGERPRINT",
               many=True, attr="authorities", consumer="mixminion.server.publish:publisher_for"),
        Option("ServerURL", STRING, "not supported (see Authority)", many=True,
               refused="directories are fetched from the Authority lines; write "
               "Authority: URL FINGERPRINT instead of ServerURL"),
        Option("PublishURL", STRING, "not supported (see Authority)", many=True,
               refused="descriptors are uploaded to the Authority lines; write "
               "Authority: URL FINGERPRINT instead of PublishURL"),
        Option("MaxSkew", INTERVAL, "not supported",
               refused="the node does not compare clocks with the authorities; "
               "remove MaxSkew"),
    )),
    SectionSpec("Pinging", "measuring other nodes (doc/reliability.md §1-§2)", (
        Option("Enabled", BOOLEAN, "ours: send pings through the other servers of the "
               "directory, infer their reliability and upload signed reports to the "
               "authorities; needs [DirectoryServers] Authority lines and [Outgoing/MMTP] "
               "Enabled", default="no", consumer=_PINGER),
        Option("Interval", INTERVAL, "ours: mean gap between two pings (random, "
               "exponential gaps)", default="2 minutes", consumer=_PINGER),
        Option("Timeout", INTERVAL, "ours: a ping not back by then is counted lost",
               default="1 hour", consumer=_PINGER),
        Option("Window", INTERVAL, "ours: how far back the inference looks; older pings "
               "are forgotten; longer than Timeout", default="1 day", consumer=_PINGER),
        Option("ReportInterval", INTERVAL, "ours: how often a signed report is uploaded "
               "to every authority (and the directory downloaded again)",
               default="1 hour", consumer=_PINGER),
        _old_pinging("RecomputeInterval", "how often results were recomputed",
                     "results are worked out for each report; use ReportInterval instead"),
        _old_pinging("ServerPingPeriod", "one-hop ping interval", _CHAINS),
        _old_pinging("DullChainPingPeriod", "two-hop interval, ordinary chains", _CHAINS),
        _old_pinging("ChainPingPeriod", "two-hop interval, interesting chains", _CHAINS),
        _old_pinging("ServerProbePeriod", "connection probe interval",
                     "there are no bare connection probes, pings measure the servers; use "
                     "Interval instead"),
        _old_pinging("RetainData", "how long raw data was kept",
                     "pings are kept as long as the inference looks back; use Window instead"),
        _old_pinging("RetainResults", "how long results were kept",
                     "results are not kept, they go to the authorities in signed reports; "
                     "use ReportInterval (and Window) instead"),
    )),
)


def exit_section(spec: SectionSpec) -> SectionSpec:
    """An exit module's ``[Delivery/<Name>]`` schema as a section of the
    node's: ``Enabled`` is read when the modules are built (a restart
    applies it); every other option is applied by rebuilding the modules on
    SIGHUP; refused options stay refused."""
    def effect(option: Option) -> Option:
        if option.refused or option.pending:
            return option
        if option.key == "Enabled":
            return dataclasses.replace(option, consumer=_BUILD_EXITS, reload="")
        if option.consumer:  # read once, at start (the nymserver's listening port)
            return option
        return dataclasses.replace(option, reload=_EXITS, consumer="")
    return dataclasses.replace(spec, options=tuple(effect(o) for o in spec.options))


#: the node's own sections, then those of the exit modules that come with it
SCHEMA_SECTIONS: tuple[SectionSpec, ...] = NODE_SECTIONS + tuple(
    exit_section(spec) for spec in (exit_options.SMTP, exit_options.MBOX, exit_options.FRAGMENTED,
                                    exit_options.NYM))
SCHEMA: Mapping[str, SectionSpec] = {s.name: s for s in SCHEMA_SECTIONS}

#: Delivery sections with a class of their own; other ``Delivery/*`` are plugins.
MAIL_MODULES = ("SMTP", "MBOX")
PLUGIN_PREFIX = "Delivery/"
MIN_MAXIMUM_SIZE = 32 * 1024
#: more processing children than this is a typo, not a machine
MAX_PROCESSING_WORKERS = 64
#: the longest [Outgoing/MMTP] KeepOpen (see _check_outgoing)
MAX_KEEP_OPEN = 60
DEFAULT_BASE_DIR = "/var/spool/minion"

SUMMARY_KEYS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Server", ("LogLevel", "LogStats", "StatsInterval", "PublicKeyOverlap", "Mode",
                "MixAlgorithm", "MixInterval", "MixPoolRate", "MixPoolMinSize", "Timeout",
                "MaxBandwidth")),
    ("Outgoing/MMTP", ("Retry", "MaxConnections")),
    ("Delivery/SMTP", ("Enabled", "Retry", "SMTPServer", "ReturnAddress", "FromTag",
                       "SubjectLine", "MaximumSize")),
    ("Delivery/Fragmented", ("Enabled", "MaximumSize", "MaximumInterval")),
)


# --- typed section objects ----------------------------------------------------------------


@dataclass(frozen=True)
class HostSection:
    shred_command: Optional[tuple[str, ...]]
    entropy_source: str
    trusted_users: tuple[int, ...]
    file_paranoia: bool


@dataclass(frozen=True)
class ServerSection:
    """``[Server]``; paths are absolute, intervals in seconds, sizes in bytes."""

    base_dir: str
    homedir: Optional[str]
    log_file: str
    stats_file: str
    key_dir: str
    work_dir: str
    queue_dir: str
    pid_file: str
    log_level: str
    echo_messages: bool
    daemon: bool
    log_stats: bool
    stats_interval: int
    encrypt_identity_key: bool
    identity_key_bits: int
    public_key_lifetime: int
    public_key_overlap: int
    encrypt_private_key: bool
    mode: str
    nickname: str
    contact_email: str
    contact_fingerprint: Optional[str]
    comments: Optional[str]
    module_path: tuple[str, ...]
    modules: tuple[str, ...]
    mix_algorithm: str
    mix_interval: int
    mix_pool_rate: float
    mix_pool_min_size: int
    timeout: int
    max_bandwidth: Optional[int]
    max_bandwidth_spike: Optional[int]
    max_queued_packets: int
    min_free_disk: int
    processing_workers: int
    metrics_port: Optional[int]
    metrics_address: str

    # The layout of §2, so that no other module spells these paths.
    @property
    def version_file(self) -> str:
        return os.path.join(self.base_dir, "version")

    @property
    def current_desc_file(self) -> str:
        return os.path.join(self.base_dir, "current-desc")

    @property
    def tls_dir(self) -> str:
        return os.path.join(self.work_dir, "tls")

    @property
    def hashlog_dir(self) -> str:
        return os.path.join(self.work_dir, "hashlogs")

    @property
    def directory_cache_dir(self) -> str:
        return os.path.join(self.work_dir, "dir")

    @property
    def pinger_dir(self) -> str:
        return os.path.join(self.work_dir, "pinger")

    @property
    def stats_work_file(self) -> str:
        return os.path.join(self.work_dir, "stats.tmp")

    def queue(self, name: str) -> str:
        """``incoming``, ``mix``, ``outgoing`` or ``deliver/<MODULE>``."""
        return os.path.join(self.queue_dir, name)


def _ordered_rules(allow: Sequence[AddressRule],
                   deny: Sequence[AddressRule]) -> tuple[AddressRule, ...]:
    """Allow and Deny lines interleaved as written: the first match wins."""
    return tuple(sorted((*allow, *deny), key=lambda r: r.line))


@dataclass(frozen=True)
class IncomingSection:
    enabled: bool
    ip: str
    hostname: Optional[str]
    port: int
    listen_ip: str
    listen_port: int
    listen_ip6: Optional[str]
    allow: tuple[AddressRule, ...]
    deny: tuple[AddressRule, ...]
    max_connections: int
    max_connections_per_address: int
    max_connections_per_network: int
    network_prefix: int
    network_prefix6: int
    handshake_timeout: int
    line_timeout: int
    first_frame_timeout: int
    frame_timeout: int
    legacy: bool

    @property
    def address_rules(self) -> tuple[AddressRule, ...]:
        return _ordered_rules(self.allow, self.deny)

    def connection_rules(self) -> NetworkRules:
        """Rules for the listener.  Ports are ignored: a peer's source port
        is ephemeral, so only its address can be judged."""
        return NetworkRules(r.link_rule() for r in _ordered_rules(self.allow, self.deny))

    def published_rules(self) -> tuple[PublishedRule, ...]:
        return tuple(r.published() for r in self.address_rules)

    def published_hostname(self) -> str:
        """``Hostname``, else this host's FQDN (a DNS lookup: call once)."""
        return self.hostname or socket.getfqdn()


@dataclass(frozen=True)
class OutgoingSection:
    enabled: bool
    retry: sched.Schedule
    max_connections: int
    max_packets_per_connection: int
    keep_open: int
    allow: tuple[AddressRule, ...]
    deny: tuple[AddressRule, ...]
    legacy: bool

    @property
    def address_rules(self) -> tuple[AddressRule, ...]:
        return _ordered_rules(self.allow, self.deny)

    def allows(self, ip: str, port: int) -> bool:
        """May we relay to ``ip:port``?  First matching rule wins; none
        matching allows."""
        if not self.enabled:
            return False
        for rule in _ordered_rules(self.allow, self.deny):
            if rule.matches(ip, port):
                return rule.allow
        return True

    def published_rules(self) -> tuple[PublishedRule, ...]:
        return tuple(r.published() for r in self.address_rules)


@dataclass(frozen=True)
class DirectorySection:
    publish: bool
    authorities: tuple[Authority, ...]
    server_url: tuple[str, ...]
    publish_url: tuple[str, ...]
    max_skew: int


@dataclass(frozen=True)
class PingingSection:
    """``[Pinging]``; intervals in seconds.  The reference's options are
    refused, so they are always None."""

    enabled: bool
    interval: int
    timeout: int
    window: int
    report_interval: int
    recompute_interval: Optional[int]
    server_ping_period: Optional[int]
    dull_chain_ping_period: Optional[int]
    chain_ping_period: Optional[int]
    server_probe_period: Optional[int]
    retain_data: Optional[int]
    retain_results: Optional[int]


class DeliverySettings:
    """A ``[Delivery/<Name>]`` section read with its exit module's schema:
    each option by its accessor name (``SMTPPort`` -> ``smtp_port``), as
    typed and defaulted by the schema.  The modules declare their options
    (:mod:`mixminion.exits.options`), so there is no class per section."""

    def __init__(self, spec: SectionSpec, values: Mapping[Key, Any]) -> None:
        self._values = {o.name: values.get((spec.name, o.key)) for o in spec.options}
        self.section = spec.name

    def __getattr__(self, attr: str) -> Any:
        try:
            return self.__dict__["_values"][attr]
        except KeyError:
            raise AttributeError(attr) from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DeliverySettings) and (self.section, self._values) == (
            other.section, other._values)

    def __repr__(self) -> str:
        return f"<DeliverySettings [{self.section}] {self._values!r}>"


DeliverySection = Union[DeliverySettings, RawSection]

SECTION_CLASSES: Mapping[str, type] = {
    "Host": HostSection,
    "Server": ServerSection,
    "Incoming/MMTP": IncomingSection,
    "Outgoing/MMTP": OutgoingSection,
    "DirectoryServers": DirectorySection,
    "Pinging": PingingSection,
}


# --- the parsed configuration ----------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ServerConfig:
    """A validated ``mixminiond.conf``.

    Typed sections (``config.server.mix_interval``, ``config.incoming.port``,
    ``config.delivery("SMTP")``) for the node, and ``config["Server",
    "MixInterval"]`` for generic code; both give effective values (defaults
    applied, paths absolute, sizes rounded).
    """

    filename: str
    host: HostSection
    server: ServerSection
    incoming: IncomingSection
    outgoing: OutgoingSection
    directory: DirectorySection
    pinging: PingingSection
    deliveries: Mapping[str, DeliverySection]
    warnings: tuple[str, ...]
    values: Mapping[Key, Any] = field(repr=False)
    entries: Mapping[Key, RawEntry] = field(repr=False)
    present: frozenset[str] = field(repr=False)
    #: the schema the file was read with: the node's and installed plugins'
    schema: Mapping[str, SectionSpec] = field(repr=False, default_factory=lambda: SCHEMA)

    def __getitem__(self, key: Key) -> Any:
        return self.values[key]

    def get(self, section: str, key: str, default: Any = None) -> Any:
        value = self.values.get((section, key))
        return default if value is None else value

    def is_set(self, section: str, key: str) -> bool:
        """True if the file gives the option (rather than its default)."""
        return (section, key) in self.entries

    def has_section(self, name: str) -> bool:
        return name in self.present

    def delivery(self, name: str) -> Optional[DeliverySection]:
        """``[Delivery/<name>]`` (e.g. ``"SMTP"``), typed for our modules,
        raw for plugins; None if absent.  Check ``.enabled``."""
        return self.deliveries.get(name)

    def enabled_deliveries(self) -> tuple[str, ...]:
        """Names of the delivery sections to run, in file order."""
        return tuple(name for name, section in self.deliveries.items() if section.enabled)

    @property
    def plugin_sections(self) -> Mapping[str, RawSection]:
        """``[Delivery/<Name>]`` sections of plugins that read their own
        text (they declare no schema), by ``<Name>``."""
        return {n: s for n, s in self.deliveries.items()
                if isinstance(s, RawSection) and PLUGIN_PREFIX + n not in self.schema}

    def connection_limits(self) -> ConnectionLimits:
        """Inbound MMTP limits (mmtp.md §14.2); idle timeout = ``Timeout``."""
        incoming = self.incoming
        return ConnectionLimits(
            max_connections=incoming.max_connections,
            max_per_source=incoming.max_connections_per_address,
            max_per_network=incoming.max_connections_per_network,
            ipv4_prefix=incoming.network_prefix,
            ipv6_prefix=incoming.network_prefix6,
            handshake_timeout=float(incoming.handshake_timeout),
            line_timeout=float(incoming.line_timeout),
            first_frame_timeout=float(incoming.first_frame_timeout),
            frame_timeout=float(incoming.frame_timeout),
            idle_timeout=float(self.server.timeout),
        )

    def insecurities(self) -> tuple[str, ...]:
        """Reasons published as ``Why-Insecure`` (§14.10); empty means
        ``Secure-Configuration: yes``."""
        return _insecurities(self.server)

    def configuration_summary(self) -> str:
        """``[Testing] Configuration`` (§14.11); a change regenerates the
        descriptor."""
        items = []
        for section, keys in SUMMARY_KEYS:
            if section not in self.present:
                continue
            spec = SCHEMA[section]
            for key in keys:
                value = self.values.get((section, key))
                if value is not None:
                    text = spec.option(key).type.format(value)  # type: ignore[union-attr]
                    items.append(f"{section}/{key}={_quote(text)}")
        return "; ".join(items)


def _quote(text: str) -> str:
    """Single-quoted with backslash escapes, so a value cannot end the item."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _insecurities(server: ServerSection) -> tuple[str, ...]:
    reasons = []
    if server.log_level in ("TRACE", "DEBUG"):
        reasons.append("Log is too verbose")
    if server.log_stats and server.stats_interval < 2 * sched.HOUR:
        reasons.append("StatsInterval is too short")
    if server.mix_algorithm == "Timed":
        reasons.append("Mix algorithm is not secure")
    elif server.mix_pool_min_size < 5:
        reasons.append("MixPoolMinSize is too small")
    if server.mix_interval < 30 * sched.MINUTE:
        reasons.append("Mix interval under 30 minutes")
    return tuple(reasons)


# --- building: values, defaults, paths -----------------------------------------------------


class _Builder:
    """Applies the schema to parsed sections; collects warnings; raises the
    first error."""

    def __init__(self, sections: tuple[RawSection, ...], filename: str,
                 config_dir: str, last_line: int,
                 plugin_sections: Mapping[str, Optional[SectionSpec]]) -> None:
        self.filename = filename
        #: ``[Delivery/<Name>]`` sections claimed by installed exit plugins,
        #: with their schemas (None: the plugin reads the text itself)
        self.plugin_sections = plugin_sections
        #: the schema this file is read with: the node's and the plugins'
        self.schema: dict[str, SectionSpec] = dict(SCHEMA)
        for name, spec in plugin_sections.items():
            if spec is not None and name not in self.schema:
                self.schema[name] = exit_section(spec)
        self.config_dir = config_dir
        self.last_line = last_line
        self.sections = {s.name: s for s in sections}
        self.order = [s.name for s in sections]
        self.values: dict[Key, Any] = {}
        self.entries: dict[Key, RawEntry] = {}
        self.warnings: list[str] = []

    # reporting

    def line_of(self, section: str, key: Optional[str] = None) -> int:
        if key is not None and (section, key) in self.entries:
            return self.entries[section, key].line
        raw = self.sections.get(section)
        return raw.line if raw is not None else self.last_line

    def error(self, section: str, key: Optional[str], reason: str) -> ConfigError:
        return ConfigError(self.filename, self.line_of(section, key), section, key, reason)

    def warn(self, section: Optional[str], key: Optional[str], reason: str,
             line: Optional[int] = None) -> None:
        if line is None:
            line = self.line_of(section, key) if section else self.last_line
        self.warnings.append(f"{_where(self.filename, line, section, key)} {reason}")

    def get(self, section: str, key: str) -> Any:
        return self.values.get((section, key))

    def given(self, section: str, key: str) -> bool:
        return (section, key) in self.entries

    # reading the file

    def read(self) -> None:
        for name in SCHEMA:
            if SCHEMA[name].required and name not in self.sections:
                raise ConfigError(self.filename, self.last_line, name, None,
                                  "required section is missing")
        errors: list[ConfigError] = []
        for name in self.order:
            raw = self.sections[name]
            spec = self.schema.get(name)
            if spec is not None:
                errors.extend(self.read_section(spec, raw))
            else:
                try:
                    self.unknown_section(raw)
                except ConfigError as exc:
                    errors.append(exc)
        if errors:
            # Every entry was read, so the operator sees all such mistakes at once.
            first = errors[0]
            first.problems = tuple(str(e) for e in errors)
            raise first
        for spec in SCHEMA_SECTIONS:
            if spec.name not in self.sections and not spec.name.startswith(PLUGIN_PREFIX):
                self.apply_defaults(spec)

    def unknown_section(self, raw: RawSection) -> None:
        """A ``[Delivery/<Name>]`` section belongs to the installed exit
        module that claims it (kept raw for it); any other is an error."""
        if raw.name.startswith(PLUGIN_PREFIX) and raw.name in self.plugin_sections:
            return
        if raw.name.startswith(PLUGIN_PREFIX) and len(raw.name) > len(PLUGIN_PREFIX):
            known = sorted({*self.plugin_sections, *(n for n in self.schema if n.startswith(PLUGIN_PREFIX))})
            hint = _suggest(raw.name, known, "[{}]")
            raise ConfigError(self.filename, raw.line, raw.name, None,
                              f"no installed exit module handles this section{hint} "
                              f"(installed: {', '.join(known) or 'none'})")
        hint = _suggest(raw.name, SCHEMA, "[{}]")
        raise ConfigError(self.filename, raw.line, raw.name, None, f"unknown section{hint}")

    def read_section(self, spec: SectionSpec, raw: RawSection) -> list[ConfigError]:
        """Read every entry; returns the problems of those that could not be."""
        many: dict[str, list[Any]] = {}
        errors: list[ConfigError] = []
        for entry in raw.entries:
            option = spec.option(entry.key)
            if option is None:
                hint = _suggest(entry.key, [o.key for o in spec.options])
                errors.append(ConfigError(self.filename, entry.line, spec.name, entry.key,
                                          f"unknown option{hint}"))
                continue
            try:
                value = self.parse_value(spec.name, option, entry)
                self.check_supported(spec.name, option, entry, value)
            except ConfigError as exc:
                errors.append(exc)
                continue
            if option.many:
                self.entries.setdefault((spec.name, entry.key), entry)
                many.setdefault(entry.key, []).append(value)
            elif (spec.name, entry.key) in self.entries:
                first = self.entries[spec.name, entry.key].line
                errors.append(ConfigError(self.filename, entry.line, spec.name, entry.key,
                                          f"given twice (first on line {first}); it takes one value"))
            else:
                self.entries[spec.name, entry.key] = entry
                self.values[spec.name, entry.key] = value
        for key, items in many.items():
            self.values[spec.name, key] = tuple(items)
        for option in spec.options:
            if option.required and not self.given(spec.name, option.key):
                errors.append(self.error(spec.name, option.key, "required option is missing"))
        self.apply_defaults(spec)
        return errors

    def check_supported(self, section: str, option: Option, entry: RawEntry, value: Any) -> None:
        """A refused option stops start-up and a pending one warns, unless
        the value is the default (which is what the node does anyway)."""
        if not (option.refused or option.pending):
            return
        if option.default is not None and not option.many \
                and value == option.type.parse(option.default):
            return
        if option.refused:
            raise ConfigError(self.filename, entry.line, section, entry.key,
                              f"not supported: {option.refused}")
        self.warn(section, entry.key, f"{option.pending}; the value is not used", entry.line)

    def parse_value(self, section: str, option: Option, entry: RawEntry) -> Any:
        try:
            value = option.type.parse(entry.value)
        except ValueError as exc:
            raise ConfigError(self.filename, entry.line, section, entry.key, str(exc)) from None
        if isinstance(value, AddressRule):
            value = dataclasses.replace(value, line=entry.line)
        return value

    def apply_defaults(self, spec: SectionSpec) -> None:
        for option in spec.options:
            key = (spec.name, option.key)
            if key in self.values:
                continue
            if option.many:
                self.values[key] = ()
            elif option.default is not None:
                self.values[key] = option.type.parse(option.default)
            else:
                self.values[key] = None

    # derived defaults and paths

    def derive(self) -> None:
        self.derive_base_dir()
        self.resolve_paths()
        self.derive_defaults()

    def derive_base_dir(self) -> None:
        base, home = self.get("Server", "BaseDir"), self.get("Server", "Homedir")
        if home is not None:
            self.warn("Server", "Homedir", "obsolete name; write BaseDir instead")
            if base is not None and self.absolute(base) != self.absolute(home):
                raise self.error("Server", "Homedir", "BaseDir and Homedir disagree; give only BaseDir")
            self.values["Server", "Homedir"] = self.absolute(home)
        if base is None and home is None:
            self.warn("Server", "BaseDir", f"not set; using {DEFAULT_BASE_DIR}")
        self.values["Server", "BaseDir"] = self.absolute(base or home or DEFAULT_BASE_DIR)

    def absolute(self, path: str, base: Optional[str] = None) -> str:
        return os.path.normpath(os.path.join(base or self.config_dir, path))

    def resolve_paths(self) -> None:
        """Files the server writes live under BaseDir; files the operator
        supplies are found next to the configuration file."""
        base_dir = self.values["Server", "BaseDir"]
        for (section, key), value in list(self.values.items()):
            option = self.schema[section].option(key)
            if value is None or option is None or option.type is not FILENAME \
                    or key in ("BaseDir", "Homedir"):
                continue
            base = base_dir if option.paths == "base" else self.config_dir
            self.values[section, key] = self.absolute(value, base)
        if self.get("Server", "QueueDir") is None:
            self.values["Server", "QueueDir"] = os.path.join(self.get("Server", "WorkDir"), "queues")

    def derive_defaults(self) -> None:
        if "Outgoing/MMTP" not in self.sections:
            self.values["Outgoing/MMTP", "Enabled"] = False  # no section: not relaying
        for key, source in (("ListenIP", "IP"), ("ListenPort", "Port")):
            if self.get("Incoming/MMTP", key) is None:
                self.values["Incoming/MMTP", key] = self.get("Incoming/MMTP", source)
        bandwidth = self.get("Server", "MaxBandwidth")
        if self.get("Server", "MaxBandwidthSpike") is None and bandwidth is not None:
            self.values["Server", "MaxBandwidthSpike"] = 5 * bandwidth
        for module in ("SMTP", "MBOX"):
            section = PLUGIN_PREFIX + module
            if section in self.sections and self.get(section, "SendmailCommand") is None \
                    and self.get(section, "SMTPServer") is None \
                    and self.get(section, "MboxFile") is None:
                self.values[section, "SMTPServer"] = "localhost"


def _suggest(word: str, choices: Iterable[str], template: str = "{}") -> str:
    """A "did you mean" for a misspelt name (a name differing only in
    case first)."""
    choices = list(choices)
    close = [c for c in choices if c.lower() == word.lower()] \
        or difflib.get_close_matches(word, choices, n=1)
    return f"; did you mean {template.format(close[0])}?" if close else ""


# --- cross-field validation (§14.4-§14.9) --------------------------------------------------


def _check_range(b: _Builder, section: str, key: str, low: int, high: Optional[int],
                 what: Callable[[int], str] = str) -> None:
    value = b.get(section, key)
    if value is None:
        return
    if value < low or (high is not None and value > high):
        bound = f"between {what(low)} and {what(high)}" if high is not None else f"at least {what(low)}"
        raise b.error(section, key, f"{what(value)} is out of range: must be {bound}")


def _check_server(b: _Builder) -> None:
    s = "Server"
    _check_range(b, s, "IdentityKeyBits", 2048, 4096)
    _check_range(b, s, "PublicKeyLifetime", sched.DAY, None, sched.format_interval)
    _check_range(b, s, "PublicKeyOverlap", 6 * sched.HOUR, 72 * sched.HOUR, sched.format_interval)
    _check_range(b, s, "MixPoolMinSize", 0, None)
    for key in ("MixInterval", "Timeout", "StatsInterval"):
        _check_range(b, s, key, 1, None, sched.format_interval)
    _check_range(b, s, "MaxQueuedPackets", 1, None)
    _check_range(b, s, "ProcessingWorkers", 1, MAX_PROCESSING_WORKERS)
    if len(b.get(s, "Contact-Email")) > MAX_CONTACT:
        raise b.error(s, "Contact-Email", f"longer than the {MAX_CONTACT} characters a descriptor allows")
    if b.get(s, "Mode") == "local":
        raise b.error(s, "Mode", "local mode is not implemented; use relay")
    _check_mixing(b)
    _check_bandwidth(b)
    address = ipaddress.ip_address(b.get(s, "MetricsAddress"))
    if b.get(s, "MetricsPort") is not None and not address.is_loopback:
        b.warn(s, "MetricsAddress", f"{address} is not a loopback address; "
               "metrics describe traffic and should not be public")


def _check_mixing(b: _Builder) -> None:
    s = "Server"
    interval, algorithm = b.get(s, "MixInterval"), b.get(s, "MixAlgorithm")
    if interval < 30 * sched.MINUTE:
        b.warn(s, "MixInterval", f"{sched.format_interval(interval)} is under 30 minutes: "
               "the descriptor will say the configuration is insecure")
    if algorithm == "Timed":
        for key in ("MixPoolRate", "MixPoolMinSize"):
            if b.given(s, key):
                b.warn(s, key, "only used by the Cottrell and Binomial algorithms; "
                       "MixAlgorithm is Timed")
    elif b.get(s, "MixPoolRate") < 0.05:
        b.warn(s, "MixPoolRate", "under 5%: packets may wait in the pool for a very long time")


def _check_bandwidth(b: _Builder) -> None:
    s = "Server"
    rate, spike = b.get(s, "MaxBandwidth"), b.get(s, "MaxBandwidthSpike")
    if rate is None:
        if b.given(s, "MaxBandwidthSpike"):
            b.warn(s, "MaxBandwidthSpike", "ignored without MaxBandwidth")
        return
    if rate < 1:
        raise b.error(s, "MaxBandwidth", "must be more than 0 bytes per second")
    if spike < rate:
        raise b.error(s, "MaxBandwidthSpike", f"{format_size(spike)} is less than MaxBandwidth "
                      f"({format_size(rate)})")


def _check_incoming(b: _Builder) -> None:
    s = "Incoming/MMTP"
    if not b.get(s, "Enabled"):
        raise b.error(s, "Enabled", "no is not supported: a node must accept packets")
    if b.get(s, "Hostname") is None:
        b.warn(s, "Hostname", "not set; the descriptor will publish this host's FQDN")
    _check_range(b, s, "MaxConnections", 1, None)
    _check_range(b, s, "MaxConnectionsPerAddress", 1, None)
    _check_range(b, s, "MaxConnectionsPerNetwork", 1, None)
    _check_range(b, s, "NetworkPrefix", 0, 32)
    _check_range(b, s, "NetworkPrefix6", 0, 128)
    if b.get(s, "MaxConnectionsPerAddress") > b.get(s, "MaxConnections"):
        b.warn(s, "MaxConnectionsPerAddress", "larger than MaxConnections, so it never applies")
    if b.get(s, "Legacy"):
        b.warn(s, "Legacy", "accepts TLS 1.0 peers; their links are weaker (doc/mmtp-legacy.md)")


def _check_outgoing(b: _Builder) -> None:
    s = "Outgoing/MMTP"
    if not b.get(s, "Enabled"):
        b.warn(s, None if s not in b.sections else "Enabled",
               "outgoing MMTP is not enabled: this node cannot relay packets to other nodes")
    _check_range(b, s, "MaxConnections", 1, None)
    _check_range(b, s, "MaxPacketsPerConnection", 1, None)
    # A next hop closes a connection idle for its own Timeout (5 minutes by
    # default, in the reference too).  Kept well under any peer's timeout,
    # a kept connection is rarely closed under us; when it is, just as
    # packets go out on it, they go out again on a new one (doc/mmtp.md).
    _check_range(b, s, "KeepOpen", 0, MAX_KEEP_OPEN, sched.format_interval)
    if b.get(s, "Legacy"):
        b.warn(s, "Legacy", "speaks TLS 1.0 to old peers; their links are weaker")
    if b.get(s, "Enabled"):
        _check_retry(b, s)


def _check_retry(b: _Builder, section: str) -> None:
    for warning in schedule_warnings(b.get(section, "Retry"), b.get("Server", "MixInterval")):
        b.warn(section, "Retry", warning)


def _check_directory(b: _Builder) -> None:
    s = "DirectoryServers"
    if b.get(s, "Publish") and not b.get(s, "Authority"):
        b.warn(s, "Publish", "yes, but no Authority is configured: nothing will be uploaded")


def _check_pinging(b: _Builder) -> None:
    """The pinger gets its servers from the directory and sends through the
    outgoing queue; without either it could never ping, so it does not start."""
    s = "Pinging"
    for key in ("Interval", "Timeout", "Window", "ReportInterval"):
        _check_range(b, s, key, 1, None, sched.format_interval)
    if not b.get(s, "Enabled"):
        return
    if not b.get("DirectoryServers", "Authority"):
        raise b.error(s, "Enabled", "needs [DirectoryServers] Authority lines: the pinger "
                      "downloads the directory from them and reports to them")
    if not b.get("Outgoing/MMTP", "Enabled"):
        raise b.error(s, "Enabled", "needs [Outgoing/MMTP] Enabled: yes: pings leave "
                      "through the outgoing queue")
    if b.get(s, "Window") <= b.get(s, "Timeout"):
        raise b.error(s, "Window", f"{sched.format_interval(b.get(s, 'Window'))} must be "
                      f"longer than Timeout ({sched.format_interval(b.get(s, 'Timeout'))}): "
                      "no loss would ever be counted")
    if not b.get("DirectoryServers", "Publish"):
        b.warn(s, "Enabled", "yes, but [DirectoryServers] Publish is no: the authorities "
               "refuse reports from nodes they do not list")


def _check_program(b: _Builder, section: str, key: str) -> None:
    """The program of a command option exists (absolute, or found in $PATH);
    it is made absolute so a later change of $PATH cannot swap it."""
    argv = b.get(section, key)
    program = argv[0]
    if os.path.isabs(program):
        found = program if os.access(program, os.X_OK) and os.path.isfile(program) else None
    elif "/" in program:
        raise b.error(section, key, f'"{program}": give an absolute path or a program name in $PATH')
    else:
        found = shutil.which(program)
    if found is None:
        raise b.error(section, key, f'"{program}" is not an executable program')
    b.values[section, key] = (found, *argv[1:])


def _check_file(b: _Builder, section: str, key: str) -> None:
    path = b.get(section, key)
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise b.error(section, key, f"{path} does not exist or is not a readable file")


def _check_mail(b: _Builder, module: str) -> None:
    s = PLUGIN_PREFIX + module
    _round_maximum_size(b, s)
    if b.given(s, "SMTPServer") and b.given(s, "SendmailCommand"):
        raise b.error(s, "SendmailCommand", "give SMTPServer or SendmailCommand, not both")
    if not b.get(s, "Enabled"):
        return
    _check_retry(b, s)
    _require(b, s, "ReturnAddress")
    _mailbox_warning(b, s, "ReturnAddress")
    if b.get(s, "SendmailCommand") is not None:
        _check_program(b, s, "SendmailCommand")
    if module == "SMTP" and b.get(s, "BlacklistFile") is not None:
        _check_file(b, s, "BlacklistFile")
    if module == "MBOX":
        clashing = [k for k in ("SMTPServer", "SMTPPort", "SendmailCommand") if b.given(s, k)]
        if b.get(s, "MboxFile") is not None and clashing:
            raise b.error(s, "MboxFile", f"give MboxFile or {clashing[0]}, not both")
        _require(b, s, "AddressFile")
        _check_file(b, s, "AddressFile")
        _require(b, s, "RemoveContact")
        _mailbox_warning(b, s, "RemoveContact")


def _require(b: _Builder, section: str, key: str) -> None:
    if b.get(section, key) is None:
        raise b.error(section, key, "required when the module is enabled")


def _mailbox_warning(b: _Builder, section: str, key: str) -> None:
    try:
        _parse_email(b.get(section, key))
    except ValueError as exc:
        b.warn(section, key, f"does not look like a mailbox: {exc}")


def _round_maximum_size(b: _Builder, section: str) -> None:
    """At least 32 KB and a whole number of KB, as the descriptor publishes KB."""
    size = b.get(section, "MaximumSize")
    rounded = max(MIN_MAXIMUM_SIZE, -(-size // 1024) * 1024)
    if rounded != size:
        why = "under the 32 KB minimum" if size < MIN_MAXIMUM_SIZE else "not a whole number of KB"
        b.warn(section, "MaximumSize", f"{format_size(size)} is {why}; using {format_size(rounded)}")
        b.values[section, "MaximumSize"] = rounded


def _check_deliveries(b: _Builder) -> None:
    present = [m for m in MAIL_MODULES if PLUGIN_PREFIX + m in b.sections]
    for module in present:
        _check_mail(b, module)
    enabled = [m for m in present if b.get(PLUGIN_PREFIX + m, "Enabled")]
    if "Delivery/Fragmented" in b.sections and b.get("Delivery/Fragmented", "Enabled"):
        _check_fragmented(b, enabled)


def _check_fragmented(b: _Builder, enabled: Sequence[str]) -> None:
    s = "Delivery/Fragmented"
    if not enabled:
        raise b.error(s, "Enabled", "needs an enabled delivery module for the reassembled "
                      "messages (MBOX or SMTP)")
    size = b.get(s, "MaximumSize")
    for module in enabled:
        other = b.get(PLUGIN_PREFIX + module, "MaximumSize")
        if size > other:
            b.warn(s, "MaximumSize", f"larger than [Delivery/{module}] MaximumSize "
                   f"({format_size(other)}): some reassembled messages cannot be delivered")
        elif other > 10 * size:
            b.warn(s, "MaximumSize", f"[Delivery/{module}] MaximumSize is more than ten times "
                   "larger: big messages must be sent unfragmented")


def _validate(b: _Builder) -> None:
    _check_server(b)
    _check_incoming(b)
    _check_outgoing(b)
    _check_directory(b)
    _check_pinging(b)
    _check_deliveries(b)


# --- assembling --------------------------------------------------------------------------


def _section_object(b: _Builder, name: str) -> Any:
    spec, cls = SCHEMA[name], SECTION_CLASSES[name]
    return cls(**{o.name: b.values.get((name, o.key)) for o in spec.options})


def _deliveries(b: _Builder) -> dict[str, DeliverySection]:
    deliveries: dict[str, DeliverySection] = {}
    for name in b.order:
        if not name.startswith(PLUGIN_PREFIX) or len(name) == len(PLUGIN_PREFIX):
            continue
        short = name[len(PLUGIN_PREFIX):]
        spec = b.schema.get(name)
        deliveries[short] = DeliverySettings(spec, b.values) if spec is not None else b.sections[name]
    return deliveries


def _assemble(b: _Builder) -> ServerConfig:
    return ServerConfig(
        filename=b.filename,
        host=_section_object(b, "Host"),
        server=_section_object(b, "Server"),
        incoming=_section_object(b, "Incoming/MMTP"),
        outgoing=_section_object(b, "Outgoing/MMTP"),
        directory=_section_object(b, "DirectoryServers"),
        pinging=_section_object(b, "Pinging"),
        deliveries=_deliveries(b),
        warnings=tuple(b.warnings),
        values=MappingProxyType(dict(b.values)),
        entries=MappingProxyType(dict(b.entries)),
        present=frozenset(b.sections),
        schema=MappingProxyType(b.schema),
    )


def exit_factories(server: Optional[RawSection]) -> dict[str, Any]:
    """The exit-module factories a configuration can use: the installed
    plugins and what ``[Server] ModulePath``/``Module`` load (read from
    the raw section, since they decide which sections are valid)."""
    from mixminion.exits.errors import ExitConfigError
    from mixminion.exits.registry import extra_factories, find_exit_modules

    factories = find_exit_modules()
    if server is None or not server.get_all("Module"):
        return factories
    try:
        extra = extra_factories(PATH_LIST.parse(server.get("ModulePath") or ""),
                                server.get_all("Module"))
    except ExitConfigError as exc:
        raise server.error("Module", str(exc)) from None
    return {**factories, **extra}


def plugin_schemas(factories: Mapping[str, Any]) -> dict[str, Optional[SectionSpec]]:
    """``[Delivery/<Name>]`` sections that exit-module plugins claim beyond
    the node's, with the schema each plugin declares (None: the plugin
    reads the text itself)."""
    return {f.section: getattr(f, "options", None) for f in factories.values()
            if f.section and f.section not in SCHEMA}


def parse_config(text: Union[str, bytes], filename: str = "<string>",
                 config_dir: Optional[str] = None,
                 plugin_sections: Optional[Mapping[str, Optional[SectionSpec]]] = None) -> ServerConfig:
    """Parse and validate a configuration.

    ``config_dir`` is where relative paths of operator-supplied files
    (``AddressFile``...) and a relative ``BaseDir`` are looked up; by
    default the folder of ``filename``.  ``plugin_sections``: the
    delivery sections installed plugins claim (by default, found now).
    """
    if config_dir is None:
        config_dir = os.path.dirname(os.path.abspath(filename))
    sections = parse_sections(text, filename)
    if plugin_sections is None:
        server = next((s for s in sections if s.name == "Server"), None)
        plugin_sections = plugin_schemas(exit_factories(server))
    source = text.decode("latin-1") if isinstance(text, (bytes, bytearray)) else text
    last_line = max(1, textformat.normalise_newlines(source).rstrip("\n").count("\n") + 1)
    builder = _Builder(sections, filename, config_dir, last_line, plugin_sections)
    builder.read()
    builder.derive()
    _validate(builder)
    return _assemble(builder)


def load_config(path: str) -> ServerConfig:
    """Read and validate ``path``; unreadable files are a ConfigError too."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(path, 0, None, None, f"cannot read the file: {exc.strerror}") from None
    return parse_config(data, path)


# --- reloading (SIGHUP) -------------------------------------------------------------------


@dataclass(frozen=True)
class ReloadPlan:
    """What changed between two configurations.

    ``live``: options a SIGHUP applies; ``restart``: options that only take
    effect after a restart (the node keeps the old value and says so);
    ``descriptor_changed``: the published descriptor must be regenerated.
    """

    live: tuple[Key, ...]
    restart: tuple[Key, ...]
    descriptor_changed: bool
    #: the SIGHUP appliers (``Option.reload``) of the live changes, each once
    appliers: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.live or self.restart)

    @property
    def needs_restart(self) -> bool:
        return bool(self.restart)


def _comparable(config: ServerConfig) -> dict[Key, Any]:
    """Every value to compare: plugin sections' raw values included, and
    address rules with their place among both Allow and Deny lines (the
    first match wins, so reordering them is a change)."""
    values = dict(config.values)
    for short, section in config.plugin_sections.items():
        for key in section.keys():
            values[PLUGIN_PREFIX + short, key] = section.get_all(key)
    for name, rules in (("Incoming/MMTP", config.incoming.address_rules),
                        ("Outgoing/MMTP", config.outgoing.address_rules)):
        for key, allow in (("Allow", True), ("Deny", False)):
            values[name, key] = tuple((i, r) for i, r in enumerate(rules) if r.allow is allow)
    return values


_PLUGIN_APPLIER = "mixminion.server.reload:apply_exits"


def _applier(section: str, key: str, schema: Mapping[str, SectionSpec] = SCHEMA) -> str:
    """What applies a change of this option on SIGHUP ("" if nothing can)."""
    spec = schema.get(section)
    if spec is None:  # a plugin reading its own text: options reload, enabling does not
        return _PLUGIN_APPLIER if key != "Enabled" else ""
    option = spec.option(key)
    return option.reload if option is not None else ""


def _published(section: str, key: str, schema: Mapping[str, SectionSpec]) -> bool:
    spec = schema.get(section)
    option = spec.option(key) if spec is not None else None
    return option is not None and option.published


_SECTION_ATTRS = {"Host": "host", "Server": "server", "Incoming/MMTP": "incoming",
                  "Outgoing/MMTP": "outgoing", "DirectoryServers": "directory",
                  "Pinging": "pinging"}


def running_config(old: ServerConfig, new: ServerConfig, plan: ReloadPlan) -> ServerConfig:
    """What the node runs on after a SIGHUP: ``new``, except that every
    option needing a restart keeps its old value (so neither the appliers
    nor the published descriptor use a value the node does not).  A
    delivery section whose ``Enabled`` changed is kept whole as it was: the
    set of exit modules changes only at a restart."""
    values = dict(new.values)
    entries = dict(new.entries)
    present = set(new.present)
    deliveries = dict(new.deliveries)
    kept = {(s, k) for s, k in plan.restart}
    for section, key in plan.restart:
        if section.startswith(PLUGIN_PREFIX) and key == "Enabled":
            kept |= {k for k in (*old.values, *new.values) if k[0] == section}
            short = section[len(PLUGIN_PREFIX):]
            if short in old.deliveries:
                deliveries[short] = old.deliveries[short]
            else:
                deliveries.pop(short, None)
            present = present - {section} | ({section} & old.present)
    for key in kept:
        for mine, theirs in ((values, old.values), (entries, old.entries)):
            if key in theirs:
                mine[key] = theirs[key]
            else:
                mine.pop(key, None)
    changes: dict[str, Any] = {}
    for name, attr in _SECTION_ATTRS.items():
        spec = SCHEMA[name]
        fields = {spec.option(k).name: values.get((name, k))  # type: ignore[union-attr]
                  for s, k in kept if s == name and spec.option(k) is not None}
        if fields:
            changes[attr] = dataclasses.replace(getattr(new, attr), **fields)
    return dataclasses.replace(new, values=MappingProxyType(values),
                               entries=MappingProxyType(entries), present=frozenset(present),
                               deliveries=deliveries, **changes)


def reloadable_differences(old: ServerConfig, new: ServerConfig) -> ReloadPlan:
    """Sort every changed option into applied-on-SIGHUP and needs-restart."""
    before, after = _comparable(old), _comparable(new)
    changed = [k for k in dict.fromkeys([*before, *after]) if before.get(k) != after.get(k)]
    appliers = {k: _applier(*k, new.schema) for k in changed}
    live = tuple(k for k in changed if appliers[k])
    restart = tuple(k for k in changed if not appliers[k])
    descriptor_changed = (
        any(_published(*k, new.schema) for k in changed)
        or old.configuration_summary() != new.configuration_summary()
        or old.insecurities() != new.insecurities()
    )
    return ReloadPlan(live, restart, descriptor_changed,
                      tuple(dict.fromkeys(appliers[k] for k in live)))
