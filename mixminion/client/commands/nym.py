"""``nym``: the owner's side of nyms (doc/nym.md §6).

``nym create|add-surbs|send|config|status|delete`` each send one request
(doc/nym.md §2) to the nym's nymserver; ``nym list`` only reads the
keyring.  ``decode`` shows what a nymserver sends back through the nym's
reply blocks with :func:`present_reply`.

A request is the body of an encrypted-forward message (packet.md §16):
encoded as any message is (an empty exit header block, then the request,
compressed; fragmented when it does not fit one packet), each payload
encrypted on its own to the nym key of the nymserver's descriptor
(``[Delivery/Nym] Key``), exit type ``NYM_TYPE`` with an empty address, on
a forward path whose last hop is the nymserver's node.  The packets then
leave as ``send``'s do (:func:`~mixminion.client.commands.queue.deliver`).

The nym's Ed25519 key, its counter and its nymserver live in the keyring
(:class:`~mixminion.client.keyring.NymEntry`).  Its reply blocks are made
as ``generate-surb`` makes them, under the keyring identity
``NAME@DOMAIN``, so that ``decode`` knows which nym a reply is for.  The
counter a request uses is written to the keyring after its packets are
built and before any of them is queued or sent: a crash may skip a
counter, never reuse one.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from email.header import Header
from typing import Any, Optional

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mixminion.client import keyring as keyring_mod
from mixminion.client.commands.common import (
    PROG,
    Command,
    Context,
    UsageError,
    UserError,
    directory_option,
    legacy_option,
    load_directory,
    make_selector,
    only_one,
    open_keyring,
    passphrase_option,
    path_text,
    positive,
    read_input,
)
from mixminion.client.commands.queue import FirstHopPacket, deliver
from mixminion.client.commands.send import Encoded, build_forward
from mixminion.client.commands.surbs import (
    ReplyBlockPlan,
    plan_reply_blocks,
    reply_address,
    surb_lifetime,
)
from mixminion.client.keyring import Keyring, NymEntry
from mixminion.client.paths import Address, ExitNeeds, PathSelector, PathSpec, parse_path
from mixminion.client.store import private_dir
from mixminion.codec.build import encode_message_payloads
from mixminion.codec.errors import BuildError, ParseError
from mixminion.codec.exit_headers import parse_message
from mixminion.codec.payload import ENC_FWD_OVERHEAD
from mixminion.codec.routing import check_smtp_address
from mixminion.codec.rsa import PublicKey
from mixminion.codec.surb import ReplyBlock
from mixminion.codec.textformat import SECONDS_PER_DAY, format_time, previous_midnight
from mixminion.directory.descriptor import ServerDescriptor
from mixminion.nym.formats import (
    MAX_RECIPIENTS,
    NYM_TYPE,
    Command as NymCommand,
    Kind,
    NymFormatError,
    NymMessage,
    Policy,
    build_request,
    check_name,
    is_nym_message,
    parse_nym_message,
)

#: reply blocks a request brings unless ``--surbs`` says otherwise
DEFAULT_SURBS = 10
#: a nymserver holds at most this many of a nym's reply blocks (doc/nym.md §4)
MAX_SURBS = 100
NO_NYMS = "(No nyms in the keyring)"


# --- the nym and its nymserver -------------------------------------------------------------


def _label(ctx: Context) -> str:
    return f"{PROG} {ctx.args.command}"


def _name(ctx: Context, text: str) -> str:
    """A nym's name as requests carry it (lower-cased), or a usage error."""
    try:
        return check_name(text.lower())
    except NymFormatError as exc:
        raise UsageError(f"{_label(ctx)}: {text!r}: {exc}") from None


def find_nym(ring: Optional[Keyring], text: str) -> NymEntry:
    """The nym ``text`` names: ``NAME``, or ``NAME@DOMAIN`` when several
    nyms share a name."""
    wanted = text.lower()
    nyms = ring.nyms if ring is not None else []
    field = "full_name" if "@" in wanted else "name"
    matches = [n for n in nyms if getattr(n, field).lower() == wanted]
    return only_one(matches, f"You have no nym {text!r} in your keyring; '{PROG} nym list' "
                    "lists yours.", f"{len(matches)} of your nyms are called {text!r} "
                    f"({', '.join(n.full_name for n in matches)}); give NAME@DOMAIN.")


def short_name(ring: Optional[Keyring], entry_name: str, full_name: str) -> str:
    """What names a nym on the command line: its name, unless another nym
    in ``ring`` has it too."""
    nyms = ring.nyms if ring is not None else []
    twins = [n for n in nyms if n.name == entry_name]
    return entry_name if len(twins) <= 1 else full_name


def _nym_servers(directory: Any, now: float, end: float) -> list[str]:
    """Nicknames of the known servers that run a nymserver over ``[now, end]``."""
    return sorted({d.nickname for d in directory.servers(now)
                   if d.nym is not None and d.is_valid_over(now, end)}, key=str.lower)


def choose_nymserver(ctx: Context, directory: Any, selector: PathSelector,
                     nickname: Optional[str]) -> ServerDescriptor:
    """``--server NICK``'s descriptor, else the one server that runs a
    nymserver; it must have a ``[Delivery/Nym]`` section."""
    if nickname is None:
        found = _nym_servers(directory, selector.start, selector.end)
        if not found:
            raise UserError("No known server runs a nymserver (none has a [Delivery/Nym] "
                            "section); run update-servers, or import one's descriptor with "
                            "import-server and name it with --server.")
        if len(found) > 1:
            raise UserError(f"Several servers run a nymserver ({', '.join(found)}); choose one "
                            "with --server NICK.")
        nickname = found[0]
    server = selector.resolve(nickname)
    if server.nym is None:
        raise UserError(f"{server.nickname} runs no nymserver (its descriptor has no "
                        "[Delivery/Nym] section); list-servers shows the servers.")
    return server


def nymserver_of(selector: PathSelector, entry: NymEntry) -> ServerDescriptor:
    """The nym's nymserver, as the directory describes it now; refused when
    its nym key is not the one the nym was created with."""
    server = selector.resolve(entry.server)
    if server.nym is None:
        raise UserError(f"{server.nickname} no longer runs a nymserver (its descriptor has no "
                        f"[Delivery/Nym] section): {entry.full_name} cannot be reached.")
    if server.nym.key.der != entry.server_key:
        raise UserError(f"The nym key in {server.nickname}'s descriptor is not the one "
                        f"{entry.full_name} was created with, so nothing was sent: the "
                        "nymserver lost its key, or someone else now speaks for it.")
    return server


def _save(ctx: Context, ring: Keyring, passphrase: str) -> None:
    private_dir(ctx.config.user_dir)
    keyring_mod.write_keyring(ctx.config.user_dir, ring, passphrase)


def _own_keyring(ctx: Context) -> tuple[Keyring, str]:
    ring, passphrase = open_keyring(ctx, create=False)
    if ring is None:
        raise UserError(f"You have no keyring, so no nyms; '{PROG} nym create NAME' makes one.")
    return ring, passphrase


# --- requests -------------------------------------------------------------------------------


@dataclass
class Route:
    """How a nym's requests travel: the path and the nymserver at its end."""

    selector: PathSelector
    spec: PathSpec
    server: ServerDescriptor


def _spec(ctx: Context) -> PathSpec:
    """The requests' path (``-P``, ``-H``), checked before anything slow."""
    return parse_path(path_text(ctx, ctx.args, ctx.config.forward_path), "forward")


async def _route(ctx: Context, spec: PathSpec, nickname: Optional[str] = None,
                 entry: Optional[NymEntry] = None) -> tuple[Any, Route]:
    """Load the directory; the path to the nym's nymserver (``entry``'s, or
    for a new nym ``--server NICK``'s)."""
    directory = await load_directory(ctx, ctx.args.download)
    now = ctx.now()
    selector = make_selector(ctx, directory, now, previous_midnight(int(now + SECONDS_PER_DAY)))
    server = (nymserver_of(selector, entry) if entry is not None
              else choose_nymserver(ctx, directory, selector, nickname))
    return directory, Route(selector, spec, server)


def request_packets(ctx: Context, route: Route, entry: NymEntry, request: bytes
                    ) -> list[FirstHopPacket]:
    """The packets of ``request``, encrypted to the nym's nymserver, each
    on a path that ends at its node (every fragment of a large one too)."""
    address = Address(NYM_TYPE, b"", f"nym:{entry.full_name}", forced_server=route.server.nickname)
    try:
        payloads = encode_message_payloads(request, ctx.rng, overhead=ENC_FWD_OVERHEAD)
    except BuildError as exc:
        raise UserError(f"Cannot encode the request: {exc}.") from None
    needs = ExitNeeds(address, size=len(request))
    route.selector.validate(route.spec, needs, "forward")
    if len(payloads) > 1:
        ctx.info(f"The request needs {len(payloads)} packets; the nymserver at "
                 f"{route.server.nickname} reassembles it.")
    return build_forward(ctx, route.selector, route.spec, address, Encoded(payloads, needs),
                         PublicKey.from_der(entry.server_key))


async def send_request(ctx: Context, ring: Keyring, passphrase: str, entry: NymEntry,
                       route: Route, command: NymCommand, **fields: Any) -> int:
    """Sign, pack and send one request with the nym's next counter, which
    is in the keyring on disk before any packet is queued or sent."""
    counter = entry.counter + 1
    key = Ed25519PrivateKey.from_private_bytes(entry.secret)
    try:
        request = build_request(key, entry.name, command, counter, **fields)
    except NymFormatError as exc:
        raise UserError(f"Cannot make the request: {exc}.") from None
    items = request_packets(ctx, route, entry, request)
    entry.counter = counter
    _save(ctx, ring, passphrase)
    ctx.status("NYM_REQUEST", entry.full_name, command.value, str(counter))
    status = await deliver(ctx, items, "queue" if ctx.args.queue else "send")
    ctx.info(f"Request {counter} ({command.value}) for {entry.full_name} goes to the "
             f"nymserver at {route.server.nickname}, which answers through one of the nym's "
             f"reply blocks: read the answer with '{PROG} decode'.")
    return status


def _surbs(ctx: Context) -> int:
    count = ctx.args.surbs
    if count > MAX_SURBS:
        raise UsageError(f"{_label(ctx)}: --surbs {count}: a nymserver holds at most "
                         f"{MAX_SURBS} reply blocks per nym")
    return count


def _plan(ctx: Context, directory: Any, to: Optional[str]) -> ReplyBlockPlan:
    """Reply blocks to ``to`` along ``SURBPath``, checked as
    ``generate-surb`` checks them."""
    address = reply_address(ctx, to, "--to ADDRESS")
    spec = parse_path(ctx.config.surb_path, "surb")
    return plan_reply_blocks(ctx, directory, address, spec, surb_lifetime(ctx, ctx.args.lifetime))


def _reply_blocks(ctx: Context, ring: Keyring, entry: NymEntry, plan: ReplyBlockPlan,
                  count: int) -> list[ReplyBlock]:
    """``count`` reply blocks to the owner for ``entry``, made as
    ``generate-surb`` makes them, with the nym's keyring identity."""
    key = ring.surb_key(entry.identity, ctx.now())
    entry.address = plan.needs.address.text
    blocks = [plan.build(key)[0] for _ in range(count)]
    ctx.info(f"Made {count} reply block(s) to {entry.address} for {entry.full_name}, usable "
             f"until {format_time(plan.end)} GMT.")
    return blocks


# --- the sub-commands -----------------------------------------------------------------------


async def cmd_create(ctx: Context) -> int:
    args = ctx.args
    name = _name(ctx, args.name)
    count = _surbs(ctx)
    spec = _spec(ctx)
    reply_address(ctx, args.to, "--to ADDRESS")  # usage errors before anything slow
    directory, route = await _route(ctx, spec, nickname=args.server)
    nym = route.server.nym
    assert nym is not None
    plan = _plan(ctx, directory, args.to)
    ring, passphrase = open_keyring(ctx, create=True)
    assert ring is not None
    full_name = f"{name}@{nym.domain}"
    if any(n.full_name.lower() == full_name.lower() for n in ring.nyms):
        raise UserError(f"You already have the nym {full_name} in your keyring.")
    key = Ed25519PrivateKey.generate()
    secret = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                               serialization.NoEncryption())
    entry = NymEntry(name, nym.domain, route.server.nickname, "", nym.key.der, secret,
                     created=int(ctx.now()))
    blocks = _reply_blocks(ctx, ring, entry, plan, count)
    ring.nyms.append(entry)
    policy = Policy(args.policy) if args.policy else None
    return await send_request(ctx, ring, passphrase, entry, route, NymCommand.CREATE,
                              policy=policy, reply_blocks=blocks)


async def cmd_add_surbs(ctx: Context) -> int:
    args = ctx.args
    count = _surbs(ctx)
    spec = _spec(ctx)
    ring, passphrase = _own_keyring(ctx)
    entry = find_nym(ring, args.name)
    directory, route = await _route(ctx, spec, entry=entry)
    blocks = _reply_blocks(ctx, ring, entry, _plan(ctx, directory, args.to or entry.address),
                           count)
    return await send_request(ctx, ring, passphrase, entry, route, NymCommand.ADD_SURBS,
                              reply_blocks=blocks)


def _header_value(ctx: Context, option: str, value: str) -> str:
    """One header line's value: ASCII as given, else RFC 2047 words."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise UsageError(f"{_label(ctx)}: {option} must be one line of text")
    if value.isascii():
        return value
    return Header(value, "utf-8").encode(linesep="\n").replace("\n ", " ")


def compose_mail(ctx: Context, text: bytes) -> bytes:
    """The mail a ``send`` carries (doc/nym.md §2): an RFC 822 header
    block (possibly empty), an empty line, then ``text``."""
    args = ctx.args
    lines = [f"{name}: {_header_value(ctx, option, value)}"
             for name, option, value in (("Subject", "--subject", args.subject),
                                         ("In-Reply-To", "--in-reply-to", args.in_reply_to),
                                         ("References", "--references", args.references))
             if value is not None]
    if not text.isascii():
        try:
            text.decode("utf-8")
        except UnicodeDecodeError:
            pass
        else:
            lines.append("Content-Type: text/plain; charset=utf-8")
    return "".join(line + "\n" for line in lines).encode("ascii") + b"\n" + text


async def cmd_send(ctx: Context) -> int:
    args = ctx.args
    spec = _spec(ctx)
    if len(args.to) > MAX_RECIPIENTS:
        raise UsageError(f"{_label(ctx)}: at most {MAX_RECIPIENTS} recipients (-t)")
    for address in args.to:
        try:
            check_smtp_address(address.encode("ascii"))
        except (ParseError, UnicodeEncodeError) as exc:
            raise UsageError(f"{_label(ctx)}: -t {address}: not an e-mail address "
                             f"({exc})") from None
    name = args.input or "-"
    text = read_input(ctx, name, prompt=True)
    if not text and name == "-":
        raise UserError("The mail on standard input is empty; nothing was sent. To send an "
                        "empty mail on purpose, give -i with an empty file.")
    mail = compose_mail(ctx, text)
    ring, passphrase = _own_keyring(ctx)
    entry = find_nym(ring, args.name)
    _, route = await _route(ctx, spec, entry=entry)
    return await send_request(ctx, ring, passphrase, entry, route, NymCommand.SEND,
                              recipients=args.to, mail=mail)


async def _simple(ctx: Context, command: NymCommand, **fields: Any) -> int:
    """A request with nothing but its fields: ``config``, ``status``."""
    spec = _spec(ctx)
    ring, passphrase = _own_keyring(ctx)
    entry = find_nym(ring, ctx.args.name)
    _, route = await _route(ctx, spec, entry=entry)
    return await send_request(ctx, ring, passphrase, entry, route, command, **fields)


async def cmd_config(ctx: Context) -> int:
    return await _simple(ctx, NymCommand.CONFIG, policy=Policy(ctx.args.policy))


async def cmd_status(ctx: Context) -> int:
    return await _simple(ctx, NymCommand.STATUS)


async def cmd_delete(ctx: Context) -> int:
    spec = _spec(ctx)
    ring, passphrase = _own_keyring(ctx)
    entry = find_nym(ring, ctx.args.name)
    status = 0
    if not ctx.args.local:
        _, route = await _route(ctx, spec, entry=entry)
        status = await send_request(ctx, ring, passphrase, entry, route, NymCommand.DELETE)
    ring.nyms.remove(entry)
    _save(ctx, ring, passphrase)
    ctx.info(f"Removed {entry.full_name} from your keyring.")
    return status


async def cmd_list(ctx: Context) -> int:
    ring, _ = open_keyring(ctx, create=False)
    nyms = sorted(ring.nyms if ring is not None else [], key=lambda n: n.full_name.lower())
    ctx.say("\n".join(f"{n.full_name} (nymserver {n.server}): counter {n.counter}, created "
                      f"{format_time(n.created)} GMT" for n in nyms) or NO_NYMS)
    return 0


# --- what decode shows ----------------------------------------------------------------------


def present_reply(ctx: Context, message: bytes, identity: Optional[str],
                  ring: Optional[Keyring]) -> bytes:
    """What ``decode`` writes for a reply that came through one of our
    reply blocks (made for keyring ``identity``): a nymserver's message
    (doc/nym.md §3) as a line saying which nym, what it is and how many
    reply blocks are left, then its body (the mail, or the answer's
    details); anything else unchanged.  Only a reply block made for that
    nym (identity ``NAME@DOMAIN``) can bring a nym's message: anybody who
    holds other reply blocks of ours could write one.  Warns when the
    nymserver holds fewer reply blocks than ``[Nym] WarnBelow``."""
    data = message if is_nym_message(message) else parse_message(message)[1]
    if not is_nym_message(data):
        return message
    try:
        m = parse_nym_message(data)
    except NymFormatError as exc:
        ctx.warn(f"A reply starts as a nymserver's message but does not parse ({exc}); "
                 "written as it came.")
        return message
    name, at, domain = (identity or "").partition("@")
    if not (at and domain and name == m.nym):
        ctx.warn(f"A reply claims to come from the nymserver of {m.nym!r} but came through a "
                 "reply block not made for that nym; written as it came.")
        return message
    full_name = f"{name}@{domain}"
    counts = f"{m.reply_blocks} reply block(s) left at the nymserver, {m.queued} mail(s) waiting"
    if m.kind is Kind.MAIL:
        head = f"Mail for nym {full_name} ({counts}):"
        ctx.status("NYM_MAIL", full_name, str(m.reply_blocks), str(m.queued))
    else:
        outcome = "done" if m.ok else f"refused: {m.reason or 'no reason given'}"
        head = f"Answer for nym {full_name}: request {m.counter} {outcome} ({counts})."
        ctx.status("NYM_ANSWER", full_name, str(m.counter), "ok" if m.ok else "refused",
                   str(m.reply_blocks), str(m.queued))
    ctx.info(head)
    _warn_low(ctx, m, full_name, ring)
    return (head + "\n").encode("utf-8") + m.body


def _warn_low(ctx: Context, m: NymMessage, full_name: str, ring: Optional[Keyring]) -> None:
    if m.reply_blocks >= ctx.config.nym_warn_below:
        return
    name = short_name(ring, m.nym, full_name)
    ctx.warn(f"The nymserver holds only {m.reply_blocks} reply block(s) for {full_name} "
             f"([Nym] WarnBelow is {ctx.config.nym_warn_below}); without them its mail waits "
             f"or is refused. Send more with '{PROG} nym add-surbs {name}'.")


# --- options --------------------------------------------------------------------------------


def _nym_name(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME",
                   help="the nym: its name, or NAME@DOMAIN when several of yours share it")


def _request_options(p: argparse.ArgumentParser) -> None:
    """How a request travels: ``-P``, ``-H``, ``--queue``, ``--legacy``, ``-D``."""
    p.add_argument("-P", "--path", metavar="PATH",
                   help="path of the request, as send takes it; the nymserver's node is "
                        "always its last hop (default: ForwardPath, else ~5)")
    p.add_argument("-H", "--hops", metavar="N", type=positive,
                   help="use N random hops before the nymserver's node (same as -P '*N')")
    p.add_argument("--queue", action="store_true",
                   help="only queue the request's packets (send them later with flush)")
    legacy_option(p)
    directory_option(p)
    passphrase_option(p)


def _surb_options(p: argparse.ArgumentParser, to_default: str) -> None:
    p.add_argument("--surbs", metavar="N", type=positive, default=DEFAULT_SURBS,
                   help=f"reply blocks to give the nymserver (default {DEFAULT_SURBS}, at most "
                        f"{MAX_SURBS})")
    p.add_argument("--to", metavar="ADDRESS",
                   help="where the reply blocks lead: user@domain or mbox:NAME@SERVER, as "
                        f"generate-surb -t takes it (default: {to_default})")
    p.add_argument("--lifetime", metavar="DAYS", type=positive,
                   help="days the reply blocks stay usable (default: SURBLifetime, else 7)")


def _policy(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--policy", choices=[x.value for x in Policy], required=required,
                   help="what the nymserver does with mail when the nym has no reply block "
                        "left: hold it (the nymserver's default) or refuse it at once")


def _create_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME",
                   help="the nym's name: 1-32 of a-z 0-9 . _ -, starting with a letter or digit")
    p.add_argument("--server", metavar="NICK",
                   help="the node whose nymserver holds the nym (default: the one known server "
                        "that runs a nymserver)")
    _surb_options(p, "SURBAddress")
    _policy(p, required=False)
    _request_options(p)


def _add_surbs_options(p: argparse.ArgumentParser) -> None:
    _nym_name(p)
    _surb_options(p, "the nym's last --to")
    _request_options(p)


def _send_options(p: argparse.ArgumentParser) -> None:
    _nym_name(p)
    p.add_argument("-t", "--to", metavar="ADDRESS", action="append", required=True,
                   help=f"a recipient's e-mail address (repeatable, at most {MAX_RECIPIENTS})")
    p.add_argument("-i", "--input", metavar="FILE", default=None,
                   help="the mail's text ('-' = stdin, the default; an empty stdin is refused)")
    p.add_argument("--subject", metavar="TEXT", help="Subject: of the mail")
    p.add_argument("--in-reply-to", metavar="ID", help="In-Reply-To: of the mail")
    p.add_argument("--references", metavar="IDS", help="References: of the mail")
    _request_options(p)


def _config_options(p: argparse.ArgumentParser) -> None:
    _nym_name(p)
    _policy(p, required=True)
    _request_options(p)


def _name_and_request(p: argparse.ArgumentParser) -> None:
    _nym_name(p)
    _request_options(p)


def _delete_options(p: argparse.ArgumentParser) -> None:
    _name_and_request(p)
    p.add_argument("--local", action="store_true",
                   help="only remove the nym from your keyring, sending nothing (for a nym "
                        "the nymserver refused to create)")


def _list_options(p: argparse.ArgumentParser) -> None:
    passphrase_option(p)


async def _unreachable(ctx: Context) -> int:  # pragma: no cover - sub-commands run instead
    raise AssertionError("nym runs its sub-commands")


SUBCOMMANDS = (
    Command("create", "create a nym at a nymserver, with reply blocks that lead to you",
            cmd_create, _create_options, locked=True),
    Command("add-surbs", "give a nym's nymserver more reply blocks", cmd_add_surbs,
            _add_surbs_options, locked=True),
    Command("send", "send a mail as a nym", cmd_send, _send_options, locked=True),
    Command("config", "change what a nym's nymserver does with mail it cannot deliver",
            cmd_config, _config_options, locked=True),
    Command("status", "ask a nym's nymserver how many reply blocks and mails it holds",
            cmd_status, _name_and_request, locked=True),
    Command("delete", "delete a nym at its nymserver and from your keyring", cmd_delete,
            _delete_options, locked=True),
    Command("list", "list the nyms in your keyring (no network)", cmd_list, _list_options),
)

COMMANDS = (
    Command("nym", "pseudonymous mail addresses (nyms): create, add-surbs, send, config, "
            "status, delete, list", _unreachable, subcommands=SUBCOMMANDS),
)
