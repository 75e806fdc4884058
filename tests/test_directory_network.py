"""The directory system as real processes: three authorities, four mix
nodes, and a client (``ClientDirectory``) on loopback.

Phases, one test (each phase needs the state the previous one left):

1. Three authorities (``twistd mixminion-directory``, ``VoteInterval: 3
   seconds``) and four nodes (``twistd mixminion`` with ``Publish: yes``)
   start; every node must be in every authority's directory within a
   minute, and the client downloads and verifies it.
2. Key rotation of node4, forced the only way a real node allows in a test
   (``PublicKeyLifetime`` is at least a day): stop it, delete its keyset
   folders ``keys/key_NNNN`` but keep ``keys/identity.key``, start it again.
   The node then generates a new keyset (new packet key, same identity,
   later ``Published``) and publishes it; the authorities must supersede the
   old descriptor and serve the new one.
3. Authority 3 stops: authorities 1 and 2 still reach the threshold (2 of
   3) and publish new consensuses signed by the two of them, and a client
   whose first configured authority is the dead one still gets a valid
   directory (and is told what happened to the first one).
4. Authority 3 comes back doctored: the same authority code, started from a
   ``.tac`` file that overrides the authority's test hook
   ``consensus_contents`` to drop node1 from its consensus before signing,
   and that hands its own signature to every signature request.  Its digest
   differs from the honest authorities', so nobody co-signs it and the
   honest ones refuse its signature: it never publishes, and authorities 1
   and 2 keep publishing the honest directory without it.
5. A doctored directory *served* with a valid trusted signature: a fake
   authority (a ``twisted.web`` site in the test, holding authority 3's
   real key) serves authority 1's directory with node1 removed from the
   recommended list, carrying the genuine signatures of 1 and 2 plus a
   fresh, valid one by 3.  The client refuses it (the honest signatures do
   not cover the altered text: 1 of 3 valid, 2 required) and falls back to
   an honest authority.

About 40-60 s here; every process is killed in cleanup, and a failure
shows the tail of every log.
"""

from __future__ import annotations

#: about how many seconds it takes: scripts/test.sh starts the longest first
SLOW = 18

import glob
import os
import shutil
import socket
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional, TypeVar

from cryptography.hazmat.primitives import serialization
from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web import client as web_client
from twisted.web import resource, server

from mixminion.client.directory import ClientDirectory, DirectoryUpdateError
from mixminion.codec.rsa import PrivateKey
from mixminion.directory import directory as dirformat
from mixminion.directory.descriptor import parse_descriptor
from mixminion.testing.keys import key
from mixminion.testing.processes import (Daemon, MixNode, authority_config, free_ports, run_twistd,
                                         wait_until)

T = TypeVar("T")
reactor: Any = _reactor

VOTE_INTERVAL = 3
THRESHOLD = 2
NODES = ("node1", "node2", "node3", "node4")
START_TIMEOUT = 60.0  # the brief: every node in every directory within a minute
ROUND_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0


# --- the network -------------------------------------------------------------------------


@dataclass
class AuthorityProc:
    number: int
    port: int
    daemon: Daemon
    key: PrivateKey
    #: stopped on purpose: not a death to report
    stopped: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    @property
    def fingerprint(self) -> str:
        return self.key.public.fingerprint

    @property
    def directory(self) -> str:
        return self.daemon.directory

    @property
    def conf(self) -> str:
        return os.path.join(self.directory, "authority.conf")

    @property
    def log(self) -> str:
        return self.daemon.log


class NodeProc(MixNode):
    """A node that publishes to the authorities."""

    #: stopped on purpose: not a death to report
    stopped = False

    @property
    def key_dir(self) -> str:
        return os.path.join(self.base, "keys")

    def descriptors(self) -> list[Any]:
        """The node's current keysets' descriptors, from its own files."""
        found = []
        for path in sorted(glob.glob(os.path.join(self.key_dir, "key_*", "ServerDesc"))):
            with open(path, "rb") as f:
                found.append(parse_descriptor(f.read(), reactor.seconds(), check_validity=False))
        return found


def write_identity(path: str, key: PrivateKey) -> None:
    """Pre-create the authority's identity so its fingerprint is known for the
    peers' configurations (the service would otherwise make one on first start)."""
    pem = key.key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


DOCTORED_TAC = """\
# Written by tests/test_directory_network.py: the real authority service with
# its test hook (Authority.consensus_contents) dropping {victim} from the
# consensus before it signs, and answering every signature request with its
# own signature, whatever digest was asked for.
from twisted.application import service
from twisted.internet import reactor

from mixminion.directory.authconfig import load_authority_config
from mixminion.directory.tap import build_authority

authority_service = build_authority(load_authority_config({conf!r}), reactor)
authority = authority_service.authority
honest_merge = authority.consensus_contents


def doctored(votes, valid_after):
    info, descriptors = honest_merge(votes, valid_after)
    return info, [d for d in descriptors if d.nickname.lower() != {victim!r}]


authority.consensus_contents = doctored
authority.signature_for = lambda hexdigest: (
    authority.consensus.own_block if authority.consensus is not None else None)
application = service.Application("doctored-authority")
authority_service.setServiceParent(application)
"""


class FakeAuthority(resource.Resource):
    """Serves one fixed text as ``/directory``."""

    isLeaf = True

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text.encode("ascii")

    def render_GET(self, request: server.Request) -> bytes:  # noqa: N802
        request.setHeader(b"content-type", b"text/plain")
        return self.text


class DirectoryNetworkTests(unittest.TestCase):

    timeout = 240

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        ports = free_ports(3)
        self.authorities = [
            AuthorityProc(n + 1, ports[n], Daemon(os.path.join(self.dir, f"auth{n + 1}"), [],
                                                  name=f"auth{n + 1}"), key(f"authority {n + 1}"))
            for n in range(3)]
        self.nodes = [NodeProc(self, name) for name in NODES]
        self.pool = web_client.HTTPConnectionPool(reactor, persistent=False)
        self.agent = web_client.Agent(reactor, connectTimeout=5, pool=self.pool)
        self.addCleanup(self.stop_everything)

    async def stop_everything(self) -> None:
        """SIGTERM every process, SIGKILL after ``STOP_TIMEOUT``."""
        await defer.gatherResults([defer.ensureDeferred(p.daemon.stop(reactor, STOP_TIMEOUT,
                                                                      strict=False))
                                   for p in self.processes])
        await self.pool.closeCachedConnections()

    # -- configuration and start-up ---------------------------------------------------

    @property
    def trusted(self) -> list[str]:
        return [a.fingerprint for a in self.authorities]

    def write_authority(self, auth: AuthorityProc) -> None:
        os.makedirs(auth.directory, exist_ok=True)
        base = os.path.join(auth.directory, "base")
        with open(auth.conf, "w", encoding="ascii") as f:
            f.write(authority_config(base, f"Auth{auth.number}", auth.port,
                                     [(a.url, a.fingerprint) for a in self.authorities],
                                     THRESHOLD, VOTE_INTERVAL))
        os.makedirs(base, mode=0o700, exist_ok=True)
        write_identity(os.path.join(base, "identity.key"), auth.key)

    def start_authority(self, auth: AuthorityProc, tac: Optional[str] = None) -> None:
        auth.daemon.args = ["-y", tac] if tac else ["mixminion-directory", "-c", auth.conf]
        auth.daemon.start()

    def write_node(self, node: NodeProc) -> None:
        authorities = "".join(f"Authority: {a.url} {a.fingerprint}\n" for a in self.authorities)
        node.write(node.config(server="MinFreeDisk: 1 MB", log_level="WARN",
                               contact=f"{node.name}@localhost.localdomain",
                               extra=f"[DirectoryServers]\nPublish: yes\n{authorities}"))

    def start_node(self, node: NodeProc) -> None:
        node.daemon.start()

    # -- observing -------------------------------------------------------------------------

    @property
    def processes(self) -> list[Any]:
        """Every authority and node (they share ``daemon`` and ``stopped``)."""
        return [*self.authorities, *self.nodes]

    def report(self) -> str:
        return "\n".join(p.daemon.report() for p in self.processes
                         if p.daemon.process is not None)

    async def get(self, url: str) -> tuple[int, bytes]:
        d = self.agent.request(b"GET", url.encode("ascii"))
        d.addTimeout(5, reactor)
        response = await d
        return response.code, await web_client.readBody(response)

    async def directory_of(self, auth: AuthorityProc) -> Optional[dirformat.SignedDirectory]:
        """What the authority serves, verified like a client would; None if nothing valid."""
        try:
            code, body = await self.get(auth.url + "directory")
        except Exception:
            return None
        if code != 200:
            return None
        try:
            return dirformat.parse_directory(body, reactor.seconds(), trusted=self.trusted,
                                             threshold=THRESHOLD)
        except dirformat.DirectoryError:
            return None

    async def wait_for(self, what: str, check: Callable[[], Awaitable[T]], timeout: float,
                       interval: float = 0.5) -> T:
        """Poll ``check`` until it returns something true; fail with the logs after
        ``timeout``, or at once if a process that should run has died."""
        return await wait_until(
            reactor, what, check, timeout, interval,
            watch=[p.daemon for p in self.processes
                   if p.daemon.process is not None and not p.stopped],
            report=lambda _: self.report(), error=self.failureException)

    def client(self, root: str, authorities: list[tuple[str, str]]) -> ClientDirectory:
        trusted = {a.fingerprint: a.key.public for a in self.authorities}
        return ClientDirectory(os.path.join(self.dir, root), authorities, trusted, THRESHOLD,
                               environ={}, timeout=5)

    # -- the test --------------------------------------------------------------------------

    def test_network(self) -> defer.Deferred:
        d = defer.ensureDeferred(self._network())

        def add_logs(failure: Failure) -> Failure:
            if failure.check(unittest.FailTest) and "--- " in str(failure.value):
                return failure
            raise self.failureException(f"{failure.getErrorMessage()}\n{failure.getTraceback()}\n"
                                        + self.report())
        return d.addErrback(add_logs)

    async def _network(self) -> None:
        started = reactor.seconds()
        for auth in self.authorities:
            self.write_authority(auth)
            self.start_authority(auth)
        for node in self.nodes:
            self.write_node(node)
            self.start_node(node)

        # 1. every node in every authority's directory within a minute
        async def all_listed() -> Any:
            found = [await self.directory_of(a) for a in self.authorities]
            if all(d is not None and {x.nickname for x in d.descriptors} >= set(NODES) for d in found):
                return found  # type: ignore[return-value]
            return None
        directories = await self.wait_for("every node in every directory", all_listed, START_TIMEOUT)
        self.assertLess(reactor.seconds() - started, START_TIMEOUT)
        for d in directories:
            self.assertEqual({n.lower() for n in d.recommended_nicknames}, set(NODES))
        client = self.client("client", [(a.url, a.fingerprint) for a in self.authorities])
        result = await client.update()
        self.assertTrue(result.downloaded)
        self.assertEqual({d.nickname for d in client.recommended(reactor.seconds())}, set(NODES))
        for node in self.nodes:
            [own] = node.descriptors()
            self.assertEqual(client.lookup(node.name, reactor.seconds(), 3600), own)

        # 2. key rotation of node4: new keyset, same identity, supersedes the old one
        node4 = self.nodes[3]
        [old] = node4.descriptors()
        node4.stopped = True
        await node4.daemon.stop(reactor, STOP_TIMEOUT, strict=False)
        for keyset in glob.glob(os.path.join(node4.key_dir, "key_*")):
            shutil.rmtree(keyset)
        self.assertTrue(os.path.exists(os.path.join(node4.key_dir, "identity.key")))
        node4.stopped = False
        self.start_node(node4)

        async def new_keyset() -> Any:
            try:
                found = node4.descriptors()
            except (OSError, ValueError):
                return None
            return found[0] if found else None
        new = await self.wait_for("node4's new keyset", new_keyset, 30, 0.2)
        self.assertEqual(new.identity, old.identity)
        self.assertNotEqual(new.packet_key, old.packet_key)
        self.assertGreater(new.published, old.published)

        async def rotated() -> bool:
            found = [await self.directory_of(a) for a in self.authorities]
            return all(d is not None and new in d.descriptors and old not in d.descriptors
                       for d in found)
        await self.wait_for("node4's new descriptor in every directory", rotated, ROUND_TIMEOUT)
        result = await client.update(force=True)
        self.assertEqual(client.lookup("node4", reactor.seconds()), new)

        # 3. authority 3 down: 1 and 2 go on; a client trying 3 first still succeeds
        auth1, auth2, auth3 = self.authorities
        auth3.stopped = True
        await auth3.daemon.stop(reactor, STOP_TIMEOUT, strict=False)

        async def two_signers() -> Optional[dirformat.SignedDirectory]:
            d = await self.directory_of(auth1)
            ok = d is not None and set(d.signers) == {auth1.fingerprint, auth2.fingerprint}
            return d if ok else None
        honest: Any = await self.wait_for("a consensus signed by authorities 1 and 2 alone", two_signers,
                                     ROUND_TIMEOUT)
        self.assertGreaterEqual({d.nickname for d in honest.descriptors}, set(NODES))
        fallback = self.client("client-fallback", [(a.url, a.fingerprint)
                                                   for a in (auth3, auth1, auth2)])
        result = await fallback.update()
        self.assertEqual(result.url, auth1.url + "directory")
        self.assertEqual(len(result.warnings), 1)
        self.assertIn(auth3.url + "directory: could not connect", result.warnings[0])

        # 4. authority 3 returns doctored (drops node1): outvoted, never published
        os.unlink(os.path.join(auth3.directory, "base", "consensus"))  # serve only new work
        tac = os.path.join(auth3.directory, "doctored.tac")
        with open(tac, "w", encoding="ascii") as f:
            f.write(DOCTORED_TAC.format(victim="node1", conf=auth3.conf))
        auth3.stopped = False
        # judge only what is logged from now on
        starts = {a.number: os.path.getsize(a.log) for a in self.authorities}
        self.start_authority(auth3, tac)

        def logged(auth: AuthorityProc) -> str:
            with open(auth.log, encoding="utf-8", errors="replace") as f:
                f.seek(starts[auth.number])
                return f.read()

        async def outvoted() -> bool:
            refused = f"Signature from {auth3.fingerprint} refused: signature block by"
            return ("not published: 1 valid signature(s)" in logged(auth3)
                    and all(refused in logged(a) for a in (auth1, auth2)))
        await self.wait_for("the doctored authority to be outvoted", outvoted, ROUND_TIMEOUT)
        code, _ = await self.get(auth3.url + "directory")
        self.assertEqual(code, 503, "the doctored authority must have nothing to serve")
        for auth in (auth1, auth2):
            d = await self.directory_of(auth)
            assert d is not None
            self.assertIn("node1", {x.nickname for x in d.descriptors})
            self.assertNotIn(auth3.fingerprint, d.signers)

        # 5. a doctored directory served with a valid trusted signature is refused
        _, body = await self.get(auth1.url + "directory")
        genuine = body.decode("ascii")
        blocks, rest = genuine.split("[Directory-Info]\n", 1)
        altered_body = "[Directory-Info]\n" + rest.replace("node1, ", "", 1)
        self.assertNotEqual(altered_body, "[Directory-Info]\n" + rest)
        doctored = blocks + altered_body
        extra = dirformat.signature_block(altered_body, auth3.key, os.urandom)
        doctored = extra + doctored
        site = server.Site(FakeAuthority(doctored))
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        fake_url = f"http://127.0.0.1:{port.getHost().port}/"
        alone = self.client("client-fake", [(fake_url, auth3.fingerprint)])
        try:
            await alone.update()
        except DirectoryUpdateError as exc:
            message = str(exc)
        else:
            self.fail("the doctored directory was accepted")
        self.assertIn("altered after it was signed", message)
        self.assertIn("validly signed by 1 of the 3 trusted authorities, 2 required", message)
        both = self.client("client-fake-then-honest", [(fake_url, auth3.fingerprint),
                                                       (auth1.url, auth1.fingerprint)])
        result = await both.update()
        self.assertEqual(result.url, auth1.url + "directory")
        self.assertTrue(both.is_recommended("node1"))
        self.assertIn("altered after it was signed", result.warnings[0])

        # clean stop: every process answers SIGTERM
        for proc in self.processes:
            proc.stopped = True
        await self.stop_everything()


class AuthorityStartupTests(unittest.TestCase):
    def test_port_in_use(self) -> None:
        """An authority whose port is taken says so in one line and exits."""
        folder = os.path.abspath(self.mktemp())
        base = os.path.join(folder, "base")
        os.makedirs(base, mode=0o700)
        [port] = free_ports(1)
        authority = key("authority 1")
        fingerprint = authority.public.fingerprint
        conf = os.path.join(folder, "authority.conf")
        with open(conf, "w", encoding="ascii") as f:
            f.write(authority_config(base, "Auth1", port, [(f"http://127.0.0.1:{port}/", fingerprint)],
                                     1, VOTE_INTERVAL))
        write_identity(os.path.join(base, "identity.key"), authority)
        with socket.socket() as taken:
            taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            taken.bind(("127.0.0.1", port))
            taken.listen()
            done = run_twistd(["mixminion-directory", "-c", conf], cwd=folder)
        self.assertNotEqual(done.returncode, 0, done.stdout)
        self.assertNotIn("Traceback", done.stdout)
        [line] = [line for line in done.stdout.splitlines() if "mixminion-directory:" in line]
        self.assertIn(f"cannot listen on 127.0.0.1:{port}: Address already in use", line)
