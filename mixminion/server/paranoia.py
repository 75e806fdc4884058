"""FileParanoia: refuse to start when others could read our keys or swap our files.

Spec: server.md §14.3 (``[Host] FileParanoia``, ``TrustedUser``, the
``MM_NO_FILE_PARANOIA`` environment variable), §2 (on-disk layout), §3
step 6 (checked at start).

:func:`check_permissions` is a pure check over plain paths and uids: it
reads the file system and returns a list of :class:`Problem` (one line
each, naming the path, what is wrong and the command that fixes it); it
never changes anything.  :func:`problems_for` applies it to a parsed
``mixminiond.conf``.  The node and ``mixminiond check`` both call it and
refuse to go on while the list is not empty.

The rules, by what a path is:

* **Private keys**: every file under ``KeyDir`` except the published
  ``ServerDesc`` and ``published`` (and their ``.tmp`` forms): the
  identity key, each keyset's ``mix.key``, ``pinger.seed`` and anything an
  operator left there (a stray ``identity.key.bak`` is a key too).  It
  must be a regular file, not a symbolic link (a link lets whoever
  controls its target's folder swap the key, and secure deletion would
  remove the link but not the key), owned by the node's user, mode
  exactly 0600.  Exactly, not "at most": 0400 would also be private, but
  one expected mode gives one message and one fix, and it is what the
  node writes.  The node holds its TLS link keys only in memory, so there
  is no TLS key file to check (``WorkDir/tls`` holds public data).
* **Folders holding private keys**: ``KeyDir`` and every folder under it,
  owned by the node's user, mode exactly 0700.  Nothing under ``KeyDir``
  may be a symbolic link.
* **Stores**: ``BaseDir``, ``WorkDir``, ``QueueDir`` and the replay logs'
  folder: owned by the node's user, not writable by group or others.  The
  files the node appends to or rewrites (``LogFile``, ``StatsFile``,
  ``PidFile``, and the public files under ``KeyDir``): the same.
* **Folders of LogFile, StatsFile and PidFile**: these may be system
  folders (``/var/log``, ``/run``), so root or a ``TrustedUser`` may own
  them, but they must not be writable by group or others, sticky or not:
  anyone who can create names there can plant a file or a link where the
  node will write.
* **Every folder above those** (searched on the way from ``/``, following
  symbolic links as the kernel does, so a link's target's folders are
  checked too): owned by root, the node's user or a ``TrustedUser``, and
  not writable by group or others *unless the sticky bit is set*.  Every
  symbolic link met on the way must be owned by one of those users too.

Why a sticky world-writable folder such as ``/tmp`` is accepted above
BaseDir (as the reference did): in a sticky folder only an entry's owner,
the folder's owner and root may rename or remove the entry.  The walk
checks that the next component down is owned by a trusted user and the
sticky folder's owner is trusted, so nobody else can replace the path
the node uses.  Refusing ``/tmp`` would only refuse test and throw-away
nodes without protecting anything.  The reference merely warned about
group-writable parents; here group-writable without the sticky bit is an
error like world-writable, as the issue asks.

Paths that do not exist yet are not problems: the node creates them 0700.
Existing folders above a missing path are still checked, since the node
would create its folders there.  Call the check again after creating the
folders if the window between the two matters (in a sticky ``/tmp``
someone else may create ``/tmp/mix`` first; the second check then
reports it as owned by them).

Owners are compared with the effective uid, the one that owns the files
the node creates.
"""

from __future__ import annotations

import enum
import errno
import os
import pwd
import shlex
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Optional, Sequence

from mixminion.server.keys import DESCRIPTOR_FILE, PUBLISHED_FILE

if TYPE_CHECKING:
    from mixminion.server.config import ServerConfig

__all__ = [
    "ENV_DISABLE",
    "Problem",
    "check_permissions",
    "paranoia_enabled",
    "problems_for",
]

#: any non-empty value turns the whole check off (§14.3)
ENV_DISABLE = "MM_NO_FILE_PARANOIA"
PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700
#: the files of KeyDir that are published anyway (keys.py writes them 0644 and 0600)
PUBLIC_KEY_FILES = frozenset(
    name + suffix for name in (DESCRIPTOR_FILE, PUBLISHED_FILE) for suffix in ("", ".tmp")
)
_OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH
#: as Linux's MAXSYMLINKS: more links than this in one lookup is a loop
_MAX_LINKS = 40


@dataclass(frozen=True)
class Problem:
    """One reason to refuse to start; ``str()`` gives the line to print."""

    path: str
    #: what is wrong and the rule, e.g. ``is mode 0644; private keys must be 0600``
    problem: str
    #: a shell command (or short instruction) that fixes it
    fix: str

    def __str__(self) -> str:
        return f"{self.path} {self.problem}: {self.fix}"


def paranoia_enabled(file_paranoia: bool = True, environ: Optional[Mapping[str, str]] = None) -> bool:
    """``[Host] FileParanoia`` is on and ``MM_NO_FILE_PARANOIA`` is unset or empty."""
    environ = os.environ if environ is None else environ
    return file_paranoia and not environ.get(ENV_DISABLE)


class _Role(enum.IntEnum):
    """What a path is to the node; for one path the highest role is checked
    (each one's rules include those of the roles below it of its kind)."""

    # folders
    ANCESTOR = 1
    FILE_FOLDER = 2
    STORE = 3
    PRIVATE_DIR = 4
    # files
    STORE_FILE = 5
    PRIVATE_FILE = 6
    # symbolic links, checked without following them
    LINK = 7
    KEY_LINK = 8


#: roles checked on the link itself (lstat), never on what it points to
_LINK_ROLES = (_Role.LINK, _Role.KEY_LINK)


class _Checker:
    def __init__(self, uid: int, trusted_uids: Iterable[int]) -> None:
        self.uid = uid
        self.trusted = {0, uid, *trusted_uids}
        #: (path, is a link check) -> role; insertion order is report order
        self.entries: dict[tuple[str, bool], _Role] = {}

    # --- collecting paths ---------------------------------------------------------------

    def add(self, path: str, role: _Role) -> None:
        key = (path, role in _LINK_ROLES)
        self.entries[key] = max(self.entries.get(key, role), role)

    def add_with_ancestors(self, path: str, role: _Role) -> None:
        for searched, is_link in _lookup(path):
            self.add(searched, _Role.LINK if is_link else _Role.ANCESTOR)
        self.add(path, role)

    def add_key_tree(self, folder: str) -> None:
        """Everything under KeyDir, depth first, in name order; links are not followed."""
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            return  # missing or unreadable: the folder's own check says so
        for entry in entries:
            if entry.is_symlink():
                self.add(entry.path, _Role.KEY_LINK)
            elif entry.is_dir(follow_symlinks=False):
                self.add(entry.path, _Role.PRIVATE_DIR)
                self.add_key_tree(entry.path)
            elif entry.name in PUBLIC_KEY_FILES:
                self.add(entry.path, _Role.STORE_FILE)
            else:
                self.add(entry.path, _Role.PRIVATE_FILE)

    # --- checking -----------------------------------------------------------------------

    def problems(self) -> list[Problem]:
        found: list[Problem] = []
        for (path, is_link), role in self.entries.items():
            try:
                info = os.lstat(path) if is_link else os.stat(path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                found.append(_unexaminable(path, exc))
                continue
            found.extend(self.check(path, role, info))
        return found

    def check(self, path: str, role: _Role, info: os.stat_result) -> list[Problem]:
        mode, owner, p = info.st_mode, info.st_uid, shlex.quote(path)
        if role is _Role.KEY_LINK:
            target = os.readlink(path)
            real = os.path.normpath(os.path.join(os.path.dirname(path), target))
            fix = f"rm {p} && mv {shlex.quote(real)} {p}" if os.path.lexists(real) else f"rm {p}"
            return [Problem(path, f"is a symbolic link to {target}; "
                            "KeyDir must hold the keys themselves, not links", fix)]
        if role is _Role.LINK:
            if owner in self.trusted:
                return []
            return [Problem(path, f"is a symbolic link owned by {_who(owner)}; links on the way "
                            f"to the node's files must be owned by {self.trusted_owners()}",
                            f"chown -h root {p}")]
        rule = _RULES[role]
        is_file = role in (_Role.STORE_FILE, _Role.PRIVATE_FILE)
        if is_file and not stat.S_ISREG(mode):
            return [Problem(path, "is not a regular file", f"move it away: mv {p} {p}.old")]
        if not is_file and not stat.S_ISDIR(mode):
            return [Problem(path, "is not a folder", f"move it away: mv {p} {p}.old")]
        out = []
        if rule.owner_may_be_trusted and owner not in self.trusted:
            out.append(Problem(path, f"is owned by {_who(owner)}; {rule.what} must be owned by "
                               f"{self.trusted_owners()}",
                               f"chown root {p}, or name {_user_name(owner)} in [Host] TrustedUser"))
        elif not rule.owner_may_be_trusted and owner != self.uid:
            out.append(Problem(path, f"is owned by {_who(owner)}; {rule.what} must be owned by "
                               f"the node's user, {_who(self.uid)}", f"chown {_user_name(self.uid)} {p}"))
        if not rule.mode_ok(mode):
            out.append(Problem(path, f"is mode {_mode(mode)}; {rule.what} {rule.want}",
                               rule.fix.format(p)))
        return out

    def trusted_owners(self) -> str:
        return "root or a TrustedUser" if self.uid == 0 else f"root, {_who(self.uid)} or a TrustedUser"


@dataclass(frozen=True)
class _Rule:
    #: the kind of path, as the message names it
    what: str
    #: root, the node's user or a TrustedUser may own it (else only the node's user)
    owner_may_be_trusted: bool
    mode_ok: Callable[[int], bool]
    #: the mode rule, as the message states it
    want: str
    #: the command that fixes the mode; ``{}`` is the quoted path
    fix: str


def _exactly(wanted: int) -> Callable[[int], bool]:
    return lambda mode: stat.S_IMODE(mode) == wanted


def _not_writable_by_others(mode: int) -> bool:
    return not mode & _OTHERS_WRITE


def _not_writable_by_others_unless_sticky(mode: int) -> bool:
    return not mode & _OTHERS_WRITE or bool(mode & stat.S_ISVTX)


_NOT_WRITABLE = "must not be writable by group or others"
_RULES = {
    _Role.PRIVATE_FILE: _Rule("private keys", False, _exactly(PRIVATE_FILE_MODE),
                              "must be 0600", "chmod 600 {}"),
    _Role.PRIVATE_DIR: _Rule("folders holding private keys", False, _exactly(PRIVATE_DIR_MODE),
                             "must be 0700", "chmod 700 {}"),
    _Role.STORE: _Rule("the node's folders", False, _not_writable_by_others,
                       _NOT_WRITABLE, "chmod go-w {}"),
    _Role.STORE_FILE: _Rule("files the node writes", False, _not_writable_by_others,
                            _NOT_WRITABLE, "chmod go-w {}"),
    _Role.FILE_FOLDER: _Rule("folders of LogFile, StatsFile and PidFile", True, _not_writable_by_others,
                             _NOT_WRITABLE, "chmod go-w {}, or move the files to a folder of their own"),
    _Role.ANCESTOR: _Rule("folders above the node's files", True, _not_writable_by_others_unless_sticky,
                          _NOT_WRITABLE + " unless sticky", "chmod go-w {}"),
}


def _lookup(path: str) -> list[tuple[str, bool]]:
    """The folders searched and the symbolic links followed (``True``) while
    the kernel looks up ``path``, in order; not ``path`` itself unless it is
    a link.  Stops at the first component that cannot be examined (it does
    not exist yet, or the target's own check will report why)."""
    seen: list[tuple[str, bool]] = [("/", False)]
    current = "/"
    pending = [part for part in os.path.abspath(path).split("/") if part]
    links = 0
    while pending:
        name = pending.pop(0)
        if name == ".":
            continue
        if name == "..":
            current = os.path.dirname(current)
            continue
        candidate = os.path.join(current, name)
        try:
            info = os.lstat(candidate)
        except OSError:
            break
        if stat.S_ISLNK(info.st_mode):
            links += 1
            if links > _MAX_LINKS:
                break
            seen.append((candidate, True))
            target = os.readlink(candidate)
            if target.startswith("/"):
                current = "/"
            pending[:0] = [part for part in target.split("/") if part]
            continue
        current = candidate
        if pending:
            if not stat.S_ISDIR(info.st_mode):
                break
            seen.append((candidate, False))
    return seen


def _unexaminable(path: str, exc: OSError) -> Problem:
    if exc.errno in (errno.EACCES, errno.EPERM):
        fix = "make every folder above it searchable by the node's user"
    elif exc.errno == errno.ENOTDIR:
        fix = "a part of the path is a file, not a folder: correct the path in mixminiond.conf"
    else:
        fix = "check it by hand"
    return Problem(path, f"cannot be examined ({exc.strerror})", fix)


def _mode(mode: int) -> str:
    return f"{stat.S_IMODE(mode):04o}"


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _who(uid: int) -> str:
    name = _user_name(uid)
    return f"{name} ({uid})" if name != str(uid) else f"uid {uid}"


def check_permissions(
    *,
    key_dir: Optional[str],
    stores: Sequence[str] = (),
    files: Sequence[str] = (),
    trusted_uids: Iterable[int] = (),
    uid: Optional[int] = None,
    environ: Optional[Mapping[str, str]] = None,
) -> list[Problem]:
    """Every permission problem of the node's files, in a stable order.

    ``key_dir`` holds the private keys (everything under it is checked);
    ``stores`` are the node's other folders (BaseDir, WorkDir, QueueDir...);
    ``files`` are files it writes outside KeyDir (LogFile, StatsFile,
    PidFile), whose folders are checked as well.  ``trusted_uids`` may own
    folders above these besides root and ``uid`` (default: the effective
    uid).  Returns ``[]`` when ``MM_NO_FILE_PARANOIA`` is set in
    ``environ`` (default ``os.environ``).
    """
    if not paranoia_enabled(True, environ):
        return []
    checker = _Checker(os.geteuid() if uid is None else uid, trusted_uids)
    for path in stores:
        checker.add_with_ancestors(os.path.abspath(path), _Role.STORE)
    for path in files:
        path = os.path.abspath(path)
        checker.add_with_ancestors(os.path.dirname(path), _Role.FILE_FOLDER)
        checker.add(path, _Role.STORE_FILE)
    if key_dir is not None:
        key_dir = os.path.abspath(key_dir)
        checker.add_with_ancestors(key_dir, _Role.PRIVATE_DIR)
        checker.add_key_tree(key_dir)
    return checker.problems()


def problems_for(config: ServerConfig, environ: Optional[Mapping[str, str]] = None) -> list[Problem]:
    """:func:`check_permissions` for a parsed ``mixminiond.conf``: its
    ``[Host]`` (FileParanoia, TrustedUser) and ``[Server]`` paths."""
    host, server = config.host, config.server
    if not paranoia_enabled(host.file_paranoia, environ):
        return []
    return check_permissions(
        key_dir=server.key_dir,
        stores=(server.base_dir, server.work_dir, server.queue_dir, server.hashlog_dir),
        # LogFile is None when twistd writes the log
        files=[path for path in (server.log_file, server.stats_file, server.pid_file) if path],
        trusted_uids=host.trusted_users,
        environ=environ,
    )
