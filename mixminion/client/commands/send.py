"""``send`` and ``queue``: build a message's packets (client.md §3);
``count-packets``: say how many there would be.

Forward messages go to an address (``-t``), replies through reply blocks
(``-R``, ``--reply-block-fd``, client.md §5.2); the packets are then queued
and/or sent by :func:`mixminion.client.commands.queue.deliver`.
``count-packets`` shares every step up to building the packets, so its
count is the one ``send`` would build.
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass
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
    fd_number,
    hops_of,
    legacy_option,
    load_directory,
    make_selector,
    path_text,
    positive,
    read_fd,
    read_input,
)
from mixminion.client.commands.queue import FirstHopPacket, deliver, runs_original_software
from mixminion.client.paths import Address, ExitNeeds, Legs, PathSelector, PathSpec, parse_address, parse_path
from mixminion.client.store import SurbLog
from mixminion.codec.build import (
    BuiltPacket,
    build_encrypted_forward_packet,
    build_forward_packet,
    build_reply_packet,
    encode_message_payloads,
)
from mixminion.codec.errors import BuildError, ParseError
from mixminion.codec.exit_headers import encode_headers
from mixminion.codec.packet import PAYLOAD_LEN
from mixminion.codec.routing import DROP_TYPE, FRAGMENT_TYPE, NextHop
from mixminion.codec.rsa import PublicKey
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


def load_reply_blocks(ctx: Context, names: Sequence[str], stdin_data: Optional[bytes],
                      fd_data: Sequence[tuple[int, bytes]] = ()) -> list[ReplyBlock]:
    """The reply blocks of ``-R`` files (``-`` = ``stdin_data``) and of
    ``--reply-block-fd`` descriptors (already read: ``fd_data``)."""
    sources = [(name, stdin_data if name == "-" else read_input(ctx, name)) for name in names]
    sources += [(f"file descriptor {fd}", data) for fd, data in fd_data]
    blocks: list[ReplyBlock] = []
    for name, data in sources:
        try:
            blocks.extend(parse_reply_blocks(data or b""))
        except ParseError as exc:
            raise UserError(f"{name}: no usable reply block ({exc}).") from None
    return blocks


def read_reply_fds(ctx: Context) -> list[tuple[int, bytes]]:
    """What each ``--reply-block-fd`` holds, read before anything slow
    (as ``-R -`` reads standard input)."""
    return [(fd, read_fd(fd, "reply blocks")) for fd in ctx.args.reply_block_fd]


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


def check_message_options(ctx: Context, reply: bool, reply_option: str
                          ) -> tuple[Optional[Address], dict[str, str], PathSpec]:
    """What ``send``, ``queue`` and ``count-packets`` check before reading
    anything (client.md §3.1 steps 1-3, 5-6): the address (None for a
    reply), the exit headers and the path.  ``reply_option`` is how the
    command's usage names its reply option."""
    args = ctx.args
    if bool(args.to) == reply:
        raise UsageError(f"{PROG} {args.command}: give exactly one of -t ADDRESS and {reply_option}")
    headers = exit_headers(args)
    if args.deliver_fragments and headers:
        raise UsageError(f"{PROG} {args.command}: --deliver-fragments cannot carry headers "
                         "(--subject, --from, --in-reply-to, --references)")
    blocks_on_stdin = "-" in getattr(args, "reply_block", ()) or 0 in args.reply_block_fd
    if blocks_on_stdin and args.input in (None, "-"):
        raise UsageError(f"{PROG} {args.command}: the message and a reply block cannot both "
                         "come from stdin; use -i FILE")
    address = parse_address(args.to) if args.to else None
    if address is not None and address.exit_type == DROP_TYPE and args.input is not None:
        raise UsageError(f"{PROG} {args.command}: -t drop sends a dummy packet and takes no -i")
    kind = "forward" if address is not None else "reply"
    default = ctx.config.forward_path if kind == "forward" else ctx.config.reply_path
    return address, headers, parse_path(path_text(ctx, args, default), kind)


def read_message(ctx: Context, address: Optional[Address]) -> Optional[bytes]:
    """The message (client.md §3.1 step 9); None for dummy traffic, which
    reads nothing.  An empty standard input is refused: it is far more
    often a pipe that broke than a message meant to be empty, and the
    reference sends a body-less packet only for ``drop``.  An empty file
    given with ``-i`` is sent: that is deliberate."""
    if address is not None and address.exit_type == DROP_TYPE:
        return None
    name = ctx.args.input or "-"
    body = read_input(ctx, name, prompt=True)
    if not body and name == "-":
        raise UserError("The message on standard input is empty; nothing was sent. To send an "
                        "empty message on purpose, give -i with an empty file.")
    return body


@dataclass(frozen=True)
class Encoded:
    """A message as payloads, one per packet, and what its exit must
    offer: what ``send`` builds packets from and ``count-packets`` counts."""

    payloads: list[bytes]
    #: None for a reply: the reply block carries it to the recipient
    needs: Optional[ExitNeeds]
    #: the exit reassembles the message (server-side fragments)
    fragmented: bool = False


def encode_message(ctx: Context, selector: PathSelector, spec: PathSpec,
                   address: Optional[Address], body: Optional[bytes],
                   headers: dict[str, str]) -> Encoded:
    """Encode the message (client.md §3.1 steps 10-11) and check that the
    path can carry it, before any packet is built."""
    if body is None:  # dummy traffic: one random payload
        assert address is not None
        needs = ExitNeeds(address)
        selector.validate(spec, needs, "forward")
        return Encoded([ctx.rng(PAYLOAD_LEN)], needs)
    server_side = address is not None and not ctx.args.deliver_fragments
    try:
        if address is None:  # a reply: the recipient reassembles any fragments
            payloads = encode_message_payloads(body, ctx.rng, headers=headers)
        elif server_side:
            payloads = encode_message_payloads(body, ctx.rng, headers=headers,
                                               exit_type=address.exit_type,
                                               exit_address=address.address)
        else:
            payloads = _raw_payloads(body, ctx.rng)
    except BuildError as exc:
        raise UserError(f"Cannot encode the message: {exc}.") from None
    if address is None:
        selector.validate(spec, None, "reply")
        return Encoded(payloads, None)
    fragmented = len(payloads) > 1 and server_side
    size = len(encode_headers(headers)) + len(body)
    needs = ExitNeeds(address, size=size, headers=frozenset(headers),
                      fragments=len(payloads) if fragmented else 0)
    selector.validate(spec, needs, "forward")
    return Encoded(payloads, needs, fragmented)


async def cmd_send(ctx: Context, mode: str) -> int:
    args = ctx.args
    if getattr(args, "queue", False) and getattr(args, "no_queue", False):
        raise UsageError(f"{PROG} send: --queue and --no-queue contradict each other")
    if getattr(args, "queue", False):
        mode = "queue"
    elif getattr(args, "no_queue", False):
        mode = "no-queue"
    reply = bool(args.reply_block or args.reply_block_fd)
    if args.swap_at and reply:
        raise UsageError(f"{PROG} {args.command}: --swap-at only applies to forward messages")
    address, headers, spec = check_message_options(ctx, reply, "-R FILE")
    if args.swap_at and spec.swap is not None:
        raise UsageError(f"{PROG} {args.command}: --swap-at and ':' in the path both set the "
                         "swap point; use one")
    stdin_blocks = ctx.stdin.read() if "-" in args.reply_block else None
    fd_blocks = read_reply_fds(ctx)

    directory = await load_directory(ctx, args.download)
    now = ctx.now()
    end = previous_midnight(int(now + SECONDS_PER_DAY))
    selector = make_selector(ctx, directory, now, end)

    reply_blocks: list[ReplyBlock] = []
    if reply:
        reply_blocks = load_reply_blocks(ctx, args.reply_block, stdin_blocks, fd_blocks)
        if args.input in (None, "-"):
            choose_reply_blocks(ctx, reply_blocks, SurbLog(ctx.config.user_dir), 1, now)
    body = read_message(ctx, address)
    encoded = encode_message(ctx, selector, spec, address, body, headers)
    if address is not None:
        items = build_forward(ctx, selector, spec, address, encoded)
    else:
        items = build_replies(ctx, selector, spec, reply_blocks, encoded, now)
    return await deliver(ctx, items, mode)


async def cmd_count_packets(ctx: Context) -> int:
    """Read and encode the message as ``send`` would, checking the path the
    same way, and say how many packets it takes (client.md §2.1)."""
    args = ctx.args
    reply = bool(args.reply or args.reply_block_fd)
    address, headers, spec = check_message_options(ctx, reply, "-R")
    fd_blocks = read_reply_fds(ctx)
    directory = await load_directory(ctx, args.download)
    now = ctx.now()
    selector = make_selector(ctx, directory, now, previous_midnight(int(now + SECONDS_PER_DAY)))
    load_reply_blocks(ctx, [], None, fd_blocks)  # unreadable blocks fail here as in send
    body = read_message(ctx, address)
    count = len(encode_message(ctx, selector, spec, address, body, headers).payloads)
    ctx.say(f"{count} packets needed")
    ctx.status("COUNT_PACKETS", str(count))
    return 0


def build_forward(ctx: Context, selector: PathSelector, spec: PathSpec, address: Address,
                  encoded: Encoded, recipient: Optional[PublicKey] = None) -> list[FirstHopPacket]:
    """The packets of a forward message; with ``recipient``, each payload
    (of overhead 38) is encrypted to that key on its own (packet.md §16),
    as a nym's requests are (doc/nym.md §1)."""
    fixed_exit = None
    if encoded.fragmented:
        fixed_exit = choose_legs(ctx, selector, spec, "forward", encoded.needs).leg2[-1]
        ctx.info(f"The message needs {len(encoded.payloads)} packets; {fixed_exit.nickname} "
                 "will reassemble it.")
    progress = Progress(ctx, "Building packets", len(encoded.payloads))
    items = []
    for payload in encoded.payloads:
        legs = choose_legs(ctx, selector, spec, "forward", encoded.needs, fixed_exit)
        if encoded.fragmented:
            exit_type, exit_address = FRAGMENT_TYPE, b""
        else:
            exit_type, exit_address = address.exit_type, address.address
        try:
            if recipient is not None:
                built = build_encrypted_forward_packet(payload, recipient, hops_of(legs.leg1),
                                                       hops_of(legs.leg2), exit_type,
                                                       exit_address, ctx.rng)
            else:
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
                  encoded: Encoded, now: float) -> list[FirstHopPacket]:
    log = SurbLog(ctx.config.user_dir)
    chosen = choose_reply_blocks(ctx, blocks, log, len(encoded.payloads), now)
    progress = Progress(ctx, "Building packets", len(encoded.payloads))
    items = []
    for payload, block in zip(encoded.payloads, chosen):
        legs = choose_legs(ctx, selector, spec, "reply", None)
        try:
            built: BuiltPacket = build_reply_packet(payload, hops_of(legs.leg1), block, ctx.rng)
        except BuildError as exc:
            raise UserError(f"Cannot build a reply packet for path {legs}: {exc}.") from None
        log.mark(block.digest, block.timestamp, now)
        items.append(_to_first_hop(legs, built.packet))
        progress.step()
    return items


def _message_options(p: argparse.ArgumentParser, reply_flag: bool) -> None:
    """Destination, input and path: ``send``, ``queue``, ``count-packets``."""
    p.add_argument("-t", "--to", metavar="ADDRESS",
                   help="recipient: user@domain, smtp:user@domain, mbox:NAME@SERVER, drop "
                        "(dummy traffic), test:DATA or 0xTTTT:DATA")
    if reply_flag:
        p.add_argument("-R", "--reply", action="store_true",
                       help="the message is a reply, to go through reply blocks instead of to -t")
    else:
        p.add_argument("-R", "--reply-block", metavar="FILE", action="append", default=[],
                       help="answer through the reply blocks in FILE instead of -t (repeatable; "
                            "'-' = stdin)")
    p.add_argument("--reply-block-fd", metavar="N", type=fd_number, action="append", default=[],
                   help="the message is a reply: read reply blocks from file descriptor N "
                        "(checked as send checks them; repeatable)" if reply_flag else
                        "answer through the reply blocks read from file descriptor N, as -R "
                        "FILE does (repeatable; 0 = stdin)")
    p.add_argument("-i", "--input", metavar="FILE", default=None,
                   help="message to send ('-' = stdin, the default; an empty stdin is refused)")
    p.add_argument("-P", "--path", metavar="PATH",
                   help="path: servers by nickname or descriptor file, '?' one random server, "
                        "'*N' N random servers, '~N' about N; ':' marks the swap point "
                        "(default: ForwardPath/ReplyPath from the configuration, else ~5)")
    p.add_argument("-H", "--hops", metavar="N", type=positive,
                   help="use N random hops (same as -P '*N')")


def _encoding_options(p: argparse.ArgumentParser) -> None:
    """Directory, exit headers and fragments: ``send``, ``queue``, ``count-packets``."""
    directory_option(p)
    p.add_argument("--subject", metavar="TEXT", help="Subject: header for the recipient")
    p.add_argument("--from", metavar="NAME", dest="from_", help="From: name shown to the recipient")
    p.add_argument("--in-reply-to", metavar="ID", help="In-Reply-To: header")
    p.add_argument("--references", metavar="IDS", help="References: header")
    p.add_argument("--deliver-fragments", action="store_true",
                   help="let the recipient reassemble a large message instead of the exit server")


def _send_options(p: argparse.ArgumentParser, with_queue_flags: bool) -> None:
    _message_options(p, reply_flag=False)
    p.add_argument("--swap-at", metavar="N", type=positive,
                   help="end the first leg after hop N (forward messages; not with ':' in -P)")
    _encoding_options(p)
    if with_queue_flags:
        p.add_argument("--queue", action="store_true",
                       help="only queue the packets (like the queue command)")
        p.add_argument("--no-queue", action="store_true",
                       help="never queue: packets whose first hop is down are lost")
        legacy_option(p)


def _count_options(p: argparse.ArgumentParser) -> None:
    _message_options(p, reply_flag=True)
    _encoding_options(p)


COMMANDS = (
    Command("send", "build a message's packets and send them (queueing those that cannot go now)",
            functools.partial(cmd_send, mode="send"),
            functools.partial(_send_options, with_queue_flags=True), locked=True),
    Command("queue", "build a message's packets and only queue them (send later with flush)",
            functools.partial(cmd_send, mode="queue"),
            functools.partial(_send_options, with_queue_flags=False), locked=True),
    Command("count-packets", "say how many packets a message needs, without building them",
            cmd_count_packets, _count_options, locked=True),
)
