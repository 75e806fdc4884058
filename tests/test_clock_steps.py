"""Wall-clock steps under a running ``twistd mixminion`` exit (issue 12
point 7), made with libfaketime (Debian's ``faketime`` package) in the
node's process only: its wall clock is moved, its monotonic clock is not.

Before the fix a step of +2 h with the mail server down expired every
acknowledged message whose retry schedule was shorter (``Expired:SMTP``,
nothing in the log), and a step back of 4 h stopped mixing until the clock
caught up.  Now:

1. +2 h: the node says the clock jumped, and the queued messages stay
   queued and keep being retried on their schedule;
2. then back 4 h: the node says so, and new messages are still mixed,
   tried at once and retried (stamped by the processing child on the
   node's clock, not two hours in the past);
3. when the mail server comes back, every message is delivered: none
   expired.
"""

from __future__ import annotations

#: waits for what the node does, measures nothing, so it runs beside the
#: other process tests; about how many seconds it takes (scripts/test.sh
#: starts the longest first)
SLOW = 33

import os

from twisted.internet import defer
from twisted.internet import reactor as _reactor

from mixminion.codec.build import build_message_packets
from mixminion.codec.routing import SMTP_TYPE
from mixminion.smtpsink import make_service
from mixminion.testing.processes import MixNode, free_ports, metric
from tests.test_node_options import NodeTestCase

reactor: object = _reactor

LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"
FIRST, LATER = 12, 4


class ClockStepTests(NodeTestCase):
    def setUp(self) -> None:
        super().setUp()
        if not os.path.exists(LIBFAKETIME):
            raise self.skipException(f"needs libfaketime ({LIBFAKETIME}): "
                                     "apt-get install faketime")
        self.offset_file = os.path.join(self.dir, "faketime")
        self.set_offset("+0")

    def set_offset(self, offset: str) -> None:
        """The node's wall clock from now on: real time plus ``offset``."""
        with open(self.offset_file, "w") as f:
            f.write(offset + "\n")

    def test_steps_neither_expire_nor_stall(self) -> defer.Deferred:
        return defer.ensureDeferred(self._steps())

    async def _steps(self) -> None:
        (mta_port,) = free_ports(1)  # nobody listens there yet: the MTA is down
        node = MixNode(self)
        node.daemon.env = {
            "LD_PRELOAD": LIBFAKETIME, "FAKETIME_TIMESTAMP_FILE": self.offset_file,
            "FAKETIME_NO_CACHE": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
        await node.start(node.config(extra=(
            f"[Delivery/SMTP]\nEnabled: yes\nReturnAddress: exit@example.org\n"
            f"SMTPServer: 127.0.0.1\nSMTPPort: {mta_port}\n"
            f"Retry: every 5 seconds for 1 hour\n"),
            server=f"MetricsPort: {node.metrics_port}\n"))
        hop = node.hop()

        def messages(first: int, count: int) -> list[bytes]:
            return [b.packet for i in range(first, first + count)
                    for b in build_message_packets(f"message {i}\n".encode(), SMTP_TYPE,
                                                   f"user{i}@example.com".encode(),
                                                   lambda _: ([hop], [hop]), os.urandom)]

        def counted(event: str) -> int:
            return metric(node.metrics_port, event)

        async def wait_counted(event: str, at_least: int, timeout: float = 60) -> None:
            """Until ``event`` was counted ``at_least`` times; no message may
            expire meanwhile."""
            await node.daemon.wait_for(
                reactor, f"{event} >= {at_least}",
                lambda: counted(event) >= at_least or counted("Expired:SMTP") > 0, timeout)
            self.assertEqual(counted("Expired:SMTP"), 0, f"messages expired waiting for {event}")

        sent = messages(0, FIRST)
        self.assertEqual(await node.send_all(sent), [None] * len(sent))
        await wait_counted("ExitRetry:SMTP", FIRST)

        # 1. Two hours forward: past the whole one-hour schedule.
        self.set_offset("+2h")
        await node.daemon.wait_for_line(reactor, "The system clock jumped forward by 2 h")
        await wait_counted("ExitRetry:SMTP", 3 * FIRST)  # tried again, twice each

        # 2. Four hours back: two hours behind real time.
        self.set_offset("-2h")
        await node.daemon.wait_for_line(reactor, "The system clock jumped back by 4 h")
        mixed = counted("Mixed")
        later = messages(FIRST, LATER)
        self.assertEqual(await node.send_all(later), [None] * len(later))
        await wait_counted("Mixed", mixed + LATER, timeout=30)
        retried = counted("ExitRetry:SMTP")
        await wait_counted("ExitRetry:SMTP", retried + 2 * (FIRST + LATER))

        # 3. The mail server comes back: everything goes out.
        mail = os.path.join(self.dir, "mail")
        mta = make_service(mta_port, mail)
        mta.startService()
        self.addCleanup(mta.stopService)
        await wait_counted("ExitDelivered:SMTP", FIRST + LATER)
        self.assertEqual(len(os.listdir(mail)), FIRST + LATER)
