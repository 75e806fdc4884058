"""Mix algorithms: which items of the mix pool leave at a mix time (server.md §5).

Pure decision logic.  The node calls :meth:`MixAlgorithm.choose_batch` with the
ids of everything in the pool when the mix fires; nothing here knows about
clocks, queues or Twisted, so the statistics of each algorithm can be tested
directly with a seeded generator.

All randomness comes from one injected source with a ``getrandbits(k)``
method (``secrets.SystemRandom`` in a server, ``random.Random(seed)`` in
tests).  Everything else -- integers below ``n``, the Fisher–Yates shuffle,
the reference's 31-bit "random float" -- is derived from it here, so a
seeded source gives the same batches on every Python version.
"""

from __future__ import annotations

import math
import secrets
from abc import ABC, abstractmethod
from typing import Optional, Protocol, Sequence, TypeVar

__all__ = [
    "ALGORITHMS",
    "BinomialMix",
    "CottrellMix",
    "MIN_SEND",
    "MixAlgorithm",
    "RandomBits",
    "TimedMix",
    "cottrell_batch_size",
    "make_mix_algorithm",
    "random_float",
    "randbelow",
    "shuffle",
]

T = TypeVar("T")

#: ``minSend`` of §5: fixed, not configurable
MIN_SEND = 1
#: the denominator of the reference's "random float" (31 bits / (2^31 - 1))
FLOAT_BITS = 31
FLOAT_DENOMINATOR = (1 << FLOAT_BITS) - 1


class RandomBits(Protocol):
    """The only thing a pool needs from its CSPRNG."""

    def getrandbits(self, k: int, /) -> int: ...


# --- randomness derived from getrandbits -------------------------------------------


def randbelow(rng: RandomBits, n: int) -> int:
    """A uniform integer in ``[0, n)``, by rejection so there is no modulo bias."""
    if n <= 0:
        raise ValueError("randbelow needs n >= 1")
    bits = n.bit_length()
    while True:
        value = rng.getrandbits(bits)
        if value < n:
            return value


def random_float(rng: RandomBits) -> float:
    """The reference's float in ``[0, 1]``: 31 random bits / (2^31 - 1).

    Both ends are reachable; §5 compares it with ``< p``, so an item is
    kept with probability ``ceil(p * (2^31 - 1)) / 2^31``, which differs
    from ``p`` by less than 2^-31.
    """
    return rng.getrandbits(FLOAT_BITS) / FLOAT_DENOMINATOR


def shuffle(items: list[T], rng: RandomBits) -> list[T]:
    """Fisher–Yates in place (every permutation equally likely); returns ``items``."""
    for i in range(len(items) - 1, 0, -1):
        j = randbelow(rng, i + 1)
        items[i], items[j] = items[j], items[i]
    return items


def _sample(items: Sequence[T], k: int, rng: RandomBits) -> list[T]:
    """``k`` distinct items, uniformly, in uniformly random order.

    A Fisher–Yates shuffle stopped after ``k`` steps: each prefix of a
    uniform permutation is a uniform ordered sample without replacement.
    """
    pool = list(items)
    n = len(pool)
    for i in range(k):
        j = i + randbelow(rng, n - i)
        pool[i], pool[j] = pool[j], pool[i]
    return pool[:k]


# --- the batch-size rule ----------------------------------------------------------


def cottrell_batch_size(n: int, min_pool: int, rate: float) -> int:
    """``k`` of §5: ``min(n - minPool, max(1, floor(n * rate)))`` once
    ``n >= minPool + minSend``, else 0 (the pool never drops below minPool)."""
    if n < min_pool + MIN_SEND:
        return 0
    return min(n - min_pool, max(1, math.floor(n * rate)))


# --- the algorithms ---------------------------------------------------------------


class MixAlgorithm(ABC):
    """A mixing rule: given the pool's contents, the batch to send now."""

    #: §14.10: published as "Mix algorithm is not secure"
    insecure: bool = False

    def __init__(self, rng: Optional[RandomBits] = None) -> None:
        self.rng: RandomBits = rng if rng is not None else secrets.SystemRandom()

    @abstractmethod
    def choose_batch(self, item_ids: Sequence[T]) -> list[T]:
        """The items to send, in the order to send them; ``item_ids`` is not
        modified."""

    @abstractmethod
    def expected_batch_size(self, n: int) -> float:
        """Mean batch size for a pool of ``n`` items (documentation, tests)."""


class TimedMix(MixAlgorithm):
    """Everything in the pool, every time, in uniformly random order.

    Gives anonymity only among packets that arrived in the same interval,
    so it is flagged insecure.
    """

    insecure = True

    def choose_batch(self, item_ids: Sequence[T]) -> list[T]:
        return shuffle(list(item_ids), self.rng)

    def expected_batch_size(self, n: int) -> float:
        return float(n)

    def __repr__(self) -> str:
        return "TimedMix()"


class _DynamicMix(MixAlgorithm):
    """Shared parameters of the two Cottrell variants."""

    def __init__(self, min_pool: int, rate: float, rng: Optional[RandomBits] = None) -> None:
        super().__init__(rng)
        if isinstance(min_pool, bool) or not isinstance(min_pool, int) or min_pool < 0:
            raise ValueError(f"min_pool must be a non-negative integer, not {min_pool!r}")
        if not 0 <= rate <= 1:
            raise ValueError(f"rate must lie in [0, 1], not {rate!r}")
        self.min_pool = min_pool
        self.rate = rate

    def batch_size(self, n: int) -> int:
        return cottrell_batch_size(n, self.min_pool, self.rate)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(min_pool={self.min_pool}, rate={self.rate})"


class CottrellMix(_DynamicMix):
    """Timed dynamic pool: exactly ``k`` items, chosen uniformly at random.

    Keeping at least ``min_pool`` items back means a packet may stay for
    several rounds, which is what mixes it with later arrivals.
    """

    def choose_batch(self, item_ids: Sequence[T]) -> list[T]:
        return _sample(item_ids, self.batch_size(len(item_ids)), self.rng)

    def expected_batch_size(self, n: int) -> float:
        return float(self.batch_size(n))


class BinomialMix(_DynamicMix):
    """Binomial Cottrell: each item leaves independently with ``p = k/n``.

    The batch size is Binomial(n, k/n) rather than exactly ``k``, so an
    observer counting outgoing packets learns less about the pool.
    """

    def choose_batch(self, item_ids: Sequence[T]) -> list[T]:
        n = len(item_ids)
        k = self.batch_size(n)
        if k == 0 or n == 0:
            return []
        p = k / n
        chosen = [item for item in item_ids if random_float(self.rng) < p]
        return shuffle(chosen, self.rng)

    def expected_batch_size(self, n: int) -> float:
        """``n * p = k`` (exact up to the float's 2^-31 granularity)."""
        return float(self.batch_size(n))


# --- configuration names -------------------------------------------------------------

#: §5 names, lower-cased, to the algorithm they select
ALGORITHMS: dict[str, type[MixAlgorithm]] = {
    "timed": TimedMix,
    "cottrell": CottrellMix,
    "mixmaster": CottrellMix,
    "dynamicpool": CottrellMix,
    "binomial": BinomialMix,
    "binomialcottrell": BinomialMix,
    "binomialdynamicpool": BinomialMix,
}


def make_mix_algorithm(
    algorithm: str,
    min_pool: int = 5,
    rate: float = 0.6,
    rng: Optional[RandomBits] = None,
) -> MixAlgorithm:
    """The pool for a ``MixAlgorithm`` value (case-insensitive).

    ``min_pool``/``rate`` are ignored by ``Timed`` (the config layer warns
    about setting them).
    """
    try:
        cls = ALGORITHMS[algorithm.strip().lower()]
    except KeyError:
        names = "Timed, Cottrell, Mixmaster, DynamicPool, Binomial, BinomialCottrell, BinomialDynamicPool"
        raise ValueError(f"unknown mix algorithm {algorithm!r} (expected one of {names})") from None
    if issubclass(cls, _DynamicMix):
        return cls(min_pool, rate, rng)
    return cls(rng)
