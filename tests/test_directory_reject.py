"""The reject list with real processes: three authorities (``twistd
mixminion-directory``, ``VoteInterval: 3 seconds``, threshold 2) and three
nodes (``twistd mixminion``, ``Publish: yes``) on loopback, built with
``tests/test_directory_network.py``'s helpers.

One test, in phases (each needs the state the previous one left):

1. Authority 2 rejects ``node3`` by nickname from its start (``NODE3``:
   case does not matter); authority 3's list names networks no node is in;
   authority 1's list is empty.  Authority 2 refuses node3's upload, and
   the node logs why; node3 is in neither authority 2's vote nor its store,
   but two votes of three list it, so every directory carries all three
   nodes, authority 2's signature included (it logs that it was
   outvoted).
2. Authority 1 adds node3's identity fingerprint to its list and gets a
   SIGHUP: it logs the list applied, node3 is now rejected by two of three
   authorities and leaves every directory, while node1 and node2 stay.
3. A SIGHUP with a bad line in authority 3's list: it logs the file, the
   line and why, keeps its list and goes on publishing.

``RejectStartupTests``: a bad line stops ``twistd mixminion-directory`` at
start with one line naming the file and the line.

About 15-25 s; every process is killed in cleanup, and a failure shows the
tail of every log.
"""

from __future__ import annotations

#: about how many seconds it takes: scripts/test.sh starts the longest first
SLOW = 15

import glob
import os
import signal
from typing import Any

from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.trial import unittest

import tests.test_directory_network as network
from mixminion.testing.processes import authority_config, free_ports, read_text, run_twistd

reactor: Any = _reactor
ROUND_TIMEOUT = network.ROUND_TIMEOUT
FIRST, SECOND, VICTIM = "node1", "node2", "node3"
REJECTS = "rejects"


#: the network test's helpers, borrowed rather than copied.  Its class is never
#: a name of this module: trial would run its test here too.
NetworkHelpers = type("NetworkHelpers", (), {
    name: vars(network.DirectoryNetworkTests)[name]
    for name in ("setUp", "stop_everything", "trusted", "write_authority", "start_authority",
                 "write_node", "start_node", "processes", "report", "get", "directory_of",
                 "wait_for")})


class RejectNetworkTests(NetworkHelpers, unittest.TestCase):  # type: ignore[misc, valid-type]

    timeout = 150

    def write_rejects(self, auth: network.AuthorityProc, text: str) -> str:
        path = os.path.join(auth.directory, REJECTS)
        with open(path, "w", encoding="ascii") as f:
            f.write(text)
        return path

    async def listed(self, nicknames: set[str]) -> bool:
        """Every authority serves a valid directory carrying exactly ``nicknames``."""
        for auth in self.authorities:
            found = await self.directory_of(auth)
            if found is None or {d.nickname for d in found.descriptors} != nicknames:
                return False
            if {n.lower() for n in found.recommended_nicknames} != nicknames:
                return False
        return True

    def test_rejected_by_two_of_three(self) -> defer.Deferred:
        return defer.ensureDeferred(self._rejected_by_two_of_three())

    async def _rejected_by_two_of_three(self) -> None:
        auth1, auth2, auth3 = self.authorities
        self.nodes = self.nodes[:3]  # the network test's set-up makes four
        victim = self.nodes[2]
        self.assertEqual(victim.name, VICTIM)
        lists = ["# nobody yet\n",
                 "# by nickname, from the start\nNODE3\n",
                 "192.0.2.0/24   # nobody's\n2001:db8::/32\n"]
        for auth, text in zip(self.authorities, lists):
            self.write_authority(auth)
            self.write_rejects(auth, text)
            with open(auth.conf, "a", encoding="ascii") as f:
                f.write(f"RejectFile: {REJECTS}\n")
            self.start_authority(auth)
        for node in self.nodes:
            self.write_node(node)
            self.start_node(node)

        # 1. rejected by one authority of three: refused there, listed all the same
        everyone = {FIRST, SECOND, VICTIM}
        await self.wait_for("every node in every directory", lambda: self.listed(everyone), 60)
        self.assertIn("is on this authority's reject list", victim.daemon.text(), self.report())
        for d in [await self.directory_of(a) for a in self.authorities]:
            self.assertEqual(set(d.signers), set(self.trusted))
        code, vote = await self.get(auth2.url + "vote")
        self.assertEqual(code, 200)
        self.assertNotIn(b"Nickname: node3\n", vote)
        self.assertIn(b"Nickname: node1\n", vote)
        stored = [read_text(path) for path in glob.glob(os.path.join(auth2.directory, "base",
                                                                     "descriptors", "*"))]
        self.assertEqual(sorted(t.split("Nickname: ", 1)[1].split("\n")[0] for t in stored),
                         [FIRST, SECOND])
        log2 = auth2.daemon.text()
        self.assertIn("reject list nickname node3 (", log2)
        self.assertIn("on our reject list, voted for by enough other authorities: node3", log2)

        # 2. authority 1 adds node3's fingerprint; SIGHUP: two of three reject it, it leaves
        [descriptor] = victim.descriptors()
        path = self.write_rejects(auth1, f"# added after it was listed\n{descriptor.fingerprint}\n")
        auth1.daemon.signal(signal.SIGHUP)
        await auth1.daemon.wait_for_line(
            reactor, f"SIGHUP: reject list {path} applied: 1 entry (1 fingerprint)", timeout=10)
        await self.wait_for("node3 out of every directory, node1 and node2 still in",
                            lambda: self.listed({FIRST, SECOND}), ROUND_TIMEOUT)
        self.assertIn("SIGHUP: applied RejectFile", auth1.daemon.text())

        # 3. a bad line on SIGHUP: the list is kept, the authority goes on
        published = auth3.daemon.text().count("Published consensus")
        path = self.write_rejects(auth3, "192.0.2.0/24\nnot a line\n")
        auth3.daemon.signal(signal.SIGHUP)
        await auth3.daemon.wait_for_line(
            reactor, f'not reloaded, still running on the old one: {path}:2: "not a line" is not a',
            timeout=10)
        await self.wait_for(
            "authority 3 to publish again",
            lambda: auth3.daemon.text().count("Published consensus") >= published + 2, ROUND_TIMEOUT)
        self.assertTrue(await self.listed({FIRST, SECOND}))


class RejectStartupTests(unittest.TestCase):
    def test_bad_line_stops_start_up(self) -> None:
        """One line naming the reject file, the line and why; no traceback."""
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        [port] = free_ports(1)
        conf = os.path.join(folder, "authority.conf")
        with open(conf, "w", encoding="ascii") as f:
            f.write(authority_config(os.path.join(folder, "base"), "Auth1", port,
                                     [(f"http://127.0.0.1:{port}/", "AB" * 20)], 1, 3)
                    + f"RejectFile: {REJECTS}\n")
        with open(os.path.join(folder, REJECTS), "w", encoding="ascii") as f:
            f.write("node1\n192.0.2.0/24 198.51.100.0/24\n")
        done = run_twistd(["mixminion-directory", "-c", conf], cwd=folder)
        self.assertEqual(done.returncode, 1, done.stdout)
        self.assertNotIn("Traceback", done.stdout)
        [line] = [line for line in done.stdout.splitlines() if "mixminion-directory:" in line]
        self.assertEqual(line, f'mixminion-directory: {folder}/{REJECTS}:2: "192.0.2.0/24 '
                               '198.51.100.0/24" is not an address or network (e.g. 192.0.2.7, '
                               "192.0.2.0/24, 2001:db8::/32); one entry a line")
        self.assertFalse(os.path.exists(os.path.join(folder, "base", "identity.key")))
