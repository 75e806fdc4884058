"""``decode`` (client.md §5.3): received messages -- plain, compressed,
fragments, and replies encrypted to our reply blocks -- back to what was sent.

Each message is written as the reference client writes it: a delivered
plaintext or binary block as delivered (the exit already took the exit
headers off), and everything this command decompresses itself (a reply, a
forced overcompressed block, a reassembled fragmented message) as the
whole decompressed message, its header block (``SUBJECT:...`` lines and an
empty line, or just the empty line) included.  The reference simply
concatenates messages; we put a separator line between them, or, with
``--separate``, write each to its own file.  A reply from a nymserver
(doc/nym.md §3) is shown as one (:func:`~.nym.present_reply`).
doc/mixminion-client.1 (decode) documents the format.
"""

from __future__ import annotations

import argparse
import os
import re
from typing import Optional

from mixminion.client import keyring as keyring_mod
from mixminion.client.commands.common import (
    Command,
    Context,
    UserError,
    open_keyring,
    passphrase_option,
    read_input,
    write_file,
)
from mixminion.client.commands.nym import present_reply
from mixminion.client.store import FragmentPool, private_dir
from mixminion.codec.compression import (
    DecompressionLimitExceeded,
    decompress,
    reassembled_limit,
    singleton_limit,
)
from mixminion.codec.decode import FORCED_LIMIT, CorruptPayload, decode_payload
from mixminion.codec.errors import CodecError, CompressionError, ParseError
from mixminion.codec.exit import (
    BINARY,
    FRAGMENT,
    OVERCOMPRESSED,
    PLAINTEXT,
    is_printing,
    parse_text_messages,
)
from mixminion.codec.fragments import Outcome
from mixminion.codec.payload import FragmentPayload, parse_payload
from mixminion.codec.textformat import SECONDS_PER_DAY

#: the reassembly pool's identity for fragments that came unencrypted
FORWARD_IDENTITY = "---"
#: the line between two messages written to one output (N counts from 1)
SEPARATOR = "==== message {index} of {total}\n"
#: ``--separate`` file names: at least four digits, numbered on from the
#: highest such name already in the directory
SEPARATE_NAME = "msg-{:04d}"
_SEPARATE_RE = re.compile(r"msg-([0-9]+)\Z")


async def cmd_decode(ctx: Context) -> int:
    """Decode every armored message in the input, then write them all: the
    pool is saved only after the output, so a failed write loses nothing."""
    args = ctx.args
    if args.separate is not None:
        # Before anything is decoded: fragments taken into the pool must
        # not be lost to a directory we cannot write.
        _prepare_separate_dir(args.separate)
    data = read_input(ctx, args.input)
    try:
        messages = parse_text_messages(data)
    except ParseError as exc:
        raise UserError(f"{args.input}: a message is damaged ({exc}).") from None
    if not messages:
        raise UserError(f"{args.input} holds no '-----BEGIN TYPE III ANONYMOUS MESSAGE-----' "
                        "block; give a received Type III message with -i.")
    now = ctx.now()
    day = int(now // SECONDS_PER_DAY)
    ring: Optional[keyring_mod.Keyring] = None
    keyring_failed = False
    pool: Optional[FragmentPool] = None
    outputs: list[bytes] = []
    failures = 0
    stored = 0
    for m in messages:
        fragment: Optional[FragmentPayload] = None
        identity = FORWARD_IDENTITY
        #: the keyring identity that decoded a reply (a nym's is NAME@DOMAIN)
        reply_identity: Optional[str] = None
        if m.message_type in (PLAINTEXT, BINARY):
            outputs.append(m.contents)
            continue
        if m.message_type == OVERCOMPRESSED:
            if args.force:
                failures += _add(ctx, outputs, m.contents, FORCED_LIMIT)
            else:
                ctx.warn("A message decompresses to far more than its size (a possible zlib "
                         "bomb); writing it still compressed. Use -F to decompress it anyway.")
                outputs.append(m.contents)
            continue
        if m.message_type == FRAGMENT:
            try:
                parsed = parse_payload(m.contents)
            except ParseError as exc:
                ctx.log("ERROR", f"A fragment is damaged ({exc}); skipped.")
                failures += 1
                continue
            if not isinstance(parsed, FragmentPayload):
                failures += _add(ctx, outputs, parsed.compressed, FORCED_LIMIT if args.force
                                 else singleton_limit(len(parsed.compressed)))
                continue
            fragment = parsed
        else:  # encrypted: a reply to one of our reply blocks
            if ring is None and not keyring_failed:
                # Asked once; without it every reply fails, the rest is written.
                try:
                    ring, _ = open_keyring(ctx, create=False)
                except UserError as exc:
                    ctx.log("ERROR", str(exc))
                else:
                    if ring is None:
                        ctx.log("ERROR", "This is an encrypted message (a reply), but you have "
                                "no keyring ("
                                f"{keyring_mod.keyring_path(ctx.config.user_dir)}): it cannot "
                                "be decoded here.")
                keyring_failed = ring is None
            if ring is None:
                failures += 1
                continue
            try:
                decoded = decode_payload(m.contents, m.tag or b"", ring.decoding_keys(now))
            except (CorruptPayload, CodecError) as exc:
                ctx.log("ERROR", f"A message meant for you is damaged ({exc}).")
                failures += 1
                continue
            if decoded is None:
                ctx.log("ERROR", "Unable to decode message: none of your keys opens it (it may "
                        "be for another identity, or your keys have expired).")
                failures += 1
                continue
            if decoded.identity is not None:
                name = reply_identity = keyring_mod.Keyring.identity_of(decoded.identity)
                identity = name or "default identity"
                if name:  # as the reference logs it
                    ctx.info(f"Decoded reply message to identity {name!r}")
            if decoded.is_fragment:
                fragment = decoded.payload  # type: ignore[assignment]
            else:
                try:
                    outputs.append(present_reply(ctx, decoded.message(force=args.force),
                                                 reply_identity, ring))
                except DecompressionLimitExceeded:
                    ctx.log("ERROR", "A reply decompresses to far more than its size (a "
                            "possible zlib bomb); skipped. Use -F to decompress it anyway.")
                    failures += 1
                except CodecError as exc:
                    ctx.log("ERROR", f"A reply is damaged ({exc}).")
                    failures += 1
                continue
        assert fragment is not None
        if pool is None:
            private_dir(ctx.config.user_dir)
            pool = FragmentPool(ctx.config.user_dir)
        result = pool.reassembler.add(fragment, day, identity)
        if result.outcome is Outcome.COMPLETED:
            assert result.message is not None
            limit = FORCED_LIMIT if args.force else reassembled_limit(len(result.message))
            message = _decompress(result.message, limit)
            if identity != FORWARD_IDENTITY:  # through our reply blocks: maybe a nymserver's
                message = present_reply(ctx, message, reply_identity, ring)
            outputs.append(message)
            ctx.info(f"Reassembled message {result.message_id.hex()[:16]}.")
        elif result.outcome is Outcome.STORED:
            stored += 1
        elif result.outcome is Outcome.REJECTED:
            ctx.log("ERROR", "A fragment does not match the others of its message; that "
                    "message was discarded.")
            failures += 1
    # Written before the pool is saved: if writing fails, the fragments that
    # completed a message are still in the pool on disk for another run.
    _deliver(ctx, outputs)
    if pool is not None:
        pool.reassembler.forget_status(day - 30)
        pool.reassembler.expire(day - 30, day)
        pool.save()
    if stored:
        missing = sum(pool.reassembler.missing(mid) for mid in pool.reassembler.pending) if pool else 0
        ctx.info(f"Stored {stored} fragment(s); at least {missing} more needed before the "
                 "message(s) can be reassembled.")
    if failures:
        raise UserError(f"{failures} of {len(messages)} message(s) could not be decoded (see above).")
    return 0


def join_messages(outputs: list[bytes]) -> bytes:
    """One output for several messages: ``SEPARATOR`` before the second
    and later ones, on a line of its own (a newline is added first when the
    message before does not end in one).  One message stays byte-exact."""
    out = bytearray()
    for index, message in enumerate(outputs, 1):
        if index > 1:
            if out and not out.endswith(b"\n"):
                out += b"\n"
            out += SEPARATOR.format(index=index, total=len(outputs)).encode("ascii")
        out += message
    return bytes(out)


def _deliver(ctx: Context, outputs: list[bytes]) -> None:
    """Write the decoded messages where the options say."""
    args = ctx.args
    if args.separate is not None:
        names = write_separate(args.separate, outputs)
        listed = f": {', '.join(names)}" if names else ""
        ctx.info(f"Wrote {len(names)} decoded message(s) to {args.separate}{listed}.")
        return
    joined = join_messages(outputs)
    output = args.output or "-"
    if output == "-":
        isatty = getattr(ctx.stdout, "isatty", lambda: False)()
        if isatty and not args.force and not all(is_printing(m) for m in outputs):
            raise UserError("The decoded message is binary; refusing to write it to a terminal. "
                            "Use -o FILE or --separate DIR, or -F to write it anyway.")
        if joined:
            ctx.write(joined)
    else:
        write_file(output, joined)


def _prepare_separate_dir(path: str) -> None:
    """Create ``path`` (mode 0700) unless it is already a directory."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if not os.path.isdir(path):
            raise UserError(f"--separate {path}: it exists and is not a directory.") from None
        return
    except OSError as exc:
        raise UserError(f"Cannot create the directory {path}: {exc.strerror}.") from None
    os.chmod(path, 0o700)  # exactly, whatever the umask


def write_separate(path: str, outputs: list[bytes]) -> list[str]:
    """Each message in its own new file (mode 0600) in ``path``; the names
    used.  Numbering goes on from the highest ``msg-N`` already there, so
    names sort in arrival order across runs; a taken name is skipped,
    never overwritten."""
    try:
        taken = [int(m.group(1)) for n in os.listdir(path) if (m := _SEPARATE_RE.match(n))]
    except OSError as exc:
        raise UserError(f"Cannot read the directory {path}: {exc.strerror}.") from None
    number = max(taken, default=0) + 1
    names: list[str] = []
    for message in outputs:
        while True:
            name = SEPARATE_NAME.format(number)
            number += 1
            target = os.path.join(path, name)
            try:
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                continue
            except OSError as exc:
                raise UserError(f"Cannot write {target}: {exc.strerror}"
                                f"{_written_so_far(names)}.") from None
            break
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o600)
                f.write(message)
        except OSError as exc:
            raise UserError(f"Cannot write {target}: {exc.strerror}"
                            f"{_written_so_far(names)}.") from None
        names.append(name)
    return names


def _written_so_far(names: list[str]) -> str:
    return f" ({len(names)} message(s) were written before it: {', '.join(names)})" if names else ""


def _add(ctx: Context, outputs: list[bytes], data: bytes, limit: int) -> int:
    """Decompress one block's message into ``outputs``; a bomb or bad data
    is reported and skipped (the others are still written).  Returns the
    number of failures (0 or 1)."""
    try:
        outputs.append(_decompress(data, limit))
    except UserError as exc:
        ctx.log("ERROR", f"{exc} Skipped.")
        return 1
    return 0


def _decompress(data: bytes, limit: int) -> bytes:
    """Decompress what this command itself must open; a bomb or bad data
    stops the run before the pool is saved, so ``-F`` can retry it."""
    try:
        return decompress(data, limit)
    except DecompressionLimitExceeded:
        raise UserError("The message decompresses to far more than its size (a possible zlib "
                        "bomb). Use -F to decompress it anyway.") from None
    except CompressionError as exc:
        raise UserError(f"The message does not decompress ({exc}).") from None


def _decode_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-i", "--input", metavar="FILE", default="-",
                   help="received message(s), e.g. a saved e-mail ('-' = stdin, the default)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("-o", "--output", metavar="FILE", default=None,
                       help="where to write ('-' = stdout, the default); several messages are "
                            "separated by '==== message N of M' lines")
    where.add_argument("--separate", metavar="DIR", default=None,
                       help="write each message to its own new file DIR/msg-NNNN (mode 0600; "
                            "DIR is created, mode 0700, if missing)")
    p.add_argument("-F", "--force", action="store_true",
                   help="decompress suspiciously compressible messages and write binary to a terminal")
    passphrase_option(p)


COMMANDS = (
    Command("decode", "decode received messages (plain, encrypted, replies, fragments)",
            cmd_decode, _decode_options, locked=True),
)
