"""The server's key store: identity key, keysets and their schedule.

Spec: server.md §8 (keys, keysets, rotation, publication), §2 (on-disk
layout), §7 (a replay log lives and dies with its packet key), §17.5 (packet
keys accepted exactly during ``[Valid-After, Valid-Until + Overlap]``);
descriptors.md §4.2 (validity dates).

A *keyset* is a packet key plus the signed descriptor that announces it for
one validity interval.  Clients must learn a key long before it is used, so
keysets are generated ahead (``PUBLICATION_LATENCY + PREPUBLICATION_INTERVAL``)
and a key keeps decrypting for ``overlap`` after its descriptor expires, for
packets built with it just before.  After that the key and its replay log are
destroyed: the log is bounded because every tag in it belongs to a key that
no longer exists.

No Twisted and no clock in here: every decision takes ``now`` (seconds
since the epoch), so the whole schedule can be tested by advancing a number.
The node turns :meth:`KeyStore.next_event` into a ``callLater``.

On disk (under ``key_dir``)::

    identity.key          PEM RSA private key, 0600, never rotated
    key_NNNN/mix.key      PEM packet private key, 0600
    key_NNNN/ServerDesc   signed descriptor, 0644
    key_NNNN/published    exists iff uploaded; holds the upload time (GMT)

and the replay log of keyset ``NNNN`` at ``hashlog_dir/hash_NNNN`` (plus the
files SQLite keeps beside it).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import stat
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence, Union

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mixminion.codec.crypto import RandomSource
from mixminion.codec.errors import CodecError
from mixminion.codec.rsa import PrivateKey, PublicKey
from mixminion.directory.descriptor import (
    DescriptorFields,
    ServerDescriptor,
    build_descriptor,
    parse_descriptor,
)
from mixminion.codec.textformat import SECONDS_PER_DAY, decode_time, format_date, format_time
from mixminion.fileutil import fsync_dir

__all__ = [
    "DescriptorTemplate",
    "InvalidKeyset",
    "KeyStore",
    "KeyStoreError",
    "Keyset",
    "LoadResult",
    "PREPUBLICATION_INTERVAL",
    "PUBLICATION_LATENCY",
    "ROTATION_POSTPONEMENT",
    "RotationResult",
    "fields_for",
    "keysets_needed",
    "midnight",
    "next_keyset_number",
    "parse_hashlog_name",
    "plan_keysets",
    "schedule_problems",
    "secure_delete",
]

# --- constants (§8.1, §8.3) ---------------------------------------------------------

#: assumed time for a new descriptor to reach clients: 2 days 13 hours
PUBLICATION_LATENCY = 2 * SECONDS_PER_DAY + 13 * 3600
#: how far ahead of use keys must be published: 14 days
PREPUBLICATION_INTERVAL = 14 * SECONDS_PER_DAY
PACKET_KEY_BITS = 2048
#: descriptors.md §6: PublicKeyLifetime >= 1 day (shorter gives Valid-Until == Valid-After)
MIN_LIFETIME = SECONDS_PER_DAY
#: generation runs once ``now`` is this far past the generation time, so
#: that the count formula of §8.3 step 2 is positive when it does
GENERATION_LEEWAY = 10
#: a new keyset starts this long after the previous one ends (or after now)
KEYSET_START_DELAY = 60
#: slack added before rounding to midnight, so a date never lands a day early
MIDNIGHT_SLACK = 30
#: §8.3 step 6: the node postpones a rotation this long while generation runs
ROTATION_POSTPONEMENT = 120

IDENTITY_FILE = "identity.key"
PACKET_KEY_FILE = "mix.key"
DESCRIPTOR_FILE = "ServerDesc"
PUBLISHED_FILE = "published"
KEYSET_PREFIX = "key_"
HASHLOG_PREFIX = "hash_"
_TMP_SUFFIX = ".tmp"
_KEYSET_NAME = re.compile(r"key_(\d{4,})")
#: a replay log and its companions: ``hash_0001``, ``hash_0001-wal``, ``hash_0001_jrnl``...
_HASHLOG_FILE = re.compile(r"hash_(\d{4,})(\D.*)?", re.DOTALL)
_DIR_MODE = 0o700
_PRIVATE_MODE = 0o600
_PUBLIC_MODE = 0o644
#: validation time for re-reading our own descriptors: the schedule, not
#: the clock, judges them (a clock set back must not destroy live keys)
_NO_TIME_CHECK = float(2**40)

#: what the node supplies to describe itself: either fields whose
#: ``packet_key``/``published``/``valid_after``/``valid_until`` are replaced
#: per keyset, or a callable ``(packet_key, published, valid_after,
#: valid_until) -> DescriptorFields``
TemplateFunction = Callable[[PublicKey, int, int, int], DescriptorFields]
DescriptorTemplate = Union[DescriptorFields, TemplateFunction]
KeyGenerator = Callable[[int], PrivateKey]
Warn = Callable[[str], None]

_log = logging.getLogger(__name__)


class KeyStoreError(Exception):
    """The key store cannot be used (unreadable identity key, not loaded...)."""


class InvalidKeyset(KeyStoreError):
    """A keyset directory on disk is incomplete or inconsistent."""


# --- the schedule, as pure functions ---------------------------------------------------


def midnight(t: float) -> int:
    """Midnight GMT at or before ``t``."""
    whole = math.floor(t)
    return whole - whole % SECONDS_PER_DAY


def keysets_needed(now: float, last_valid_until: Optional[int], lifetime: int) -> int:
    """§8.3 step 2: how many keysets cover ``now + PUBLICATION_LATENCY +
    PREPUBLICATION_INTERVAL`` beyond what is already covered."""
    last_expiry = now if last_valid_until is None else max(now, last_valid_until)
    cover = now + PUBLICATION_LATENCY + PREPUBLICATION_INTERVAL
    return max(0, math.ceil((cover - last_expiry) / lifetime))


def plan_keysets(
    now: float, last_valid_until: Optional[int], lifetime: int, count: int
) -> list[tuple[int, int]]:
    """§8.3 step 3: the ``(Valid-After, Valid-Until)`` of ``count`` new keysets.

    The first starts just after the last keyset, rounded down to midnight;
    each next one starts ``lifetime`` later.  Whole-day lifetimes give
    contiguous intervals.  With no keyset, or only ended ones, the first
    starts at the midnight before now, so the node has a key at once: the
    reference added 60 s first, which in the last minute of a day gave a
    fresh node no valid key until midnight (doc/server.md, Decisions).
    """
    if last_valid_until is None or last_valid_until < now:
        start = midnight(now)
    else:
        start = midnight(last_valid_until + KEYSET_START_DELAY)
    intervals = []
    for _ in range(count):
        valid_after = midnight(start + MIDNIGHT_SLACK)
        valid_until = midnight(valid_after + lifetime + MIDNIGHT_SLACK)
        intervals.append((valid_after, valid_until))
        start += lifetime
    return intervals


def next_keyset_number(used: Iterable[int]) -> int:
    """§2: the lowest free number below the current lowest, else highest + 1.

    Every number below the lowest is free, so this is 1 whenever 1 is free;
    numbers therefore cycle as the oldest keysets die.
    """
    numbers = set(used)
    if not numbers or min(numbers) > 1:
        return 1
    return max(numbers) + 1


def keyset_name(number: int) -> str:
    return f"{KEYSET_PREFIX}{number:04d}"


def parse_keyset_name(name: str) -> Optional[int]:
    match = _KEYSET_NAME.fullmatch(name)
    return int(match.group(1)) if match else None


def hashlog_name(number: int) -> str:
    return f"{HASHLOG_PREFIX}{number:04d}"


def parse_hashlog_name(name: str) -> Optional[int]:
    """The keyset number a replay-log file belongs to (``hash_0012-wal`` → 12)."""
    match = _HASHLOG_FILE.fullmatch(name)
    return int(match.group(1)) if match else None


def schedule_problems(intervals: Sequence[tuple[int, int]]) -> list[str]:
    """§8.3 step 7: overlaps and gaps between validity intervals.

    Touching intervals (one's Valid-Until is the next's Valid-After) are the
    normal, contiguous case.
    """
    problems = []
    ordered = sorted(intervals)
    for (_, reach), (valid_after, _) in zip(_running_reach(ordered), ordered[1:]):
        if valid_after < reach:
            problems.append(
                f"keysets overlap: one starting {format_date(valid_after)} begins before "
                f"another ends at {format_date(reach)}"
            )
        elif valid_after > reach:
            problems.append(f"no keyset is valid from {format_date(reach)} to {format_date(valid_after)}")
    return problems


def _running_reach(ordered: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """For each prefix, (its last start, the latest Valid-Until so far)."""
    reach, out = -1, []
    for valid_after, valid_until in ordered:
        reach = max(reach, valid_until)
        out.append((valid_after, reach))
    return out


# --- files -------------------------------------------------------------------------


def _make_directory(path: str) -> None:
    """Create ``path`` (and parents) 0700; an existing one is left as it is."""
    if not os.path.isdir(path):
        os.makedirs(path, mode=_DIR_MODE, exist_ok=True)
        os.chmod(path, _DIR_MODE)


def _write_file(path: str, data: bytes, mode: int) -> None:
    """Write atomically (temp file, fsync, rename) with exactly ``mode``.

    ``fchmod`` because the node may run with umask 0 (§3 step 4).
    """
    tmp = path + _TMP_SUFFIX
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except OSError as exc:  # a full disk: say which file could not be written
        os.close(fd)
        os.unlink(tmp)
        raise OSError(exc.errno, exc.strerror, path) from None
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


def secure_delete(path: str) -> None:
    """Overwrite a regular file with zeros (whole blocks), fsync, unlink.

    §2.1/§17.6: removed key material must not stay readable on the disk.
    A missing file is not an error; links and other non-files are unlinked.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISREG(info.st_mode):
        _overwrite_with_zeros(path)
    os.unlink(path)


def _overwrite_with_zeros(path: str) -> None:
    fd = os.open(path, os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        info = os.fstat(fd)
        block = info.st_blksize or 4096
        remaining = -(-info.st_size // block) * block
        chunk = bytes(min(max(remaining, 1), 1 << 16))
        while remaining > 0:
            remaining -= os.write(fd, chunk[:remaining])
        os.fsync(fd)
    finally:
        os.close(fd)


def _secure_delete_tree(path: str) -> None:
    """Securely delete every file under ``path``, then the directories."""
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path) or os.path.islink(path):
        secure_delete(path)
        return
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            secure_delete(os.path.join(root, name))
        for name in dirs:
            child = os.path.join(root, name)
            if os.path.islink(child):
                os.unlink(child)
            else:
                os.rmdir(child)
    os.rmdir(path)


def _write_pem(path: str, key: PrivateKey) -> None:
    """PKCS#1 PEM (``BEGIN RSA PRIVATE KEY``), unencrypted as in the reference
    (§8.2: encrypting private keys is not implemented)."""
    pem = key.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    _write_file(path, pem, _PRIVATE_MODE)


def read_pem_key(path: str) -> PrivateKey:
    """An unencrypted PEM RSA private key file written by this module."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise InvalidKeyset(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise InvalidKeyset(f"{path}: not an RSA key")
    return PrivateKey(key)


# --- keysets -------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Keyset:
    """One packet key, its descriptor and where its files live.

    Immutable: changes (publication, a new descriptor) give a new object
    from the :class:`KeyStore`.  Compare keysets by ``number``.
    """

    number: int
    directory: str
    hashlog_path: str
    packet_key: PrivateKey
    descriptor: ServerDescriptor
    #: upload time (whole seconds), None while unpublished
    published_at: Optional[int] = None

    @property
    def name(self) -> str:
        return keyset_name(self.number)

    @property
    def valid_after(self) -> int:
        return self.descriptor.valid_after

    @property
    def valid_until(self) -> int:
        return self.descriptor.valid_until

    @property
    def published(self) -> bool:
        return self.published_at is not None

    @property
    def key_path(self) -> str:
        return os.path.join(self.directory, PACKET_KEY_FILE)

    @property
    def descriptor_path(self) -> str:
        return os.path.join(self.directory, DESCRIPTOR_FILE)

    @property
    def published_path(self) -> str:
        return os.path.join(self.directory, PUBLISHED_FILE)

    def is_live(self, now: float, overlap: float) -> bool:
        """§8.3 step 4 / §17.5: the key decrypts during [Valid-After, Valid-Until + Overlap]."""
        return self.valid_after <= now <= self.valid_until + overlap

    def is_dead(self, now: float, overlap: float) -> bool:
        """§8.3 step 5: ``Valid-Until < now - Overlap``; to be destroyed."""
        return self.valid_until < now - overlap

    def __repr__(self) -> str:
        # No key material, not even the public key.
        state = "published" if self.published else "unpublished"
        return (
            f"<Keyset {self.name} {format_date(self.valid_after)}..{format_date(self.valid_until)} {state}>"
        )


@dataclass(frozen=True)
class RotationResult:
    """What a rotation changed; the node swaps its packet keys if ``changed``."""

    #: keysets that became live (first rotation after load: all live ones)
    added: tuple[Keyset, ...] = ()
    #: keysets that stopped being live; their replay logs must be closed
    removed: tuple[Keyset, ...] = ()
    #: dead keysets destroyed on disk, replay logs included
    deleted: tuple[Keyset, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed)


@dataclass(frozen=True)
class LoadResult:
    """What :meth:`KeyStore.load` found and did."""

    identity_created: bool
    #: names of keyset directories that could not be used and were deleted
    invalid: tuple[str, ...]
    #: dead keysets deleted
    dead: tuple[Keyset, ...]
    warnings: tuple[str, ...]


def fields_for(
    template: DescriptorTemplate, packet_key: PublicKey, published: int, valid_after: int, valid_until: int
) -> DescriptorFields:
    """The descriptor fields of one keyset, from the node's template."""
    if isinstance(template, DescriptorFields):
        return dataclasses.replace(
            template,
            packet_key=packet_key,
            published=published,
            valid_after=valid_after,
            valid_until=valid_until,
        )
    fields = template(packet_key, published, valid_after, valid_until)
    wanted = (packet_key, published, valid_after, valid_until)
    got = (fields.packet_key, fields.published, fields.valid_after, fields.valid_until)
    if got != wanted:
        raise ValueError("descriptor template changed the key, publication time or validity dates")
    return fields


def _same_content(wanted: DescriptorFields, stored: ServerDescriptor) -> bool:
    """§8.5: does the stored descriptor publish what the template says?
    Everything except ``Published`` is compared."""
    return wanted == dataclasses.replace(stored.to_fields(), published=wanted.published)


# --- the store -------------------------------------------------------------------------


class KeyStore:
    """Identity key and keysets under ``key_dir``; replay-log paths under
    ``hashlog_dir``.

    Usage by the node: :meth:`load`, :meth:`regenerate_descriptors`,
    :meth:`ensure_keys`, :meth:`rotate` (whose first call reports every live
    keyset as added), then :meth:`packet_keys`; afterwards act at
    :meth:`next_event`.  Key generation may run in a worker thread while
    the reactor thread reads: the keyset table is replaced, never mutated,
    so readers always see a consistent snapshot.  Only one writer at a time
    (the node never runs two generations at once).
    """

    def __init__(
        self,
        key_dir: str,
        hashlog_dir: str,
        identity_bits: int = 2048,
        lifetime: int = 30 * SECONDS_PER_DAY,
        overlap: int = SECONDS_PER_DAY,
        rng: RandomSource = os.urandom,
        *,
        generate_key: KeyGenerator = PrivateKey.generate,
        warn: Optional[Warn] = None,
    ) -> None:
        if lifetime < MIN_LIFETIME:
            raise ValueError(f"key lifetime must be at least one day, not {lifetime} s")
        if overlap < 0:
            raise ValueError("key overlap cannot be negative")
        self.key_dir = os.fspath(key_dir)
        self.hashlog_dir = os.fspath(hashlog_dir)
        self.identity_bits = identity_bits
        self.lifetime = lifetime
        self.overlap = overlap
        self.rng = rng
        self.generate_key = generate_key
        self.warn: Warn = warn if warn is not None else _log.warning
        self._identity: Optional[PrivateKey] = None
        self._keysets: dict[int, Keyset] = {}
        self._active: dict[int, Keyset] = {}
        self._write_lock = threading.Lock()

    # --- loading ----------------------------------------------------------------

    @property
    def identity(self) -> PrivateKey:
        if self._identity is None:
            raise KeyStoreError("key store not loaded")
        return self._identity

    @property
    def identity_path(self) -> str:
        return os.path.join(self.key_dir, IDENTITY_FILE)

    def load(self, now: float) -> LoadResult:
        """Read everything from disk: §3 step 9 up to generation.

        Creates the identity key if there is none, deletes invalid keysets
        (§8.3 step 8), dead ones (step 5) and replay logs without a keyset,
        and reports schedule problems (step 7).  Resets the live set that
        :meth:`rotate` compares against.
        """
        _make_directory(self.key_dir)
        _make_directory(self.hashlog_dir)
        created = self._load_identity()
        keysets, invalid = self._scan()
        with self._write_lock:
            self._keysets = keysets
            self._active = {}
        dead = self.delete_dead(now)
        self._delete_orphan_logs()
        warnings = self._check_schedule()
        for message in warnings:
            self.warn(message)
        return LoadResult(created, tuple(invalid), tuple(dead), tuple(warnings))

    def _load_identity(self) -> bool:
        """Read ``identity.key``, creating it on first start.  An unreadable
        one is fatal: silently replacing it would change the server's identity."""
        path = self.identity_path
        secure_delete(path + _TMP_SUFFIX)
        if not os.path.exists(path):
            key = self.generate_key(self.identity_bits)
            _write_pem(path, key)
            self._identity = key
            return True
        try:
            key = read_pem_key(path)
        except (OSError, InvalidKeyset) as exc:
            raise KeyStoreError(f"cannot read the identity key: {exc}") from exc
        bits = key.key.key_size
        if bits != self.identity_bits:
            self.warn(
                f"identity key has {bits} bits, IdentityKeyBits says {self.identity_bits}; "
                "keeping it (identity keys are never replaced)"
            )
        self._identity = key
        return False

    def inspect(self) -> dict[int, str]:
        """Read the identity key and every keyset without changing anything
        on disk (``mixminiond keys``): nothing is created, tidied or deleted.
        Returns why each unusable keyset cannot be used, by number (:meth:`load`
        would delete them).  OSError or InvalidKeyset if the identity key
        cannot be read."""
        self._identity = read_pem_key(self.identity_path)
        keysets, unusable = self._read_all(tidy=False)
        with self._write_lock:
            self._keysets = keysets
            self._active = {}
        return unusable

    def _scan(self) -> tuple[dict[int, Keyset], list[str]]:
        keysets, unusable = self._read_all(tidy=True)
        for number, why in unusable.items():
            self.warn(f"deleting unusable keyset {keyset_name(number)}: {why}")
            self._destroy(number)
        return keysets, [keyset_name(number) for number in unusable]

    def _read_all(self, tidy: bool) -> tuple[dict[int, Keyset], dict[int, str]]:
        """The keysets under ``key_dir`` that can be used, and why each other
        cannot; ``tidy``: remove the temporary files a crash left first."""
        keysets: dict[int, Keyset] = {}
        unusable: dict[int, str] = {}
        for name in sorted(os.listdir(self.key_dir)):
            number = parse_keyset_name(name)
            if number is None or not os.path.isdir(os.path.join(self.key_dir, name)):
                continue
            try:
                keysets[number] = self._read_keyset(number, tidy)
            except (OSError, ValueError, CodecError, UnsupportedAlgorithm, KeyStoreError) as exc:
                unusable[number] = str(exc)
        return keysets, unusable

    def _read_keyset(self, number: int, tidy: bool = True) -> Keyset:
        directory = os.path.join(self.key_dir, keyset_name(number))
        for name in (PACKET_KEY_FILE, DESCRIPTOR_FILE, PUBLISHED_FILE) if tidy else ():
            secure_delete(os.path.join(directory, name + _TMP_SUFFIX))
        packet_key = read_pem_key(os.path.join(directory, PACKET_KEY_FILE))
        with open(os.path.join(directory, DESCRIPTOR_FILE), "rb") as f:
            descriptor = parse_descriptor(f.read(), _NO_TIME_CHECK, check_validity=False)
        if descriptor.identity != self.identity.public:
            raise InvalidKeyset("descriptor is signed by another identity key")
        if descriptor.packet_key != packet_key.public:
            raise InvalidKeyset("descriptor announces another packet key than mix.key")
        return Keyset(
            number=number,
            directory=directory,
            hashlog_path=os.path.join(self.hashlog_dir, hashlog_name(number)),
            packet_key=packet_key,
            descriptor=descriptor,
            published_at=_read_published(os.path.join(directory, PUBLISHED_FILE)),
        )

    def _check_schedule(self) -> list[str]:
        keysets = self.keysets
        problems = schedule_problems([(k.valid_after, k.valid_until) for k in keysets])
        odd = [k.name for k in keysets if k.valid_until - k.valid_after != self._interval_length(k.valid_after)]
        if odd:
            problems.append(
                f"keysets {', '.join(odd)} have another lifetime than the configured "
                f"{self.lifetime} s; new keysets will use the configured one"
            )
        return problems

    def _interval_length(self, valid_after: int) -> int:
        return midnight(valid_after + self.lifetime + MIDNIGHT_SLACK) - valid_after

    # --- the table ------------------------------------------------------------------

    @property
    def keysets(self) -> list[Keyset]:
        """All keysets on disk, by Valid-After (then number)."""
        return sorted(self._keysets.values(), key=lambda k: (k.valid_after, k.valid_until, k.number))

    def keyset(self, number: int) -> Keyset:
        return self._keysets[number]

    def _replace(self, keyset: Keyset) -> None:
        with self._write_lock:
            self._keysets = {**self._keysets, keyset.number: keyset}

    def _forget(self, numbers: Iterable[int]) -> None:
        gone = set(numbers)
        with self._write_lock:
            self._keysets = {n: k for n, k in self._keysets.items() if n not in gone}

    def _last_valid_until(self) -> Optional[int]:
        keysets = self.keysets
        return keysets[-1].valid_until if keysets else None

    # --- generation (§8.3 steps 1-3) ------------------------------------------------------

    def next_generation_time(self, now: float) -> float:
        """§8.3 step 1: last Valid-Until − PUBLICATION_LATENCY −
        PREPUBLICATION_INTERVAL; ``now`` (immediately) if there are no keysets."""
        last = self._last_valid_until()
        if last is None:
            return now
        return last - PUBLICATION_LATENCY - PREPUBLICATION_INTERVAL

    def generation_due_time(self, now: float) -> float:
        """When :meth:`ensure_keys` will next do something (may be ≤ now)."""
        if self._last_valid_until() is None:
            return now
        return self.next_generation_time(now) + GENERATION_LEEWAY

    def generation_due(self, now: float) -> bool:
        return now >= self.generation_due_time(now)

    def ensure_keys(self, now: float, template: DescriptorTemplate) -> list[Keyset]:
        """§8.3 step 2: generate the keysets needed to cover the publication
        horizon, if generation is due.  Slow (one RSA key each): the node
        runs it off the reactor thread.  Returns the new keysets, unpublished."""
        if not self.generation_due(now):
            return []
        last = self._last_valid_until()
        intervals = plan_keysets(now, last, self.lifetime, keysets_needed(now, last, self.lifetime))
        return [self._create_keyset(now, template, va, vu) for va, vu in intervals]

    def _create_keyset(self, now: float, template: DescriptorTemplate, valid_after: int, valid_until: int) -> Keyset:
        number = next_keyset_number(self._keysets)
        self._destroy(number)  # leftovers of a crash, or a stale replay log under this number
        directory = os.path.join(self.key_dir, keyset_name(number))
        _make_directory(directory)
        try:
            packet_key = self.generate_key(PACKET_KEY_BITS)
            _write_pem(os.path.join(directory, PACKET_KEY_FILE), packet_key)
            fields = fields_for(template, packet_key.public, int(now), valid_after, valid_until)
            descriptor = self._write_descriptor(directory, fields)
        except BaseException:
            _secure_delete_tree(directory)
            raise
        keyset = Keyset(
            number=number,
            directory=directory,
            hashlog_path=os.path.join(self.hashlog_dir, hashlog_name(number)),
            packet_key=packet_key,
            descriptor=descriptor,
        )
        self._replace(keyset)
        return keyset

    def _write_descriptor(self, directory: str, fields: DescriptorFields) -> ServerDescriptor:
        text = build_descriptor(fields, self.identity, self.rng)
        _write_file(os.path.join(directory, DESCRIPTOR_FILE), text.encode("ascii"), _PUBLIC_MODE)
        return parse_descriptor(text, _NO_TIME_CHECK, check_validity=False)

    # --- descriptors (§8.5, §8.6) ------------------------------------------------------

    def regenerate_descriptors(self, template: DescriptorTemplate, now: float) -> list[Keyset]:
        """§8.5: re-sign every descriptor whose content differs from the
        template, keeping its key and validity; it becomes unpublished."""
        changed = []
        for keyset in self.keysets:
            fields = fields_for(
                template, keyset.packet_key.public, int(now), keyset.valid_after, keyset.valid_until
            )
            if _same_content(fields, keyset.descriptor):
                continue
            # Unmark first: a crash in between leaves an unpublished old
            # descriptor (re-uploaded, then regenerated), never a new one
            # wrongly marked as uploaded.
            secure_delete(keyset.published_path)
            descriptor = self._write_descriptor(keyset.directory, fields)
            updated = dataclasses.replace(keyset, descriptor=descriptor, published_at=None)
            self._replace(updated)
            changed.append(updated)
        return changed

    def unpublished(self) -> list[Keyset]:
        """Keysets whose descriptor still has to be uploaded (§8.6), oldest first."""
        return [k for k in self.keysets if not k.published]

    def mark_published(self, keyset: Keyset, now: float) -> bool:
        """Record that ``keyset``'s descriptor was accepted by the directory.

        False (nothing recorded) if the keyset is gone or its descriptor was
        regenerated since: what was uploaded is no longer what we publish.
        """
        current = self._keysets.get(keyset.number)
        if current is None or current.descriptor != keyset.descriptor:
            return False
        when = int(now)
        _write_file(current.published_path, (format_time(when) + "\n").encode("ascii"), _PRIVATE_MODE)
        self._replace(dataclasses.replace(current, published_at=when))
        return True

    def clear_published(self) -> None:
        """Forget every upload (``mixminiond republish``, §8.6)."""
        for keyset in self.keysets:
            secure_delete(keyset.published_path)
            self._replace(dataclasses.replace(keyset, published_at=None))

    def current_descriptor(self, now: float) -> Optional[ServerDescriptor]:
        """The descriptor valid at ``now`` (the newest, should several be)."""
        valid = [k for k in self.keysets if k.descriptor.is_valid_at(now)]
        return valid[-1].descriptor if valid else None

    def live_descriptor_paths(self, now: float) -> list[str]:
        """The lines of ``current-desc`` (§2): one descriptor path per live keyset."""
        return [k.descriptor_path for k in self.live_keysets(now)]

    # --- live keys and rotation (§8.3 steps 4-6) -----------------------------------------

    def live_keysets(self, now: float) -> list[Keyset]:
        """Keysets whose packet key decrypts at ``now``, newest first."""
        live = [k for k in self.keysets if k.is_live(now, self.overlap)]
        return live[::-1]

    def packet_keys(self, now: float) -> list[tuple[PrivateKey, str]]:
        """``(packet key, replay-log path)`` of each live keyset, newest first:
        most packets are built with the newest key, so it is tried first."""
        return [(k.packet_key, k.hashlog_path) for k in self.live_keysets(now)]

    def next_rotation(self, now: float) -> Optional[float]:
        """§8.3 step 6: the next instant the live set changes (None if never).

        A key is live up to and including Valid-Until + Overlap (§17.5), so
        its removal is due at the next representable time after that, not
        at it (which would find it still live and schedule itself again).
        """
        removals = [_just_after(k.valid_until + self.overlap) for k in self.keysets if k.is_live(now, self.overlap)]
        activations = [float(k.valid_after) for k in self.keysets if k.valid_after > now]
        events = removals + activations
        return min(events) if events else None

    def next_event(self, now: float) -> float:
        """The earliest of the next rotation and the next generation; may
        be ≤ ``now`` when generation is overdue (act at once)."""
        generation = self.generation_due_time(now)
        rotation = self.next_rotation(now)
        return generation if rotation is None else min(generation, rotation)

    def rotate(self, now: float, release: Optional[Callable[[Sequence[Keyset]], None]] = None) -> RotationResult:
        """Recompute the live set and destroy dead keysets.

        ``release(removed)`` runs before anything is deleted, so the node can
        give the packet handler the new key list and close the removed keys'
        replay logs first (§8.3 step 6).
        """
        live = {k.number: k for k in self.live_keysets(now)}
        added = tuple(k for n, k in live.items() if n not in self._active)
        removed = tuple(k for n, k in self._active.items() if n not in live)
        self._active = live
        if release is not None and removed:
            release(removed)
        deleted = self.delete_dead(now)
        return RotationResult(added, removed, tuple(deleted))

    def delete_dead(self, now: float) -> list[Keyset]:
        """§8.3 step 5: destroy keysets with ``Valid-Until < now - Overlap``
        (each rotation does; ``mixminiond keys --delete-expired`` too, on a
        stopped node)."""
        dead = [k for k in self.keysets if k.is_dead(now, self.overlap)]
        for keyset in dead:
            self._destroy(keyset.number)
        self._forget(k.number for k in dead)
        return dead

    def _destroy(self, number: int) -> None:
        """Securely delete a keyset directory and its replay log (§7: the
        log dies with its key)."""
        _secure_delete_tree(os.path.join(self.key_dir, keyset_name(number)))
        for path in self._hashlog_files(number):
            secure_delete(path)
        fsync_dir(self.key_dir)

    def _hashlog_files(self, number: Optional[int] = None) -> list[str]:
        """Replay-log files (``hash_NNNN`` and the companions SQLite or the
        reference leave beside it) of keyset ``number``, or of any keyset."""
        try:
            names = os.listdir(self.hashlog_dir)
        except FileNotFoundError:
            return []
        return [
            os.path.join(self.hashlog_dir, name)
            for name in names
            if (owner := parse_hashlog_name(name)) is not None and (number is None or owner == number)
        ]

    def _delete_orphan_logs(self) -> list[str]:
        """Replay logs whose keyset is gone (a crash between deleting the two):
        their tags belong to destroyed keys, so they go too."""
        orphans = [p for p in self._hashlog_files() if parse_hashlog_name(os.path.basename(p)) not in self._keysets]
        for path in orphans:
            secure_delete(path)
        return orphans


def _just_after(t: float) -> float:
    """The smallest float greater than ``t``: the first instant past a closed interval."""
    return math.nextafter(float(t), math.inf)


def _read_published(path: str) -> Optional[int]:
    """The upload time in a ``published`` marker; the marker's mtime if its
    content is unreadable (its existence is what counts), None if absent."""
    try:
        with open(path, "rb") as f:
            content = f.read(100)
        mtime = int(os.stat(path).st_mtime)
    except FileNotFoundError:
        return None
    try:
        return decode_time(content.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return mtime
