"""Free disk space, and the floors ``[Server] MinFreeDisk`` sets.

The rule (doc/server.md, "Free disk space"): every stage of the node that
makes its data grow checks the free space of the disk it writes to before
it writes, and waits rather than write below its floor.

* **Reception** keeps ``MinFreeDisk``: below it MMTP answers REJECTED (the
  sender tries again later).
* **The later stages** -- processing into the packet store, and the exit
  modules that write local files (FRAGMENT's reassembly store, MBOX's
  ``MboxFile``) -- keep half of it (:func:`later_floor`).  Below that,
  processing stops taking packets from the incoming log (they stay there,
  acknowledged and safe) and those modules' deliveries wait in their
  queues; both go on by themselves once space is back.

Reception stops first, so what it accepted has the other half to be
processed and delivered in; the half under the later floor is left for
what no stage can put off (SQLite's journals, the counters, the logs).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

#: the default of :attr:`FreeSpace.interval`, in seconds
CHECK_INTERVAL = 0.25

#: ``shutil.disk_usage`` or a stand-in with the same ``free`` (tests)
Usage = Callable[[str], Any]


def later_floor(min_free_disk: int) -> int:
    """The free space processing and local deliveries keep: half of
    ``MinFreeDisk`` (0, none, when MinFreeDisk is 0)."""
    return min_free_disk // 2


def megabytes(n: int) -> str:
    return f"{n / (1 << 20):.1f} MB"


class FreeSpace:
    """Free bytes on the disk holding ``path``, asked of the kernel at most
    every :attr:`interval` seconds (a statvfs per packet was a visible
    share of the reactor's time) and counted down by what was written
    meanwhile (:meth:`spend`), so the estimate errs low; an estimate under
    the floor asked about is checked again at once."""

    def __init__(self, path: str, clock: Callable[[], float], interval: float = CHECK_INTERVAL,
                 usage: Usage = shutil.disk_usage) -> None:
        self.path = path
        self.clock = clock
        self.interval = interval
        self.usage = usage
        self._seen = 0
        self._checked = float("-inf")
        self._spent = 0

    def free(self, floor: int = 0) -> int:
        """The estimate; raises OSError if the kernel cannot say."""
        now = self.clock()
        estimate = self._seen - self._spent
        if now - self._checked >= self.interval or estimate < floor:
            self._seen = self.usage(self.path).free
            self._checked, self._spent = now, 0
            estimate = self._seen
        return estimate

    def spend(self, n: int) -> None:
        """``n`` bytes are being written there."""
        self._spent += n


@dataclass(frozen=True)
class Shortage:
    """A disk under a stage's floor."""

    path: str
    free: int
    floor: int


def shortage(spaces: Iterable[FreeSpace], floor: int, writing: int = 0) -> Optional[Shortage]:
    """The first of ``spaces`` under ``floor`` (None if none is, or the
    floor is 0); without one, ``writing`` bytes are counted spent on each.
    A disk whose free space cannot be read counts as under the floor."""
    if floor <= 0:
        return None
    spaces = list(spaces)
    for space in spaces:
        try:
            free = space.free(floor)
        except OSError:
            free = 0
        if free < floor:
            return Shortage(space.path, free, floor)
    for space in spaces:
        space.spend(writing)
    return None


class DiskPause:
    """Whether one stage waits for disk space: one WARN line when it
    starts waiting, one INFO line when it goes on (an operator-caused
    state: no traceback, no addresses).  ``log`` is a twisted Logger
    (not imported: the processing child imports this module and runs
    without Twisted)."""

    def __init__(self, log: Any, stage: str, waiting: str) -> None:
        self.log = log
        #: e.g. "Processing", "Delivery by MBOX"
        self.stage = stage
        #: what happens meanwhile, for the WARN line
        self.waiting = waiting
        self.shortage: Optional[Shortage] = None

    @property
    def paused(self) -> bool:
        return self.shortage is not None

    def update(self, short: Optional[Shortage]) -> None:
        """The stage's latest check: ``short`` None when it may write."""
        if short is not None and self.shortage is None:
            self.log.warn("{stage} paused: {free} free on the disk of {path}, under its floor "
                          "of {floor} (half of MinFreeDisk); {waiting} until space is freed",
                          stage=self.stage, free=megabytes(short.free), path=short.path,
                          floor=megabytes(short.floor), waiting=self.waiting)
        elif short is None and self.shortage is not None:
            self.log.info("{stage} resumed: free disk space is back above its floor",
                          stage=self.stage)
        self.shortage = short
