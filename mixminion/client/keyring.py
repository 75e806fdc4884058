"""The keyring: per-identity secrets that decode replies (client.md §5.4),
and the nyms this client owns (doc/nym.md §6).

The item layout inside is the reference's (type, length, value; SURB keys
as expiry, identity, NUL, secret) so unknown items survive a rewrite, but
the outer protection is ours: the reference's SHA-1 key derivation and
unauthenticated AES-CTR are replaced by scrypt and AES-GCM, so a stolen
keyring costs an attacker real work per guess and any alteration is
detected.  Files in the reference's ``KEYRING1``/``KEYRING2`` formats are
recognised and refused with a clear message rather than mistaken for a
wrong passphrase (the reference's own bug, §5.4).

File (armored, ``TYPE III KEYRING``, header ``Version: 1.0``), binary body::

    "KEYRING3" || log2(N) (1) || r (1) || p (1) || salt (16) || nonce (12)
    || AES-256-GCM(scrypt(passphrase, salt, N, r, p), plaintext,
                   associated data = everything before the ciphertext)

The plaintext is padded with a zero-type "padding" item to a multiple of
1024 bytes so its size reveals little about the number of identities.

A nym is one item of type ``NYM_ITEM`` (ours; the reference knows only
SURB keys, and keeps items it does not know, as we do), its value::

    version (1) = 1 || counter (8) || created (8) || Ed25519 private key (32)
    || name, domain, server nickname, reply-block address, nym key DER:
       each as length (2) || bytes (UTF-8 for the text ones)

all integers big-endian.  ``counter`` is the last one a request used:
it is written here before that request leaves (doc/nym.md §2), so a
crash can skip a counter but never reuse one.
"""

from __future__ import annotations

import os
import random
import struct
from dataclasses import dataclass, field
from typing import Optional

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from mixminion.codec.armor import armor, dearmor
from mixminion.codec.errors import ParseError
from mixminion.codec.textformat import SECONDS_PER_DAY, previous_midnight

ARMOR_NAME = "TYPE III KEYRING"
MAGIC = b"KEYRING3"
OLD_MAGICS = (b"KEYRING1", b"KEYRING2")
SCRYPT_LOG_N = 15
SCRYPT_R = 8
SCRYPT_P = 1
SALT_LEN = 16
NONCE_LEN = 12
SURB_KEY_ITEM = 0x00
#: a nym: its key, counter and nymserver (ours, see above)
NYM_ITEM = 0x10
NYM_ITEM_VERSION = 1
NYM_SECRET_LEN = 32
PAD_ITEM = 0xFF
SECRET_LEN = 20
#: a key is reused for new reply blocks only if it lives at least this long
MIN_KEY_REMAINING = 30 * SECONDS_PER_DAY
NEW_KEY_LIFETIME = 90 * SECONDS_PER_DAY
PAD_TO = 1024


class KeyringError(Exception):
    """The keyring cannot be read or written; the message says what to do."""


class WrongPassphrase(KeyringError):
    """The passphrase does not open the keyring."""


@dataclass
class SurbKey:
    identity: str
    expiry: int
    secret: bytes


@dataclass
class NymEntry:
    """A nym this client owns (doc/nym.md §6)."""

    name: str
    domain: str
    #: the nickname of the node that runs its nymserver
    server: str
    #: where its reply blocks lead (``--to`` of ``nym create``)
    address: str
    #: the nymserver's request key (PKCS#1 DER), pinned at creation
    server_key: bytes
    #: the nym's Ed25519 private key (raw)
    secret: bytes = field(repr=False)
    #: the last counter a request used (0: none yet)
    counter: int = 0
    #: seconds since 1970
    created: int = 0

    @property
    def full_name(self) -> str:
        return f"{self.name}@{self.domain}"

    @property
    def identity(self) -> str:
        """The keyring identity its reply blocks are made with: replies to
        it are told apart from the default identity's and other nyms'."""
        return self.full_name.lower()

    def pack(self) -> bytes:
        texts = [t.encode("utf-8") for t in (self.name, self.domain, self.server, self.address)]
        return (struct.pack(">BQQ", NYM_ITEM_VERSION, self.counter, self.created) + self.secret
                + b"".join(struct.pack(">H", len(v)) + v for v in texts + [self.server_key]))

    @classmethod
    def unpack(cls, value: bytes) -> "NymEntry":
        bad = KeyringError("a nym in the keyring is malformed")
        head = struct.calcsize(">BQQ")
        if len(value) < head + NYM_SECRET_LEN or value[0] != NYM_ITEM_VERSION:
            raise bad
        _, counter, created = struct.unpack_from(">BQQ", value)
        secret = value[head:head + NYM_SECRET_LEN]
        pos, fields = head + NYM_SECRET_LEN, []
        for _ in range(5):
            if len(value) - pos < 2:
                raise bad
            (length,) = struct.unpack_from(">H", value, pos)
            fields.append(value[pos + 2:pos + 2 + length])
            pos += 2 + length
            if len(fields[-1]) != length:
                raise bad
        if pos != len(value):
            raise bad
        try:
            name, domain, server, address = (f.decode("utf-8") for f in fields[:4])
        except UnicodeDecodeError:
            raise bad from None
        return cls(name, domain, server, address, fields[4], secret, counter, created)


@dataclass
class Keyring:
    """The decrypted keyring: SURB keys, nyms, and items we do not understand."""

    keys: list[SurbKey] = field(default_factory=list)
    nyms: list[NymEntry] = field(default_factory=list)
    unknown: list[tuple[int, bytes]] = field(default_factory=list)
    dirty: bool = False

    # -- content --------------------------------------------------------------

    def surb_key(self, identity: str, now: float) -> bytes:
        """The key new reply blocks for ``identity`` use: the longest-lived
        one if it has 30 days left, else a fresh one for 90 days."""
        identity = identity.lower()
        mine = [k for k in self.keys if k.identity == identity]
        best = max(mine, key=lambda k: k.expiry, default=None)
        if best is not None and best.expiry >= now + MIN_KEY_REMAINING:
            return best.secret
        expiry = previous_midnight(int(now + NEW_KEY_LIFETIME)) + SECONDS_PER_DAY
        key = SurbKey(identity, expiry, os.urandom(SECRET_LEN))
        self.keys.append(key)
        self.dirty = True
        return key.secret

    def decoding_keys(self, now: float) -> dict[str, bytes]:
        """``label -> secret`` for every live key; labels map back with
        :meth:`identity_of` (one identity may have several keys)."""
        return {f"{k.identity}\0{i}": k.secret for i, k in enumerate(self.keys)
                if k.expiry >= now}

    @staticmethod
    def identity_of(label: str) -> str:
        return label.split("\0", 1)[0]

    def drop_expired(self, now: float) -> None:
        live = [k for k in self.keys if k.expiry >= now]
        if len(live) != len(self.keys):
            self.keys = live
            self.dirty = True

    # -- serialisation ---------------------------------------------------------

    def plaintext(self) -> bytes:
        items = [(SURB_KEY_ITEM, struct.pack(">I", k.expiry) + k.identity.encode("utf-8")
                  + b"\0" + k.secret) for k in self.keys]
        items += [(NYM_ITEM, n.pack()) for n in self.nyms] + list(self.unknown)
        random.SystemRandom().shuffle(items)
        out = b"".join(struct.pack(">BH", t, len(v)) + v for t, v in items)
        if out:
            pad = (-(len(out) + 3)) % PAD_TO
            out += struct.pack(">BH", PAD_ITEM, pad) + os.urandom(pad)
        return out

    @classmethod
    def from_plaintext(cls, data: bytes) -> "Keyring":
        ring = cls()
        pos = 0
        while pos < len(data):
            if len(data) - pos < 3:
                raise KeyringError("the keyring's contents are truncated")
            kind, length = struct.unpack_from(">BH", data, pos)
            value = data[pos + 3:pos + 3 + length]
            if len(value) != length:
                raise KeyringError("the keyring's contents are truncated")
            pos += 3 + length
            if kind == PAD_ITEM:
                continue
            if kind == SURB_KEY_ITEM:
                expiry = struct.unpack(">I", value[:4])[0]
                name, nul, secret = value[4:].partition(b"\0")
                if not nul or len(secret) != SECRET_LEN:
                    raise KeyringError("a SURB key in the keyring is malformed")
                ring.keys.append(SurbKey(name.decode("utf-8"), expiry, secret))
            elif kind == NYM_ITEM:
                ring.nyms.append(NymEntry.unpack(value))
            else:
                ring.unknown.append((kind, value))
        return ring


def _derive(passphrase: str, salt: bytes, log_n: int, r: int, p: int) -> bytes:
    kdf = Scrypt(salt=salt, length=32, n=1 << log_n, r=r, p=p)
    return kdf.derive(passphrase.encode("utf-8"))


def encrypt_keyring(ring: Keyring, passphrase: str, log_n: int = SCRYPT_LOG_N) -> str:
    salt, nonce = os.urandom(SALT_LEN), os.urandom(NONCE_LEN)
    head = MAGIC + bytes((log_n, SCRYPT_R, SCRYPT_P)) + salt + nonce
    key = _derive(passphrase, salt, log_n, SCRYPT_R, SCRYPT_P)
    body = head + AESGCM(key).encrypt(nonce, ring.plaintext(), head)
    return armor(ARMOR_NAME, [("Version", "1.0")], body)


def decrypt_keyring(text: str, passphrase: str, filename: str = "keyring") -> Keyring:
    """Open an armored keyring; WrongPassphrase if ``passphrase`` is not it."""
    try:
        block = dearmor(text)
    except ParseError as exc:
        raise KeyringError(f"{filename} is not a keyring ({exc}); move it away to start "
                           "a new one (replies to old reply blocks will be unreadable).") from None
    body = block.body
    if block.type_name != ARMOR_NAME:
        raise KeyringError(f"{filename} holds a {block.type_name}, not a keyring.")
    if body[:8] in OLD_MAGICS:
        raise KeyringError(
            f"{filename} was written by the original Mixminion client ({body[:8].decode()}), "
            "whose format this client does not read. Move it away: a new keyring will be "
            "created, and replies to reply blocks made with the old one cannot be decoded.")
    if body[:8] != MAGIC or len(body) < 8 + 3 + SALT_LEN + NONCE_LEN + 16:
        raise KeyringError(f"{filename} is not in a keyring format this client knows; "
                           "move it away to start a new one.")
    log_n, r, p = body[8], body[9], body[10]
    if not 10 <= log_n <= 22 or not 1 <= r <= 32 or not 1 <= p <= 16:
        raise KeyringError(f"{filename} has unreasonable key-derivation parameters; it is "
                           "damaged or not ours.")
    salt = body[11:11 + SALT_LEN]
    nonce = body[11 + SALT_LEN:11 + SALT_LEN + NONCE_LEN]
    head_len = 11 + SALT_LEN + NONCE_LEN
    key = _derive(passphrase, salt, log_n, r, p)
    try:
        plain = AESGCM(key).decrypt(nonce, body[head_len:], body[:head_len])
    except InvalidTag:
        raise WrongPassphrase(f"The passphrase does not open {filename} (or the file is "
                              "damaged).") from None
    return Keyring.from_plaintext(plain)


def keyring_path(user_dir: str) -> str:
    return os.path.join(user_dir, "keys", "keyring.txt")


def read_keyring_text(user_dir: str) -> Optional[str]:
    try:
        with open(keyring_path(user_dir), "r", encoding="ascii") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyringError(f"cannot read {keyring_path(user_dir)}: {exc}") from None


def write_keyring(user_dir: str, ring: Keyring, passphrase: str, log_n: int = SCRYPT_LOG_N) -> None:
    """Write atomically with mode 0600 in a 0700 folder."""
    from mixminion.fileutil import atomic_write

    folder = os.path.dirname(keyring_path(user_dir))
    os.makedirs(folder, mode=0o700, exist_ok=True)
    os.chmod(folder, 0o700)
    atomic_write(keyring_path(user_dir), encrypt_keyring(ring, passphrase, log_n).encode("ascii"))
    ring.dirty = False
