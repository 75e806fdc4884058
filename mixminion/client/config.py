"""``~/.mixminionrc``: the client's configuration file (client.md §6).

The syntax is the server's (server.md §14.1), so the server's section
reader and value types are reused; only the schema is the client's.
Unknown sections and keys are errors here (client.md §6), unlike the
server, because a mistyped client option (a path, a block list) silently
ignored would weaken anonymity without the user noticing.

Beyond the spec, ``[DirectoryServers]`` takes ``Authority: URL FINGERPRINT``
lines (repeatable) and ``Threshold: N``: the reference hard-coded its one
directory URL and key (client.md §10 item 9).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

from mixminion.config.syntax import ConfigError, parse_sections
from mixminion.config.values import (
    AUTHORITY,
    BOOLEAN,
    COMMAND,
    FILENAME,
    FRACTION,
    INT,
    INTERVAL,
    STRING,
    USER,
    Authority,
    ValueType,
)

DEFAULT_PATH = "~5"
DEFAULT_SURB_LIFETIME = 7 * 86400
DEFAULT_TIMEOUT = 120
DEFAULT_DIRECTORY_TIMEOUT = 60
#: random hops skip measured servers less reliable than this (doc/reliability.md §4)
DEFAULT_RELIABILITY_FLOOR = 0.9
#: decode warns when a nymserver holds fewer reply blocks than this (doc/nym.md §3)
DEFAULT_NYM_WARN_BELOW = 5

LIST = ValueType("list", lambda text: tuple(x.strip() for x in text.split(",") if x.strip()))

#: (section, key) -> (type, repeatable, short description); the man page and
#: the default file use these descriptions, so they are the only copy
CLIENT_SCHEMA: Mapping[str, Mapping[str, tuple[ValueType, bool, str]]] = {
    "Host": {
        "ShredCommand": (COMMAND, False, "program used to delete secret files"),
        "EntropySource": (FILENAME, False, "randomness device (default /dev/urandom)"),
        "TrustedUser": (USER, True, "users besides root who may own parent folders"),
        "FileParanoia": (BOOLEAN, False, "check permissions of private files (default yes)"),
    },
    "DirectoryServers": {
        "DirectoryTimeout": (INTERVAL, False, "HTTP timeout of a directory download (default 1 minute)"),
        "ServerURL": (STRING, True, "accepted for compatibility, unused (see Authority)"),
        "MaxSkew": (INTERVAL, False, "accepted for compatibility, unused"),
        "AllowOldDirectoryFormat": (BOOLEAN, False, "accepted for compatibility, unused"),
        "Authority": (AUTHORITY, True, "a directory authority: URL FINGERPRINT (repeatable)"),
        "Threshold": (INT, False, "authorities whose signatures a directory needs (default 1)"),
    },
    "User": {
        "UserDir": (FILENAME, False, "folder for all client state (default ~/.mixminion)"),
    },
    "Security": {
        "SURBAddress": (STRING, False, "default -t address for generate-surb"),
        "SURBLifetime": (INTERVAL, False, "default reply block lifetime (default 7 days)"),
        "ForwardPath": (STRING, False, "default path of forward messages (default ~5)"),
        "ReplyPath": (STRING, False, "default first leg of replies (default ~5)"),
        "SURBPath": (STRING, False, "default path of reply blocks (default ~5)"),
        "BlockServers": (LIST, True, "servers never chosen at random"),
        "BlockEntries": (LIST, True, "servers never chosen at random as first hop"),
        "BlockExits": (LIST, True, "servers never chosen at random as last hop"),
        "ReliabilityFloor": (FRACTION, False, "servers the directory measured as less reliable "
                             "than this (0 to 1, e.g. 0.9 or 90%) are never chosen at random; "
                             "0 disables the floor (default 0.9)"),
        "PathLength": (STRING, False, "obsolete: use ForwardPath: *N"),
        "SURBPathLength": (STRING, False, "obsolete: use SURBPath: *N"),
    },
    "Network": {
        "Timeout": (INTERVAL, False, "MMTP timeout (default 2 minutes)"),
        "ConnectionTimeout": (INTERVAL, False, "deprecated synonym of Timeout"),
        "Legacy": (BOOLEAN, False, "speak the 0.0.8-era link (TLS 1.0, 1024-bit link keys) "
                   "to every first hop, not only to those whose descriptor names the original "
                   "software (default no)"),
    },
    "Nym": {
        "WarnBelow": (INT, False, "decode warns when a nymserver says it holds fewer of a "
                      "nym's reply blocks than this (default 5; 0 never warns)"),
    },
}

DEFAULT_FILE = """\
# Configuration of the mixminion-client command; see mixminion-client(1).
[Host]
#ShredCommand: /usr/bin/shred -u
#EntropySource: /dev/urandom
#FileParanoia: yes

[DirectoryServers]
DirectoryTimeout: 1 minute
# One line per directory authority you trust: its URL and the fingerprint
# of its identity key, obtained from a source you trust.
#Authority: http://authority.example.org/ 0123456789ABCDEF0123456789ABCDEF01234567
#Threshold: 1

[User]
#UserDir: ~/.mixminion

[Security]
#SURBAddress: you@example.org
#SURBLifetime: 7 days
#ForwardPath: ?,?,?:?,FavoriteExit
#ReplyPath: ?,?,?,FavoriteSwap
#SURBPath: ?,?,?,FavoriteExit
#BlockServers: Nick1, Nick2
#BlockEntries: Nick3
#BlockExits: Nick4
#ReliabilityFloor: 0.9

[Network]
Timeout: 2 minutes
#Legacy: no

[Nym]
#WarnBelow: 5
"""


@dataclass
class ClientConfig:
    """The parsed configuration, with every default applied."""

    filename: str = "<defaults>"
    user_dir: str = os.path.expanduser("~/.mixminion")
    authorities: tuple[Authority, ...] = ()
    threshold: int = 1
    directory_timeout: int = DEFAULT_DIRECTORY_TIMEOUT
    surb_address: Optional[str] = None
    surb_lifetime: int = DEFAULT_SURB_LIFETIME
    forward_path: str = DEFAULT_PATH
    reply_path: str = DEFAULT_PATH
    surb_path: str = DEFAULT_PATH
    block_servers: frozenset[str] = frozenset()
    block_entries: frozenset[str] = frozenset()
    block_exits: frozenset[str] = frozenset()
    #: random hops skip measured servers less reliable than this (doc/reliability.md §4)
    reliability_floor: float = DEFAULT_RELIABILITY_FLOOR
    timeout: int = DEFAULT_TIMEOUT
    file_paranoia: bool = True
    #: the weaker 0.0.8-era link for every first hop (``[Network] Legacy``)
    legacy: bool = False
    #: decode warns below this many reply blocks at a nymserver (``[Nym] WarnBelow``)
    nym_warn_below: int = DEFAULT_NYM_WARN_BELOW
    warnings: list[str] = field(default_factory=list)


def _lower_set(values: Sequence[tuple[str, ...]]) -> frozenset[str]:
    return frozenset(name.lower() for group in values for name in group)


def parse_client_config(text: str, filename: str = "<string>") -> ClientConfig:
    """Parse a configuration; ConfigError says where and what is wrong."""
    sections = parse_sections(text, filename)
    names = {s.name for s in sections}
    if "Server" in names and "User" not in names:
        raise ConfigError(filename, 1, "Server", None,
                          "this is a server configuration (mixminiond.conf); give the client "
                          "its own file with -f or $MIXMINIONRC")
    values: dict[tuple[str, str], list[Any]] = {}
    for section in sections:
        schema = CLIENT_SCHEMA.get(section.name)
        if schema is None:
            raise section.error(None, f"unknown section; known sections are "
                                f"{', '.join(CLIENT_SCHEMA)}")
        for entry in section.entries:
            spec = schema.get(entry.key)
            if spec is None:
                raise section.error(entry.key, f"unknown option in [{section.name}]; known "
                                    f"options are {', '.join(schema)}")
            vtype, many, _ = spec
            got = values.setdefault((section.name, entry.key), [])
            if got and not many:
                raise section.error(entry.key, "option given twice")
            try:
                got.append(vtype.parse(entry.value))
            except ValueError as exc:
                raise ConfigError(filename, entry.line, section.name, entry.key, str(exc)) from None

    def one(section: str, key: str, default: Any = None) -> Any:
        return values.get((section, key), [default])[0]

    config = ClientConfig(filename=filename)
    user_dir = one("User", "UserDir")
    if user_dir:
        config.user_dir = os.path.expanduser(user_dir)
    config.authorities = tuple(values.get(("DirectoryServers", "Authority"), ()))
    config.threshold = one("DirectoryServers", "Threshold", 1)
    if config.threshold < 1:
        raise ConfigError(filename, 1, "DirectoryServers", "Threshold", "must be at least 1")
    config.directory_timeout = one("DirectoryServers", "DirectoryTimeout",
                                   DEFAULT_DIRECTORY_TIMEOUT)
    config.surb_address = one("Security", "SURBAddress")
    config.surb_lifetime = one("Security", "SURBLifetime", DEFAULT_SURB_LIFETIME)
    config.forward_path = one("Security", "ForwardPath", DEFAULT_PATH)
    config.reply_path = one("Security", "ReplyPath", DEFAULT_PATH)
    config.surb_path = one("Security", "SURBPath", DEFAULT_PATH)
    config.block_servers = _lower_set(values.get(("Security", "BlockServers"), []))
    config.block_entries = _lower_set(values.get(("Security", "BlockEntries"), []))
    config.block_exits = _lower_set(values.get(("Security", "BlockExits"), []))
    config.reliability_floor = one("Security", "ReliabilityFloor", DEFAULT_RELIABILITY_FLOOR)
    for old, new in (("PathLength", "ForwardPath: *N"), ("SURBPathLength", "SURBPath: *N")):
        if ("Security", old) in values:
            config.warnings.append(f"{filename}: [Security] {old} is obsolete and ignored; "
                                   f"write {new} instead.")
    timeout = one("Network", "Timeout")
    if timeout is None and ("Network", "ConnectionTimeout") in values:
        timeout = one("Network", "ConnectionTimeout")
        config.warnings.append(f"{filename}: [Network] ConnectionTimeout is deprecated; "
                               "write Timeout instead.")
    if timeout is not None:
        if not 5 <= timeout <= 120:
            config.warnings.append(f"{filename}: [Network] Timeout of {timeout} s is unusual "
                                   "(5 seconds to 2 minutes is sensible).")
        config.timeout = timeout
    config.legacy = bool(one("Network", "Legacy", False))
    config.nym_warn_below = one("Nym", "WarnBelow", DEFAULT_NYM_WARN_BELOW)
    if config.nym_warn_below < 0:
        raise ConfigError(filename, 1, "Nym", "WarnBelow", "must be 0 or more")
    file_paranoia = one("Host", "FileParanoia")
    if file_paranoia is not None:
        config.file_paranoia = bool(file_paranoia)
    return config


def config_path(explicit: Optional[str], environ: Mapping[str, str]) -> tuple[str, bool]:
    """Which file to read, and whether it must already exist (§6 order:
    ``-f``, ``$MIXMINIONRC``, ``~/.mixminionrc``, ``~/mixminionrc``)."""
    if explicit:
        return os.path.expanduser(explicit), True
    if environ.get("MIXMINIONRC"):
        return os.path.expanduser(environ["MIXMINIONRC"]), True
    for name in ("~/.mixminionrc", "~/mixminionrc"):
        path = os.path.expanduser(name)
        if os.path.exists(path):
            return path, True
    return os.path.expanduser("~/.mixminionrc"), False


def load_client_config(explicit: Optional[str], environ: Mapping[str, str],
                       notice: Callable[[str], None] = lambda _: None) -> ClientConfig:
    """Read the configuration, writing the default file if there is none."""
    path, must_exist = config_path(explicit, environ)
    if not must_exist and not os.path.exists(path):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(DEFAULT_FILE)
        notice(f"Wrote a default configuration to {path}; edit it to add directory authorities.")
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(path, 0, None, None,
                          f"cannot read the configuration ({exc.strerror}); check the -f "
                          "option or MIXMINIONRC") from None
    return parse_client_config(text.decode("latin-1"), path)
