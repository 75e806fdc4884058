"""The client's directory: download over real loopback HTTP, verification
against pinned authorities, the on-disk cache, import-server and lookup.

Time is a ``task.Clock`` (validity, staleness, Date headers); the network
is the real reactor on 127.0.0.1: authorities are ``twisted.web`` sites
serving directories built and signed here, and the proxy test runs a real
forward proxy (``twisted.web.proxy``).
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import socket
from typing import Any, Optional, Sequence

from twisted.internet import defer, task
from twisted.internet import reactor as _reactor
from twisted.protocols.policies import WrappingFactory
from twisted.trial import unittest
from twisted.web import http, proxy, resource, server

from mixminion.client.directory import (
    ClientDirectoryError,
    CACHE_FILE,
    DIR_FILE,
    IMPORTED_DIR,
    ClientDirectory,
    DirectoryUpdateError,
    ImportRejected,
    ServerNotFound,
    directory_url,
    proxy_for,
    version_advice,
)
from mixminion.directory.descriptor import (
    DescriptorFields,
    IncomingMMTP,
    OutgoingMMTP,
    ServerDescriptor,
    build_descriptor,
    parse_descriptor,
)
from mixminion.directory.directory import DirectoryInfo, VotingServer, build_directory, sign_directory
from mixminion.testing.keys import key

reactor: Any = _reactor

DAY = 86400
TODAY = 1705276800  # 2024-01-15 00:00:00 GMT
NOW = TODAY + 12 * 3600  # noon
AUTHS = ("auth1", "auth2", "auth3")


def fingerprint(name: str) -> str:
    return key(name).public.fingerprint


@functools.cache
def descriptor(nickname: str, identity: Optional[str] = None, published: int = NOW - 3600,
               valid_after: int = TODAY, valid_until: int = TODAY + 30 * DAY,
               packet_versions: tuple[str, ...] = ("0.3",)) -> ServerDescriptor:
    fields = DescriptorFields(
        nickname=nickname,
        contact=f"{nickname.lower()}@example.org",
        packet_key=key("packet").public,
        published=published,
        valid_after=valid_after,
        valid_until=valid_until,
        incoming=IncomingMMTP(hostname=f"{nickname.lower()}.example.org"),
        outgoing=OutgoingMMTP(),
        packet_versions=packet_versions,
    )
    return signed_descriptor(fields, identity or nickname)


def signed_descriptor(fields: DescriptorFields, identity: str) -> ServerDescriptor:
    """``fields`` signed by ``key(identity)``, read back at their publication time."""
    text = build_descriptor(fields, key(identity), os.urandom)
    return parse_descriptor(text, fields.published, check_validity=False)


def standard_servers() -> list[ServerDescriptor]:
    return [descriptor("Alpha"), descriptor("Beta")]


def make_directory(descriptors: Sequence[ServerDescriptor], signers: Sequence[str] = AUTHS,
                   valid_after: int = TODAY, valid_until: int = TODAY + DAY,
                   recommended: Optional[Sequence[str]] = None,
                   client_versions: Sequence[str] = (), voters: Sequence[str] = AUTHS) -> str:
    """A consensus of ``descriptors`` listing ``voters``, signed by each of ``signers``."""
    info = DirectoryInfo(
        status="consensus",
        valid_after=valid_after,
        valid_until=valid_until,
        recommended_nicknames=tuple(recommended if recommended is not None
                                    else (d.nickname for d in descriptors)),
        voting_servers=tuple(VotingServer(fingerprint(a), f"http://{a}.example.org/") for a in voters),
        client_versions=tuple(client_versions),
    )
    text = build_directory(info, descriptors)
    for signer in signers:
        text = sign_directory(text, key(signer), os.urandom)
    return text


# --- loopback HTTP -----------------------------------------------------------------------


class DirectoryResource(resource.Resource):
    """An authority's ``/directory`` (and ``/directory.gz``): serves ``body``,
    stamps ``Date`` from the test clock plus ``skew``, records requests."""

    isLeaf = True

    def __init__(self, clock: task.Clock) -> None:
        super().__init__()
        self.clock = clock
        self.body: Optional[bytes] = None
        self.skew = 0.0
        self.hang = False
        self.requests: list[tuple[bytes, bytes, dict[bytes, Any]]] = []
        self.pending: list[server.Request] = []

    def render_GET(self, request: server.Request) -> Any:  # noqa: N802
        headers = dict(request.requestHeaders.getAllRawHeaders())
        self.requests.append((request.uri, request.path, headers))
        request.setHeader(b"date", http.datetimeToString(int(self.clock.seconds() + self.skew)))
        if self.hang:
            self.pending.append(request)
            return server.NOT_DONE_YET
        if self.body is None or not request.path.rstrip(b"/").endswith((b"/directory", b"/directory.gz")):
            request.setResponseCode(404)
            return b"Not here.\n"
        request.setHeader(b"content-type", b"text/plain")
        if request.path.endswith(b".gz"):
            return gzip.compress(self.body)
        return self.body


class RecordingProxyRequest(proxy.ProxyRequest):
    def process(self) -> None:
        self.channel.factory.seen.append(self.uri)  # type: ignore[attr-defined]
        super().process()


class RecordingProxy(proxy.Proxy):
    requestFactory = RecordingProxyRequest  # noqa: N815


class ProxyFactory(http.HTTPFactory):
    """A real forward proxy that remembers the absolute URIs it was asked for."""

    protocol = RecordingProxy  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bytes] = []


def closed_port() -> int:
    """A loopback port with nothing listening (bound, then released)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class LoopbackCase(unittest.TestCase):
    """Three authority sites on loopback and a client pinned to their keys."""

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.clock.advance(NOW)
        self.root = os.path.abspath(self.mktemp())
        self.resources = [DirectoryResource(self.clock) for _ in AUTHS]
        self.urls = [self.listen(server.Site(r)) for r in self.resources]

    def listen(self, factory: Any) -> str:
        wrapper = WrappingFactory(factory)
        port = reactor.listenTCP(0, wrapper, interface="127.0.0.1")
        self.addCleanup(self.close_all, port, wrapper)
        return f"http://127.0.0.1:{port.getHost().port}/"

    async def close_all(self, port: Any, wrapper: WrappingFactory) -> None:
        """Stop listening and wait until every connection is gone (clean reactor)."""
        await port.stopListening()
        for r in self.resources:
            for request in r.pending:
                if not request.finished and not request._disconnected:
                    request.finish()
            r.pending.clear()
        for _ in range(200):
            if not wrapper.protocols:
                return
            for p in list(wrapper.protocols):
                p.transport.loseConnection()
            await task.deferLater(reactor, 0.01, lambda: None)

    def client(self, urls: Optional[Sequence[str]] = None, threshold: int = 2,
               environ: Optional[dict[str, str]] = None, timeout: float = 5.0) -> ClientDirectory:
        urls = self.urls if urls is None else urls
        return ClientDirectory(self.root, [(u, fingerprint(a)) for u, a in zip(urls, AUTHS)],
                               None, threshold, self.clock, environ=environ or {}, timeout=timeout)

    def serve(self, text: str, which: Sequence[int] = (0, 1, 2)) -> None:
        for i in which:
            self.resources[i].body = text.encode("ascii")

    async def refused(self, client: ClientDirectory, **kwargs: Any) -> DirectoryUpdateError:
        try:
            await client.update(force=True, **kwargs)
        except DirectoryUpdateError as exc:
            return exc
        raise self.failureException("the update should have been refused")


def as_deferred(f: Any) -> Any:
    """Run an ``async def`` test method under trial."""
    @functools.wraps(f)
    def run(self: Any) -> defer.Deferred:
        return defer.ensureDeferred(f(self))
    return run


# --- downloading -------------------------------------------------------------------------


class DownloadTests(LoopbackCase):

    @as_deferred
    async def test_download_verify_and_cache(self) -> None:
        text = make_directory(standard_servers(), client_versions=["0.0.1"])
        self.serve(text)
        client = self.client()
        self.assertTrue(client.is_stale(NOW))
        result = await client.update()
        self.assertTrue(result.downloaded)
        self.assertEqual(result.url, self.urls[0] + "directory")
        self.assertEqual(result.reason, "no directory has been downloaded yet")
        self.assertEqual(len(result.directory.signers), 3)
        self.assertEqual([d.nickname for d in client.servers(NOW)], ["Alpha", "Beta"])
        self.assertEqual([d.nickname for d in client.recommended(NOW)], ["Alpha", "Beta"])
        # request headers (§8 step 3); only the first authority was asked
        uri, _, headers = self.resources[0].requests[0]
        self.assertEqual(uri, b"/directory")
        self.assertEqual(headers[b"Pragma"], [b"no-cache"])
        self.assertEqual(headers[b"Cache-Control"], [b"no-cache"])
        self.assertEqual(self.resources[1].requests, [])
        # on disk: the text and a JSON cache with the validated digests
        with open(os.path.join(self.root, DIR_FILE), "rb") as f:
            self.assertEqual(f.read(), text.encode("ascii"))
        with open(os.path.join(self.root, CACHE_FILE)) as f:
            cache = json.load(f)
        self.assertEqual(cache["downloaded"], NOW)
        self.assertEqual(cache["digest"], result.directory.digest.hex())
        self.assertIn(descriptor("Alpha").digest.hex(), cache["validated"])
        self.assertFalse([n for n in os.listdir(self.root) if n.startswith(".")], "temp files left")
        # fresh: no second download the same day
        again = await client.update()
        self.assertFalse(again.downloaded)
        self.assertEqual(len(self.resources[0].requests), 1)
        # a new client on the same root reads the cache
        other = self.client()
        loaded = other.load()
        assert loaded is not None
        self.assertEqual(loaded.digest, result.directory.digest)
        self.assertEqual(other.downloaded, NOW)
        self.assertFalse(other.is_stale(NOW))
        self.assertIn("newer than any recommended", other.version_advice("0.1.0"))
        self.assertIn("may be obsolete", other.version_advice("0.0.1alpha1"))
        self.assertIsNone(other.version_advice("0.0.1"))

    @as_deferred
    async def test_under_signed_refused_and_cache_kept(self) -> None:
        good = make_directory(standard_servers())
        self.serve(good)
        client = self.client()
        first = await client.update()
        self.serve(make_directory([descriptor("Alpha")], signers=["auth1"]))
        error = await self.refused(client)
        message = str(error)
        self.assertIn("validly signed by 1 of the 3 trusted authorities, 2 required", message)
        self.assertIn(self.urls[0] + "directory", message)
        self.assertIn("check the Authority fingerprints", message)
        self.assertIn("Still using the directory downloaded 2024-01-15 12:00:00", message)
        self.assertEqual(len(error.failures), 3)
        self.assertIs(error.kept, first.directory)
        # still in use, in memory and on disk
        self.assertIs(client.directory, first.directory)
        with open(os.path.join(self.root, DIR_FILE), "rb") as f:
            self.assertEqual(f.read(), good.encode("ascii"))
        reloaded = self.client().load()
        assert reloaded is not None
        self.assertEqual(reloaded.digest, first.directory.digest)
        self.assertEqual([d.nickname for d in client.servers(NOW)], ["Alpha", "Beta"])

    @as_deferred
    async def test_wrong_keys_refused(self) -> None:
        self.serve(make_directory(standard_servers(), signers=["rogue1", "rogue2", "rogue3"]))
        error = await self.refused(self.client())
        self.assertIn("validly signed by 0 of the 3 trusted authorities", str(error))
        self.assertIn("There is no earlier directory to fall back on", str(error))
        self.assertFalse(os.path.exists(os.path.join(self.root, DIR_FILE)))

    @as_deferred
    async def test_expired_and_not_yet_valid_refused(self) -> None:
        self.serve(make_directory(standard_servers(), valid_after=TODAY - 2 * DAY,
                                  valid_until=TODAY - DAY))
        error = await self.refused(self.client())
        self.assertIn("expired", str(error))
        self.assertIn("check your clock", str(error))
        self.serve(make_directory(standard_servers(), valid_after=TODAY + DAY,
                                  valid_until=TODAY + 2 * DAY))
        error = await self.refused(self.client())
        self.assertIn("not yet valid", str(error))

    @as_deferred
    async def test_tampered_refused(self) -> None:
        text = make_directory(standard_servers())
        doctored = text.replace("Recommended-Servers: alpha, beta", "Recommended-Servers: alpha")
        self.assertNotEqual(doctored, text)
        self.serve(doctored)
        error = await self.refused(self.client())
        self.assertIn("altered after it was signed", str(error))
        self.assertIn("validly signed by 0 of the 3", str(error))

    @as_deferred
    async def test_newline_mangled_but_valid_accepted(self) -> None:
        text = make_directory(standard_servers())
        mangled = "".join("  " + line + " \r\n" for line in text.splitlines())
        self.serve(mangled)
        result = await self.client().update()
        self.assertEqual(result.directory.digest, sign_digest(text))
        self.assertEqual(len(result.directory.descriptors), 2)

    @as_deferred
    async def test_first_bad_authority_falls_back(self) -> None:
        self.serve(make_directory(standard_servers(), signers=["auth1"]), which=[0])
        self.serve(make_directory(standard_servers()), which=[1])
        result = await self.client().update()
        self.assertEqual(result.url, self.urls[1] + "directory")
        self.assertEqual(len(result.warnings), 1)
        self.assertIn("1 of the 3", result.warnings[0])
        self.assertEqual(self.resources[2].requests, [])

    @as_deferred
    async def test_network_errors_name_the_url(self) -> None:
        dead = f"http://127.0.0.1:{closed_port()}/"
        self.resources[1].body = None  # 404
        self.resources[2].hang = True
        client = self.client([dead, self.urls[1], self.urls[2]], timeout=0.5)
        error = await self.refused(client)
        lines = str(error).splitlines()
        self.assertIn("none of the 3 configured authorities", lines[0])
        self.assertIn(dead + "directory: could not connect", lines[1])
        self.assertIn("Check your network connection", lines[1])
        self.assertIn(self.urls[1] + "directory: HTTP 404", lines[2])
        self.assertIn("Check the Authority URL", lines[2])
        self.assertIn(self.urls[2] + "directory: no answer in time", lines[3])

    @as_deferred
    async def test_gzip_url(self) -> None:
        self.serve(make_directory(standard_servers()))
        urls = [u + "directory.gz" for u in self.urls]
        result = await self.client(urls).update()
        self.assertEqual(self.resources[0].requests[0][1], b"/directory.gz")
        self.assertEqual(len(result.directory.descriptors), 2)

    @as_deferred
    async def test_clock_skew_warning(self) -> None:
        self.serve(make_directory(standard_servers()))
        self.resources[0].skew = 2 * 3600
        result = await self.client().update()
        self.assertEqual(len(result.warnings), 1)
        self.assertIn("120 minutes ahead of your clock", result.warnings[0])
        self.assertIn("Check your clock", result.warnings[0])
        self.resources[0].skew = 29 * 60
        result = await self.client().update(force=True)
        self.assertEqual(result.warnings, ())

    @as_deferred
    async def test_stale_after_midnight(self) -> None:
        self.serve(make_directory(standard_servers()))
        client = self.client()
        await client.update()
        self.clock.advance(12 * 3600 - 1)  # 23:59:59
        self.assertFalse(client.is_stale(self.clock.seconds()))
        self.assertFalse((await client.update()).downloaded)
        self.clock.advance(2)  # 00:00:01 the next day
        self.assertTrue(client.is_stale(self.clock.seconds()))
        self.assertIn("before the most recent midnight GMT",
                      client.download_reason(self.clock.seconds()))
        self.serve(make_directory(standard_servers(), valid_after=TODAY + DAY,
                                  valid_until=TODAY + 2 * DAY))
        result = await client.update()
        self.assertTrue(result.downloaded)
        self.assertEqual(result.directory.valid_after, TODAY + DAY)
        self.assertFalse(client.is_stale(self.clock.seconds()))

    @as_deferred
    async def test_older_directory_refused(self) -> None:
        self.serve(make_directory(standard_servers()))
        client = self.client()
        await client.update()
        self.serve(make_directory(standard_servers(), valid_after=TODAY - DAY,
                                  valid_until=TODAY + DAY))
        error = await self.refused(client)
        self.assertIn("older than the one already cached", str(error))

    @as_deferred
    async def test_http_proxy_honoured(self) -> None:
        self.serve(make_directory(standard_servers()))
        factory = ProxyFactory()
        proxy_url = self.listen(factory)
        client = self.client(environ={"http_proxy": proxy_url})
        result = await client.update()
        self.assertTrue(result.downloaded)
        self.assertEqual(factory.seen, [(self.urls[0] + "directory").encode("ascii")])
        _, _, headers = self.resources[0].requests[0]
        self.assertEqual(headers[b"Cache-Control"], [b"no-cache"])
        # no_proxy bypasses it
        bypass = self.client(environ={"http_proxy": proxy_url, "no_proxy": "localhost,127.0.0.1"})
        await bypass.update(force=True)
        self.assertEqual(len(factory.seen), 1)
        self.assertEqual(len(self.resources[0].requests), 2)


def sign_digest(text: str) -> bytes:
    from mixminion.directory.directory import parse_directory
    return parse_directory(text, NOW, trusted=[fingerprint(a) for a in AUTHS], threshold=3).digest


# --- pure helpers ---------------------------------------------------------------------------


class HelperTests(unittest.TestCase):

    def test_directory_url(self) -> None:
        self.assertEqual(directory_url("http://a.example:8080/"), "http://a.example:8080/directory")
        self.assertEqual(directory_url("http://a.example/mix"), "http://a.example/mix/directory")
        self.assertEqual(directory_url("http://a.example/Directory.gz"), "http://a.example/Directory.gz")
        self.assertEqual(directory_url("http://a.example/x/directory"), "http://a.example/x/directory")

    def test_proxy_for(self) -> None:
        env = {"http_proxy": "proxy.example:3128", "no_proxy": ".internal, mix.example"}
        self.assertEqual(proxy_for("http://dir.example/", env), ("proxy.example", 3128))
        self.assertIsNone(proxy_for("https://dir.example/", env))
        self.assertIsNone(proxy_for("http://a.internal/", env))
        self.assertIsNone(proxy_for("http://mix.example/", env))
        self.assertEqual(proxy_for("http://dir.example/", {"http_proxy": "http://p:8/"}), ("p", 8))
        self.assertIsNone(proxy_for("http://dir.example/", {"HTTP_PROXY": "http://p:8/"}))
        self.assertIsNone(proxy_for("http://dir.example/", {"http_proxy": "http://p/", "no_proxy": "*"}))
        for bad in ("http://:8080", "http://proxy:99999", "http://proxy:port/"):
            with self.assertRaises(ClientDirectoryError, msg=bad):
                proxy_for("http://dir.example/", {"http_proxy": bad})

    def test_version_advice(self) -> None:
        self.assertIsNone(version_advice([], "0.0.8"))
        self.assertIsNone(version_advice(["0.0.8", "0.0.9"], "0.0.8"))
        self.assertIn("may be obsolete", version_advice(["0.0.8alpha3", "0.0.9"], "0.0.8alpha2"))
        self.assertIn("newer than any recommended", version_advice(["0.0.7"], "0.0.8"))

    def test_threshold_checked(self) -> None:
        with self.assertRaises(ValueError):
            ClientDirectory("x", [("http://a/", fingerprint("auth1"))], None, 2)
        with self.assertRaises(ValueError):
            ClientDirectory("x", [("http://a/", fingerprint("auth1"))], None, 0)


# --- the cache, import-server and lookup (no network) -----------------------------------------


class LocalCase(unittest.TestCase):
    """A client whose ``dir`` was written by hand (as a download would have)."""

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.clock.advance(NOW)
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(self.root)

    def client(self, descriptors: Sequence[ServerDescriptor] = (), **kw: Any) -> ClientDirectory:
        if descriptors:
            with open(os.path.join(self.root, DIR_FILE), "w", encoding="ascii") as f:
                f.write(make_directory(descriptors, **kw))
        client = ClientDirectory(self.root, [(f"http://{a}.example/", fingerprint(a)) for a in AUTHS],
                                 None, 2, self.clock, environ={})
        client.load()
        return client

    def imported_files(self) -> list[str]:
        folder = os.path.join(self.root, IMPORTED_DIR)
        return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


class CacheTests(LocalCase):

    def test_unreadable_cache_rebuilt_from_dir(self) -> None:
        self.client(standard_servers())
        with open(os.path.join(self.root, CACHE_FILE), "wb") as f:
            f.write(b"\x80\x04 a pickle from the reference client")
        client = self.client()
        self.assertEqual(len(client.servers(NOW)), 2)
        self.assertEqual(client.downloaded, os.stat(os.path.join(self.root, DIR_FILE)).st_mtime)

    def test_cached_directory_rechecked_against_trust(self) -> None:
        with open(os.path.join(self.root, DIR_FILE), "w", encoding="ascii") as f:
            f.write(make_directory(standard_servers(), signers=["auth1"]))
        client = self.client()
        self.assertIsNone(client.directory)
        self.assertTrue(client.is_stale(NOW))

    def test_expired_cached_directory_still_used_but_stale(self) -> None:
        client = self.client(standard_servers())
        later = TODAY + 3 * DAY
        self.assertIsNotNone(client.directory)
        self.assertTrue(client.is_stale(later))
        self.assertEqual(len(client.servers(later)), 2)


class ImportTests(LocalCase):

    def test_good_import(self) -> None:
        client = self.client(standard_servers())
        zed = descriptor("Zed")
        path = os.path.join(self.root, "zed.txt")
        with open(path, "w", encoding="ascii") as f:
            f.write(zed.text)
        self.assertEqual(client.import_server(path, NOW), zed)
        stamp = __import__("time").strftime("%Y%m%d%H%M%S", __import__("time").localtime(zed.published))
        self.assertEqual(self.imported_files(), [f"Zed-{stamp}"])
        self.assertIn(zed, client.servers(NOW))
        # imported descriptors are never recommended (descriptors.md §10.3)
        self.assertNotIn(zed, client.recommended(NOW))
        self.assertFalse(client.is_recommended("Zed"))
        self.assertEqual(client.lookup("zed", NOW), zed)
        # survives a restart; importing again is a no-op
        again = self.client()
        self.assertEqual(again.imported, [zed])
        self.assertEqual(again.import_server(zed.text, NOW), zed)
        self.assertEqual(len(self.imported_files()), 1)

    def test_name_collision_gets_suffix(self) -> None:
        client = self.client(standard_servers())
        first = descriptor("Zed", valid_until=TODAY + 10 * DAY)
        second = descriptor("Zed", valid_until=TODAY + 20 * DAY)
        client.import_server(first.text, NOW)
        client.import_server(second.text, NOW)
        names = self.imported_files()
        self.assertEqual(len(names), 2)
        self.assertEqual(names[1], names[0] + ".1")

    def test_expired_rejected(self) -> None:
        client = self.client(standard_servers())
        old = descriptor("Zed", valid_after=TODAY - 20 * DAY, valid_until=TODAY - DAY,
                         published=TODAY - 21 * DAY)
        with self.assertRaises(ImportRejected) as caught:
            client.import_server(old.text, NOW)
        self.assertIn("expired on 2024-01-14", str(caught.exception))
        self.assertIn("Ask the server's operator for a current one", str(caught.exception))

    def test_different_identity_rejected(self) -> None:
        client = self.client(standard_servers())
        impostor = descriptor("Alpha", identity="mallory")
        with self.assertRaises(ImportRejected) as caught:
            client.import_server(impostor.text, NOW)
        message = str(caught.exception)
        self.assertIn("different identity key", message)
        self.assertIn(fingerprint("Alpha"), message)
        self.assertIn("in the directory", message)
        self.assertEqual(self.imported_files(), [])

    def test_superseded_rejected(self) -> None:
        client = self.client(standard_servers())
        older = descriptor("Alpha", published=NOW - 7200)
        with self.assertRaises(ImportRejected) as caught:
            client.import_server(older.text, NOW)
        self.assertIn("already cover its whole validity", str(caught.exception))

    def test_garbage_rejected(self) -> None:
        client = self.client(standard_servers())
        with self.assertRaises(ImportRejected) as caught:
            client.import_server(descriptor("Zed").text.replace("zed.example", "zod.example"), NOW)
        self.assertIn("not a valid server descriptor", str(caught.exception))
        with self.assertRaises(ImportRejected) as caught:
            client.import_server(os.path.join(self.root, "missing"), NOW)
        self.assertIn("cannot read it", str(caught.exception))

    def test_import_does_not_shadow_directory(self) -> None:
        client = self.client(standard_servers())
        newer = descriptor("Alpha", published=NOW - 60, valid_until=TODAY + 60 * DAY)
        client.import_server(newer.text, NOW)
        # the directory's descriptor wins wherever it is usable ...
        self.assertEqual(client.lookup("Alpha", NOW, DAY), descriptor("Alpha"))
        # ... the imported one only where the directory has nothing
        self.assertEqual(client.lookup("Alpha", NOW, 40 * DAY), newer)
        self.assertNotIn(newer, client.recommended(NOW))

    def test_clean_removes_expired_imports(self) -> None:
        client = self.client(standard_servers())
        short = descriptor("Zed", valid_until=TODAY + 2 * DAY)
        lasting = descriptor("Yew")
        client.import_server(short.text, NOW)
        client.import_server(lasting.text, NOW)
        later = TODAY + 3 * DAY
        client.clean(later)
        self.assertEqual(client.imported, [lasting])
        self.assertEqual(len(self.imported_files()), 1)
        self.assertNotIn(short.digest, client.validated)
        self.assertIn(lasting.digest, client.validated)


class LookupTests(LocalCase):

    def setUp(self) -> None:
        super().setUp()
        self.old = descriptor("Beta", published=NOW - 3 * DAY, valid_after=TODAY - 10 * DAY,
                              valid_until=TODAY + 20 * DAY)
        self.new = descriptor("Beta", published=NOW - DAY)
        self.future_format = descriptor("Beta", published=NOW - 3600, packet_versions=("0.4",))
        self.gamma = descriptor("Gamma", packet_versions=("0.4",))
        self.dir = self.client([self.old, self.new, self.future_format, self.gamma, descriptor("Alpha")])

    def test_latest_published_valid_for_interval(self) -> None:
        self.assertEqual(self.dir.lookup("beta", NOW), self.new)
        self.assertEqual(self.dir.lookup("BETA", NOW, 10 * DAY), self.new)
        self.assertEqual(self.dir.lookup("Beta", TODAY - 5 * DAY, DAY), self.old)

    def test_no_descriptor_for_interval(self) -> None:
        with self.assertRaises(ServerNotFound) as caught:
            self.dir.lookup("Beta", NOW, 60 * DAY)
        self.assertIn("no descriptor valid from 2024-01-15 12:00:00", str(caught.exception))
        self.assertIn("update-servers", str(caught.exception))

    def test_unknown_and_unsupported(self) -> None:
        with self.assertRaises(ServerNotFound) as caught:
            self.dir.lookup("Nobody", NOW)
        self.assertIn("No server named 'Nobody' is known", str(caught.exception))
        with self.assertRaises(ServerNotFound) as caught:
            self.dir.lookup("Gamma", NOW)
        self.assertIn("does not support packet version 0.3", str(caught.exception))

    def test_servers_and_all_descriptors(self) -> None:
        self.assertEqual(len(self.dir.all_descriptors()), 5)
        later = TODAY + 25 * DAY
        self.assertNotIn(self.old, self.dir.servers(later))
        self.assertIn(self.new, self.dir.servers(later))
