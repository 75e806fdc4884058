"""The processing child process: decrypts incoming packets into the pool.

The node's process runs MMTP both ways, its queues and its timers; this
one runs the codec, so the RSA and LIONESS work (about 0.3 ms a packet)
and its store writes use a core of their own instead of competing with
the reactor for the GIL.  It talks to the node in the messages of
:mod:`mixminion.server.childmessages`, one JSON line each, over its stdin
and stdout (see :class:`mixminion.server.processing.Processor` for the
other end): the node sends the packet keys and asks it to drain, and
during a drain says how far more has been committed; the child says when
it is ready, reports each committed batch, and ends each drain idle,
paused for disk space, or failed.

It exits when its stdin closes (the node stopped or died).  An exclusive
lock on a file beside the stores keeps a child of a killed node from
processing beside its successor's.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import select
import signal
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import BinaryIO, Callable, Iterator, Optional, Sequence

from mixminion.codec.packet import PACKET_LEN
from mixminion.codec.process import PacketProcessor
from mixminion.codec.rsa import PrivateKey
from mixminion.server import childmessages as msg
from mixminion.server.diskspace import FreeSpace, shortage
from mixminion.server.draining import Share, drain
from mixminion.server.incoming_log import IncomingLog, IncomingLogError
from mixminion.server.packetstore import PacketStore, PacketStoreError
from mixminion.server.store_replay import StoreReplayLog


#: packets per commit.  The child holds two batches at once (it opens
#: the next while the last commits), several copies of each 32 KiB packet
#: apiece, and its memory keeps that high-water mark: 16 instead of 32 took
#: rss_mb_50k from 100.0 to 97.3 MB (benchmarks/node.py, 5 runs each), with
#: no loss of relay rate or of latency at 50 % load measurable in three
#: interleaved pairs (pipeline_ratio 0.46-0.61 against 0.49-0.53; p99 at
#: 50 % 82-101 ms against 78-109); at 90 % load the p99 was higher.
BATCH_SIZE = 16


@contextmanager
def processing_lock(path: str) -> Iterator[bool]:
    """Hold the processing lock; yields whether it had to wait for it.

    The child holds it while it runs.  The node takes it too, for its
    start-up recovery: a child of a node killed with SIGKILL may still be
    finishing a batch (writing packet bodies before their rows commit), and
    the recovery must not overwrite them as strays."""
    with os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o600), "r+b") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            waited = False
        except BlockingIOError:
            fcntl.flock(lock, fcntl.LOCK_EX)
            waited = True
        try:
            yield waited
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def node_clock(offset: Optional[float]) -> Callable[[], float]:
    """The node's elapsed clock (its monotonic clock plus ``offset``), or
    the wall clock from a node that sends no offset."""
    if offset is None:
        return time.time
    return lambda: time.monotonic() + offset


class Requests:
    """The node's messages, a line each, read from ``fd``.

    Between the batches of a drain the child looks at what has come
    without waiting (:meth:`more`).  It takes only the More messages at
    the head: anything behind another message (new packet keys) waits
    until the drain ends, so no packet committed after new keys is
    processed before the child has them."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buffer = b""
        self._lines: deque[bytes] = deque()
        self._eof = False

    def _read(self) -> None:
        data = os.read(self.fd, 1 << 16)
        self._eof = not data
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        self._lines.extend(lines)

    def __iter__(self) -> Iterator[msg.Message]:
        """Each message, waiting for it; ends when the node closes the pipe."""
        while True:
            while not self._lines:
                if self._eof:
                    return
                self._read()
            yield msg.decode(self._lines.popleft())

    def more(self) -> int:
        """The highest mark of the More messages that have come (0: none)."""
        while not self._eof and select.select([self.fd], [], [], 0)[0]:
            self._read()
        through = 0
        while self._lines:
            message = msg.decode(self._lines[0])
            if not isinstance(message, msg.More):
                break
            self._lines.popleft()
            through = max(through, message.through)
        return through


class Child:
    """What the child does with each request from the node."""

    def __init__(self, incoming: IncomingLog, store: PacketStore, batch_size: int,
                 out: BinaryIO, disks: Sequence[str] = (), pings: bool = False,
                 share: Share = Share(), more: Callable[[], int] = lambda: 0) -> None:
        #: how far the node has committed since the drain began (see :class:`More`)
        self.more = more
        self.incoming = incoming
        #: the incoming ids this worker takes
        self.share = share
        self.store = store
        self.batch_size = batch_size
        self.out = out
        #: the node pings: PING exits with a handle go to its ``ping`` queue
        self.pings = pings
        self.processor: Optional[PacketProcessor] = None
        self.opener = ThreadPoolExecutor(1, thread_name_prefix="mixminion-opening")
        #: where a batch writes (the store's folder, its bodies' folder):
        #: checked against the drain's floor before each batch
        self.free_space = [FreeSpace(path, time.monotonic) for path in disks]

    def send(self, message: msg.Message) -> None:
        self.out.write(msg.encode(message))
        self.out.flush()

    def handle(self, message: msg.Message) -> None:
        if isinstance(message, msg.Keys):
            keys = [PrivateKey.from_der(der) for der in message.keys]
            self.processor = PacketProcessor(
                [(key, StoreReplayLog(self.store, key.public.keyid)) for key in keys])
        elif isinstance(message, msg.Drain):
            if self.processor is None:
                self.send(msg.Failed("no packet keys yet"))
                return
            floor = message.floor
            # A batch of n packets adds up to n bodies to the store.
            batch_bytes = self.batch_size * PACKET_LEN
            short = shortage(self.free_space, floor, batch_bytes)
            try:
                if short is None:
                    for done in drain(self.incoming, self.store, self.processor,
                                      self.batch_size, node_clock(message.clock),
                                      self.opener, message.through, self.pings, self.share,
                                      self.more):
                        self.send(msg.Batch(done.through, dict(done.counts)))
                        short = shortage(self.free_space, floor, batch_bytes)
                        if short is not None:
                            break  # the rest stays in the incoming log
            except (PacketStoreError, IncomingLogError, OSError) as exc:
                self.send(msg.Failed(f"processing failed: {exc}"))
                return
            if short is not None:
                self.send(msg.Paused(short.path, short.free, short.floor))
            else:
                self.send(msg.Idle())


def _share(text: str) -> Share:
    index, of = text.split("/")
    return Share(int(index), int(of))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--incoming", required=True, help="the incoming log's directory")
    parser.add_argument("--store", required=True, help="the main packet store")
    parser.add_argument("--bodies", help="the main store's body directory, if it has one")
    parser.add_argument("--lock", required=True, help="lock file held while running")
    parser.add_argument("--batch", type=int, default=BATCH_SIZE, help="packets per commit")
    parser.add_argument("--nice", type=int, default=0, help="lower this process's priority by N")
    parser.add_argument("--pings", action="store_true",
                        help="the node pings: queue PING exits with a handle for its pinger")
    parser.add_argument("--share", type=_share, default=Share(),
                        help="I/N: this is worker I of N and takes the ids with id %% N == I")
    args = parser.parse_args(argv)
    # The node decides when this process stops (by closing its stdin): a
    # Ctrl-C at a foreground twistd reaches the whole process group.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if args.nice:
        os.nice(args.nice)
    with processing_lock(args.lock):
        incoming = IncomingLog(args.incoming, read_only=True)
        store = PacketStore(args.store, body_dir=args.bodies)
        requests = Requests(sys.stdin.fileno())
        child = Child(incoming, store, args.batch, sys.stdout.buffer,
                      [os.path.dirname(os.path.abspath(args.store)), *filter(None, [args.bodies])],
                      pings=args.pings, share=args.share, more=requests.more)
        try:
            child.send(msg.Ready())
            for message in requests:
                child.handle(message)
        except BrokenPipeError:
            pass  # the node is gone; what was committed stays committed
        finally:
            child.opener.shutdown(wait=True)
            incoming.close()
            store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
