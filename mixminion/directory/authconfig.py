"""``authority.conf``: the directory authority's configuration.

Same file syntax and value types as ``mixminiond.conf`` (server.md §14.1,
§14.2; reused from :mod:`mixminion.config`), one section, ``[Authority]``,
whose options are declared once, in :data:`AUTHORITY_SCHEMA`: type,
default, meaning, and how a change reaches the running authority
(``consumer``: read at start, a restart applies a change; ``reload``: the
function of :mod:`mixminion.directory.reload` a SIGHUP calls).
``etc/authority.conf`` shows every option with a comment and
``mixminion-directory(8)`` describes them; a test checks both against the
schema.

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
from typing import Any, Optional, Union

from mixminion.directory.authority import ADMISSION_MODES, MAX_DESCRIPTOR_SIZE
from mixminion.directory.rejects import load_reject_list
from mixminion.directory.service import AuthoritySettings, Peer
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
)
from mixminion.directory.httpserver import (
    MAX_CONNECTIONS,
    MAX_CONNECTIONS_PER_ADDRESS,
    REQUEST_TIMEOUT,
)

SECTION = "Authority"

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


def _versions(text: Optional[str]) -> tuple[str, ...]:
    return tuple(v.strip() for v in (text or "").split(",") if v.strip())


def _read(section: RawSection) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for entry in section.entries:
        option = AUTHORITY_SCHEMA.option(entry.key)
        if option is None:
            known = ", ".join(o.key for o in AUTHORITY_SCHEMA.options)
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
    for option in AUTHORITY_SCHEMA.options:
        if option.key in values:
            continue
        if option.required:
            raise section.error(None, f"required option {option.key} is missing")
        values[option.key] = [] if option.many else AUTHORITY_SCHEMA.default(option.key)
    return values


def parse_authority_config(text: Union[str, bytes], filename: str = "<string>",
                           config_dir: Optional[str] = None) -> AuthoritySettings:
    """Parse and check an ``authority.conf``; errors name file, line and option."""
    sections = parse_sections(text, filename)
    by_name = {s.name: s for s in sections}
    for s in sections:
        if s.name != SECTION:
            raise ConfigError(filename, s.line, s.name, None, f"unknown section; only [{SECTION}] is allowed")
    if SECTION not in by_name:
        raise ConfigError(filename, 1, SECTION, None, "required section is missing")
    section = by_name[SECTION]
    v = _read(section)
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
    )


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
