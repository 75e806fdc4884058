"""Mix-pool algorithms (server.md §5): batch sizes against their formulas,
and the statistics of what is chosen and in which order.

Every statistical test draws from ``random.Random`` with a fixed seed, so it
is deterministic: it cannot flake, and a change to the algorithms that
alters the distribution shows up as a failing goodness-of-fit test.  The
acceptance level (p = 0.001) is strict enough that the tests would catch a
biased implementation, e.g. one that favours early items.
"""

from __future__ import annotations

import itertools
import math
import random
import secrets
from collections import Counter
from typing import Sequence

from twisted.trial import unittest

from mixminion.server.mix_algorithm import (
    ALGORITHMS,
    FLOAT_DENOMINATOR,
    BinomialMix,
    CottrellMix,
    MixAlgorithm,
    TimedMix,
    cottrell_batch_size,
    make_mix_algorithm,
    randbelow,
    random_float,
    shuffle,
)
from mixminion.testing.asserts import NearAssertions

#: standard normal quantile for an upper tail of 0.001
Z_999 = 3.0902


def chi_square(observed: Sequence[float], expected: Sequence[float]) -> float:
    return sum((o - e) ** 2 / e for o, e in zip(observed, expected))


def chi_square_critical(df: int, z: float = Z_999) -> float:
    """Upper quantile of chi-square(df) (Wilson–Hilferty: within 2 % for
    df ≥ 3 at this level, erring high, i.e. slightly lenient)."""
    h = 2 / (9 * df)
    return df * (1 - h + z * math.sqrt(h)) ** 3


def binomial_pmf(n: int, p: float) -> list[float]:
    return [math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(n + 1)]


def pooled_bins(expected: Sequence[float], minimum: float = 5.0) -> list[range]:
    """Adjacent values merged until each bin expects at least ``minimum``
    (the usual validity condition of the chi-square test)."""
    bins: list[range] = []
    start, acc = 0, 0.0
    for i, e in enumerate(expected):
        acc += e
        if acc >= minimum:
            bins.append(range(start, i + 1))
            start, acc = i + 1, 0.0
    if start < len(expected):  # left-over tail joins the last bin
        last = bins.pop() if bins else range(start, start)
        bins.append(range(last.start, len(expected)))
    return bins


class ChiSquareMixin(NearAssertions):
    """Assertions shared by the statistical tests."""

    def assertFits(self, observed: Sequence[float], expected: Sequence[float], what: str) -> None:
        stat = chi_square(observed, expected)
        limit = chi_square_critical(len(observed) - 1)
        self.assertLess(stat, limit, f"{what}: chi-square {stat:.1f} >= {limit:.1f} (df {len(observed) - 1})")  # type: ignore[attr-defined]

    def assertUniformCounts(self, counts: Counter, cells: Sequence[object], total: int, what: str) -> None:
        self.assertEqual(set(counts) - set(cells), set())  # type: ignore[attr-defined]
        expected = [total / len(cells)] * len(cells)
        self.assertFits([counts[c] for c in cells], expected, what)


class ConstantBits:
    """A fake source returning one value (masked to the requested width).

    All ones makes rejection sampling retry forever, so a test that wrongly
    reaches it fails after ``limit`` draws instead of hanging.
    """

    def __init__(self, value: int, limit: int = 1000) -> None:
        self.value = value
        self.limit = limit
        self.requests: list[int] = []

    def getrandbits(self, k: int) -> int:
        if len(self.requests) >= self.limit:
            raise AssertionError("too many random draws")
        self.requests.append(k)
        return self.value & ((1 << k) - 1)


class NoRandomness:
    """Fails the test if any randomness is drawn."""

    def getrandbits(self, k: int) -> int:
        raise AssertionError("randomness drawn when none was needed")


# --- helpers built on getrandbits -------------------------------------------------------


class RandomHelperTests(ChiSquareMixin, unittest.TestCase):
    def test_random_float_is_31_bits_over_2_31_minus_1(self) -> None:
        zero, top = ConstantBits(0), ConstantBits(-1)
        self.assertEqual(random_float(zero), 0.0)
        self.assertEqual(random_float(top), 1.0)  # both ends of [0, 1] are reachable
        self.assertEqual(zero.requests, [31])
        self.assertEqual(random_float(ConstantBits(12345)), 12345 / (2**31 - 1))
        self.assertEqual(FLOAT_DENOMINATOR, 2**31 - 1)

    def test_random_float_mean(self) -> None:
        rng = random.Random(7)
        values = [random_float(rng) for _ in range(20000)]
        self.assertTrue(all(0 <= v <= 1 for v in values))
        # mean 1/2, standard error sqrt(1/12 / 20000)
        self.assertLess(abs(sum(values) / len(values) - 0.5), 4 * math.sqrt(1 / 12 / 20000))

    def test_randbelow_bounds(self) -> None:
        self.assertEqual(randbelow(ConstantBits(0), 1), 0)
        self.assertRaises(ValueError, randbelow, random.Random(1), 0)
        rng = random.Random(2)
        self.assertTrue(all(0 <= randbelow(rng, 5) < 5 for _ in range(1000)))

    def test_randbelow_is_uniform(self) -> None:
        # 6 is not a power of two: a modulo-reduction bug would show here.
        rng = random.Random(3)
        draws = 12000
        counts = Counter(randbelow(rng, 6) for _ in range(draws))
        self.assertUniformCounts(counts, range(6), draws, "randbelow(6)")

    def test_shuffle_is_a_permutation_in_place(self) -> None:
        items = list(range(50))
        result = shuffle(items, random.Random(4))
        self.assertIs(result, items)
        self.assertEqual(sorted(items), list(range(50)))
        self.assertNotEqual(items, list(range(50)))


# --- batch sizes against the formula --------------------------------------------------------


class CottrellSizeTests(ChiSquareMixin, unittest.TestCase):
    def test_worked_examples(self) -> None:
        """§5, defaults minPool 5, rate 60 %: n=4 → 0, 6 → 1, 10 → 5, 100 → 60."""
        pool = CottrellMix(5, 0.6, random.Random(1))
        for n, k in [(4, 0), (6, 1), (10, 5), (100, 60)]:
            self.assertEqual(pool.batch_size(n), k, f"n={n}")
            self.assertEqual(len(pool.choose_batch(list(range(n)))), k, f"n={n}")
            self.assertEqual(pool.expected_batch_size(n), k)

    def test_threshold_is_min_pool_plus_one(self) -> None:
        self.assertEqual(cottrell_batch_size(0, 5, 0.6), 0)
        self.assertEqual(cottrell_batch_size(5, 5, 0.6), 0)
        self.assertEqual(cottrell_batch_size(6, 5, 0.6), 1)
        self.assertEqual(cottrell_batch_size(1, 0, 0.6), 1)
        self.assertEqual(cottrell_batch_size(0, 0, 0.6), 0)

    def test_at_least_one_and_never_below_min_pool(self) -> None:
        # rate 1 %: floor(n * rate) = 0 for small n, but max(1, .) sends one
        self.assertEqual(cottrell_batch_size(20, 5, 0.01), 1)
        self.assertEqual(cottrell_batch_size(1000, 5, 0.01), 10)
        # rate 100 %: limited by n - minPool
        self.assertEqual(cottrell_batch_size(20, 5, 1.0), 15)
        self.assertEqual(cottrell_batch_size(20, 0, 1.0), 20)

    def test_formula_over_a_grid(self) -> None:
        rng = random.Random(5)
        for min_pool, rate in itertools.product([0, 1, 5, 17], [0.0, 0.05, 0.33, 0.6, 1.0]):
            pool = CottrellMix(min_pool, rate, rng)
            for n in range(0, 80):
                items = [f"item{i}" for i in range(n)]
                batch = pool.choose_batch(items)
                want = 0 if n < min_pool + 1 else min(n - min_pool, max(1, math.floor(n * rate)))
                self.assertEqual(len(batch), want, f"n={n} minPool={min_pool} rate={rate}")
                self.assertEqual(len(set(batch)), len(batch), "chosen without replacement")
                self.assertTrue(set(batch) <= set(items))
                self.assertGreaterEqual(n - len(batch), min(n, min_pool))

    def test_small_pool_draws_no_randomness(self) -> None:
        self.assertEqual(CottrellMix(5, 0.6, NoRandomness()).choose_batch([1, 2, 3, 4, 5]), [])
        self.assertEqual(BinomialMix(5, 0.6, NoRandomness()).choose_batch([1, 2, 3, 4, 5]), [])
        self.assertEqual(BinomialMix(0, 0.6, NoRandomness()).choose_batch([]), [])
        self.assertEqual(TimedMix(NoRandomness()).choose_batch([]), [])


# --- Cottrell: which items and in what order ------------------------------------------


class CottrellStatisticsTests(ChiSquareMixin, unittest.TestCase):
    def test_each_item_chosen_with_probability_k_over_n(self) -> None:
        n, rounds = 10, 4000
        pool = CottrellMix(5, 0.6, random.Random(11))  # k = 5
        counts: Counter = Counter()
        for _ in range(rounds):
            counts.update(pool.choose_batch(list(range(n))))
        # frequency of each item ≈ k/n = 1/2
        self.assertUniformCounts(counts, range(n), 5 * rounds, "Cottrell item frequencies")
        for item in range(n):
            self.assertNear(counts[item] / rounds, 0.5, delta=4 * math.sqrt(0.25 / rounds))

    def test_every_subset_equally_likely(self) -> None:
        rounds = 7000
        pool = CottrellMix(3, 0.5, random.Random(12))  # n=7: k = min(4, 3) = 3
        subsets = Counter(frozenset(pool.choose_batch(range(7))) for _ in range(rounds))
        cells = [frozenset(c) for c in itertools.combinations(range(7), 3)]  # 35 subsets
        self.assertUniformCounts(subsets, cells, rounds, "Cottrell subsets")

    def test_order_is_uniformly_random(self) -> None:
        rounds = 6000
        pool = CottrellMix(0, 1.0, random.Random(13))  # k = n: all, in random order
        perms = Counter(tuple(pool.choose_batch("abc")) for _ in range(rounds))
        self.assertUniformCounts(perms, list(itertools.permutations("abc")), rounds, "Cottrell order")

    def test_first_position_uniform_among_chosen(self) -> None:
        rounds = 5000
        pool = CottrellMix(2, 0.5, random.Random(14))  # n=6: k=3
        firsts = Counter(pool.choose_batch(range(6))[0] for _ in range(rounds))
        self.assertUniformCounts(firsts, range(6), rounds, "Cottrell first item")

    def test_input_not_modified(self) -> None:
        items = list(range(20))
        CottrellMix(5, 0.6, random.Random(15)).choose_batch(items)
        self.assertEqual(items, list(range(20)))


# --- Binomial Cottrell ---------------------------------------------------------------------


class BinomialStatisticsTests(ChiSquareMixin, unittest.TestCase):
    def check_size_distribution(self, n: int, min_pool: int, rate: float, seed: int, rounds: int) -> None:
        """Batch size ~ Binomial(n, k/n): mean within 4 standard errors, and
        a chi-square goodness-of-fit on the whole size distribution."""
        pool = BinomialMix(min_pool, rate, random.Random(seed))
        k = cottrell_batch_size(n, min_pool, rate)
        p = k / n
        sizes = [len(pool.choose_batch(range(n))) for _ in range(rounds)]
        mean = sum(sizes) / rounds
        standard_error = math.sqrt(n * p * (1 - p) / rounds)
        self.assertNear(mean, k, delta=4 * standard_error, msg=f"mean size for n={n}")
        self.assertEqual(pool.expected_batch_size(n), k)
        expected = [rounds * q for q in binomial_pmf(n, p)]
        counts = Counter(sizes)
        bins = pooled_bins(expected)
        self.assertFits(
            [sum(counts[i] for i in b) for b in bins],
            [sum(expected[i] for i in b) for b in bins],
            f"Binomial({n}, {p}) sizes",
        )

    def test_sizes_defaults_n20(self) -> None:
        self.check_size_distribution(20, 5, 0.6, seed=21, rounds=5000)  # k=12, p=0.6

    def test_sizes_n10(self) -> None:
        self.check_size_distribution(10, 5, 0.6, seed=22, rounds=5000)  # k=5, p=0.5

    def test_sizes_n100(self) -> None:
        self.check_size_distribution(100, 5, 0.6, seed=23, rounds=3000)  # k=60, p=0.6

    def test_sizes_small_p(self) -> None:
        self.check_size_distribution(40, 5, 0.1, seed=24, rounds=5000)  # k=4, p=0.1

    def test_not_a_fixed_size(self) -> None:
        """Unlike Cottrell, the size varies: that is the point of the variant."""
        pool = BinomialMix(5, 0.6, random.Random(25))
        self.assertGreater(len({len(pool.choose_batch(range(20))) for _ in range(200)}), 5)

    def test_each_item_independently_with_probability_p(self) -> None:
        n, rounds = 12, 5000
        pool = BinomialMix(5, 0.6, random.Random(26))  # k = min(7, 7) = 7, p = 7/12
        p = 7 / 12
        counts: Counter = Counter()
        pair = 0
        for _ in range(rounds):
            batch = pool.choose_batch(range(n))
            counts.update(batch)
            pair += 0 in batch and 11 in batch
        for item in range(n):
            self.assertNear(counts[item] / rounds, p, delta=4 * math.sqrt(p * (1 - p) / rounds))
        # independence: P(first and last both chosen) = p^2
        self.assertNear(pair / rounds, p * p, delta=4 * math.sqrt(p * p * (1 - p * p) / rounds))

    def test_order_is_shuffled(self) -> None:
        rounds = 6000
        pool = BinomialMix(0, 1.0, random.Random(27))  # p = 1: all chosen (bar 2^-31)
        perms = Counter(tuple(pool.choose_batch("abc")) for _ in range(rounds))
        self.assertUniformCounts(perms, list(itertools.permutations("abc")), rounds, "Binomial order")

    def test_inclusion_is_float_strictly_below_p(self) -> None:
        """The reference's comparison: float < p, and the float can be 1.0,
        so even with p = 1 an all-ones draw excludes the item."""
        self.assertEqual(BinomialMix(0, 1.0, ConstantBits(-1)).choose_batch([1, 2, 3]), [])
        self.assertEqual(BinomialMix(0, 1.0, ConstantBits(0)).choose_batch([1]), [1])

    def test_one_31_bit_draw_per_item(self) -> None:
        rng = ConstantBits(-1)  # nothing selected, so no shuffle draws follow
        BinomialMix(5, 0.6, rng).choose_batch(range(30))
        self.assertEqual(rng.requests, [31] * 30)


# --- Timed ---------------------------------------------------------------------------------


class TimedTests(ChiSquareMixin, unittest.TestCase):
    def test_sends_everything(self) -> None:
        pool = TimedMix(random.Random(31))
        for n in (0, 1, 2, 7, 100):
            items = [object() for _ in range(n)]
            batch = pool.choose_batch(items)
            self.assertEqual(len(batch), n)
            self.assertEqual({id(x) for x in batch}, {id(x) for x in items})
            self.assertEqual(pool.expected_batch_size(n), n)

    def test_all_permutations_of_three_equally_likely(self) -> None:
        rounds = 6000
        pool = TimedMix(random.Random(32))
        perms = Counter(tuple(pool.choose_batch(("x", "y", "z"))) for _ in range(rounds))
        cells = list(itertools.permutations(("x", "y", "z")))
        self.assertUniformCounts(perms, cells, rounds, "Timed order")
        for cell in cells:
            self.assertNear(perms[cell] / rounds, 1 / 6, delta=4 * math.sqrt(5 / 36 / rounds))

    def test_position_of_each_item_uniform(self) -> None:
        rounds, n = 4000, 8
        pool = TimedMix(random.Random(33))
        where = Counter(pool.choose_batch(range(n)).index(0) for _ in range(rounds))
        self.assertUniformCounts(where, range(n), rounds, "position of item 0")

    def test_flagged_insecure(self) -> None:
        self.assertTrue(TimedMix().insecure)
        self.assertFalse(CottrellMix(5, 0.6).insecure)
        self.assertFalse(BinomialMix(5, 0.6).insecure)


# --- factory and parameters -----------------------------------------------------------------


class FactoryTests(unittest.TestCase):
    def test_names_case_insensitive(self) -> None:
        cases = {
            "Timed": TimedMix,
            "TIMED": TimedMix,
            "Cottrell": CottrellMix,
            "mixmaster": CottrellMix,
            "DynamicPool": CottrellMix,
            "Binomial": BinomialMix,
            "binomialcottrell": BinomialMix,
            "BinomialDynamicPool": BinomialMix,
            " Cottrell ": CottrellMix,
        }
        for name, cls in cases.items():
            self.assertIs(type(make_mix_algorithm(name, 5, 0.6)), cls, name)
        self.assertEqual(len(ALGORITHMS), 7)

    def test_parameters_passed(self) -> None:
        rng = random.Random(41)
        pool = make_mix_algorithm("binomial", 7, 0.25, rng)
        assert isinstance(pool, BinomialMix)
        self.assertEqual((pool.min_pool, pool.rate), (7, 0.25))
        self.assertIs(pool.rng, rng)
        self.assertIs(make_mix_algorithm("timed", 7, 0.25, rng).rng, rng)

    def test_unknown_name(self) -> None:
        self.assertRaises(ValueError, make_mix_algorithm, "Serjantov")
        self.assertRaises(ValueError, make_mix_algorithm, "")

    def test_default_rng_is_system_csprng(self) -> None:
        pool: MixAlgorithm = make_mix_algorithm("Cottrell")
        self.assertIsInstance(pool.rng, secrets.SystemRandom)
        self.assertEqual(len(pool.choose_batch(range(10))), 5)

    def test_bad_parameters(self) -> None:
        self.assertRaises(ValueError, CottrellMix, -1, 0.6)
        self.assertRaises(ValueError, CottrellMix, 5, 1.5)
        self.assertRaises(ValueError, BinomialMix, 5, -0.1)
        self.assertRaises(ValueError, BinomialMix, 2.5, 0.6)

    def test_same_seed_same_batches(self) -> None:
        for name in ("Timed", "Cottrell", "Binomial"):
            a, b = make_mix_algorithm(name, rng=random.Random(42)), make_mix_algorithm(name, rng=random.Random(42))
            for n in (3, 10, 50):
                self.assertEqual(a.choose_batch(range(n)), b.choose_batch(range(n)), name)


class StatisticsHelperTests(ChiSquareMixin, unittest.TestCase):
    """The test helpers themselves: a wrong critical value would make the
    statistical tests meaningless."""

    def test_critical_values(self) -> None:
        # tabulated chi-square quantiles at p = 0.001
        for df, table in [(5, 20.515), (9, 27.877), (34, 65.247)]:
            self.assertNear(chi_square_critical(df), table, delta=0.02 * table)

    def test_pooled_bins_cover_everything(self) -> None:
        expected = [rounds * q for rounds, q in zip([1000] * 21, binomial_pmf(20, 0.6))]
        bins = pooled_bins(expected)
        self.assertEqual([i for b in bins for i in b], list(range(21)))
        self.assertTrue(all(sum(expected[i] for i in b) >= 5 for b in bins))

    def test_biased_shuffle_is_detected(self) -> None:
        """The naive 'swap with any position' shuffle is biased for n=3; the
        order test must reject it."""
        rng = random.Random(43)
        rounds = 6000
        perms: Counter = Counter()
        for _ in range(rounds):
            items = list("abc")
            for i in range(3):
                j = randbelow(rng, 3)
                items[i], items[j] = items[j], items[i]
            perms[tuple(items)] += 1
        stat = chi_square([perms[p] for p in itertools.permutations("abc")], [rounds / 6] * 6)
        self.assertGreater(stat, chi_square_critical(5))
