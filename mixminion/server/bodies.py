"""Packet bodies beside the SQLite store, one fixed slot per row id.

SQLite spends about 55 us of CPU to insert a 32 KiB blob and 50 us to
delete it securely (its pages go through the WAL, then the checkpoint,
twice), the largest cost of a relayed packet after the cryptography.  So a
:class:`~mixminion.server.packetstore.PacketStore` given a body directory
keeps each row's packet here instead: row ``n`` owns slot
``(n - 1) % per_segment`` of segment file ``(n - 1) // per_segment``, a
4-byte length (plus one, so zeros mean no body) and up to 32 KiB.  The
row stays the authority: a body is written and synced before its row
commits, and overwritten with zeros after its row's deletion commits; a
segment whose ids are all allocated and none has a row left is synced and
unlinked.  A crash between the two
steps leaves a body with no row, which :meth:`BodyFiles.sweep` zeroes at
the next start.

Several processes share the files: the node and its processing children
(``ProcessingWorkers``) write bodies of new rows only inside their
writing transaction, which SQLite grants one process at a time, at ids
above every committed one; the node zeroes and unlinks only slots of
deleted rows and segments below the committed id sequence, so no two
touch the same bytes.
"""

from __future__ import annotations

import os
import re
import struct
import threading
from typing import Callable, Iterable, Optional, Sequence

from mixminion.fileutil import open_segment, write_zeros

MAX_BODY = 32768
_LENGTH = struct.Struct(">I")
SLOT_LEN = _LENGTH.size + MAX_BODY
#: segment files kept open at once by one process
MAX_OPEN_FILES = 16
_SEGMENT_RE = re.compile(r"^(\d{12})\.bodies$")


class BodyFiles:
    """Fixed-size body slots addressed by row id."""

    def __init__(self, directory: str, per_segment: int = 64) -> None:
        if not 1 <= per_segment <= 256:  # a write is 3 buffers a slot; IOV_MAX is 1024
            raise ValueError("per_segment must be between 1 and 256")
        self.directory = directory
        self.per_segment = per_segment
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)
        self._lock = threading.Lock()
        self._fds: dict[int, int] = {}

    def _locate(self, row_id: int) -> tuple[int, int]:
        index = row_id - 1
        return index // self.per_segment, (index % self.per_segment) * SLOT_LEN

    def _path(self, segment: int) -> str:
        return os.path.join(self.directory, f"{segment:012d}.bodies")

    def _fd(self, segment: int, create: bool) -> Optional[int]:
        fd = self._fds.get(segment)
        if fd is None:
            fd = open_segment(self._path(segment), create)
            if fd is None:
                return None
            self._fds[segment] = fd
            while len(self._fds) > MAX_OPEN_FILES:  # a pool spans many segments
                self._forget_fd(min(s for s in self._fds if s != segment))
        return fd

    def _forget_fd(self, segment: int) -> None:
        fd = self._fds.pop(segment, None)
        if fd is not None:
            os.close(fd)

    def _by_segment(self, rows: Iterable[tuple[int, Optional[bytes]]]
                    ) -> list[tuple[int, list[tuple[int, Optional[bytes]]]]]:
        """``(row id, body)`` pairs grouped by segment, segments ascending."""
        groups: dict[int, list[tuple[int, Optional[bytes]]]] = {}
        for row in rows:
            groups.setdefault(self._locate(row[0])[0], []).append(row)
        return sorted(groups.items())

    def segments(self) -> list[int]:
        return sorted(int(m.group(1)) for m in map(_SEGMENT_RE.match, os.listdir(self.directory))
                      if m)

    def segment_range(self, segment: int) -> tuple[int, int]:
        """First and last row id of ``segment``."""
        first = segment * self.per_segment + 1
        return first, first + self.per_segment - 1

    def write(self, ids: Sequence[int], bodies: Sequence[bytes]) -> None:
        """Write and sync the bodies of new rows (before they commit)."""
        for body in bodies:
            if len(body) > MAX_BODY:
                raise ValueError(f"bodies are at most {MAX_BODY} bytes, not {len(body)}")
        with self._lock:
            for segment, rows in self._by_segment(zip(ids, bodies)):
                fd = self._fd(segment, create=True)
                for start, chunk in _consecutive(rows, self._locate):
                    buffers: list[bytes] = []
                    for _, body in chunk:
                        # length + 1: a zeroed slot (length field 0) is "no body"
                        buffers += [_LENGTH.pack(len(body) + 1), body,
                                    bytes(MAX_BODY - len(body))]
                    written = os.pwritev(fd, buffers, start)
                    if written != len(chunk) * SLOT_LEN:  # e.g. the disk filled up
                        raise OSError(f"short write of packet bodies ({written} bytes)")
                os.fdatasync(fd)

    def read(self, row_id: int) -> bytes:
        segment, offset = self._locate(row_id)
        with self._lock:
            fd = self._fd(segment, create=False)
            raw = os.pread(fd, SLOT_LEN, offset) if fd is not None else b""
        if len(raw) < _LENGTH.size:
            raise KeyError(row_id)
        (stored,) = _LENGTH.unpack_from(raw)
        length = stored - 1
        if stored == 0 or length > MAX_BODY or len(raw) < _LENGTH.size + length:
            raise KeyError(row_id)  # never written, or zeroed by a deletion
        return raw[_LENGTH.size:_LENGTH.size + length]

    def zero(self, ids: Iterable[int], row_exists: Callable[[int, int], bool],
             allocated_through: int) -> None:
        """Overwrite the slots of deleted rows; sync and unlink each touched
        segment that is fully allocated and holds no row any more
        (``row_exists(first, last)`` asks the store)."""
        touched: list[int] = []
        with self._lock:
            for segment, rows in self._by_segment((row_id, None) for row_id in ids):
                fd = self._fd(segment, create=False)
                if fd is None:
                    continue
                for start, run in _consecutive(rows, self._locate):
                    write_zeros(fd, start, len(run) * SLOT_LEN)  # adjacent slots at once
                touched.append(segment)
            for segment in touched:
                self._unlink_if_dead(segment, row_exists, allocated_through)

    def _unlink_if_dead(self, segment: int, row_exists: Callable[[int, int], bool],
                        allocated_through: int) -> None:
        first, last = self.segment_range(segment)
        if last > allocated_through or row_exists(first, last):
            return
        fd = self._fd(segment, create=False)
        if fd is not None:
            # Zeros reach the disk before the name goes: the kernel drops
            # unwritten pages of an unlinked file.
            os.fdatasync(fd)
            self._forget_fd(segment)
            os.unlink(self._path(segment))

    def sweep(self, live_ids: Callable[[int, int], set[int]], allocated_through: int) -> int:
        """At start-up, before any other writer: zero every slot without a
        row (a crash between a deletion and its zeroing, or a body written
        for a transaction that never committed); unlink dead segments.
        Returns how many slots held a body without a row."""
        stray = 0
        with self._lock:
            for segment in self.segments():
                first, last = self.segment_range(segment)
                live = live_ids(first, last)
                fd = self._fd(segment, create=False)
                size = os.fstat(fd).st_size
                for row_id in range(first, last + 1):
                    offset = self._locate(row_id)[1]
                    if row_id in live or offset >= size:
                        continue
                    if os.pread(fd, SLOT_LEN, offset).strip(b"\0"):
                        stray += 1
                        write_zeros(fd, offset, SLOT_LEN)
                os.fdatasync(fd)
                if not live and last <= allocated_through:
                    self._forget_fd(segment)
                    os.unlink(self._path(segment))
        return stray

    def close(self) -> None:
        with self._lock:
            for segment in list(self._fds):
                self._forget_fd(segment)


def _consecutive(rows: list[tuple[int, Optional[bytes]]],
                 locate: Callable[[int], tuple[int, int]]) -> list[tuple[int, list]]:
    """Split rows (ids of one segment, any order) into runs of adjacent
    slots, ascending: (offset of the first, rows)."""
    runs: list[tuple[int, list]] = []
    previous = None
    for row_id, body in sorted(rows):
        if previous is not None and row_id == previous + 1:
            runs[-1][1].append((row_id, body))
        else:
            runs.append((locate(row_id)[1], [(row_id, body)]))
        previous = row_id
    return runs
