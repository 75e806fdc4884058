"""A real MTA for the tests: our own opensmtpd (Debian package
``opensmtpd``), every recipient delivered into one maildir.

What works here (opensmtpd 6.8):

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
"""

from __future__ import annotations

import mailbox
import os
import pwd
import shutil
import tempfile
from dataclasses import dataclass
from email.message import Message
from typing import Any, Optional

from mixminion.testing.daemon import Daemon, free_ports, port_open

__all__ = ["INSTALL_MTA", "MTA", "find_smtpd", "running_smtpd", "start_opensmtpd"]

INSTALL_MTA = ("DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "
               "opensmtpd")

SMTPD_CONF = """\
# Written by mixminion/testing/mta.py.  Every recipient, in any domain, is
# mapped to the user nobody (smtpd refuses to deliver as root) and lands in
# one maildir that nobody owns.
listen on 127.0.0.1 port {port}
action "deliver" maildir "{maildir}" virtual {{ "@" = nobody }}
match from any for any action "deliver"
"""


def smtpd_conf(port: int, maildir: str, relays: dict[str, int]) -> str:
    """SMTPD_CONF, with a rule before the catch-all for each relayed domain."""
    head, _, match = SMTPD_CONF.format(port=port, maildir=maildir).rpartition("match ")
    rules = "".join(f'action "relay{i}" relay host smtp://127.0.0.1:{p}\n'
                    f'match from any for domain "{domain}" action "relay{i}"\n'
                    for i, (domain, p) in enumerate(sorted(relays.items())))
    return head + rules + "match " + match


@dataclass
class MTA:
    """Our own opensmtpd: every recipient lands in one maildir."""

    port: int
    maildir: str
    conf: str
    process: Daemon

    def messages(self) -> list[Message]:
        if not os.path.isdir(os.path.join(self.maildir, "new")):
            return []
        box = mailbox.Maildir(self.maildir, factory=None, create=False)
        return [box[key] for key in box.keys()]


def find_smtpd() -> Optional[str]:
    return shutil.which("smtpd") or next(
        (p for p in ("/usr/sbin/smtpd", "/usr/local/sbin/smtpd") if os.access(p, os.X_OK)), None)


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


#: held while one of our opensmtpd runs (opensmtpd allows one per machine)
LOCK_FILE = "/tmp/mixminion-test-mta.lock"
#: how long a test waits for another's MTA to finish
LOCK_WAIT = 600.0


async def machine_lock(case: Any, reactor: Any) -> None:
    """Wait (up to :data:`LOCK_WAIT`) until no other test of ours runs an
    MTA on this machine, and hold that until ``case`` ends."""
    import fcntl
    import time

    from twisted.internet import task

    fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                case.fail(f"another test held {LOCK_FILE} (its MTA) for {LOCK_WAIT:.0f} s")
            await task.deferLater(reactor, 0.5, lambda: None)
    # Cleanups run last-added first: the MTA is stopped before this runs.
    case.addCleanup(os.close, fd)


async def start_opensmtpd(case: Any, workdir: str, skip_hint: str = "",
                          relays: Optional[dict[str, int]] = None,
                          port: Optional[int] = None) -> MTA:
    """A real opensmtpd on a free loopback port, delivering to a Maildir
    as 'nobody' (stopped when ``case``, a test case, ends); fails ``case``
    with what to do when the machine cannot run one.  ``skip_hint`` ends
    those messages (how to run the test without the MTA, where it can).
    ``relays`` maps mail domains to loopback ports the MTA relays their
    mail to (a nymserver's listener), as a production MTA in front of it
    would.  ``port``: listen there (one the caller chose, and wrote into
    configurations already) rather than on a free one."""
    from twisted.internet import reactor

    smtpd = find_smtpd()
    if smtpd is None:
        case.fail(f"this test needs opensmtpd, which is not installed: run '{INSTALL_MTA}' as "
                  f"root (CI does){skip_hint}")
    if os.geteuid() != 0:
        case.fail("opensmtpd only runs as root (it drops to its own users): run this test as "
                  f"root, as CI does{skip_hint}")
    # One smtpd per machine: tests that run at once (trial -j) take turns.
    await machine_lock(case, reactor)
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
    if port is None:
        [port] = free_ports(1)
    conf = os.path.join(workdir, "smtpd.conf")
    with open(conf, "w", encoding="ascii") as f:
        f.write(smtpd_conf(port, maildir, relays or {}))
    os.chmod(conf, 0o644)
    process = Daemon(workdir, ["-d", "-f", conf], name="smtpd", program=[smtpd])
    process.start()
    case.addCleanup(process.stopper(reactor, 5))
    try:
        await process.wait_for(reactor, f"smtpd to listen on port {port}",
                               lambda: port_open(reactor, port), timeout=10)
    except AssertionError as exc:
        hint = ""
        if "already" in process.text():
            hint = ("\nAnother smtpd is running (opensmtpd allows one per machine): stop it, "
                    "e.g. 'systemctl stop opensmtpd' or 'service opensmtpd stop'.")
        case.fail(f"smtpd -d -f {conf} did not start: {exc}{hint}")
    return MTA(port, maildir, conf, process)
