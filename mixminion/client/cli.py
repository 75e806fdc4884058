"""The ``mixminion-client`` command (client.md §1-§8).

:func:`main` is the console script: it runs :func:`run` under
``task.react``.  :func:`run` takes its streams, environment and reactor as
arguments so the tests can drive every command in-process on trial's
reactor.  Exit codes: 0 success (including "queued for later"), 1 a
failure the message explains, 2 a usage error (one line, from argparse or
our own option checks).
"""

from __future__ import annotations

import argparse
import getpass
import io
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Optional, Sequence, TextIO

from twisted.internet import defer, task
from twisted.logger import LogLevel, formatEvent, globalLogBeginner, globalLogPublisher

from mixminion import __version__
from mixminion.client import keyring as keyring_mod
from mixminion.client.config import ClientConfig, load_client_config
from mixminion.client.paths import (
    Address,
    ExitNeeds,
    Legs,
    PathError,
    PathSelector,
    PathSpec,
    hop_for,
    parse_address,
    parse_path,
)
from mixminion.client.store import ClientLock, ClientQueue, FragmentPool, QueuedPacket, SurbLog, private_dir
from mixminion.codec.build import (
    BuiltPacket,
    build_forward_packet,
    build_reply_packet,
    encode_message_payloads,
)
from mixminion.codec.compression import DecompressionLimitExceeded, decompress, reassembled_limit
from mixminion.codec.decode import FORCED_LIMIT, CorruptPayload, decode_payload
from mixminion.codec.errors import BuildError, CodecError, CompressionError, ParseError
from mixminion.codec.exit import (
    BINARY,
    FRAGMENT,
    OVERCOMPRESSED,
    PLAINTEXT,
    is_printing,
    parse_text_messages,
)
from mixminion.codec.exit_headers import encode_headers, parse_message
from mixminion.codec.fragments import Outcome
from mixminion.codec.packet import PAYLOAD_LEN
from mixminion.codec.payload import FragmentPayload, parse_payload
from mixminion.codec.routing import DROP_TYPE, FRAGMENT_TYPE
from mixminion.codec.surb import ReplyBlock, build_reply_block, parse_reply_blocks
from mixminion.directory.descriptor import ServerDescriptor
from mixminion.codec.textformat import SECONDS_PER_DAY, format_time, previous_midnight
from mixminion.mmtp.initiator import Destination, InitiatorSettings, MMTPClient
from mixminion.mmtp.tls import InitiatorTLS
from mixminion.config.syntax import ConfigError

PROG = "mixminion-client"
PASSPHRASE_ENV = "MIXMINION_PASSPHRASE"
#: show a progress bar from this many packets on (and only on a terminal)
PROGRESS_MIN = 8
#: reply blocks with less life left than this are not used (client.md §5.2)
SURB_MIN_REMAINING = 3 * 3600
NO_AUTHORITY = "0" * 40
FORWARD_IDENTITY = "---"


class UsageError(Exception):
    """Bad command line: exit 2 with this one line."""


class UserError(Exception):
    """A failure the user can act on: exit 1 with this message."""


class _Exit(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


# --- argument parsing ----------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """argparse that reports through exceptions and writes help to our
    stream, so :func:`run` controls every byte and exit code."""

    out: TextIO = sys.stdout

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")

    def exit(self, status: int = 0, message: Optional[str] = None) -> None:  # type: ignore[override]
        if message:
            self.out.write(message)
        raise _Exit(status)

    def _print_message(self, message: str, file: Any = None) -> None:
        if message:
            self.out.write(message)


def _yes_no_force(text: str) -> Optional[bool]:
    value = text.strip().lower()
    if value in ("yes", "y", "1", "true", "t", "force"):
        return True
    if value in ("no", "n", "0", "false", "f"):
        return False
    raise argparse.ArgumentTypeError(f"expected yes or no, not {text!r}")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _fd(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a file descriptor number") from None
    if value < 0:
        raise argparse.ArgumentTypeError("file descriptors are not negative")
    return value


COMMANDS: dict[str, str] = {
    "send": "build a message's packets and send them (queueing those that cannot go now)",
    "queue": "build a message's packets and only queue them (send later with flush)",
    "flush": "try again to send queued packets",
    "inspect-queue": "summarise the packets waiting in the queue",
    "list-servers": "list the servers known from the directory and imported descriptors",
    "update-servers": "download a fresh directory now",
    "import-server": "add server descriptors from files to the local store",
    "generate-surb": "create reply blocks (SURBs) others can use to answer you",
    "inspect-surbs": "describe the reply blocks in files",
    "decode": "decode received messages (plain, encrypted, replies, fragments)",
}


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("general options")
    g.add_argument("-v", "--verbose", action="store_true", help="log everything, including debugging detail")
    g.add_argument("-Q", "--quiet", action="store_true", help="log only errors")
    g.add_argument("-f", "--config", metavar="FILE",
                   help="configuration file (default $MIXMINIONRC, else ~/.mixminionrc)")


def _dir_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("-D", "--download-directory", metavar="yes|no", type=_yes_no_force,
                   dest="download", default=None,
                   help="yes: download a fresh directory first; no: never download "
                        "(default: download when the cached one is from before midnight GMT)")


def _passphrase_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--passphrase-fd", metavar="N", type=_fd,
                   help=f"read the keyring passphrase from file descriptor N (else ${PASSPHRASE_ENV}, "
                        "else ask on the terminal)")


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
    p.add_argument("-H", "--hops", metavar="N", type=_positive,
                   help="use N random hops (same as -P '*N')")
    p.add_argument("--swap-at", metavar="N", type=_positive,
                   help="end the first leg after hop N (forward messages; not with ':' in -P)")
    _dir_option(p)
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


def build_parser(out: TextIO) -> tuple[Parser, dict[str, Parser]]:
    Parser.out = out
    top = Parser(prog=PROG, description="Send and receive Type III (Mixminion) anonymous "
                 "messages.", formatter_class=argparse.RawDescriptionHelpFormatter,
                 epilog="commands:\n" + "".join(f"  {n:<15} {h}\n" for n, h in COMMANDS.items())
                 + f"\nRun '{PROG} COMMAND --help' for a command's options.")
    top.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = top.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    parsers: dict[str, Parser] = {}

    def add(name: str) -> Parser:
        p = sub.add_parser(name, help=COMMANDS[name], description=COMMANDS[name] + ".",
                           prog=f"{PROG} {name}")
        parsers[name] = p
        return p

    p = add("send")
    _send_options(p, True)
    _common(p)
    p = add("queue")
    _send_options(p, False)
    _common(p)
    p = add("flush")
    p.add_argument("servers", nargs="*", metavar="SERVER",
                   help="only packets for these first hops (nickname, host name or address)")
    p.add_argument("-n", "--count", metavar="N", type=_positive,
                   help="send only N randomly chosen packets")
    _common(p)
    p = add("inspect-queue")
    _common(p)
    p = add("list-servers")
    p.add_argument("servers", nargs="*", metavar="NICKNAME", help="only these servers")
    p.add_argument("-r", "--recommended", action="store_true", help="only recommended servers")
    _dir_option(p)
    _common(p)
    p = add("update-servers")
    _common(p)
    p = add("import-server")
    p.add_argument("files", nargs="+", metavar="FILE", help="files holding one descriptor each")
    _common(p)
    p = add("generate-surb")
    p.add_argument("-t", "--to", metavar="ADDRESS",
                   help="where replies are delivered (default: SURBAddress from the configuration)")
    p.add_argument("-P", "--path", metavar="PATH",
                   help="path of the reply block, no ':' (default: SURBPath, else ~5)")
    p.add_argument("-H", "--hops", metavar="N", type=_positive, help="use N random hops (same as -P '*N')")
    p.add_argument("-n", "--count", metavar="N", type=_positive, default=1,
                   help="how many reply blocks to make (default 1)")
    p.add_argument("-b", "--binary", action="store_true", help="write binary instead of armored text")
    p.add_argument("-o", "--output", metavar="FILE", default="-", help="where to write them ('-' = stdout)")
    p.add_argument("--identity", metavar="NAME", default="",
                   help="pseudonym whose key protects the blocks (default: the default identity)")
    p.add_argument("--lifetime", metavar="DAYS", type=_positive,
                   help="days the blocks stay usable (default: SURBLifetime, else 7)")
    _dir_option(p)
    _passphrase_option(p)
    _common(p)
    p = add("inspect-surbs")
    p.add_argument("files", nargs="+", metavar="FILE", help="files holding reply blocks ('-' = stdin)")
    _common(p)
    p = add("decode")
    p.add_argument("-i", "--input", metavar="FILE", default="-",
                   help="received message(s), e.g. a saved e-mail ('-' = stdin, the default)")
    p.add_argument("-o", "--output", metavar="FILE", default="-", help="where to write ('-' = stdout)")
    p.add_argument("-F", "--force", action="store_true",
                   help="decompress suspiciously compressible messages and write binary to a terminal")
    _passphrase_option(p)
    _common(p)
    return top, parsers


# --- the run context ---------------------------------------------------------------------


@dataclass
class Context:
    stdin: BinaryIO
    stdout: BinaryIO
    stderr: TextIO
    environ: dict[str, str]
    reactor: Any
    args: argparse.Namespace
    config: ClientConfig = field(default_factory=ClientConfig)
    rng: Callable[[int], bytes] = os.urandom
    random: random.Random = field(default_factory=random.SystemRandom)
    directory_factory: Optional[Callable[["Context"], Any]] = None
    mmtp_client: Optional[Callable[["Context"], MMTPClient]] = None

    @property
    def quiet(self) -> bool:
        return bool(getattr(self.args, "quiet", False))

    @property
    def verbose(self) -> bool:
        return bool(getattr(self.args, "verbose", False))

    def now(self) -> float:
        return float(self.reactor.seconds())

    def log(self, level: str, message: str) -> None:
        if self.quiet and level != "ERROR":
            return
        if level == "DEBUG" and not self.verbose:
            return
        stamp = time.strftime("%b %d %H:%M:%S", time.localtime())
        self.stderr.write(f"{stamp} [{level}] {message}\n")
        self.stderr.flush()

    def info(self, message: str) -> None:
        self.log("INFO", message)

    def warn(self, message: str) -> None:
        self.log("WARN", message)

    def write(self, data: bytes) -> None:
        self.stdout.write(data)
        self.stdout.flush()

    def say(self, text: str) -> None:
        self.write((text + "\n").encode("utf-8"))


class Progress:
    """``Building packets: 12/40`` on stderr, redrawn in place; only when
    there are many packets and stderr is a terminal (it is noise in logs)."""

    def __init__(self, ctx: Context, what: str, total: int) -> None:
        isatty = getattr(ctx.stderr, "isatty", lambda: False)
        self.on = total >= PROGRESS_MIN and not ctx.quiet and isatty()
        self.ctx, self.what, self.total, self.done = ctx, what, total, 0

    def step(self, n: int = 1) -> None:
        self.done += n
        if self.on:
            width = 30
            filled = width * self.done // max(self.total, 1)
            self.ctx.stderr.write(f"\r{self.what}: [{'#' * filled}{'.' * (width - filled)}] "
                                  f"{self.done}/{self.total}")
            if self.done >= self.total:
                self.ctx.stderr.write("\n")
            self.ctx.stderr.flush()


# --- shared steps -------------------------------------------------------------------------


def _default_directory(ctx: Context) -> Any:
    from mixminion.client.directory import ClientDirectory

    config = ctx.config
    authorities = [(a.url, a.fingerprint) for a in config.authorities]
    trusted: Optional[dict[str, Any]] = None
    if not authorities:
        # No anchors: no downloaded directory can verify; imports still work.
        trusted = {NO_AUTHORITY: None}  # type: ignore[dict-item]
    if trusted is None and config.threshold > len(authorities):
        raise UserError(f"{config.filename}: Threshold {config.threshold} is more than the "
                        f"{len(authorities)} Authority lines; lower it or add authorities.")
    return ClientDirectory(config.user_dir, authorities, trusted, config.threshold,
                           ctx.reactor, reactor=ctx.reactor, timeout=config.directory_timeout,
                           environ=ctx.environ)


async def load_directory(ctx: Context, download: Optional[bool]) -> Any:
    """The client directory, refreshed per ``-D`` and the daily rule."""
    from mixminion.client.directory import ClientDirectoryError

    directory = (ctx.directory_factory or _default_directory)(ctx)
    directory.load()
    if download is False:
        return directory
    if not ctx.config.authorities:
        if download:
            raise UserError("No directory authorities are configured, so no directory can be "
                            "downloaded. Add '[DirectoryServers] Authority: URL FINGERPRINT' "
                            f"lines to {ctx.config.filename}.")
        return directory
    try:
        result = await directory.update(force=bool(download))
    except ClientDirectoryError as exc:
        if directory.directory is None and not directory.imported:
            raise UserError(str(exc)) from None
        ctx.warn(f"{exc}\nContinuing with the servers already known.")
        return directory
    for warning in result.warnings:
        ctx.warn(warning)
    if result.downloaded:
        ctx.info(f"Directory updated from {result.url}.")
    advice = directory.version_advice()
    if advice:
        ctx.warn(advice)
    return directory


def make_selector(ctx: Context, directory: Any, start: float, end: float) -> PathSelector:
    def lookup(name: str) -> ServerDescriptor:
        return directory.lookup(name, start, end - start)

    return PathSelector(directory.recommended(start), lookup, start, end,
                        ctx.config.block_servers, ctx.config.block_entries,
                        ctx.config.block_exits, rng=ctx.random, warn=ctx.warn)


def path_text(ctx: Context, args: argparse.Namespace, default: str) -> str:
    if args.path and args.hops:
        raise UsageError(f"{PROG} {args.command}: give -P or -H, not both")
    if args.hops:
        return f"*{args.hops}"
    return args.path or default


def read_input(ctx: Context, name: str, prompt: bool = False) -> bytes:
    if name == "-":
        if prompt and getattr(ctx.stdin, "isatty", lambda: False)():
            ctx.stderr.write("Enter your message. Type Ctrl-D when you are done.\n")
        return ctx.stdin.read()
    try:
        with open(name, "rb") as f:
            return f.read()
    except OSError as exc:
        raise UserError(f"Cannot read {name}: {exc.strerror}.") from None


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


def destination_of(d: ServerDescriptor) -> Destination:
    assert d.hostname is not None and d.port is not None
    return Destination(d.hostname, d.port, d.identity_digest)


# --- sending and queueing -------------------------------------------------------------------


@dataclass
class Outgoing:
    destination: Destination
    nickname: str
    packet: bytes
    handle: Optional[str] = None


def _client(ctx: Context) -> MMTPClient:
    if ctx.mmtp_client is not None:
        return ctx.mmtp_client(ctx)
    t = float(ctx.config.timeout)
    return MMTPClient(ctx.reactor, InitiatorTLS(),
                      InitiatorSettings(connect_timeout=t, handshake_timeout=t, idle_timeout=t,
                                        close_timeout=min(t, 10.0)))


async def transmit(ctx: Context, items: Sequence[Outgoing], queue: Optional[ClientQueue]
                   ) -> tuple[int, dict[str, str]]:
    """Send ``items`` grouped by first hop, groups and packets shuffled.

    Acknowledged packets leave ``queue`` (if they were in it).  Returns the
    number delivered and, per first hop that failed, why.
    """
    groups: dict[Destination, list[Outgoing]] = {}
    for item in items:
        groups.setdefault(item.destination, []).append(item)
    order = list(groups)
    ctx.random.shuffle(order)
    client = _client(ctx)
    progress = Progress(ctx, "Sending packets", len(items))
    failures: dict[str, str] = {}
    delivered = 0
    try:
        pending = []
        for dest in order:
            group = groups[dest]
            ctx.random.shuffle(group)
            for item in group:
                d = client.send_packet(dest, item.packet)
                pending.append((item, d))
        for item, d in pending:
            try:
                await d
            except Exception as exc:  # noqa: BLE001 - any failure leaves it queued
                failures.setdefault(item.nickname, str(exc))
            else:
                delivered += 1
                if queue is not None and item.handle is not None:
                    queue.remove(item.handle)
            progress.step()
    finally:
        await client.close()
    return delivered, failures


async def deliver(ctx: Context, items: list[Outgoing], mode: str) -> int:
    """``mode``: ``queue`` (only queue), ``send`` (queue, then send) or
    ``no-queue`` (send, losing failures)."""
    queue = ClientQueue(ctx.config.user_dir)
    if mode in ("queue", "send"):
        for item in items:
            item.handle = queue.add(item.destination, item.nickname, item.packet, ctx.now())
    if mode == "queue":
        ctx.say(f"Queued {len(items)} packet(s); run '{PROG} flush' to send them.")
        return 0
    delivered, failures = await transmit(ctx, items, queue if mode == "send" else None)
    failed = len(items) - delivered
    for nickname, why in failures.items():
        ctx.warn(f"Could not deliver to {nickname}: {why}")
    if not failed:
        ctx.say(f"Sent {delivered} packet(s).")
        return 0
    if mode == "send":
        ctx.say(f"Sent {delivered} packet(s); {failed} could not be sent now and were queued. "
                f"Run '{PROG} flush' later to send them.")
        return 0
    raise UserError(f"{failed} of {len(items)} packet(s) could not be sent and were lost "
                    "(--no-queue). Send the message again when the first hop is up.")


# --- send / queue --------------------------------------------------------------------------


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

    items: list[Outgoing] = []
    if kind == "forward":
        assert address is not None
        items = build_forward(ctx, selector, spec, address, body, headers)
    else:
        assert body is not None
        items = build_replies(ctx, selector, spec, reply_blocks, body, headers, now)
    return await deliver(ctx, items, mode)


def build_forward(ctx: Context, selector: PathSelector, spec: PathSpec, address: Address,
                  body: Optional[bytes], headers: dict[str, str]) -> list[Outgoing]:
    args = ctx.args
    if body is None:  # dummy traffic
        needs = ExitNeeds(address)
        selector.validate(spec, needs, "forward")
        legs = _choose(ctx, selector, spec, "forward", needs)
        built = build_forward_packet(ctx.rng(PAYLOAD_LEN), _hops(legs.leg1), _hops(legs.leg2),
                                     DROP_TYPE, b"", ctx.rng)
        return [Outgoing(destination_of(legs.leg1[0]), legs.leg1[0].nickname, built.packet)]
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
        fixed_exit = _choose(ctx, selector, spec, "forward", needs).leg2[-1]
        ctx.info(f"The message needs {len(payloads)} packets; {fixed_exit.nickname} will "
                 "reassemble it.")
    progress = Progress(ctx, "Building packets", len(payloads))
    items = []
    for payload in payloads:
        legs = _choose(ctx, selector, spec, "forward", needs, fixed_exit)
        if fragmented:
            exit_type, exit_address = FRAGMENT_TYPE, b""
        else:
            exit_type, exit_address = address.exit_type, address.address
        try:
            built = build_forward_packet(payload, _hops(legs.leg1), _hops(legs.leg2),
                                         exit_type, exit_address, ctx.rng)
        except BuildError as exc:
            raise UserError(f"Cannot build a packet for path {legs}: {exc}.") from None
        items.append(Outgoing(destination_of(legs.leg1[0]), legs.leg1[0].nickname, built.packet))
        progress.step()
    return items


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
                  body: bytes, headers: dict[str, str], now: float) -> list[Outgoing]:
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
        legs = _choose(ctx, selector, spec, "reply", None)
        try:
            built: BuiltPacket = build_reply_packet(payload, _hops(legs.leg1), block, ctx.rng)
        except BuildError as exc:
            raise UserError(f"Cannot build a reply packet for path {legs}: {exc}.") from None
        log.mark(block.digest, block.timestamp, now)
        items.append(Outgoing(destination_of(legs.leg1[0]), legs.leg1[0].nickname, built.packet))
        progress.step()
    return items


def _hops(descriptors: Sequence[ServerDescriptor]) -> list:
    return [hop_for(d) for d in descriptors]


def _choose(ctx: Context, selector: PathSelector, spec: PathSpec, kind: str,
            needs: Optional[ExitNeeds], fixed_exit: Optional[ServerDescriptor] = None) -> Legs:
    legs = selector.choose(spec, kind, needs, fixed_exit, swap_at=getattr(ctx.args, "swap_at", None))
    ctx.log("DEBUG", f"Selected path is {legs}")
    return legs


# --- queue commands -------------------------------------------------------------------------


def _matches(item: QueuedPacket, name: str, directory: Optional[Any], now: float) -> bool:
    lowered = name.lower()
    if lowered in (item.nickname.lower(), item.destination.host.lower(),
                   item.destination.keyid.hex().lower()):
        return True
    if directory is not None:
        try:
            d = directory.lookup(name, now)
        except Exception:  # noqa: BLE001 - unknown names simply do not match
            return False
        return d.identity_digest == item.destination.keyid
    return False


async def cmd_flush(ctx: Context) -> int:
    args = ctx.args
    queue = ClientQueue(ctx.config.user_dir)
    queued = list(queue.packets(ctx.warn))
    if args.servers:
        directory = None
        try:
            directory = (ctx.directory_factory or _default_directory)(ctx)
            directory.load()
        except Exception:  # noqa: BLE001 - names can still match host or KeyID
            directory = None
        selected: list[QueuedPacket] = []
        for name in args.servers:
            mine = [q for q in queued if _matches(q, name, directory, ctx.now())]
            if not mine:
                ctx.warn(f"No queued packets for {name}.")
            selected.extend(q for q in mine if q not in selected)
        queued = selected
    if args.count and args.count < len(queued):
        queued = ctx.random.sample(queued, args.count)
    if not queued:
        ctx.say("No packets to flush.")
        return 0
    items = [Outgoing(q.destination, q.nickname, q.packet, q.handle) for q in queued]
    delivered, failures = await transmit(ctx, items, queue)
    for nickname, why in failures.items():
        ctx.warn(f"Could not deliver to {nickname}: {why}")
    if delivered == len(items):
        ctx.say(f"Queue flushed: {delivered} packet(s) sent.")
        return 0
    if delivered:
        ctx.say(f"Queue partially flushed: {delivered} sent, {len(items) - delivered} still queued.")
        return 0
    raise UserError(f"No packets delivered; {len(items)} remain queued. Try again later.")


async def cmd_inspect_queue(ctx: Context) -> int:
    queued = list(ClientQueue(ctx.config.user_dir).packets(ctx.warn))
    if not queued:
        ctx.say("(No packets in queue)")
        return 0
    by_server: dict[str, list[QueuedPacket]] = {}
    for q in queued:
        by_server.setdefault(q.nickname, []).append(q)
    now = ctx.now()
    for name in sorted(by_server, key=str.lower):
        oldest = min(q.inserted for q in by_server[name])
        days = int((now - oldest) // SECONDS_PER_DAY)
        ctx.say(f"{len(by_server[name]):2d} packets for {name} (oldest is "
                f"{days if days >= 1 else '<1'} days old)")
    return 0


# --- directory commands ---------------------------------------------------------------------


async def cmd_list_servers(ctx: Context) -> int:
    args = ctx.args
    directory = await load_directory(ctx, args.download)
    now = ctx.now()
    descriptors = directory.recommended(now) if args.recommended else directory.all_descriptors()
    by_name: dict[str, list[ServerDescriptor]] = {}
    for d in descriptors:
        by_name.setdefault(d.nickname.lower(), []).append(d)
    wanted = [n.lower() for n in args.servers]
    for name in wanted:
        if name not in by_name:
            raise UserError(f"No descriptors known for {name}; check the spelling, or run "
                            "update-servers.")
    if not by_name:
        ctx.say("(No servers known: run update-servers or import-server)")
        return 0
    cfg = ctx.config
    for key in sorted(by_name):
        if wanted and key not in wanted:
            continue
        ds = by_name[key]
        caps = " / ".join(dict.fromkeys(d.caps for d in ds))
        status = []
        if not directory.is_recommended(ds[0].nickname):
            status.append("not recommended")
        if key in cfg.block_servers:
            status.append("blocked")
        if key in cfg.block_entries:
            status.append("blocked as entry")
        if key in cfg.block_exits:
            status.append("blocked as exit")
        if not any(d.is_valid_at(now) for d in ds):
            status.append("expired")
        line = f"{ds[0].nickname}:{caps}"
        if not args.recommended:
            line += "\t(" + (", ".join(status) if status else "ok") + ")"
        ctx.say(line)
    return 0


async def cmd_update_servers(ctx: Context) -> int:
    await load_directory(ctx, True)
    ctx.say("Directory updated")
    return 0


async def cmd_import_server(ctx: Context) -> int:
    from mixminion.client.directory import ClientDirectoryError

    directory = (ctx.directory_factory or _default_directory)(ctx)
    directory.load()
    failed = 0
    for name in ctx.args.files:
        try:
            d = directory.import_server(name, ctx.now())
        except ClientDirectoryError as exc:
            failed += 1
            ctx.log("ERROR", str(exc))
        else:
            ctx.say(f"Imported {d.nickname} ({name}).")
    if failed:
        raise UserError(f"{failed} of {len(ctx.args.files)} descriptor(s) were not imported "
                        "(reasons above).")
    ctx.say("Done.")
    return 0


# --- reply blocks ---------------------------------------------------------------------------


def read_passphrase(ctx: Context, prompt: str, confirm: bool = False) -> str:
    fd = getattr(ctx.args, "passphrase_fd", None)
    if fd is not None:
        chunks = []
        while True:
            try:
                chunk = os.read(fd, 4096)
            except OSError as exc:
                raise UserError(f"Cannot read the passphrase from file descriptor {fd}: "
                                f"{exc.strerror}.") from None
            if not chunk:
                break
            chunks.append(chunk)
        text = b"".join(chunks).decode("utf-8", "replace")
        return text[:-1] if text.endswith("\n") else text
    if PASSPHRASE_ENV in ctx.environ:
        return ctx.environ[PASSPHRASE_ENV]
    try:
        tty = open("/dev/tty", "r+")
    except OSError:
        raise UserError("The keyring needs a passphrase but there is no terminal to ask on: "
                        f"use --passphrase-fd N or set {PASSPHRASE_ENV}.") from None
    with tty:
        first = getpass.getpass(prompt, stream=tty)
        if confirm and getpass.getpass("Again, to confirm: ", stream=tty) != first:
            raise UserError("The two passphrases differ; nothing was changed.")
    return first


def open_keyring(ctx: Context, create: bool) -> tuple[Optional[keyring_mod.Keyring], str]:
    """The keyring and its passphrase; a new one when there is none and
    ``create`` (else ``(None, "")``)."""
    user_dir = ctx.config.user_dir
    text = keyring_mod.read_keyring_text(user_dir)
    if text is None:
        if not create:
            return None, ""
        ctx.info(f"Creating a new keyring in {keyring_mod.keyring_path(user_dir)}.")
        passphrase = read_passphrase(ctx, "New passphrase for your keyring: ", confirm=True)
        if not passphrase:
            ctx.warn(f"The new keyring has an empty passphrase: anyone who can read "
                     f"{keyring_mod.keyring_path(user_dir)} can decode replies to your reply "
                     "blocks.")
        return keyring_mod.Keyring(dirty=True), passphrase
    path = keyring_mod.keyring_path(user_dir)
    try:
        return keyring_mod.decrypt_keyring(text, "", path), ""
    except keyring_mod.WrongPassphrase:
        pass
    except keyring_mod.KeyringError as exc:
        raise UserError(str(exc)) from None
    passphrase = read_passphrase(ctx, "Passphrase for your keyring: ")
    try:
        return keyring_mod.decrypt_keyring(text, passphrase, path), passphrase
    except keyring_mod.KeyringError as exc:
        raise UserError(f"{exc} Check the passphrase and try again.") from None


async def cmd_generate_surb(ctx: Context) -> int:
    args = ctx.args
    to = args.to or ctx.config.surb_address
    if not to:
        raise UsageError(f"{PROG} generate-surb: no address: give -t ADDRESS or set "
                         "[Security] SURBAddress")
    address = parse_address(to)
    if address.exit_type == DROP_TYPE:
        raise UserError("A reply block to 'drop' would be useless; give a real address.")
    spec = parse_path(path_text(ctx, args, ctx.config.surb_path), "surb")
    lifetime = args.lifetime * SECONDS_PER_DAY if args.lifetime else ctx.config.surb_lifetime
    directory = await load_directory(ctx, args.download)
    now = ctx.now()
    end = previous_midnight(int(now + lifetime))
    if end <= now + SURB_MIN_REMAINING:
        raise UsageError(f"{PROG} generate-surb: a lifetime of {lifetime // SECONDS_PER_DAY} "
                         "day(s) ends before the next midnight GMT; use --lifetime 2 or more")
    selector = make_selector(ctx, directory, now, end)
    needs = ExitNeeds(address)
    selector.validate(spec, needs, "surb")
    ring, passphrase = open_keyring(ctx, create=True)
    assert ring is not None
    key = ring.surb_key(args.identity, now)
    if ring.dirty:
        private_dir(ctx.config.user_dir)
        keyring_mod.write_keyring(ctx.config.user_dir, ring, passphrase)
    out = []
    for _ in range(args.count):
        legs = _choose(ctx, selector, spec, "surb", needs)
        try:
            block, _seed = build_reply_block(_hops(legs.leg1), address.exit_type,
                                             address.address, key, end, ctx.rng)
        except BuildError as exc:
            raise UserError(f"Cannot build a reply block for path {legs}: {exc}.") from None
        out.append(block.pack() if args.binary else block.to_text().encode("ascii"))
    data = b"".join(out)
    if args.output == "-":
        ctx.write(data)
    else:
        _write_file(args.output, data)
        ctx.info(f"Wrote {args.count} reply block(s) to {args.output}, usable until "
                 f"{format_time(end)} GMT.")
    return 0


def _write_file(name: str, data: bytes) -> None:
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except OSError as exc:
        raise UserError(f"Cannot write {name}: {exc.strerror}.") from None


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
                from mixminion.codec.routing import parse_relay_info
                hop = parse_relay_info(b.routing_type, b.routing_info)
                first = f"{getattr(hop, 'hostname', getattr(hop, 'ip', '?'))}:{hop.port}"
            except ParseError:
                first = "(unreadable)"
            ctx.say(f"Reply block hash: {b.digest.hex().upper()}")
            ctx.say(f"Expires at: {format_time(b.timestamp)} GMT")
            ctx.say(f"First server is: {first}")
            ctx.say(f"Used: {'yes' if log.is_used(b.digest) else 'no'}")
    if failed:
        raise UserError(f"{failed} file(s) held no readable reply block.")
    return 0


# --- decode -------------------------------------------------------------------------------


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
        _write_file(args.output, joined)
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


# --- entry points ------------------------------------------------------------------------------


HANDLERS: dict[str, Callable[[Context], Any]] = {
    "send": lambda ctx: cmd_send(ctx, "send"),
    "queue": lambda ctx: cmd_send(ctx, "queue"),
    "flush": cmd_flush,
    "inspect-queue": cmd_inspect_queue,
    "list-servers": cmd_list_servers,
    "update-servers": cmd_update_servers,
    "import-server": cmd_import_server,
    "generate-surb": cmd_generate_surb,
    "inspect-surbs": cmd_inspect_surbs,
    "decode": cmd_decode,
}
#: commands that touch the queue, the directory cache or the SURB log
LOCKED = {"send", "queue", "flush", "list-servers", "update-servers", "import-server",
          "generate-surb", "decode"}


def _forward_twisted_logs(ctx: Context) -> Callable[[dict], None]:
    """Show the directory and MMTP code's warnings (and info with -v)."""

    def observer(event: dict) -> None:
        level = event.get("log_level")
        if not str(event.get("log_namespace", "")).startswith("mixminion"):
            return
        if level in (LogLevel.warn, LogLevel.error, LogLevel.critical):
            ctx.log("WARN" if level == LogLevel.warn else "ERROR", formatEvent(event))
        elif ctx.verbose:
            ctx.log("DEBUG", formatEvent(event))

    return observer


async def run(argv: Sequence[str], *, stdin: Optional[BinaryIO] = None,
              stdout: Optional[BinaryIO] = None, stderr: Optional[TextIO] = None,
              environ: Optional[dict[str, str]] = None, reactor: Any = None,
              **hooks: Any) -> int:
    """Run one command; returns the exit status (never raises for user errors)."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor
        reactor = global_reactor
    stdin = stdin if stdin is not None else sys.stdin.buffer
    stdout = stdout if stdout is not None else sys.stdout.buffer
    stderr = stderr if stderr is not None else sys.stderr
    environ = dict(os.environ if environ is None else environ)
    help_out = io.TextIOWrapper(stdout, encoding="utf-8", write_through=True) \
        if not isinstance(stdout, io.TextIOBase) else stdout
    top, _ = build_parser(help_out)  # type: ignore[arg-type]
    try:
        args = top.parse_args(list(argv))
        if not args.command:
            raise UsageError(f"{PROG}: no command given (commands: {', '.join(COMMANDS)}; "
                             f"see '{PROG} --help')")
        if args.verbose and args.quiet:
            raise UsageError(f"{PROG} {args.command}: -v and -Q contradict each other")
    except UsageError as exc:
        stderr.write(f"{exc}\n")
        return 2
    except _Exit as exc:
        help_out.flush()
        return exc.status
    finally:
        help_out.flush()
        if help_out is not stdout:
            help_out.detach()
    ctx = Context(stdin, stdout, stderr, environ, reactor, args, **hooks)
    observer = _forward_twisted_logs(ctx)
    globalLogPublisher.addObserver(observer)  # type: ignore[arg-type]
    lock: Optional[ClientLock] = None
    # Notices from loading the configuration (e.g. "wrote a default
    # ~/.mixminionrc") are held back until the command's arguments have
    # been accepted, so a usage error is always exactly one line.
    notices: list[str] = []
    try:
        ctx.config = load_client_config(args.config, environ, notices.append)
        if args.command in LOCKED:
            private_dir(ctx.config.user_dir)
            lock = ClientLock(ctx.config.user_dir)
            lock.acquire(ctx.info)
        for warning in ctx.config.warnings:
            ctx.warn(warning)
        status = await HANDLERS[args.command](ctx)
        _flush_notices(ctx, notices)
        return status
    except UsageError as exc:
        stderr.write(f"{exc}\n")
        return 2
    except (UserError, PathError, ConfigError, keyring_mod.KeyringError) as exc:
        _flush_notices(ctx, notices)
        ctx.log("ERROR", str(exc))
        return 1
    except OSError as exc:
        _flush_notices(ctx, notices)
        ctx.log("ERROR", f"{exc}")
        return 1
    finally:
        if lock is not None:
            lock.release()
        globalLogPublisher.removeObserver(observer)  # type: ignore[arg-type]


def _flush_notices(ctx: Context, notices: list[str]) -> None:
    for notice in notices:
        ctx.info(notice)
    notices.clear()


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console script: run the command under the reactor and exit with its status."""
    globalLogBeginner.beginLoggingTo([], redirectStandardIO=False, discardBuffer=True)
    arguments = list(sys.argv[1:] if argv is None else argv)

    async def body(reactor: Any) -> None:
        try:
            status = await run(arguments, reactor=reactor)
        except KeyboardInterrupt:
            sys.stderr.write("Interrupted.\n")
            status = 1
        if status:
            raise SystemExit(status)

    task.react(lambda reactor: defer.ensureDeferred(body(reactor)))


if __name__ == "__main__":  # pragma: no cover
    main()
