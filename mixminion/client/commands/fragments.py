"""The client's fragment pool (client.md §2.1, fragments.md §5.4):
``list-fragments``, ``reassemble`` and ``purge-fragments``.

``decode`` puts each fragment it receives in the pool
(:class:`mixminion.client.store.FragmentPool`) and writes a message as soon
as its last needed fragment arrives.  The pool keeps the complete message
too, as the reference client's does, so ``reassemble`` can write it again
(to a file, say) until ``reassemble -P`` or ``purge-fragments`` removes it;
``decode`` drops it after 30 days with the partial messages nobody finished.
A message is named by the first 16 hex digits of its ID, the form
``list-fragments`` shows and ``decode`` logs; any unique prefix will do.
"""

from __future__ import annotations

import argparse

from mixminion.client.commands.common import Command, Context, UserError, only_one, write_file
from mixminion.client.commands.decode import join_messages
from mixminion.client.store import ClientReassembler, FragmentPool, message_id_text
from mixminion.codec.compression import DecompressionLimitExceeded, decompress, reassembled_limit
from mixminion.codec.decode import FORCED_LIMIT
from mixminion.codec.errors import CompressionError
from mixminion.codec.exit import is_printing
from mixminion.codec.textformat import SECONDS_PER_DAY

#: ``list-fragments`` with an empty pool (client.md §2.1)
EMPTY_POOL = "(No fragments being reassembled)"


def find_message(reassembler: ClientReassembler, text: str) -> bytes:
    """The ID of the one message in the pool whose hex digits start with ``text``."""
    wanted = text.strip().lower()
    known = list(reassembler.complete) + list(reassembler.pending)
    matches = [mid for mid in known if wanted and mid.hex().startswith(wanted)]
    return only_one(matches, f"No such message as {text!r} in the fragment pool; "
                    "list-fragments shows the messages there.",
                    f"{text!r} is the start of {len(matches)} message IDs; give more of the "
                    "ID (list-fragments shows them).")


def _named(ctx: Context, pool: FragmentPool) -> list[bytes]:
    """The messages the command line names, each once, in its order."""
    return list(dict.fromkeys(find_message(pool.reassembler, t) for t in ctx.args.messages))


async def cmd_list_fragments(ctx: Context) -> int:
    entries = FragmentPool(ctx.config.user_dir).reassembler.entries()
    if not entries:
        ctx.say(EMPTY_POOL)
    for e in entries:
        ctx.say(f"{message_id_text(e.message_id)}: to {e.nym or '---'}. {e.size} bytes "
                f"({e.have}/{e.need} packets received)")
    return 0


async def cmd_reassemble(ctx: Context) -> int:
    args = ctx.args
    pool = FragmentPool(ctx.config.user_dir)
    reassembler = pool.reassembler
    named = _named(ctx, pool)
    outputs = []
    # every message is checked and decompressed before anything is written
    # or purged: one bad ID leaves output and pool as they were
    for mid in named:
        name = message_id_text(mid)
        complete = reassembler.complete.get(mid)
        if complete is None:
            (entry,) = [e for e in reassembler.entries() if e.message_id == mid]
            raise UserError(f"Message {name} is still missing fragments ({entry.have}/"
                            f"{entry.need} packets received); decode more of them first.")
        limit = FORCED_LIMIT if args.force else reassembled_limit(len(complete.message))
        try:
            outputs.append(decompress(complete.message, limit))
        except DecompressionLimitExceeded:
            raise UserError(f"Message {name} decompresses to far more than its size (a possible "
                            "zlib bomb). Use -F to reassemble it anyway.") from None
        except CompressionError as exc:
            raise UserError(f"Message {name} does not decompress ({exc}).") from None
    joined = join_messages(outputs)
    if args.output == "-":
        isatty = getattr(ctx.stdout, "isatty", lambda: False)()
        if isatty and not args.force and not all(is_printing(m) for m in outputs):
            raise UserError("The message is binary; refusing to write it to a terminal. "
                            "Use -o FILE, or -F to write it anyway.")
        ctx.write(joined)
    else:
        write_file(args.output, joined)
    if args.purge:
        _remove(ctx, pool, named)
    return 0


async def cmd_purge_fragments(ctx: Context) -> int:
    pool = FragmentPool(ctx.config.user_dir)
    _remove(ctx, pool, _named(ctx, pool))
    return 0


def _remove(ctx: Context, pool: FragmentPool, named: list[bytes]) -> None:
    day = int(ctx.now() // SECONDS_PER_DAY)
    for mid in named:
        pool.reassembler.remove(mid, day)
    pool.save()
    ctx.info(f"Removed {len(named)} message(s) from the fragment pool: "
             f"{', '.join(message_id_text(m) for m in named)}.")


def _ids_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("messages", nargs="+", metavar="MSGID",
                   help="message IDs as list-fragments shows them (any unique prefix)")


def _reassemble_options(p: argparse.ArgumentParser) -> None:
    _ids_option(p)
    p.add_argument("-o", "--output", metavar="FILE", default="-",
                   help="where to write ('-' = stdout, the default); several messages are "
                        "separated by '==== message N of M' lines, as decode does")
    p.add_argument("-P", "--purge", action="store_true",
                   help="remove the messages from the pool once written")
    p.add_argument("-F", "--force", action="store_true",
                   help="decompress suspiciously compressible messages and write binary to a terminal")


COMMANDS = (
    Command("list-fragments", "list the fragmented messages being reassembled",
            cmd_list_fragments),
    Command("reassemble", "write fragmented messages that are complete", cmd_reassemble,
            _reassemble_options, locked=True),
    Command("purge-fragments", "remove fragmented messages from the pool", cmd_purge_fragments,
            _ids_option, locked=True),
)
