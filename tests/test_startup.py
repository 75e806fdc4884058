"""Start-up failures an operator can cause, through the real entry points.

``twistd -n mixminion -c FILE`` must stop with a non-zero status and one
line saying what is wrong, never a traceback; ``mixminiond check -c FILE``
must find the same problems without starting anything.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from twisted.trial import unittest

from mixminion.testing.processes import free_ports, node_config, run_twistd

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mixminiond(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mixminion.server.mixminiond", *args],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)


class StartupFailureTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        [self.port] = free_ports(1)
        self.base = os.path.join(self.dir, "base")
        self.conf = os.path.join(self.dir, "node.conf")

    def write(self, text: str) -> None:
        with open(self.conf, "w") as f:
            f.write(text)

    def config(self, **sections: str) -> str:
        return node_config(self.base, self.port, **sections)

    def assertOneLineFailure(self, *fragments: str) -> str:
        """Start the node; it must fail with one ``mixminion:`` line holding
        every fragment, and no traceback."""
        done = run_twistd(["mixminion", "-c", self.conf], cwd=self.dir)
        self.assertNotEqual(done.returncode, 0, done.stdout)
        self.assertNotIn("Traceback", done.stdout)
        lines = [line for line in done.stdout.splitlines() if "mixminion:" in line]
        self.assertEqual(len(lines), 1, done.stdout)
        for fragment in fragments:
            self.assertIn(fragment, lines[0])
        return lines[0]

    def start_once(self) -> None:
        """Start and stop a node so that its keys exist."""
        self.write(self.config())
        from mixminion.server.config import load_config
        from mixminion.server.tap import build_node
        from twisted.internet import reactor

        node = build_node(load_config(self.conf), reactor)
        node.pid_file.release()
        node.store.close()
        node.incoming.close()

    def test_misspelt_option(self) -> None:
        self.write(self.config(server="MixIntervall: 10 minutes"))
        self.assertOneLineFailure(f"{self.conf}:", "[Server] MixIntervall: unknown option",
                                  "did you mean MixInterval?")

    def test_port_in_use(self) -> None:
        self.write(self.config())
        with socket.socket() as taken:
            taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            taken.bind(("127.0.0.1", self.port))
            taken.listen()
            self.assertOneLineFailure(f"cannot listen on 127.0.0.1:{self.port}",
                                      "Address already in use")

    def test_corrupt_identity_key(self) -> None:
        self.start_once()
        with open(os.path.join(self.base, "keys", "identity.key"), "w") as f:
            f.write("-----BEGIN RSA PRIVATE KEY-----\ngarbage\n")
        self.assertOneLineFailure("identity.key")

    def test_keys_folder_is_a_file(self) -> None:
        os.makedirs(self.base, mode=0o700)
        open(os.path.join(self.base, "keys"), "w").close()
        self.write(self.config())
        self.assertOneLineFailure(os.path.join(self.base, "keys"), "not a folder")

    def test_loose_permissions(self) -> None:
        """FileParanoia (on by default) refuses a world-open keys folder and
        a readable identity key, naming the path and the fix."""
        self.start_once()
        keys = os.path.join(self.base, "keys")
        os.chmod(keys, 0o777)
        self.assertOneLineFailure(keys, "chmod 700")
        os.chmod(keys, 0o700)
        identity = os.path.join(keys, "identity.key")
        os.chmod(identity, 0o644)
        self.assertOneLineFailure(identity, "chmod 600")
        self.write(self.config(extra="[Host]\nFileParanoia: no\n"))
        done = mixminiond("check", "-c", self.conf)
        self.assertEqual(done.returncode, 0, done.stdout)

    def test_full_disk(self) -> None:
        """BaseDir on a file system with a few KB left (a tmpfs of our own;
        mounting needs root)."""
        disk = os.path.join(self.dir, "disk")
        os.makedirs(disk)
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", disk],
                                 capture_output=True, text=True)
        if mounted.returncode != 0:
            raise unittest.SkipTest(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
        self.addCleanup(subprocess.run, ["umount", "-l", disk], capture_output=True)
        with open(os.path.join(disk, "filler"), "wb") as f:
            f.write(bytes(1000 * 1024))
        self.base = os.path.join(disk, "base")
        self.write(self.config())
        line = self.assertOneLineFailure(self.base)
        self.assertRegex(line, "No space left on device|disk is full|disk I/O error")

    def test_exit_module_not_installed(self) -> None:
        self.write(self.config(extra="[Delivery/SMTP-Via-Mixmaster]\nEnabled: yes\n"))
        self.assertOneLineFailure("[Delivery/SMTP-Via-Mixmaster]",
                                  "no installed exit module handles this section")

    def test_module_that_cannot_be_loaded(self) -> None:
        self.write(self.config(server="Module: nosuch.package.Factory"))
        self.assertOneLineFailure("[Server] Module:", "cannot load exit module nosuch.package.Factory")

    def test_refused_option(self) -> None:
        self.write(self.config(server="Daemon: yes"))
        self.assertOneLineFailure("[Server] Daemon: not supported", "-n (--nodaemon)")

    def test_interval_that_is_not_whole_seconds(self) -> None:
        """Intervals count whole seconds: half a second is refused, not
        taken as 0 (which for KeepOpen would close every connection at once)."""
        self.write(self.config(outgoing="KeepOpen: 0.5 seconds"))
        self.assertOneLineFailure("[Outgoing/MMTP] KeepOpen:", '"0.5 seconds" is not a whole '
                                  "number of seconds")

    def test_unreadable_configuration(self) -> None:
        self.assertOneLineFailure(f"{self.conf}:0: cannot read the file")


class CheckCommandTests(unittest.TestCase):
    """``mixminiond check``: OK and 0, or every problem, one a line, and 1."""

    def test_shipped_examples_are_ok(self) -> None:
        for name in ("tap-example.conf", os.path.join("etc", "mixminiond.conf")):
            done = mixminiond("check", "-c", os.path.join(REPO, name))
            self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
            self.assertEqual(done.stdout.splitlines()[-1], "OK")

    def test_every_problem_is_listed(self) -> None:
        conf = os.path.abspath(self.mktemp())
        text = node_config("/tmp/checked", 48099, server="MixIntervall: 10 minutes\nDaemon: yes",
                           outgoing="MaxConections: 3")
        with open(conf, "w") as f:
            f.write(text)
        done = mixminiond("check", "-c", conf)
        self.assertEqual(done.returncode, 1)
        lines = done.stdout.splitlines()
        self.assertEqual(len(lines), 3, done.stdout)
        line_of = {key: text.splitlines().index(entry) + 1 for key, entry in
                   (("MixIntervall", "MixIntervall: 10 minutes"), ("Daemon", "Daemon: yes"),
                    ("MaxConections", "MaxConections: 3"))}
        self.assertEqual(lines[0], f"{conf}:{line_of['MixIntervall']}: [Server] MixIntervall: "
                                   "unknown option; did you mean MixInterval?")
        self.assertIn(f"{conf}:{line_of['Daemon']}: [Server] Daemon: not supported", lines[1])
        self.assertEqual(lines[2], f"{conf}:{line_of['MaxConections']}: [Outgoing/MMTP] "
                                   "MaxConections: unknown option; did you mean MaxConnections?")
        self.assertNotIn("Traceback", done.stderr)

    def test_exit_modules_check_their_files(self) -> None:
        """What only an exit module knows (the rules of a BlacklistFile) is
        checked too, as the node would at start."""
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        conf = os.path.join(folder, "node.conf")
        with open(os.path.join(folder, "blacklist"), "w") as f:
            f.write("deny bogus rule here\n")
        with open(conf, "w") as f:
            f.write(node_config(os.path.join(folder, "base"), 48099,
                                extra="[Delivery/SMTP]\nEnabled: yes\nReturnAddress: r@example.org\n"
                                      "BlacklistFile: blacklist\n"))
        done = mixminiond("check", "-c", conf)
        self.assertEqual(done.returncode, 1, done.stdout)
        [line] = done.stdout.splitlines()
        self.assertIn("blacklist", line.lower())
        self.assertFalse(os.path.exists(os.path.join(folder, "base")))

    def test_usage(self) -> None:
        done = mixminiond("check")
        self.assertEqual(done.returncode, 2)
        self.assertIn("-c", done.stderr)
