"""Tests of the pinger's logic (doc/reliability.md §1): the Poisson schedule
and its service, path choice, handles, the ping store and the inference.

No sleeps: clocks are :class:`twisted.internet.task.Clock` or plain
numbers, randomness is a seeded :class:`random.Random`, networks are
simulated.
"""

from __future__ import annotations

import math
import os
import random
import sqlite3
import stat
import statistics
from collections import Counter
from dataclasses import dataclass

from twisted.application.service import IService
from twisted.internet import task
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from mixminion.server.pinging.handles import HANDLE_LEN, handle_of, new_handle
from mixminion.server.pinging.inference import (
    PingOutcome,
    measure,
    percentile_ms,
    reliabilities,
)
from mixminion.server.pinging.paths import choose_measured, choose_path, others
from mixminion.server.pinging.schedule import PingLoop, PoissonSchedule
from mixminion.server.pinging.store import (
    LINK_CONNECT,
    LINK_REJECTED,
    LINK_TLS,
    PINGS_DB,
    PingStore,
    PingStoreError,
)
from mixminion.testing.asserts import NearAssertions


@dataclass(frozen=True)
class Desc:
    """What path choice reads of a descriptor."""

    fingerprint: str


def fp(name: str) -> str:
    """A 40-hex fingerprint for a one-letter name A-F."""
    return name * 40


def nth(i: int) -> str:
    """The fingerprint of server number ``i`` of a larger network."""
    return f"{i:040X}"


#: the pinger's own identity
ME = "9" * 40


def simulate(truth: dict[str, float], pings: int, seed: int) -> list[PingOutcome]:
    """Pings over uniform random paths of three distinct servers; each hop
    passes with its true reliability, round trips of 1-5 s."""
    rng = random.Random(seed)
    servers = sorted(truth)
    out = []
    for _ in range(pings):
        path = tuple(rng.sample(servers, 3))
        back = all(rng.random() < truth[s] for s in path)
        out.append(PingOutcome(path, back, rng.uniform(1.0, 5.0) if back else None))
    return out


class TestCase(NearAssertions, unittest.TestCase):
    pass


# --- the Poisson schedule -------------------------------------------------------


class PoissonScheduleTests(TestCase):
    MEAN = 300.0
    N = 20_000

    def gaps(self, seed: int = 1) -> list[float]:
        schedule = PoissonSchedule(self.MEAN, random.Random(seed))
        return [schedule.next_delay() for _ in range(self.N)]

    def test_mean_within_two_percent(self) -> None:
        self.assertNear(statistics.fmean(self.gaps()) / self.MEAN, 1.0, delta=0.02)

    def test_coefficient_of_variation_near_one(self) -> None:
        gaps = self.gaps()
        self.assertNear(statistics.pstdev(gaps) / statistics.fmean(gaps), 1.0, delta=0.03)

    def test_gaps_pass_a_kolmogorov_smirnov_test_against_the_exponential(self) -> None:
        gaps = sorted(self.gaps())
        n = len(gaps)
        d = max(max((i + 1) / n - cdf, cdf - i / n)
                for i, cdf in enumerate(1 - math.exp(-g / self.MEAN) for g in gaps))
        self.assertLess(d, 1.628 / math.sqrt(n))  # the 1% critical value

    def test_counts_in_fixed_windows_have_variance_near_their_mean(self) -> None:
        """Poisson counts: a clock-like schedule would have far less
        variance, a bursty one far more."""
        window = 10 * self.MEAN
        counts: Counter[int] = Counter()
        t = 0.0
        for gap in self.gaps():
            t += gap
            counts[int(t // window)] += 1
        full = [counts[w] for w in range(int(t // window))]
        self.assertGreater(len(full), 1500)
        mean = statistics.fmean(full)
        self.assertNear(mean, 10.0, delta=0.3)
        self.assertNear(statistics.pvariance(full) / mean, 1.0, delta=0.1)

    def test_seeded_schedules_repeat(self) -> None:
        self.assertEqual(self.gaps(5)[:10], self.gaps(5)[:10])
        self.assertNotEqual(self.gaps(5)[:10], self.gaps(6)[:10])

    def test_mean_must_be_positive(self) -> None:
        for bad in (0, -1.0):
            self.assertRaises(ValueError, PoissonSchedule, bad, random.Random(1))


class PingLoopTests(TestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.times: list[float] = []
        self.loop = PingLoop(self.clock, PoissonSchedule(60.0, random.Random(7)),
                             lambda: self.times.append(self.clock.seconds()))

    def expected_gaps(self, n: int) -> list[float]:
        schedule = PoissonSchedule(60.0, random.Random(7))
        return [schedule.next_delay() for _ in range(n)]

    def test_is_a_service(self) -> None:
        self.assertTrue(verifyObject(IService, self.loop))

    def test_nothing_before_start(self) -> None:
        self.clock.advance(10_000)
        self.assertEqual(self.times, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_fires_at_the_scheduled_times(self) -> None:
        self.loop.startService()
        gaps = self.expected_gaps(50)
        expected, t = [], 0.0
        for gap in gaps:
            self.assertEqual(len(self.times), len(expected))
            t += gap
            expected.append(t)
            self.clock.advance(gap)
        self.assertEqual(len(self.times), 50)
        for got, want in zip(self.times, expected):
            self.assertAlmostEqual(got, want, places=6)

    def test_one_call_pending_at_a_time(self) -> None:
        self.loop.startService()
        for _ in range(20):
            self.assertEqual(len(self.clock.getDelayedCalls()), 1)
            self.clock.advance(self.clock.getDelayedCalls()[0].getTime() - self.clock.seconds())
        self.assertEqual(len(self.times), 20)

    def test_stop_cancels_the_pending_ping(self) -> None:
        self.loop.startService()
        self.clock.advance(self.expected_gaps(1)[0])
        self.assertEqual(len(self.times), 1)
        self.loop.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(1_000_000)
        self.assertEqual(len(self.times), 1)

    def test_a_failing_ping_does_not_stop_the_loop(self) -> None:
        calls = []

        def ping() -> None:
            calls.append(self.clock.seconds())
            if len(calls) == 1:
                raise RuntimeError("no route")

        loop = PingLoop(self.clock, PoissonSchedule(60.0, random.Random(7)), ping)
        loop.startService()
        for gap in self.expected_gaps(3):
            self.clock.advance(gap)
        self.assertEqual(len(calls), 3)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        loop.stopService()


# --- paths ----------------------------------------------------------------------


class PathTests(TestCase):
    def network(self, n: int, with_me: bool = True) -> list[Desc]:
        servers = [Desc(nth(i + 1)) for i in range(n)]
        return servers + [Desc(ME)] if with_me else servers

    def test_constraints_always_hold(self) -> None:
        rng = random.Random(3)
        for _ in range(3000):
            servers = self.network(rng.randint(3, 12), with_me=rng.random() < 0.5)
            rng.shuffle(servers)
            counts = {d.fingerprint: rng.randint(0, 5) for d in servers}
            path = choose_path(servers, ME, counts, rng)
            assert path is not None
            self.assertEqual(len({d.fingerprint for d in path}), 3)
            self.assertNotIn(ME, [d.fingerprint for d in path])
            for d in path:
                self.assertIn(d, servers)

    def test_fewer_than_three_other_servers_gives_none(self) -> None:
        rng = random.Random(1)
        for n in range(3):
            self.assertIsNone(choose_path(self.network(n), ME, {}, rng))
        # the pinger listed twice, or one server listed twice, still counts once
        self.assertIsNone(choose_path(self.network(2) + [Desc(ME), Desc(nth(1))], ME, {}, rng))
        self.assertIsNotNone(choose_path(self.network(3), ME, {}, rng))

    def test_the_pinger_is_excluded_by_identity_whatever_the_case(self) -> None:
        servers = self.network(3) + [Desc(ME.lower())]
        self.assertNotIn(ME.lower(), [d.fingerprint for d in others(servers, ME)])
        self.assertEqual(len(others(servers, ME.lower())), 3)

    def test_least_pinged_server_goes_next(self) -> None:
        rng = random.Random(1)
        fps = [nth(i) for i in range(1, 6)]
        counts = {fps[0]: 3, fps[1]: 1, fps[2]: 2, fps[3]: 1, fps[4]: 4}
        seen = {choose_measured(fps, counts, rng) for _ in range(200)}
        self.assertEqual(seen, {fps[1], fps[3]})  # ties broken at random
        self.assertIn(choose_measured(fps, {fps[0]: 1}, rng), fps[1:])

    def test_coverage_is_even(self) -> None:
        """Rotating by the store's counts: every server is measured as often,
        and each is beside every other about as often."""
        rng = random.Random(11)
        servers = self.network(10)
        counts: Counter[str] = Counter()
        through: Counter[str] = Counter()
        neighbours: Counter[tuple[str, str]] = Counter()
        for _ in range(6000):
            path = choose_path(servers, ME, counts, rng)
            assert path is not None
            x, s, y = (d.fingerprint for d in path)
            counts[s] += 1
            through.update((x, s, y))
            neighbours[s, x] += 1
            neighbours[s, y] += 1
        self.assertEqual(max(counts.values()) - min(counts.values()), 0)
        for n in through.values():
            self.assertNear(n / 1800, 1.0, delta=0.1)
        # 600 pings of each S pick 2 of 9 others: 133 each on average
        self.assertEqual(len(neighbours), 90)
        for n in neighbours.values():
            self.assertNear(n / (1200 / 9), 1.0, delta=0.3)

    def test_the_order_of_descriptors_does_not_change_a_seeded_choice(self) -> None:
        servers = self.network(8)
        shuffled = list(reversed(servers))
        a = [choose_path(servers, ME, {}, random.Random(4)) for _ in range(5)]
        b = [choose_path(shuffled, ME, {}, random.Random(4)) for _ in range(5)]
        self.assertEqual(a, b)

    def test_one_descriptor_per_fingerprint(self) -> None:
        first, second = Desc(nth(1)), Desc(nth(1))
        chosen = others([first, second, Desc(nth(2))], ME)
        self.assertEqual(len(chosen), 2)
        self.assertIs(chosen[0], first)


# --- handles --------------------------------------------------------------------


class HandleTests(TestCase):
    def test_a_handle_is_twenty_random_bytes(self) -> None:
        handles = {new_handle() for _ in range(100)}
        self.assertEqual(len(handles), 100)
        self.assertEqual({len(h) for h in handles}, {HANDLE_LEN})
        self.assertEqual(HANDLE_LEN, 20)

    def test_the_handle_comes_from_the_injected_source_alone(self) -> None:
        self.assertEqual(new_handle(lambda n: b"\x07" * n), b"\x07" * 20)

    def test_handle_of_routing_info(self) -> None:
        self.assertEqual(handle_of(b"h" * 20), b"h" * 20)
        self.assertIsNone(handle_of(b"h" * 19))
        self.assertIsNone(handle_of(b"h" * 21))


# --- inference ------------------------------------------------------------------


TRUTH = {fp("A"): 1.0, fp("B"): 1.0, fp("C"): 0.5, fp("D"): 1.0, fp("E"): 0.0, fp("F"): 1.0}
HONEST = [fp(c) for c in "ABDF"]


class InferenceTests(TestCase):
    def test_estimates_are_within_a_tenth_of_the_truth(self) -> None:
        for seed in range(3):
            r = reliabilities(simulate(TRUTH, 2000, seed))
            for s, true in TRUTH.items():
                self.assertNear(r[s], true, delta=0.1, msg=f"seed {seed}, {s[0]}")

    def test_a_dead_server_does_not_drag_down_the_honest_ones(self) -> None:
        for seed in range(5):
            outcomes = simulate(TRUTH, 600, seed)
            r = reliabilities(outcomes)
            # 40% of an honest server's paths cross E, and all of those are lost
            naive = {s: sum(o.returned for o in outcomes if s in o.path)
                     / sum(1 for o in outcomes if s in o.path) for s in HONEST}
            for s in HONEST:
                self.assertLess(naive[s], 0.6)
                self.assertGreaterEqual(r[s], 0.9, f"seed {seed}, {s[0]}")
            self.assertEqual(r[fp("E")], 0.0)

    def test_varied_reliabilities(self) -> None:
        truth = {nth(i): v for i, v in enumerate((0.95, 0.8, 0.6, 0.99, 0.3, 0.9, 0.7), 1)}
        r = reliabilities(simulate(truth, 8000, 1))
        for s, true in truth.items():
            self.assertNear(r[s], true, delta=0.1)

    def test_the_iteration_settles_where_plain_substitution_oscillates(self) -> None:
        """All at 0.9: r <- f(r) alternates 0.729, 1, 0.729...; ours must not."""
        truth = {nth(i): 0.9 for i in range(1, 9)}
        outcomes = simulate(truth, 4000, 2)
        r = reliabilities(outcomes)
        for v in r.values():
            self.assertNear(v, 0.9, delta=0.05)
        self.assertEqual(reliabilities(outcomes), r)

    def test_a_first_hop_failure_blames_that_hop_alone(self) -> None:
        truth = {fp(c): 1.0 for c in "ABCDEF"}
        outcomes = simulate(truth, 600, 1) + [PingOutcome((fp("A"),), False)] * 100
        m = measure(outcomes)
        through_a = sum(1 for o in outcomes if fp("A") in o.path)
        self.assertEqual(m[fp("A")].sent, through_a)
        self.assertAlmostEqual(m[fp("A")].reliability, (through_a - 100) / through_a, places=6)
        for c in "BCDEF":
            self.assertEqual(m[fp(c)].reliability, 1.0)

    def test_raw_counts(self) -> None:
        a, b, c, d = (fp(x) for x in "ABCD")
        m = measure([PingOutcome((a, b, c), True, 1.0), PingOutcome((a, b, d), False),
                     PingOutcome((b, c, d), True, 2.0)])
        self.assertEqual([(x.sent, x.returned) for x in m.values()],
                         [(2, 1), (3, 2), (2, 2), (2, 1)])
        self.assertEqual(list(m), [a, b, c, d])
        self.assertEqual({x.fingerprint for x in m.values()}, {a, b, c, d})

    def test_latency_percentiles_come_from_returned_pings_only(self) -> None:
        a, b, c, d = (fp(x) for x in "ABCD")
        outcomes = [PingOutcome((a, b, c), True, float(sec)) for sec in range(10, 0, -1)]
        # lost pings, even with a latency, do not count
        outcomes += [PingOutcome((a, b, d), False, 600.0)] * 30
        m = measure(outcomes)
        self.assertEqual((m[a].median_ms, m[a].p90_ms), (5000, 9000))
        self.assertEqual((m[c].median_ms, m[c].p90_ms), (5000, 9000))
        self.assertEqual((m[d].median_ms, m[d].p90_ms, m[d].returned), (0, 0, 0))

    def test_percentiles_are_nearest_rank(self) -> None:
        self.assertEqual(percentile_ms([], 1, 2), 0)
        self.assertEqual(percentile_ms([0.25], 9, 10), 250)
        self.assertEqual(percentile_ms([1.0, 2.0, 3.0, 4.0], 1, 2), 2000)  # the lower median
        self.assertEqual(percentile_ms([1.0, 2.0, 3.0], 1, 2), 2000)
        self.assertEqual(percentile_ms([i / 1000 for i in range(1, 21)], 9, 10), 18)

    def test_nothing_measured_of_nothing(self) -> None:
        self.assertEqual(measure([]), {})

    def test_a_server_nothing_came_back_through_is_zero(self) -> None:
        """Even when a dead neighbour could explain it: nothing speaks for it."""
        a, b, c, e = (fp(x) for x in "ABCE")
        r = reliabilities([PingOutcome((a, e, b), False)] * 10 + [PingOutcome((e,), False)]
                          + [PingOutcome((b, c, e), False)] * 10)
        self.assertEqual(r, {a: 0.0, b: 0.0, c: 0.0, e: 0.0})


# --- the store ------------------------------------------------------------------


PATH = (fp("A"), fp("B"), fp("C"))


class StoreTests(TestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.store = PingStore.in_work_dir(self.dir)
        self.addCleanup(lambda: self.store.close())

    def reopen(self) -> None:
        self.store.close()
        self.store = PingStore.in_work_dir(self.dir)

    def test_the_file_is_private_and_in_wal_mode(self) -> None:
        path = os.path.join(self.dir, PINGS_DB)
        self.store.record_sent(b"h" * 20, PATH, 1.0)
        for name in (path, path + "-wal", path + "-shm"):
            if os.path.exists(name):
                self.assertEqual(stat.S_IMODE(os.stat(name).st_mode), 0o600, name)
        db = sqlite3.connect(path)
        self.addCleanup(db.close)
        self.assertEqual(db.execute("PRAGMA journal_mode").fetchone()[0], "wal")

    def test_record_and_lookup(self) -> None:
        handle = new_handle()
        self.store.record_sent(handle, PATH, 100.0)
        record = self.store.lookup(handle)
        assert record is not None
        self.assertEqual((record.handle, record.path, record.sent_at), (handle, PATH, 100.0))
        self.assertEqual((record.returned_at, record.lost_at), (None, None))
        self.assertIsNone(self.store.lookup(new_handle()))

    def test_bad_records_are_refused(self) -> None:
        self.assertRaises(ValueError, self.store.record_sent, b"short", PATH, 1.0)
        self.assertRaises(ValueError, self.store.record_sent, b"h" * 20, PATH[:2], 1.0)
        self.store.record_sent(b"h" * 20, PATH, 1.0)
        self.assertRaises(ValueError, self.store.record_sent, b"h" * 20, PATH, 2.0)
        self.assertRaises(ValueError, self.store.record_link_failure, fp("A"), 1.0, "timeout")

    def test_a_return_settles_the_ping_once(self) -> None:
        handle = new_handle()
        self.store.record_sent(handle, PATH, 100.0)
        self.assertTrue(self.store.mark_returned(handle, 102.5))
        self.assertFalse(self.store.mark_returned(handle, 103.0))  # a duplicate
        self.assertFalse(self.store.mark_returned(new_handle(), 103.0))  # unknown
        record = self.store.lookup(handle)
        assert record is not None
        self.assertEqual(record.returned_at, 102.5)
        self.assertEqual(self.store.outcomes(0.0), [PingOutcome(PATH, True, 2.5)])

    def test_pings_not_back_after_the_timeout_are_lost(self) -> None:
        late, early, fresh = new_handle(), new_handle(), new_handle()
        self.store.record_sent(late, PATH, 100.0)
        self.store.record_sent(early, PATH, 150.0)
        self.store.record_sent(fresh, PATH, 400.0)
        self.assertTrue(self.store.mark_returned(early, 160.0))
        self.assertEqual(self.store.outcomes(0.0), [PingOutcome(PATH, True, 10.0)])
        self.assertEqual(self.store.expire(now=400.0, timeout=300.0), 1)
        self.assertEqual(self.store.expire(now=400.0, timeout=300.0), 0)
        self.assertEqual(self.store.outcomes(0.0),
                         [PingOutcome(PATH, False), PingOutcome(PATH, True, 10.0)])
        # back after it was counted lost: ignored and reported
        self.assertFalse(self.store.mark_returned(late, 401.0))
        record = self.store.lookup(late)
        assert record is not None
        self.assertEqual((record.returned_at, record.lost_at), (None, 400.0))
        self.assertTrue(self.store.mark_returned(fresh, 401.0))

    def test_first_hop_failures_are_lost_pings_through_x_alone(self) -> None:
        self.store.record_link_failure(fp("A"), 10.0, LINK_CONNECT)
        self.store.record_link_failure(fp("A"), 20.0, LINK_TLS)
        self.store.record_link_failure(fp("D"), 30.0, LINK_REJECTED)
        self.assertEqual(self.store.outcomes(15.0),
                         [PingOutcome((fp("A"),), False), PingOutcome((fp("D"),), False)])

    def test_outcomes_since(self) -> None:
        for i in range(5):
            handle = bytes([i]) * 20
            self.store.record_sent(handle, PATH, 100.0 * i)
            self.store.mark_returned(handle, 100.0 * i + 1)
        self.assertEqual(len(self.store.outcomes(200.0)), 3)
        self.assertEqual(len(self.store.outcomes(401.0)), 0)

    def test_measured_counts_count_the_middle_hop(self) -> None:
        self.store.record_sent(b"1" * 20, (fp("A"), fp("B"), fp("C")), 10.0)
        self.store.record_sent(b"2" * 20, (fp("C"), fp("B"), fp("A")), 20.0)
        self.store.record_sent(b"3" * 20, (fp("B"), fp("D"), fp("A")), 30.0)
        self.assertEqual(self.store.measured_counts(0.0), {fp("B"): 2, fp("D"): 1})
        self.assertEqual(self.store.measured_counts(15.0), {fp("B"): 1, fp("D"): 1})

    def test_prune_forgets_old_rows(self) -> None:
        old, new = b"o" * 20, b"n" * 20
        self.store.record_sent(old, PATH, 10.0)
        self.store.record_sent(new, PATH, 100.0)
        self.store.record_link_failure(fp("A"), 10.0, LINK_CONNECT)
        self.store.record_link_failure(fp("A"), 100.0, LINK_CONNECT)
        self.assertEqual(self.store.prune(50.0), 2)
        self.assertIsNone(self.store.lookup(old))
        self.assertIsNotNone(self.store.lookup(new))
        self.assertFalse(self.store.mark_returned(old, 60.0))  # forgotten: unknown
        self.assertEqual(self.store.outcomes(0.0), [PingOutcome((fp("A"),), False)])

    def test_survives_reopen(self) -> None:
        back, lost, pending = b"b" * 20, b"l" * 20, b"p" * 20
        self.store.record_sent(back, PATH, 10.0)
        self.store.record_sent(lost, PATH, 20.0)
        self.store.record_sent(pending, PATH, 900.0)
        self.store.mark_returned(back, 13.0)
        self.store.expire(now=500.0, timeout=300.0)
        self.store.record_link_failure(fp("C"), 30.0, LINK_REJECTED)
        self.reopen()
        self.assertEqual(self.store.outcomes(0.0), [PingOutcome(PATH, True, 3.0),
                                                    PingOutcome(PATH, False),
                                                    PingOutcome((fp("C"),), False)])
        self.assertTrue(self.store.mark_returned(pending, 901.0))
        self.assertFalse(self.store.mark_returned(back, 902.0))

    def test_a_closed_store_says_so(self) -> None:
        self.store.close()
        self.assertRaises(PingStoreError, self.store.lookup, b"h" * 20)
        self.store.close()  # twice is harmless


# --- the parts together ---------------------------------------------------------


class SimulatedPingerTests(TestCase):
    """Schedule, paths, handles and store as a pinger would use them, over a
    simulated network where E refuses connections and C drops half."""

    def test_measurements_of_a_simulated_network(self) -> None:
        rng = random.Random(21)
        clock = task.Clock()
        directory = self.mktemp()
        os.makedirs(directory)
        store = PingStore.in_work_dir(directory)
        self.addCleanup(store.close)
        servers = [Desc(s) for s in TRUTH] + [Desc(ME)]
        window, timeout = 7 * 86400.0, 3600.0

        def ping() -> None:
            now = clock.seconds()
            path = choose_path(servers, ME, store.measured_counts(now - window), rng)
            assert path is not None
            x, s, y = (d.fingerprint for d in path)
            handle = new_handle(rng.randbytes)
            store.record_sent(handle, (x, s, y), now)
            if TRUTH[x] == 0.0:
                store.record_link_failure(x, now, LINK_CONNECT)
                return
            if all(rng.random() < TRUTH[hop] for hop in (x, s, y)):
                clock.callLater(rng.uniform(60, 600),
                                lambda: store.mark_returned(handle, clock.seconds()))

        loop = PingLoop(clock, PoissonSchedule(300.0, rng), ping)
        loop.startService()
        for _ in range(7 * 24):
            clock.advance(3600)
            store.expire(clock.seconds(), timeout)
        loop.stopService()
        m = measure(store.outcomes(clock.seconds() - window))
        self.assertEqual(set(m), set(TRUTH))
        for s, true in TRUTH.items():
            self.assertNear(m[s].reliability, true, delta=0.1, msg=s[0])
        sent_as_s = store.measured_counts(0.0)
        self.assertLessEqual(max(sent_as_s.values()) - min(sent_as_s.values()), 1)
        self.assertEqual(m[fp("E")].returned, 0)
