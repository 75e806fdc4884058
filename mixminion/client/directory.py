"""The client's view of the network: a verified, cached directory plus
descriptors imported by hand (descriptors.md §8-§10, client.md §8).

Everything a client learns about servers passes through here, so this is
where the reference's trust gaps are closed (descriptors.md §10 items 1-4):

* a downloaded directory must carry valid signatures from at least
  ``threshold`` of the pinned authority fingerprints, and must be inside
  its own validity interval (checked by :func:`parse_directory`);
* a bad download never replaces the last good directory, and the error
  says why the download was refused and what the user can do;
* imported descriptors are never "recommended", and never silently take
  the place of the directory's descriptor for the same nickname;
* expired imports and stale validated digests are actually cleaned.

Files under ``root`` (``~/.mixminion`` for the command-line client):

``dir``
    the text of the last directory that verified (replaced atomically);
``imported/``
    one file per imported descriptor, ``<nickname>-<YYYYMMDDHHMMSS>`` of its
    ``Published`` time in local time, with ``.1``, ``.2`` ... on collision;
``cache``
    JSON: the download time and URL, and the map of validated descriptor
    digests to their ``Valid-Until`` (so known descriptors skip RSA checks).
    Rebuilt from ``dir`` (its mtime) if unreadable.

Time comes from ``clock`` (any ``IReactorTime``) so tests can move it;
networking and timeouts use ``reactor``.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Tuple, Union
from urllib.parse import urlsplit

from mixminion import __version__
from mixminion.codec.rsa import PublicKey
from mixminion.directory import directory as dirformat
from mixminion.directory.descriptor import (
    PACKET_VERSION,
    DescriptorError,
    ServerDescriptor,
    parse_descriptor,
)
from mixminion.codec.textformat import (
    format_date,
    format_time,
    previous_midnight,
)
from mixminion.directory.reliability import ServerReliability
from mixminion.fileutil import atomic_write, fsync_dir

#: ``report(level, message)``: how the directory tells its user what it did
#: (level "DEBUG", "INFO" or "WARN"); the command line passes its own logger
Report = Callable[[str, str], None]


def twisted_report(level: str, message: str) -> None:
    """The default :data:`Report`: a Twisted log event (for the node and
    the test network, which log through Twisted anyway)."""
    from twisted.logger import Logger

    logger = Logger(namespace=__name__)
    emit = {"WARN": logger.warn, "DEBUG": logger.debug}.get(level, logger.info)
    emit("{message}", message=message)

#: HTTP timeout for one authority (client.md: DirectoryTimeout, default 1 minute)
DEFAULT_TIMEOUT = 60.0
#: a Date header further than this from our clock earns a warning (§8 step 5)
MAX_CLOCK_SKEW = 30 * 60
#: refuse bigger downloads (and gzip bombs): a real directory is well under 1 MiB
MAX_DIRECTORY_BYTES = 16 * 1024 * 1024

DIR_FILE = "dir"
CACHE_FILE = "cache"
IMPORTED_DIR = "imported"
CACHE_FORMAT = 1

Authority = Tuple[str, str]
"""``(URL, fingerprint)``: where an authority serves its directory and the
hex SHA-1 of the identity key its signature must be made with."""


# --- errors --------------------------------------------------------------------------


class ClientDirectoryError(Exception):
    """Something the user must hear about; ``str()`` is the whole message:
    what went wrong and what to do about it."""


class ImportRejected(ClientDirectoryError):
    """``import-server`` refused a descriptor (descriptors.md §8 import rules)."""


class ServerNotFound(ClientDirectoryError):
    """No usable descriptor for a nickname (descriptors.md §8 lookup rules)."""


@dataclass(frozen=True)
class DownloadFailure:
    """Why one authority did not give us a directory, and what to do."""

    url: str
    why: str
    what_to_do: str

    def __str__(self) -> str:
        return f"{self.url}: {self.why} {self.what_to_do}"


class DirectoryUpdateError(ClientDirectoryError):
    """No configured authority gave a valid directory.  The previous good
    directory (``kept``), if any, is still the one in use."""

    def __init__(self, message: str, failures: Sequence[DownloadFailure] = (),
                 kept: Optional[Any] = None) -> None:
        super().__init__(message)
        self.failures = tuple(failures)
        self.kept = kept


class _Refused(Exception):
    """Internal: carries a :class:`DownloadFailure` out of one attempt."""

    def __init__(self, failure: DownloadFailure) -> None:
        super().__init__(str(failure))
        self.failure = failure


# --- results -------------------------------------------------------------------------


@dataclass(frozen=True)
class UpdateResult:
    """What :meth:`ClientDirectory.update` did.

    ``downloaded`` is False when the cached directory was fresh enough;
    ``warnings`` holds the clock-skew warning and the failures of
    authorities tried before the one that worked.
    """

    downloaded: bool
    reason: str
    directory: Any
    url: Optional[str] = None
    warnings: Tuple[str, ...] = ()


# --- small helpers ---------------------------------------------------------------------


def directory_url(base: str) -> str:
    """The URL to GET for an authority configured as ``base``.

    A URL already naming ``directory`` or ``directory.gz`` is used as is;
    anything else is a base to which ``/directory`` is appended.
    """
    path = urlsplit(base).path
    if re.search(r"(^|/)directory(\.gz)?$", path, re.IGNORECASE):
        return base
    return base.rstrip("/") + "/directory"


def proxy_for(url: str, environ: Mapping[str, str]) -> Optional[Tuple[str, int]]:
    """``(host, port)`` of the HTTP proxy to use for ``url``, if any.

    Follows curl: only the lower-case ``http_proxy`` (the upper-case one can
    be set by a remote party in CGI contexts), only for ``http:`` URLs, and
    ``no_proxy`` (comma-separated host suffixes, ``*`` for all) excludes.
    """
    parts = urlsplit(url)
    proxy = environ.get("http_proxy", "").strip()
    if parts.scheme != "http" or not proxy:
        return None
    host = (parts.hostname or "").lower()
    no_proxy = environ.get("no_proxy", environ.get("NO_PROXY", ""))
    for entry in (e.strip().lower().lstrip(".") for e in no_proxy.split(",")):
        if entry == "*" or (entry and (host == entry or host.endswith("." + entry))):
            return None
    if "://" not in proxy:
        proxy = "http://" + proxy
    proxy_parts = urlsplit(proxy)
    try:
        port = proxy_parts.port or 80
    except ValueError:  # not a number, or out of range
        port = 0
    if not proxy_parts.hostname or not port:
        raise ClientDirectoryError(
            f"http_proxy is set to {environ['http_proxy']!r}, which names no host and port. "
            "Set it to http://HOST:PORT/ or unset it.")
    return proxy_parts.hostname, port


def version_advice(recommended: Sequence[str], version: str = __version__) -> Optional[str]:
    """A warning when ``version`` is not among ``recommended`` (§8 "Version
    advice"); None if it is, or if the list is empty."""
    listed = [v for v in recommended if v]
    if not listed or version in listed:
        return None
    shown = ", ".join(listed)
    if any(dirformat.version_key(v) > dirformat.version_key(version) for v in listed):
        return (f"This software (version {version}) may be obsolete: the directory recommends "
                f"{shown}. Please upgrade.")
    return (f"This software (version {version}) is newer than any recommended version "
            f"({shown}); that is fine if you know why you run it.")



_NETWORK_ADVICE = ("Check your network connection (and http_proxy, if you use a proxy); "
                   "the authority may be down, so try again later.")

#: advice per kind of directory rejection, looked up by exception class name
#: along the exception's MRO so that it survives refactoring of the hierarchy
_REJECTION_ADVICE: Mapping[str, str] = {
    "NotEnoughSignatures": (
        "Someone may be serving a forged directory, or the authorities' keys have "
        "changed: check the Authority fingerprints in your configuration against a "
        "trustworthy source, and try again later."),
    "DirectoryExpired": (
        "The authority is serving an out-of-date directory, or your clock is ahead: "
        "check your clock, then try again later."),
    "DirectoryNotYetValid": (
        "Your clock may be behind, or the authority's is ahead: check your clock, "
        "then try again later."),
    "TamperedDirectory": (
        "The directory was altered after it was signed (in transit or on the server); "
        "another authority may serve an intact copy; try again later."),
}
_DEFAULT_REJECTION_ADVICE = (
    "The authority served a directory this client cannot accept; try again later, "
    "and report the problem to the authority's operator if it persists.")


def _rejection_advice(exc: BaseException) -> str:
    for cls in type(exc).__mro__:
        if cls.__name__ in _REJECTION_ADVICE:
            return _REJECTION_ADVICE[cls.__name__]
    return _DEFAULT_REJECTION_ADVICE


# --- the client's directory --------------------------------------------------------------


class _WallClock:
    """``IReactorTime.seconds`` without a reactor."""

    def seconds(self) -> float:
        return time.time()


class ClientDirectory:
    """The directory a client uses to pick servers, and how it stays fresh.

    ``authorities`` are tried in order; ``trusted_keys`` (fingerprint ->
    key) narrows the pinned set further when given, otherwise the
    fingerprints of ``authorities`` are the trust anchors and the keys
    themselves are learned from the directory's signature blocks.
    """

    def __init__(
        self,
        root: str,
        authorities: Sequence[Authority],
        trusted_keys: Optional[Mapping[str, PublicKey]] = None,
        threshold: int = 1,
        clock: Any = None,
        *,
        reactor: Any = None,
        timeout: float = DEFAULT_TIMEOUT,
        environ: Optional[Mapping[str, str]] = None,
        report: Report = twisted_report,
    ) -> None:
        self.report = report
        self.root = os.path.abspath(os.path.expanduser(root))
        self.authorities = tuple((url, "".join(fp.split()).upper()) for url, fp in authorities)
        self.trusted: dict[str, Optional[PublicKey]]
        if trusted_keys is not None:
            self.trusted = {"".join(fp.split()).upper(): key for fp, key in trusted_keys.items()}
        else:
            self.trusted = {fp: None for _, fp in self.authorities}
        if threshold < 1:
            raise ValueError("threshold must be at least 1: an unsigned directory proves nothing")
        if threshold > len(self.trusted):
            raise ValueError(f"threshold {threshold} is more than the {len(self.trusted)} "
                             "trusted authorities: no directory could ever be accepted")
        self.threshold = threshold
        self.clock = clock if clock is not None else (reactor or _WallClock())
        self._reactor = reactor
        self.timeout = timeout
        self.environ = os.environ if environ is None else environ
        self.directory: Optional[Any] = None
        self.downloaded: Optional[float] = None
        self.source_url: Optional[str] = None
        self.imported: list[ServerDescriptor] = []
        #: digest -> file under imported/, so cleaning never has to re-parse
        self._import_paths: dict[bytes, str] = {}
        self.validated: dict[bytes, int] = {}
        self._loaded = False

    @property
    def reactor(self) -> Any:
        """The reactor downloads run on: imported only for a download, so
        commands that only read the cache start without it."""
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    # -- paths and time -----------------------------------------------------------

    def _path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def _now(self) -> float:
        return float(self.clock.seconds())

    def _ensure_root(self) -> None:
        os.makedirs(self._path(IMPORTED_DIR), mode=0o700, exist_ok=True)

    # -- verification ---------------------------------------------------------------

    def _parse(self, text: Union[str, bytes], now: float, check_validity: bool) -> Any:
        """Verify ``text`` as a directory signed by enough pinned authorities."""
        return dirformat.parse_any_directory(
            text, now, trusted=self.trusted, threshold=self.threshold,
            check_validity=check_validity, verified_digests=self.validated)

    def _remember(self, descriptors: Iterable[ServerDescriptor]) -> None:
        for d in descriptors:
            self.validated[d.digest] = d.valid_until

    # -- loading and saving -------------------------------------------------------------

    def load(self) -> Optional[Any]:
        """Read the cache, the last good directory and the imported
        descriptors from disk; return the directory (None if there is none).

        A cached directory is checked again against the current trust
        settings (the configuration may have changed since) but not for
        expiry: an expired one is still better than nothing, and
        :meth:`is_stale` reports it.
        """
        self._loaded = True
        self._read_cache()
        self.directory = None
        path = self._path(DIR_FILE)
        try:
            with open(path, "rb") as f:
                text = f.read()
        except FileNotFoundError:
            text = None
        if text is not None:
            try:
                self.directory = self._parse(text, self._now(), check_validity=False)
            except dirformat.DirectoryError as exc:
                self.report("WARN", f"The cached directory {path} is no longer acceptable "
                            f"({exc}); run update-servers to download a new one.")
            else:
                self._remember(self.directory.descriptors)
                if self.downloaded is None:
                    self.downloaded = os.stat(path).st_mtime
        self.imported = self._read_imported()
        self._remember(self.imported)
        return self.directory

    def _ensure_loaded(self) -> None:
        if not self._loaded:
            self.load()

    def _read_cache(self) -> None:
        self.downloaded, self.source_url, self.validated = None, None, {}
        try:
            with open(self._path(CACHE_FILE), "rb") as f:
                data = json.load(f)
            if data.get("format") != CACHE_FORMAT:
                raise ValueError(f"unknown cache format {data.get('format')!r}")
            downloaded = data.get("downloaded")
            self.downloaded = float(downloaded) if downloaded is not None else None
            self.source_url = data.get("url")
            self.validated = {bytes.fromhex(k): int(v) for k, v in data["validated"].items()}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            # §8: the cache is rebuilt from dir and imported/ when unreadable
            self.report("INFO", f"Rebuilding the directory cache ({exc}).")
            self.downloaded, self.source_url, self.validated = None, None, {}

    def _write_cache(self) -> None:
        self._ensure_root()
        data = {
            "format": CACHE_FORMAT,
            "downloaded": self.downloaded,
            "url": self.source_url,
            "digest": self.directory.digest.hex() if self.directory is not None else None,
            "validated": {k.hex(): v for k, v in sorted(self.validated.items())},
        }
        atomic_write(self._path(CACHE_FILE), json.dumps(data, indent=1).encode("ascii"))

    def _read_imported(self) -> list[ServerDescriptor]:
        folder = self._path(IMPORTED_DIR)
        self._import_paths = {}
        try:
            names = sorted(os.listdir(folder))
        except FileNotFoundError:
            return []
        found: list[ServerDescriptor] = []
        for name in names:
            if name.startswith("."):
                continue
            path = os.path.join(folder, name)
            try:
                with open(path, "rb") as f:
                    d = parse_descriptor(f.read(), self._now(), check_validity=False,
                                         verified_digests=self.validated)
            except (OSError, DescriptorError) as exc:
                self.report("WARN", f"Ignoring imported descriptor {path}: {exc}. Delete it, "
                            "or import a good copy.")
                continue
            if d.digest not in self._import_paths:
                found.append(d)
            self._import_paths.setdefault(d.digest, path)
        return found

    def _save_directory(self, text: bytes, directory: Any, url: str, when: float) -> None:
        self._ensure_root()
        atomic_write(self._path(DIR_FILE), text, mode=0o644)
        try:
            os.unlink(self._path(DIR_FILE + ".gz"))  # a reference client's copy, now outdated
        except FileNotFoundError:
            pass
        self.directory, self.downloaded, self.source_url = directory, when, url
        self._remember(directory.descriptors)
        self._write_cache()

    # -- when to download (§8 step 1) ------------------------------------------------------

    def download_reason(self, now: float) -> Optional[str]:
        """Why a new directory is needed now, or None if the cached one will do."""
        self._ensure_loaded()
        if self.directory is None:
            return "no directory has been downloaded yet"
        midnight = previous_midnight(int(now))
        if self.downloaded is None or self.downloaded < midnight:
            when = format_time(int(self.downloaded)) if self.downloaded is not None else "never"
            return (f"the last download ({when}) was before the most recent midnight GMT "
                    f"({format_time(midnight)})")
        if now > self.directory.valid_until:
            return f"the cached directory expired at {format_date(self.directory.valid_until)}"
        return None

    def is_stale(self, now: float) -> bool:
        """Whether a command that needs the directory should download first."""
        return self.download_reason(now) is not None

    # -- downloading -------------------------------------------------------------------

    async def update(self, force: bool = False, agent: Optional[Any] = None) -> UpdateResult:
        """Download a new directory if one is needed (or ``force``).

        Authorities are tried in order; the first to give a directory that
        verifies wins and replaces the cached one atomically.  If none
        does, :class:`DirectoryUpdateError` says why for each of them; the
        previous directory stays in use.
        """
        self._ensure_loaded()
        now = self._now()
        reason = "forced by the user" if force else self.download_reason(now)
        if reason is None:
            return UpdateResult(False, "the cached directory was downloaded after the most "
                                "recent midnight GMT", self.directory, self.source_url)
        if not self.authorities:
            raise DirectoryUpdateError(
                "No directory authorities are configured, so no directory can be downloaded. "
                "Add [DirectoryServers] Authority: URL FINGERPRINT lines to your configuration.",
                kept=self.directory)
        self.report("INFO", f"Downloading a directory: {reason}.")
        failures: list[DownloadFailure] = []
        from mixminion.client import download

        pool = download.connection_pool(self.reactor)
        try:
            for url, _fingerprint in self.authorities:
                target = directory_url(url)
                try:
                    text, directory, skew = await self._attempt(
                        target, agent or download.agent_for(target, self.reactor, self.timeout,
                                                            self.environ, pool), now)
                except _Refused as refused:
                    # Said once, in the error or the warnings of the result.
                    self.report("DEBUG", f"Directory download refused: {refused.failure}")
                    failures.append(refused.failure)
                    continue
                self._save_directory(text, directory, target, now)
                self.clean(now)
                warnings = tuple(([skew] if skew else []) + [str(f) for f in failures])
                self.report("INFO", f"Directory from {target} verified and saved "
                            f"({len(directory.descriptors)} descriptors).")
                return UpdateResult(True, reason, directory, target, warnings)
        finally:
            await pool.closeCachedConnections()
        raise DirectoryUpdateError(self._failure_message(failures, now), failures,
                                   kept=self.directory)

    def _failure_message(self, failures: Sequence[DownloadFailure], now: float) -> str:
        if self.directory is not None:
            info = self.directory
            when = format_time(int(self.downloaded)) if self.downloaded else "earlier"
            state = "expired" if now > info.valid_until else "valid"
            kept = (f"Still using the directory downloaded {when}, {state} until "
                    f"{format_date(info.valid_until)}.")
        else:
            kept = ("There is no earlier directory to fall back on, so servers can only be "
                    "named by imported descriptors.")
        lines = [f"Could not update the directory: none of the {len(self.authorities)} "
                 f"configured authorities gave a valid one. {kept}"]
        lines += [f"  {f}" for f in failures]
        return "\n".join(lines)

    async def _attempt(self, url: str, agent: Any, now: float
                       ) -> Tuple[bytes, Any, Optional[str]]:
        """Fetch and verify from one URL; :class:`_Refused` says why not."""
        from mixminion.client import download

        try:
            answer = await download.fetch(url, agent, self.timeout, self.reactor,
                                          MAX_DIRECTORY_BYTES)
        except download.BodyTooLarge as exc:
            raise _Refused(DownloadFailure(url, f"the answer is too large ({exc}).",
                                           _DEFAULT_REJECTION_ADVICE)) from None
        except zlib.error as exc:
            raise _Refused(DownloadFailure(url, f"the answer is not valid gzip data ({exc}).",
                                           _DEFAULT_REJECTION_ADVICE)) from None
        except Exception as exc:  # anything the network can throw at us
            raise _Refused(DownloadFailure(url, download.describe_network_error(exc),
                                           _NETWORK_ADVICE)) from None
        if answer.code != 200:
            advice = ("Check the Authority URL in your configuration."
                      if answer.code == 404 else _NETWORK_ADVICE)
            raise _Refused(DownloadFailure(url, f"HTTP {answer.code} {answer.phrase}.", advice))
        body, date = answer.body, answer.date
        # Said once: in the result's warnings, or in the refusal's advice.
        skew = self._skew_warning(url, date, now)
        try:
            directory = self._parse(body, now, check_validity=True)
        except dirformat.DirectoryError as exc:
            advice = _rejection_advice(exc)
            if skew:
                advice += " (Note: " + skew + ")"
            raise _Refused(DownloadFailure(url, self._rejection(exc), advice)) from None
        current = self.directory
        if current is not None and directory.valid_after < current.valid_after:
            raise _Refused(DownloadFailure(
                url, f"it served a directory valid after {format_date(directory.valid_after)}, "
                f"older than the one already cached (valid after "
                f"{format_date(current.valid_after)}).",
                "That authority is behind, or someone is replaying an old directory; "
                "try again later."))
        return body, directory, skew

    def _rejection(self, exc: BaseException) -> str:
        """Why a directory was refused, leading with the count for signature
        failures ("signed by 1 of the 3 trusted authorities, 2 required")."""
        if isinstance(exc, dirformat.NotEnoughSignatures):
            what = ("altered after it was signed: " if isinstance(exc, dirformat.TamperedDirectory)
                    else "not enough signatures from trusted authorities: ")
            return (f"directory refused, {what}validly signed by {len(exc.valid)} of the "
                    f"{len(self.trusted)} trusted authorities, {self.threshold} required "
                    f"(details: {exc}).")
        if isinstance(exc, dirformat.DirectoryExpired):
            return f"directory refused, expired: {exc}."
        if isinstance(exc, dirformat.DirectoryNotYetValid):
            return f"directory refused, not yet valid: {exc}."
        return f"directory refused: {exc}."

    def _skew_warning(self, url: str, date: Optional[str], now: float) -> Optional[str]:
        """§8 step 5: warn when the server's clock and ours disagree by > 30 min."""
        if not date:
            return None
        try:
            import email.utils  # only after a download: sends do not pay for it

            theirs = email.utils.parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError, IndexError):
            return None
        skew = theirs - now
        if abs(skew) <= MAX_CLOCK_SKEW:
            return None
        direction = "ahead of" if skew > 0 else "behind"
        return (f"Clock skew: {url} says the time is {format_time(int(theirs))} GMT, "
                f"{abs(skew) / 60:.0f} minutes {direction} your clock "
                f"({format_time(int(now))} GMT). Check your clock: with a wrong clock, "
                "directories and descriptors look expired or not yet valid.")

    # -- cleaning (§10 item 4) ------------------------------------------------------------

    def clean(self, now: float) -> None:
        """Delete imported descriptors that have expired, and forget
        validated digests of expired descriptors."""
        self._ensure_loaded()
        expired = [d for d in self.imported if d.valid_until < now]
        for d in expired:
            path = self._import_paths.pop(d.digest, None)
            if path is not None:
                self.report("INFO", f"Removing expired imported descriptor {path}.")
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        self.imported = [d for d in self.imported if d.valid_until >= now]
        self.validated = {k: v for k, v in self.validated.items() if v >= now}
        self._remember(self.imported)
        if self.directory is not None:
            self._remember(self.directory.descriptors)
        if os.path.isdir(self.root):
            self._write_cache()

    # -- what the client uses ---------------------------------------------------------------

    def _directory_descriptors(self) -> list[ServerDescriptor]:
        return list(self.directory.descriptors) if self.directory is not None else []

    def all_descriptors(self) -> list[ServerDescriptor]:
        """Every known descriptor, directory first, expired ones too
        (``list-servers`` shows them all), without duplicates."""
        self._ensure_loaded()
        seen: set[bytes] = set()
        out: list[ServerDescriptor] = []
        for d in self._directory_descriptors() + self.imported:
            if d.digest not in seen:
                seen.add(d.digest)
                out.append(d)
        return out

    def servers(self, now: float) -> list[ServerDescriptor]:
        """Descriptors valid at ``now`` (directory and imported), by nickname."""
        return sorted((d for d in self.all_descriptors() if d.is_valid_at(now)),
                      key=lambda d: (d.nickname.lower(), d.valid_after, d.published))

    def recommended(self, now: float) -> list[ServerDescriptor]:
        """The directory's recommended servers valid at ``now``.

        Only the directory recommends: imported descriptors never are
        (the reference treated them as recommended; descriptors.md §10.3).
        """
        self._ensure_loaded()
        if self.directory is None:
            return []
        return sorted((d for d in self.directory.recommended_servers() if d.is_valid_at(now)),
                      key=lambda d: (d.nickname.lower(), d.valid_after, d.published))

    def is_recommended(self, nickname: str) -> bool:
        self._ensure_loaded()
        if self.directory is None:
            return False
        return self.directory.is_recommended(nickname)

    def reliability(self) -> Mapping[str, ServerReliability]:
        """What the directory measured of its servers, by identity
        fingerprint (doc/reliability.md §3-§4); empty without a directory
        or when it carries no ``[Reliability]`` section.  Imported
        descriptors are never measured here: only the directory speaks."""
        self._ensure_loaded()
        if self.directory is None:
            return {}
        return self.directory.reliability

    def lookup(self, nickname: str, now: float, interval: float = 0) -> ServerDescriptor:
        """The descriptor to use for ``nickname`` over ``[now, now + interval]``.

        Per §8: valid for the whole interval, supports packet version 0.3,
        latest ``Published``.  The directory's descriptors come first: an
        imported one is used only when the directory has no usable
        descriptor for that name, and never when its identity differs from
        the directory's (the directory is the better witness).  When an
        imported descriptor loses to the directory's, a warning says so.
        """
        self._ensure_loaded()
        key = nickname.lower()
        end = now + interval
        from_dir = [d for d in self._directory_descriptors() if d.nickname.lower() == key]
        imported = [d for d in self.imported if d.nickname.lower() == key]

        def usable(d: ServerDescriptor) -> bool:
            return d.is_valid_over(now, end) and d.supports_packet_version(PACKET_VERSION)

        best = max(filter(usable, from_dir), key=lambda d: d.published, default=None)
        if best is not None:
            newer = [d for d in imported if usable(d) and d.published > best.published]
            if newer:
                self.report("WARN", f"Using the directory's descriptor for {best.nickname} "
                            f"(published {format_time(best.published)}), not the newer "
                            "imported one (published "
                            f"{format_time(max(d.published for d in newer))}): imported "
                            "descriptors never replace the directory's.")
            return best
        identities = {d.identity for d in from_dir}
        conflicting = [d for d in imported if identities and d.identity not in identities]
        if conflicting:
            self.report("WARN", f"Ignoring {len(conflicting)} imported descriptor(s) for "
                        f"{nickname}: their identity key differs from the directory's.")
        candidates = [d for d in imported if usable(d) and d not in conflicting]
        chosen = max(candidates, key=lambda d: d.published, default=None)
        if chosen is not None:
            return chosen
        raise ServerNotFound(self._not_found(nickname, from_dir + imported, now, end))

    def _not_found(self, nickname: str, known: Sequence[ServerDescriptor], start: float,
                   end: float) -> str:
        if not known:
            where = "in the directory" if self.directory is not None else \
                "(no directory has been downloaded)"
            return (f"No server named {nickname!r} is known {where} or among imported "
                    "descriptors. Check the name with list-servers, or import its descriptor "
                    "with import-server.")
        if not any(d.supports_packet_version(PACKET_VERSION) for d in known):
            return (f"Server {nickname!r} does not support packet version {PACKET_VERSION}; "
                    "choose another server.")
        spans = ", ".join(f"{format_date(d.valid_after)}..{format_date(d.valid_until)}"
                          for d in sorted(known, key=lambda d: d.valid_after))
        return (f"Server {nickname!r} has no descriptor valid from {format_time(int(start))} "
                f"to {format_time(int(end))} GMT (known: {spans}). Run update-servers to fetch "
                "current descriptors, or choose another server.")

    # -- import-server (§8 import rules) ---------------------------------------------------

    def import_server(self, path_or_text: Union[str, bytes], now: float) -> ServerDescriptor:
        """Validate a descriptor and add it to ``imported/``.

        ``path_or_text``: descriptor text (str or bytes starting with a
        section header) or a file name.  Importing a descriptor that is
        already known does nothing and returns it.
        """
        self._ensure_loaded()
        source, text = self._import_text(path_or_text)
        try:
            d = parse_descriptor(text, now, check_validity=False,
                                 verified_digests=self.validated)
        except DescriptorError as exc:
            raise ImportRejected(f"{source}: not a valid server descriptor: {exc}. Ask the "
                                 "server's operator for an intact copy.") from None
        if d.valid_until < now:
            raise ImportRejected(
                f"{source}: the descriptor for {d.nickname} expired on "
                f"{format_date(d.valid_until)}. Ask the server's operator for a current one.")
        same_name = [s for s in self.all_descriptors() if s.nickname.lower() == d.nickname.lower()]
        if any(s.digest == d.digest for s in same_name):
            self.report("INFO", f"{source}: descriptor for {d.nickname} is already known.")
            return d
        impostor = next((s for s in same_name if s.identity != d.identity), None)
        if impostor is not None:
            origin = "in the directory" if impostor in self._directory_descriptors() else "imported"
            raise ImportRejected(
                f"{source}: a server named {d.nickname} with a different identity key "
                f"({impostor.fingerprint}, {origin}) is already known, but this descriptor has "
                f"{d.fingerprint}. Someone may be impersonating that server: not imported. "
                "Check the fingerprint with the server's operator.")
        if dirformat.is_superseded(d, same_name):
            raise ImportRejected(
                f"{source}: newer descriptors for {d.nickname} already cover its whole validity "
                f"({format_date(d.valid_after)}..{format_date(d.valid_until)}); nothing to import.")
        self._store_import(d)
        self.imported.append(d)
        self._remember([d])
        self._write_cache()
        return d

    @staticmethod
    def _import_text(path_or_text: Union[str, bytes]) -> Tuple[str, bytes]:
        if isinstance(path_or_text, bytes):
            return "descriptor", path_or_text
        if path_or_text.lstrip().startswith("["):
            return "descriptor", path_or_text.encode("latin-1")
        try:
            with open(path_or_text, "rb") as f:
                return path_or_text, f.read()
        except OSError as exc:
            raise ImportRejected(f"{path_or_text}: cannot read it ({exc.strerror}).") from None

    def _store_import(self, d: ServerDescriptor) -> None:
        """Write ``d`` under its §8 name without ever overwriting another file."""
        self._ensure_root()
        folder = self._path(IMPORTED_DIR)
        base = f"{d.nickname}-{time.strftime('%Y%m%d%H%M%S', time.localtime(d.published))}"
        fd, temp = tempfile.mkstemp(dir=folder, prefix=".import.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(d.text.encode("ascii"))
                f.flush()
                os.fsync(f.fileno())
            os.chmod(temp, 0o644)
            for n in range(0, 1000):
                name = base if n == 0 else f"{base}.{n}"
                try:
                    os.link(temp, os.path.join(folder, name))  # fails if the name is taken
                    self._import_paths[d.digest] = os.path.join(folder, name)
                    break
                except FileExistsError:
                    continue
            else:
                raise ImportRejected(f"too many imported descriptors named {base}.*")
        finally:
            os.unlink(temp)
        fsync_dir(folder)

    # -- version advice -------------------------------------------------------------------

    def version_advice(self, version: str = __version__, server: bool = False) -> Optional[str]:
        """A warning if ``version`` is not recommended by the directory."""
        self._ensure_loaded()
        if self.directory is None:
            return None
        listed = self.directory.server_versions if server else self.directory.client_versions
        return version_advice(listed, version)
