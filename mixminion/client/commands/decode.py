"""``decode`` (client.md §5.3): received messages -- plain, compressed,
fragments, and replies encrypted to our reply blocks -- back to text.
"""

from __future__ import annotations

import argparse
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
from mixminion.client.store import FragmentPool, private_dir
from mixminion.codec.compression import DecompressionLimitExceeded, decompress, reassembled_limit
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
from mixminion.codec.exit_headers import parse_message
from mixminion.codec.fragments import Outcome
from mixminion.codec.payload import FragmentPayload, parse_payload
from mixminion.codec.textformat import SECONDS_PER_DAY

#: the reassembly pool's identity for fragments that came unencrypted
FORWARD_IDENTITY = "---"


def _render(message: bytes) -> bytes:
    """Exit headers as ``Name: value`` lines, a blank line, then the body."""
    headers, body = parse_message(message)
    if not headers:
        return body
    lines = "".join(f"{k.title()}: {v}\n" for k, v in sorted(headers.items()))
    return lines.encode("ascii") + b"\n" + body


async def cmd_decode(ctx: Context) -> int:
    args = ctx.args
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
    pool: Optional[FragmentPool] = None
    outputs: list[bytes] = []
    failures = 0
    stored = 0
    for m in messages:
        fragment: Optional[FragmentPayload] = None
        identity = FORWARD_IDENTITY
        if m.message_type in (PLAINTEXT, BINARY):
            outputs.append(m.contents)
            continue
        if m.message_type == OVERCOMPRESSED:
            if args.force:
                outputs.append(_decompress(m.contents, FORCED_LIMIT))
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
                outputs.append(_render(_decompress(parsed.compressed, None if not args.force
                                                   else FORCED_LIMIT)))
                continue
            fragment = parsed
        else:  # encrypted: a reply to one of our reply blocks
            if ring is None:
                ring, _ = open_keyring(ctx, create=False)
                if ring is None:
                    raise UserError("This is an encrypted message (a reply), but you have no "
                                    f"keyring ({keyring_mod.keyring_path(ctx.config.user_dir)}): "
                                    "it cannot be decoded here.")
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
                identity = keyring_mod.Keyring.identity_of(decoded.identity) or "default identity"
            if decoded.is_fragment:
                fragment = decoded.payload  # type: ignore[assignment]
            else:
                try:
                    outputs.append(_render(decoded.message(force=args.force)))
                except DecompressionLimitExceeded:
                    ctx.warn("A reply decompresses to far more than its size (a possible zlib "
                             "bomb); skipped. Use -F to decompress it anyway.")
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
            outputs.append(_render(_decompress(result.message, limit)))
            ctx.info(f"Reassembled message {result.message_id.hex()[:16]}.")
        elif result.outcome is Outcome.STORED:
            stored += 1
        elif result.outcome is Outcome.REJECTED:
            ctx.log("ERROR", "A fragment does not match the others of its message; that "
                    "message was discarded.")
            failures += 1
    if pool is not None:
        pool.reassembler.forget_status(day - 30)
        pool.reassembler.expire(day - 30, day)
        pool.save()
    if stored:
        missing = sum(pool.reassembler.missing(mid) for mid in pool.reassembler.pending) if pool else 0
        ctx.info(f"Stored {stored} fragment(s); at least {missing} more needed before the "
                 "message(s) can be reassembled.")
    joined = b"".join(outputs)
    if args.output == "-":
        isatty = getattr(ctx.stdout, "isatty", lambda: False)()
        if joined and isatty and not args.force and not is_printing(joined):
            raise UserError("The decoded message is binary; refusing to write it to a terminal. "
                            "Use -o FILE, or -F to write it anyway.")
        if joined:
            ctx.write(joined)
    else:
        write_file(args.output, joined)
    if failures:
        raise UserError(f"{failures} of {len(messages)} message(s) could not be decoded (see above).")
    return 0


def _decompress(data: bytes, limit: Optional[int]) -> bytes:
    try:
        return decompress(data, limit if limit is not None else reassembled_limit(len(data)))
    except DecompressionLimitExceeded:
        raise UserError("The message decompresses to far more than its size (a possible zlib "
                        "bomb). Use -F to decompress it anyway.") from None
    except CompressionError as exc:
        raise UserError(f"The message does not decompress ({exc}).") from None


def _decode_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-i", "--input", metavar="FILE", default="-",
                   help="received message(s), e.g. a saved e-mail ('-' = stdin, the default)")
    p.add_argument("-o", "--output", metavar="FILE", default="-", help="where to write ('-' = stdout)")
    p.add_argument("-F", "--force", action="store_true",
                   help="decompress suspiciously compressible messages and write binary to a terminal")
    passphrase_option(p)


COMMANDS = (
    Command("decode", "decode received messages (plain, encrypted, replies, fragments)",
            cmd_decode, _decode_options, locked=True),
)
