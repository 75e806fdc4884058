"""The server key store (server.md §8, §2, §7, §17.5), driven by a fake time.

RSA key generation is slow (~0.1 s for 2048 bits), so the store gets its
keys from :class:`KeyFactory`, which hands out a small pool of test keys
(:func:`mixminion.testing.keys.key`: made once per test run).  Keys repeat
every ``POOL_SIZE`` keysets; at most three keysets are ever live together,
so live keys are still distinct.
"""

from __future__ import annotations

import calendar
import math
import dataclasses
import os
import stat
from typing import Callable

from twisted.trial import unittest

from mixminion.codec.errors import BuildError
from mixminion.codec.rsa import PrivateKey, PublicKey
from mixminion.directory.descriptor import (
    DescriptorFields,
    Expired,
    IncomingMMTP,
    OutgoingMMTP,
    parse_descriptor,
)
from mixminion.server import keys as K
from mixminion.server.keys import (
    PREPUBLICATION_INTERVAL,
    PUBLICATION_LATENCY,
    KeyStore,
    KeyStoreError,
    Keyset,
    keysets_needed,
    midnight,
    next_keyset_number,
    plan_keysets,
    schedule_problems,
    secure_delete,
)
from mixminion.testing.keys import key

DAY = 86400
HOUR = 3600
#: 2024-03-10 13:17:00 GMT: mid-day, so "round down to midnight" matters
T0 = calendar.timegm((2024, 3, 10, 13, 17, 0, 0, 0, 0))
M0 = calendar.timegm((2024, 3, 10, 0, 0, 0, 0, 0, 0))
HORIZON = PUBLICATION_LATENCY + PREPUBLICATION_INTERVAL
POOL_SIZE = 8



def pooled_key(index: int) -> PrivateKey:
    return key(f"keyset {index}")


class KeyFactory:
    """``generate_key`` for tests: pre-generated 2048-bit keys in turn."""

    def __init__(self, offset: int = 0) -> None:
        self.offset = offset
        self.requests: list[int] = []

    def __call__(self, bits: int) -> PrivateKey:
        assert bits == 2048, bits
        packet_key = pooled_key((self.offset + len(self.requests)) % POOL_SIZE)
        self.requests.append(bits)
        return packet_key


def make_template(**changes: object) -> DescriptorFields:
    """The node's description of itself; the per-keyset fields are placeholders."""
    fields = DescriptorFields(
        nickname="Quince",
        contact="quince-admin@example.org",
        packet_key=pooled_key(0).public,
        published=0,
        valid_after=0,
        valid_until=0,
        incoming=IncomingMMTP(hostname="mix.example.org", port=48099, ip="192.0.2.7"),
        outgoing=OutgoingMMTP(),
        software="Mixminion-Twisted 0.1",
        insecurities=("Software is alpha",),
        platform="Test",
    )
    return dataclasses.replace(fields, **changes)  # type: ignore[arg-type]


def mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


class StoreTestCase(unittest.TestCase):
    # Three days: fewer keysets to load (reading a PEM key validates it,
    # ~25 ms) than with one, but still several lifetimes in the horizon.
    lifetime = 3 * DAY
    overlap = 6 * HOUR

    def setUp(self) -> None:
        base = self.mktemp()
        self.key_dir = os.path.join(base, "keys")
        self.hashlog_dir = os.path.join(base, "work", "hashlogs")
        self.factory = KeyFactory()
        self.warnings: list[str] = []
        self.template = make_template()

    def make_store(self, **kwargs: object) -> KeyStore:
        options: dict[str, object] = dict(
            identity_bits=2048,
            lifetime=self.lifetime,
            overlap=self.overlap,
            rng=lambda n: b"\x42" * n,
            generate_key=self.factory,
            warn=self.warnings.append,
        )
        options.update(kwargs)
        return KeyStore(self.key_dir, self.hashlog_dir, **options)  # type: ignore[arg-type]

    def started_store(self, now: float = T0, **kwargs: object) -> KeyStore:
        """Start-up as the node does it: load, generate until covered, rotate."""
        store = self.make_store(**kwargs)
        store.load(now)
        while store.ensure_keys(now, self.template):
            pass
        store.rotate(now)
        return store

    def keyset_dirs(self) -> set[str]:
        return {n for n in os.listdir(self.key_dir) if n.startswith("key_")}

    def hashlog_files(self) -> set[str]:
        return set(os.listdir(self.hashlog_dir))

    def write_replay_log(self, keyset: Keyset) -> None:
        """Give a keyset a replay log file, plus the companion files a crash
        can leave (SQLite's, the reference's journal)."""
        for suffix in ("", "-wal", "-journal", "_jrnl"):
            with open(keyset.hashlog_path + suffix, "wb") as f:
                f.write(b"tag" * 10)


# --- pure schedule functions ---------------------------------------------------------------


class ScheduleFunctionTests(unittest.TestCase):
    def test_constants(self) -> None:
        self.assertEqual(PUBLICATION_LATENCY, 219600)
        self.assertEqual(PREPUBLICATION_INTERVAL, 1209600)

    def test_midnight(self) -> None:
        self.assertEqual(midnight(T0), M0)
        self.assertEqual(midnight(M0), M0)
        self.assertEqual(midnight(M0 - 0.5), M0 - DAY)

    def test_count_formula(self) -> None:
        # no keysets: ceil((PL + PI) / L)
        self.assertEqual(keysets_needed(T0, None, DAY), 17)  # 16.54 days
        self.assertEqual(keysets_needed(T0, None, 3 * DAY), 6)
        self.assertEqual(keysets_needed(T0, None, 30 * DAY), 1)
        # all keysets expired: counted from now
        self.assertEqual(keysets_needed(T0, M0 - 5 * DAY, DAY), 17)
        # covered: nothing; 10 s short: one
        self.assertEqual(keysets_needed(T0, int(T0 + HORIZON), DAY), 0)
        self.assertEqual(keysets_needed(T0, int(T0 + HORIZON - 10), DAY), 1)
        self.assertEqual(keysets_needed(T0, int(T0 + HORIZON - DAY - 1), DAY), 2)

    def test_first_keyset_starts_today(self) -> None:
        """With no keyset the first is valid from the previous midnight, so
        the key is usable at once, even in the last minute of a day (where
        the reference's now + 60 s started it at the next midnight)."""
        self.assertEqual(plan_keysets(T0, None, DAY, 2), [(M0, M0 + DAY), (M0 + DAY, M0 + 2 * DAY)])
        for late in (M0 + DAY - 60, M0 + DAY - 30, M0 + DAY - 1):
            [(valid_after, valid_until)] = plan_keysets(late, None, DAY, 1)
            self.assertEqual((valid_after, valid_until), (M0, M0 + DAY))
            self.assertTrue(valid_after <= late <= valid_until)
        # a node whose keysets all ended is treated the same way
        self.assertEqual(plan_keysets(M0 + DAY - 30, M0 - DAY, DAY, 1), [(M0, M0 + DAY)])

    def test_follows_last_keyset(self) -> None:
        last = M0 + 10 * DAY
        self.assertEqual(plan_keysets(T0, last, 3 * DAY, 2), [(last, last + 3 * DAY), (last + 3 * DAY, last + 6 * DAY)])
        # last keyset already ended: start from now
        self.assertEqual(plan_keysets(T0, M0 - DAY, DAY, 1), [(M0, M0 + DAY)])

    def test_fractional_lifetime_gives_gaps(self) -> None:
        planned = plan_keysets(M0, None, DAY + DAY // 2, 3)
        self.assertEqual(planned, [(M0, M0 + DAY), (M0 + DAY, M0 + 2 * DAY), (M0 + 3 * DAY, M0 + 4 * DAY)])
        problems = schedule_problems(planned)
        self.assertEqual(len(problems), 1)
        self.assertIn("no keyset is valid from 2024-03-12 to 2024-03-13", problems[0])

    def test_schedule_problems(self) -> None:
        self.assertEqual(schedule_problems([(M0, M0 + DAY), (M0 + DAY, M0 + 2 * DAY)]), [])
        overlap = schedule_problems([(M0 + DAY, M0 + 3 * DAY), (M0, M0 + 2 * DAY)])
        self.assertEqual(len(overlap), 1)
        self.assertIn("overlap", overlap[0])
        # contained in a longer one: an overlap, not a gap
        nested = schedule_problems([(M0, M0 + 5 * DAY), (M0 + DAY, M0 + 2 * DAY), (M0 + 5 * DAY, M0 + 6 * DAY)])
        self.assertEqual(len(nested), 1)
        self.assertIn("overlap", nested[0])

    def test_numbering_rule(self) -> None:
        """§2: the lowest free number below the current lowest, else highest + 1."""
        self.assertEqual(next_keyset_number([]), 1)
        self.assertEqual(next_keyset_number([1]), 2)
        self.assertEqual(next_keyset_number([1, 2, 3]), 4)
        self.assertEqual(next_keyset_number([3, 4, 5]), 1)
        self.assertEqual(next_keyset_number([2]), 1)
        self.assertEqual(next_keyset_number([1, 3]), 4)  # 2 is not below the lowest
        self.assertEqual(K.keyset_name(7), "key_0007")
        self.assertEqual(K.parse_keyset_name("key_0007"), 7)
        self.assertEqual(K.parse_keyset_name("key_12345"), 12345)
        self.assertIsNone(K.parse_keyset_name("key_7"))
        self.assertIsNone(K.parse_keyset_name("key_0007.old"))


# --- a node's life over many lifetimes ---------------------------------------------------------


def run_node(test: StoreTestCase, days: int) -> None:
    """Drive a store from event to event as the node would, checking every
    rule of §8.3 at each stop."""
    store = test.make_store()
    now: float = T0
    store.load(now)
    created: list[Keyset] = []
    deleted: list[Keyset] = []
    logs_opened: set[int] = set()
    steps = same_instant = 0
    end = T0 + days * DAY
    while now <= end:
        steps += 1
        test.assertLess(steps, 500, "no progress: events do not advance time")
        created += store.ensure_keys(now, test.template)
        result = store.rotate(now)
        deleted += result.deleted
        for keyset in result.added:
            test.write_replay_log(keyset)
            logs_opened.add(keyset.number)
        test.assertEqual({k.number for k in result.removed}, {k.number for k in result.deleted})
        upcoming = store.next_event(now)
        if upcoming <= now:  # generation still due: act again at once
            same_instant += 1
            test.assertLess(same_instant, 3)
            continue
        same_instant = 0
        check_state(test, store, now)
        check_next_event(test, store, now, upcoming)
        now = upcoming
    # generated ahead and cleaned up behind, with numbers reused
    lifetimes = days * DAY // store.lifetime
    test.assertGreater(len(created), lifetimes)
    test.assertGreater(len(deleted), lifetimes - 3)
    test.assertIn(1, [k.number for k in created[1:]], "number 1 reused once key_0001 died")
    test.assertTrue({k.number for k in deleted} <= logs_opened)
    test.assertEqual(len(test.factory.requests), len(created) + 1)  # + identity
    test.assertEqual(test.warnings, [])


def check_state(test: StoreTestCase, store: KeyStore, now: float) -> None:
    keysets = store.keysets
    # covered up to the publication horizon, so generation is not due
    test.assertGreater(keysets[-1].valid_until + K.GENERATION_LEEWAY, now + HORIZON)
    test.assertFalse(store.generation_due(now))
    # whole-day lifetimes: contiguous, each exactly one lifetime long
    for before, after in zip(keysets, keysets[1:]):
        test.assertEqual(after.valid_after, before.valid_until)
    for keyset in keysets:
        test.assertEqual(keyset.valid_until - keyset.valid_after, store.lifetime)
    # live set = [Valid-After, Valid-Until + Overlap], never empty, newest first
    expected = [k for k in keysets if k.valid_after <= now <= k.valid_until + store.overlap]
    live = store.live_keysets(now)
    test.assertEqual([k.number for k in live], [k.number for k in reversed(expected)])
    test.assertTrue(live)
    test.assertEqual([key for key, _ in store.packet_keys(now)], [k.packet_key for k in live])
    test.assertEqual(len({k.packet_key.public.n for k in live}), len(live), "live keys distinct")
    # nothing dead survives, on disk or in the table; no orphan replay log
    test.assertFalse([k for k in keysets if k.valid_until < now - store.overlap])
    test.assertEqual(test.keyset_dirs(), {k.name for k in keysets})
    numbers = {int(name[5:9]) for name in test.hashlog_files()}
    test.assertTrue(numbers <= {k.number for k in keysets})
    # the current descriptor is valid now
    current = store.current_descriptor(now)
    assert current is not None
    test.assertTrue(current.valid_after <= now <= current.valid_until)


def check_next_event(test: StoreTestCase, store: KeyStore, now: float, upcoming: float) -> None:
    """The next event is exactly the next change: the live set is the same
    until just before it, and generation is not due before it."""
    keysets = store.keysets
    removals = [math.nextafter(k.valid_until + store.overlap, math.inf) for k in keysets if k.valid_after <= now <= k.valid_until + store.overlap]
    activations = [k.valid_after for k in keysets if k.valid_after > now]
    generation = keysets[-1].valid_until - HORIZON + K.GENERATION_LEEWAY
    test.assertEqual(upcoming, min(removals + activations + [generation]))
    # ...and something does happen then
    changes = [k.number for k in store.live_keysets(upcoming)] != [k.number for k in store.live_keysets(now)]
    test.assertTrue(changes or store.generation_due(upcoming))
    just_before = upcoming - 0.5
    if just_before > now:
        test.assertEqual(
            [k.number for k in store.live_keysets(just_before)], [k.number for k in store.live_keysets(now)]
        )
        test.assertFalse(store.generation_due(just_before))


class LongRunTests(StoreTestCase):
    """Keysets over many lifetimes, the clock moved from event to event."""

    def test_one_day_lifetime(self) -> None:
        self.lifetime, self.overlap = DAY, 6 * HOUR
        run_node(self, days=25)

    def test_three_day_lifetime(self) -> None:
        self.lifetime, self.overlap = 3 * DAY, 24 * HOUR
        run_node(self, days=30)

    def test_thirty_day_lifetime(self) -> None:
        """The default configuration: one or two keysets at a time."""
        self.lifetime, self.overlap = 30 * DAY, 24 * HOUR
        run_node(self, days=100)


# --- generation ----------------------------------------------------------------------------


class GenerationTests(StoreTestCase):
    lifetime = DAY
    def test_first_start(self) -> None:
        store = self.make_store()
        self.assertTrue(store.load(T0).identity_created)
        self.assertTrue(store.generation_due(T0))
        self.assertEqual(store.next_event(T0), T0)
        first = store.ensure_keys(T0, self.template)
        # ceil(16.54) = 17 keysets from today's midnight...
        self.assertEqual([k.number for k in first], list(range(1, 18)))
        self.assertEqual(first[0].valid_after, M0)
        self.assertEqual(first[-1].valid_until, M0 + 17 * DAY)
        # ...which, started at 13:17, falls short of now + 16.54 days: the
        # formula asks for one more straight away
        self.assertTrue(store.generation_due(T0))
        second = store.ensure_keys(T0, self.template)
        self.assertEqual([(k.number, k.valid_after) for k in second], [(18, M0 + 17 * DAY)])
        self.assertFalse(store.generation_due(T0))
        self.assertEqual(store.ensure_keys(T0, self.template), [])
        self.assertEqual(store.next_generation_time(T0), M0 + 18 * DAY - HORIZON)

    def test_generation_waits_for_its_time_plus_leeway(self) -> None:
        store = self.started_store()
        due = store.next_generation_time(T0) + K.GENERATION_LEEWAY
        self.assertEqual(store.generation_due_time(T0), due)
        self.assertEqual(store.ensure_keys(due - 1, self.template), [])
        new = store.ensure_keys(due, self.template)
        self.assertEqual(len(new), 1)  # ceil(10 s / L)
        self.assertEqual(new[0].valid_after, store.keysets[-2].valid_until)

    def test_restart_after_long_downtime(self) -> None:
        """All keysets dead: they are deleted and coverage restarts from now."""
        self.lifetime = 3 * DAY
        count = len(self.started_store().keysets)
        later = T0 + 40 * DAY
        store = self.make_store()
        result = store.load(later)
        self.assertEqual(len(result.dead), count)
        self.assertEqual(store.keysets, [])
        self.assertEqual(self.keyset_dirs(), set())
        new = store.ensure_keys(later, self.template)
        self.assertEqual(new[0].valid_after, midnight(later))
        self.assertEqual(new[0].number, 1)

    def test_descriptors_parse_and_verify(self) -> None:
        store = self.started_store()
        for keyset in store.keysets:
            with open(keyset.descriptor_path) as f:
                text = f.read()
            at = max(T0, keyset.valid_after)
            descriptor = parse_descriptor(text, at)  # signature, digest, validity
            self.assertEqual(descriptor, keyset.descriptor)
            self.assertEqual(descriptor.identity, store.identity.public)
            self.assertEqual(descriptor.packet_key, keyset.packet_key.public)
            self.assertEqual((descriptor.valid_after, descriptor.valid_until), (keyset.valid_after, keyset.valid_until))
            self.assertEqual(descriptor.published, T0)
            self.assertEqual(descriptor.nickname, "Quince")
            self.assertEqual(descriptor.hostname, "mix.example.org")
            self.assertEqual(descriptor.caps, "relay")
            self.assertRaises(Expired, parse_descriptor, text, keyset.valid_until + 1)

    def test_files_and_modes(self) -> None:
        old = os.umask(0)  # the node runs with umask 0 (§3 step 4)
        try:
            store = self.started_store()
            keyset = store.keysets[0]
            store.mark_published(keyset, T0)
        finally:
            os.umask(old)
        self.assertEqual(mode(store.identity_path), 0o600)
        self.assertEqual(mode(self.key_dir), 0o700)
        self.assertEqual(mode(self.hashlog_dir), 0o700)
        for k in store.keysets:
            self.assertEqual(mode(k.directory), 0o700)
            self.assertEqual(mode(k.key_path), 0o600)
            self.assertEqual(mode(k.descriptor_path), 0o644)
            self.assertEqual(sorted(os.listdir(k.directory)), sorted(
                ["mix.key", "ServerDesc"] + (["published"] if k.number == keyset.number else [])))
            self.assertEqual(k.hashlog_path, os.path.join(self.hashlog_dir, "hash_%04d" % k.number))
        self.assertEqual(mode(keyset.published_path), 0o600)
        with open(store.identity_path, "rb") as f:
            self.assertTrue(f.read().startswith(b"-----BEGIN RSA PRIVATE KEY-----"))
        with open(keyset.key_path, "rb") as f:
            self.assertTrue(f.read().startswith(b"-----BEGIN RSA PRIVATE KEY-----"))

    def test_bad_template_leaves_nothing(self) -> None:
        store = self.make_store()
        store.load(T0)
        self.assertRaises(BuildError, store.ensure_keys, T0, make_template(contact="x" * 300))
        self.assertEqual(store.keysets, [])
        self.assertEqual(self.keyset_dirs(), set())

    def test_callable_template(self) -> None:
        calls: list[tuple[int, int, int]] = []

        def template(key: PublicKey, published: int, after: int, until: int) -> DescriptorFields:
            calls.append((published, after, until))
            return make_template(packet_key=key, published=published, valid_after=after, valid_until=until)

        store = self.make_store()
        store.load(T0)
        new = store.ensure_keys(T0, template)
        self.assertEqual(calls[0], (T0, M0, M0 + DAY))
        self.assertEqual(len(calls), len(new))
        # the same content as the fields template: nothing to regenerate
        self.assertEqual(store.regenerate_descriptors(self.template, T0 + 5), [])

        def cheating(key: PublicKey, published: int, after: int, until: int) -> DescriptorFields:
            return template(key, published, after, until + DAY)

        self.assertRaises(ValueError, store.regenerate_descriptors, cheating, T0)

    def test_lifetime_must_be_a_day(self) -> None:
        self.assertRaises(ValueError, self.make_store, lifetime=DAY - 1)
        self.assertRaises(ValueError, self.make_store, overlap=-1)


# --- live set and rotation at the boundaries ---------------------------------------------------


class RotationTests(StoreTestCase):
    def test_boundaries(self) -> None:
        """§17.5: accepted exactly during [Valid-After, Valid-Until + Overlap]."""
        store = self.started_store()
        keyset = store.keysets[1]  # valid tomorrow
        after, end = keyset.valid_after, keyset.valid_until + self.overlap
        numbers = lambda t: [k.number for k in store.live_keysets(t)]  # noqa: E731
        self.assertNotIn(keyset.number, numbers(after - 1))
        self.assertNotIn(keyset.number, numbers(after - 0.001))
        self.assertIn(keyset.number, numbers(after))
        self.assertIn(keyset.number, numbers(end))
        self.assertNotIn(keyset.number, numbers(end + 0.001))
        self.assertNotIn(keyset.number, numbers(end + 1))
        self.assertFalse(keyset.is_dead(end, self.overlap))
        self.assertTrue(keyset.is_dead(end + 0.001, self.overlap))
        # its activation is an event; its removal is at the first instant after
        self.assertEqual(store.next_rotation(after - 1), after)
        removal = store.next_rotation(end)
        assert removal is not None
        self.assertGreater(removal, end)
        self.assertLess(removal, end + 1e-6)
        self.assertNotIn(keyset.number, numbers(removal))
        self.assertEqual(store.next_rotation(end - 0.5), removal)

    def test_rotation_sequence(self) -> None:
        store = self.make_store()
        store.load(T0)
        while store.ensure_keys(T0, self.template):
            pass
        first = store.rotate(T0)  # reports everything live as added
        self.assertEqual([k.number for k in first.added], [1])
        self.assertEqual((first.removed, first.deleted), ((), ()))
        self.assertTrue(first.changed)
        self.assertFalse(store.rotate(T0).changed)

        old, new = store.keysets[0], store.keysets[1]
        self.write_replay_log(old)
        activation = store.rotate(new.valid_after)
        self.assertEqual([k.number for k in activation.added], [new.number])
        self.assertEqual(activation.removed, ())
        # during the overlap both keys decrypt, newest first
        both = store.packet_keys(new.valid_after + HOUR)
        self.assertEqual([key for key, _ in both], [new.packet_key, old.packet_key])
        self.assertEqual([path for _, path in both], [new.hashlog_path, old.hashlog_path])
        self.assertFalse(store.rotate(old.valid_until + self.overlap).changed)

        released: list[list[int]] = []

        def release(removed: object) -> None:
            # called before deletion, so the node can close the logs first
            released.append([k.number for k in removed])  # type: ignore[attr-defined]
            self.assertTrue(os.path.exists(old.hashlog_path))
            self.assertTrue(os.path.exists(old.key_path))

        removal = store.rotate(old.valid_until + self.overlap + 1, release)
        self.assertEqual(released, [[old.number]])
        self.assertEqual([k.number for k in removal.removed], [old.number])
        self.assertEqual([k.number for k in removal.deleted], [old.number])
        self.assertFalse(os.path.exists(old.directory))
        self.assertEqual([n for n in self.hashlog_files() if n.startswith("hash_0001")], [])
        self.assertNotIn(old.number, [k.number for k in store.keysets])

    def test_deleted_replay_log_only_its_own(self) -> None:
        store = self.started_store()
        old = store.keysets[0]
        self.write_replay_log(old)
        for name in ("hash_00010", "hash_0002", "unrelated"):
            with open(os.path.join(self.hashlog_dir, name), "wb") as f:
                f.write(b"x")
        store.rotate(old.valid_until + self.overlap + 1)
        self.assertEqual(self.hashlog_files(), {"hash_00010", "hash_0002", "unrelated"})

    def test_current_descriptor(self) -> None:
        store = self.started_store()
        first, second = store.keysets[0], store.keysets[1]
        self.assertEqual(store.current_descriptor(T0), first.descriptor)
        # at midnight both are valid: the newer one is current
        self.assertEqual(store.current_descriptor(second.valid_after), second.descriptor)
        self.assertIsNone(store.current_descriptor(M0 - 1))
        self.assertEqual(store.live_descriptor_paths(second.valid_after + 1),
                         [second.descriptor_path, first.descriptor_path])

    def test_number_reuse_wipes_stale_replay_log(self) -> None:
        """A reused number must not inherit the replay log of another key."""
        store = self.started_store()
        first = store.keysets[0]
        self.write_replay_log(first)
        store.rotate(first.valid_until + self.overlap + 1)
        # a stale log under number 1 that deletion did not remove (a crash)
        with open(first.hashlog_path, "wb") as f:
            f.write(b"tag" * 10)
        later = max(store.generation_due_time(T0), first.valid_until + self.overlap + 1)
        new = store.ensure_keys(later, self.template)
        self.assertEqual([k.number for k in new], [1])
        self.assertEqual(new[0].hashlog_path, first.hashlog_path)
        self.assertFalse(os.path.exists(new[0].hashlog_path))


# --- publication and regeneration ------------------------------------------------------------


class PublicationTests(StoreTestCase):
    def test_mark_published(self) -> None:
        store = self.started_store()
        self.assertEqual(len(store.unpublished()), len(store.keysets))
        target = store.keysets[2]
        self.assertTrue(store.mark_published(target, T0 + 90))
        with open(target.published_path) as f:
            self.assertEqual(f.read(), "2024-03-10 13:18:30\n")
        self.assertEqual(store.keyset(target.number).published_at, T0 + 90)
        self.assertNotIn(target.number, [k.number for k in store.unpublished()])
        store.clear_published()
        self.assertEqual(len(store.unpublished()), len(store.keysets))
        self.assertFalse(os.path.exists(target.published_path))

    def test_regenerate_when_template_changes(self) -> None:
        """§8.5: same keys and validity, new content, unpublished."""
        store = self.started_store()
        for keyset in store.keysets:
            store.mark_published(keyset, T0)
        before = {k.number: k for k in store.keysets}
        self.assertEqual(store.regenerate_descriptors(self.template, T0 + HOUR), [])
        self.assertEqual(store.unpublished(), [])

        changed = make_template(contact="new-admin@example.org")
        later = T0 + HOUR
        regenerated = store.regenerate_descriptors(changed, later)
        self.assertEqual(len(regenerated), len(before))
        for keyset in regenerated:
            old = before[keyset.number]
            self.assertIs(keyset.packet_key, old.packet_key)
            self.assertEqual((keyset.valid_after, keyset.valid_until), (old.valid_after, old.valid_until))
            self.assertFalse(keyset.published)
            self.assertFalse(os.path.exists(keyset.published_path))
            with open(keyset.descriptor_path) as f:
                descriptor = parse_descriptor(f.read(), later, check_validity=False)
            self.assertEqual(descriptor.contact, "new-admin@example.org")
            self.assertEqual(descriptor.published, later)
            self.assertNotEqual(descriptor, old.descriptor)
        # an upload of the old descriptor, finishing now, must not count
        stale = before[1]
        self.assertFalse(store.mark_published(stale, later))
        self.assertFalse(store.keyset(1).published)
        self.assertEqual(store.regenerate_descriptors(changed, later + 1), [])

    def test_regenerate_on_any_published_field(self) -> None:
        store = self.started_store()
        for change in (
            dict(nickname="Medlar"),
            dict(comments="hello"),
            dict(software="Mixminion-Twisted 0.2"),
            dict(insecurities=()),
            dict(incoming=IncomingMMTP(hostname="mix.example.org", port=48100, ip="192.0.2.7")),
            dict(outgoing=None),
            dict(platform="Other"),
        ):
            template = make_template(**change)
            self.assertEqual(len(store.regenerate_descriptors(template, T0)), len(store.keysets), change)
            self.assertEqual(store.regenerate_descriptors(template, T0), [])


# --- identity and reloading ----------------------------------------------------------------


class LoadTests(StoreTestCase):
    def test_identity_created_once(self) -> None:
        store = self.make_store()
        self.assertRaises(KeyStoreError, lambda: store.identity)
        self.assertTrue(store.load(T0).identity_created)
        again = self.make_store()
        self.assertFalse(again.load(T0).identity_created)
        self.assertEqual(again.identity.der, store.identity.der)
        self.assertEqual(len(self.factory.requests), 1)
        self.assertEqual(self.warnings, [])

    def test_identity_size_mismatch_only_warns(self) -> None:
        self.make_store().load(T0)
        store = self.make_store(identity_bits=4096)
        store.load(T0)
        self.assertEqual(store.identity.key.key_size, 2048)
        self.assertEqual(len(self.warnings), 1)
        self.assertIn("4096", self.warnings[0])

    def test_unreadable_identity_is_fatal(self) -> None:
        self.make_store().load(T0)
        path = os.path.join(self.key_dir, "identity.key")
        with open(path, "wb") as f:
            f.write(b"garbage")
        self.assertRaises(KeyStoreError, self.make_store().load, T0)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"garbage")  # never replaced

    def test_reload_gives_same_state(self) -> None:
        store = self.started_store()
        store.mark_published(store.keysets[0], T0 + 5)
        later = store.keysets[0].valid_until + 3 * HOUR  # key_0001 in its overlap
        store.rotate(later)
        self.assertEqual(len(store.live_keysets(later)), 2)
        again = self.make_store()
        result = again.load(later)
        self.assertEqual((result.invalid, result.dead, result.warnings), ((), (), ()))
        self.assertEqual(self.describe(again), self.describe(store))
        self.assertEqual(again.next_event(later), store.next_event(later))
        self.assertEqual(again.packet_keys(later), [(k, p) for k, p in again.packet_keys(later)])
        self.assertEqual([k.der for k, _ in again.packet_keys(later)], [k.der for k, _ in store.packet_keys(later)])
        self.assertEqual(self.warnings, [])

    @staticmethod
    def describe(store: KeyStore) -> list[tuple[object, ...]]:
        return [
            (k.number, k.valid_after, k.valid_until, k.packet_key.der, k.descriptor.digest, k.published_at, k.hashlog_path)
            for k in store.keysets
        ]

    def test_reload_deletes_dead(self) -> None:
        store = self.started_store()
        first = store.keysets[0]
        self.write_replay_log(first)
        result = self.make_store().load(first.valid_until + self.overlap + 1)
        self.assertEqual([k.number for k in result.dead], [first.number])
        self.assertFalse(os.path.exists(first.directory))
        self.assertFalse([n for n in self.hashlog_files() if n.startswith("hash_0001")])

    def corrupt_and_reload(self, corrupt: Callable[[Keyset, KeyStore], None]) -> tuple[KeyStore, Keyset]:
        store = self.started_store()
        victim = store.keysets[3]
        self.write_replay_log(victim)
        corrupt(victim, store)
        again = self.make_store()
        result = again.load(T0)
        self.assertEqual(result.invalid, (victim.name,))
        self.assertFalse(os.path.exists(victim.directory))
        self.assertFalse([n for n in self.hashlog_files() if n.startswith(f"hash_{victim.number:04d}")])
        self.assertEqual({k.number for k in again.keysets}, {k.number for k in store.keysets} - {victim.number})
        self.assertTrue(any(victim.name in w for w in self.warnings))
        return again, victim

    def test_corrupt_packet_key(self) -> None:
        def corrupt(victim: Keyset, store: KeyStore) -> None:
            with open(victim.key_path, "r+b") as f:
                f.seek(100)
                f.write(b"!!!!")
        self.corrupt_and_reload(corrupt)

    def test_missing_descriptor(self) -> None:
        self.corrupt_and_reload(lambda victim, store: os.unlink(victim.descriptor_path))

    def test_missing_packet_key(self) -> None:
        self.corrupt_and_reload(lambda victim, store: os.unlink(victim.key_path))

    def test_tampered_descriptor(self) -> None:
        def corrupt(victim: Keyset, store: KeyStore) -> None:
            with open(victim.descriptor_path) as f:
                text = f.read()
            with open(victim.descriptor_path, "w") as f:
                f.write(text.replace("Nickname: Quince", "Nickname: Quincy"))
        self.corrupt_and_reload(corrupt)

    def test_descriptor_of_another_key(self) -> None:
        def corrupt(victim: Keyset, store: KeyStore) -> None:
            with open(store.keysets[0].descriptor_path, "rb") as f:
                text = f.read()
            with open(victim.descriptor_path, "wb") as f:
                f.write(text)
        self.corrupt_and_reload(corrupt)

    def test_descriptor_of_another_identity(self) -> None:
        def corrupt(victim: Keyset, store: KeyStore) -> None:
            other = K.build_descriptor(victim.descriptor.to_fields(), pooled_key(POOL_SIZE - 1), os.urandom)
            with open(victim.descriptor_path, "w") as f:
                f.write(other)
        self.corrupt_and_reload(corrupt)

    def test_corrupt_keyset_number_reused(self) -> None:
        """Numbering after an invalid keyset below the lowest was deleted."""
        store = self.started_store()
        os.unlink(store.keysets[0].key_path)
        again = self.make_store()
        again.load(T0)
        self.assertEqual(min(k.number for k in again.keysets), 2)
        new = again.ensure_keys(again.generation_due_time(T0), self.template)
        self.assertEqual([k.number for k in new], [1])

    def test_unrelated_files_left_alone(self) -> None:
        store = self.started_store()
        for name in ("pinger.seed", "key_12", "notes"):
            with open(os.path.join(self.key_dir, name), "wb") as f:
                f.write(b"keep")
        leftover = store.keysets[0].key_path + ".tmp"
        with open(leftover, "wb") as f:
            f.write(b"half-written key")
        result = self.make_store().load(T0)
        self.assertEqual(result.invalid, ())
        for name in ("pinger.seed", "key_12", "notes"):
            self.assertTrue(os.path.exists(os.path.join(self.key_dir, name)))
        self.assertFalse(os.path.exists(leftover))

    def test_orphan_replay_logs_deleted(self) -> None:
        store = self.started_store()
        kept = store.keysets[0]
        self.write_replay_log(kept)
        orphans = ["hash_0042", "hash_0042-wal", "hash_0042_jrnl", "hash_12345"]
        for name in orphans + ["notes", "hash_x"]:
            with open(os.path.join(self.hashlog_dir, name), "wb") as f:
                f.write(b"x")
        self.make_store().load(T0)
        left = self.hashlog_files()
        self.assertFalse(left & set(orphans))
        self.assertTrue({"notes", "hash_x", "hash_0001", "hash_0001_jrnl"} <= left)
        self.assertEqual(K.parse_hashlog_name("hash_0007-shm"), 7)
        self.assertIsNone(K.parse_hashlog_name("hash_07"))

    def test_schedule_warnings_at_load(self) -> None:
        """§8.3 step 7 (gaps from a fractional lifetime) and §8.5 (lifetime changed)."""
        self.lifetime = DAY + DAY // 2
        self.started_store()
        self.assertEqual(self.warnings, [])
        self.make_store().load(T0)
        self.assertTrue(self.warnings)
        self.assertTrue(all("no keyset is valid" in w for w in self.warnings))
        del self.warnings[:]
        self.lifetime = 3 * DAY
        self.make_store().load(T0)
        self.assertTrue(any("another lifetime" in w for w in self.warnings))


class SecureDeleteTests(unittest.TestCase):
    def test_overwrites_before_unlinking(self) -> None:
        """A hard link sees the same inode: after deletion it holds zeros."""
        base = self.mktemp()
        os.mkdir(base)
        path, link = os.path.join(base, "secret"), os.path.join(base, "link")
        with open(path, "wb") as f:
            f.write(b"private key material" * 100)
        os.link(path, link)
        secure_delete(path)
        self.assertFalse(os.path.exists(path))
        with open(link, "rb") as f:
            content = f.read()
        self.assertGreaterEqual(len(content), 2000)
        self.assertEqual(content, bytes(len(content)))

    def test_missing_and_symlink(self) -> None:
        base = self.mktemp()
        os.mkdir(base)
        secure_delete(os.path.join(base, "absent"))
        target = os.path.join(base, "target")
        with open(target, "wb") as f:
            f.write(b"keep me")
        os.symlink(target, os.path.join(base, "link"))
        secure_delete(os.path.join(base, "link"))
        with open(target, "rb") as f:
            self.assertEqual(f.read(), b"keep me")  # the link's target is untouched
