"""``list-servers`` features and layouts, and ``update-servers`` exit codes
(client.md §7, §2.1; issue 15 points 5 and 6).

Commands run in-process through :class:`test_client_cli.Env` (a
temporary UserDir, configuration and signed directory).  Directories here
hold several descriptors per server so that merging (default), runs
(``-T``) and one line per descriptor (``--no-collapse``) differ.  The
update tests use closed loopback ports for dead authorities and a real
``twisted.web`` site for a live one.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Optional

from twisted.internet import defer
from twisted.protocols.policies import WrappingFactory
from twisted.trial import unittest
from twisted.web import server

from mixminion import __version__
from mixminion.client.commands import servers
from mixminion.codec.textformat import format_date
from mixminion.directory.descriptor import (
    DeliveryInfo,
    DescriptorFields,
    IncomingMMTP,
    OutgoingMMTP,
    ServerDescriptor,
)
from mixminion.test.test_client_cli import (
    AUTHORITY,
    DAY,
    TODAY,
    Env,
    directory_text,
    inline,
    reactor,
    server as cli_server,
)
from mixminion.test.test_client_directory import (
    DirectoryResource,
    closed_port,
    signed_descriptor,
)
from mixminion.testing.keys import key

PORT = 48100


@functools.cache
def desc(nickname: str, valid_after: int, valid_until: int, smtp: bool = True,
         software: Optional[str] = f"Mixminion {__version__}") -> ServerDescriptor:
    """A descriptor of ``nickname`` (always the same identity key), published
    before now whatever its validity, so future keysets can be listed."""
    fields = DescriptorFields(
        nickname=nickname,
        contact=f"{nickname.lower()}@example.org",
        packet_key=key(nickname + "-packet").public,
        published=min(valid_after + 60, TODAY),
        valid_after=valid_after,
        valid_until=valid_until,
        incoming=IncomingMMTP(hostname=f"{nickname.lower()}.example.org", port=PORT),
        outgoing=OutgoingMMTP(),
        smtp=DeliveryInfo(max_size_kib=100) if smtp else None,
        max_fragments=16,
        software=software,
    )
    return signed_descriptor(fields, nickname)


def d(day: int) -> str:
    """The date ``day`` days from today, as list-servers prints it."""
    return format_date(TODAY + day * DAY)


# Alpha: delivers SMTP until day 10, then only relays, in two keysets that
# touch at day 40.  Beta: one keyset.  bravo and Charlie check the sort.
ALPHA = [desc("Alpha", TODAY - DAY, TODAY + 10 * DAY),
         desc("Alpha", TODAY + 10 * DAY, TODAY + 40 * DAY, smtp=False, software="Mixminion 9"),
         desc("Alpha", TODAY + 40 * DAY, TODAY + 70 * DAY, smtp=False, software="Mixminion 9")]
BETA = desc("Beta", TODAY - DAY, TODAY + 30 * DAY)


def alpha_env(test: unittest.TestCase, extra: str = "") -> Env:
    return Env(test, ALPHA + [BETA], extra)


class ListServersTests(unittest.TestCase):

    @inline
    async def test_default_merges_values_per_server(self) -> None:
        status, out, err = await alpha_env(self).run("list-servers", "-D", "no")
        self.assertEqual(status, 0, err)
        self.assertEqual(out.decode().splitlines(), [
            "Alpha:smtp relay frag / relay frag\t(ok)",
            "Beta:smtp relay frag\t(ok)",
        ])

    @inline
    async def test_sorted_by_lower_case_nickname(self) -> None:
        env = Env(self, [desc(n, TODAY - DAY, TODAY + DAY) for n in ("Charlie", "bravo", "Alpha")])
        status, out, err = await env.run("list-servers", "-D", "no", "-F", "caps")
        self.assertEqual(status, 0, err)
        self.assertEqual([line.split(":")[0] for line in out.decode().splitlines()],
                         ["Alpha", "bravo", "Charlie"])

    @inline
    async def test_with_time_merges_touching_runs_with_equal_values(self) -> None:
        status, out, err = await alpha_env(self).run("list-servers", "-D", "no", "-T")
        self.assertEqual(status, 0, err)
        self.assertEqual(out.decode().splitlines(), [
            f"Alpha:{d(-1)} to {d(10)}:smtp relay frag\t(ok)",
            f"Alpha:{d(10)} to {d(70)}:relay frag\t(ok)",
            f"Beta:{d(-1)} to {d(30)}:smtp relay frag\t(ok)",
        ])
        # a feature that differs between the last two keysets splits their run
        status, out, _ = await alpha_env(self).run("list-servers", "-D", "no", "-T",
                                                   "-F", "valid-after", "Alpha")
        self.assertEqual(out.decode().splitlines(), [
            f"Alpha:{d(-1)} to {d(10)}:{d(-1)}",
            f"Alpha:{d(10)} to {d(40)}:{d(10)}",
            f"Alpha:{d(40)} to {d(70)}:{d(40)}",
        ])

    @inline
    async def test_no_collapse_one_line_per_descriptor(self) -> None:
        status, out, err = await alpha_env(self).run("list-servers", "-D", "no",
                                                     "--no-collapse", "-F", "caps", "alpha")
        self.assertEqual(status, 0, err)
        self.assertEqual(out.decode().splitlines(), [
            f"Alpha:{d(-1)} to {d(10)}:smtp relay frag",
            f"Alpha:{d(10)} to {d(40)}:relay frag",
            f"Alpha:{d(40)} to {d(70)}:relay frag",
        ])

    @inline
    async def test_features_in_the_order_given(self) -> None:
        env = alpha_env(self)
        status, out, err = await env.run("list-servers", "-D", "no", "-F", "fingerprint,address",
                                         "-F", "SOFTWARE", "-F", "server:Contact", "Beta")
        self.assertEqual(status, 0, err)
        self.assertEqual(out.decode(), "Beta:" + "\t".join([
            key("Beta").public.fingerprint, f"beta.example.org:{PORT}",
            f"Mixminion {__version__}", "beta@example.org"]) + "\n")
        status, out, _ = await env.run("list-servers", "-D", "no", "-F", "software,valid-until",
                                       "Alpha")
        self.assertEqual(out.decode(), f"Alpha:Mixminion {__version__} / Mixminion 9\t"
                                       f"{d(10)} / {d(40)} / {d(70)}\n")
        # a field the descriptor lacks is empty; the canonical name works too
        status, out, _ = await env.run("list-servers", "-D", "no", "-F",
                                       "Delivery/SMTP:Maximum-Size,caps", "Alpha")
        self.assertEqual(out.decode(), "Alpha:100 / \tsmtp relay frag / relay frag\n")

    @inline
    async def test_status_from_recommendations_and_block_lists(self) -> None:
        env = Env(self, [BETA, cli_server("Alpha"), cli_server("Delta"),
                         desc("Old", TODAY - 10 * DAY, TODAY - 2 * DAY)],
                  extra="[Security]\nBlockServers: Delta\nBlockEntries: alpha\nBlockExits: Alpha\n")
        status, _, err = await env.run("import-server",
                                       env.write("g", cli_server("Gamma").text.encode()))
        self.assertEqual(status, 0, err)
        status, out, err = await env.run("list-servers", "-D", "no", "-F", "status")
        self.assertEqual(status, 0, err)
        self.assertEqual(out.decode().splitlines(), [
            "Alpha:(blocked as entry, blocked as exit)",
            "Beta:(ok)",
            "Delta:(blocked)",
            "Gamma:(not recommended)",
            "Old:(expired)",
        ])

    @inline
    async def test_recommended_only_and_caps_by_default(self) -> None:
        env = Env(self, [BETA, cli_server("Alpha")])
        await env.run("import-server", env.write("g", cli_server("Gamma").text.encode()))
        status, out, err = await env.run("list-servers", "-D", "no", "-r")
        self.assertEqual(status, 0, err)
        self.assertEqual(out.decode().splitlines(),
                         ["Alpha:smtp relay frag", "Beta:smtp relay frag"])
        status, out, err = await env.run("list-servers", "-D", "no", "-R")
        self.assertEqual(out.decode().splitlines(),
                         ["Alpha:smtp relay frag", "Beta:smtp relay frag"])
        self.assertIn("-R is deprecated", err)
        status, out, err = await env.run("list-servers", "-D", "no", "-r", "Gamma")
        self.assertEqual((status, out), (1, b""))
        self.assertIn("Gamma has no recommended descriptor", err)

    @inline
    async def test_server_names_restrict_and_unknown_is_an_error(self) -> None:
        env = alpha_env(self)
        status, out, _ = await env.run("list-servers", "-D", "no", "BETA")
        self.assertEqual((status, out), (0, b"Beta:smtp relay frag\t(ok)\n"))
        status, out, err = await env.run("list-servers", "-D", "no", "Beta", "Nobody")
        self.assertEqual((status, out), (1, b""))
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertIn("No descriptors known for Nobody", err)

    @inline
    async def test_separator_and_justify(self) -> None:
        env = Env(self, [ALPHA[0], desc("Zed", TODAY - DAY, TODAY + DAY, smtp=False)])
        status, out, err = await env.run("list-servers", "-D", "no", "-s", " | ")
        self.assertEqual(status, 0, err)
        self.assertEqual(out.decode().splitlines(),
                         ["Alpha:smtp relay frag | (ok)", "Zed:relay frag | (ok)"])
        status, out, _ = await env.run("list-servers", "-D", "no", "-J", "-F",
                                       "caps,status,contact")
        self.assertEqual(out.decode().splitlines(), [
            "Alpha:smtp relay frag (ok) alpha@example.org",
            "Zed:  relay frag      (ok) zed@example.org",
        ])
        status, out, _ = await env.run("list-servers", "-D", "no", "-J", "-s", ",")
        self.assertEqual(out.decode().splitlines(),
                         ["Alpha:smtp relay frag,(ok)", "Zed:  relay frag     ,(ok)"])

    @inline
    async def test_cascade_layouts(self) -> None:
        env = alpha_env(self)
        status, out, err = await env.run("list-servers", "-D", "no", "-c")
        self.assertEqual(status, 0, err)
        self.assertEqual(out.decode().splitlines(), [
            "Alpha:", "  smtp relay frag / relay frag\t(ok)",
            "Beta:", "  smtp relay frag\t(ok)",
        ])
        status, out, _ = await env.run("list-servers", "-D", "no", "-c", "-T", "Alpha")
        self.assertEqual(out.decode().splitlines(), [
            "Alpha:",
            f"  [{d(-1)} to {d(10)}] smtp relay frag\t(ok)",
            f"  [{d(10)} to {d(70)}] relay frag\t(ok)",
        ])
        status, out, _ = await env.run("list-servers", "-D", "no", "-C", "-F", "Caps,status",
                                       "Beta")
        self.assertEqual(out.decode().splitlines(),
                         ["Beta:", "    Caps:smtp relay frag", "    status:(ok)"])
        status, out, _ = await env.run("list-servers", "-D", "no", "--cascade-features", "-T",
                                       "-F", "caps", "Alpha")
        self.assertEqual(out.decode().splitlines(), [
            "Alpha:",
            f"  [{d(-1)} to {d(10)}]", "    caps:smtp relay frag",
            f"  [{d(10)} to {d(70)}]", "    caps:relay frag",
        ])

    @inline
    async def test_list_features_without_a_directory(self) -> None:
        env = Env(self)
        os.unlink(os.path.join(env.user_dir, "dir"))
        # -D yes would fail (the authority is a closed port): nothing is downloaded
        status, out, err = await env.run("list-servers", "--list-features", "-D", "yes")
        self.assertEqual(status, 0, err)
        lines = out.decode().splitlines()
        self.assertEqual(len(lines), len(servers.feature_table()))
        self.assertRegex(lines[0], r"^caps \(capabilities\) +what the server does")
        self.assertIn("fingerprint", [line.split()[0] for line in lines])
        self.assertIn("Server:Software (software)", lines)
        self.assertIn("Server:Valid-After (valid-after)", lines)
        self.assertIn("Incoming/MMTP:Hostname (hostname)", lines)
        self.assertIn("Incoming/MMTP:Version", lines)  # ambiguous: no short form

    def test_every_listed_name_resolves_to_its_feature(self) -> None:
        for feature in servers.feature_table():
            for name in (feature.name, *feature.aliases):
                self.assertIs(servers.resolve_feature(name.upper()), feature)

    @inline
    async def test_bad_features_are_one_line_usage_errors(self) -> None:
        env = alpha_env(self)
        cases = {
            "nosuch": "unknown feature 'nosuch'",
            "cpas": "did you mean caps?",
            "version": "'version' is ambiguous: say Incoming/MMTP:Version, "
                       "Outgoing/MMTP:Version",
            "maximum-size": "Delivery/MBOX:Maximum-Size or Delivery/SMTP:Maximum-Size",
            "Server:Nosuch": "[Server] has no field 'Nosuch'",
            "Nowhere:Key": "no descriptor section is called [Nowhere]",
            "incoming/mmtp": "is a section: name one of its fields, as Incoming/MMTP:KEY",
            "caps,": "none empty",
        }
        for name, message in cases.items():
            status, out, err = await env.run("list-servers", "-D", "no", "-F", "caps",
                                             "-F", name)
            self.assertEqual((status, out), (2, b""), name)
            self.assertEqual(len(err.strip().splitlines()), 1, (name, err))
            self.assertIn("argument -F/--feature", err)
            self.assertIn(message, err)

    @inline
    async def test_wrong_arguments_are_one_line_usage_errors(self) -> None:
        env = alpha_env(self)
        for argv in (["-F"], ["-c", "-C"], ["-s"], ["--no-collapse=yes"], ["-D", "maybe"],
                     ["--list-features=x"], ["--with-time=3"]):
            status, out, err = await env.run("list-servers", *argv)
            self.assertEqual((status, out), (2, b""), argv)
            self.assertEqual(len(err.strip().splitlines()), 1, (argv, err))
            self.assertIn("mixminion-client list-servers", err)


# --- update-servers ----------------------------------------------------------------------


class _Tracking(WrappingFactory):
    """Remembers its connections so cleanup can wait until all are closed."""

    def __init__(self, factory: Any) -> None:
        super().__init__(factory)
        self.waiting: list[defer.Deferred[None]] = []

    def unregisterProtocol(self, p: Any) -> None:  # noqa: N802 - Twisted naming
        super().unregisterProtocol(p)
        if not self.protocols:
            waiting, self.waiting = self.waiting, []
            for w in waiting:
                w.callback(None)

    def closed(self) -> defer.Deferred[None]:
        if not self.protocols:
            return defer.succeed(None)
        done: defer.Deferred[None] = defer.Deferred()
        self.waiting.append(done)
        for p in list(self.protocols):
            p.transport.loseConnection()
        return done


def serve_directory(test: unittest.TestCase, text: str) -> str:
    """A live authority on loopback serving ``text``; its base URL."""
    resource = DirectoryResource(reactor)  # Date from the real clock: no skew
    resource.body = text.encode("ascii")
    factory = _Tracking(server.Site(resource))
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")

    async def stop() -> None:
        await port.stopListening()
        await factory.closed()

    test.addCleanup(lambda: defer.ensureDeferred(stop()))
    return f"http://127.0.0.1:{port.getHost().port}/"


def use_authorities(env: Env, *urls: str) -> None:
    """Point ``env``'s configuration at ``urls``, all with the test authority's key."""
    fingerprint = key(AUTHORITY).public.fingerprint
    with open(env.rc, "w") as f:
        f.write(f"[User]\nUserDir: {env.user_dir}\n[DirectoryServers]\n"
                + "".join(f"Authority: {u} {fingerprint}\n" for u in urls))


class UpdateServersTests(unittest.TestCase):

    @inline
    async def test_authority_down_exits_1_and_names_the_kept_directory(self) -> None:
        env = Env(self)  # its authority is http://127.0.0.1:9/, where nothing listens
        before = os.stat(os.path.join(env.user_dir, "dir")).st_mtime_ns
        status, out, err = await env.run("update-servers")
        self.assertEqual((status, out), (1, b""), err)
        self.assertNotIn("Directory updated", err)
        self.assertEqual(err.count("http://127.0.0.1:9/directory"), 1, err)
        self.assertEqual(err.count("could not connect"), 1, err)
        self.assertIn(f"Keeping the cached directory {env.user_dir}/dir, valid after "
                      f"{d(0)} until {d(1)}.", err)
        self.assertEqual(os.stat(os.path.join(env.user_dir, "dir")).st_mtime_ns, before)
        # -Q keeps the error, and with it the reasons
        status, _, quiet = await env.run("update-servers", "-Q")
        self.assertEqual(status, 1)
        self.assertIn("http://127.0.0.1:9/directory: could not connect", quiet)
        self.assertNotIn("[INFO]", quiet)

    @inline
    async def test_every_authority_down_each_error_once(self) -> None:
        env = Env(self)
        dead = [f"http://127.0.0.1:{closed_port()}/", "http://127.0.0.1:9/"]
        use_authorities(env, *dead)
        os.unlink(os.path.join(env.user_dir, "dir"))
        status, out, err = await env.run("update-servers")
        self.assertEqual((status, out), (1, b""), err)
        self.assertIn("none of the 2 configured authorities gave a valid one", err)
        for url in dead:
            self.assertEqual(err.count(url + "directory"), 1, err)
        self.assertIn("There is no cached directory to keep", err)

    @inline
    async def test_success_replaces_the_directory(self) -> None:
        env = Env(self)
        live = serve_directory(self, directory_text([BETA]))
        use_authorities(env, "http://127.0.0.1:9/", live)
        status, out, err = await env.run("update-servers")
        self.assertEqual((status, out), (0, b"Directory updated\n"), err)
        # the dead authority tried first is reported once, as a warning
        self.assertEqual(err.count("http://127.0.0.1:9/directory"), 1, err)
        self.assertIn("[WARN] http://127.0.0.1:9/directory: could not connect", err)
        status, out, _ = await env.run("list-servers", "-D", "no")
        self.assertEqual(out, b"Beta:smtp relay frag\t(ok)\n")

    @inline
    async def test_no_authorities_configured(self) -> None:
        env = Env(self)
        use_authorities(env)
        status, out, err = await env.run("update-servers")
        self.assertEqual((status, out), (1, b""))
        self.assertIn("No directory authorities are configured", err)

    @inline
    async def test_malformed_http_proxy_is_one_error(self) -> None:
        env = Env(self)
        for proxy in ("http://:8080", "http://proxy:99999"):
            status, out, err = await env.run("update-servers",
                                             environ={**env.environ, "http_proxy": proxy})
            self.assertEqual((status, out), (1, b""), err)
            self.assertIn("http_proxy is set to", err)
            self.assertNotIn("Traceback", err)
