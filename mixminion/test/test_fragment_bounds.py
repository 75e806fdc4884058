"""The FRAGMENT module keeps pending fragments on disk, not in memory, and
bounds what is pending (issue 12 point 3).

A :class:`FragmentModule` on a temporary store, fed items built with the
codec's fragment encoding, with a ``task.Clock`` and a dispatcher that
records the reassembled items.  Shown here:

* memory holds no fragment body: nothing reachable from the reassembler is
  a bytes object longer than a message id, its size per pending message is
  a few hundred bytes (the codec's in-memory :class:`Reassembler`, measured
  the same way, holds the whole 28 KB fragment), and Python's allocator
  (``tracemalloc``) grows by well under a KB per pending fragment;
* a message completes from fragments and decoded chunks read back from the
  file, also across a restart (a new module on the same store), including
  a message of two chunks with one decoded before the restart;
* the bounds (``MaximumPendingMessages``, ``MaximumPendingBytes``) evict
  the oldest pending messages first, never the one that just grew; each
  eviction is counted (``FragmentEvicted``), one WARN line per flush says
  how many without any message id; an evicted message is forgotten, not
  rejected; lowered bounds apply at the next start;
* a failed transaction leaves memory as the file is.
"""

from __future__ import annotations

import gc
import os
import random
import sqlite3
import sys
import tracemalloc
import types
from typing import Any

from twisted.internet import task
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial import unittest

from mixminion.codec.build import encode_message_payloads
from mixminion.codec.fragments import Reassembler, fragment_message, server_side_prefix
from mixminion.codec.payload import encode_fragment, fragment_capacity, parse_payload
from mixminion.codec.routing import FRAGMENT_TYPE, MBOX_TYPE
from mixminion.exits.context import ExitContext
from mixminion.exits.errors import ExitConfigError
from mixminion.exits.fragment import DAY, FragmentModule
from mixminion.exits.fragment_store import FragmentStore
from mixminion.exits.items import DeliveryResult, make_delivery_item
from mixminion.mmtp.stats import MMTPStats

#: each byte to one of 94 printable characters
PRINTABLE = bytes(33 + i % 94 for i in range(256))
FRAGMENT_DATA = fragment_capacity(0)  # 28,625 bytes
#: a message id: the longest bytes object memory may hold per pending message
MESSAGE_ID_LEN = 20


def rng_of(seed: int):
    return random.Random(seed).randbytes


def noise(n: int, seed: int) -> bytes:
    """Printable text that compresses by a fifth at most."""
    return rng_of(seed)(n).translate(PRINTABLE)


def lone_fragment(seed: int, index: int = 0, length: int = 40000) -> bytes:
    """One fragment of a message of ``length`` bytes that never completes
    (k = 2, n = 3 for the default length)."""
    rng = rng_of(seed)
    return encode_fragment(index, rng(20), length, rng(FRAGMENT_DATA))


def reachable(root: Any) -> tuple[int, int, int]:
    """``(objects, bytes, longest bytes object)`` reachable from ``root``,
    not following the store (its SQLite connection), modules, classes or
    functions."""
    seen: set[int] = set()
    stack = [root]
    total = count = longest = 0
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (FragmentStore, sqlite3.Connection, type, types.ModuleType,
                                               types.FunctionType, types.BuiltinFunctionType)):
            continue
        seen.add(id(obj))
        count += 1
        total += sys.getsizeof(obj)
        if isinstance(obj, (bytes, bytearray, memoryview)):
            longest = max(longest, len(obj))
        stack.extend(gc.get_referents(obj))
    return count, total, longest


class FragmentCase(unittest.TestCase):
    def setUp(self) -> None:
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        self.clock = task.Clock()
        self.clock.advance(20000 * DAY + 3600)
        self.counters = MMTPStats()
        #: the reassembled messages handed back to the node
        self.handed_back: list = []
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def module(self, **options: str) -> FragmentModule:
        """A new module on the same store (a restart when one ran before)."""
        context = ExitContext(self.base, self.clock, counters=self.counters)
        context.hand_back.connect(self.handed_back.append)
        module = FragmentModule()
        module.configure({"Enabled": "yes", "MaximumSize": "200K", **options}, context.for_module("FRAGMENT"))
        self.addCleanup(module.stop)
        return module

    def feed(self, module: FragmentModule, payload: bytes) -> DeliveryResult:
        return self.successResultOf(module.deliver(make_delivery_item(FRAGMENT_TYPE, b"", payload)))

    def rows(self, module: FragmentModule, table: str) -> int:
        return module.store.db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # noqa: S608

    def warnings(self) -> list[str]:
        return [formatEvent(e) for e in self.events if e.get("log_level") == LogLevel.warn]


class NoBodiesInMemory(FragmentCase):
    def test_reassembler_holds_metadata_only(self) -> None:
        module = self.module()
        payloads = [lone_fragment(seed) for seed in range(100)]
        for payload in payloads:
            self.assertIs(self.feed(module, payload), DeliveryResult.OK)
        self.assertEqual(self.counters["FragmentStored"], 100)
        self.assertEqual(len(module.reassembler.pending), 100)
        self.assertEqual(module.reassembler.pending_bytes, 100 * FRAGMENT_DATA)
        self.assertEqual(self.rows(module, "fragments"), 100)
        _, size, longest = reachable(module.reassembler)
        self.assertLessEqual(longest, MESSAGE_ID_LEN)
        self.assertLess(size / 100, 500)
        # The same measure finds the bodies in the codec's in-memory reassembler.
        codec = Reassembler()
        for payload in payloads:
            codec.add(parse_payload(payload), 0)
        _, codec_size, codec_longest = reachable(codec)
        self.assertEqual(codec_longest, FRAGMENT_DATA)
        self.assertGreater(codec_size / 100, FRAGMENT_DATA)
        # Nothing else in the module keeps a body either.
        kept = {k: v for k, v in vars(module).items() if k not in ("context", "_store", "_reassembler", "log")}
        self.assertLessEqual(reachable(kept)[2], MESSAGE_ID_LEN)

    def test_python_memory_per_pending_fragment(self) -> None:
        module = self.module()
        self.feed(module, lone_fragment(1000))  # opens the store
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        for seed in range(300):
            self.feed(module, lone_fragment(seed))
        gc.collect()
        per_fragment = (tracemalloc.get_traced_memory()[0] - before) / 300
        self.assertEqual(len(module.reassembler.pending), 301)
        self.assertLess(per_fragment, 1024, f"{per_fragment:.0f} bytes per pending fragment")

    def test_restart_reads_metadata_only(self) -> None:
        module = self.module()
        for seed in range(50):
            self.feed(module, lone_fragment(seed))
        self.successResultOf(module.stop())
        restarted = self.module()
        self.assertEqual(len(restarted.reassembler.pending), 50)
        self.assertEqual(restarted.reassembler.pending_bytes, 50 * FRAGMENT_DATA)
        self.assertLessEqual(reachable(restarted.reassembler)[2], MESSAGE_ID_LEN)


class CompletesFromDisk(FragmentCase):
    def message(self, size: int, seed: int) -> tuple[bytes, list[bytes]]:
        body = noise(size, seed) + b"\n"
        return body, encode_message_payloads(body, rng_of(seed), exit_type=MBOX_TYPE, exit_address=b"alice")

    def delivered(self, body: bytes) -> None:
        [item] = self.handed_back
        self.assertEqual((item.exit_type, item.address, item.reassembled), (MBOX_TYPE, b"alice", True))
        self.assertEqual(item.classification.body, body)

    def test_one_chunk(self) -> None:
        body, payloads = self.message(90000, 1)
        self.assertEqual(len(payloads), 6)  # k = 4, n = 6
        module = self.module()
        for payload in (payloads[5], payloads[1], payloads[3]):
            self.feed(module, payload)
        mid = parse_payload(payloads[0]).message_id
        self.assertEqual(module.reassembler.missing(mid), 1)
        # A repeated fragment is compared with the one on disk.
        self.feed(module, payloads[1])
        self.assertEqual(self.counters["FragmentUnneeded"], 1)
        self.assertEqual(self.handed_back, [])
        self.feed(module, payloads[0])
        self.delivered(body)
        self.assertEqual(self.counters["FragmentCompleted"], 1)
        self.assertEqual(module.reassembler.status_of(mid), "COMPLETED")
        self.assertEqual((len(module.reassembler.pending), module.reassembler.pending_bytes), (0, 0))
        for table in ("messages", "fragments", "chunks", "outbox"):
            self.assertEqual(self.rows(module, table), 0, table)

    def test_across_restart(self) -> None:
        body, payloads = self.message(90000, 2)
        first = self.module()
        for payload in payloads[:3]:
            self.feed(first, payload)
        self.successResultOf(first.stop())
        second = self.module()
        mid = parse_payload(payloads[0]).message_id
        self.assertEqual(second.reassembler.status_of(mid), "PENDING")
        self.assertEqual(second.reassembler.missing(mid), 1)
        self.feed(second, payloads[4])
        self.delivered(body)
        self.successResultOf(second.stop())
        # The COMPLETED mark is on disk: a late fragment is dropped after a restart.
        third = self.module()
        self.feed(third, payloads[5])
        self.assertEqual(self.counters["FragmentDropped"], 1)
        self.assertEqual(len(self.handed_back), 1)

    def test_two_chunks_one_decoded_before_a_restart(self) -> None:
        body, payloads = self.message(600000, 3)
        self.assertEqual(len(payloads), 44)  # k = 16, n = 22, two chunks
        first = self.module(MaximumSize="700K")
        for payload in payloads[3:19] + payloads[22:30]:  # chunk 0 complete, 8 of chunk 1
            self.feed(first, payload)
        mid = parse_payload(payloads[0]).message_id
        info = first.reassembler.pending[mid]
        self.assertEqual(info.decoded, 0b01)
        self.assertEqual((self.rows(first, "chunks"), self.rows(first, "fragments")), (1, 8))
        self.assertEqual(first.reassembler.missing(mid), 8)
        self.assertEqual(first.reassembler.pending_bytes, 16 * FRAGMENT_DATA + 8 * FRAGMENT_DATA)
        self.successResultOf(first.stop())
        second = self.module(MaximumSize="700K")
        self.assertEqual(second.reassembler.missing(mid), 8)
        self.assertEqual(second.reassembler.pending[mid].decoded, 0b01)
        self.feed(second, payloads[0])  # chunk 0 is decoded: not needed
        self.assertEqual(self.counters["FragmentUnneeded"], 1)
        for payload in payloads[36:44]:
            self.feed(second, payload)
        self.delivered(body)

    def test_different_fragment_at_a_stored_index_rejects(self) -> None:
        _, payloads = self.message(90000, 4)
        module = self.module()
        self.feed(module, payloads[2])
        original = parse_payload(payloads[2])
        forged = encode_fragment(2, original.message_id, original.message_length, rng_of(5)(FRAGMENT_DATA))
        self.assertIs(self.feed(module, forged), DeliveryResult.NORETRY)
        self.assertEqual(module.reassembler.status_of(original.message_id), "REJECTED")
        self.assertEqual((self.rows(module, "messages"), self.rows(module, "fragments")), (0, 0))
        self.assertEqual(module.reassembler.pending_bytes, 0)

    def test_failed_transaction_reloads_memory_from_the_file(self) -> None:
        module = self.module()
        self.feed(module, lone_fragment(1))
        store = module.store

        def broken(*args: Any) -> None:
            raise sqlite3.OperationalError("disk I/O error")

        store.save_fragment = broken  # type: ignore[method-assign]
        self.failureResultOf(module.deliver(make_delivery_item(FRAGMENT_TYPE, b"", lone_fragment(2))),
                             sqlite3.OperationalError)
        self.assertEqual(len(module.reassembler.pending), 1)
        self.assertEqual(module.reassembler.pending_bytes, FRAGMENT_DATA)
        self.assertEqual(self.rows(module, "messages"), 1)


class PendingBounds(FragmentCase):
    def mid(self, payload: bytes) -> bytes:
        return parse_payload(payload).message_id

    def test_count_bound_evicts_oldest_first(self) -> None:
        module = self.module(MaximumPendingMessages="3")
        lone = [lone_fragment(seed) for seed in range(5)]
        for payload in lone:
            self.feed(module, payload)
            self.clock.advance(60)
        self.assertEqual(list(module.reassembler.pending), [self.mid(p) for p in lone[2:]])
        self.assertEqual(self.counters["FragmentEvicted"], 2)
        self.assertEqual(self.counters["FragmentStored"], 5)
        self.assertEqual((self.rows(module, "messages"), self.rows(module, "fragments")), (3, 3))
        # Forgotten, not rejected: a later fragment starts the message again.
        self.assertIsNone(module.reassembler.status_of(self.mid(lone[0])))
        again = lone_fragment(0, index=1)
        self.feed(module, again)
        self.assertEqual(module.reassembler.status_of(self.mid(lone[0])), "PENDING")
        self.assertEqual(list(module.reassembler.pending), [self.mid(p) for p in lone[3:] + lone[:1]])
        self.assertEqual(self.counters["FragmentEvicted"], 3)
        # One WARN line per flush, with the count and no message id.
        self.assertEqual(self.warnings(), [])
        self.successResultOf(module.flush())
        [warning] = self.warnings()
        self.assertIn("Evicted 3 pending fragmented messages", warning)
        for payload in lone:
            self.assertNotIn(self.mid(payload).hex(), warning)
        self.successResultOf(module.flush())
        self.assertEqual(len(self.warnings()), 1)

    def test_byte_bound_never_evicts_the_message_that_grew(self) -> None:
        # MaximumSize 100K: one message needs at most 229,000 bytes (k = 8,
        # eight fragments); 224 KB holds eight fragments.
        module = self.module(MaximumSize="100K", MaximumPendingBytes="224 KB")
        growing = fragment_message(server_side_prefix(MBOX_TYPE, b"alice") + noise(90000, 9), rng_of(9))
        self.assertEqual(len(growing), 6)  # k = 4
        self.feed(module, growing[0])
        others = [lone_fragment(seed) for seed in range(7)]
        for payload in others:
            self.feed(module, payload)
        self.assertEqual(module.reassembler.pending_bytes, 8 * FRAGMENT_DATA)
        self.assertEqual(self.counters["FragmentEvicted"], 0)
        # The oldest message grows: the next oldest goes instead.
        self.feed(module, growing[1])
        self.assertEqual(self.counters["FragmentEvicted"], 1)
        self.assertIn(self.mid(growing[0]), module.reassembler.pending)
        self.assertNotIn(self.mid(others[0]), module.reassembler.pending)
        self.assertEqual(module.reassembler.pending_bytes, 8 * FRAGMENT_DATA)
        # It still completes within the bound.
        self.feed(module, growing[2])
        self.feed(module, growing[3])
        self.assertEqual(self.counters["FragmentCompleted"], 1)
        self.assertEqual(len(self.handed_back), 1)
        self.assertEqual(self.counters["FragmentEvicted"], 2)
        self.assertEqual(list(module.reassembler.pending), [self.mid(p) for p in others[2:]])
        self.assertEqual(module.reassembler.pending_bytes, 5 * FRAGMENT_DATA)

    def test_lowered_bounds_apply_at_the_next_start(self) -> None:
        first = self.module()
        lone = [lone_fragment(seed) for seed in range(6)]
        for payload in lone:
            self.feed(first, payload)
        self.successResultOf(first.stop())
        second = self.module(MaximumPendingMessages="2")
        self.assertEqual(list(second.reassembler.pending), [self.mid(p) for p in lone[4:]])
        self.assertEqual(self.counters["FragmentEvicted"], 4)
        self.assertEqual(self.rows(second, "fragments"), 2)

    def test_bounds_are_checked(self) -> None:
        for options in ({"MaximumPendingMessages": "0"},
                        {"MaximumPendingBytes": "100 KB"},  # one 200K message needs 458,000 bytes
                        {"MaximumPendingBytes": "lots"}):
            exc = self.assertRaises(ExitConfigError, self.module, **options)
            self.assertIn(next(iter(options)), str(exc))
        self.assertIn("MaximumSize", str(self.assertRaises(ExitConfigError, self.module,
                                                           MaximumPendingBytes="100 KB")))
        module = self.module()
        self.assertEqual((module.max_pending_messages, module.max_pending_bytes), (10000, 256 << 20))
        self.assertEqual(self.module(MaximumPendingBytes="448 KB").max_pending_bytes, 448 * 1024)
