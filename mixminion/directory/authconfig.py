"""``authority.conf``: the directory authority's configuration.

Same file syntax and value types as ``mixminiond.conf`` (server.md §14.1,
§14.2; reused from :mod:`mixminion.config`), two sections, ``[Authority]``
(required) and ``[Reliability]`` (doc/reliability.md §3), whose options
are declared once, in :data:`AUTHORITY_SCHEMA` and
:data:`RELIABILITY_SCHEMA`: type, default, meaning, and how a change
reaches the running authority (``consumer``: read at start, a restart
applies a change; ``reload``: the function of
:mod:`mixminion.directory.reload` a SIGHUP calls).  Every option is one
field of :class:`~mixminion.directory.service.AuthoritySettings`.
``etc/authority.conf`` shows every option with a comment and
``mixminion-directory(8)`` describes them; tests check both against the
schemas.

The HTTP limits: a connection beyond ``MaxConnections`` open in all, or
beyond ``MaxConnectionsPerAddress`` from one address (a NAT or a test
network on 127.0.0.1 counts as one), is closed at once.  A request --
line, headers and body -- must arrive within ``RequestTimeout`` of the
connection opening or of the previous answer (so an idle keep-alive
connection is closed after it too), or the connection is closed.  A body
larger than ``MaxDescriptorSize`` times 4 (form encoding) is refused with
413 while it is read, never written to disk.  Client addresses are logged
only at ``LogLevel: DEBUG``: who downloads the directory is who uses the
network.  The process needs about ``MaxConnections`` + 64 file
descriptors; it raises its soft limit if it can, and warns if it cannot.

``RejectFile`` is read here too (:mod:`mixminion.directory.rejects`), so
that a bad line stops start-up, or a SIGHUP, like a bad option does.

Unlike ``mixminiond.conf``, unknown options are errors: an authority is
run by few people and a typo in ``Peer`` or ``Threshold`` must not pass.
"""

from __future__ import annotations

import os
import re
from typing import Any, Optional, Union

from mixminion.directory.authority import ADMISSION_MODES, MAX_DESCRIPTOR_SIZE
from mixminion.directory.rejects import load_reject_list
from mixminion.directory.service import (
    DEFAULT_MIN_PINGERS,
    DEFAULT_MIN_PINGS,
    AuthoritySettings,
    Peer,
)
from mixminion.codec.textformat import SECONDS_PER_DAY
from mixminion.config.schema import Option, SectionSpec
from mixminion.config.syntax import ConfigError, RawSection, parse_sections
from mixminion.config.values import (
    AUTHORITY,
    INT,
    INTERVAL,
    IP,
    NICKNAME,
    PORT,
    SEVERITY,
    SIZE,
    STRING,
    ValueType,
)
from mixminion.directory.httpserver import (
    MAX_CONNECTIONS,
    MAX_CONNECTIONS_PER_ADDRESS,
    REQUEST_TIMEOUT,
)

SECTION = "Authority"
RELIABILITY = "Reliability"

_TAP = "mixminion.directory.tap:build_authority"
_AUTHORITY = "mixminion.directory.service:Authority"
_SERVICE = "mixminion.directory.service:AuthorityService"
_RELOAD = "mixminion.directory.reload:"

AUTHORITY_SCHEMA = SectionSpec(SECTION, "the directory authority", required=True, options=(
    Option("BaseDir", STRING, "folder of the identity key, the descriptors, the votes and the "
           "consensus; relative to the configuration file", required=True, consumer=_TAP),
    Option("Nickname", NICKNAME, "this authority's name in its log", required=True, consumer=_TAP),
    Option("ListenIP", IP, "IPv4 address the HTTP server listens on", default="127.0.0.1",
           consumer=_SERVICE),
    Option("Port", PORT, "TCP port the HTTP server listens on", default="8080", consumer=_SERVICE),
    Option("PublicURL", STRING, "how the other authorities reach this one, when its own "
           "fingerprint is not among the Peer lines", derived="http://ListenIP:Port/",
           consumer=_AUTHORITY),
    Option("IdentityKeyBits", INT, "size of the identity key made on first start (2048-4096)",
           default="2048", consumer=_TAP),
    Option("Peer", AUTHORITY, "one authority of the network, URL and fingerprint; one line "
           "for each, this one's included or not", many=True, attr="peers", consumer=_AUTHORITY),
    Option("Threshold", INT, "signatures a consensus needs before it is served",
           derived="a majority of the authorities", consumer=_AUTHORITY),
    Option("VoteInterval", INTERVAL, "length of a voting round (at least 3 seconds)",
           default="5 minutes", consumer=_SERVICE),
    Option("DirectoryLifetime", INTERVAL, "validity of a directory; only 1 day "
           "(descriptors.md §7.2)", default="1 day", consumer=_AUTHORITY),
    Option("Admission", STRING, "auto: vote for every valid descriptor; manual: only for "
           "identities marked yes in VoteFile", default="auto", reload=_RELOAD + "apply_admission"),
    Option("VoteFile", STRING, "the operator's vote file (yes, no, abstain, ignore lines); "
           "relative to BaseDir", paths="base", reload=_RELOAD + "apply_vote_file"),
    Option("MaxDescriptorSize", SIZE, "largest descriptor accepted",
           default=str(MAX_DESCRIPTOR_SIZE), consumer=_AUTHORITY),
    Option("ClientVersions", STRING, "client versions this authority recommends, "
           "comma-separated", reload=_RELOAD + "apply_versions"),
    Option("ServerVersions", STRING, "server versions this authority recommends, "
           "comma-separated", reload=_RELOAD + "apply_versions"),
    Option("MaxConnections", INT, "simultaneous HTTP connections", default=str(MAX_CONNECTIONS),
           consumer=_SERVICE),
    Option("MaxConnectionsPerAddress", INT, "simultaneous HTTP connections from one address",
           default=str(MAX_CONNECTIONS_PER_ADDRESS), consumer=_SERVICE),
    Option("RequestTimeout", INTERVAL, "time for a whole HTTP request",
           default=f"{REQUEST_TIMEOUT:g} seconds", consumer=_SERVICE),
    Option("LogLevel", SEVERITY, "least severe message logged; client addresses only at DEBUG",
           default="INFO", reload=_RELOAD + "apply_log_level"),
    Option("RejectFile", STRING, "servers this authority keeps out of its votes and refuses "
           "uploads from, by fingerprint, nickname or address network; relative to the "
           "configuration file", reload=_RELOAD + "apply_rejects"),
))


def _parse_fingerprints(text: str) -> Optional[frozenset[str]]:
    """Comma-separated fingerprints, spaces and case ignored; none = None."""
    found = set()
    for item in text.split(","):
        fingerprint = "".join(item.split()).upper()
        if not fingerprint:
            continue
        if not re.fullmatch(r"[0-9A-F]{40}", fingerprint):
            raise ValueError(f'"{item.strip()}" is not a fingerprint (expected 40 hex digits; '
                             "separate fingerprints with commas)")
        found.add(fingerprint)
    return frozenset(found) or None


FINGERPRINTS = ValueType("fingerprint list", _parse_fingerprints,
                         lambda value: ", ".join(sorted(value or ())))

#: a SIGHUP applies every one: the next vote and the next report read them
_RELIABILITY = _RELOAD + "apply_reliability"

RELIABILITY_SCHEMA = SectionSpec(RELIABILITY, "what this authority votes on the nodes' "
                                 "reliability (doc/reliability.md section 3)", options=(
    Option("MinPings", INT, "pings through a server a pinger's report needs to count for that "
           "server (at least 1); with fewer the pinger abstains on it",
           default=str(DEFAULT_MIN_PINGS), reload=_RELIABILITY),
    Option("MinPingers", INT, "independent pingers (one per /16 network and per operator) a "
           "server needs to be measured in this authority's vote (at least 1)",
           default=str(DEFAULT_MIN_PINGERS), reload=_RELIABILITY),
    Option("Pingers", FINGERPRINTS, "the only nodes whose reports count, by identity "
           "fingerprint, comma-separated", derived="every listed node", reload=_RELIABILITY),
    Option("ReportInterval", INTERVAL, "how often the nodes report ([Pinging] ReportInterval "
           "of mixminiond.conf); a report published more than twice this long ago is refused, "
           "and stops counting", default="1 hour",
           reload=_RELIABILITY),
))

#: every section of ``authority.conf``, in the order the example shows them
AUTHORITY_SECTIONS = (AUTHORITY_SCHEMA, RELIABILITY_SCHEMA)


def _versions(text: Optional[str]) -> tuple[str, ...]:
    return tuple(v.strip() for v in (text or "").split(",") if v.strip())


def _read(section: Optional[RawSection], spec: SectionSpec) -> dict[str, Any]:
    """The section's values by key, defaults filled in; an absent section
    (None) has every default."""
    values: dict[str, Any] = {}
    for entry in section.entries if section is not None else ():
        option = spec.option(entry.key)
        if option is None:
            known = ", ".join(o.key for o in spec.options)
            raise section.error(entry.key, f"unknown option (known: {known})")
        if entry.key in values and not option.many:
            raise section.error(entry.key, "given twice; it takes one value")
        try:
            value = option.type.parse(entry.value)
        except ValueError as exc:
            raise ConfigError(section.filename, entry.line, section.name, entry.key, str(exc)) from None
        if option.many:
            values.setdefault(entry.key, []).append(value)
        else:
            values[entry.key] = value
    for option in spec.options:
        if option.key in values:
            continue
        if option.required:
            raise section.error(None, f"required option {option.key} is missing")
        values[option.key] = [] if option.many else spec.default(option.key)
    return values


def parse_authority_config(text: Union[str, bytes], filename: str = "<string>",
                           config_dir: Optional[str] = None) -> AuthoritySettings:
    """Parse and check an ``authority.conf``; errors name file, line and option."""
    sections = parse_sections(text, filename)
    by_name = {s.name: s for s in sections}
    known = " and ".join(f"[{spec.name}]" for spec in AUTHORITY_SECTIONS)
    for s in sections:
        if s.name not in {spec.name for spec in AUTHORITY_SECTIONS}:
            raise ConfigError(filename, s.line, s.name, None, f"unknown section; only {known} are allowed")
    if SECTION not in by_name:
        raise ConfigError(filename, 1, SECTION, None, "required section is missing")
    section = by_name[SECTION]
    v = _read(section, AUTHORITY_SCHEMA)
    reliability = _reliability(by_name.get(RELIABILITY))
    base = config_dir if config_dir is not None else os.path.dirname(os.path.abspath(filename))
    base_dir = os.path.normpath(os.path.join(base, os.path.expanduser(v["BaseDir"])))
    bits = v["IdentityKeyBits"]
    if not 2048 <= bits <= 4096:
        raise section.error("IdentityKeyBits", f"{bits} is out of range (2048-4096)")
    peers = tuple(Peer(a.url, a.fingerprint) for a in v["Peer"])
    if v["Threshold"] is not None and not 1 <= v["Threshold"] <= len(peers) + 1:
        raise section.error("Threshold", f"{v['Threshold']} must be between 1 and the number of authorities")
    if v["VoteInterval"] < 3:
        raise section.error("VoteInterval", "must be at least 3 seconds")
    lifetime = v["DirectoryLifetime"]
    if lifetime != SECONDS_PER_DAY:
        raise section.error("DirectoryLifetime", "must be 1 day: descriptors.md §7.2 fixes Valid-Until "
                            "at Valid-After + 1 day, and peers refuse votes with another")
    if v["Admission"] not in ADMISSION_MODES:
        raise section.error("Admission", f"must be one of {', '.join(ADMISSION_MODES)}")
    vote_file = v["VoteFile"]
    if vote_file is not None:
        vote_file = os.path.normpath(os.path.join(base_dir, os.path.expanduser(vote_file)))
    if v["MaxConnections"] < 1:
        raise section.error("MaxConnections", "must be at least 1")
    if not 1 <= v["MaxConnectionsPerAddress"] <= v["MaxConnections"]:
        raise section.error("MaxConnectionsPerAddress", "must be between 1 and MaxConnections")
    if v["RequestTimeout"] < 1:
        raise section.error("RequestTimeout", "must be at least 1 second")
    public_url = v["PublicURL"]
    if public_url is not None and not public_url.startswith(("http://", "https://")):
        raise section.error("PublicURL", "must be an http:// or https:// URL")
    reject_file = v["RejectFile"]
    if reject_file is not None:
        reject_file = os.path.normpath(os.path.join(base, os.path.expanduser(reject_file)))
    try:
        rejects = load_reject_list(reject_file)
    except OSError as exc:
        raise section.error("RejectFile", f"cannot read {reject_file}: {exc.strerror}") from None
    return AuthoritySettings(
        base_dir=base_dir,
        nickname=v["Nickname"],
        listen_ip=v["ListenIP"],
        port=v["Port"],
        public_url=public_url,
        identity_key_bits=bits,
        peers=peers,
        threshold=v["Threshold"],
        vote_interval=float(v["VoteInterval"]),
        directory_lifetime=lifetime,
        admission=v["Admission"],
        vote_file=vote_file,
        max_descriptor_size=v["MaxDescriptorSize"],
        client_versions=_versions(v["ClientVersions"]),
        server_versions=_versions(v["ServerVersions"]),
        max_connections=v["MaxConnections"],
        max_connections_per_address=v["MaxConnectionsPerAddress"],
        request_timeout=float(v["RequestTimeout"]),
        log_level=v["LogLevel"],
        reject_file=reject_file,
        rejects=rejects,
        **reliability,
    )


def _reliability(section: Optional[RawSection]) -> dict[str, Any]:
    """The ``[Reliability]`` fields of the settings, checked."""
    v = _read(section, RELIABILITY_SCHEMA)
    if section is not None:  # the defaults are valid
        for key in ("MinPings", "MinPingers"):
            if v[key] < 1:
                raise section.error(key, "must be at least 1")
        if v["ReportInterval"] < 1:
            raise section.error("ReportInterval", "must be at least 1 second")
    return {option.name: v[option.key] for option in RELIABILITY_SCHEMA.options}


def load_authority_config(path: str) -> AuthoritySettings:
    """Read ``path`` (and the reject list it names); the settings remember
    ``path`` so that a SIGHUP can read it again."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(path, 0, None, None, f"cannot read the file: {exc.strerror}") from None
    settings = parse_authority_config(data, path)
    settings.config_file = path
    return settings
