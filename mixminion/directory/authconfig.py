"""``authority.conf``: the directory authority's configuration.

Same file syntax and value types as ``mixminiond.conf`` (server.md §14.1,
§14.2; reused from :mod:`mixminion.config`), one section::

    [Authority]
    BaseDir: /var/lib/mixminion-authority     (required)
    Nickname: Quorum1                         (required)
    ListenIP: 0.0.0.0                         (default 127.0.0.1)
    Port: 8080                                (default 8080)
    PublicURL: http://dir1.example.org:8080/  (default http://ListenIP:Port/)
    IdentityKeyBits: 2048                     (2048-4096)
    Peer: http://dir1.example.org:8080/ 0123...   (many; every authority,
    Peer: http://dir2.example.org:8080/ 4567...    this one included or not)
    Threshold: 2                              (default: majority of authorities)
    VoteInterval: 5 minutes
    DirectoryLifetime: 1 day                  (only 1 day: §7.2 fixes it)
    Admission: auto                           (auto | manual)
    VoteFile: votes                           (optional; relative to BaseDir)
    MaxDescriptorSize: 32K
    ClientVersions: 0.1.0, 0.1.1              (optional)
    ServerVersions: 0.1.0                     (optional)
    MaxConnections: 256                       (simultaneous HTTP connections)
    MaxConnectionsPerAddress: 16              (from one client address)
    RequestTimeout: 30 seconds                (for a whole HTTP request)
    LogLevel: INFO                            (TRACE DEBUG INFO WARN ERROR FATAL NEVER)

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

Unlike ``mixminiond.conf``, unknown options are errors: an authority is
run by few people and a typo in ``Peer`` or ``Threshold`` must not pass.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Union

from mixminion.directory.authority import ADMISSION_MODES, MAX_DESCRIPTOR_SIZE
from mixminion.directory.service import AuthoritySettings, Peer
from mixminion.codec.textformat import SECONDS_PER_DAY
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

# key -> (parser, required, many, default text)
_OPTIONS: dict[str, tuple[Callable[[str], Any], bool, bool, Optional[str]]] = {
    "BaseDir": (STRING.parse, True, False, None),
    "Nickname": (NICKNAME.parse, True, False, None),
    "ListenIP": (IP.parse, False, False, "127.0.0.1"),
    "Port": (PORT.parse, False, False, "8080"),
    "PublicURL": (STRING.parse, False, False, None),
    "IdentityKeyBits": (INT.parse, False, False, "2048"),
    "Peer": (AUTHORITY.parse, False, True, None),
    "Threshold": (INT.parse, False, False, None),
    "VoteInterval": (INTERVAL.parse, False, False, "5 minutes"),
    "DirectoryLifetime": (INTERVAL.parse, False, False, "1 day"),
    "Admission": (STRING.parse, False, False, "auto"),
    "VoteFile": (STRING.parse, False, False, None),
    "MaxDescriptorSize": (SIZE.parse, False, False, str(MAX_DESCRIPTOR_SIZE)),
    "ClientVersions": (STRING.parse, False, False, None),
    "ServerVersions": (STRING.parse, False, False, None),
    "MaxConnections": (INT.parse, False, False, str(MAX_CONNECTIONS)),
    "MaxConnectionsPerAddress": (INT.parse, False, False, str(MAX_CONNECTIONS_PER_ADDRESS)),
    "RequestTimeout": (INTERVAL.parse, False, False, f"{REQUEST_TIMEOUT:g} seconds"),
    "LogLevel": (SEVERITY.parse, False, False, "INFO"),
}


def _versions(text: Optional[str]) -> tuple[str, ...]:
    return tuple(v.strip() for v in (text or "").split(",") if v.strip())


def _read(section: RawSection) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for entry in section.entries:
        option = _OPTIONS.get(entry.key)
        if option is None:
            raise section.error(entry.key, f"unknown option (known: {', '.join(_OPTIONS)})")
        parse, _required, many, _default = option
        if entry.key in values and not many:
            raise section.error(entry.key, "given twice; it takes one value")
        try:
            value = parse(entry.value)
        except ValueError as exc:
            raise ConfigError(section.filename, entry.line, section.name, entry.key, str(exc)) from None
        if many:
            values.setdefault(entry.key, []).append(value)
        else:
            values[entry.key] = value
    for key, (parse, required, many, default) in _OPTIONS.items():
        if key in values:
            continue
        if required:
            raise section.error(None, f"required option {key} is missing")
        values[key] = [] if many else (parse(default) if default is not None else None)
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
    )


def load_authority_config(path: str) -> AuthoritySettings:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(path, 0, None, None, f"cannot read the file: {exc.strerror}") from None
    return parse_authority_config(data, path)
