"""Which server to measure next, and the path of its ping (doc/reliability.md §1).

A ping to measure ``S`` travels ``X, S, Y, P`` where ``P`` is the pinger.
``X``, ``S`` and ``Y`` are distinct and none is ``P``: a server that saw a
packet come from ``P`` and go back to ``P`` could tell a ping from traffic,
forward pings faithfully and drop the rest.  So a pinger needs at least
three servers besides itself; with fewer it does not ping at all.

``S`` rotates: the server measured least often lately goes next (ties
broken at random), so every server gets about as many pings.  ``X`` and
``Y`` are drawn uniformly from the others, so no pair of neighbours is
favoured and the inference sees every server beside every other.
"""

from __future__ import annotations

import random
from typing import Iterable, Mapping, Optional, Protocol, Sequence, TypeVar

#: servers a ping needs besides the pinger
PATH_SERVERS = 3


class Server(Protocol):
    """What path choice needs of a descriptor: its identity fingerprint."""

    @property
    def fingerprint(self) -> str: ...


ServerT = TypeVar("ServerT", bound=Server)


def others(servers: Iterable[ServerT], me: str) -> list[ServerT]:
    """The servers a ping may use: not the pinger (``me``, its identity
    fingerprint), one per fingerprint (the first given), ordered by
    fingerprint so that a seeded rng makes the same choices whatever order
    the caller's descriptors came in."""
    me = me.upper()
    chosen: dict[str, ServerT] = {}
    for server in servers:
        fp = server.fingerprint.upper()
        if fp != me and fp not in chosen:
            chosen[fp] = server
    return [chosen[fp] for fp in sorted(chosen)]


def choose_measured(fingerprints: Sequence[str], counts: Mapping[str, int],
                    rng: random.Random) -> str:
    """The fingerprint pinged least as ``S`` lately (``counts``, missing
    means 0), ties broken at random."""
    if not fingerprints:
        raise ValueError("no server to measure")
    fewest = min(counts.get(fp, 0) for fp in fingerprints)
    return rng.choice([fp for fp in fingerprints if counts.get(fp, 0) == fewest])


def choose_path(servers: Iterable[ServerT], me: str, counts: Mapping[str, int],
                rng: random.Random) -> Optional[tuple[ServerT, ServerT, ServerT]]:
    """``(X, S, Y)`` for the next ping, or None when fewer than three
    servers other than the pinger are known: ``X, S, Y`` must be distinct
    and none may be the pinger, so there is no safe path.

    ``servers`` are those the pinger may route through (the caller keeps
    only usable descriptors: valid now, relaying); ``me`` is the pinger's
    identity fingerprint; ``counts`` how often each fingerprint was
    measured (as ``S``) over the recent window.
    """
    candidates = others(servers, me)
    if len(candidates) < PATH_SERVERS:
        return None
    by_fp = {c.fingerprint.upper(): c for c in candidates}
    upper_counts = {fp.upper(): n for fp, n in counts.items()}
    measured = by_fp[choose_measured(list(by_fp), upper_counts, rng)]
    x, y = rng.sample([c for c in candidates if c is not measured], 2)
    return x, measured, y
