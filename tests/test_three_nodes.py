"""Issue 4: three mix nodes as real ``twistd`` processes, a real MTA, and
messages through all of them.

Node 1 and node 2 relay; node 3 is the exit, with ``[Delivery/MBOX]``
appending to a local mbox file (``MboxFile``), ``[Delivery/SMTP]`` handing
mail to an opensmtpd instance of the test's own on a loopback port, and
``[Delivery/Fragmented]`` reassembling a 60 KiB message.  Packets are built
with the codec from the nodes' own descriptors and given to node 1 over
MMTP; the test then reads what the mbox file and the MTA's maildir
received, stops the nodes with SIGTERM and reads their logs.

The MTA (opensmtpd 6.8, Debian package ``opensmtpd``).  What works here:

* ``smtpd`` must be started as root (it drops to its ``opensmtpd`` and
  ``opensmtpq`` users itself) and runs in the foreground with
  ``smtpd -d -f CONF``; CI runs as root.
* Only one smtpd can run on a machine: the control socket
  (``/var/run/smtpd.sock``) and the queue (``/var/spool/smtpd``) are
  compiled in.  A system-wide smtpd must therefore be stopped first
  (``.ci/run`` stops one the package install may have started).
* A recipient such as ``alice@example.com`` is not a local user, so plain
  ``maildir`` answers "550 Invalid recipient".  ``virtual { "@" = nobody }``
  maps every recipient to the user ``nobody`` (smtpd refuses to deliver as
  root), which delivers into a maildir that ``nobody`` owns, outside the
  nodes' private (0700) folders.

Without smtpd the test fails, naming the command that installs it.  Set
``MIXMINION_SKIP_MTA=1`` to run without the MTA: node 3 then has no SMTP
exit and the fragmented message goes to the mbox instead.
"""

from __future__ import annotations

import base64
import email
import fcntl
import inspect
import mailbox
import os
import pwd
import re
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass, field
from email.message import Message
from typing import Any, Callable, Optional

from twisted.internet import defer, error, protocol, task
from twisted.internet import reactor as _reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.python.failure import Failure
from twisted.trial import unittest

from mixminion.codec.build import BuiltPacket, build_message_packets
from mixminion.codec.exit import PLAINTEXT, parse_text_message
from mixminion.codec.header import Hop
from mixminion.codec.routing import MBOX_TYPE, SMTP_TYPE, HostInfo
from mixminion.directory.descriptor import ServerDescriptor, parse_descriptor
from mixminion.mmtp.initiator import Destination, MMTPClient
from mixminion.testnet import free_ports

#: the global reactor (untyped: its interfaces are spread over many zope ones)
reactor: Any = _reactor

INSTALL_MTA = ("DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "
               "opensmtpd")
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


# --- small helpers ---------------------------------------------------------------------


def tail(path: str, lines: int = 30) -> str:
    """The last lines of a log, without the empty mix rounds (one a second)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            kept = [ln for ln in f if "Mix: 0 of 0 items" not in ln]
        return "".join(kept[-lines:])
    except OSError as exc:
        return f"({path}: {exc.strerror})"


def read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


async def port_open(port: int) -> bool:
    """Whether something accepts TCP connections on loopback ``port``."""
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=2)
    try:
        proto = await endpoint.connect(protocol.Factory.forProtocol(protocol.Protocol))
    except error.ConnectError:
        return False
    proto.transport.loseConnection()
    return True


def sleep(seconds: float) -> defer.Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


class ChildProcess(protocol.ProcessProtocol):
    """A spawned process: its output and a Deferred for its end."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.output = bytearray()
        self.ended: defer.Deferred = defer.Deferred()
        self.reason: Optional[Failure] = None

    @property
    def running(self) -> bool:
        return self.reason is None and self.transport is not None

    def outReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted naming
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:  # noqa: N802
        self.reason = reason
        self.ended.callback(reason.value)

    def signal(self, name: str) -> None:
        if self.running:
            try:
                self.transport.signalProcess(name)
            except error.ProcessExitedAlready:
                pass

    def text(self, limit: int = 4000) -> str:
        return bytes(self.output[-limit:]).decode("utf-8", "replace")


def spawn(name: str, argv: list[str], cwd: str) -> ChildProcess:
    proc = ChildProcess(name)
    reactor.spawnProcess(proc, argv[0], argv, env=dict(os.environ), path=cwd)
    return proc


async def stop_process(proc: ChildProcess, timeout: float) -> Optional[BaseException]:
    """SIGTERM, then SIGKILL after ``timeout``; how the process ended."""
    if not proc.running:
        return proc.reason.value if proc.reason is not None else None
    proc.signal("TERM")
    timer = reactor.callLater(timeout, proc.signal, "KILL")
    try:
        return await proc.ended
    finally:
        if timer.active():
            timer.cancel()


def twistd_command() -> list[str]:
    """The twistd of the Python running the tests (a PATH shim may not be)."""
    beside = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.access(beside, os.X_OK):
        return [beside]
    found = shutil.which("twistd")
    if found:
        return [found]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def find_smtpd() -> Optional[str]:
    return shutil.which("smtpd") or next(
        (p for p in ("/usr/sbin/smtpd", "/usr/local/sbin/smtpd") if os.access(p, os.X_OK)), None)


# --- the MTA -----------------------------------------------------------------------------


@dataclass
class MTA:
    """Our own opensmtpd: every recipient lands in one maildir."""

    port: int
    maildir: str
    conf: str
    process: ChildProcess

    def messages(self) -> list[Message]:
        if not os.path.isdir(os.path.join(self.maildir, "new")):
            return []
        box = mailbox.Maildir(self.maildir, factory=None, create=False)
        return [box[key] for key in box.keys()]


SMTPD_CONF = """\
# Written by tests/test_three_nodes.py.  Every recipient, in any domain, is
# mapped to the user nobody (smtpd refuses to deliver as root) and lands in
# one maildir that nobody owns.
listen on 127.0.0.1 port {port}
action "deliver" maildir "{maildir}" virtual {{ "@" = nobody }}
match from any for any action "deliver"
"""


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not, for our purposes)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return True


def running_smtpd() -> list[int]:
    """Pids of smtpd processes already on this machine."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/comm", encoding="ascii", errors="replace") as f:
                    if f.read().strip() == "smtpd":
                        found.append(int(name))
            except OSError:
                pass
    return found


async def start_opensmtpd(case: unittest.TestCase, workdir: str, skip_hint: str = "") -> MTA:
    """A real opensmtpd on a free loopback port, delivering to a Maildir
    as 'nobody' (stopped when ``case`` ends); fails ``case`` with what to
    do when the machine cannot run one.  ``skip_hint`` ends those
    messages (how to run the test without the MTA, where it can)."""
    smtpd = find_smtpd()
    if smtpd is None:
        case.fail(f"this test needs opensmtpd, which is not installed: run '{INSTALL_MTA}' as "
                  f"root (CI does){skip_hint}")
    if os.geteuid() != 0:
        case.fail("opensmtpd only runs as root (it drops to its own users): run this test as "
                  f"root, as CI does{skip_hint}")
    others = running_smtpd()
    if others:
        case.fail(f"an smtpd is already running (pid {', '.join(map(str, others))}); opensmtpd "
                  "allows one per machine: stop it (e.g. 'service opensmtpd stop') and run "
                  "this test again")
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        case.fail("smtpd delivers as the user 'nobody', which this machine does not have")
    # Outside the trial folder, whose parents nobody may not be able to enter.
    top = tempfile.mkdtemp(prefix="mixminion-mta-")
    case.addCleanup(shutil.rmtree, top, True)
    os.chmod(top, 0o755)
    maildir = os.path.join(top, "Maildir")
    os.mkdir(maildir, 0o700)
    os.chown(maildir, nobody.pw_uid, nobody.pw_gid)
    [port] = free_ports(1)
    conf = os.path.join(workdir, "smtpd.conf")
    with open(conf, "w", encoding="ascii") as f:
        f.write(SMTPD_CONF.format(port=port, maildir=maildir))
    os.chmod(conf, 0o644)
    proc = spawn("smtpd", [smtpd, "-d", "-f", conf], workdir)
    case.addCleanup(stop_process, proc, 5)
    for _ in range(100):
        if not proc.running or await port_open(port):
            break
        await sleep(0.1)
    if not proc.running or not await port_open(port):
        hint = ""
        if "already" in proc.text():
            hint = ("\nAnother smtpd is running (opensmtpd allows one per machine): stop it, "
                    "e.g. 'systemctl stop opensmtpd' or 'service opensmtpd stop'.")
        why = proc.reason.value if proc.reason is not None else "not listening after 10 s"
        case.fail(f"smtpd -d -f {conf} did not start ({why}):\n{proc.text()}{hint}")
    return MTA(port, maildir, conf, proc)


# --- the nodes ---------------------------------------------------------------------------


@dataclass
class Node:
    number: int
    port: int
    directory: str
    process: Optional[ChildProcess] = None
    descriptor: Optional[ServerDescriptor] = None
    extra: str = ""

    @property
    def name(self) -> str:
        return f"node{self.number}"

    @property
    def base_dir(self) -> str:
        return os.path.join(self.directory, "base")

    @property
    def conf(self) -> str:
        return os.path.join(self.directory, "mixminiond.conf")

    @property
    def log(self) -> str:
        return os.path.join(self.directory, "node.log")

    @property
    def descriptor_path(self) -> str:
        return os.path.join(self.base_dir, "keys", "key_0001", "ServerDesc")

    def config_text(self) -> str:
        return f"""\
# {self.name}, written by tests/test_three_nodes.py
[Server]
BaseDir: {self.base_dir}
Mode: relay
Nickname: {self.name}
Contact-Email: {self.name}@localhost.localdomain
MixAlgorithm: Timed
MixInterval: 1 second
MinFreeDisk: 1 MB
# INFO: the test waits for the node's "started" line; debug stays out, so
# the check that no message text reaches the log still means something
LogLevel: INFO

[Incoming/MMTP]
Enabled: yes
IP: 127.0.0.1
Hostname: localhost
Port: {self.port}

[Outgoing/MMTP]
Enabled: yes
{self.extra}"""

    def hop(self) -> Hop:
        d = self.descriptor
        assert d is not None and d.hostname is not None and d.port is not None
        return Hop(d.packet_key, HostInfo(d.hostname, d.port, d.identity_digest))

    def report(self) -> str:
        out = f"--- {self.name} (port {self.port}), end of {self.log}:\n{tail(self.log)}"
        if self.process is not None and self.process.output:
            out += f"--- {self.name} stdout/stderr:\n{self.process.text()}\n"
        return out


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
        self.nodes: list[Node] = []
        self.mta: Optional[MTA] = None

    # -- reporting ------------------------------------------------------------------

    def report(self) -> str:
        parts = [node.report() for node in self.nodes]
        if self.mta is not None:
            parts.append(f"--- smtpd output:\n{self.mta.process.text()}")
        return "\n".join(parts)

    async def wait_until(self, what: str, check: Callable[[], Any], timeout: float,
                         interval: float = 0.2,
                         explain: Callable[[], str] = lambda: "") -> Any:
        """Poll ``check`` until it gives something true, or fail after
        ``timeout`` with the tail of every log.  A node that died fails
        at once."""
        deadline = reactor.seconds() + timeout
        while True:
            result = check()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return result
            dead = [n for n in self.nodes if n.process is not None and not n.process.running]
            if dead:
                self.fail(f"{dead[0].name} exited ({dead[0].process.reason.value}) while waiting "
                          f"for {what}\n{self.report()}")
            if reactor.seconds() > deadline:
                self.fail(f"timed out after {timeout:.0f} s waiting for {what} "
                          f"{explain()}\n{self.report()}")
            await sleep(interval)

    # -- the MTA --------------------------------------------------------------------

    async def start_mta(self) -> Optional[MTA]:
        if SKIP_MTA:
            return None
        return await start_opensmtpd(
            self, self.dir, ", or set MIXMINION_SKIP_MTA=1 to skip the MTA part")

    # -- the nodes ------------------------------------------------------------------

    def start_node(self, node: Node) -> None:
        os.makedirs(node.directory, exist_ok=True)
        with open(node.conf, "w", encoding="ascii") as f:
            f.write(node.config_text())
        argv = twistd_command() + ["-n", "--pidfile=", f"--logfile={node.log}",
                                   "mixminion", "-c", node.conf]
        node.process = spawn(node.name, argv, node.directory)
        self.addCleanup(stop_process, node.process, 5)

    def node_ready(self, node: Node) -> bool:
        log = read_text(node.log)
        return (os.path.exists(node.descriptor_path)
                and f"Mix node {node.name} started" in log
                and f"starting on {node.port}" in log)

    def load_descriptor(self, node: Node) -> None:
        with open(node.descriptor_path, encoding="ascii") as f:
            text = f.read()
        node.descriptor = d = parse_descriptor(text, reactor.seconds())
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
        first = self.nodes[0]
        assert first.descriptor is not None
        destination = Destination("127.0.0.1", first.port, first.descriptor.identity_digest)
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
                await sleep(0.1)
        failures = [f for f in outcomes if f is not None]
        if failures:
            self.fail(f"node1 did not take {len(failures)} of {len(packets)} packets: "
                      f"{failures[0].getErrorMessage()}\n{self.report()}")

    # -- delivery checks --------------------------------------------------------------

    def mbox_messages(self) -> list[Message]:
        """The exit's mbox, read under the lock its writer takes, so that a
        message being appended is never seen half-written."""
        try:
            fd = os.open(os.path.join(self.nodes[2].directory, "delivered.mbox"), os.O_RDONLY)
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
            log = read_text(node.log)
            for marker in ("Traceback", "Unhandled error", "#critical]"):
                self.assertNotIn(marker, log, f"{node.name}'s log has {marker!r}:\n{node.report()}")
            for number, line in enumerate(log.splitlines(), 1):
                # A clean run warns only about the (deliberately insecure)
                # configuration: a delivery that failed and was retried shows.
                if "#error]" in line or ("#warn]" in line and "] Configuration: " not in line):
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
        ports = free_ports(3)
        self.nodes = [Node(i, port, os.path.join(self.dir, f"node{i}"))
                      for i, port in enumerate(ports, 1)]
        self.nodes[2].extra = exit_sections(self.nodes[2].directory, self.mta)
        for node in self.nodes:
            self.start_node(node)
        await self.wait_until(
            "every node to write its descriptor and listen",
            lambda: all(self.node_ready(n) for n in self.nodes), START_TIMEOUT,
            explain=lambda: "(not ready: " + ", ".join(
                n.name for n in self.nodes if not self.node_ready(n)) + ")")
        for node in self.nodes:
            self.load_descriptor(node)
        exit_descriptor = self.nodes[2].descriptor
        assert exit_descriptor is not None
        wanted = {"mbox", "frag"} | ({"smtp"} if self.mta is not None else set())
        self.assertTrue(wanted <= exit_descriptor.capabilities,
                        f"node3 advertises {exit_descriptor.caps!r}")

    async def stop_nodes(self) -> None:
        for node in self.nodes:
            assert node.process is not None
            ended = await stop_process(node.process, STOP_TIMEOUT)
            # twistd shuts down, then ends itself with the signal it got, so
            # a clean stop is "ended by signal 15" after "Server Shut Down.".
            clean = isinstance(ended, error.ProcessDone) or (
                isinstance(ended, error.ProcessTerminated) and ended.exitCode is None
                and ended.signal == signal.SIGTERM)
            self.assertTrue(clean and "Server Shut Down." in read_text(node.log),
                            f"{node.name} did not exit cleanly on SIGTERM: {ended}\n{node.report()}")
