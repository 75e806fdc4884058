"""Client state on disk under ``UserDir`` (client.md §4, §5.2, §6.1).

* :class:`ClientQueue` -- ``queue/``: one file per packet waiting for its
  first hop, written atomically (temp file, fsync, rename, fsync folder)
  with mode 0600, so a crash never leaves half a packet and nothing sent
  is lost before the hop acknowledged it;
* :class:`SurbLog` -- ``surbs/log``: digests of reply blocks already used,
  so one SURB never carries two replies (that would link them);
* :class:`FragmentPool` -- ``fragments/pool``: the reassembly state of
  :class:`mixminion.codec.fragments.Reassembler`, so ``decode`` can collect
  the fragments of one message over several runs;
* :class:`ClientLock` -- ``lock``: one client process at a time touches
  these files.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import struct
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

from mixminion.codec.fragments import Reassembler
from mixminion.codec.routing import NextHop
from mixminion.fileutil import atomic_write

PACKET_LEN = 32768
QUEUE_MAGIC = b"MIXMINION-CLIENT-QUEUE 1\n"


def private_dir(path: str) -> str:
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


# --- the outgoing queue -------------------------------------------------------------


@dataclass(frozen=True)
class QueuedPacket:
    """A packet for ``destination`` (the first hop), queued at ``inserted``."""

    handle: str
    destination: NextHop
    nickname: str
    inserted: float
    packet: bytes
    #: the first hop's descriptor names the original (0.0.8-era) software:
    #: its link is the legacy one (doc/mmtp-legacy.md)
    original: bool = False


class ClientQueue:
    def __init__(self, user_dir: str) -> None:
        self.folder = os.path.join(user_dir, "queue")

    def add(self, destination: NextHop, nickname: str, packet: bytes,
            now: Optional[float] = None, original: bool = False) -> str:
        """Store durably; returns the handle (file name)."""
        if len(packet) != PACKET_LEN:
            raise ValueError("queued packets are 32768 bytes")
        private_dir(self.folder)
        meta = json.dumps({
            "host": destination.host, "port": destination.port,
            "keyid": destination.keyid.hex(), "nickname": nickname,
            "inserted": time.time() if now is None else now, "original": original,
        }).encode("ascii")
        data = QUEUE_MAGIC + struct.pack(">I", len(meta)) + meta + packet
        handle = "pkt_" + os.urandom(12).hex()
        atomic_write(os.path.join(self.folder, handle), data)
        return handle

    def handles(self) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self.folder) if n.startswith("pkt_"))
        except FileNotFoundError:
            return []

    def get(self, handle: str) -> QueuedPacket:
        path = os.path.join(self.folder, handle)
        with open(path, "rb") as f:
            data = f.read()
        if not data.startswith(QUEUE_MAGIC):
            raise ValueError(f"{path} is not a queued packet")
        pos = len(QUEUE_MAGIC)
        (meta_len,) = struct.unpack_from(">I", data, pos)
        meta = json.loads(data[pos + 4:pos + 4 + meta_len])
        packet = data[pos + 4 + meta_len:]
        if len(packet) != PACKET_LEN:
            raise ValueError(f"{path} holds a truncated packet")
        dest = NextHop(meta["host"], int(meta["port"]), bytes.fromhex(meta["keyid"]))
        return QueuedPacket(handle, dest, meta.get("nickname", meta["host"]),
                            float(meta["inserted"]), packet, bool(meta.get("original", False)))

    def packets(self, warn: Callable[[str], None] = lambda _: None) -> Iterator[QueuedPacket]:
        for handle in self.handles():
            try:
                yield self.get(handle)
            except (OSError, ValueError, KeyError) as exc:
                warn(f"Skipping damaged queue entry {handle}: {exc}. Delete it by hand.")

    def remove(self, handle: str) -> None:
        try:
            os.unlink(os.path.join(self.folder, handle))
        except FileNotFoundError:
            pass


# --- the used-SURB log ----------------------------------------------------------------


class SurbLog:
    """hex(SHA1(reply block)) -> expiry of every reply block we used."""

    def __init__(self, user_dir: str) -> None:
        self.path = os.path.join(user_dir, "surbs", "log")
        self.used: dict[str, int] = {}
        try:
            with open(self.path, "rb") as f:
                self.used = {k: int(v) for k, v in json.load(f).items()}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError) as exc:
            raise OSError(f"{self.path} is damaged ({exc}); without it, reply blocks could be "
                          "used twice. Repair or remove it knowingly.") from None

    def is_used(self, digest: bytes) -> bool:
        return digest.hex() in self.used

    def mark(self, digest: bytes, expiry: int, now: float) -> None:
        self.used[digest.hex()] = expiry
        self.used = {k: v for k, v in self.used.items() if v > now - 3600}
        private_dir(os.path.dirname(self.path))
        atomic_write(self.path, json.dumps(self.used, sort_keys=True).encode("ascii"))


# --- the fragment pool ----------------------------------------------------------------


def _to_json(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"b": base64.b64encode(value).decode("ascii")}
    if isinstance(value, dict):
        return {"d": [[_to_json(k), _to_json(v)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if "b" in value:
            return base64.b64decode(value["b"])
        return {_from_json(k): _from_json(v) for k, v in value["d"]}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


class FragmentPool:
    """A persistent :class:`Reassembler` (client-side reassembly)."""

    def __init__(self, user_dir: str) -> None:
        self.path = os.path.join(user_dir, "fragments", "pool")
        try:
            with open(self.path, "rb") as f:
                self.reassembler = Reassembler.restore(_from_json(json.load(f)))
        except FileNotFoundError:
            self.reassembler = Reassembler()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise OSError(f"{self.path} is damaged ({exc}); move it away to start an empty "
                          "fragment pool (partly received messages are then lost).") from None

    def save(self) -> None:
        private_dir(os.path.dirname(self.path))
        atomic_write(self.path, json.dumps(_to_json(self.reassembler.snapshot())).encode("ascii"))


# --- the client lock ---------------------------------------------------------------------


class ClientLock:
    """``UserDir/lock``: an exclusive flock, with the holder's PID inside."""

    def __init__(self, user_dir: str) -> None:
        self.path = os.path.join(user_dir, "lock")
        self.fd: Optional[int] = None

    #: seconds to wait quietly before saying whom we wait for: another
    #: command usually lets go within a moment, and a notice would then be
    #: noise (and break the one-line promise of a usage error)
    quiet_wait = 2.0

    def acquire(self, notice: Callable[[str], None] = lambda _: None) -> None:
        private_dir(os.path.dirname(self.path))
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + self.quiet_wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.02)
                    continue
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            who = f"PID {holder}" if holder.isdigit() else "another process"
            notice(f"Waiting for the client lock {self.path}, held by {who}...")
            fcntl.flock(fd, fcntl.LOCK_EX)
            break
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
