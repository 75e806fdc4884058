"""Reply blocks (client.md §5.1): ``generate-surb`` and ``inspect-surbs``
(also ``generate-surbs`` and ``inspect-surb``, the reference's other names)."""

from __future__ import annotations

import argparse
import base64
from dataclasses import dataclass
from typing import Any, Optional

from mixminion.client import keyring as keyring_mod
from mixminion.client.commands.common import (
    PROG,
    SURB_MIN_REMAINING,
    Command,
    Context,
    UsageError,
    UserError,
    choose_legs,
    directory_option,
    hops_of,
    load_directory,
    make_selector,
    open_keyring,
    passphrase_option,
    path_text,
    positive,
    read_input,
    write_file,
)
from mixminion.client.paths import (
    Address,
    ExitNeeds,
    PathSelector,
    PathSpec,
    parse_address,
    parse_path,
)
from mixminion.client.store import SurbLog, private_dir
from mixminion.codec.errors import BuildError, ParseError
from mixminion.codec.routing import DROP_TYPE, parse_relay_info
from mixminion.codec.surb import ReplyBlock, build_reply_block, parse_reply_blocks
from mixminion.codec.textformat import SECONDS_PER_DAY, format_time, previous_midnight


@dataclass
class ReplyBlockPlan:
    """Where reply blocks lead and over which servers, checked before any
    is made: ``generate-surb``'s and ``nym``'s (doc/nym.md §6) alike."""

    ctx: Context
    selector: PathSelector
    spec: PathSpec
    needs: ExitNeeds
    #: their expiry: a midnight GMT
    end: int

    def build(self, key: bytes) -> tuple[ReplyBlock, bytes]:
        """One reply block protected by ``key``, and its decoding handle."""
        legs = choose_legs(self.ctx, self.selector, self.spec, "surb", self.needs)
        address = self.needs.address
        try:
            return build_reply_block(hops_of(legs.leg1), address.exit_type, address.address,
                                     key, self.end, self.ctx.rng)
        except BuildError as exc:
            raise UserError(f"Cannot build a reply block for path {legs}: {exc}.") from None


def reply_address(ctx: Context, to: Optional[str], option: str = "-t ADDRESS") -> Address:
    """Where reply blocks lead: ``to``, else ``[Security] SURBAddress``."""
    to = to or ctx.config.surb_address
    if not to:
        raise UsageError(f"{PROG} {ctx.args.command}: no address: give {option} or set "
                         "[Security] SURBAddress")
    address = parse_address(to)
    if address.exit_type == DROP_TYPE:
        raise UserError("A reply block to 'drop' would be useless; give a real address.")
    return address


def surb_lifetime(ctx: Context, days: Optional[int]) -> int:
    """``--lifetime DAYS`` in seconds, else ``[Security] SURBLifetime``."""
    return days * SECONDS_PER_DAY if days else ctx.config.surb_lifetime


def plan_reply_blocks(ctx: Context, directory: Any, address: Address, spec: PathSpec,
                      lifetime: int) -> ReplyBlockPlan:
    """Check that reply blocks to ``address`` along ``spec`` can live
    ``lifetime`` seconds (they expire at the midnight GMT before)."""
    now = ctx.now()
    end = previous_midnight(int(now + lifetime))
    if end <= now + SURB_MIN_REMAINING:
        raise UsageError(f"{PROG} {ctx.args.command}: a lifetime of {lifetime // SECONDS_PER_DAY} "
                         "day(s) ends before the next midnight GMT; use --lifetime 2 or more")
    selector = make_selector(ctx, directory, now, end)
    needs = ExitNeeds(address)
    selector.validate(spec, needs, "surb")
    return ReplyBlockPlan(ctx, selector, spec, needs, end)


async def cmd_generate_surb(ctx: Context) -> int:
    args = ctx.args
    address = reply_address(ctx, args.to)
    spec = parse_path(path_text(ctx, args, ctx.config.surb_path), "surb")
    lifetime = surb_lifetime(ctx, args.lifetime)
    directory = await load_directory(ctx, args.download)
    plan = plan_reply_blocks(ctx, directory, address, spec, lifetime)
    ring, passphrase = open_keyring(ctx, create=True)
    assert ring is not None
    key = ring.surb_key(args.identity, ctx.now())
    if ring.dirty:
        private_dir(ctx.config.user_dir)
        keyring_mod.write_keyring(ctx.config.user_dir, ring, passphrase)
    out = []
    tags = []
    for _ in range(args.count):
        block, tag = plan.build(key)
        out.append(block.pack() if args.binary else block.to_text().encode("ascii"))
        tags.append(tag)
    data = b"".join(out)
    if args.output == "-":
        ctx.write(data)
    else:
        write_file(args.output, data)
        ctx.info(f"Wrote {args.count} reply block(s) to {args.output}, usable until "
                 f"{format_time(plan.end)} GMT.")
    for tag in tags:  # once they are written: each names a block the user has
        ctx.status("GENERATED_SURB", base64.b64encode(tag).decode("ascii"))
    return 0


async def cmd_inspect_surbs(ctx: Context) -> int:
    log = SurbLog(ctx.config.user_dir)
    failed = 0
    for name in ctx.args.files:
        ctx.say(f"==== {name}")
        data = ctx.stdin.read() if name == "-" else read_input(ctx, name)
        try:
            blocks = parse_reply_blocks(data)
        except ParseError as exc:
            ctx.log("ERROR", f"{name}: {exc}")
            failed += 1
            continue
        for b in blocks:
            try:
                hop = parse_relay_info(b.routing_type, b.routing_info)
                first = f"{getattr(hop, 'hostname', getattr(hop, 'ip', '?'))}:{hop.port}"
            except ParseError:
                first = "(unreadable)"
            ctx.say(f"Reply block hash: {b.digest.hex().upper()}")
            ctx.say(f"Expires at: {format_time(b.timestamp)} GMT")
            ctx.say(f"First server is: {first}")
            used = log.is_used(b.digest)
            ctx.say(f"Used: {'yes' if used else 'no'}")
            ctx.status("INSPECT_SURB", b.digest.hex(), str(b.timestamp), "1" if used else "0")
    if failed:
        raise UserError(f"{failed} file(s) held no readable reply block.")
    return 0


def _generate_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-t", "--to", metavar="ADDRESS",
                   help="where replies are delivered (default: SURBAddress from the configuration)")
    p.add_argument("-P", "--path", metavar="PATH",
                   help="path of the reply block, no ':' (default: SURBPath, else ~5)")
    p.add_argument("-H", "--hops", metavar="N", type=positive, help="use N random hops (same as -P '*N')")
    p.add_argument("-n", "--count", metavar="N", type=positive, default=1,
                   help="how many reply blocks to make (default 1)")
    p.add_argument("-b", "--binary", action="store_true", help="write binary instead of armored text")
    p.add_argument("-o", "--output", metavar="FILE", default="-", help="where to write them ('-' = stdout)")
    p.add_argument("--identity", metavar="NAME", default="",
                   help="pseudonym whose key protects the blocks (default: the default identity)")
    p.add_argument("--lifetime", metavar="DAYS", type=positive,
                   help="days the blocks stay usable (default: SURBLifetime, else 7)")
    directory_option(p)
    passphrase_option(p)


def _inspect_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", metavar="FILE", help="files holding reply blocks ('-' = stdin)")


COMMANDS = (
    Command("generate-surb", "create reply blocks (SURBs) others can use to answer you",
            cmd_generate_surb, _generate_options, locked=True),
    Command("inspect-surbs", "describe the reply blocks in files", cmd_inspect_surbs,
            _inspect_options),
)
