"""``mixminion-testnet``: a whole Type III network on this machine.

::

    mixminion-testnet up [--nodes N] [--mta HOST:PORT] [--blacklist FILE] [DIR]
    mixminion-testnet status [DIR]
    mixminion-testnet demo [--nodes N] [--mta HOST:PORT] [--blacklist FILE] [DIR]
    mixminion-testnet nym-demo [--nodes N] [--mta HOST:PORT] [DIR]
    mixminion-testnet down [--purge] [DIR]

``up`` writes keys and configurations for three directory authorities and
N mix nodes (default 5) on free loopback ports, starts each as a daemonized
``twistd`` process (pid and log files in its folder), and waits until every
authority serves a consensus, signed by at least two of them, that lists
every node.  Mail leaves the network through an SMTP sink of ours
(:mod:`mixminion.smtpsink`, one file per message in ``DIR/mail/``) unless
``--mta`` names a real mail server; ``--blacklist FILE`` gives the SMTP
exits that ``BlacklistFile`` (``deny ...`` lines, see
:mod:`mixminion.exits.blacklist`).  Every node delivers ``mbox:me`` into
the mbox file ``DIR/mbox``; the exit nodes (the second half) also deliver
by SMTP and reassemble fragments (messages up to 1 MB); the last node also
runs a nymserver for ``NAME@nym.localhost.localdomain`` (doc/nym.md), whose
SMTP port is in ``testnet.json``.  Mixing is Timed
with a 1-second interval and the authorities vote every 3 seconds, so
everything happens fast -- and insecurely, which the nodes' descriptors say.

``DIR`` defaults to ``$MIXMINION_TESTNET_DIR`` or ``~/.mixminion-testnet``;
``DIR/testnet.json`` describes the network for ``status``, ``down`` and
``demo``.  ``up`` on a network that is down starts it again with the same
keys and ports.

``demo`` brings the network up if needed, then with the real
``mixminion-client`` (``DIR/client/mixminionrc``) sends a message through 4
hops to the SMTP sink, and a reply through a reply block (SURB) to the
client's own ``mbox:me``, which it decodes with the client's keyring.  It
exits 0 only if both arrived.

``nym-demo`` brings the network up if needed, creates a nym with
``mixminion-client nym create`` (its reply blocks lead to ``mbox:me``),
mails it from ``carol@example.org`` over SMTP, decodes what reached the
mbox, answers as the nym with ``nym send`` and checks that the answer
reached the SMTP sink ``From`` the nym; then deletes the nym.  It exits 0
only if all of that happened.

Nothing needs root.  Processes are stopped with ``down`` (SIGTERM, then
SIGKILL after 10 s).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shlex
import shutil
import signal
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Awaitable, Callable, Optional, Sequence, TypeVar

from twisted.internet import defer, task, threads, utils

from mixminion.testing.daemon import (
    Daemon,
    authority_config,
    free_ports,
    node_config,
    pid_alive,
    port_free,
    port_open,
    sleep,
    wait_until,
)
from mixminion.testing.sockets import can_bind

T = TypeVar("T")

#: processes started by this run, by configuration file, so their end is noticed (and reaped)
_children: dict[str, Daemon] = {}

PROG = "mixminion-testnet"
STATE_FILE = "testnet.json"
DEFAULT_NODES = 5
AUTHORITIES = 3
THRESHOLD = 2
VOTE_INTERVAL = 3
PASSPHRASE = "testnet"
MBOX_NYM = "me"
MBOX_ADDRESS = "me@localhost.localdomain"
DEMO_RECIPIENT = "alice@example.com"
#: the mail domain of the nymserver the last node runs (doc/nym.md)
NYM_DOMAIN = "nym.localhost.localdomain"
START_TIMEOUT = 30.0
CONSENSUS_TIMEOUT = 90.0
DELIVERY_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
#: a next hop that stops answering is tried again soon: a node that comes
#: back (after `kill -STOP`, say) is measured reliable again within a
#: minute or two, not after an hour
RETRY = "every 2 seconds for 1 minute, every 30 seconds for 1 day"
#: every node pings (doc/reliability.md), fast: a ping every 2 s on
#: average, a report every 10 s, so list-servers shows reliability about a
#: minute after `up`
PINGING = """\
[Pinging]
Enabled: yes
Interval: 2 seconds
Timeout: 20 seconds
Window: 2 minutes
ReportInterval: 10 seconds
"""
#: what the authorities expect of the nodes' reports
RELIABILITY = "ReportInterval: 10 seconds\n"


class TestnetError(Exception):
    """A failure to report to the user (exit 1); the message says what and why."""


def default_dir() -> str:
    return os.environ.get("MIXMINION_TESTNET_DIR") or os.path.expanduser("~/.mixminion-testnet")


# --- the network's description ------------------------------------------------------------


@dataclass
class Proc:
    """One background process of the network."""

    name: str
    kind: str  # "authority", "node" or "sink"
    port: int
    directory: str
    conf: str
    metrics_port: Optional[int] = None
    fingerprint: Optional[str] = None
    exit: bool = False
    #: where a node listens and what it publishes: each node its own
    #: 127.N.0.1, so that pingers count as different networks
    #: (doc/reliability.md §3); 127.0.0.1 where only that one binds
    address: str = "127.0.0.1"
    #: the port of a node's nymserver (doc/nym.md), where mail for the
    #: nyms is delivered over SMTP; None: it runs none
    nym_port: Optional[int] = None

    @property
    def pidfile(self) -> str:
        return os.path.join(self.directory, "twistd.pid")

    @property
    def log(self) -> str:
        return os.path.join(self.directory, "twistd.log")

    @property
    def output(self) -> str:
        """twistd's own stdout and stderr (errors before logging starts)."""
        return os.path.join(self.directory, "stdout.log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def daemon(self) -> Daemon:
        """Its process, ``twistd -n`` (a node must not be daemonized by twistd:
        its worker threads start while the service is built, before twistd
        would fork); :meth:`Daemon.start` detaches it from us and the
        terminal instead (a session of its own)."""
        service = {"authority": ["mixminion-directory", "-c", self.conf],
                   "node": ["mixminion", "-c", self.conf]}.get(self.kind, ["-y", self.conf])
        return _children.get(self.conf) or Daemon(
            self.directory, service, name=self.name, logfile=self.log, outfile=self.output,
            pidfile=self.pidfile)

    def pid(self) -> Optional[int]:
        """The pid of the running process, or None (no pid file, dead, or not ours)."""
        child = _children.get(self.conf)
        if child is not None:  # started by this run: ask it (and reap it)
            return child.pid if child.alive() else None
        try:
            with open(self.pidfile, encoding="ascii") as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return None  # someone else's process reusing the number
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if self.conf.encode() not in f.read():
                    return None  # a reused pid, not our twistd
        except OSError:
            pass  # no /proc: trust the pid file
        return pid

    def alive(self) -> bool:
        return self.pid() is not None


@dataclass
class Network:
    directory: str
    procs: list[Proc] = field(default_factory=list)
    mta: Optional[str] = None  # "HOST:PORT" of a real MTA, or None for our sink
    blacklist: Optional[str] = None  # the SMTP exits' BlacklistFile (absolute), or None

    @property
    def state_file(self) -> str:
        return os.path.join(self.directory, STATE_FILE)

    @property
    def authorities(self) -> list[Proc]:
        return [p for p in self.procs if p.kind == "authority"]

    @property
    def nodes(self) -> list[Proc]:
        return [p for p in self.procs if p.kind == "node"]

    @property
    def sink(self) -> Optional[Proc]:
        return next((p for p in self.procs if p.kind == "sink"), None)

    @property
    def mail_dir(self) -> str:
        return os.path.join(self.directory, "mail")

    @property
    def mbox(self) -> str:
        return os.path.join(self.directory, "mbox")

    @property
    def client_dir(self) -> str:
        return os.path.join(self.directory, "client")

    @property
    def client_rc(self) -> str:
        return os.path.join(self.client_dir, "mixminionrc")

    def save(self) -> None:
        data = {"format": 1, "mta": self.mta, "blacklist": self.blacklist,
                "procs": [asdict(p) for p in self.procs]}
        tmp = self.state_file + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, self.state_file)

    @classmethod
    def load(cls, directory: str) -> Optional["Network"]:
        directory = os.path.abspath(directory)
        try:
            with open(os.path.join(directory, STATE_FILE), encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise TestnetError(f"{directory}/{STATE_FILE} is unreadable ({exc}); remove {directory} "
                               "to start afresh.") from None
        return cls(directory, [Proc(**p) for p in data["procs"]], data.get("mta"), data.get("blacklist"))


# --- small helpers ------------------------------------------------------------------------


def client_command() -> list[str]:
    """How to run ``mixminion-client`` with this Python."""
    return [sys.executable, "-m", "mixminion.client.cli"]


def write_file(path: str, text: str, mode: int = 0o600) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


def say(text: str = "") -> None:
    print(text, flush=True)


async def http_get(reactor: Any, url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    from twisted.web import client as web_client

    pool = web_client.HTTPConnectionPool(reactor, persistent=False)
    agent = web_client.Agent(reactor, connectTimeout=timeout, pool=pool)
    try:
        d = agent.request(b"GET", url.encode("ascii"))
        d.addTimeout(timeout, reactor)
        response = await d
        body = await web_client.readBody(response)
        return response.code, body
    finally:
        await pool.closeCachedConnections()


# --- writing the network --------------------------------------------------------------------


def create_network(directory: str, nodes: int, mta: Optional[str],
                   blacklist: Optional[str] = None, *, pinging: str = PINGING,
                   reliability: str = RELIABILITY, retry: str = RETRY) -> Network:
    """Keys and configurations for a new network in ``directory``
    (``pinging``, ``reliability`` and ``retry``: tests make them faster)."""
    from mixminion.directory.tap import IDENTITY_FILE, load_identity
    from mixminion.smtpsink import tac_text

    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)
    net = Network(directory, mta=mta, blacklist=blacklist)
    ports = free_ports(AUTHORITIES + 2 * nodes + 2)
    exits = set(range(nodes - max(1, (nodes + 1) // 2), nodes))
    for i in range(AUTHORITIES):
        folder = os.path.join(directory, f"auth{i + 1}")
        base = os.path.join(folder, "base")
        os.makedirs(folder, mode=0o700, exist_ok=True)
        os.makedirs(base, mode=0o700, exist_ok=True)
        # The identity key is made now (as the service would on first start)
        # so its fingerprint can go into every Peer and Authority line.
        key = load_identity(os.path.join(base, IDENTITY_FILE), 2048)
        net.procs.append(Proc(f"auth{i + 1}", "authority", ports[i], folder,
                              os.path.join(folder, "authority.conf"),
                              fingerprint=key.public.fingerprint))
    for i in range(nodes):
        folder = os.path.join(directory, f"node{i + 1}")
        address = f"127.{i + 1}.0.1"
        net.procs.append(Proc(f"node{i + 1}", "node", ports[AUTHORITIES + i], folder,
                              os.path.join(folder, "mixminiond.conf"),
                              metrics_port=ports[AUTHORITIES + nodes + i], exit=i in exits,
                              address=address if can_bind(address) else "127.0.0.1",
                              nym_port=ports[-2] if i == nodes - 1 else None))
    if mta is None:
        folder = os.path.join(directory, "smtpsink")
        net.procs.append(Proc("smtpsink", "sink", ports[-1], folder, os.path.join(folder, "smtpsink.tac")))
    smtp_host, smtp_port = (mta.rsplit(":", 1) if mta else ("127.0.0.1", str(ports[-1])))

    peers = [(a.url, a.fingerprint) for a in net.authorities]
    for a in net.authorities:
        write_file(a.conf, authority_config(
            os.path.join(a.directory, "base"), a.name.capitalize(), a.port, peers, THRESHOLD,
            VOTE_INTERVAL, comment=f"{a.name} of the mixminion-testnet network in {directory}",
            reliability=reliability))
    authority_lines = "".join(f"Authority: {a.url} {a.fingerprint}\n" for a in net.authorities)
    for n in net.nodes:
        os.makedirs(n.directory, mode=0o700, exist_ok=True)
        addresses = os.path.join(n.directory, "mbox-addresses")
        write_file(addresses, f"{MBOX_NYM}: {MBOX_ADDRESS}\n")
        text = node_config(
            os.path.join(n.directory, "base"), n.port, nickname=n.name,
            address=n.address, hostname=n.address,
            contact=f"{n.name}@localhost.localdomain",
            comment=f"{n.name} of the mixminion-testnet network in {directory}: fast and "
                    "insecure\n(1-second Timed mixing, short retries), for trying things out on "
                    "one machine.",
            server=f"MinFreeDisk: 1 MB\nMetricsPort: {n.metrics_port}\nMetricsAddress: 127.0.0.1\n",
            outgoing=f"Retry: {retry}\n")
        text += f"""\
{pinging}
[DirectoryServers]
Publish: yes
{authority_lines}
[Delivery/MBOX]
Enabled: yes
AddressFile: {addresses}
RemoveContact: {n.name}@localhost.localdomain
ReturnAddress: {n.name}@localhost.localdomain
MboxFile: {net.mbox}
Retry: {retry}
"""
        if n.exit:
            text += f"""
[Delivery/SMTP]
Enabled: yes
ReturnAddress: {n.name}-exit@localhost.localdomain
SMTPServer: {smtp_host}
SMTPPort: {smtp_port}
Retry: {retry}
MaximumSize: 1 MB
{f"BlacklistFile: {net.blacklist}" if net.blacklist else ""}
[Delivery/Fragmented]
Enabled: yes
MaximumSize: 1 MB
"""
        if n.nym_port is not None:
            text += f"""
[Delivery/Nym]
Enabled: yes
Domain: {NYM_DOMAIN}
IncomingPort: {n.nym_port}
SMTPServer: {smtp_host}
SMTPPort: {smtp_port}
Retry: {retry}
{f"BlacklistFile: {net.blacklist}" if net.blacklist else ""}
"""
        write_file(n.conf, text)
    if net.sink is not None:
        os.makedirs(net.sink.directory, mode=0o700, exist_ok=True)
        write_file(net.sink.conf, tac_text(net.sink.port, net.mail_dir))
    os.makedirs(net.mail_dir, mode=0o700, exist_ok=True)
    os.makedirs(net.client_dir, mode=0o700, exist_ok=True)
    write_file(net.client_rc, f"""\
# mixminion-client configuration for the mixminion-testnet network in {directory}
#   MIXMINIONRC={net.client_rc} mixminion-client list-servers
[DirectoryServers]
DirectoryTimeout: 10 seconds
{authority_lines}Threshold: {THRESHOLD}

[User]
UserDir: {net.client_dir}

[Security]
SURBAddress: mbox:{MBOX_NYM}@{net.nodes[-1].name}

[Network]
Timeout: 20 seconds
""")
    net.save()
    return net


# --- starting, waiting, stopping -------------------------------------------------------------


def report(net: Network, procs: Optional[Sequence[Proc]] = None) -> str:
    return "\n".join(p.daemon().report(20) for p in (procs or net.procs))


def start(proc: Proc) -> None:
    """Start ``proc`` as a detached child (its own session, no terminal): it
    outlives this command and a closed terminal; ``down`` stops it."""
    if os.path.exists(proc.pidfile) and proc.pid() is None:
        os.unlink(proc.pidfile)  # stale: twistd would refuse to start
    _children.pop(proc.conf, None)
    child = proc.daemon()
    child.start()
    _children[proc.conf] = child


async def started(reactor: Any, net: Network, procs: Sequence[Proc]) -> None:
    """Wait until every one of ``procs`` wrote its pid file and listens (a
    node also logged that it started)."""
    async def ready(p: Proc) -> bool:
        if not os.path.exists(p.pidfile) or not await port_open(reactor, p.port, host=p.address):
            return False
        if p.kind != "node":
            return True
        try:
            with open(p.log, encoding="utf-8", errors="replace") as f:
                return f"Mix node {p.name} started" in f.read()
        except OSError:
            return False

    async def all_ready() -> bool:
        return all([await ready(p) for p in procs])
    await wait_for(reactor, net, " and ".join(sorted({p.kind for p in procs})) + " processes to start",
                   all_ready, START_TIMEOUT, 0.2, procs)


async def wait_for(reactor: Any, net: Network, what: str, check: Callable[[], Awaitable[T]],
                   timeout: float, interval: float = 0.5, watch: Optional[Sequence[Proc]] = None) -> T:
    """Poll ``check`` until it gives something true; fail at once if a process
    died, or after ``timeout``, with the tail of the logs."""
    return await wait_until(reactor, what, check, timeout, interval,
                            watch=net.procs if watch is None else watch,
                            report=lambda procs: report(net, procs), error=TestnetError)


def listed(net: Network, body: bytes, now: float) -> Optional[Any]:
    """The verified directory in ``body`` if it lists every node, else None."""
    from mixminion.directory import directory as dirformat

    try:
        d = dirformat.parse_directory(body, now, trusted=[a.fingerprint for a in net.authorities],
                                      threshold=THRESHOLD)
    except Exception:  # noqa: BLE001 - not (yet) a valid directory
        return None
    names = {x.nickname.lower() for x in d.descriptors}
    return d if names >= {n.name for n in net.nodes} else None


async def authority_directory(reactor: Any, net: Network, auth: Proc) -> Optional[Any]:
    try:
        code, body = await http_get(reactor, auth.url + "directory", 3)
    except Exception:  # noqa: BLE001 - not up yet
        return None
    return listed(net, body, reactor.seconds()) if code == 200 else None


async def bring_up(reactor: Any, directory: str, nodes: int, mta: Optional[str],
                   blacklist: Optional[str] = None) -> Network:
    """``up``: create (or restart) the network and wait for its consensus."""
    directory = os.path.abspath(directory)
    net = Network.load(directory)
    if net is not None:
        if blacklist is not None and net.blacklist != blacklist:
            raise TestnetError(f"{directory} holds a network whose SMTP exits were set up "
                               + (f"with --blacklist {net.blacklist}" if net.blacklist else
                                  "without --blacklist")
                               + f", not --blacklist {blacklist}; edit BlacklistFile in the "
                               "exits' mixminiond.conf, or remove the folder with "
                               f"'{PROG} down --purge {directory}'.")
        if len(net.nodes) != nodes or net.mta != mta:
            running = [p for p in net.procs if p.pid() is not None]
            raise TestnetError(
                f"{directory} holds a network of {len(net.nodes)} nodes"
                f"{' with MTA ' + net.mta if net.mta else ''}, not the {nodes} nodes"
                f"{' with MTA ' + mta if mta else ''} asked for. Use it as it is (--nodes "
                f"{len(net.nodes)}), choose another folder, or remove this one with "
                f"'{PROG} down --purge {directory}'" + (" (it is running)." if running else "."))
        waiting = [p for p in net.procs if p.pid() is None]
        if not waiting:
            say(f"The network in {directory} is already up.")
        else:
            busy = [p for p in waiting if not port_free(p.port)]
            if busy:
                raise TestnetError(f"cannot restart the network in {directory}: port(s) "
                                   f"{', '.join(f'{p.port} ({p.name})' for p in busy)} are in use "
                                   f"by something else. Remove it with '{PROG} down --purge "
                                   f"{directory}' and run '{PROG} up' again.")
            say(f"Restarting {len(waiting)} process(es) of the network in {directory}.")
    else:
        if mta is not None and not re.fullmatch(r"[^:\s]+:\d{1,5}", mta):
            raise TestnetError(f"--mta {mta!r}: give HOST:PORT, e.g. 127.0.0.1:25")
        say(f"Creating a network of {AUTHORITIES} directory authorities and {nodes} mix nodes "
            f"in {directory}")
        if blacklist is not None:
            from mixminion.exits.blacklist import Blacklist
            from mixminion.exits.errors import ExitConfigError
            try:
                Blacklist.from_file(blacklist)
            except ExitConfigError as exc:
                raise TestnetError(f"--blacklist: {exc}") from None
        net = create_network(directory, nodes, mta, blacklist)
        waiting = list(net.procs)
    t0 = reactor.seconds()
    order = [p for p in waiting if p.kind == "sink"] + [p for p in waiting if p.kind == "authority"] \
        + [p for p in waiting if p.kind == "node"]
    # the sink and the authorities first, so the nodes can publish at once
    try:
        for group in ([p for p in order if p.kind != "node"], [p for p in order if p.kind == "node"]):
            for p in group:
                start(p)
            await started(reactor, net, group)
    except BaseException:
        await stop_all(reactor, net, quiet=True)
        raise
    for p in order:
        say(f"  started {p.name:<9} pid {p.pid()}  port {p.port}"
            + (f"  metrics {p.metrics_port}" if p.metrics_port else "")
            + ("  (exit: SMTP, MBOX, fragments)" if p.exit else ("  (MBOX)" if p.kind == "node" else "")))
    say(f"Waiting for the authorities to agree on a directory of all {len(net.nodes)} nodes "
        f"(they vote every {VOTE_INTERVAL} s)...")

    async def consensus() -> Optional[list[Any]]:
        found = [await authority_directory(reactor, net, a) for a in net.authorities]
        return found if all(found) else None  # type: ignore[return-value]
    try:
        await wait_for(reactor, net, "a consensus listing every node at every authority", consensus,
                       CONSENSUS_TIMEOUT)
    except TestnetError as exc:
        raise TestnetError(f"{exc}\n(The processes still running are left up for you to look at; "
                           f"'{PROG} down {directory}' stops them.)") from None
    await refresh_client(reactor, net)
    say(f"The network is up ({reactor.seconds() - t0:.0f} s).")
    return net


async def refresh_client(reactor: Any, net: Network) -> None:
    """Download the consensus into the client's folder, as the client would."""
    from mixminion.client.directory import ClientDirectory

    client = ClientDirectory(net.client_dir, [(a.url, a.fingerprint) for a in net.authorities],
                             None, THRESHOLD, reactor=reactor, timeout=10, environ={})
    await client.update(force=True)


def usage_text(net: Network) -> str:
    rc = shlex.quote(net.client_rc)
    mail = (f"the SMTP sink writes each mail to {net.mail_dir}/" if net.mta is None
            else f"mail goes to the MTA at {net.mta}")
    return f"""\
Use it with mixminion-client (keyring passphrase for the demo: {PASSPHRASE!r}):
  export MIXMINIONRC={rc}
  mixminion-client list-servers
  echo hello | mixminion-client send -t {DEMO_RECIPIENT} -H 4      # {mail}
  mixminion-client generate-surb -t mbox:{MBOX_NYM}@{net.nodes[-1].name} -H 2 -o reply.surb
  echo hi | mixminion-client send -R reply.surb -H 2                 # lands in {net.mbox}
  mixminion-client decode -i {shlex.quote(net.mbox)}
{PROG} status {shlex.quote(net.directory)} shows the processes; {PROG} down {shlex.quote(net.directory)} stops them."""


async def stop_all(reactor: Any, net: Network, quiet: bool = False) -> list[str]:
    """SIGTERM every running process, SIGKILL those still there after
    ``STOP_TIMEOUT``; remove pid files.  Returns the names of those killed."""
    running = {p.name: (p, pid) for p in reversed(net.procs) if (pid := p.pid()) is not None}
    for p, pid in running.values():
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = reactor.seconds() + STOP_TIMEOUT
    while any(pid_alive(pid) for _, pid in running.values()) and reactor.seconds() < deadline:
        await sleep(reactor, 0.1)
    killed = []
    for name, (p, pid) in running.items():
        if pid_alive(pid):
            killed.append(name)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for p in net.procs:
        if os.path.exists(p.pidfile) and p.pid() is None:
            os.unlink(p.pidfile)
        if not quiet and p.name in running:
            say(f"  stopped {p.name}" + (" (killed: it did not stop on SIGTERM)" if p.name in killed else ""))
    return killed


# --- status -------------------------------------------------------------------------------------


def mail_files(net: Network) -> list[str]:
    try:
        return sorted(os.path.join(net.mail_dir, n) for n in os.listdir(net.mail_dir) if n.endswith(".eml"))
    except FileNotFoundError:
        return []


def mbox_count(net: Network) -> int:
    try:
        with open(net.mbox, "rb") as f:
            return sum(1 for line in f if line.startswith(b"From "))
    except FileNotFoundError:
        return 0


async def node_metrics(reactor: Any, node: Proc) -> Optional[dict[str, float]]:
    try:
        code, body = await http_get(reactor, f"http://127.0.0.1:{node.metrics_port}/metrics", 3)
    except Exception:  # noqa: BLE001
        return None
    if code != 200:
        return None
    values: dict[str, float] = {}
    for line in body.decode("utf-8", "replace").splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                values[name] = float(value)
            except ValueError:
                pass
    return values


async def show_status(reactor: Any, net: Network) -> int:
    say(f"Network in {net.directory}")
    up = 0
    for p in net.procs:
        pid = p.pid()
        up += pid is not None
        state = f"up, pid {pid}" if pid else "DOWN"
        line = f"  {p.name:<9} {p.kind:<9} port {p.port:<5} {state}"
        if p.kind == "authority" and pid:
            d = await authority_directory(reactor, net, p)
            if d is not None:
                from mixminion.codec.textformat import format_time
                line += (f"; consensus valid after {format_time(int(d.valid_after))}, "
                         f"{len(d.descriptors)} servers, signed by {len(d.signers)}")
            else:
                line += "; no consensus listing every node yet"
        elif p.kind == "node" and pid:
            m = await node_metrics(reactor, p)
            if m is None:
                line += "; metrics page not answering"
            else:
                queues = {k[len("mixminion_queue_"):-len("_packets")]: int(v) for k, v in m.items()
                          if k.startswith("mixminion_queue_") and k.endswith("_packets")}
                line += "; queued " + (", ".join(f"{k} {v}" for k, v in sorted(queues.items())) or "-")
        elif p.kind == "sink":
            line += f"; {len(mail_files(net))} mail(s) in {net.mail_dir}"
        say(line)
    if net.mta:
        say(f"  SMTP exits deliver to the MTA at {net.mta}")
    say(f"  mbox {net.mbox}: {mbox_count(net)} message(s)")
    say(f"  client configuration: {net.client_rc}")
    say(f"{up} of {len(net.procs)} processes up.")
    return 0 if up == len(net.procs) else 1


# --- demo ----------------------------------------------------------------------------------------


async def run_client(reactor: Any, net: Network, args: list[str], show: str,
                     echo: bool = True, quiet: bool = False) -> bytes:
    """Run ``mixminion-client ARGS`` for the network; its stdout, or
    TestnetError.  ``quiet``: say nothing (a poll)."""
    env = dict(os.environ, MIXMINIONRC=net.client_rc, MIXMINION_PASSPHRASE=PASSPHRASE)
    if not quiet:
        say(f"$ mixminion-client {show}")
    argv = client_command() + args
    out, err, code = await utils.getProcessOutputAndValue(argv[0], argv[1:], env=env,
                                                          path=net.directory, reactor=reactor)
    text = ((out if echo else b"") + err).decode("utf-8", "replace").strip()
    if text and not quiet:
        say("\n".join("  " + ln for ln in text.splitlines()))
    if code != 0:
        raise TestnetError(f"mixminion-client {args[0]} failed (exit {code})")
    return out


def new_mails(net: Network, before: set[str], token: str) -> list[str]:
    found = []
    for path in mail_files(net):
        if path in before:
            continue
        with open(path, "rb") as f:
            if token.encode() in f.read():
                found.append(path)
    return found


def mbox_tail(net: Network, offset: int) -> bytes:
    """What was appended to the mbox after ``offset``, read under its lock."""
    import fcntl

    try:
        fd = os.open(net.mbox, os.O_RDONLY)
    except FileNotFoundError:
        return b""
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH)
        os.lseek(fd, offset, os.SEEK_SET)
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


async def demo(reactor: Any, directory: str, nodes: int, mta: Optional[str],
               blacklist: Optional[str] = None) -> int:
    directory = os.path.abspath(directory)
    net = Network.load(directory)
    if net is None or any(p.pid() is None for p in net.procs):
        net = await bring_up(reactor, directory, nodes if net is None else len(net.nodes),
                             mta if net is None else net.mta, blacklist if net is None else None)
    else:
        say(f"Using the running network in {directory}.")
        await refresh_client(reactor, net)
    run_id = os.urandom(4).hex()
    work = os.path.join(directory, "demo")
    os.makedirs(work, mode=0o700, exist_ok=True)
    forward_token = f"forward-{run_id}"
    reply_token = f"reply-{run_id}"
    message = os.path.join(work, "message.txt")
    write_file(message, f"Hello from mixminion-testnet ({forward_token}).\n"
                        "This message went through four mix nodes.\n")
    reply = os.path.join(work, "reply.txt")
    write_file(reply, f"A reply through your reply block ({reply_token}).\n"
                      "Whoever sent it does not know who you are.\n")
    surb = os.path.join(work, "reply.surb")
    mails_before = set(mail_files(net))
    mbox_offset = os.path.getsize(net.mbox) if os.path.exists(net.mbox) else 0
    t0 = reactor.seconds()

    say("")
    say(f"1. A message through 4 hops to {DEMO_RECIPIENT} (an exit node hands it to "
        + ("the SMTP sink)" if net.mta is None else f"the MTA at {net.mta})"))
    await run_client(reactor, net, ["send", "--no-queue", "-t", DEMO_RECIPIENT, "-H", "4",
                                    "--subject", "mixminion-testnet demo", "-i", message],
                     f"send -t {DEMO_RECIPIENT} -H 4 --subject 'mixminion-testnet demo' -i {message}")
    say("")
    say(f"2. A reply block (SURB) for our own mailbox '{MBOX_NYM}', and a reply sent through it")
    # an mbox address names its server: any node delivers mbox:me to DIR/mbox
    surb_to = f"mbox:{MBOX_NYM}@{random.choice(net.nodes).name}"
    await run_client(reactor, net, ["generate-surb", "-t", surb_to, "-H", "2", "-o", surb],
                     f"generate-surb -t {surb_to} -H 2 -o {surb}")
    await run_client(reactor, net, ["send", "--no-queue", "-R", surb, "-H", "2", "-i", reply],
                     f"send -R {surb} -H 2 -i {reply}")
    say("")
    say("3. Waiting for both to come out of the network (1-second mixing at each hop)...")

    async def smtp_delivered() -> int:
        """Mail the exit nodes handed to an MTA that accepted it (their counters)."""
        total = 0
        for n in net.nodes:
            m = await node_metrics(reactor, n) if n.exit else None
            total += int((m or {}).get('mixminion_events_total{event="ExitDelivered:SMTP"}', 0))
        return total
    smtp_before = await smtp_delivered() if net.mta is not None else 0

    async def forward_done() -> bool:
        if net.mta is not None:
            return await smtp_delivered() > smtp_before
        return bool(new_mails(net, mails_before, forward_token))

    async def reply_done() -> bool:
        return b"TYPE III ANONYMOUS MESSAGE" in mbox_tail(net, mbox_offset)

    problems = []
    for what, check in (("the forward message at the " + ("SMTP sink" if net.mta is None else "MTA"),
                         forward_done),
                        ("the reply in the mbox", reply_done)):
        try:
            await wait_for(reactor, net, what, check, DELIVERY_TIMEOUT, 0.3)
        except TestnetError as exc:
            problems.append(str(exc))
    say(f"   ...after {reactor.seconds() - t0:.1f} s")
    ok = True
    say("")
    if net.mta is not None:
        if await smtp_delivered() > smtp_before:
            say(f"An exit node handed the forward message to the MTA at {net.mta}, which accepted "
                f"it; look for it in {DEMO_RECIPIENT}'s mailbox there.")
        else:
            ok = False
            say(f"The forward message was NOT accepted by the MTA at {net.mta}.")
    else:
        found = new_mails(net, mails_before, forward_token)
        if found:
            say(f"Delivered by SMTP ({found[0]}):")
            with open(found[0], encoding="utf-8", errors="replace") as f:
                say("\n".join("  | " + ln for ln in f.read().rstrip("\n").splitlines()))
        else:
            ok = False
            say("The forward message did NOT arrive at the SMTP sink.")
    say("")
    appended = mbox_tail(net, mbox_offset)
    if b"TYPE III ANONYMOUS MESSAGE" in appended:
        received = os.path.join(work, "received.mbox")
        with open(received, "wb") as f:
            f.write(appended)
        say(f"Delivered to {net.mbox} (encrypted: only the SURB's owner can read it):")
        lines = appended.decode("latin-1").rstrip("\n").splitlines()
        cut = next((i for i, ln in enumerate(lines) if ln.startswith("Decoding-handle:")), len(lines)) + 4
        shown = lines[:cut] + ([f"[... {len(lines) - cut - 1} more lines of base64 ...]", lines[-1]]
                               if len(lines) > cut + 1 else lines[cut:])
        say("\n".join("  | " + ln for ln in shown))
        say("")
        decoded = await run_client(reactor, net, ["decode", "-i", received],
                                   f"decode -i {received}", echo=False)
        text = decoded.decode("utf-8", "replace")
        say("\n".join("  | " + ln for ln in text.rstrip("\n").splitlines()))
        if reply_token not in text:
            ok = False
            say("The decoded reply is not the one sent.")
    else:
        ok = False
        say("The reply did NOT arrive in the mbox.")
    say("")
    if problems:
        say("\n".join(problems))
    if ok:
        say("Demo succeeded: the forward message and the reply both arrived.")
        say("")
        say(usage_text(net))
        return 0
    say("Demo FAILED.")
    return 1


async def nym_demo(reactor: Any, directory: str, nodes: int, mta: Optional[str]) -> int:
    """``nym-demo``: a nym created through the network, mail to it from an
    ordinary address, and the nym's answer (doc/nym.md)."""
    directory = os.path.abspath(directory)
    net = Network.load(directory)
    if net is None or any(p.pid() is None for p in net.procs):
        net = await bring_up(reactor, directory, nodes if net is None else len(net.nodes),
                             mta if net is None else net.mta)
    else:
        say(f"Using the running network in {directory}.")
        await refresh_client(reactor, net)
    servers = [n for n in net.nodes if n.nym_port is not None]
    if not servers:
        raise TestnetError(f"the network in {directory} runs no nymserver (it was made before "
                           f"they were added): remove it with '{PROG} down --purge {directory}' "
                           "and try again")
    server = servers[0]
    run_id = os.urandom(3).hex()
    nym, token = f"demo-{run_id}", f"nym-{run_id}"
    address = f"{nym}@{NYM_DOMAIN}"
    sender = "carol@example.org"
    owner = f"mbox:{MBOX_NYM}@{random.choice(net.nodes).name}"
    work = os.path.join(directory, "demo")
    os.makedirs(work, mode=0o700, exist_ok=True)
    mbox_offset = os.path.getsize(net.mbox) if os.path.exists(net.mbox) else 0
    received = os.path.join(work, "nym.mbox")
    t0 = reactor.seconds()

    async def decoded() -> str:
        with open(received, "wb") as f:
            f.write(mbox_tail(net, mbox_offset))
        try:
            out = await run_client(reactor, net, ["decode", "-i", received], "", echo=False,
                                   quiet=True)
        except TestnetError:  # nothing to decode yet
            return ""
        return out.decode("utf-8", "replace")

    async def wait_decoded(what: str, text: str) -> str:
        async def check() -> Optional[str]:
            out = await decoded()
            return out if text in out else None
        return await wait_for(reactor, net, what, check, DELIVERY_TIMEOUT, 1.0)

    def show(text: str) -> None:
        say("\n".join("  | " + ln for ln in text.rstrip("\n").splitlines()))

    say("")
    say(f"1. A nym, {address}, on the nymserver of {server.name}: the request travels "
        "through the network encrypted to the nymserver, with 4 reply blocks that lead to our "
        f"mailbox ({owner})")
    await run_client(reactor, net, ["nym", "create", nym, "--surbs", "4", "--to", owner],
                     f"nym create {nym} --surbs 4 --to {owner}")
    await wait_decoded("the nymserver's answer", "request 1 done")
    say("")
    say(f"2. {sender} mails {address} (straight to the nymserver's SMTP port {server.nym_port}; "
        "in production an MTA for the domain relays it there)")
    await threads.deferToThread(_smtp_send, server.nym_port, sender, address,
                                f"From: {sender}\nSubject: hello ({token})\n\n"
                                f"Hi, who are you? ({token})\n")
    text = await wait_decoded("the mail in our mailbox", f"Hi, who are you? ({token})")
    say(f"$ mixminion-client decode -i {received}")
    show(text)
    say("")
    say(f"3. We answer as the nym; {sender} gets it from {address}")
    reply = os.path.join(work, "nym-reply.txt")
    write_file(reply, f"Someone you can write to again. ({token} answer)\n")
    await run_client(reactor, net, ["nym", "send", nym, "-t", sender, "--subject",
                                    f"Re: hello ({token})", "-i", reply],
                     f"nym send {nym} -t {sender} --subject 'Re: hello' -i {reply}")
    ok = True
    if net.mta is None:
        async def answered() -> Optional[list[str]]:
            found = [m for m in new_mails(net, set(), f"{token} answer")]
            return found or None
        try:
            [path, *_] = await wait_for(reactor, net, "the nym's mail at the SMTP sink", answered,
                                        DELIVERY_TIMEOUT, 1.0)
            with open(path, encoding="utf-8", errors="replace") as f:
                mail = f.read()
            say(f"Delivered by SMTP ({path}):")
            show(mail)
            ok = f"From: {address}" in mail
        except TestnetError as exc:
            say(str(exc))
            ok = False
    else:
        say(f"The nym's mail goes to the MTA at {net.mta}; look for it in {sender}'s mailbox.")
    await run_client(reactor, net, ["nym", "delete", nym], f"nym delete {nym}")
    say("")
    say(f"   ...after {reactor.seconds() - t0:.1f} s")
    if ok:
        say("Nym demo succeeded: mail reached the nym's owner, and the nym's answer its sender.")
        return 0
    say("Nym demo FAILED.")
    return 1


def _smtp_send(port: int, sender: str, to: str, text: str) -> None:
    import smtplib

    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.sendmail(sender, [to], text)


# --- the command ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Run a Type III network of directory "
                                "authorities and mix nodes on this machine.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    helps = {"up": "create and start the network (or restart a stopped one)",
             "status": "show the processes, the consensus and the queues",
             "down": "stop every process of the network",
             "demo": "send a message and a SURB reply through the network (starting it if needed)",
             "nym-demo": "create a nym, mail it from an ordinary address and answer as the nym "
                         "(starting the network if needed)"}
    for name, text in helps.items():
        s = sub.add_parser(name, help=text, description=text + ".")
        s.add_argument("dir", nargs="?", metavar="DIR", default=None,
                       help="the network's folder (default $MIXMINION_TESTNET_DIR or "
                            "~/.mixminion-testnet)")
        if name in ("up", "demo", "nym-demo"):
            s.add_argument("--nodes", type=int, default=DEFAULT_NODES, metavar="N",
                           help=f"mix nodes (default {DEFAULT_NODES}; at least 4)")
            s.add_argument("--mta", metavar="HOST:PORT", default=None,
                           help="deliver SMTP mail to this mail server instead of our sink")
            s.add_argument("--blacklist", metavar="FILE", default=None,
                           type=lambda v: os.path.abspath(os.path.expanduser(v)),
                           help="blacklist for the SMTP exits (BlacklistFile in [Delivery/SMTP]): "
                                "'deny address|user|onehost|allhosts|pattern ARG' lines; "
                                "set when the network is created")
        if name == "down":
            s.add_argument("--purge", action="store_true",
                           help="also delete the network's folder (keys, queues, mail)")
    return p


async def run(reactor: Any, argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    directory = os.path.abspath(os.path.expanduser(args.dir or default_dir()))
    try:
        if args.command in ("up", "demo", "nym-demo") and args.nodes < 4:
            raise TestnetError("--nodes must be at least 4 (the demo's path has 4 hops)")
        if args.command == "up":
            net = await bring_up(reactor, directory, args.nodes, args.mta, args.blacklist)
            say("")
            say(usage_text(net))
            return 0
        if args.command == "demo":
            return await demo(reactor, directory, args.nodes, args.mta, args.blacklist)
        if args.command == "nym-demo":
            return await nym_demo(reactor, directory, args.nodes, args.mta)
        net = Network.load(directory)
        if net is None:
            if args.command == "down" and args.purge and os.path.isdir(directory):
                raise TestnetError(f"{directory} has no {STATE_FILE}: not removing a folder "
                                   f"{PROG} did not make.")
            say(f"No network in {directory} (run '{PROG} up' first).")
            return 0 if args.command == "down" else 1
        if args.command == "status":
            return await show_status(reactor, net)
        killed = await stop_all(reactor, net)
        say(f"The network in {directory} is down.")
        if args.purge:
            shutil.rmtree(directory)
            say(f"Removed {directory}.")
        return 1 if killed else 0
    except TestnetError as exc:
        sys.stderr.write(f"{PROG} {args.command}: {exc}\n")
        return 1


def main(argv: Optional[Sequence[str]] = None) -> None:
    arguments = list(sys.argv[1:] if argv is None else argv)

    async def body(reactor: Any) -> None:
        status = await run(reactor, arguments)
        if status:
            raise SystemExit(status)

    task.react(lambda reactor: defer.ensureDeferred(body(reactor)))


if __name__ == "__main__":  # pragma: no cover
    main()
