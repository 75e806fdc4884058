"""Client state on disk under ``UserDir`` (client.md §4, §5.2, §6.1).

* :class:`ClientQueue` -- ``queue/``: one file per packet waiting for its
  first hop, written atomically (temp file, fsync, rename, fsync folder)
  with mode 0600, so a crash never leaves half a packet and nothing sent
  is lost before the hop acknowledged it;
* :class:`SurbLog` -- ``surbs/log``: digests of reply blocks already used,
  so one SURB never carries two replies (that would link them);
* :class:`FragmentPool` -- ``fragments/pool``: the reassembly state of
  :class:`mixminion.codec.fragments.Reassembler`, so ``decode`` can collect
  the fragments of one message over several runs, and the messages they
  completed, for ``reassemble`` (``list-fragments`` shows both);
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

from mixminion.codec.fragments import AddResult, FragmentParams, Outcome, Reassembler
from mixminion.codec.payload import FragmentPayload
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


@dataclass(frozen=True)
class CompleteMessage:
    """A reassembled message kept in the pool: ``message`` is what the
    fragments carried (the compressed message, header block inside);
    ``packets`` the number of fragments it took; ``day`` when it completed."""

    message: bytes
    nym: Optional[str]
    day: int
    packets: int


@dataclass(frozen=True)
class PoolEntry:
    """One message in the pool, as ``list-fragments`` shows it (client.md §2.1)."""

    message_id: bytes
    nym: Optional[str]
    #: the length of the reassembled (compressed) message, MSGLEN
    size: int
    have: int
    need: int


class ClientReassembler(Reassembler):
    """A :class:`Reassembler` that also keeps each message it completes,
    as the reference client's pool does (client.md §5.3 step 3): ``decode``
    writes it at once, and it stays for ``reassemble`` until
    ``reassemble -P`` or ``purge-fragments`` takes it, or :meth:`expire`
    drops it with the stale partial messages."""

    def __init__(self, max_length: Optional[int] = None) -> None:
        super().__init__(max_length)
        self.complete: dict[bytes, CompleteMessage] = {}

    def add(self, fragment: FragmentPayload, day: int, nym: Optional[str] = None) -> AddResult:
        result = super().add(fragment, day, nym)
        if result.outcome is Outcome.COMPLETED:
            assert result.message is not None
            params = FragmentParams.for_message(fragment.message_length, fragment.overhead)
            self.complete[result.message_id] = CompleteMessage(
                result.message, nym, day, params.k * params.chunks)
        return result

    def expire(self, before_day: int, today: Optional[int] = None) -> list[bytes]:
        old = [mid for mid, c in self.complete.items() if c.day < before_day]
        for mid in old:
            del self.complete[mid]
        return super().expire(before_day, today) + old

    def entries(self) -> list[PoolEntry]:
        """Every message in the pool, complete or not, sorted by ID."""
        out = [PoolEntry(mid, c.nym, len(c.message), c.packets, c.packets)
               for mid, c in self.complete.items()]
        for mid, state in self.pending.items():
            params = state.params
            need = params.k * params.chunks
            out.append(PoolEntry(mid, state.nym, state.length, need - self.missing(mid), need))
        return sorted(out, key=lambda e: e.message_id)

    def remove(self, message_id: bytes, day: int) -> None:
        """Take a message out of the pool: a complete one stays marked
        COMPLETED, a partial one is rejected, so that fragments of it that
        arrive later are dropped instead of starting it again."""
        if self.complete.pop(message_id, None) is None:
            self.reject(message_id, day)

    def snapshot(self) -> dict:
        state = super().snapshot()
        state["complete"] = {mid: [c.message, c.nym, c.day, c.packets]
                             for mid, c in self.complete.items()}
        return state

    @classmethod
    def restore(cls, state: dict) -> "ClientReassembler":
        r = super().restore(state)
        assert isinstance(r, ClientReassembler)
        r.complete = {mid: CompleteMessage(*v) for mid, v in state.get("complete", {}).items()}
        return r


def message_id_text(message_id: bytes) -> str:
    """How commands show a fragmented message's ID: its first 16 hex
    digits, as ``decode`` logs a reassembled message."""
    return message_id.hex()[:16]


class FragmentPool:
    """A persistent :class:`ClientReassembler` (client-side reassembly)."""

    def __init__(self, user_dir: str) -> None:
        self.path = os.path.join(user_dir, "fragments", "pool")
        try:
            with open(self.path, "rb") as f:
                self.reassembler = ClientReassembler.restore(_from_json(json.load(f)))
        except FileNotFoundError:
            self.reassembler = ClientReassembler()
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
