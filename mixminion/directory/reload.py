"""SIGHUP for a directory authority: re-read ``authority.conf`` and the
reject list, apply what can change while it runs, say what cannot.

Before this, an authority had no SIGHUP handler, so the signal's default
action killed it.  Now each option of
:data:`~mixminion.directory.authconfig.AUTHORITY_SECTIONS` either names an
applier here (``reload=``) or is read once at start (``consumer=``):

* ``RejectFile`` -- the file is read again on every SIGHUP, whether its
  name changed or only its lines; the new list refuses uploads at once
  and counts from our next vote;
* ``LogLevel``;
* ``Admission``, ``VoteFile``, ``ClientVersions``, ``ServerVersions`` --
  read when the store admits a descriptor or the next vote is built;
* ``[Reliability]`` ``MinPings``, ``MinPingers``, ``Pingers`` -- read
  when the next vote is built; ``ReportInterval`` -- read when the next
  report arrives and the next vote drops stale ones.

A change to any other option is logged at WARN as taking effect after a
restart: the listening address, the peers, the threshold and the round
length are what the other authorities and the servers rely on, and are
not swapped under a running round.  A file with any error (a bad option,
a bad line in the reject list, a reject file that cannot be read) is not
applied at all: the authority says why in one WARN line and keeps what it
had.  "applied" is logged only for what was.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

from twisted.application import service
from twisted.logger import Logger

from mixminion.config.schema import Option, SectionSpec
from mixminion.config.syntax import ConfigError
from mixminion.directory.authconfig import AUTHORITY_SECTIONS, load_authority_config
from mixminion.directory.authority import VoteFile
from mixminion.directory.service import Authority, AuthoritySettings
from mixminion.logfilter import set_log_level

log = Logger()

Applier = Callable[[Authority, AuthoritySettings], None]


def apply_rejects(authority: Authority, settings: AuthoritySettings) -> None:
    authority.store.rejects = settings.rejects
    log.info("SIGHUP: reject list {file} applied: {summary}",
             file=settings.reject_file or "(none)", summary=settings.rejects.summary())


def apply_log_level(authority: Authority, settings: AuthoritySettings) -> None:
    set_log_level(settings.log_level)


def apply_admission(authority: Authority, settings: AuthoritySettings) -> None:
    authority.store.admission = settings.admission


def apply_vote_file(authority: Authority, settings: AuthoritySettings) -> None:
    authority.store.votes = VoteFile(settings.vote_file)


def apply_versions(authority: Authority, settings: AuthoritySettings) -> None:
    """Nothing to do beyond the settings: ``make_vote`` reads them."""


def apply_reliability(authority: Authority, settings: AuthoritySettings) -> None:
    """Nothing to do beyond the settings: ``make_vote`` reads
    ``settings.reliability`` and ``settings.report_max_age``, and so does
    every uploaded report (``Authority.accept_report``)."""


def applier(name: str) -> Applier:
    """The function a schema entry names (``module:function``)."""
    module, _, function = name.partition(":")
    if module != __name__:
        raise ValueError(f"{name}: authority SIGHUP appliers live in {__name__}")
    return globals()[function]


def all_options() -> list[tuple[SectionSpec, Option]]:
    """Every option of ``authority.conf`` with its section."""
    return [(spec, option) for spec in AUTHORITY_SECTIONS for option in spec.options]


def changed_options(old: AuthoritySettings, new: AuthoritySettings) -> list[tuple[SectionSpec, Option]]:
    """The options whose value differs; ``RejectFile`` also when the file's
    entries did."""
    changed = []
    for spec, option in all_options():
        differs = getattr(old, option.name) != getattr(new, option.name)
        if option.key == "RejectFile":
            differs = differs or old.rejects != new.rejects
        if differs:
            changed.append((spec, option))
    return changed


class ReloadService(service.Service):
    """Reloads ``config_path`` into ``authority`` on SIGHUP (a
    :class:`~mixminion.signals.SignalService` calls :meth:`reload`)."""

    def __init__(self, authority: Authority, config_path: str, reactor: Any) -> None:
        self.authority = authority
        self.config_path = config_path
        self.reactor = reactor

    def reload(self) -> Optional[list[str]]:
        """Re-read and apply; the keys applied, or None if the file was refused."""
        try:
            new = load_authority_config(self.config_path)
        except ConfigError as exc:
            log.warn("SIGHUP: configuration not reloaded, still running on the old one: {why}",
                     why=str(exc))
            return None
        old = self.authority.settings
        changed = changed_options(old, new)
        live = {o.name: getattr(new, o.name) for _, o in changed if o.reload}
        for spec, option in changed:
            if not option.reload:
                log.warn("SIGHUP: [{section}] {key} changed; it takes effect after a restart",
                         section=spec.name, key=option.key)
        # The list just read is always taken: the same entries may have moved
        # to other lines, which the log names.  "applied" says when they changed.
        running = dataclasses.replace(old, **live, rejects=new.rejects)
        self.authority.settings = running
        self.authority.store.rejects = running.rejects
        for apply in dict.fromkeys(applier(o.reload) for _, o in changed if o.reload):
            apply(self.authority, running)
        applied = [o.key for _, o in all_options() if o.name in live]
        if applied:
            log.info("SIGHUP: applied {keys}", keys=", ".join(applied))
        else:
            log.info("SIGHUP: nothing to apply; reject list {file}: {summary}",
                     file=running.reject_file or "(none)", summary=running.rejects.summary())
        return applied
