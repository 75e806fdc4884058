"""``MinFreeDisk`` beyond reception (issue 12 point 10), on a real small
disk: a tmpfs the test mounts (so it runs as root, and is skipped where
mounting is not allowed).

Before the fix only MMTP reception checked free space; processing and an
MBOX file kept writing until the disk was full.  Now, under half of
``MinFreeDisk``, processing leaves received packets in the incoming log
and MBOX leaves its mail in its queue; each says so once at WARN, shows
it on the metrics page, and goes on by itself (one INFO line) when space
comes back: here, when the test deletes its filler file, and when a
SIGHUP lowers ``MinFreeDisk``.  Nothing is lost.

The small disk holds only what the stage under test writes (the packet
bodies' folder, or the mbox file's), so reception, on the test's own
disk, keeps accepting meanwhile.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess

from twisted.internet import defer, task
from twisted.trial import unittest

from mixminion.codec.build import build_message_packets
from mixminion.codec.routing import MBOX_TYPE
from mixminion.testing.processes import MixNode, gauge, metric, read_text
from tests.test_node_options import RELOADED_ONE, NodeTestCase, reactor

MB = 1 << 20
#: the node's MinFreeDisk: later stages keep 4 MB
MIN_FREE = "8 MB"
#: what the filler leaves free on the small disk: under 4 MB
LEFT_FREE = 2 * MB


def small_disk(test: unittest.TestCase, path: str, node: MixNode, size_mb: int = 16) -> None:
    """Mount a tmpfs of ``size_mb`` at ``path``; unmounted after the node
    is stopped."""
    if os.geteuid() != 0:
        raise unittest.SkipTest("mounting a small disk (tmpfs) needs root")
    os.makedirs(path, mode=0o700, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0700", "tmpfs",
                           path], capture_output=True, text=True)
    if done.returncode != 0:
        raise unittest.SkipTest(f"cannot mount a tmpfs: {done.stderr.strip()}")

    async def unmount() -> None:
        node.daemon.kill()
        # The processing child exits once it sees its stdin closed: until
        # then the disk is busy.
        for _ in range(100):
            if subprocess.run(["umount", path], capture_output=True).returncode == 0:
                return
            await task.deferLater(reactor, 0.1, lambda: None)
        subprocess.run(["umount", "--lazy", path], check=True)

    test.addCleanup(lambda: defer.ensureDeferred(unmount()))


def fill(path: str, leave: int) -> str:
    """A file that leaves ``leave`` bytes free on ``path``'s disk."""
    filler = os.path.join(path, "filler")
    size = shutil.disk_usage(path).free - leave
    with open(os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
        chunk = b"\0" * MB
        while size > 0:
            size -= f.write(chunk[:min(size, MB)])
    assert shutil.disk_usage(path).free <= leave
    return filler


class DiskFloorTests(NodeTestCase):
    def test_processing_waits_for_space_and_loses_nothing(self) -> defer.Deferred:
        return defer.ensureDeferred(self._processing())

    async def _processing(self) -> None:
        node = MixNode(self)
        bodies = os.path.join(node.base, "work", "queues", "bodies")
        small_disk(self, bodies, node)
        filler = fill(bodies, LEFT_FREE)
        await node.start(node.config(
            server=f"MinFreeDisk: {MIN_FREE}\nMetricsPort: {node.metrics_port}"))
        self.assertEqual(await node.send_all(node.drop_packets(10)), [None] * 10)
        # Two looks at the disk later, the packets still wait where they were
        # acknowledged, and the small disk holds nothing new.
        await task.deferLater(reactor, 5, lambda: None)
        self.assertEqual(os.listdir(bodies), ["filler"])
        self.assertEqual(metric(node.metrics_port, "ProcessedRelay"), 0)
        self.assertEqual(gauge(node.metrics_port, "queue_incoming_packets"), 10)
        self.assertEqual(gauge(node.metrics_port, "processing_paused_disk"), 1)
        [warned] = node.daemon.lines("Processing paused")
        self.assertIn("#warn]", warned)
        self.assertIn(f"MB free on the disk of {bodies}, under its floor of 4.0 MB", warned)
        os.remove(filler)
        await node.daemon.wait_for_line(reactor, "Processing resumed", timeout=20)
        await node.daemon.wait_for(
            reactor, "the ten packets through both legs",
            lambda: metric(node.metrics_port, "DroppedDummy") == 10, timeout=30)
        self.assertEqual(gauge(node.metrics_port, "processing_paused_disk"), 0)
        self.assertEqual(len(node.daemon.lines("Processing paused")), 1)
        self.assertEqual(len(node.daemon.lines("Processing resumed")), 1)
        self.assertNotIn("Traceback", node.daemon.text())
        self.assertEqual(await node.daemon.stop(reactor), -signal.SIGTERM)

    def test_mbox_delivery_waits_for_space_and_loses_nothing(self) -> defer.Deferred:
        return defer.ensureDeferred(self._mbox())

    async def _mbox(self) -> None:
        node = MixNode(self)
        mail = os.path.join(self.dir, "mail")
        small_disk(self, mail, node)
        fill(mail, LEFT_FREE)
        mbox = os.path.join(mail, "alice.mbox")
        aliases = os.path.join(self.dir, "aliases")
        with open(aliases, "w") as f:
            f.write("alice: alice@example.org\n")

        def config(min_free: str) -> str:
            return node.config(
                server=f"MinFreeDisk: {min_free}\nMetricsPort: {node.metrics_port}",
                extra=("[Delivery/MBOX]\nEnabled: yes\nReturnAddress: exit@example.org\n"
                       f"RemoveContact: exit@example.org\nAddressFile: {aliases}\n"
                       f"MboxFile: {mbox}\n"))

        await node.start(config(MIN_FREE))
        hop = node.hop()
        packets = [b.packet for i in range(3) for b in build_message_packets(
            f"note {i}\n".encode(), MBOX_TYPE, b"alice", lambda i: ([hop], [hop]), os.urandom)]
        self.assertEqual(await node.send_all(packets), [None] * 3)
        # Processed and mixed, the mail waits in MBOX's queue, untried.
        await node.daemon.wait_for(
            reactor, "the mail processed",
            lambda: metric(node.metrics_port, "ProcessedExit") == 3, timeout=20)
        await task.deferLater(reactor, 3, lambda: None)
        self.assertFalse(os.path.exists(mbox))
        self.assertEqual(metric(node.metrics_port, "ExitRetry:MBOX"), 0)
        self.assertEqual(gauge(node.metrics_port, "delivery_paused_disk"), 1)
        [warned] = node.daemon.lines("Delivery by MBOX paused")
        self.assertIn("#warn]", warned)
        # A lower MinFreeDisk (SIGHUP) puts the floor under what is free.
        node.write(config("2 MB"))
        node.daemon.signal(signal.SIGHUP)
        await node.daemon.wait_for_line(reactor, RELOADED_ONE, timeout=20)
        await node.daemon.wait_for_line(reactor, "Delivery by MBOX resumed", timeout=20)
        await node.daemon.wait_for(
            reactor, "the three notes in the mbox",
            lambda: all(f"note {i}" in read_text(mbox) for i in range(3)), timeout=30)
        self.assertEqual(gauge(node.metrics_port, "delivery_paused_disk"), 0)
        self.assertEqual(len(node.daemon.lines("Delivery by MBOX paused")), 1)
        self.assertEqual(metric(node.metrics_port, "ExitDelivered:MBOX"), 3)
        self.assertNotIn("Traceback", node.daemon.text())
        self.assertEqual(await node.daemon.stop(reactor), -signal.SIGTERM)
