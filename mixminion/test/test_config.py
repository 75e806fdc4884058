"""Tests of ``mixminiond.conf`` parsing and validation (server.md §14)."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from typing import Any, Optional

from twisted.trial import unittest

import mixminion
from mixminion.directory.descriptor import PublishedRule
from mixminion.mmtp.limits import ConnectionLimits
from mixminion.server import config as cfg
from mixminion.config.values import SEVERITIES
from mixminion.server.config import (
    ConfigError,
    RawSection,
    ServerConfig,
    load_config,
    parse_config,
    parse_sections,
    reloadable_differences,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(mixminion.__file__)))

SERVER = """\
[Server]
BaseDir: /tmp/mm-test-base
Mode: relay
Nickname: Tester
Contact-Email: admin@example.org
MixAlgorithm: Binomial
"""
INCOMING = """\
[Incoming/MMTP]
Enabled: yes
Hostname: mix.example.org
"""
OUTGOING = """\
[Outgoing/MMTP]
Enabled: yes
"""
BASE = SERVER + INCOMING + OUTGOING


class ConfigTestCase(unittest.TestCase):
    """Helpers: parse text in a scratch folder (for relative files)."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    #: sections claimed by exit plugins "installed" for these tests
    plugins = {"Delivery/News": None, "Delivery/A": None, "Delivery/B": None}

    def parse(self, text: str) -> ServerConfig:
        return parse_config(text, "mixminiond.conf", config_dir=self.dir,
                            plugin_sections=self.plugins)

    def error(self, text: str) -> ConfigError:
        return self.assertRaises(ConfigError, self.parse, text)

    def assertError(self, text: str, *fragments: str) -> ConfigError:
        exc = self.error(text)
        for fragment in fragments:
            self.assertIn(fragment, str(exc))
        return exc

    def warnings(self, text: str) -> str:
        return "\n".join(self.parse(text).warnings)

    def write(self, name: str, content: str = "") -> str:
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(content)
        return path

    def server(self, extra: str, *sections: str) -> str:
        """BASE with ``extra`` lines in [Server] and more sections after."""
        return SERVER + extra + INCOMING + OUTGOING + "".join(sections)


# --- file syntax --------------------------------------------------------------------------


class SyntaxTests(ConfigTestCase):
    def test_three_separators_and_spacing(self) -> None:
        sections = parse_sections("[A]\nOne: 1\nTwo = 2\nThree 3\nFour:4\nFive=5\nSix  :  6  \n")
        self.assertEqual([(e.key, e.value) for e in sections[0].entries],
                         [("One", "1"), ("Two", "2"), ("Three", "3"), ("Four", "4"),
                          ("Five", "5"), ("Six", "6")])

    def test_value_may_contain_separators(self) -> None:
        entry = parse_sections("[A]\nMessage = a=b: c\n")[0].entries[0]
        self.assertEqual((entry.key, entry.value), ("Message", "a=b: c"))

    def test_empty_value(self) -> None:
        self.assertEqual(parse_sections("[A]\nComments:\n")[0].entries[0].value, "")

    def test_comments_and_blank_lines(self) -> None:
        sections = parse_sections("# top\n\n[A]\n  # indented comment\n\t\nK: v\n# K: w\n")
        self.assertEqual([(e.key, e.value, e.line) for e in sections[0].entries], [("K", "v", 6)])

    def test_continuation_lines_join_with_one_space(self) -> None:
        sections = parse_sections("[A]\nMessage: first\n   second  \n\tthird\nNext: x\n")
        self.assertEqual(sections[0].entries[0].value, "first second third")
        self.assertEqual(sections[0].entries[0].line, 2)
        self.assertEqual(sections[0].entries[1].line, 5)

    def test_continuation_of_empty_value(self) -> None:
        self.assertEqual(parse_sections("[A]\nK:\n  v\n")[0].entries[0].value, "v")

    def test_line_endings(self) -> None:
        for text in ("[A]\r\nK: v\r\nL: w\r\n", "[A]\rK: v\rL: w\r", b"[A]\nK: v\nL: w"):
            sections = parse_sections(text)
            self.assertEqual([(e.key, e.value, e.line) for e in sections[0].entries],
                             [("K", "v", 2), ("L", "w", 3)])

    def test_section_header_forms(self) -> None:
        self.assertEqual([s.name for s in parse_sections("[A]\n[ B/C ]\n[D-E]  \n")],
                         ["A", "B/C", "D-E"])

    def test_syntax_errors(self) -> None:
        cases = [
            ("[A]\nK: v\n[Broken\n", 3, "not a section header"),
            ("[A]\nK: v\n[A] trailing\n", 3, "not a section header"),
            ("[A]\nK: v\n[A b]\n", 3, "not a section header"),
            ("[A]\nK: v\n[]\n", 3, "not a section header"),
            ("[A]\nLonely\n", 2, 'expected "Key: value"'),
            ("K: v\n[A]\n", 1, "before the first [Section]"),
            ("[A]\n  indented\n", 2, "does not continue an entry"),
            ("  indented\n[A]\n", 1, "does not continue an entry"),
            ("[A]\nK: v\n[B]\nL: w\n[A]\n", 5, "section appears twice (first on line 1)"),
            ("[A]\nK: caf\u00e9\n", 2, "character 0xe9 is not allowed"),
            (b"[A]\nK: v\x00\n", 2, "character 0x00 is not allowed"),
        ]
        for text, line, reason in cases:
            exc = self.assertRaises(ConfigError, parse_sections, text, "f.conf")
            self.assertEqual(exc.line, line, text)
            self.assertIn(reason, str(exc))
            self.assertTrue(str(exc).startswith(f"f.conf:{line}:"), str(exc))

    def test_tab_vt_and_cr_are_allowed(self) -> None:
        self.assertEqual(parse_sections("[A]\nK:\tv\x0bw\n")[0].entries[0].value, "v\x0bw")

    def test_single_valued_option_twice(self) -> None:
        exc = self.assertError(BASE.replace("Nickname: Tester", "Nickname: Tester\nNickname: Other"),
                               "[Server] Nickname: given twice (first on line 4)")
        self.assertEqual(exc.line, 5)

    def test_many_valued_options_accumulate(self) -> None:
        config = self.parse(BASE + "Allow: 192.0.2.1\nAllow: 192.0.2.2\n")
        self.assertEqual([r.text for r in config.outgoing.allow], ["192.0.2.1", "192.0.2.2"])

    def test_keys_are_case_sensitive(self) -> None:
        self.assertError(BASE.replace("MixAlgorithm: Binomial", "mixAlgorithm: Binomial"),
                         "[Server] mixAlgorithm: unknown option; did you mean MixAlgorithm?")

    def test_section_names_are_case_sensitive(self) -> None:
        self.assertError(BASE.replace("[Server]", "[server]"), "[Server]: required section is missing")

    def test_required_sections(self) -> None:
        exc = self.assertError(INCOMING, "mixminiond.conf:3: [Server]: required section is missing")
        self.assertEqual(exc.section, "Server")
        self.assertError(SERVER + OUTGOING, "[Incoming/MMTP]: required section is missing")

    def test_required_options(self) -> None:
        for key in ("Mode", "Nickname", "Contact-Email"):
            text = re.sub(rf"^{key}:.*\n", "", BASE, flags=re.M)
            exc = self.assertError(text, f"mixminiond.conf:1: [Server] {key}: required option is missing")
            self.assertEqual((exc.section, exc.key, exc.line), ("Server", key, 1))
        self.assertError(SERVER + "[Incoming/MMTP]\nHostname: h\n",
                         "[Incoming/MMTP] Enabled: required option is missing")
        self.assertError(BASE + "[Delivery/Fragmented]\nEnabled: no\n",
                         "[Delivery/Fragmented] MaximumSize: required option is missing")

    def test_unknown_sections_and_options_are_errors(self) -> None:
        exc = self.assertError(BASE + "Frobnicate: yes\n",
                               "mixminiond.conf:12: [Outgoing/MMTP] Frobnicate: unknown option")
        self.assertEqual((exc.line, exc.key), (12, "Frobnicate"))
        self.assertError(BASE + "[Extra]\nK: v\n", "mixminiond.conf:12: [Extra]: unknown section")
        self.assertError(BASE + "[Servr]\nK: v\n", "did you mean [Server]?")
        self.assertError(self.server("MixIntervall: 10 minutes\n"),
                         "[Server] MixIntervall: unknown option; did you mean MixInterval?")

    def test_unreadable_file(self) -> None:
        exc = self.assertRaises(ConfigError, load_config, os.path.join(self.dir, "missing.conf"))
        self.assertIn("missing.conf:0: cannot read the file", str(exc))


# --- value types ---------------------------------------------------------------------------


class ValueTypeTests(unittest.TestCase):
    def good(self, vtype: cfg.ValueType, cases: dict[str, Any]) -> None:
        for text, value in cases.items():
            self.assertEqual(vtype.parse(text), value, text)

    def bad(self, vtype: cfg.ValueType, texts: list[str], fragment: str = "") -> None:
        for text in texts:
            exc = self.assertRaises(ValueError, vtype.parse, text)
            self.assertIn(fragment, str(exc), text)

    def test_boolean(self) -> None:
        self.good(cfg.BOOLEAN, {"yes": True, "Y": True, "true": True, "ON": True, "1": True,
                                "no": False, "N": False, "False": False, "off": False, "0": False})
        self.bad(cfg.BOOLEAN, ["", "2", "maybe", "yes please"], "is not a boolean")
        self.assertEqual(cfg.BOOLEAN.format(True), "yes")

    def test_int(self) -> None:
        self.good(cfg.INT, {"0": 0, "16": 16, "-1": -1, "+5": 5})
        self.bad(cfg.INT, ["", "1.5", "ten", "1 000", "0x10"], "is not an integer")

    def test_port(self) -> None:
        self.good(cfg.PORT, {"1": 1, "48099": 48099, "65535": 65535})
        self.bad(cfg.PORT, ["0", "65536", "-1"], "is not a TCP port")

    def test_interval(self) -> None:
        self.good(cfg.INTERVAL, {"30 minutes": 1800, ".5 months": 1296000, "1 year": 31536000,
                                 "2 weeks": 1209600, "90 sec": 90})
        self.bad(cfg.INTERVAL, ["ten minutes", "30", "1 fortnight"], "is not an interval")
        self.assertEqual(cfg.INTERVAL.format(1800), "30 minutes")

    def test_interval_list(self) -> None:
        self.assertEqual(cfg.INTERVAL_LIST.parse("every 1 hour for 1 day, 7 hours for 5 days"),
                         (3600,) * 24 + (25200,) * 18)
        self.bad(cfg.INTERVAL_LIST, ["every 1 hour", ""])

    def test_size(self) -> None:
        self.good(cfg.SIZE, {
            "1 GB": 1073741824, "1GB": 1 << 30, "2 gbs": 2 << 30, "1 g": 1 << 30, "1 GiB": 1 << 30,
            "100K": 102400, "100 KB": 102400, "100kb": 102400, "100 kbs": 102400,
            "1.5 MB": 1572864, "3 m": 3 << 20, "12": 12, "12 b": 12, "12 bytes": 12,
            "1 byte": 1, "7 octets": 7, ".5 K": 512,
        })
        self.bad(cfg.SIZE, ["1 GBx", "1 GB x", "1 TB", "KB", "", "1 G B", "ten", "-1 KB", "1 s"],
                 "is not a size")
        self.assertEqual(cfg.SIZE.format(102400), "100 KB")
        self.assertEqual(cfg.SIZE.format(1 << 30), "1 GB")
        self.assertEqual(cfg.SIZE.format(3 << 20), "3 MB")
        self.assertEqual(cfg.SIZE.format(1000), "1000 bytes")
        self.assertEqual(cfg.SIZE.format(1), "1 byte")

    def test_fraction(self) -> None:
        self.good(cfg.FRACTION, {"60%": 0.6, "60 %": 0.6, "0.6": 0.6, ".5": 0.5, "100%": 1.0,
                                 "0": 0.0, "1": 1.0, "12.5%": 0.125})
        self.bad(cfg.FRACTION, ["101%", "1.5", "2"], "between 0 and 1")
        self.bad(cfg.FRACTION, ["abc", "-5%", "", "60%%"], "is not a fraction")
        self.assertEqual(cfg.FRACTION.format(0.6), "60.00%")

    def test_severity(self) -> None:
        self.good(cfg.SEVERITY, {s.lower(): s for s in SEVERITIES})
        self.good(cfg.SEVERITY, {"Warn": "WARN"})
        self.bad(cfg.SEVERITY, ["WARNING", "", "loud"], "is not a log severity")

    def test_filename(self) -> None:
        self.good(cfg.FILENAME, {"log": "log", '"my log"': "my log", "'x'": "x", "/a/b": "/a/b"})
        self.assertEqual(cfg.FILENAME.parse("~/x"), os.path.expanduser("~/x"))
        self.bad(cfg.FILENAME, ['""'], "is not a filename")

    def test_command(self) -> None:
        self.good(cfg.COMMAND, {"/usr/sbin/sendmail -i -t": ("/usr/sbin/sendmail", "-i", "-t"),
                                "prog 'an arg'": ("prog", "an arg")})
        self.bad(cfg.COMMAND, ["", "prog 'unbalanced"], "is not a command")

    def test_user(self) -> None:
        self.good(cfg.USER, {"root": 0, "0": 0, "4242": 4242})
        self.bad(cfg.USER, ["no-such-user-here"], "is not a user")

    def test_email(self) -> None:
        self.good(cfg.EMAIL, {"a@example.org": "a@example.org", "first.last@b.c": "first.last@b.c"})
        self.bad(cfg.EMAIL, ["nobody", "a@", "@b.org", "a b@c.org", "a@192.0.2.1", "a@b@c"],
                 "is not an e-mail address")

    def test_nickname(self) -> None:
        self.good(cfg.NICKNAME, {"Alice": "Alice", "a-1": "a-1", "x" * 24: "x" * 24})
        self.bad(cfg.NICKNAME, ["1abc", "x" * 25, "bad_name", "", "a b"], "is not a nickname")

    def test_host(self) -> None:
        self.good(cfg.HOST, {"mix.example.org": "mix.example.org", "localhost": "localhost",
                             "192.0.2.1": "192.0.2.1"})
        self.bad(cfg.HOST, [".lead", "a..b", "under_score", "", "a b"], "is not a hostname")

    def test_ip(self) -> None:
        self.good(cfg.IP, {"127.0.0.1": "127.0.0.1", "0.0.0.0": "0.0.0.0"})
        self.bad(cfg.IP, ["256.0.0.1", "1.2.3", "::1", "localhost"], "is not an IPv4 address")

    def test_ipv6(self) -> None:
        self.good(cfg.IPV6, {"::1": "::1", "2001:DB8:0:0::1": "2001:db8::1", "::": "::"})
        self.bad(cfg.IPV6, ["127.0.0.1", "::g", "1::2::3"], "is not an IPv6 address")

    def test_mix_algorithm_names(self) -> None:
        self.good(cfg.MIX_ALGORITHM, {
            "timed": "Timed", "TIMED": "Timed",
            "Cottrell": "Cottrell", "mixmaster": "Cottrell", "DynamicPool": "Cottrell",
            "binomial": "Binomial", "BinomialCottrell": "Binomial",
            "binomialdynamicpool": "Binomial",
        })
        self.bad(cfg.MIX_ALGORITHM, ["pool", ""], "is not a mix algorithm")

    def test_authority(self) -> None:
        fingerprint = "0123456789ABCDEF0123456789abcdef01234567"
        authority = cfg.AUTHORITY.parse(f"https://dir.example.net/ {fingerprint}")
        self.assertEqual(authority, cfg.Authority("https://dir.example.net/", fingerprint.upper()))
        spaced = "0123 4567 89AB CDEF 0123  4567 89AB CDEF 0123 4567"
        self.assertEqual(cfg.AUTHORITY.parse(f"http://d/ {spaced}").fingerprint, fingerprint.upper())
        self.bad(cfg.AUTHORITY, ["https://d/", f"ftp://d/ {fingerprint}", "https://d/ 0123",
                                 fingerprint], "is not a directory authority")


class AddressRuleTests(unittest.TestCase):
    def test_forms_and_default_ports(self) -> None:
        allow, deny = cfg.ALLOW_RULE.parse, cfg.DENY_RULE.parse
        rule = allow("192.0.2.1")
        self.assertEqual((str(rule.network), rule.low_port, rule.high_port), ("192.0.2.1/32", 48099, 48099))
        rule = deny("192.0.2.1")
        self.assertEqual((rule.low_port, rule.high_port), (0, 65535))
        rule = allow("192.0.2.0/255.255.255.0 1-1024")
        self.assertEqual((str(rule.network), rule.low_port, rule.high_port), ("192.0.2.0/24", 1, 1024))
        rule = deny("*")
        self.assertIsNone(rule.network)
        rule = allow("*   443")
        self.assertEqual((rule.network, rule.low_port, rule.high_port, rule.text), (None, 443, 443, "* 443"))

    def test_bad_rules(self) -> None:
        for text in ["*/255.0.0.0", "192.0.2.1 0", "192.0.2.1 10-5", "192.0.2.1 70000",
                     "300.0.0.1", "::1", "host.example.org", "", "192.0.2.1 80 90"]:
            self.assertRaises(ValueError, cfg.ALLOW_RULE.parse, text)
        self.assertIn("contiguous", str(self.assertRaises(ValueError, cfg.DENY_RULE.parse,
                                                          "192.0.2.0/255.0.255.0")))

    def test_matching(self) -> None:
        rule = cfg.ALLOW_RULE.parse("192.0.2.0/255.255.255.0 1-1024")
        self.assertTrue(rule.matches("192.0.2.77", 80))
        self.assertTrue(rule.matches("192.0.2.77"))
        self.assertFalse(rule.matches("192.0.2.77", 2000))
        self.assertFalse(rule.matches("192.0.3.1", 80))
        self.assertFalse(rule.matches("not an ip", 80))
        self.assertTrue(cfg.DENY_RULE.parse("*").matches("2001:db8::1", 1))
        self.assertEqual(rule.published(), PublishedRule("Allow", "192.0.2.0/255.255.255.0 1-1024"))


# --- whole configurations ---------------------------------------------------------------------


class ParsedValueTests(ConfigTestCase):
    def test_minimal_defaults(self) -> None:
        config = self.parse(BASE)
        server = config.server
        self.assertEqual(server.base_dir, "/tmp/mm-test-base")
        self.assertIsNone(server.log_file)
        self.assertEqual(server.stats_file, "/tmp/mm-test-base/stats")
        self.assertEqual(server.queue_dir, "/tmp/mm-test-base/work/queues")
        self.assertEqual(server.queue("incoming"), "/tmp/mm-test-base/work/queues/incoming")
        self.assertEqual(server.hashlog_dir, "/tmp/mm-test-base/work/hashlogs")
        self.assertEqual(server.mix_interval, 1800)
        self.assertEqual(server.mix_algorithm, "Binomial")
        self.assertEqual(server.mix_pool_rate, 0.6)
        self.assertEqual(server.mix_pool_min_size, 5)
        self.assertEqual(server.log_level, "WARN")
        self.assertEqual(server.identity_key_bits, 2048)
        self.assertEqual(server.public_key_lifetime, 30 * 86400)
        self.assertEqual(server.max_queued_packets, 50000)
        self.assertEqual(server.min_free_disk, 100 << 20)
        self.assertIsNone(server.metrics_port)
        self.assertEqual(server.metrics_address, "127.0.0.1")
        self.assertIsNone(server.max_bandwidth)
        inc = config.incoming
        self.assertEqual((inc.ip, inc.port, inc.listen_ip, inc.listen_port), ("0.0.0.0", 48099, "0.0.0.0", 48099))
        self.assertEqual((inc.max_connections, inc.max_connections_per_address), (128, 8))
        self.assertEqual((inc.handshake_timeout, inc.line_timeout, inc.frame_timeout), (60, 30, 60))
        self.assertIsNone(inc.listen_ip6)
        self.assertFalse(inc.legacy)
        out = config.outgoing
        self.assertTrue(out.enabled)
        self.assertEqual(out.retry, (3600,) * 24 + (25200,) * 18)
        self.assertEqual((out.max_connections, out.max_packets_per_connection), (16, 1000))
        self.assertFalse(config.directory.publish)
        self.assertEqual(config.directory.authorities, ())
        ping = config.pinging
        self.assertFalse(ping.enabled)
        self.assertEqual((ping.interval, ping.timeout, ping.window, ping.report_interval),
                         (120, 3600, 86400, 3600))
        self.assertIsNone(ping.server_ping_period)
        self.assertTrue(config.host.file_paranoia)
        self.assertEqual(config.host.entropy_source, "/dev/urandom")
        self.assertEqual(config.deliveries, {})
        self.assertEqual(config.enabled_deliveries(), ())

    def test_raw_access(self) -> None:
        config = self.parse(BASE)
        self.assertEqual(config["Server", "MixInterval"], 1800)
        self.assertEqual(config.get("Server", "Nickname"), "Tester")
        self.assertEqual(config.get("Server", "MaxBandwidth", "none"), "none")
        self.assertTrue(config.is_set("Server", "Nickname"))
        self.assertFalse(config.is_set("Server", "MixInterval"))
        self.assertTrue(config.has_section("Outgoing/MMTP"))
        self.assertFalse(config.has_section("Pinging"))
        self.assertRaises(KeyError, config.__getitem__, ("Server", "NoSuchOption"))

    def test_new_options(self) -> None:
        config = self.parse(
            SERVER + "MaxQueuedPackets: 10\nMinFreeDisk: 1 GB\nMetricsPort: 9190\n"
            "MetricsAddress: ::1\n"
            + INCOMING + "IP: 192.0.2.5\nPort: 48100\nListenIP: 10.0.0.1\nListenPort: 40000\n"
            "ListenIP6: ::\nMaxConnections: 10\nMaxConnectionsPerAddress: 2\n"
            "HandshakeTimeout: 5 seconds\nLineTimeout: 6 seconds\nFrameTimeout: 7 seconds\n"
            + OUTGOING + "MaxPacketsPerConnection: 3\nMaxConnections: 4\n"
            "[Delivery/SMTP]\nEnabled: no\nSMTPPort: 2525\n")
        self.assertEqual((config.server.max_queued_packets, config.server.min_free_disk), (10, 1 << 30))
        self.assertEqual((config.server.metrics_port, config.server.metrics_address), (9190, "::1"))
        inc = config.incoming
        self.assertEqual((inc.ip, inc.port, inc.listen_ip, inc.listen_port, inc.listen_ip6),
                         ("192.0.2.5", 48100, "10.0.0.1", 40000, "::"))
        self.assertEqual(config.connection_limits(), ConnectionLimits(
            max_connections=10, max_per_source=2, handshake_timeout=5.0, line_timeout=6.0,
            frame_timeout=7.0, idle_timeout=300.0))
        self.assertEqual((config.outgoing.max_packets_per_connection, config.outgoing.max_connections), (3, 4))
        self.assertEqual(config.delivery("SMTP").smtp_port, 2525)

    def test_listen_defaults_follow_published(self) -> None:
        config = self.parse(SERVER + INCOMING + "IP: 127.0.0.1\nPort: 48199\n" + OUTGOING)
        self.assertEqual((config.incoming.listen_ip, config.incoming.listen_port), ("127.0.0.1", 48199))

    def test_error_message_names_file_line_option_reason(self) -> None:
        text = BASE.replace("MixAlgorithm: Binomial", "MixInterval: ten minutes")
        exc = self.error(text)
        self.assertEqual(str(exc), 'mixminiond.conf:6: [Server] MixInterval: "ten minutes" is not '
                                   'an interval (expected NUMBER UNIT, e.g. "30 minutes")')
        self.assertEqual((exc.filename, exc.line, exc.section, exc.key), ("mixminiond.conf", 6, "Server", "MixInterval"))

    def test_value_errors_in_every_section(self) -> None:
        cases = [
            ("[Host]\nFileParanoia: perhaps\n", "[Host] FileParanoia:", "is not a boolean"),
            ("[Pinging]\nServerPingPeriod: often\n", "[Pinging] ServerPingPeriod:", "is not an interval"),
            ("[DirectoryServers]\nPublish: maybe\n", "[DirectoryServers] Publish:", "is not a boolean"),
            ("[Delivery/SMTP]\nEnabled: no\nMaximumSize: 1 GBx\n", "[Delivery/SMTP] MaximumSize:", "is not a size"),
            ("[Delivery/MBOX]\nEnabled: no\nRetry: every 1 hour\n", "[Delivery/MBOX] Retry:", "for DURATION"),
        ]
        for section, where, reason in cases:
            self.assertError(BASE + section, where, reason)
        self.assertError(BASE.replace("Nickname: Tester", "Nickname: 9lives"),
                         "[Server] Nickname:", "is not a nickname")
        self.assertError(BASE.replace("Hostname: mix.example.org", "Hostname: bad..name"),
                         "[Incoming/MMTP] Hostname:", "is not a hostname")
        self.assertError(self.server("Comments: " + "x" * 1025 + "\n"), "[Server] Comments:",
                         "at most 1024 allowed")
        self.assertError(self.server("LogLevel: chatty\n"), "[Server] LogLevel:", "is not a log severity")
        self.assertError(self.server("Contact-Fingerprint: " + "x" * 129 + "\n"),
                         "[Server] Contact-Fingerprint:")
        self.assertError(self.server("Module: notdotted\n"), "[Server] Module:", "package.module.Class")
        self.assertError(BASE.replace("admin@example.org", "a" * 250 + "@example.org"),
                         "[Server] Contact-Email:", "256 characters")

    def test_address_rules_in_file_order(self) -> None:
        config = self.parse(SERVER + INCOMING + "Deny: 192.0.2.66\nAllow: 192.0.2.0/255.255.255.0\n"
                            "Deny: *\n" + OUTGOING + "Deny: 192.0.2.1\nAllow: * 48099\nDeny: *\n")
        inc = config.incoming
        self.assertEqual([(r.allow, r.text) for r in inc.address_rules],
                         [(False, "192.0.2.66"), (True, "192.0.2.0/255.255.255.0"), (False, "*")])
        rules = inc.connection_rules()
        self.assertFalse(rules.allows("192.0.2.66"))
        self.assertTrue(rules.allows("192.0.2.67"))
        self.assertTrue(rules.allows("::ffff:192.0.2.67"))
        self.assertFalse(rules.allows("198.51.100.1"))
        self.assertEqual(inc.published_rules()[0], PublishedRule("Deny", "192.0.2.66"))
        out = config.outgoing
        self.assertFalse(out.allows("192.0.2.1", 48099))
        self.assertTrue(out.allows("192.0.2.2", 48099))
        self.assertFalse(out.allows("192.0.2.2", 48100))

    def test_no_rules_allow_everyone(self) -> None:
        config = self.parse(BASE)
        self.assertTrue(config.incoming.connection_rules().allows("198.51.100.1"))
        self.assertTrue(config.outgoing.allows("198.51.100.1", 1))

    def test_directory_section(self) -> None:
        fingerprint = "AB" * 20
        config = self.parse(BASE + f"[DirectoryServers]\nPublish: yes\nAuthority: https://a/ {fingerprint}\n"
                            f"Authority: https://b/ {fingerprint}\n")
        self.assertTrue(config.directory.publish)
        self.assertEqual([a.url for a in config.directory.authorities], ["https://a/", "https://b/"])
        self.assertEqual(str(config.directory.authorities[0]), f"https://a/ {fingerprint}")

    def test_host_section(self) -> None:
        config = self.parse(BASE + "[Host]\nTrustedUser: root\nTrustedUser: 4242\n"
                            "FileParanoia: no\nEntropySource: /dev/urandom\n")
        self.assertEqual(config.host.trusted_users, (0, 4242))
        self.assertFalse(config.host.file_paranoia)
        self.assertIsNone(config.host.shred_command)
        self.assertEqual(config.warnings, ())

    def test_refused_options(self) -> None:
        """What the node cannot do stops start-up with what to do instead;
        the default value of a refused option is what the node does."""
        cases = [
            ("[Host]\nShredCommand: /bin/true\n", "[Host] ShredCommand: not supported", "remove ShredCommand"),
            ("[Host]\nEntropySource: /dev/random\n", "[Host] EntropySource: not supported", "getrandom"),
            ("LogFile: log\n", "[Server] LogFile: not supported", "--logfile"),
            ("Daemon: no\n", "[Server] Daemon: not supported", "-n (--nodaemon)"),
            ("EchoMessages: yes\n", "[Server] EchoMessages: not supported", "run it with -n"),
            ("EncryptIdentityKey: yes\n", "[Server] EncryptIdentityKey: not supported", "set EncryptIdentityKey to no"),
            ("EncryptPrivateKey: yes\n", "[Server] EncryptPrivateKey: not supported", "mode 0600"),
            ("[DirectoryServers]\nServerURL: http://x/\n", "ServerURL: not supported", "Authority: URL FINGERPRINT"),
            ("[DirectoryServers]\nPublishURL: http://x/\n", "PublishURL: not supported", "Authority"),
            ("[DirectoryServers]\nMaxSkew: 5 minutes\n", "MaxSkew: not supported", "remove MaxSkew"),
        ]
        for extra, *fragments in cases:
            if extra.startswith("["):
                self.assertError(BASE + extra, *fragments)
            else:
                self.assertError(self.server(extra), *fragments)
        self.parse(self.server("EncryptIdentityKey: no\nEncryptPrivateKey: no\n"))


class PathTests(ConfigTestCase):
    def test_server_paths_are_under_base_dir(self) -> None:
        config = self.parse(SERVER.replace("/tmp/mm-test-base", "home") + "StatsFile: logs/stats\n"
                            "WorkDir: /var/tmp/w\nKeyDir: '~/k'\nQueueDir: q\n" + INCOMING + OUTGOING)
        base = os.path.join(self.dir, "home")
        server = config.server
        self.assertEqual(server.base_dir, base)  # relative BaseDir: next to the config file
        self.assertEqual(server.stats_file, os.path.join(base, "logs/stats"))
        self.assertEqual(server.work_dir, "/var/tmp/w")
        self.assertEqual(server.key_dir, os.path.expanduser("~/k"))
        self.assertEqual(server.queue_dir, os.path.join(base, "q"))
        self.assertEqual(server.pid_file, os.path.join(base, "pid"))
        self.assertEqual(server.tls_dir, "/var/tmp/w/tls")

    def test_queue_dir_defaults_inside_work_dir(self) -> None:
        config = self.parse(self.server("WorkDir: /var/tmp/w\n"))
        self.assertEqual(config.server.queue_dir, "/var/tmp/w/queues")

    def test_base_dir_default_and_homedir(self) -> None:
        text = BASE.replace("BaseDir: /tmp/mm-test-base\n", "")
        config = self.parse(text)
        self.assertEqual(config.server.base_dir, "/var/spool/minion")
        self.assertIn("[Server] BaseDir: not set; using /var/spool/minion", "\n".join(config.warnings))
        config = self.parse(text.replace("Mode:", "Homedir: /srv/mm\nMode:"))
        self.assertEqual(config.server.base_dir, "/srv/mm")
        self.assertIn("Homedir: obsolete name; write BaseDir instead", "\n".join(config.warnings))
        self.assertError(self.server("Homedir: /elsewhere\n"), "BaseDir and Homedir disagree")
        self.parse(self.server("Homedir: /tmp/mm-test-base\n"))

    def test_supplied_files_are_next_to_the_config(self) -> None:
        self.write("addresses", "a: a@example.org\n")
        self.write("blacklist", "deny user root\n")
        config = self.parse(BASE + MBOX + "AddressFile: addresses\n"
                            "[Delivery/SMTP]\nEnabled: yes\nReturnAddress: n@example.org\nBlacklistFile: blacklist\n")
        self.assertEqual(config.delivery("MBOX").address_file, os.path.join(self.dir, "addresses"))
        self.assertEqual(config.delivery("SMTP").blacklist_file, os.path.join(self.dir, "blacklist"))

    def test_load_config_uses_the_file_folder(self) -> None:
        self.write("addresses", "a: a@example.org\n")
        path = self.write("node.conf", BASE + MBOX + "AddressFile: addresses\n")
        config = load_config(path)
        self.assertEqual(config.filename, path)
        self.assertEqual(config.delivery("MBOX").address_file, os.path.join(self.dir, "addresses"))


MBOX = """\
[Delivery/MBOX]
Enabled: yes
RemoveContact: admin@example.org
ReturnAddress: nobody@example.org
"""


class CrossFieldTests(ConfigTestCase):
    def test_identity_key_bits(self) -> None:
        for bits in ("1024", "2047", "4097", "8192"):
            self.assertError(self.server(f"IdentityKeyBits: {bits}\n"),
                             "[Server] IdentityKeyBits:", "must be between 2048 and 4096")
        self.assertEqual(self.parse(self.server("IdentityKeyBits: 4096\n")).server.identity_key_bits, 4096)

    def test_key_lifetime_and_overlap(self) -> None:
        self.assertError(self.server("PublicKeyLifetime: 23 hours\n"), "[Server] PublicKeyLifetime:",
                         "23 hours is out of range: must be at least 1 day")
        self.parse(self.server("PublicKeyLifetime: 1 day\n"))
        for text in ("5 hours", "73 hours", "4 days"):
            self.assertError(self.server(f"PublicKeyOverlap: {text}\n"), "[Server] PublicKeyOverlap:",
                             "between 6 hours and 3 days")
        for text in ("6 hours", "72 hours"):
            self.parse(self.server(f"PublicKeyOverlap: {text}\n"))

    def test_pool_and_intervals(self) -> None:
        self.assertError(self.server("MixPoolMinSize: -1\n"), "[Server] MixPoolMinSize:", "at least 0")
        self.parse(self.server("MixPoolMinSize: 0\n"))
        self.assertError(self.server("MixInterval: 0 seconds\n"), "[Server] MixInterval:")
        self.assertError(self.server("Timeout: 0 seconds\n"), "[Server] Timeout:")
        self.assertError(self.server("MaxQueuedPackets: 0\n"), "[Server] MaxQueuedPackets:")

    def test_mode(self) -> None:
        self.assertError(BASE.replace("Mode: relay", "Mode: local"), "[Server] Mode:", "not implemented")
        self.assertError(BASE.replace("Mode: relay", "Mode: exit"), "is not a server mode")
        self.assertEqual(self.parse(BASE.replace("Mode: relay", "Mode: RELAY")).server.mode, "relay")

    def test_max_connections(self) -> None:
        self.assertError(SERVER + INCOMING + "MaxConnections: 0\n" + OUTGOING,
                         "[Incoming/MMTP] MaxConnections:", "at least 1")
        self.assertError(SERVER + INCOMING + "MaxConnectionsPerAddress: 0\n" + OUTGOING,
                         "[Incoming/MMTP] MaxConnectionsPerAddress:")
        self.assertError(BASE + "MaxConnections: 0\n", "[Outgoing/MMTP] MaxConnections:", "at least 1")
        self.assertError(BASE + "MaxPacketsPerConnection: 0\n", "[Outgoing/MMTP] MaxPacketsPerConnection:")
        self.assertIn("larger than MaxConnections",
                      self.warnings(SERVER + INCOMING + "MaxConnections: 4\n" + OUTGOING))

    def test_keep_open(self) -> None:
        self.assertEqual(self.parse(BASE).outgoing.keep_open, 5)
        self.assertEqual(self.parse(BASE + "KeepOpen: 0 seconds\n").outgoing.keep_open, 0)
        self.assertEqual(self.parse(BASE + "KeepOpen: 1 minute\n").outgoing.keep_open, 60)
        self.assertError(BASE + "KeepOpen: 61 seconds\n", "[Outgoing/MMTP] KeepOpen:",
                         "must be between 0 seconds and 1 minute")

    def test_bandwidth(self) -> None:
        config = self.parse(self.server("MaxBandwidth: 100 KB\n"))
        self.assertEqual((config.server.max_bandwidth, config.server.max_bandwidth_spike), (102400, 512000))
        self.assertEqual(self.parse(self.server("MaxBandwidth: 1M\nMaxBandwidthSpike: 2M\n"))
                         .server.max_bandwidth_spike, 2 << 20)
        self.assertError(self.server("MaxBandwidth: 1M\nMaxBandwidthSpike: 100K\n"),
                         "[Server] MaxBandwidthSpike:", "less than MaxBandwidth")
        self.assertError(self.server("MaxBandwidth: 0\n"), "[Server] MaxBandwidth:")
        self.assertIn("ignored without MaxBandwidth", self.warnings(self.server("MaxBandwidthSpike: 1M\n")))

    def test_smtp_server_and_sendmail_are_exclusive(self) -> None:
        for section in ("[Delivery/SMTP]\nEnabled: no\n", "[Delivery/MBOX]\nEnabled: no\n"):
            self.assertError(BASE + section + "SMTPServer: localhost\nSendmailCommand: /bin/true\n",
                             "SendmailCommand: give SMTPServer or SendmailCommand, not both")

    def test_sendmail_command(self) -> None:
        smtp = "[Delivery/SMTP]\nEnabled: yes\nReturnAddress: n@example.org\n"
        config = self.parse(BASE + smtp + "SendmailCommand: sh -c 'cat > /dev/null'\n")
        self.assertEqual(config.delivery("SMTP").sendmail_command, (shutil.which("sh"), "-c", "cat > /dev/null"))
        self.assertIsNone(config.delivery("SMTP").smtp_server)
        self.assertError(BASE + smtp + "SendmailCommand: /no/such/sendmail -t\n",
                         "[Delivery/SMTP] SendmailCommand:", "is not an executable program")
        # a disabled module's command is not looked for
        self.parse(BASE + "[Delivery/SMTP]\nEnabled: no\nSendmailCommand: /no/such/sendmail\n")

    def test_return_address_required_when_enabled(self) -> None:
        self.assertError(BASE + "[Delivery/SMTP]\nEnabled: yes\n",
                         "[Delivery/SMTP] ReturnAddress: required when the module is enabled")
        self.parse(BASE + "[Delivery/SMTP]\nEnabled: no\n")
        self.write("a", "x: x@example.org\n")
        self.assertError(BASE + MBOX.replace("ReturnAddress: nobody@example.org\n", "") + "AddressFile: a\n",
                         "[Delivery/MBOX] ReturnAddress: required")
        self.assertIn("[Delivery/SMTP] ReturnAddress: does not look like a mailbox",
                      self.warnings(BASE + "[Delivery/SMTP]\nEnabled: yes\nReturnAddress: nobody\n"))

    def test_mbox_requirements(self) -> None:
        self.assertError(BASE + MBOX, "[Delivery/MBOX] AddressFile: required when the module is enabled")
        exc = self.assertError(BASE + MBOX + "AddressFile: missing-file\n",
                               "[Delivery/MBOX] AddressFile:", "does not exist")
        self.assertEqual(exc.line, 16)
        self.write("a", "x: x@example.org\n")
        self.assertError(BASE + MBOX.replace("RemoveContact: admin@example.org\n", "") + "AddressFile: a\n",
                         "[Delivery/MBOX] RemoveContact: required")
        self.assertError(BASE + MBOX + "AddressFile: a\nFromTag: [x]\n",
                         "[Delivery/MBOX] FromTag: not supported: MBOX always signs its mail [Anon]")
        config = self.parse(BASE + MBOX + "AddressFile: a\n")
        mbox = config.delivery("MBOX")
        self.assertIsInstance(mbox, cfg.DeliverySettings)
        self.assertEqual((mbox.smtp_server, mbox.smtp_port, mbox.remove_contact),
                         ("localhost", 25, "admin@example.org"))
        self.assertEqual(config.enabled_deliveries(), ("MBOX",))
        # disabled: nothing is required or checked
        self.parse(BASE + "[Delivery/MBOX]\nEnabled: no\nAddressFile: missing\n")

    def test_blacklist_must_exist(self) -> None:
        smtp = "[Delivery/SMTP]\nEnabled: yes\nReturnAddress: n@example.org\n"
        self.assertError(BASE + smtp + "BlacklistFile: nothing-here\n", "[Delivery/SMTP] BlacklistFile:",
                         "does not exist")
        self.write("bl", "deny user root\n")
        self.parse(BASE + smtp + "BlacklistFile: bl\n")

    def test_maximum_size_is_raised_and_rounded(self) -> None:
        smtp = "[Delivery/SMTP]\nEnabled: yes\nReturnAddress: n@example.org\n"
        for given, effective, warning in [
            ("10K", 32768, "10 KB is under the 32 KB minimum; using 32 KB"),
            ("40000", 40960, "40000 bytes is not a whole number of KB; using 40 KB"),
            ("100K", 102400, None),
            ("32 KB", 32768, None),
        ]:
            config = self.parse(BASE + smtp + f"MaximumSize: {given}\n")
            self.assertEqual(config.delivery("SMTP").maximum_size, effective)
            warnings = "\n".join(config.warnings)
            if warning:
                self.assertIn(f"[Delivery/SMTP] MaximumSize: {warning}", warnings)
            else:
                self.assertNotIn("MaximumSize", warnings)
        self.assertEqual(self.parse(BASE + smtp).delivery("SMTP").maximum_size, 100 * 1024)

    def test_section_of_a_module_not_installed(self) -> None:
        """The reference's Type II bridge has no module here: its section
        is refused in one line naming it."""
        exc = self.assertError(BASE + "[Delivery/SMTP-Via-Mixmaster]\nEnabled: yes\n",
                               "[Delivery/SMTP-Via-Mixmaster]: no installed exit module handles "
                               "this section")
        self.assertEqual(exc.line, 12)

    def test_fragmented(self) -> None:
        frag = "[Delivery/Fragmented]\nEnabled: yes\nMaximumSize: 1M\n"
        self.assertError(BASE + frag, "[Delivery/Fragmented] Enabled:", "needs an enabled delivery module")
        smtp = "[Delivery/SMTP]\nEnabled: yes\nReturnAddress: n@example.org\nMaximumSize: 100K\n"
        config = self.parse(BASE + smtp + frag)
        fragmented = config.delivery("Fragmented")
        self.assertEqual((fragmented.enabled, fragmented.maximum_size, fragmented.maximum_interval),
                         (True, 1 << 20, 2 * 86400))
        self.assertIn("some reassembled messages cannot be delivered", "\n".join(config.warnings))
        config = self.parse(BASE + smtp.replace("100K", "20M") + frag)
        self.assertIn("more than ten times larger", "\n".join(config.warnings))
        config = self.parse(BASE + smtp.replace("100K", "2M") + frag)
        self.assertNotIn("Fragmented", "\n".join(config.warnings))

    def test_incoming_must_be_enabled(self) -> None:
        self.assertError(BASE.replace("Enabled: yes\nHostname", "Enabled: no\nHostname"),
                         "[Incoming/MMTP] Enabled: no is not supported")

    def test_outgoing_missing_or_disabled(self) -> None:
        config = self.parse(SERVER + INCOMING)
        self.assertFalse(config.outgoing.enabled)
        self.assertIs(config["Outgoing/MMTP", "Enabled"], False)
        self.assertIn("[Outgoing/MMTP]: outgoing MMTP is not enabled", "\n".join(config.warnings))
        warnings = self.warnings(SERVER + INCOMING + "[Outgoing/MMTP]\nEnabled: no\n")
        self.assertIn("[Outgoing/MMTP] Enabled: outgoing MMTP is not enabled", warnings)


class WarningTests(ConfigTestCase):
    def test_clean_configuration_has_none(self) -> None:
        self.assertEqual(self.parse(BASE).warnings, ())

    def test_retry_warnings_name_the_option(self) -> None:
        warnings = self.warnings(BASE + "Retry: every 10 minutes for 1 hour\n")
        self.assertIn("mixminiond.conf:12: [Outgoing/MMTP] Retry: retries stop after only 1 hour", warnings)
        self.assertIn("[Outgoing/MMTP] Retry: intervals shorter than MixInterval (30 minutes) "
                      "are rounded to the nearest mix", warnings)
        warnings = self.warnings(BASE + "[Delivery/SMTP]\nEnabled: yes\nReturnAddress: n@example.org\n"
                                 "Retry: 1 day, 1 day\n")
        self.assertIn("[Delivery/SMTP] Retry: only 2 attempts (fewer than 5)", warnings)

    def test_mixing_warnings(self) -> None:
        warnings = self.warnings(self.server("MixInterval: 10 minutes\n"))
        self.assertIn("[Server] MixInterval: 10 minutes is under 30 minutes", warnings)
        warnings = self.warnings(BASE.replace("Binomial", "Timed") + "")
        self.assertNotIn("MixPoolRate", warnings)
        warnings = self.warnings(SERVER.replace("Binomial", "Timed") + "MixPoolRate: 50%\n" + INCOMING + OUTGOING)
        self.assertIn("[Server] MixPoolRate: only used by the Cottrell and Binomial algorithms", warnings)
        self.assertIn("under 5%", self.warnings(self.server("MixPoolRate: 4%\n")))

    def test_publish_without_authority(self) -> None:
        self.assertIn("Publish: yes, but no Authority",
                      self.warnings(self.server("", "[DirectoryServers]\nPublish: yes\n")))

    def test_pinging_options(self) -> None:
        """Each [Pinging] option lands in config.pinging; Enabled needs
        the authorities and relaying; Window must outlast Timeout."""
        directory = "[DirectoryServers]\nPublish: yes\nAuthority: http://a.example/ " + "AB" * 20 + "\n"
        config = self.parse(BASE + directory + "[Pinging]\nEnabled: yes\nInterval: 1 second\n"
                            "Timeout: 10 seconds\nWindow: 1 minute\nReportInterval: 5 seconds\n")
        ping = config.pinging
        self.assertEqual((ping.enabled, ping.interval, ping.timeout, ping.window,
                          ping.report_interval), (True, 1, 10, 60, 5))
        self.assertEqual(config.warnings, ())
        self.assertIn("[Pinging] Enabled: needs [DirectoryServers] Authority lines",
                      str(self.assertRaises(ConfigError, self.parse,
                                            BASE + "[Pinging]\nEnabled: yes\n")))
        self.assertIn("[Pinging] Enabled: needs [Outgoing/MMTP] Enabled",
                      str(self.assertRaises(ConfigError, self.parse, BASE.replace(
                          "[Outgoing/MMTP]\nEnabled: yes", "[Outgoing/MMTP]\nEnabled: no")
                          + directory + "[Pinging]\nEnabled: yes\n")))
        self.assertIn("[Pinging] Window: 1 hour must be longer than Timeout (1 hour)",
                      str(self.assertRaises(ConfigError, self.parse,
                                            BASE + directory + "[Pinging]\nEnabled: yes\n"
                                            "Window: 1 hour\n")))
        self.assertIn("[Pinging] Interval: 0 seconds is out of range",
                      str(self.assertRaises(ConfigError, self.parse,
                                            BASE + "[Pinging]\nInterval: 0 seconds\n")))
        self.assertIn("[DirectoryServers] Publish is no: the authorities refuse reports",
                      self.warnings(BASE + directory.replace("Publish: yes", "Publish: no")
                                    + "[Pinging]\nEnabled: yes\n"))
        self.assertEqual(self.warnings(BASE + "[Pinging]\nEnabled: no\n"), "")

    def test_network_warnings(self) -> None:
        warnings = self.warnings(SERVER + "[Incoming/MMTP]\nEnabled: yes\nLegacy: yes\n"
                                 "[Outgoing/MMTP]\nEnabled: yes\nLegacy: yes\n")
        self.assertIn("[Incoming/MMTP] Hostname: not set", warnings)
        self.assertIn("[Incoming/MMTP] Legacy: accepts TLS 1.0 peers", warnings)
        self.assertIn("[Outgoing/MMTP] Legacy: speaks TLS 1.0", warnings)
        self.assertIn("MetricsAddress: 0.0.0.0 is not a loopback address",
                      self.warnings(self.server("MetricsPort: 9000\nMetricsAddress: 0.0.0.0\n")))
        self.assertNotIn("MetricsAddress", self.warnings(self.server("MetricsAddress: 0.0.0.0\n")))


class PluginSectionTests(ConfigTestCase):
    def test_unknown_delivery_sections_are_kept_raw(self) -> None:
        config = self.parse(BASE + "[Delivery/News]\nEnabled: yes\nServer: news.example.org\n"
                            "Group: alt.anonymous\nGroup: alt.test\nNote: a long\n  value\n")
        self.assertEqual(config.warnings, ())
        news = config.delivery("News")
        self.assertIsInstance(news, RawSection)
        self.assertTrue(news.enabled)
        self.assertEqual(news.get("Server"), "news.example.org")
        self.assertEqual(news.get_all("Group"), ("alt.anonymous", "alt.test"))
        self.assertEqual(news.get("Note"), "a long value")
        self.assertEqual(news.keys(), ("Enabled", "Server", "Group", "Note"))
        self.assertIsNone(news.get("Missing"))
        self.assertEqual(config.plugin_sections, {"News": news})
        self.assertEqual(config.enabled_deliveries(), ("News",))
        exc = news.error("Server", "cannot resolve")
        self.assertEqual(str(exc), "mixminiond.conf:14: [Delivery/News] Server: cannot resolve")
        self.assertEqual(news.warning(None, "odd"), "mixminiond.conf:12: [Delivery/News]: odd")

    def test_a_plugin_schema_checks_its_section(self) -> None:
        """A plugin that declares its options has them read like the
        node's: typos refused with a suggestion, values typed, and a SIGHUP
        applies a change by rebuilding the modules."""
        news = cfg.SectionSpec("Delivery/News", "news", (
            cfg.Option("Enabled", cfg.BOOLEAN, "run it", required=True),
            cfg.Option("Server", cfg.HOST, "news server"),
            cfg.Option("Timeout", cfg.INTERVAL, "how long to wait", default="1 minute"),
        ))
        self.plugins = {"Delivery/News": news}
        text = BASE + "[Delivery/News]\nEnabled: yes\nServer: news.example.org\n"
        config = self.parse(text)
        self.assertEqual(config["Delivery/News", "Timeout"], 60)
        self.assertIs(config["Delivery/News", "Enabled"], True)
        self.assertEqual(config.plugin_sections, {})
        self.assertError(text + "Servr: x\n", "[Delivery/News] Servr: unknown option; "
                                               "did you mean Server?")
        self.assertError(text + "Timeout: soon\n", "[Delivery/News] Timeout:", "not an interval")
        self.assertError(BASE + "[Delivery/News]\nServer: a\n",
                         "[Delivery/News] Enabled: required option is missing")
        plan = reloadable_differences(config, self.parse(text.replace("Server: news", "Server: nntp")))
        self.assertEqual((plan.live, plan.appliers), ((("Delivery/News", "Server"),),
                                                      ("mixminion.server.reload:apply_exits",)))
        disabled = text.replace("[Delivery/News]\nEnabled: yes", "[Delivery/News]\nEnabled: no")
        plan = reloadable_differences(config, self.parse(disabled))
        self.assertEqual(plan.restart, (("Delivery/News", "Enabled"),))

    def test_plugin_enabled_flag(self) -> None:
        config = self.parse(BASE + "[Delivery/A]\nK: v\n[Delivery/B]\nEnabled: sometimes\n")
        self.assertFalse(config.delivery("A").enabled)
        self.assertRaises(ConfigError, lambda: config.delivery("B").enabled)

    def test_case_mismatch_with_a_known_section(self) -> None:
        self.assertError(BASE + "[Delivery/smtp]\nEnabled: yes\n",
                         "[Delivery/smtp]: no installed exit module handles this section; "
                         "did you mean [Delivery/SMTP]?")

    def test_bare_delivery_prefix_is_unknown(self) -> None:
        self.assertError(BASE + "[Delivery/]\nK: v\n", "[Delivery/]: unknown section")


class InsecurityTests(ConfigTestCase):
    def test_secure_configuration(self) -> None:
        self.assertEqual(self.parse(BASE).insecurities(), ())

    def test_each_reason(self) -> None:
        cases = [
            ("LogLevel: DEBUG\n", ("Log is too verbose",)),
            ("LogLevel: trace\n", ("Log is too verbose",)),
            ("LogLevel: INFO\n", ()),
            ("StatsInterval: 1 hour\n", ("StatsInterval is too short",)),
            ("StatsInterval: 1 hour\nLogStats: no\n", ()),
            ("StatsInterval: 2 hours\n", ()),
            ("MixPoolMinSize: 4\n", ("MixPoolMinSize is too small",)),
            ("MixInterval: 29 minutes\n", ("Mix interval under 30 minutes",)),
        ]
        for extra, reasons in cases:
            self.assertEqual(self.parse(self.server(extra)).insecurities(), reasons, extra)
        timed = SERVER.replace("Binomial", "Timed") + "MixPoolMinSize: 1\nMixInterval: 10 minutes\nLogLevel: DEBUG\n"
        self.assertEqual(self.parse(timed + INCOMING + OUTGOING).insecurities(),
                         ("Log is too verbose", "Mix algorithm is not secure", "Mix interval under 30 minutes"))


class SummaryTests(ConfigTestCase):
    def test_format(self) -> None:
        config = self.parse(
            self.server("MaxBandwidth: 200K\nMixPoolRate: 0.5\n",
                        "[Delivery/SMTP]\nEnabled: yes\nReturnAddress: n@example.org\nSubjectLine: Hi 'there'\n"
                        "[Delivery/Fragmented]\nEnabled: yes\nMaximumSize: 64K\n"))
        self.assertEqual(config.configuration_summary(), "; ".join([
            "Server/LogLevel='WARN'", "Server/LogStats='yes'", "Server/StatsInterval='1 day'",
            "Server/PublicKeyOverlap='1 day'", "Server/Mode='relay'", "Server/MixAlgorithm='Binomial'",
            "Server/MixInterval='30 minutes'", "Server/MixPoolRate='50.00%'", "Server/MixPoolMinSize='5'",
            "Server/Timeout='5 minutes'", "Server/MaxBandwidth='200 KB'",
            "Outgoing/MMTP/Retry='every 1 hour for 1 day, every 7 hours for 5 days'",
            "Outgoing/MMTP/MaxConnections='16'",
            "Delivery/SMTP/Enabled='yes'", "Delivery/SMTP/Retry='every 7 hours for 6 days'",
            "Delivery/SMTP/SMTPServer='localhost'", "Delivery/SMTP/ReturnAddress='n@example.org'",
            "Delivery/SMTP/FromTag='[Anon]'", "Delivery/SMTP/SubjectLine='Hi \\'there\\''",
            "Delivery/SMTP/MaximumSize='100 KB'",
            "Delivery/Fragmented/Enabled='yes'", "Delivery/Fragmented/MaximumSize='64 KB'",
            "Delivery/Fragmented/MaximumInterval='2 days'",
        ]))

    def test_absent_sections_and_unset_keys_are_left_out(self) -> None:
        summary = self.parse(SERVER + INCOMING).configuration_summary()
        self.assertNotIn("Outgoing", summary)
        self.assertNotIn("MaxBandwidth", summary)
        self.assertNotIn("Delivery", summary)


class ReloadTests(ConfigTestCase):
    def diff(self, old: str, new: str) -> cfg.ReloadPlan:
        return reloadable_differences(self.parse(old), self.parse(new))

    def test_identical(self) -> None:
        plan = self.diff(BASE, BASE)
        self.assertFalse(plan.changed)
        self.assertFalse(plan.needs_restart)
        self.assertFalse(plan.descriptor_changed)

    def test_live_changes(self) -> None:
        plan = self.diff(BASE, self.server("MixInterval: 1 hour\nLogLevel: INFO\nMaxQueuedPackets: 9\n",
                                           "Retry: every 2 hours for 2 days\n"))
        self.assertEqual(set(plan.live), {("Server", "MixInterval"), ("Server", "LogLevel"),
                                          ("Server", "MaxQueuedPackets"), ("Outgoing/MMTP", "Retry")})
        self.assertEqual(plan.restart, ())
        self.assertTrue(plan.descriptor_changed)  # the configuration summary changed

    def test_limits_and_rules_are_live(self) -> None:
        plan = self.diff(BASE, SERVER + INCOMING + "MaxConnections: 5\nDeny: 192.0.2.1\n" + OUTGOING)
        self.assertEqual(set(plan.live), {("Incoming/MMTP", "MaxConnections"), ("Incoming/MMTP", "Deny")})
        self.assertFalse(plan.needs_restart)
        self.assertTrue(plan.descriptor_changed)  # rules are published

    def test_reordering_allow_and_deny_is_a_change(self) -> None:
        old = BASE + "Allow: 192.0.2.1\nDeny: *\n"
        plan = self.diff(old, BASE + "Deny: *\nAllow: 192.0.2.1\n")
        self.assertEqual(set(plan.live), {("Outgoing/MMTP", "Allow"), ("Outgoing/MMTP", "Deny")})
        self.assertFalse(self.diff(old, old.replace("192.0.2.1", "192.0.2.1 ")).changed)

    def test_restart_changes(self) -> None:
        new = BASE.replace("Tester", "Other").replace("/tmp/mm-test-base", "/tmp/elsewhere") + "Legacy: yes\n"
        new = new.replace("Hostname: mix.example.org", "Hostname: mix.example.org\nPort: 4000")
        plan = self.diff(BASE, new)
        for key in [("Server", "Nickname"), ("Server", "BaseDir"), ("Server", "PidFile"),
                    ("Incoming/MMTP", "Port"), ("Incoming/MMTP", "ListenPort"), ("Outgoing/MMTP", "Legacy")]:
            self.assertIn(key, plan.restart)
        self.assertTrue(plan.needs_restart)
        self.assertTrue(plan.descriptor_changed)
        plan = self.diff(BASE, self.server("IdentityKeyBits: 4096\n"))
        self.assertEqual((plan.live, plan.restart, plan.descriptor_changed),
                         ((), (("Server", "IdentityKeyBits"),), False))

    def test_running_config_keeps_what_needs_a_restart(self) -> None:
        """After a SIGHUP the node runs on the new values it can apply and
        the old values of the rest: nothing published or applied that the
        node does not do yet."""
        old = self.parse(BASE)
        new = self.parse(BASE.replace("Hostname: mix.example.org",
                                      "Hostname: mix.example.org\nPort: 4000\nMaxConnections: 9"))
        plan = reloadable_differences(old, new)
        running = cfg.running_config(old, new, plan)
        self.assertEqual((running.incoming.port, running.incoming.listen_port), (48099, 48099))
        self.assertEqual(running.incoming.max_connections, 9)
        self.assertEqual(running["Incoming/MMTP", "Port"], 48099)
        applied = reloadable_differences(old, running)
        self.assertEqual(applied.live, (("Incoming/MMTP", "MaxConnections"),))
        self.assertEqual(applied.restart, ())
        self.assertFalse(applied.descriptor_changed)
        waiting = reloadable_differences(running, new)
        self.assertEqual(set(waiting.restart), {("Incoming/MMTP", "Port"),
                                                ("Incoming/MMTP", "ListenPort")})

    def test_running_config_keeps_the_set_of_exit_modules(self) -> None:
        smtp = BASE + "[Delivery/SMTP]\nEnabled: no\nReturnAddress: n@example.org\n"
        old = self.parse(smtp)
        new = self.parse(smtp.replace("Enabled: no", "Enabled: yes") + "SubjectLine: x\n")
        running = cfg.running_config(old, new, reloadable_differences(old, new))
        self.assertFalse(running.delivery("SMTP").enabled)
        self.assertEqual(running["Delivery/SMTP", "SubjectLine"], "Type III Anonymous Message")
        self.assertFalse(reloadable_differences(old, running).changed)
        waiting = reloadable_differences(running, new)
        self.assertEqual(set(waiting.live + waiting.restart),
                         {("Delivery/SMTP", "Enabled"), ("Delivery/SMTP", "SubjectLine")})
        added = cfg.running_config(self.parse(BASE), new,
                                   reloadable_differences(self.parse(BASE), new))
        self.assertNotIn("Delivery/SMTP", added.present)
        self.assertIsNone(added.delivery("SMTP"))

    def test_delivery_modules(self) -> None:
        self.write("bl", "deny user root\n")
        smtp = BASE + "[Delivery/SMTP]\nEnabled: yes\nReturnAddress: n@example.org\n"
        plan = self.diff(smtp, smtp + "BlacklistFile: bl\nSubjectLine: x\n")
        self.assertEqual(set(plan.live), {("Delivery/SMTP", "BlacklistFile"), ("Delivery/SMTP", "SubjectLine")})
        self.assertFalse(plan.needs_restart)
        plan = self.diff(BASE, smtp)
        self.assertIn(("Delivery/SMTP", "Enabled"), plan.restart)

    def test_plugin_sections(self) -> None:
        old = BASE + "[Delivery/News]\nEnabled: yes\nServer: a\n"
        plan = self.diff(old, old.replace("Server: a", "Server: b"))
        self.assertEqual((plan.live, plan.restart), ((("Delivery/News", "Server"),), ()))
        plan = self.diff(old, old.replace("Enabled: yes\nServer", "Enabled: no\nServer"))
        self.assertEqual(plan.restart, (("Delivery/News", "Enabled"),))
        plan = self.diff(BASE, old)
        self.assertIn(("Delivery/News", "Enabled"), plan.restart)
        self.assertIn(("Delivery/News", "Server"), plan.live)


# --- the schema itself and the example files --------------------------------------------------------


class SchemaTests(unittest.TestCase):
    def test_every_option_has_an_accessor(self) -> None:
        for spec in cfg.NODE_SECTIONS:
            names = {f.name for f in dataclasses.fields(cfg.SECTION_CLASSES[spec.name])}
            self.assertEqual(names, {o.name for o in spec.options}, spec.name)

    def test_every_option_is_documented(self) -> None:
        for spec in cfg.SCHEMA_SECTIONS:
            self.assertTrue(spec.doc)
            for option in spec.options:
                self.assertTrue(option.doc, option.key)

    def test_defaults_parse(self) -> None:
        for spec in cfg.SCHEMA_SECTIONS:
            for option in spec.options:
                if option.default is not None:
                    option.type.parse(option.default)

    def test_snake_case(self) -> None:
        self.assertEqual(cfg.snake_case("ListenIP6"), "listen_ip6")
        self.assertEqual(cfg.snake_case("SMTPServer"), "smtp_server")
        self.assertEqual(cfg.snake_case("Contact-Email"), "contact_email")
        self.assertEqual(cfg.snake_case("X-Abuse"), "x_abuse")
        self.assertEqual(cfg.snake_case("MaxConnectionsPerAddress"), "max_connections_per_address")


def _documented_options(path: str) -> dict[str, set[str]]:
    """Option names written (possibly commented out) under each section
    header (possibly commented out) of an example file."""
    found: dict[str, set[str]] = {}
    section: Optional[str] = None
    for line in open(path):
        header = re.match(r"#?\[([^\]]+)\]", line)
        if header:
            section = header.group(1)
            continue
        option = re.match(r"#?([A-Za-z0-9-]+)\s*[:=]", line)
        if option and section:
            found.setdefault(section, set()).add(option.group(1))
    return found


class ExampleFileTests(unittest.TestCase):
    def test_full_example_parses_cleanly(self) -> None:
        config = load_config(os.path.join(REPO, "etc", "mixminiond.conf"))
        self.assertEqual(config.warnings, ())
        self.assertEqual(config.insecurities(), ())

    def test_full_example_mentions_every_option(self) -> None:
        found = _documented_options(os.path.join(REPO, "etc", "mixminiond.conf"))
        for spec in cfg.SCHEMA_SECTIONS:
            missing = {o.key for o in spec.options} - found.get(spec.name, set())
            self.assertEqual(missing, set(), spec.name)

    def test_full_example_is_printing_ascii(self) -> None:
        with open(os.path.join(REPO, "etc", "mixminiond.conf"), "rb") as f:
            data = f.read()
        self.assertFalse(re.search(rb"[^\x20-\x7e\n]", data))

    def test_tap_example(self) -> None:
        config = load_config(os.path.join(REPO, "tap-example.conf"))
        self.assertEqual(config.server.nickname, "tap")
        # everything it writes goes beside the file, whatever the working folder
        self.assertEqual(config.server.base_dir, os.path.join(REPO, "tap-base"))
        self.assertEqual((config.incoming.listen_ip, config.incoming.hostname), ("127.0.0.1", "localhost"))
        self.assertGreater(config.incoming.port, 1024)
        self.assertTrue(config.outgoing.enabled)
        mbox = config.delivery("MBOX")
        self.assertEqual(mbox.address_file, os.path.join(REPO, "etc", "mbox-addresses.example"))
        self.assertTrue(os.path.isfile(mbox.address_file))
        self.assertEqual(config.enabled_deliveries(), ("MBOX",))
        # only the deliberately fast, insecure mixing is warned about
        self.assertEqual(len(config.warnings), 1)
        self.assertIn("MixInterval", config.warnings[0])
