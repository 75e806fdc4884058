"""A directory authority's descriptor store (descriptors.md §7.3, §5.5).

Servers upload descriptors; the authority keeps what passes every check,
one file per descriptor, and votes on the current ones.  Everything an
authority will put its signature under enters through
:meth:`AuthorityStore.accept_upload`, whether a server uploaded it or a
peer authority had it, so the same rules apply to both.

Admission of new servers (the reference required a human to edit a vote
file for every new server, which nobody did; we default to the opposite):

* ``auto`` (default): any valid descriptor is voted for, as long as its
  nickname is free or already belongs to its identity key.
* ``manual``: only identities marked ``yes`` in the vote file are voted
  for; others are stored and reported as "queued pending manual checking",
  and appended to the vote file as ``#abstain`` lines for the operator.

In both modes an optional vote file (§7.3 syntax, one
``[#]yes|no|abstain|ignore NICKNAME FINGERPRINT`` per line) can pin a
nickname to a key (``yes``), keep a server out of our votes (``no``) or
drop its uploads silently (``ignore``).

Above both, the reject list (``RejectFile``,
:mod:`mixminion.directory.rejects`) names servers by fingerprint,
nickname or address network: their uploads are refused with ``Status: 0``
and a message saying so, a peer's copy is not imported, and a descriptor
stored before its entry was added stays on disk but leaves our votes (so
removing the entry brings it back without a new upload).

On disk, under the authority's base directory::

    descriptors/<base64url(digest), no padding>   current descriptors
    archive/<same name>                           superseded or expired
    held/<same name>                              refused nickname claims, for inspection
    nicknames                                     "nickname FINGERPRINT" per line, first claim wins
    reports/<pinger's FINGERPRINT>                its latest accepted ping report (ReportStore)

No Twisted here; the clock is the ``now`` argument of every call.
"""

from __future__ import annotations

import base64
import os
import re
from dataclasses import dataclass
from typing import Callable, Container, Optional

from mixminion.codec.errors import ParseError
from mixminion.directory.descriptor import DescriptorError, ServerDescriptor, parse_descriptor
from mixminion.directory.directory import MAX_FUTURE, is_superseded
from mixminion.directory.rejects import RejectList
from mixminion.directory.reliability import PingReport, accept_report, parse_report
from mixminion.codec.textformat import SECONDS_PER_DAY, TextFormatError, format_date, format_time
from mixminion import fileutil

__all__ = [
    "ADMISSION_MODES",
    "AuthorityStore",
    "MAX_DESCRIPTOR_SIZE",
    "ReportStore",
    "VoteFile",
    "atomic_write",
    "digest_name",
]

#: largest upload we parse; real descriptors are 2-4 KB (Comments <= 1 KB)
MAX_DESCRIPTOR_SIZE = 32 * 1024
#: archived descriptors are deleted this long after they expire
ARCHIVE_RETENTION = 30 * SECONDS_PER_DAY
ADMISSION_MODES = ("auto", "manual")
VOTES = ("yes", "no", "abstain", "ignore")

_DESCRIPTORS, _ARCHIVE, _HELD, _NICKNAMES = "descriptors", "archive", "held", "nicknames"
_REPORTS = "reports"
_TMP = ".tmp"
_NAME = re.compile(r"[A-Za-z0-9_-]{27}")
_VOTE_LINE = re.compile(r"(#?)\s*(yes|no|abstain|ignore)\s+([A-Za-z][A-Za-z0-9-]*)\s+([0-9A-Fa-f ]+)")


def digest_name(digest: bytes) -> str:
    """File name of a descriptor: base64url of its digest, no padding (27 chars)."""
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def atomic_write(path: str, data: bytes, mode: int = 0o644) -> None:
    """:func:`mixminion.fileutil.atomic_write`, public by default: the
    authority's descriptors are public documents."""
    fileutil.atomic_write(path, data, mode)


@dataclass(frozen=True)
class Vote:
    vote: str
    nickname: str
    fingerprint: str
    decided: bool  # False for "#vote" lines: seen, no decision yet


class VoteFile:
    """The operator's §7.3 vote file; missing file = no votes.

    Re-read when its mtime changes, so the operator can edit it live.
    """

    def __init__(self, path: Optional[str]) -> None:
        self.path = path
        self._mtime: Optional[float] = None
        self._votes: dict[str, Vote] = {}

    def _refresh(self) -> None:
        if self.path is None:
            return
        try:
            mtime = os.stat(self.path).st_mtime
        except FileNotFoundError:
            self._votes, self._mtime = {}, None
            return
        if mtime == self._mtime:
            return
        votes: dict[str, Vote] = {}
        with open(self.path, encoding="ascii", errors="replace") as f:
            for line in f:
                match = _VOTE_LINE.fullmatch(line.strip())
                if match is None:
                    continue
                hashed, vote, nickname, fp = match.groups()
                fingerprint = "".join(fp.split()).upper()
                if len(fingerprint) == 40:
                    decided = not hashed
                    if decided or fingerprint not in votes:
                        votes[fingerprint] = Vote(vote, nickname, fingerprint, decided)
        self._votes, self._mtime = votes, mtime

    def get(self, fingerprint: str) -> Optional[Vote]:
        self._refresh()
        vote = self._votes.get(fingerprint)
        return vote if vote is not None and vote.decided else None

    def known(self, fingerprint: str) -> bool:
        self._refresh()
        return fingerprint in self._votes

    def owner_of(self, nickname: str) -> Optional[str]:
        """The fingerprint a ``yes`` line binds ``nickname`` to."""
        self._refresh()
        lowered = nickname.lower()
        for vote in self._votes.values():
            if vote.decided and vote.vote == "yes" and vote.nickname.lower() == lowered:
                return vote.fingerprint
        return None

    def append_pending(self, descriptor: ServerDescriptor, now: float) -> None:
        """Tell the operator about a new server, as the reference did."""
        if self.path is None or self.known(descriptor.fingerprint):
            return
        block = (f"#   Added {format_time(int(now))} [GMT]:\n"
                 f"#abstain {descriptor.nickname} {descriptor.fingerprint}\n")
        with open(self.path, "a", encoding="ascii") as f:
            f.write(block)
        self._mtime = None


Log = Callable[[str, str], None]  # (level, message)


class AuthorityStore:
    """Received descriptors on disk, with the checks that let them in."""

    def __init__(
        self,
        base_dir: str,
        now: float,
        *,
        admission: str = "auto",
        vote_file: Optional[str] = None,
        max_size: int = MAX_DESCRIPTOR_SIZE,
        #: the consensus drops descriptors starting later than this (§7.2 step 4)
        max_future: int = MAX_FUTURE,
        log: Optional[Log] = None,
        rejects: Optional[RejectList] = None,
    ) -> None:
        if admission not in ADMISSION_MODES:
            raise ValueError(f"admission must be one of {', '.join(ADMISSION_MODES)}, not {admission!r}")
        self.base_dir = base_dir
        self.admission = admission
        self.votes = VoteFile(vote_file)
        self.max_size = max_size
        self.max_future = max_future
        self.log: Log = log or (lambda level, message: None)
        #: replaced as a whole on SIGHUP (mixminion.directory.reload)
        self.rejects = rejects if rejects is not None else RejectList()
        for name in (_DESCRIPTORS, _ARCHIVE, _HELD):
            os.makedirs(os.path.join(base_dir, name), mode=0o700, exist_ok=True)
        self._nicknames = self._read_nicknames()
        self._current: dict[bytes, ServerDescriptor] = {}
        self._load(now)

    # --- paths ----------------------------------------------------------------

    def _path(self, where: str, digest: bytes) -> str:
        return os.path.join(self.base_dir, where, digest_name(digest))

    @property
    def nickname_file(self) -> str:
        return os.path.join(self.base_dir, _NICKNAMES)

    # --- the nickname table --------------------------------------------------------

    def _read_nicknames(self) -> dict[str, str]:
        table: dict[str, str] = {}
        try:
            with open(self.nickname_file, encoding="ascii") as f:
                for line in f:
                    parts = line.split()
                    if len(parts) == 2:
                        table.setdefault(parts[0].lower(), parts[1].upper())
        except FileNotFoundError:
            pass
        return table

    def _bind(self, nickname: str, fingerprint: str) -> None:
        if self._nicknames.get(nickname.lower()) == fingerprint:
            return
        self._nicknames[nickname.lower()] = fingerprint
        text = "".join(f"{n} {fp}\n" for n, fp in sorted(self._nicknames.items()))
        atomic_write(self.nickname_file, text.encode("ascii"), 0o600)

    def owner_of(self, nickname: str) -> Optional[str]:
        """Fingerprint of the identity that owns ``nickname`` (vote file first)."""
        return self.votes.owner_of(nickname) or self._nicknames.get(nickname.lower())

    # --- loading -----------------------------------------------------------------

    def _load(self, now: float) -> None:
        directory = os.path.join(self.base_dir, _DESCRIPTORS)
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            if name.endswith(_TMP) or name.startswith("."):  # an interrupted write
                os.unlink(path)
                continue
            try:
                with open(path, "rb") as f:
                    descriptor = parse_descriptor(f.read(), now, check_validity=False)
            except (OSError, DescriptorError, TextFormatError) as exc:
                self.log("warn", f"stored descriptor {name} is unusable ({exc}); archived")
                os.replace(path, os.path.join(self.base_dir, _ARCHIVE, name))
                continue
            self._current[descriptor.digest] = descriptor
        self.housekeeping(now)

    # --- uploads -------------------------------------------------------------------

    def accept_upload(self, text: str | bytes, now: float, *, source: str = "upload") -> tuple[bool, str]:
        """Validate and store one descriptor; ``(accepted, message for the uploader)``.

        ``accepted`` is what the publication protocol reports as ``Status``.
        """
        if len(text) > self.max_size:
            return False, f"Descriptor is {len(text)} bytes; this authority accepts at most {self.max_size}."
        try:
            descriptor = parse_descriptor(text, now, check_validity=False)
        except DescriptorError as exc:
            return False, f"Invalid descriptor: {exc}"
        fingerprint = descriptor.fingerprint
        where = f"{descriptor.nickname} ({fingerprint}, from {source})"
        rejected = self.rejects.match(descriptor)
        if rejected is not None:
            self.log("info", f"refused descriptor of {where}: reject list {rejected}")
            return False, (
                f"Server {descriptor.nickname} ({fingerprint}) is on this authority's reject list: "
                f"this authority refuses its descriptors and leaves it out of its votes."
            )
        if descriptor.valid_until < now:
            return False, (
                f"Descriptor expired at {format_date(descriptor.valid_until)} GMT; this authority's time is "
                f"{format_time(int(now))} GMT. Is your clock right?"
            )
        if descriptor.valid_after > now + self.max_future:
            return False, (
                f"Descriptor starts {format_date(descriptor.valid_after)}, more than "
                f"{self.max_future // SECONDS_PER_DAY} days after this authority's time "
                f"{format_time(int(now))} GMT. Is your clock right?"
            )
        vote = self.votes.get(fingerprint)
        if vote is not None and vote.vote == "ignore":
            self.log("info", f"ignored descriptor of {where}: vote file says ignore")
            return True, "Accepted."
        owner = self.owner_of(descriptor.nickname)
        if owner is not None and owner != fingerprint:
            self._hold(descriptor)
            self.log("warn", f"refused descriptor of {where}: nickname belongs to {owner}")
            return False, (
                f"The nickname {descriptor.nickname} already belongs to a server with identity {owner}; "
                f"this descriptor has identity {fingerprint}. Choose another nickname."
            )
        if descriptor.digest in self._current:
            return True, "Already have this descriptor."
        self._bind(descriptor.nickname, fingerprint)
        self._store(descriptor)
        self._archive_superseded(descriptor.nickname)
        if descriptor.digest not in self._current:
            self.log("info", f"descriptor of {where} is already superseded; archived")
            return True, "Accepted (already superseded by a newer descriptor)."
        self.log("info", f"accepted descriptor {digest_name(descriptor.digest)} of {where}")
        if self.admission == "manual" and vote is None:
            self.votes.append_pending(descriptor, now)
            return True, "Server queued pending manual checking."
        return True, "Accepted."

    def _store(self, descriptor: ServerDescriptor) -> None:
        atomic_write(self._path(_DESCRIPTORS, descriptor.digest), descriptor.text.encode("ascii"))
        self._current[descriptor.digest] = descriptor

    def _hold(self, descriptor: ServerDescriptor) -> None:
        atomic_write(self._path(_HELD, descriptor.digest), descriptor.text.encode("ascii"))

    def _archive(self, descriptor: ServerDescriptor) -> None:
        source = self._path(_DESCRIPTORS, descriptor.digest)
        if os.path.exists(source):
            os.replace(source, self._path(_ARCHIVE, descriptor.digest))
        self._current.pop(descriptor.digest, None)

    def _archive_superseded(self, nickname: str) -> None:
        same = [d for d in self._current.values() if d.nickname.lower() == nickname.lower()]
        for descriptor in same:
            if is_superseded(descriptor, same):
                self._archive(descriptor)

    # --- reading -----------------------------------------------------------------

    def has(self, digest: bytes) -> bool:
        return digest in self._current

    def all(self) -> list[ServerDescriptor]:
        """Everything stored (current and future, admitted or not)."""
        return sorted(self._current.values(), key=lambda d: (d.nickname.lower(), d.valid_after, d.digest))

    def admitted(self, descriptor: ServerDescriptor) -> bool:
        """Whether our votes include this server (see the module docstring)."""
        if self.rejects.match(descriptor) is not None:
            return False
        vote = self.votes.get(descriptor.fingerprint)
        if vote is not None:
            return vote.vote == "yes" or (vote.vote == "abstain" and self.admission == "auto")
        return self.admission == "auto"

    def descriptors(self, now: float) -> list[ServerDescriptor]:
        """What we vote for: unexpired, not superseded, admitted."""
        return [d for d in self.all() if d.valid_until >= now and self.admitted(d)]

    # --- housekeeping ----------------------------------------------------------------

    def housekeeping(self, now: float) -> int:
        """Archive expired and superseded descriptors; forget old archives.
        Returns how many descriptors left the current set."""
        before = len(self._current)
        for descriptor in list(self._current.values()):
            if descriptor.valid_until < now:
                self._archive(descriptor)
        for nickname in {d.nickname.lower() for d in self._current.values()}:
            self._archive_superseded(nickname)
        self._prune_archive(now)
        return before - len(self._current)

    def _prune_archive(self, now: float) -> None:
        for where in (_ARCHIVE, _HELD):
            directory = os.path.join(self.base_dir, where)
            for name in os.listdir(directory):
                path = os.path.join(directory, name)
                try:
                    if os.stat(path).st_mtime < now - ARCHIVE_RETENTION:
                        os.unlink(path)
                except FileNotFoundError:
                    pass


class ReportStore:
    """The latest accepted ping report of each pinger (doc/reliability.md
    §2-§3), one file each, named by the pinger's fingerprint.

    Only a pinger's latest report counts in a vote, so one file a pinger
    bounds the disk to the number of listed nodes, and a restart votes on
    what was accepted before it.  Whether a pinger is listed and how old a
    report may be are the caller's (``is_listed``, ``max_age``): they
    change with the descriptors and the configuration.
    """

    def __init__(self, base_dir: str, now: float, *, max_size: int = MAX_DESCRIPTOR_SIZE,
                 log: Optional[Log] = None) -> None:
        self.folder = os.path.join(base_dir, _REPORTS)
        self.max_size = max_size
        self.log: Log = log or (lambda level, message: None)
        os.makedirs(self.folder, mode=0o700, exist_ok=True)
        self._latest: dict[str, PingReport] = {}
        self._load(now)

    def _path(self, fingerprint: str) -> str:
        return os.path.join(self.folder, fingerprint)

    def _load(self, now: float) -> None:
        """Every stored report that still verifies; the others are deleted
        (a pinger sends a new one every interval, nothing is lost)."""
        for name in sorted(os.listdir(self.folder)):
            path = os.path.join(self.folder, name)
            if name.startswith("."):  # an interrupted atomic write
                os.unlink(path)
                continue
            try:
                with open(path, "rb") as f:
                    report = parse_report(f.read(), now)
                if report.fingerprint != name:
                    raise ParseError(f"it is {report.fingerprint}'s")
            except (OSError, ParseError) as exc:
                self.log("warn", f"stored report {name} is unusable ({exc}); deleted")
                _remove(path)
                continue
            self._latest[name] = report

    def accept(self, text: str | bytes, now: float, max_age: float,
               is_listed: Callable[[str], bool]) -> tuple[bool, str]:
        """Verify one uploaded report and keep it if it is the pinger's
        latest; ``(accepted, message for the uploader)``, as
        :meth:`AuthorityStore.accept_upload` answers."""
        if len(text) > self.max_size:
            return False, f"Report is {len(text)} bytes; this authority accepts at most {self.max_size}."
        try:
            report = accept_report(text, now, max_age, is_listed)
        except ParseError as exc:
            return False, f"Report refused: {exc}"
        who = f"{report.pinger} ({report.fingerprint})"
        held = self._latest.get(report.fingerprint)
        if held is not None and held.digest == report.digest:
            return True, f"Already have this report of {who}."
        if held is not None and (held.published, held.digest) > (report.published, report.digest):
            # valid, so the pinger may stop retrying; it just does not count
            return True, f"Accepted; a later report of {who} is already held."
        atomic_write(self._path(report.fingerprint), report.text.encode("ascii"))
        self._latest[report.fingerprint] = report
        return True, f"Accepted the report of {who} published {format_time(report.published)}."

    def latest(self) -> list[PingReport]:
        """The report each pinger sent last, by fingerprint."""
        return [self._latest[fp] for fp in sorted(self._latest)]

    def housekeeping(self, now: float, max_age: float, listed: Container[str]) -> int:
        """Delete the reports that can no longer count: of pingers no longer
        listed, or published more than ``max_age`` before ``now`` (a
        pinger that stopped reporting must stop being heard).  Returns how
        many were deleted."""
        dropped = 0
        for fingerprint, report in list(self._latest.items()):
            if fingerprint not in listed:
                why = "its pinger is no longer listed"
            elif report.published < now - max_age:
                why = f"published {format_time(report.published)}, more than {int(max_age)} s ago"
            else:
                continue
            _remove(self._path(fingerprint))
            del self._latest[fingerprint]
            self.log("info", f"dropped the report of {report.pinger} ({fingerprint}): {why}")
            dropped += 1
        return dropped


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
