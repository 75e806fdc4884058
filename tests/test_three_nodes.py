"""Issue 4: three mix nodes as real ``twistd`` processes, a real MTA, and
messages through all of them.

Node 1 and node 2 relay; node 3 is the exit, with ``[Delivery/MBOX]``
appending to a local mbox file (``MboxFile``), ``[Delivery/SMTP]`` handing
mail to an opensmtpd instance of the test's own on a loopback port, and
``[Delivery/Fragmented]`` reassembling a 60 KiB message.  Packets are built
with the codec from the nodes' own descriptors and given to node 1 over
MMTP; the test then reads what the mbox file and the MTA's maildir
received, stops the nodes with SIGTERM and reads their logs.

The MTA is opensmtpd (Debian package ``opensmtpd``), run as root by
:mod:`mixminion.testing.mta`, whose docstring says how it must be run.
Without smtpd the test fails, naming the command that installs it.  Set
``MIXMINION_SKIP_MTA=1`` to run without the MTA: node 3 then has no SMTP
exit and the fragmented message goes to the mbox instead.
"""

from __future__ import annotations

import base64
import email
import fcntl
import os
import re
import signal
from dataclasses import dataclass, field
from email.message import Message
from typing import Any, Callable, Optional

from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.python.failure import Failure
from twisted.trial import unittest

from mixminion.codec.build import BuiltPacket, build_message_packets
from mixminion.codec.exit import PLAINTEXT, parse_text_message
from mixminion.codec.routing import MBOX_TYPE, SMTP_TYPE
from mixminion.mmtp.initiator import MMTPClient
from mixminion.testing.mta import MTA, start_opensmtpd
from mixminion.testing.processes import MixNode, read_text, sleep, wait_until

#: the global reactor (untyped: its interfaces are spread over many zope ones)
reactor: Any = _reactor

SKIP_MTA = os.environ.get("MIXMINION_SKIP_MTA") == "1"

#: bounds of each wait; the whole test takes about 4 s here, and at most
#: about 90 s when everything times out
START_TIMEOUT = 30.0
SEND_TIMEOUT = 15.0
DELIVERY_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0

MBOX_NYM = "nym"
MBOX_ADDRESS = "nym@localhost.localdomain"
MBOX_RETURN = "mix3@localhost.localdomain"
SMTP_RETURN = "mix3-smtp@localhost.localdomain"
SMTP_RECIPIENTS = ("alice@example.com", "someone@example.com")
SMTP_FROM_TAG = "[Anon3]"
SMTP_SUBJECT_LINE = "Anonymous mail through node3"
DEFAULT_SUBJECT = "Type III Anonymous Message"
#: what opensmtpd adds to a message it delivers
MTA_HEADERS = frozenset({"Return-Path", "Delivered-To", "Received", "Date", "Message-ID"})
MBOX_COUNT = 4
SMTP_COUNT = 4
BIG_SIZE = 60 * 1024


# --- the nodes ---------------------------------------------------------------------------


def node_text(node: MixNode, extra: str = "") -> str:
    """A node's configuration: LogLevel INFO (node_config's), for the test
    waits for the node's "started" line; debug stays out, so the check that
    no message text reaches the log still means something."""
    return node.config(server="MinFreeDisk: 1 MB", contact=f"{node.name}@localhost.localdomain",
                       extra=extra, comment=f"{node.name}, written by tests/test_three_nodes.py")


def exit_sections(directory: str, mta: Optional[MTA]) -> str:
    """Node 3's delivery sections (and its address file)."""
    os.makedirs(directory, exist_ok=True)
    addresses = os.path.join(directory, "mbox-addresses")
    with open(addresses, "w", encoding="ascii") as f:
        f.write(f"{MBOX_NYM}: {MBOX_ADDRESS}\nother: other@localhost.localdomain\n")
    text = f"""
[Delivery/MBOX]
Enabled: yes
AddressFile: {addresses}
RemoveContact: remove-me@localhost.localdomain
ReturnAddress: {MBOX_RETURN}
MboxFile: {os.path.join(directory, "delivered.mbox")}

[Delivery/Fragmented]
Enabled: yes
MaximumSize: 100 KB
"""
    if mta is not None:
        text += f"""
[Delivery/SMTP]
Enabled: yes
ReturnAddress: {SMTP_RETURN}
SMTPServer: 127.0.0.1
SMTPPort: {mta.port}
FromTag: {SMTP_FROM_TAG}
SubjectLine: {SMTP_SUBJECT_LINE}
"""
    return text


# --- the messages ------------------------------------------------------------------------


@dataclass
class Sent:
    """One message handed to node 1, and what its delivery must look like."""

    kind: str  # "mbox" or "smtp"
    recipient: str
    body: bytes
    token: str
    headers: dict[str, str] = field(default_factory=dict)
    packets: list[BuiltPacket] = field(default_factory=list)

    @property
    def expected_subject(self) -> str:
        if "SUBJECT" in self.headers:
            return self.headers["SUBJECT"]
        return SMTP_SUBJECT_LINE if self.kind == "smtp" else DEFAULT_SUBJECT

    @property
    def expected_from(self) -> str:
        address = SMTP_RETURN if self.kind == "smtp" else MBOX_RETURN
        tag = SMTP_FROM_TAG if self.kind == "smtp" else "[Anon]"
        if "FROM" in self.headers:
            return f'"{tag} {self.headers["FROM"]}" <{address}>'
        return address

    def secrets(self) -> list[str]:
        """Strings of the plaintext no log may contain."""
        lines = [ln for ln in self.body.decode("ascii").splitlines() if len(ln) >= 20]
        return [self.token] + lines[:3]


def text_body(token: str, size: int = 0) -> bytes:
    """A plaintext body holding ``token``; with ``size``, padded with
    random base64 lines (barely compressible, so it needs fragments)."""
    lines = [f"Hello through three mixes, message {token}.", "",
             "- a line starting with a dash (the armor escapes it),",
             ".a line starting with a dot (SMTP stuffs it),", ".",
             "and a lone dot above, which must not end the SMTP DATA."]
    while size and sum(len(ln) + 1 for ln in lines) < size:
        lines.append(base64.b64encode(os.urandom(48)).decode("ascii"))
    return ("\n".join(lines) + "\n").encode("ascii")


# --- the test ----------------------------------------------------------------------------


class ThreeNodesTests(unittest.TestCase):
    """The whole path: client -> node1 -> node2 -> node3 -> mbox / MTA."""

    timeout = 150

    def setUp(self) -> None:
        self.run_id = base64.b32encode(os.urandom(5)).decode("ascii").lower()
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.nodes: list[MixNode] = []
        self.mta: Optional[MTA] = None

    # -- reporting ------------------------------------------------------------------

    def report(self) -> str:
        parts = [node.daemon.report(30) for node in self.nodes]
        if self.mta is not None:
            parts.append(self.mta.process.report())
        return "\n".join(parts)

    async def wait_until(self, what: str, check: Callable[[], Any], timeout: float,
                         interval: float = 0.2,
                         explain: Callable[[], str] = lambda: "") -> Any:
        """Poll ``check`` until it gives something true, or fail after
        ``timeout`` with the tail of every log.  A node that died fails
        at once."""
        return await wait_until(
            reactor, what, check, timeout, interval,
            watch=[n.daemon for n in self.nodes if n.daemon.process is not None],
            report=lambda _: self.report(), explain=explain, error=self.failureException)

    # -- the MTA --------------------------------------------------------------------

    async def start_mta(self) -> Optional[MTA]:
        if SKIP_MTA:
            return None
        return await start_opensmtpd(
            self, self.dir, ", or set MIXMINION_SKIP_MTA=1 to skip the MTA part")

    # -- the nodes ------------------------------------------------------------------

    def node_ready(self, node: MixNode) -> bool:
        log = read_text(node.daemon.log)
        return (os.path.exists(os.path.join(node.base, "keys", "key_0001", "ServerDesc"))
                and f"Mix node {node.name} started" in log
                and f"starting on {node.port}" in log)

    def check_descriptor(self, node: MixNode) -> None:
        d = node.descriptor()
        self.assertEqual((d.nickname, d.hostname, d.port), (node.name, "localhost", node.port))
        self.assertIsNotNone(d.outgoing, f"{node.name} does not advertise relaying")

    # -- the messages ---------------------------------------------------------------

    def messages(self) -> list[Sent]:
        out = []
        for i in range(MBOX_COUNT):
            headers = {"SUBJECT": f"mbox subject {i}", "FROM": f"Sender {i}"} if i % 2 == 0 else {}
            token = f"mbox-{i}-{self.run_id}"
            out.append(Sent("mbox", MBOX_NYM, text_body(token), token, headers))
        smtp_kind = "smtp" if self.mta is not None else "mbox"
        if self.mta is not None:
            for i in range(SMTP_COUNT):
                headers = {"SUBJECT": f"smtp subject {i}", "FROM": f"Writer {i}"} if i % 2 else {}
                token = f"smtp-{i}-{self.run_id}"
                out.append(Sent("smtp", SMTP_RECIPIENTS[i % 2], text_body(token), token, headers))
        token = f"big-{self.run_id}"
        recipient = SMTP_RECIPIENTS[0] if smtp_kind == "smtp" else MBOX_NYM
        out.append(Sent(smtp_kind, recipient, text_body(token, BIG_SIZE), token,
                        {"SUBJECT": "a big one"}))
        return out

    def build(self, sent: Sent, n: int) -> None:
        """Alternate the two path shapes: node2 at the end of leg 1, and
        node2 at the start of leg 2."""
        n1, n2, n3 = (node.hop() for node in self.nodes)
        shapes = [([n1, n2], [n3]), ([n1], [n2, n3])]

        def paths(i: int):
            return shapes[(n + i) % 2]

        exit_type = SMTP_TYPE if sent.kind == "smtp" else MBOX_TYPE
        sent.packets = build_message_packets(sent.body, exit_type, sent.recipient.encode("ascii"),
                                             paths, os.urandom, headers=sent.headers)

    async def send(self, packets: list[BuiltPacket]) -> None:
        """Give every packet to node1 over MMTP, expecting node1's identity
        key, and wait for its acknowledgements."""
        destination = self.nodes[0].destination()
        client = MMTPClient(reactor)
        outcomes: list[Optional[Failure]] = []
        for p in packets:
            client.send_packet(destination, p.packet).addCallbacks(
                lambda _: outcomes.append(None), outcomes.append)
        try:
            await self.wait_until("node1 to acknowledge every packet",
                                  lambda: len(outcomes) == len(packets), SEND_TIMEOUT)
            # Everything acknowledged: the client closes its connections
            # itself (TLS close_notify); wait for that, so node1 sees a clean
            # close.  (_protocols: the client has no public "idle" signal.)
            await self.wait_until("the MMTP client to close its connections",
                                  lambda: not client._protocols, 10)
        finally:
            await client.close()
            for _ in range(50):  # aborted connections go at the next turns
                if not client._protocols:
                    break
                await sleep(reactor, 0.1)
        failures = [f for f in outcomes if f is not None]
        if failures:
            self.fail(f"node1 did not take {len(failures)} of {len(packets)} packets: "
                      f"{failures[0].getErrorMessage()}\n{self.report()}")

    # -- delivery checks --------------------------------------------------------------

    def mbox_messages(self) -> list[Message]:
        """The exit's mbox, read under the lock its writer takes, so that a
        message being appended is never seen half-written."""
        try:
            fd = os.open(os.path.join(self.nodes[2].dir, "delivered.mbox"), os.O_RDONLY)
        except FileNotFoundError:
            return []
        try:
            fcntl.lockf(fd, fcntl.LOCK_SH)
            with os.fdopen(os.dup(fd), "rb") as f:
                data = f.read()
        finally:
            os.close(fd)
        # Our bodies have no "From " lines, so no mboxrd quoting to undo.
        return [email.message_from_bytes(m) for m in re.split(rb"^From .*\n", data, flags=re.M)[1:]]

    def deliveries(self, expected: list[Sent]) -> dict[str, list[Message]]:
        """Each message's copies in the mbox or the MTA's maildir."""
        boxes = {"mbox": self.mbox_messages(),
                 "smtp": self.mta.messages() if self.mta is not None else []}
        return {sent.token: [m for m in boxes[sent.kind]
                             if sent.token.encode() in m.get_payload(decode=True)]
                for sent in expected}

    def missing(self, expected: list[Sent]) -> list[str]:
        return [token for token, copies in self.deliveries(expected).items() if not copies]

    def check_mail(self, sent: Sent, found: list[Message]) -> None:
        self.assertEqual(len(found), 1, f"{sent.token} was delivered {len(found)} times")
        [mail] = found
        where = f"{sent.kind} message {sent.token}"
        recipient = MBOX_ADDRESS if sent.kind == "mbox" else sent.recipient
        self.assertEqual(mail["To"], recipient, where)
        self.assertEqual(mail["From"], sent.expected_from, where)
        self.assertEqual(mail["Subject"], sent.expected_subject, where)
        self.assertEqual(mail["X-Anonymous"], "yes", where)
        # server.md §9.3: these headers, in this order, and no Date or
        # Message-ID (the MTA adds those, and its own trace headers).
        ours = [k for k in mail.keys() if k not in MTA_HEADERS or sent.kind == "mbox"]
        self.assertEqual(ours, ["To", "From", "Subject", "X-Anonymous"], where)
        if sent.kind == "smtp":
            # Added by the MTA: the envelope the SMTP exit gave it.
            self.assertEqual(mail["Delivered-To"], sent.recipient, where)
            self.assertEqual(mail["Return-Path"], f"<{SMTP_RETURN}>", where)
        text = parse_text_message(mail.get_payload(decode=True))
        self.assertEqual(text.message_type, PLAINTEXT, where)
        self.assertEqual(text.contents, sent.body, where)

    def check_logs(self, expected: list[Sent]) -> None:
        secrets = [s for sent in expected for s in sent.secrets()]
        for node in self.nodes:
            log = read_text(node.daemon.log)
            for marker in ("Traceback", "Unhandled error", "#critical]"):
                self.assertNotIn(marker, log,
                                 f"{node.name}'s log has {marker!r}:\n{node.daemon.report(30)}")
            for number, line in enumerate(log.splitlines(), 1):
                # A clean run warns only about the (deliberately insecure)
                # configuration, besides the start line (WARN, to show at
                # any level): a delivery that failed and was retried shows.
                expected_warning = ("] Configuration: " in line
                                    or f"] Mix node {node.name} started: " in line)
                if "#error]" in line or ("#warn]" in line and not expected_warning):
                    self.fail(f"{node.name}'s log line {number} reports a problem: {line}")
                if "#debug]" in line:
                    continue
                leaked = [s for s in secrets if s in line]
                if leaked:
                    self.fail(f"{node.name}'s log line {number} holds message plaintext "
                              f"{leaked[0]!r}: {line}")

    # -- the test ---------------------------------------------------------------------

    def test_messages_reach_mbox_and_mta(self) -> defer.Deferred:
        return defer.ensureDeferred(self.run_network())

    async def run_network(self) -> None:
        self.mta = await self.start_mta()
        await self.start_nodes()
        expected = self.messages()
        for n, sent in enumerate(expected):
            self.build(sent, n)
        self.assertGreater(len(expected[-1].packets), 1, "the big message was not fragmented")
        await self.send([p for sent in expected for p in sent.packets])
        await self.wait_until("every message to be delivered",
                              lambda: not self.missing(expected), DELIVERY_TIMEOUT, interval=0.5,
                              explain=lambda: "(missing: " + ", ".join(self.missing(expected)) + ")")
        await self.stop_nodes()
        # Checked once the nodes are gone, so a late duplicate is seen too.
        for sent, copies in zip(expected, self.deliveries(expected).values()):
            self.check_mail(sent, copies)
        self.check_logs(expected)

    async def start_nodes(self) -> None:
        self.nodes = [MixNode(self, f"node{i}") for i in (1, 2, 3)]
        extra = ["", "", exit_sections(self.nodes[2].dir, self.mta)]
        for node, sections in zip(self.nodes, extra):
            node.write(node_text(node, sections))
            node.daemon.start()
        await self.wait_until(
            "every node to write its descriptor and listen",
            lambda: all(self.node_ready(n) for n in self.nodes), START_TIMEOUT,
            explain=lambda: "(not ready: " + ", ".join(
                n.name for n in self.nodes if not self.node_ready(n)) + ")")
        for node in self.nodes:
            self.check_descriptor(node)
        exit_descriptor = self.nodes[2].descriptor()
        wanted = {"mbox", "frag"} | ({"smtp"} if self.mta is not None else set())
        self.assertTrue(wanted <= exit_descriptor.capabilities,
                        f"node3 advertises {exit_descriptor.caps!r}")

    async def stop_nodes(self) -> None:
        for node in self.nodes:
            status = await node.daemon.stop(reactor, STOP_TIMEOUT, strict=False)
            # twistd shuts down, then ends itself with the signal it got, so
            # a clean stop is "ended by signal 15" after "Server Shut Down.".
            clean = status in (0, -signal.SIGTERM)
            self.assertTrue(clean and "Server Shut Down." in read_text(node.daemon.log),
                            f"{node.name} did not exit cleanly on SIGTERM: exit status {status}\n"
                            + node.daemon.report(30))
