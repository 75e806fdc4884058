"""``send`` and ``queue``: build a message's packets (client.md §3).

Forward messages go to an address (``-t``), replies through reply blocks
(``-R``, client.md §5.2); the packets are then queued and/or sent by
:func:`mixminion.client.commands.queue.deliver`.
"""

from __future__ import annotations

import argparse
import functools
from typing import Callable, Optional, Sequence

from mixminion.client.commands.common import (
    PROG,
    SURB_MIN_REMAINING,
    Command,
    Context,
    Progress,
    UsageError,
    UserError,
    choose_legs,
    directory_option,
    hops_of,
    legacy_option,
    load_directory,
    make_selector,
    path_text,
    positive,
    read_input,
)
from mixminion.client.commands.queue import FirstHopPacket, deliver, runs_original_software
from mixminion.client.paths import Address, ExitNeeds, Legs, PathSelector, PathSpec, parse_address, parse_path
from mixminion.client.store import SurbLog
from mixminion.codec.build import (
    BuiltPacket,
    build_forward_packet,
    build_reply_packet,
    encode_message_payloads,
)
from mixminion.codec.errors import BuildError, ParseError
from mixminion.codec.exit_headers import encode_headers
from mixminion.codec.packet import PAYLOAD_LEN
from mixminion.codec.routing import DROP_TYPE, FRAGMENT_TYPE, NextHop
from mixminion.codec.surb import ReplyBlock, parse_reply_blocks
from mixminion.codec.textformat import SECONDS_PER_DAY, previous_midnight


def exit_headers(args: argparse.Namespace) -> dict[str, str]:
    headers = {}
    for key, attr in (("SUBJECT", "subject"), ("FROM", "from_"),
                      ("IN-REPLY-TO", "in_reply_to"), ("REFERENCES", "references")):
        value = getattr(args, attr, None)
        if value is not None:
            headers[key] = value
    try:
        encode_headers(headers)
    except BuildError as exc:
        raise UserError(f"Bad header: {exc}.") from None
    return headers


def load_reply_blocks(ctx: Context, names: Sequence[str], stdin_data: Optional[bytes]) -> list[ReplyBlock]:
    blocks: list[ReplyBlock] = []
    for name in names:
        data = stdin_data if name == "-" else read_input(ctx, name)
        try:
            blocks.extend(parse_reply_blocks(data or b""))
        except ParseError as exc:
            raise UserError(f"{name}: no usable reply block ({exc}).") from None
    return blocks


def choose_reply_blocks(ctx: Context, blocks: list[ReplyBlock], log: SurbLog, needed: int,
                        now: float) -> list[ReplyBlock]:
    usable, used, expired = [], 0, 0
    for b in blocks:
        if log.is_used(b.digest):
            used += 1
        elif b.timestamp < now + SURB_MIN_REMAINING:
            expired += 1
        else:
            usable.append(b)
    if used or expired:
        ctx.warn(f"Skipping {used} used and {expired} expired or soon-expiring reply block(s).")
    if len(usable) < needed:
        raise UserError(f"This message needs {needed} reply block(s) but only {len(usable)} "
                        "unused, unexpired one(s) were given; ask the recipient for more reply "
                        "blocks, or send a shorter message.")
    return usable[:needed]


async def cmd_send(ctx: Context, mode: str) -> int:
    args = ctx.args
    if getattr(args, "queue", False) and getattr(args, "no_queue", False):
        raise UsageError(f"{PROG} send: --queue and --no-queue contradict each other")
    if getattr(args, "queue", False):
        mode = "queue"
    elif getattr(args, "no_queue", False):
        mode = "no-queue"
    if bool(args.to) == bool(args.reply_block):
        raise UsageError(f"{PROG} {args.command}: give exactly one of -t ADDRESS and -R FILE")
    if args.swap_at and args.reply_block:
        raise UsageError(f"{PROG} {args.command}: --swap-at only applies to forward messages")
    headers = exit_headers(args)
    if args.deliver_fragments and headers:
        raise UsageError(f"{PROG} {args.command}: --deliver-fragments cannot carry headers "
                         "(--subject, --from, --in-reply-to, --references)")
    if "-" in args.reply_block and (args.input in (None, "-")):
        raise UsageError(f"{PROG} {args.command}: the message and a reply block cannot both "
                         "come from stdin; use -i FILE")
    address = parse_address(args.to) if args.to else None
    kind = "forward" if address is not None else "reply"
    default = ctx.config.forward_path if kind == "forward" else ctx.config.reply_path
    spec = parse_path(path_text(ctx, args, default), kind)
    if args.swap_at and spec.swap is not None:
        raise UsageError(f"{PROG} {args.command}: --swap-at and ':' in the path both set the "
                         "swap point; use one")
    stdin_blocks = ctx.stdin.read() if "-" in args.reply_block else None

    directory = await load_directory(ctx, args.download)
    now = ctx.now()
    end = previous_midnight(int(now + SECONDS_PER_DAY))
    selector = make_selector(ctx, directory, now, end)

    if address is not None and address.exit_type == DROP_TYPE:
        if args.input is not None:
            raise UsageError(f"{PROG} {args.command}: -t drop sends a dummy packet and takes no -i")
        body = None
    else:
        reply_blocks = load_reply_blocks(ctx, args.reply_block, stdin_blocks) if kind == "reply" else []
        if kind == "reply" and args.input in (None, "-"):
            choose_reply_blocks(ctx, reply_blocks, SurbLog(ctx.config.user_dir), 1, now)
        body = read_input(ctx, args.input or "-", prompt=True)

    items: list[FirstHopPacket] = []
    if kind == "forward":
        assert address is not None
        items = build_forward(ctx, selector, spec, address, body, headers)
    else:
        assert body is not None
        items = build_replies(ctx, selector, spec, reply_blocks, body, headers, now)
    return await deliver(ctx, items, mode)


def build_forward(ctx: Context, selector: PathSelector, spec: PathSpec, address: Address,
                  body: Optional[bytes], headers: dict[str, str]) -> list[FirstHopPacket]:
    args = ctx.args
    if body is None:  # dummy traffic
        needs = ExitNeeds(address)
        selector.validate(spec, needs, "forward")
        legs = choose_legs(ctx, selector, spec, "forward", needs)
        built = build_forward_packet(ctx.rng(PAYLOAD_LEN), hops_of(legs.leg1), hops_of(legs.leg2),
                                     DROP_TYPE, b"", ctx.rng)
        return [_to_first_hop(legs, built.packet)]
    server_side = not args.deliver_fragments
    try:
        if server_side:
            payloads = encode_message_payloads(body, ctx.rng, headers=headers,
                                               exit_type=address.exit_type,
                                               exit_address=address.address)
        else:
            payloads = _raw_payloads(body, ctx.rng)
    except BuildError as exc:
        raise UserError(f"Cannot encode the message: {exc}.") from None
    fragmented = len(payloads) > 1 and server_side
    size = len(encode_headers(headers)) + len(body)
    needs = ExitNeeds(address, size=size, headers=frozenset(headers),
                      fragments=len(payloads) if fragmented else 0)
    selector.validate(spec, needs, "forward")
    fixed_exit = None
    if fragmented:
        fixed_exit = choose_legs(ctx, selector, spec, "forward", needs).leg2[-1]
        ctx.info(f"The message needs {len(payloads)} packets; {fixed_exit.nickname} will "
                 "reassemble it.")
    progress = Progress(ctx, "Building packets", len(payloads))
    items = []
    for payload in payloads:
        legs = choose_legs(ctx, selector, spec, "forward", needs, fixed_exit)
        if fragmented:
            exit_type, exit_address = FRAGMENT_TYPE, b""
        else:
            exit_type, exit_address = address.exit_type, address.address
        try:
            built = build_forward_packet(payload, hops_of(legs.leg1), hops_of(legs.leg2),
                                         exit_type, exit_address, ctx.rng)
        except BuildError as exc:
            raise UserError(f"Cannot build a packet for path {legs}: {exc}.") from None
        items.append(_to_first_hop(legs, built.packet))
        progress.step()
    return items


def _to_first_hop(legs: Legs, packet: bytes) -> FirstHopPacket:
    first = legs.leg1[0]
    assert first.hostname is not None and first.port is not None
    return FirstHopPacket(NextHop(first.hostname, first.port, first.identity_digest),
                          first.nickname, packet, original=runs_original_software(first))


def _raw_payloads(body: bytes, rng: Callable[[int], bytes]) -> list[bytes]:
    """Payloads with no header block at all (``--deliver-fragments``: the
    recipient gets the raw message, which must not start with headers)."""
    from mixminion.codec.compression import compress
    from mixminion.codec.fragments import fragment_message
    from mixminion.codec.payload import max_singleton_size

    compressed = compress(body)
    if len(compressed) <= max_singleton_size(0):
        # one packet: the exit delivers it as an ordinary message
        return encode_message_payloads(body, rng)
    return fragment_message(compressed, rng, 0)


def build_replies(ctx: Context, selector: PathSelector, spec: PathSpec, blocks: list[ReplyBlock],
                  body: bytes, headers: dict[str, str], now: float) -> list[FirstHopPacket]:
    try:
        payloads = encode_message_payloads(body, ctx.rng, headers=headers)
    except BuildError as exc:
        raise UserError(f"Cannot encode the message: {exc}.") from None
    log = SurbLog(ctx.config.user_dir)
    chosen = choose_reply_blocks(ctx, blocks, log, len(payloads), now)
    selector.validate(spec, None, "reply")
    progress = Progress(ctx, "Building packets", len(payloads))
    items = []
    for payload, block in zip(payloads, chosen):
        legs = choose_legs(ctx, selector, spec, "reply", None)
        try:
            built: BuiltPacket = build_reply_packet(payload, hops_of(legs.leg1), block, ctx.rng)
        except BuildError as exc:
            raise UserError(f"Cannot build a reply packet for path {legs}: {exc}.") from None
        log.mark(block.digest, block.timestamp, now)
        items.append(_to_first_hop(legs, built.packet))
        progress.step()
    return items


def _send_options(p: argparse.ArgumentParser, with_queue_flags: bool) -> None:
    p.add_argument("-t", "--to", metavar="ADDRESS",
                   help="recipient: user@domain, smtp:user@domain, mbox:NAME@SERVER, drop "
                        "(dummy traffic), test:DATA or 0xTTTT:DATA")
    p.add_argument("-R", "--reply-block", metavar="FILE", action="append", default=[],
                   help="answer through the reply blocks in FILE instead of -t (repeatable; "
                        "'-' = stdin)")
    p.add_argument("-i", "--input", metavar="FILE", default=None,
                   help="message to send ('-' = stdin, the default)")
    p.add_argument("-P", "--path", metavar="PATH",
                   help="path: servers by nickname or descriptor file, '?' one random server, "
                        "'*N' N random servers, '~N' about N; ':' marks the swap point "
                        "(default: ForwardPath/ReplyPath from the configuration, else ~5)")
    p.add_argument("-H", "--hops", metavar="N", type=positive,
                   help="use N random hops (same as -P '*N')")
    p.add_argument("--swap-at", metavar="N", type=positive,
                   help="end the first leg after hop N (forward messages; not with ':' in -P)")
    directory_option(p)
    p.add_argument("--subject", metavar="TEXT", help="Subject: header for the recipient")
    p.add_argument("--from", metavar="NAME", dest="from_", help="From: name shown to the recipient")
    p.add_argument("--in-reply-to", metavar="ID", help="In-Reply-To: header")
    p.add_argument("--references", metavar="IDS", help="References: header")
    p.add_argument("--deliver-fragments", action="store_true",
                   help="let the recipient reassemble a large message instead of the exit server")
    if with_queue_flags:
        p.add_argument("--queue", action="store_true",
                       help="only queue the packets (like the queue command)")
        p.add_argument("--no-queue", action="store_true",
                       help="never queue: packets whose first hop is down are lost")
        legacy_option(p)


COMMANDS = (
    Command("send", "build a message's packets and send them (queueing those that cannot go now)",
            functools.partial(cmd_send, mode="send"),
            functools.partial(_send_options, with_queue_flags=True), locked=True),
    Command("queue", "build a message's packets and only queue them (send later with flush)",
            functools.partial(cmd_send, mode="queue"),
            functools.partial(_send_options, with_queue_flags=False), locked=True),
)
