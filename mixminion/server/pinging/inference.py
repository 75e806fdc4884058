"""Per-server reliability and latency from ping outcomes (doc/reliability.md §1).

A path delivers with probability close to the product of its servers'
reliabilities, so a lost ping says "one of these failed", not which.  Each
server's reliability is the multiplicative fixed point

    r(s) = returned(s) / Σ_{pings p through s} Π_{t in p, t ≠ s} r(t)

clipped to [0, 1], starting from 1: a server is blamed for losses only as
far as the others on the same paths cannot explain them, so a dead server
does not drag its honest neighbours down with it.

The plain iteration ``r ← f(r)`` does not settle: on paths of three hops
each round overshoots by a factor of -2 in log space (every server at 0.9
gives 0.729, 1, 0.729, ...).  Each round therefore moves half way, in log
space, from ``r`` to ``f(r)`` (``r ← sqrt(r · f(r))``): the same fixed
points, reached geometrically.  It stops when no value moves by more than
:data:`TOLERANCE`, or after :data:`MAX_ROUNDS`.

A server no ping through which came back is 0, even when a dead
neighbour could explain every loss: nothing speaks for it.  (Its raw
``sent`` and ``returned`` say how much any value rests on.)

Latency: nearest-rank median and 90th percentile of the round trips of the
returned pings through the server, in whole milliseconds; 0 when none
returned (:class:`Measured` has no "unknown").
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional, Sequence

from mixminion.directory.reliability import Measured

#: rounds of the iteration at most; it converges long before
MAX_ROUNDS = 200
#: the iteration has converged when no reliability moves by more than this
TOLERANCE = 1e-9


@dataclass(frozen=True)
class PingOutcome:
    """What became of one ping: the fingerprints it went through (``X, S,
    Y``; a first-hop failure is ``(X,)``), whether it came back, and its
    round trip in seconds when it did."""

    path: tuple[str, ...]
    returned: bool
    latency: Optional[float] = None


def reliabilities(outcomes: Sequence[PingOutcome]) -> dict[str, float]:
    """The fixed point above, per fingerprint that appears in ``outcomes``."""
    returned: dict[str, int] = defaultdict(int)
    # The product does not depend on the order of a path's hops, so pings
    # over the same servers are counted once with a weight.
    weight: dict[tuple[str, ...], int] = defaultdict(int)
    for o in outcomes:
        weight[tuple(sorted(o.path))] += 1
        for s in o.path:
            returned[s] += o.returned
    paths = sorted(weight.items())  # a fixed order of sums: the same bits every run
    r = {s: 1.0 for s in returned}
    for _ in range(MAX_ROUNDS):
        denominator: dict[str, float] = defaultdict(float)
        for path, n in paths:
            for i, s in enumerate(path):
                denominator[s] += n * math.prod(r[t] for j, t in enumerate(path) if j != i)
        moved = 0.0
        for s, old in r.items():
            if denominator[s] <= 0.0:  # only once r(s) is 0 already
                continue
            target = min(1.0, returned[s] / denominator[s])
            r[s] = math.sqrt(old * target)
            moved = max(moved, abs(r[s] - old))
        if moved <= TOLERANCE:
            break
    return r


def percentile_ms(sorted_seconds: Sequence[float], numerator: int, denominator: int) -> int:
    """The nearest-rank ``numerator/denominator`` quantile, in milliseconds
    (the median is the lower one); 0 of nothing."""
    n = len(sorted_seconds)
    if n == 0:
        return 0
    rank = max(1, -(-n * numerator // denominator))
    return round(sorted_seconds[rank - 1] * 1000)


def measure(outcomes: Sequence[PingOutcome]) -> dict[str, Measured]:
    """Per server, ordered by fingerprint: raw counts of the pings through
    it, its inferred reliability, and the latency of those that returned."""
    r = reliabilities(outcomes)
    sent: dict[str, int] = defaultdict(int)
    back: dict[str, int] = defaultdict(int)
    latencies: dict[str, list[float]] = defaultdict(list)
    for o in outcomes:
        for s in o.path:
            sent[s] += 1
            if o.returned:
                back[s] += 1
                if o.latency is not None:
                    latencies[s].append(max(0.0, o.latency))
    result = {}
    for s in sorted(sent):
        times = sorted(latencies[s])
        result[s] = Measured(fingerprint=s, sent=sent[s], returned=back[s], reliability=r[s],
                             median_ms=percentile_ms(times, 1, 2),
                             p90_ms=percentile_ms(times, 9, 10))
    return result
