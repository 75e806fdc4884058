"""The processing child process: decrypts incoming packets into the pool.

The node's process runs MMTP both ways, its queues and its timers; this
one runs the codec, so the RSA and LIONESS work (about 0.3 ms a packet)
and its store writes use a core of their own instead of competing with
the reactor for the GIL.  It talks JSON lines over its stdin and stdout
(see :class:`mixminion.server.processing.Processor` for the other end)::

    node  -> child   {"keys": [hex DER, ...]}   packet keys, newest first
                     {"drain": true, "through": ID, "floor": BYTES}
                                                process what is queued, up to
                                                the last id the node committed,
                                                while the store's disks keep
                                                BYTES free
    child -> node    {"ready": true}            stores open, lock held
                     {"batch": {"through": ID, "counts": {...}}}
                     {"idle": true}             the queue is empty
                     {"paused": {"path": P, "free": N, "floor": BYTES}}
                                                P's disk is under the floor:
                                                the rest waits; ask again
                     {"error": "why"}           a drain failed; ask again

It exits when its stdin closes (the node stopped or died).  An exclusive
lock on a file beside the stores keeps a child of a killed node from
processing beside its successor's.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import BinaryIO, Callable, Iterator, Optional, Sequence

from mixminion.codec.packet import PACKET_LEN
from mixminion.codec.process import PacketProcessor
from mixminion.codec.rsa import PrivateKey
from mixminion.server.diskspace import FreeSpace, Shortage, shortage
from mixminion.server.draining import drain
from mixminion.server.incoming_log import IncomingLog, IncomingLogError
from mixminion.server.packetstore import PacketStore, PacketStoreError
from mixminion.server.store_replay import StoreReplayLog


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


def paused_report(short: Shortage) -> dict:
    """The ``paused`` message's body."""
    return {"path": short.path, "free": short.free, "floor": short.floor}


def node_clock(offset: Optional[float]) -> Callable[[], float]:
    """The node's elapsed clock (its monotonic clock plus ``offset``), or
    the wall clock from a node that sends no offset."""
    if offset is None:
        return time.time
    return lambda: time.monotonic() + offset


class Child:
    """What the child does with each request from the node."""

    def __init__(self, incoming: IncomingLog, store: PacketStore, batch_size: int,
                 out: BinaryIO, disks: Sequence[str] = ()) -> None:
        self.incoming = incoming
        self.store = store
        self.batch_size = batch_size
        self.out = out
        self.processor: Optional[PacketProcessor] = None
        self.opener = ThreadPoolExecutor(1, thread_name_prefix="mixminion-opening")
        #: where a batch writes (the store's folder, its bodies' folder):
        #: checked against the drain's floor before each batch
        self.free_space = [FreeSpace(path, time.monotonic) for path in disks]

    def send(self, message: dict) -> None:
        self.out.write(json.dumps(message).encode() + b"\n")
        self.out.flush()

    def handle(self, message: dict) -> None:
        if "keys" in message:
            keys = [PrivateKey.from_der(bytes.fromhex(k)) for k in message["keys"]]
            self.processor = PacketProcessor(
                [(key, StoreReplayLog(self.store, key.public.keyid)) for key in keys])
        elif message.get("drain"):
            if self.processor is None:
                self.send({"error": "no packet keys yet"})
                return
            floor = int(message.get("floor", 0))
            # A batch of n packets adds up to n bodies to the store.
            batch_bytes = self.batch_size * PACKET_LEN
            short = shortage(self.free_space, floor, batch_bytes)
            try:
                if short is None:
                    for done in drain(self.incoming, self.store, self.processor,
                                      self.batch_size, node_clock(message.get("clock")),
                                      self.opener, message["through"]):
                        self.send({"batch": {"through": done.through,
                                             "counts": dict(done.counts)}})
                        short = shortage(self.free_space, floor, batch_bytes)
                        if short is not None:
                            break  # the rest stays in the incoming log
            except (PacketStoreError, IncomingLogError, OSError) as exc:
                self.send({"error": f"processing failed: {exc}"})
                return
            if short is not None:
                self.send({"paused": paused_report(short)})
            else:
                self.send({"idle": True})


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--incoming", required=True, help="the incoming log's directory")
    parser.add_argument("--store", required=True, help="the main packet store")
    parser.add_argument("--bodies", help="the main store's body directory, if it has one")
    parser.add_argument("--lock", required=True, help="lock file held while running")
    parser.add_argument("--batch", type=int, default=32, help="packets per commit")
    parser.add_argument("--nice", type=int, default=0, help="lower this process's priority by N")
    args = parser.parse_args(argv)
    # The node decides when this process stops (by closing its stdin): a
    # Ctrl-C at a foreground twistd reaches the whole process group.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if args.nice:
        os.nice(args.nice)
    with processing_lock(args.lock):
        incoming = IncomingLog(args.incoming, read_only=True)
        store = PacketStore(args.store, body_dir=args.bodies)
        child = Child(incoming, store, args.batch, sys.stdout.buffer,
                      [os.path.dirname(os.path.abspath(args.store)), *filter(None, [args.bodies])])
        try:
            child.send({"ready": True})
            for line in sys.stdin.buffer:
                child.handle(json.loads(line))
        except BrokenPipeError:
            pass  # the node is gone; what was committed stays committed
        finally:
            child.opener.shutdown(wait=True)
            incoming.close()
            store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
