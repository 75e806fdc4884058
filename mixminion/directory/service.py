"""A directory authority: the inbox, the voting rounds and the HTTP face.

descriptors.md §7.2 (votes, consensus), §7.3 (publication), §8 (download).

Rounds are aligned to the clock, so that authorities whose clocks agree
work in step without talking about it: every ``VoteInterval`` starting at a
multiple of it, each authority

1. at ``T``: builds and signs its vote from the descriptors it holds;
2. at ``T + I/3``: fetches the peers' votes, checks them (``accept_vote``),
   imports the valid descriptors it lacks (they count from the next round),
   computes the consensus and signs it;
3. at ``T + 2I/3``: fetches the peers' signatures *on its own consensus
   digest*, and publishes the consensus if at least ``threshold`` valid
   signatures are on it.

A peer that computed something else (a doctored vote, a fake descriptor)
has a different digest, so it has nothing to sign ours with: its signature
cannot be counted, and its own directory gathers too few to be served.

The reject list (``RejectFile``) acts through the vote alone: a rejected
server is left out of our vote and its descriptors are not imported, but
the consensus is the §7.2 merge of every accepted vote, and we sign it
even when enough other authorities voted for a server we reject (it is
logged).  A consensus of our own would have another digest and no
co-signers (doc/decisions-directory.md, "The reject list").

HTTP (``twisted.web``; paths under the authority's URL):

* ``POST /publish`` (form field ``desc``) -> ``text/plain``
  ``Status: 0|1`` + ``Message: ...`` (§7.3)
* ``POST /report``: a signed ``[Ping-Report]`` (doc/reliability.md §2) as
  the form field ``report`` or as the whole body of any other content
  type -> the same answer as ``/publish``
* ``GET /vote``, ``GET /directory``, ``GET /directory.gz``
* ``GET|POST /consensus-signature?digest=HEX`` -> our ``[Signed-Directory]``
  block, if our consensus has that digest
* ``GET /descriptors`` -> every descriptor we vote for, concatenated

The listener is an :class:`~mixminion.directory.httpserver.AuthoritySite`:
connection limits, a deadline per request, bodies capped in memory (413
beyond ``MaxDescriptorSize`` times the form overhead) and no client
addresses in the log above DEBUG.

Reliability (doc/reliability.md §2-§3): the latest report of each listed
pinger is kept (:class:`~mixminion.directory.authority.ReportStore`), and
each vote carries what they measured of the servers in it, grouped and
medianed by :func:`~mixminion.directory.reliability.vote_values` under the
``[Reliability]`` options.  The consensus takes the medians of the votes'
values (``compute_consensus``), so nothing else here knows about them.
"""

from __future__ import annotations

import abc
import gzip
import math
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.web import resource

from mixminion.codec.crypto import RandomSource
from mixminion.codec.rsa import PrivateKey
from mixminion.directory import directory as dirformat
from mixminion.directory.descriptor import ServerDescriptor
from mixminion.directory.directory import ConsensusError
from mixminion.directory.voting import accept_vote, compute_consensus
from mixminion.directory.authority import MAX_DESCRIPTOR_SIZE, AuthorityStore, ReportStore, atomic_write
from mixminion.directory.http import HTTPClient, join_url
from mixminion.directory.rejects import RejectList
from mixminion.directory.reliability import PingerInfo, ReliabilitySettings, vote_values
from mixminion.directory.httpserver import (
    LISTEN_BACKLOG,
    MAX_CONNECTIONS,
    MAX_CONNECTIONS_PER_ADDRESS,
    REQUEST_TIMEOUT,
    AuthoritySite,
    HTTPLimits,
)
from mixminion.codec.textformat import SECONDS_PER_DAY
from mixminion.listening import ListeningService

log = Logger()

CONSENSUS_FILE = "consensus"
DEFAULT_VOTE_INTERVAL = 300.0
#: the nodes' report interval an authority expects unless told ([Reliability] ReportInterval)
DEFAULT_REPORT_INTERVAL = 3600.0
#: [Reliability] MinPings and MinPingers unless told
DEFAULT_MIN_PINGS = 3
DEFAULT_MIN_PINGERS = 3
#: a form body may be somewhat larger than the descriptor it carries (URL encoding)
_FORM_OVERHEAD = 4


@dataclass(frozen=True)
class Peer:
    """One directory authority: base URL and identity fingerprint (40 hex)."""

    url: str
    fingerprint: str


@dataclass
class AuthoritySettings:
    """What ``authority.conf`` says, parsed (tests build it directly)."""

    base_dir: str
    nickname: str
    listen_ip: str = "127.0.0.1"
    port: int = 8080
    #: how peers reach us; used when our fingerprint is not in ``peers``
    public_url: Optional[str] = None
    identity_key_bits: int = 2048
    #: every authority of the network; our own entry may be included or not
    peers: tuple[Peer, ...] = ()
    #: signatures a consensus needs before we serve it; None = majority
    threshold: Optional[int] = None
    vote_interval: float = DEFAULT_VOTE_INTERVAL
    directory_lifetime: int = SECONDS_PER_DAY
    admission: str = "auto"
    vote_file: Optional[str] = None
    max_descriptor_size: int = MAX_DESCRIPTOR_SIZE
    client_versions: tuple[str, ...] = ()
    server_versions: tuple[str, ...] = ()
    #: simultaneous HTTP connections, in all and from one client address
    max_connections: int = MAX_CONNECTIONS
    max_connections_per_address: int = MAX_CONNECTIONS_PER_ADDRESS
    #: seconds for a whole HTTP request; also how long a keep-alive connection may idle
    request_timeout: float = REQUEST_TIMEOUT
    #: least severe message logged (client addresses appear only at DEBUG)
    log_level: str = "INFO"
    #: ``RejectFile`` (absolute) and the list read from it
    reject_file: Optional[str] = None
    rejects: RejectList = field(default_factory=RejectList)
    #: [Reliability]: pings a report needs through a server to count for it,
    #: and independent pingers a server needs to be measured
    min_pings: int = DEFAULT_MIN_PINGS
    min_pingers: int = DEFAULT_MIN_PINGERS
    #: the only pingers counted; None = every listed node
    pingers: Optional[frozenset[str]] = None
    #: how often nodes report; a report older than twice this is stale
    report_interval: float = DEFAULT_REPORT_INTERVAL
    #: the file these settings were read from; a SIGHUP reads it again
    config_file: Optional[str] = None

    @property
    def own_url(self) -> str:
        return self.public_url or f"http://{self.listen_ip}:{self.port}/"

    @property
    def reliability(self) -> ReliabilitySettings:
        return ReliabilitySettings(self.min_pings, self.min_pingers, self.pingers)

    @property
    def report_max_age(self) -> float:
        """Two report intervals (doc/reliability.md §2): one lost upload is
        forgiven, a pinger that stopped is not heard for long."""
        return 2 * self.report_interval

    @property
    def http_limits(self) -> HTTPLimits:
        return HTTPLimits(max_connections=self.max_connections,
                          max_connections_per_address=self.max_connections_per_address,
                          request_timeout=self.request_timeout,
                          max_body=self.max_descriptor_size * _FORM_OVERHEAD)


@dataclass
class Consensus:
    """Our consensus of one round, before and after collecting signatures."""

    round_start: float
    unsigned: str
    digest: bytes
    own_block: str
    signed: Optional[str] = None
    signers: tuple[str, ...] = ()


def midnight(t: float) -> int:
    whole = math.floor(t)
    return whole - whole % SECONDS_PER_DAY


class Authority:
    """The state of one authority and the three steps of a round.

    Network access goes through ``client`` (an :class:`HTTPClient`), time
    through ``clock``; nothing here listens.
    """

    def __init__(self, settings: AuthoritySettings, identity: PrivateKey, clock: IReactorTime,
                 client: HTTPClient, rng: RandomSource = os.urandom,
                 store: Optional[AuthorityStore] = None,
                 reports: Optional[ReportStore] = None) -> None:
        self.settings = settings
        self.identity = identity
        self.clock = clock
        self.client = client
        self.rng = rng
        self.fingerprint = identity.public.fingerprint
        self.store = store or AuthorityStore(
            settings.base_dir, clock.seconds(), admission=settings.admission,
            vote_file=settings.vote_file, max_size=settings.max_descriptor_size, log=_store_log,
            rejects=settings.rejects)
        self.reports = reports or ReportStore(
            settings.base_dir, clock.seconds(), max_size=settings.max_descriptor_size, log=_store_log)
        self.voters = self._voters()
        self.threshold = settings.threshold or (len(self.voters) // 2 + 1)
        self.vote_text: Optional[str] = None
        self.vote_round: Optional[float] = None
        self.consensus: Optional[Consensus] = None
        self.directory: Optional[str] = self._read_directory()

    def _voters(self) -> tuple[tuple[str, str], ...]:
        voters = {p.fingerprint.upper(): p.url for p in self.settings.peers}
        if self.fingerprint not in voters:
            voters[self.fingerprint] = self.settings.own_url
            log.warn("Our fingerprint {fp} is not among the configured peers; voting as {url}",
                     fp=self.fingerprint, url=self.settings.own_url)
        return tuple(sorted(voters.items()))

    @property
    def peers(self) -> list[tuple[str, str]]:
        """The other authorities, ``(fingerprint, url)``."""
        return [(fp, url) for fp, url in self.voters if fp != self.fingerprint]

    @property
    def voter_table(self) -> dict:
        """``accept_vote``'s voter map; keys unknown (None): fingerprints are checked."""
        return {fp: (None, url) for fp, url in self.voters}

    @property
    def trusted(self) -> frozenset[str]:
        return frozenset(fp for fp, _ in self.voters)

    def round_valid_after(self, round_start: float) -> int:
        return midnight(round_start)

    # --- step 1 -----------------------------------------------------------------------

    def make_vote(self, round_start: float) -> str:
        """Build and sign our vote from what we hold now."""
        now = self.clock.seconds()
        self.store.housekeeping(now)
        valid_after = self.round_valid_after(round_start)
        descriptors = self.store.descriptors(now)
        pingers = pinger_info(descriptors)
        self.reports.housekeeping(now, self.settings.report_max_age, pingers)
        reliability = vote_values(self.reports.latest(), pingers, {d.fingerprint for d in descriptors},
                                  self.settings.reliability)
        info = dirformat.DirectoryInfo(
            status="vote",
            valid_after=valid_after,
            valid_until=valid_after + self.settings.directory_lifetime,
            recommended_nicknames=tuple(sorted({d.nickname.lower() for d in descriptors})),
            voting_servers=tuple(dirformat.VotingServer(fp, url) for fp, url in self.voters),
            client_versions=self.settings.client_versions,
            server_versions=self.settings.server_versions,
            reliability=reliability,
        )
        unsigned = dirformat.build_directory(info, descriptors)
        self.vote_text = dirformat.sign_directory(unsigned, self.identity, self.rng)
        self.vote_round = round_start
        log.info("Built our vote for round {round}: {n} descriptors, {m} measured from {r} reports",
                 round=round_start, n=len(descriptors), m=len(reliability), r=len(self.reports.latest()))
        return self.vote_text

    def accept_report(self, text: str | bytes, now: float) -> tuple[bool, str]:
        """One uploaded ping report: kept if it verifies, is fresh and its
        pinger is a node we list (our vote's descriptors)."""
        listed = {d.fingerprint for d in self.store.descriptors(now)}
        return self.reports.accept(text, now, self.settings.report_max_age, listed.__contains__)

    # --- step 2 ----------------------------------------------------------------------

    @defer.inlineCallbacks
    def collect_votes(self, round_start: float):
        """Fetch and check the peers' votes, import their descriptors, compute
        and sign the consensus.  Fires with the :class:`Consensus` or None."""
        own = self.vote_text
        if self.vote_round != round_start or own is None:
            own = self.make_vote(round_start)
        valid_after = self.round_valid_after(round_start)
        texts = yield self._fetch_all("vote")
        now = self.clock.seconds()
        votes = [self._accept_vote(self.fingerprint, own, valid_after, now)]
        for fp, text in texts.items():
            vote = self._accept_vote(fp, text, valid_after, now)
            if vote is not None:
                votes.append(vote)
                self._import(fp, vote, now)
        votes = [v for v in votes if v is not None]
        try:
            info, descriptors = self.consensus_contents(votes, valid_after)
        except ConsensusError as exc:
            log.warn("No consensus in round {round}: {why}", round=round_start, why=str(exc))
            self.consensus = None
            return None
        unsigned = dirformat.build_directory(info, descriptors)
        own = dirformat.signature_block(unsigned, self.identity, self.rng)
        digest = dirformat.parse_signature_block(own).digest
        self.consensus = Consensus(round_start, unsigned, digest, own)
        log.info("Consensus of round {round} from {n} votes: {d} descriptors, digest {digest}",
                 round=round_start, n=len(votes), d=len(descriptors), digest=digest.hex().upper())
        self._note_outvoted(descriptors)
        return self.consensus

    def _note_outvoted(self, descriptors: Sequence[ServerDescriptor]) -> None:
        """Say when the consensus carries servers our reject list keeps out of
        our vote: the other authorities outvoted us, and we sign it anyway
        (doc/decisions-directory.md, "The reject list")."""
        rejected = sorted({d.nickname for d in descriptors if self.store.rejects.match(d)})
        if rejected:
            log.info("The consensus lists {n} server(s) on our reject list, voted for by "
                     "enough other authorities: {names}", n=len(rejected), names=", ".join(rejected))

    def consensus_contents(self, votes: Sequence[dirformat.SignedDirectory], valid_after: int):
        """The §7.2 merge; a method so tests can make a misbehaving authority."""
        return compute_consensus(votes, self.voter_table, valid_after)

    def _accept_vote(self, fp: str, text: str, valid_after: int, now: float):
        try:
            vote = accept_vote(text, self.voter_table, valid_after, now)
        except dirformat.DirectoryError as exc:
            log.warn("Vote from {fp} refused: {why}", fp=fp, why=str(exc))
            return None
        return vote

    def _import(self, fp: str, vote, now: float) -> None:
        """Authorities exchange what they have: take the peer's descriptors we lack."""
        for descriptor in vote.descriptors:
            if self.store.has(descriptor.digest):
                continue
            entry = self.store.rejects.match(descriptor)
            if entry is not None:  # every round, from every peer that has it: not worth an INFO line
                log.debug("Descriptor {nick} from authority {fp} not imported: reject list {entry}",
                          nick=descriptor.nickname, fp=fp, entry=str(entry))
                continue
            accepted, message = self.store.accept_upload(descriptor.text, now, source=f"authority {fp}")
            level = log.info if accepted else log.warn
            level("Descriptor {nick} from authority {fp}: {message}",
                  nick=descriptor.nickname, fp=fp, message=message)

    # --- step 3 ------------------------------------------------------------------------

    @defer.inlineCallbacks
    def collect_signatures(self, round_start: float):
        """Gather the peers' signatures on our consensus; publish it if enough."""
        consensus = self.consensus
        if consensus is None or consensus.round_start != round_start:
            log.warn("No consensus to collect signatures for in round {round}", round=round_start)
            return None
        hexdigest = consensus.digest.hex().upper()
        blocks = yield self._fetch_all(f"consensus-signature?digest={hexdigest}")
        now = self.clock.seconds()
        good = [consensus.own_block]
        for fp, block in sorted(blocks.items()):
            if self._signature_ok(consensus.unsigned, fp, block):
                good.append(block)
        text = dirformat.add_signature_blocks(consensus.unsigned, good)
        try:
            parsed = dirformat.parse_directory(text, now, trusted=self.trusted,
                                               threshold=self.threshold, check_validity=False)
        except dirformat.DirectoryError as exc:
            log.warn("Consensus {digest} not published: {why}", digest=hexdigest, why=str(exc))
            return None
        consensus.signed, consensus.signers = text, parsed.signers
        self.directory = text
        atomic_write(os.path.join(self.settings.base_dir, CONSENSUS_FILE), text.encode("ascii"))
        log.info("Published consensus {digest} with {n} signatures", digest=hexdigest, n=len(good))
        return consensus

    def _signature_ok(self, unsigned: str, fp: str, block: str) -> bool:
        """The block is ``fp``'s valid signature on exactly our digest."""
        try:
            signer = dirformat.parse_signature_block(block).fingerprint
            dirformat.add_signature_blocks(unsigned, [block])  # refuses other digests, bad signatures
        except (dirformat.DirectoryError, ValueError) as exc:
            log.warn("Signature from {fp} refused: {why}", fp=fp, why=str(exc))
            return False
        if signer != fp:
            log.warn("Authority {fp} answered with a signature by {other}", fp=fp, other=signer)
            return False
        return True

    def signature_for(self, hexdigest: str) -> Optional[str]:
        """Our signature block, if our current consensus has this digest."""
        consensus = self.consensus
        if consensus is None or consensus.digest.hex().upper() != hexdigest.strip().upper():
            return None
        return consensus.own_block

    # --- fetching ----------------------------------------------------------------------

    @defer.inlineCallbacks
    def _fetch_all(self, path: str):
        """GET ``path`` from every peer at once; ``{fingerprint: text}`` of the answers."""
        peers = self.peers
        results = yield defer.DeferredList(
            [self.client.get(join_url(url, path)) for _, url in peers], consumeErrors=True)
        texts: dict[str, str] = {}
        for (fp, url), (ok, result) in zip(peers, results):
            if not ok:
                log.warn("Authority {fp} at {url}: {path} failed: {why}",
                         fp=fp, url=url, path=path.split("?")[0], why=result.getErrorMessage())
            elif result.code != 200:
                log.warn("Authority {fp} at {url}: {path} answered HTTP {code}",
                         fp=fp, url=url, path=path.split("?")[0], code=result.code)
            else:
                try:
                    texts[fp] = result.body.decode("ascii")
                except UnicodeDecodeError:
                    log.warn("Authority {fp}: {path} answer is not ASCII", fp=fp, path=path)
        return texts

    def _read_directory(self) -> Optional[str]:
        try:
            with open(os.path.join(self.settings.base_dir, CONSENSUS_FILE), encoding="ascii") as f:
                return f.read()
        except (FileNotFoundError, UnicodeDecodeError):
            return None


def pinger_info(descriptors: Iterable[ServerDescriptor]) -> dict[str, PingerInfo]:
    """Network and operator of each listed node, from its latest descriptor
    (a node's current and next keysets may be published apart)."""
    ordered = sorted(descriptors, key=lambda d: (d.published, d.digest))
    return {d.fingerprint: PingerInfo.of(d) for d in ordered}


def _store_log(level: str, message: str) -> None:
    # not "message": the legacy log bridge sets that key, and observers after it see "()"
    {"warn": log.warn, "info": log.info}.get(level, log.debug)("Store: {line}", line=message)


# --- HTTP -----------------------------------------------------------------------------------


def publish_answer(accepted: bool, message: str) -> bytes:
    """The §7.3 response body: ``Status: 0|1`` LF ``Message: text`` LF."""
    return f"Status: {1 if accepted else 0}\nMessage: {_one_line(message)}\n".encode("ascii", "replace")


def _one_line(message: str) -> str:
    return re.sub(r"\s+", " ", message).strip()


def _plain(request, body: bytes, code: int = 200, content_type: bytes = b"text/plain") -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", content_type)
    return body


def _body_size(request) -> int:
    """Bytes in the request body (twisted.web keeps it in a file object)."""
    content = getattr(request, "content", None)
    if content is None:
        return 0
    position = content.tell()
    content.seek(0, os.SEEK_END)
    size = content.tell()
    content.seek(position)
    return size


_FORM_TYPES = (b"application/x-www-form-urlencoded", b"multipart/form-data")


class UploadResource(resource.Resource, metaclass=abc.ABCMeta):
    """A POST of one signed document, answered ``Status``/``Message`` (§7.3)
    and logged in one line at INFO whatever the client sent; the client's
    address only at DEBUG."""

    isLeaf = True
    #: the log's name for the upload
    what = "Upload"

    def __init__(self, authority: Authority) -> None:
        super().__init__()
        self.authority = authority

    @property
    @abc.abstractmethod
    def max_size(self) -> int:
        """The largest document; a body over :data:`_FORM_OVERHEAD` times it is refused unread."""

    @abc.abstractmethod
    def accept(self, request) -> tuple[bool, str]:
        """``(accepted, message)`` for a body already known not to be too large."""

    def render_POST(self, request) -> bytes:  # noqa: N802
        body_size = _body_size(request)
        if body_size > self.max_size * _FORM_OVERHEAD:
            accepted, message = False, f"Upload of {body_size} bytes is too large."
        else:
            accepted, message = self.accept(request)
        peer = request.getClientAddress()
        log.debug("{what} from {peer}", what=self.what, peer=getattr(peer, "host", "?"))
        log.info("{what}: status {status}: {answer}", what=self.what, status=int(accepted),
                 answer=_one_line(message))
        return _plain(request, publish_answer(accepted, message))


class PublishResource(UploadResource):
    """``POST /publish``: a descriptor in the form field ``desc`` (§7.3)."""

    what = "Publish"

    @property
    def max_size(self) -> int:
        return self.authority.store.max_size

    def accept(self, request) -> tuple[bool, str]:
        values = request.args.get(b"desc") or []
        if len(values) != 1:
            return False, "Expected exactly one form field 'desc' with the descriptor."
        return self.authority.store.accept_upload(values[0], self.authority.clock.seconds())


class ReportResource(UploadResource):
    """``POST /report``: a ping report (doc/reliability.md §2), in the form
    field ``report`` as a descriptor is in ``desc``, or as the whole body
    of any other content type."""

    what = "Report"

    @property
    def max_size(self) -> int:
        return self.authority.reports.max_size

    def accept(self, request) -> tuple[bool, str]:
        content_type = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        if content_type in _FORM_TYPES:
            values = request.args.get(b"report") or []
            if len(values) != 1:
                return False, "Expected exactly one form field 'report' with the report."
            text = values[0]
        else:
            text, content = b"", getattr(request, "content", None)
            if content is not None:
                content.seek(0)
                text = content.read()
        return self.authority.accept_report(text, self.authority.clock.seconds())


class TextResource(resource.Resource):
    """A document produced on demand; 503 while there is none yet."""

    isLeaf = True

    def __init__(self, produce: Callable[[], Optional[str]], compress: bool = False) -> None:
        super().__init__()
        self.produce = produce
        self.compress = compress

    def render_GET(self, request) -> bytes:  # noqa: N802
        text = self.produce()
        if text is None:
            return _plain(request, b"Not available yet.\n", 503)
        data = text.encode("ascii")
        if self.compress:
            return _plain(request, gzip.compress(data, mtime=0), content_type=b"application/gzip")
        return _plain(request, data)


class SignatureResource(resource.Resource):
    isLeaf = True

    def __init__(self, authority: Authority) -> None:
        super().__init__()
        self.authority = authority

    def render_GET(self, request) -> bytes:  # noqa: N802
        values = request.args.get(b"digest") or [b""]
        hexdigest = values[0].decode("ascii", "replace")
        block = self.authority.signature_for(hexdigest)
        if block is None:
            return _plain(request, b"No consensus with that digest here.\n", 404)
        return _plain(request, block.encode("ascii"))

    render_POST = render_GET  # noqa: N815


def authority_root(authority: Authority) -> resource.Resource:
    root = resource.Resource()
    root.putChild(b"publish", PublishResource(authority))
    root.putChild(b"report", ReportResource(authority))
    root.putChild(b"vote", TextResource(lambda: authority.vote_text))
    root.putChild(b"directory", TextResource(lambda: authority.directory))
    root.putChild(b"directory.gz", TextResource(lambda: authority.directory, compress=True))
    root.putChild(b"consensus-signature", SignatureResource(authority))
    root.putChild(b"descriptors", TextResource(
        lambda: "".join(d.text for d in authority.store.descriptors(authority.clock.seconds()))))
    return root


# --- the service ----------------------------------------------------------------------------


class RoundScheduler(service.Service):
    """Runs the three steps at ``T``, ``T + I/3``, ``T + 2I/3`` of every round."""

    def __init__(self, authority: Authority, interval: float, clock: IReactorTime) -> None:
        self.authority, self.interval, self.clock = authority, interval, clock
        self._call: Optional[IDelayedCall] = None
        #: the Deferred of the step running now (tests wait on it)
        self.busy: defer.Deferred = defer.succeed(None)

    def startService(self) -> None:  # noqa: N802
        super().startService()
        self._schedule()

    def stopService(self):  # noqa: N802
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        return self.busy

    def _schedule(self) -> None:
        third = self.interval / 3
        k = math.floor(self.clock.seconds() / third + 1e-9) + 1
        self._call = self.clock.callLater(max(0.0, k * third - self.clock.seconds()), self._step, k)

    def _step(self, k: int) -> None:
        step, round_start = k % 3, (k // 3) * self.interval
        actions = (self.authority.make_vote, self.authority.collect_votes,
                   self.authority.collect_signatures)
        d = defer.maybeDeferred(actions[step], round_start)
        d.addErrback(lambda f: log.failure("Round step {step} failed", f, step=step))
        self.busy = d
        self._schedule()


class AuthorityService(service.MultiService):
    """An authority with its HTTP listener and its voting rounds."""

    def __init__(self, authority: Authority, reactor, clock: Optional[IReactorTime] = None,
                 listen: bool = True) -> None:
        super().__init__()
        self.authority = authority
        self.site = AuthoritySite(authority_root(authority), authority.settings.http_limits,
                                  reactor=clock or reactor)
        self.rounds = RoundScheduler(authority, authority.settings.vote_interval, clock or reactor)
        self.rounds.setServiceParent(self)
        if listen:
            settings = authority.settings
            endpoint = TCP4ServerEndpoint(reactor, settings.port, backlog=LISTEN_BACKLOG,
                                          interface=settings.listen_ip)
            ListeningService(endpoint, self.site, "mixminion-directory").setServiceParent(self)

    def stopService(self):  # noqa: N802
        d = defer.maybeDeferred(super().stopService)
        d.addBoth(lambda _: self.authority.client.close())
        return d
