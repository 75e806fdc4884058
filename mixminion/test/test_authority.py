"""Directory authorities: the store's rules, the HTTP endpoints, voting
rounds between three in-process authorities, and the node's publisher."""

from __future__ import annotations

import dataclasses
import os
import types
from typing import Any, Optional

from twisted.internet import defer, reactor, task
from twisted.trial import unittest
from twisted.web import resource, server
from twisted.web.test.requesthelper import DummyRequest

from mixminion.codec import textformat as tf
from mixminion.directory.authconfig import parse_authority_config
from mixminion.directory.authority import AuthorityStore, digest_name
from mixminion.directory.descriptor import (
    DescriptorFields,
    IncomingMMTP,
    OutgoingMMTP,
    build_descriptor,
    format_descriptor,
    parse_descriptor,
)
from mixminion.directory import directory as dirformat
from mixminion.directory.http import HTTPClient, Response
from mixminion.directory.service import (
    Authority,
    AuthoritySettings,
    Peer,
    PublishResource,
    RoundScheduler,
    authority_root,
    publish_answer,
)
from mixminion.server.config import ConfigError
from mixminion.server.publish import (
    Publisher,
    UploadResult,
    backoff_delay,
    http_uploader,
    parse_answer,
)
from mixminion.test.test_node import UNIT_INCOMING, UNIT_SERVER, _free_port
from mixminion.testing.keys import key

DAY = 86400
NOW = 1705321800 + 3600  # 2024-01-15 13:30:00
MIDNIGHT = NOW - NOW % DAY


def rng(n: int) -> bytes:
    return b"\x5a" * n


def fields(nickname: str = "Quince", **changes: Any) -> DescriptorFields:
    base = DescriptorFields(
        nickname=nickname,
        contact=f"{nickname.lower()}@example.org",
        packet_key=key("packet").public,
        published=NOW - 3600,
        valid_after=MIDNIGHT,
        valid_until=MIDNIGHT + 30 * DAY,
        incoming=IncomingMMTP(hostname=f"{nickname.lower()}.example.org"),
        outgoing=OutgoingMMTP(),
    )
    return dataclasses.replace(base, **changes)


def descriptor(nickname: str = "Quince", signer: Optional[str] = None, **changes: Any) -> str:
    return build_descriptor(fields(nickname, **changes), key(signer or nickname), rng)


def unchecked(nickname: str = "Quince", signer: Optional[str] = None, **changes: Any) -> str:
    """Signed without the builder's checks (for descriptors it would refuse)."""
    identity = key(signer or nickname)
    return tf.sign_document(format_descriptor(fields(nickname, **changes), identity.public), identity, rng)


# --- the store ---------------------------------------------------------------------------------


class StoreTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        self.store = AuthorityStore(self.dir, NOW)

    def test_accepts_a_valid_descriptor_into_a_file_named_by_digest(self) -> None:
        text = descriptor()
        self.assertEqual(self.store.accept_upload(text, NOW), (True, "Accepted."))
        digest = parse_descriptor(text, NOW).digest
        name = digest_name(digest)
        self.assertEqual(len(name), 27)
        self.assertNotIn("=", name)
        with open(os.path.join(self.dir, "descriptors", name)) as f:
            self.assertEqual(f.read(), text)
        self.assertEqual([d.digest for d in self.store.descriptors(NOW)], [digest])

    def test_same_descriptor_twice(self) -> None:
        text = descriptor()
        self.store.accept_upload(text, NOW)
        self.assertEqual(self.store.accept_upload(text, NOW), (True, "Already have this descriptor."))

    def test_bad_signature(self) -> None:
        good = descriptor()
        forged = tf.sign_document(good, key("Mallory"), rng)  # Identity line still Quince's key
        ok, message = self.store.accept_upload(forged, NOW)
        self.assertFalse(ok)
        self.assertIn("Invalid descriptor", message)
        self.assertIn("Signature", message)

    def test_altered_text(self) -> None:
        text = descriptor().replace("Contact: quince@example.org", "Contact: evil@example.org")
        ok, message = self.store.accept_upload(text, NOW)
        self.assertFalse(ok)
        self.assertIn("Digest", message)

    def test_malformed(self) -> None:
        ok, message = self.store.accept_upload("[Server]\nNickname Quince\n", NOW)
        self.assertFalse(ok)
        self.assertTrue(message.startswith("Invalid descriptor: "), message)

    def test_too_large(self) -> None:
        store = AuthorityStore(self.mktemp(), NOW, max_size=1000)
        ok, message = store.accept_upload(descriptor(), NOW)
        self.assertFalse(ok)
        self.assertIn("accepts at most 1000", message)

    def test_expired_gives_a_clock_hint(self) -> None:
        text = descriptor(valid_after=MIDNIGHT - 40 * DAY, valid_until=MIDNIGHT - 10 * DAY)
        ok, message = self.store.accept_upload(text, NOW)
        self.assertFalse(ok)
        self.assertIn("expired", message)
        self.assertIn("clock", message)

    def test_too_far_in_the_future(self) -> None:
        text = descriptor(valid_after=MIDNIGHT + 40 * DAY, valid_until=MIDNIGHT + 70 * DAY)
        ok, message = self.store.accept_upload(text, NOW)
        self.assertFalse(ok)
        self.assertIn("more than 30 days", message)

    def test_published_in_the_future(self) -> None:
        ok, message = self.store.accept_upload(unchecked(published=NOW + 3600), NOW)
        self.assertFalse(ok)
        self.assertIn("Published", message)

    def test_nickname_stays_with_its_first_identity(self) -> None:
        self.assertTrue(self.store.accept_upload(descriptor("Quince"), NOW)[0])
        impostor = descriptor("Quince", signer="Mallory")
        ok, message = self.store.accept_upload(impostor, NOW)
        self.assertFalse(ok)
        self.assertIn("already belongs to a server with identity " + key("Quince").public.fingerprint, message)
        self.assertEqual(len(os.listdir(os.path.join(self.dir, "held"))), 1)
        # case-insensitive, and persisted across restarts
        reopened = AuthorityStore(self.dir, NOW)
        ok, _ = reopened.accept_upload(descriptor("QUINCE", signer="Mallory"), NOW)
        self.assertFalse(ok)
        self.assertEqual(len(reopened.descriptors(NOW)), 1)

    def test_superseded_descriptors_are_archived(self) -> None:
        old = descriptor(published=NOW - 7200)
        new = descriptor(published=NOW - 60)
        self.store.accept_upload(old, NOW)
        self.assertEqual(self.store.accept_upload(new, NOW), (True, "Accepted."))
        self.assertEqual([d.text for d in self.store.descriptors(NOW)], [new])
        archived = os.listdir(os.path.join(self.dir, "archive"))
        self.assertEqual(archived, [digest_name(parse_descriptor(old, NOW).digest)])
        # the old one again: accepted (so the server stops retrying) but not current
        ok, message = self.store.accept_upload(old, NOW)
        self.assertTrue(ok)
        self.assertIn("superseded", message)
        self.assertEqual([d.text for d in self.store.descriptors(NOW)], [new])

    def test_partial_cover_is_not_supersession(self) -> None:
        old = parse_descriptor(descriptor(published=NOW - 7200), NOW)
        half = parse_descriptor(descriptor(published=NOW - 60, valid_until=MIDNIGHT + 10 * DAY), NOW)
        self.assertFalse(dirformat.is_superseded(old, [old, half]))
        rest = parse_descriptor(descriptor(published=NOW - 30, valid_after=MIDNIGHT + 10 * DAY), NOW,
                                check_validity=False)
        self.assertTrue(dirformat.is_superseded(old, [old, half, rest]))

    def test_expiry_housekeeping(self) -> None:
        self.store.accept_upload(descriptor(), NOW)
        later = MIDNIGHT + 31 * DAY
        self.assertEqual(self.store.descriptors(later), [])
        self.assertEqual(self.store.housekeeping(later), 1)
        self.assertEqual(os.listdir(os.path.join(self.dir, "descriptors")), [])
        self.assertEqual(len(os.listdir(os.path.join(self.dir, "archive"))), 1)

    def test_reload_from_disk(self) -> None:
        self.store.accept_upload(descriptor("Quince"), NOW)
        self.store.accept_upload(descriptor("Rowan"), NOW)
        reopened = AuthorityStore(self.dir, NOW)
        self.assertEqual(sorted(d.nickname for d in reopened.descriptors(NOW)), ["Quince", "Rowan"])

    def write_votes(self, text: str) -> str:
        path = os.path.join(self.mktemp())
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_vote_file_ignore_no_and_yes(self) -> None:
        fp = {n: key(n).public.fingerprint for n in ("Quince", "Rowan", "Mallory")}
        votes = self.write_votes(
            f"ignore Quince {fp['Quince']}\nno Rowan {fp['Rowan']}\nyes Sorrel {fp['Mallory'][:8]} {fp['Mallory'][8:]}\n")
        store = AuthorityStore(self.mktemp(), NOW, vote_file=votes)
        self.assertEqual(store.accept_upload(descriptor("Quince"), NOW), (True, "Accepted."))
        self.assertFalse(store.has(parse_descriptor(descriptor("Quince"), NOW).digest))
        self.assertEqual(store.accept_upload(descriptor("Rowan"), NOW), (True, "Accepted."))
        self.assertEqual(store.descriptors(NOW), [])  # stored, but we vote no
        ok, message = store.accept_upload(descriptor("Sorrel"), NOW)  # the vote file pins Sorrel
        self.assertFalse(ok)
        self.assertIn("already belongs", message)

    def test_manual_admission(self) -> None:
        votes = self.write_votes("")
        store = AuthorityStore(self.mktemp(), NOW, admission="manual", vote_file=votes)
        self.assertEqual(store.accept_upload(descriptor(), NOW),
                         (True, "Server queued pending manual checking."))
        self.assertEqual(store.descriptors(NOW), [])
        with open(votes) as f:
            written = f.read()
        self.assertIn(f"#abstain Quince {key('Quince').public.fingerprint}", written)
        with open(votes, "w") as f:
            f.write(f"yes Quince {key('Quince').public.fingerprint}\n")
        os.utime(votes, (NOW + 5, NOW + 5))
        self.assertEqual(len(store.descriptors(NOW)), 1)


# --- HTTP endpoints ---------------------------------------------------------------------------------


def render(res: resource.Resource, method: bytes, path: bytes = b"", args: Optional[dict] = None):
    request = DummyRequest([path] if path else [])
    request.method = method
    request.args = args or {}
    body = res.render(request)
    return request, body


class EndpointTests(unittest.TestCase):
    def setUp(self) -> None:
        client = HTTPClient(reactor, timeout=5)
        self.addCleanup(client.close)
        settings = AuthoritySettings(base_dir=self.mktemp(), nickname="Auth0")
        self.authority = Authority(settings, key("auth0"), task.Clock(), client, rng=rng)
        self.authority.clock.advance(NOW)
        self.root = authority_root(self.authority)

    def publish(self, args: dict):
        return render(PublishResource(self.authority), b"POST", args=args)

    def test_publish_accepts(self) -> None:
        request, body = self.publish({b"desc": [descriptor().encode("ascii")]})
        self.assertEqual(body, b"Status: 1\nMessage: Accepted.\n")
        self.assertEqual(request.responseHeaders.getRawHeaders(b"content-type"), [b"text/plain"])
        self.assertEqual(request.responseCode, 200)
        self.assertEqual(len(self.authority.store.descriptors(NOW)), 1)

    def test_publish_rejects_with_status_0_and_one_message_line(self) -> None:
        expired = descriptor(valid_after=MIDNIGHT - 40 * DAY, valid_until=MIDNIGHT - 10 * DAY)
        _, body = self.publish({b"desc": [expired.encode("ascii")]})
        status, message, end = body.decode("ascii").split("\n")
        self.assertEqual(status, "Status: 0")
        self.assertTrue(message.startswith("Message: Descriptor expired at "), message)
        self.assertEqual(end, "")

    def test_publish_without_the_field(self) -> None:
        _, body = self.publish({})
        self.assertEqual(body, b"Status: 0\nMessage: Expected exactly one form field 'desc' "
                               b"with the descriptor.\n")

    def test_answer_is_always_one_line_per_field(self) -> None:
        self.assertEqual(publish_answer(False, "two\nlines  here"), b"Status: 0\nMessage: two lines here\n")

    def test_documents_are_503_until_they_exist(self) -> None:
        for name in (b"vote", b"directory", b"directory.gz"):
            request, _ = render(self.root.getChildWithDefault(name, None), b"GET")
            self.assertEqual(request.responseCode, 503, name)
        self.authority.make_vote(NOW)
        request, body = render(self.root.getChildWithDefault(b"vote", None), b"GET")
        self.assertTrue(body.startswith(b"[Signed-Directory]\n"))

    def test_signature_for_an_unknown_digest(self) -> None:
        res = self.root.getChildWithDefault(b"consensus-signature", None)
        request, _ = render(res, b"GET", args={b"digest": [b"00" * 20]})
        self.assertEqual(request.responseCode, 404)


# --- voting rounds between authorities on loopback ---------------------------------------------------


class RoundTests(unittest.TestCase):
    """Three authorities on loopback ports; their clock is a task.Clock."""

    timeout = 60

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.clock.advance(NOW)
        self.ports = []
        sites = []
        for _ in range(3):
            site = server.Site(resource.Resource())
            port = reactor.listenTCP(0, site, interface="127.0.0.1")
            self.ports.append(port)
            sites.append(site)
        peers = tuple(Peer(f"http://127.0.0.1:{p.getHost().port}/", key(f"auth{i}").public.fingerprint)
                      for i, p in enumerate(self.ports))
        self.auths: list[Authority] = []
        for i, site in enumerate(sites):
            client = HTTPClient(reactor, clock=self.clock, timeout=10)
            settings = AuthoritySettings(base_dir=self.mktemp(), nickname=f"Auth{i}", peers=peers,
                                         vote_interval=3)
            authority = Authority(settings, key(f"auth{i}"), self.clock, client, rng=rng)
            site.resource = authority_root(authority)
            self.auths.append(authority)
        self.fingerprints = [a.fingerprint for a in self.auths]
        for i, nickname in enumerate(("Quince", "Rowan", "Sorrel")):
            self.assertTrue(self.auths[i].store.accept_upload(descriptor(nickname), NOW)[0])

    @defer.inlineCallbacks
    def tearDown(self):
        for authority in self.auths:
            yield authority.client.close()
        for port in self.ports:
            if port.connected:
                yield port.stopListening()

    @defer.inlineCallbacks
    def run_round(self, auths, round_start: float):
        for authority in auths:
            authority.make_vote(round_start)
        yield defer.gatherResults([a.collect_votes(round_start) for a in auths])
        yield defer.gatherResults([a.collect_signatures(round_start) for a in auths])

    def client_view(self, text: str, threshold: int = 2):
        """What a client requiring ``threshold`` of the three authorities sees."""
        return dirformat.parse_directory(text, NOW, trusted=self.fingerprints, threshold=threshold)

    @defer.inlineCallbacks
    def test_three_authorities_agree_and_exchange_descriptors(self):
        yield self.run_round(self.auths, NOW)
        digests = {a.consensus.digest for a in self.auths}
        self.assertEqual(len(digests), 1)
        first = self.client_view(self.auths[0].directory, threshold=3)
        self.assertEqual(first.signers, tuple(sorted(self.fingerprints)))
        self.assertEqual(first.descriptors, ())  # each descriptor was in one vote only
        # every authority imported the others' descriptors; the next round lists all three
        for authority in self.auths:
            self.assertEqual(len(authority.store.descriptors(NOW)), 3)
        yield self.run_round(self.auths, NOW + 3)
        texts = {a.directory for a in self.auths}
        self.assertEqual(len(texts), 1)
        second = self.client_view(texts.pop(), threshold=3)
        self.assertEqual(sorted(d.nickname for d in second.descriptors), ["Quince", "Rowan", "Sorrel"])
        self.assertEqual(second.info.recommended_nicknames, ("quince", "rowan", "sorrel"))
        # served over HTTP, plain and gzipped
        base = self.auths[1].settings.peers[1].url
        response = yield self.auths[0].client.get(base + "directory")
        self.assertEqual(response.body.decode("ascii"), self.auths[1].directory)
        response = yield self.auths[0].client.get(base + "directory.gz")
        import gzip
        self.assertEqual(gzip.decompress(response.body).decode("ascii"), self.auths[1].directory)

    @defer.inlineCallbacks
    def test_one_authority_down(self):
        yield self.ports[2].stopListening()
        yield self.run_round(self.auths[:2], NOW)
        self.assertEqual(self.auths[0].consensus.digest, self.auths[1].consensus.digest)
        for authority in self.auths[:2]:
            view = self.client_view(authority.directory)
            self.assertEqual(view.signers, tuple(sorted(self.fingerprints[:2])))
        with self.assertRaises(dirformat.NotEnoughSignatures):
            self.client_view(self.auths[0].directory, threshold=3)

    @defer.inlineCallbacks
    def test_doctored_directory_is_outvoted(self):
        bad = self.auths[2]
        fake = parse_descriptor(descriptor("Mallory"), NOW)
        honest_merge = bad.consensus_contents

        def doctored(votes, valid_after):
            info, descriptors = honest_merge(votes, valid_after)
            return info, [*descriptors, fake]
        bad.consensus_contents = doctored
        # and it answers every signature request with its signature on its own text
        bad.signature_for = lambda hexdigest: bad.consensus.own_block
        yield self.run_round(self.auths, NOW)
        honest = self.auths[0].consensus.digest
        self.assertEqual(self.auths[1].consensus.digest, honest)
        self.assertNotEqual(bad.consensus.digest, honest)
        for authority in self.auths[:2]:
            view = self.client_view(authority.directory)
            self.assertEqual(view.signers, tuple(sorted(self.fingerprints[:2])))
            self.assertNotIn("Mallory", [d.nickname for d in view.descriptors])
        self.assertIsNone(bad.directory)  # one signature is below the threshold: not served
        doctored = dirformat.add_signature_blocks(bad.consensus.unsigned, [bad.consensus.own_block])
        with self.assertRaises(dirformat.NotEnoughSignatures):
            self.client_view(doctored)

    @defer.inlineCallbacks
    def test_publisher_uploads_over_http_to_a_majority(self):
        yield self.ports[2].stopListening()
        keys = FakeKeys(1)
        text = descriptor("Tansy")
        keys.sets[0].descriptor = types.SimpleNamespace(digest=b"t" * 20, text=text)
        authorities = [(a.settings.peers[i].url, a.fingerprint) for i, a in enumerate(self.auths)]
        client = HTTPClient(reactor, clock=self.clock, timeout=10)
        self.addCleanup(client.close)
        publisher = Publisher(keys, authorities, self.clock, http_uploader(client), rng=lambda: 0.0)
        publisher.startService()
        yield publisher._running
        publisher.stopService()
        self.assertEqual(keys.marked, [(1, NOW)])
        self.assertEqual([a.store.accept_upload(text, NOW)[1] for a in self.auths[:2]],
                         ["Already have this descriptor."] * 2)

    @defer.inlineCallbacks
    def test_oversized_upload_over_http(self):
        client = self.auths[0].client
        response = yield client.post_form(self.auths[0].settings.peers[0].url + "publish",
                                          {"desc": "x" * 200_000})
        self.assertEqual(parse_answer(response).message, "Upload of 200005 bytes is too large.")

    @defer.inlineCallbacks
    def test_scheduled_rounds_on_the_clock(self):
        boundary = (NOW // 3 + 1) * 3
        self.clock.advance(boundary - 0.5 - self.clock.seconds())
        schedulers = [RoundScheduler(a, 3, self.clock) for a in self.auths]
        for scheduler in schedulers:
            scheduler.startService()
        self.clock.advance(0.5)  # T: votes
        self.assertTrue(all(a.vote_round == boundary for a in self.auths))
        for _ in range(2):  # T + 1: consensus; T + 2: signatures
            self.clock.advance(1)
            yield defer.gatherResults([s.busy for s in schedulers])
        for scheduler in schedulers:
            yield scheduler.stopService()
        self.assertEqual(len({a.directory for a in self.auths}), 1)
        self.assertEqual(len(self.client_view(self.auths[0].directory, 3).signers), 3)


# --- a node built from its configuration publishes to an authority ------------------------------------

NODE_CONFIG = UNIT_SERVER + "\n" + UNIT_INCOMING + """
[DirectoryServers]
Publish: yes
Authority: {url} {fingerprint}
"""


class NodePublishesTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_node_publishes_its_descriptor_at_start(self):
        from mixminion.server.config import load_config
        from mixminion.server.reload import ReloadService
        from mixminion.server.keyservice import KeyService
        from mixminion.server.tap import build_node

        site = server.Site(resource.Resource())
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        url = f"http://127.0.0.1:{port.getHost().port}/"
        client = HTTPClient(reactor, timeout=10)
        self.addCleanup(client.close)
        settings = AuthoritySettings(base_dir=self.mktemp(), nickname="Auth0",
                                     peers=(Peer(url, key("auth0").public.fingerprint),))
        authority = Authority(settings, key("auth0"), reactor, client, rng=rng)
        site.resource = authority_root(authority)
        base = os.path.abspath(self.mktemp())
        with open(base + ".conf", "w") as f:
            f.write(NODE_CONFIG.format(base=base, port=_free_port(), url=url, fingerprint=authority.fingerprint))
        node = build_node(load_config(base + ".conf"), reactor)
        [publisher] = [s for s in node if isinstance(s, Publisher)]
        [keys] = [s for s in node if isinstance(s, KeyService)]
        [reload] = [s for s in node if isinstance(s, ReloadService)]
        self.assertEqual((len(keys.listeners), len(reload.listeners)), (1, 1))
        node.startService()
        self.addCleanup(node.stopService)
        self.assertIsNotNone(publisher._running)
        yield publisher._running
        self.assertEqual(node.keys.unpublished(), [])
        stored = authority.store.descriptors(reactor.seconds())
        self.assertEqual([d.nickname for d in stored], ["unit"])


# --- the twistd plugin ---------------------------------------------------------------------------------


class PluginTests(unittest.TestCase):
    def test_plugin_is_found(self) -> None:
        from twisted.application.service import IServiceMaker
        from twisted.plugin import getPlugins
        makers = {m.tapname: m for m in getPlugins(IServiceMaker)}
        self.assertEqual(makers["mixminion-directory"].module, "mixminion.directory.tap")

    def test_make_service_from_a_config_file(self) -> None:
        from mixminion.directory import tap
        base = self.mktemp()
        os.makedirs(base)
        conf = os.path.join(base, "authority.conf")
        with open(conf, "w") as f:
            f.write("[Authority]\nBaseDir: data\nNickname: Quorum1\nPort: 48080\nVoteInterval: 1 minute\n")
        options = tap.Options()
        options.parseOptions(["-c", conf])
        svc = tap.makeService(options)
        self.addCleanup(svc.authority.client.close)
        self.assertTrue(os.path.exists(os.path.join(base, "data", "identity.key")))
        self.assertEqual(svc.authority.voters, ((svc.authority.fingerprint, "http://127.0.0.1:48080/"),))
        self.assertEqual(svc.authority.threshold, 1)
        # the key is kept across restarts
        again = tap.makeService(options)
        self.addCleanup(again.authority.client.close)
        self.assertEqual(again.authority.fingerprint, svc.authority.fingerprint)


# --- configuration --------------------------------------------------------------------------------


class ConfigTests(unittest.TestCase):
    FP = "0123456789ABCDEF0123456789ABCDEF01234567"

    def test_full(self) -> None:
        settings = parse_authority_config(
            "[Authority]\nBaseDir: auth\nNickname: Quorum1\nPort: 9001\n"
            f"Peer: http://a.example:9001/ {self.FP}\nPeer: http://b.example:9001/ {self.FP.lower()}\n"
            "VoteInterval: 2 minutes\nThreshold: 2\nAdmission: manual\nVoteFile: votes\n"
            "ClientVersions: 0.1.0, 0.1.1\n", "/etc/authority.conf")
        self.assertEqual(settings.base_dir, "/etc/auth")
        self.assertEqual(settings.vote_file, "/etc/auth/votes")
        self.assertEqual(settings.port, 9001)
        self.assertEqual(settings.vote_interval, 120)
        self.assertEqual(settings.peers[1].fingerprint, self.FP)
        self.assertEqual(settings.client_versions, ("0.1.0", "0.1.1"))
        self.assertEqual(settings.directory_lifetime, DAY)
        self.assertEqual(settings.own_url, "http://127.0.0.1:9001/")

    def assertConfigError(self, text: str, *fragments: str) -> None:
        with self.assertRaises(ConfigError) as caught:
            parse_authority_config(text, "authority.conf")
        for fragment in fragments:
            self.assertIn(fragment, str(caught.exception))

    def test_errors_name_file_line_and_option(self) -> None:
        self.assertConfigError("[Authority]\nBaseDir: x\nNickname: A\nPeer: nowhere\n",
                               "authority.conf:4: [Authority] Peer:", "FINGERPRINT")
        self.assertConfigError("[Authority]\nBaseDir: x\nNickname: A\nTreshold: 2\n",
                               "authority.conf:4:", "unknown option")
        self.assertConfigError("[Authority]\nNickname: A\n", "BaseDir is missing")
        self.assertConfigError("[Authority]\nBaseDir: x\nNickname: A\nDirectoryLifetime: 36 hours\n",
                               "must be 1 day")
        self.assertConfigError("[Server]\n", "unknown section")


# --- publisher -----------------------------------------------------------------------------------


class FakeKeys:
    """The two KeyStore methods the publisher uses."""

    def __init__(self, count: int = 1) -> None:
        self.sets = [types.SimpleNamespace(
            number=i + 1, name=f"key_{i + 1:04d}", valid_until=MIDNIGHT + 30 * DAY,
            descriptor=types.SimpleNamespace(digest=bytes([i]) * 20, text=f"desc {i}"))
            for i in range(count)]
        self.marked: list[tuple[int, float]] = []

    def unpublished(self):
        done = {n for n, _ in self.marked}
        return [k for k in self.sets if k.number not in done]

    def mark_published(self, keyset, now) -> bool:
        self.marked.append((keyset.number, now))
        return True


class FakeAuthorities:
    """Answers per URL from a script: "1", "0" or "error"."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers
        self.calls: list[str] = []

    def __call__(self, url: str, text: str) -> defer.Deferred:
        self.calls.append(url)
        answer = self.answers[url]
        if answer == "error":
            return defer.succeed(UploadResult(False, "connection refused", error=True))
        return defer.succeed(UploadResult(answer == "1", "Accepted." if answer == "1" else "No."))


AUTHS = [(f"http://a{i}.example/", f"{i:040X}") for i in range(3)]


class PublisherTests(unittest.TestCase):
    def make(self, answers: list[str], keys: Optional[FakeKeys] = None, jitter: float = 0.0):
        self.clock = task.Clock()
        self.clock.advance(NOW)
        self.keys = keys or FakeKeys()
        self.fake = FakeAuthorities({url: a for (url, _), a in zip(AUTHS, answers)})
        publisher = Publisher(self.keys, AUTHS, self.clock, self.fake, rng=lambda: jitter)
        publisher.startService()
        self.addCleanup(publisher.stopService)
        return publisher

    def next_retry(self) -> Optional[float]:
        calls = self.clock.getDelayedCalls()
        return calls[0].getTime() - self.clock.seconds() if calls else None

    def test_all_accept(self) -> None:
        self.make(["1", "1", "1"])
        self.assertEqual(self.keys.marked, [(1, NOW)])
        self.assertIsNone(self.next_retry())

    def test_majority_is_enough(self) -> None:
        self.make(["1", "error", "1"])
        self.assertEqual(self.keys.marked, [(1, NOW)])
        self.assertIsNone(self.next_retry())

    def test_minority_is_retried_with_doubling_backoff(self) -> None:
        self.make(["1", "0", "error"])
        self.assertEqual(self.keys.marked, [])
        delays = []
        for _ in range(9):
            delay = self.next_retry()
            delays.append(delay)
            self.clock.advance(delay)
        self.assertEqual(delays, [30, 60, 120, 240, 480, 960, 1920, 3600, 3600])
        # the authority that accepted is not asked again
        self.assertEqual(self.fake.calls.count(AUTHS[0][0]), 1)
        self.assertEqual(self.fake.calls.count(AUTHS[1][0]), 10)

    def test_retry_succeeds_once_the_majority_answers(self) -> None:
        self.make(["1", "0", "error"])
        self.fake.answers[AUTHS[2][0]] = "1"
        self.clock.advance(self.next_retry())
        self.assertEqual(self.keys.marked, [(1, NOW + 30)])
        self.assertIsNone(self.next_retry())

    def test_jitter_from_the_rng(self) -> None:
        self.make(["0", "0", "0"], jitter=0.5)
        self.assertAlmostEqual(self.next_retry(), 30 * 1.05)
        self.assertEqual(backoff_delay(20, lambda: 0.999), 3600 * (1 + 0.1 * 0.999))

    def test_kick_resets_the_backoff(self) -> None:
        publisher = self.make(["0", "0", "0"])
        self.clock.advance(30)
        self.assertEqual(self.next_retry(), 60)
        publisher.kick("SIGHUP")
        self.assertEqual(self.next_retry(), 30)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_every_unpublished_keyset(self) -> None:
        self.make(["1", "1", "0"], keys=FakeKeys(3))
        self.assertEqual([n for n, _ in self.keys.marked], [1, 2, 3])

    def test_expired_keysets_are_skipped(self) -> None:
        keys = FakeKeys(1)
        keys.sets[0].valid_until = NOW - 1
        self.make(["1", "1", "1"], keys=keys)
        self.assertEqual(self.fake.calls, [])

    def test_stop_cancels_a_hanging_upload(self) -> None:
        clock = task.Clock()
        hanging: list[defer.Deferred] = []

        def upload(url: str, text: str) -> defer.Deferred:
            d = defer.Deferred(lambda d: d.callback(UploadResult(False, "cancelled", error=True)))
            hanging.append(d)
            return d
        publisher = Publisher(FakeKeys(), AUTHS, clock, upload)
        publisher.startService()
        self.assertEqual(len(hanging), 3)
        publisher.stopService()
        self.assertIsNone(publisher._running)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_answer_format(self) -> None:
        self.assertEqual(parse_answer(Response(200, "text/plain", b"Status: 1\nMessage: Accepted.\n")),
                         UploadResult(True, "Accepted."))
        self.assertEqual(parse_answer(Response(200, "text/plain; charset=ascii",
                                               b"Status: 0  \r\nMessage: Bad key\r\n")),
                         UploadResult(False, "Bad key"))
        self.assertTrue(parse_answer(Response(200, "text/html", b"Status: 1\nMessage: x\n")).error)
        self.assertTrue(parse_answer(Response(500, "text/plain", b"Status: 1\nMessage: x\n")).error)
        self.assertTrue(parse_answer(Response(200, "text/plain", b"OK\n")).error)
