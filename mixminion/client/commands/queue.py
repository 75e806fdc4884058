"""The client-side queue (client.md §4): ``flush``, ``inspect-queue``,
``clean-queue``, and handing built packets to their first hops (queue,
send, or both).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from mixminion.client.commands.common import (
    PROG,
    Command,
    Context,
    Progress,
    UserError,
    legacy_option,
    local_directory,
    non_negative,
    positive,
)
from mixminion.client.store import ClientQueue, QueuedPacket
from mixminion.codec.routing import NextHop
from mixminion.codec.textformat import SECONDS_PER_DAY

#: ``clean-queue`` removes packets at least this many days old by default
CLEAN_AFTER_DAYS = 60
#: what a descriptor's ``Software`` line says on the original 0.0.x servers
ORIGINAL_SOFTWARE = "Mixminion 0.0."


@dataclass
class FirstHopPacket:
    """A built packet and the first hop it goes to; ``handle`` names its
    file in the :class:`ClientQueue` once it is queued.  ``original``: the
    hop's descriptor names the original software, which speaks only the
    legacy link."""

    destination: NextHop
    nickname: str
    packet: bytes
    handle: Optional[str] = None
    original: bool = False


def runs_original_software(descriptor: Any) -> bool:
    """Whether a descriptor's ``Software`` line names a 0.0.x release (the
    reference implementation), whose link needs legacy TLS."""
    return (getattr(descriptor, "software", None) or "").startswith(ORIGINAL_SOFTWARE)


def use_legacy_link(ctx: Context, item: FirstHopPacket) -> bool:
    """The client's link policy (doc/mmtp-legacy.md): legacy TLS for a hop
    whose descriptor names the original software, or for every hop when
    the user asks (``--legacy``, ``[Network] Legacy``); never otherwise."""
    return item.original or ctx.config.legacy or bool(getattr(ctx.args, "legacy", False))


def _send_group(ctx: Context, dest: NextHop, group: Sequence[FirstHopPacket],
                legacy: bool, cache: dict[bytes, bytes]) -> Any:
    """One connection to one first hop (blocking: run through ``ctx.offload``)."""
    from mixminion.mmtp.blocking import send_packets

    return send_packets(dest.host, dest.port, dest.keyid, [i.packet for i in group],
                        legacy=legacy, timeout=float(ctx.config.timeout), now=ctx.now,
                        cache=cache)


async def transmit(ctx: Context, items: Sequence[FirstHopPacket], queue: Optional[ClientQueue]
                   ) -> int:
    """Send ``items`` grouped by first hop, groups and packets shuffled;
    one MMTP connection per first hop, closed as mmtp.md §7.4 says.

    Acknowledged packets leave ``queue`` (if they were in it).  Warns once
    per first hop that failed, saying why; returns the number delivered.
    """
    groups: dict[NextHop, list[FirstHopPacket]] = {}
    for item in items:
        groups.setdefault(item.destination, []).append(item)
    order = list(groups)
    ctx.random.shuffle(order)
    progress = Progress(ctx, "Sending packets", len(items))
    # Verified link keys, one cache per link mode: a key accepted under the
    # legacy rules (SHA-1) must not skip the modern check.
    caches: dict[bool, dict[bytes, bytes]] = {False: {}, True: {}}
    delivered = 0
    for dest in order:
        group = groups[dest]
        ctx.random.shuffle(group)
        nickname = group[0].nickname
        legacy = any(use_legacy_link(ctx, item) for item in group)
        if legacy:
            ctx.log("DEBUG", f"Speaking the legacy (0.0.8-era) link to {nickname}.")
        result = await ctx.offload(_send_group, ctx, dest, group, legacy, caches[legacy])
        for index in result.accepted:
            delivered += 1
            if queue is not None and group[index].handle is not None:
                queue.remove(group[index].handle)  # type: ignore[arg-type]
        progress.step(len(group))
        if result.failure:
            ctx.warn(f"Could not deliver to {nickname}: {result.failure}")
        elif result.rejected:
            ctx.warn(f"{nickname} refused {len(result.rejected)} packet(s) for now "
                     "(it answered REJECTED); they stay queued.")
    return delivered


async def deliver(ctx: Context, items: list[FirstHopPacket], mode: str) -> int:
    """``mode``: ``queue`` (only queue), ``send`` (queue, then send) or
    ``no-queue`` (send, losing failures)."""
    queue = ClientQueue(ctx.config.user_dir)
    if mode in ("queue", "send"):
        for item in items:
            item.handle = queue.add(item.destination, item.nickname, item.packet, ctx.now(),
                                    original=item.original)
    if mode == "queue":
        ctx.say(f"Queued {len(items)} packet(s); run '{PROG} flush' to send them.")
        return 0
    delivered = await transmit(ctx, items, queue if mode == "send" else None)
    failed = len(items) - delivered
    if not failed:
        ctx.say(f"Sent {delivered} packet(s).")
        return 0
    if mode == "send":
        ctx.say(f"Sent {delivered} packet(s); {failed} could not be sent now and were queued. "
                f"Run '{PROG} flush' later to send them.")
        return 0
    raise UserError(f"{failed} of {len(items)} packet(s) could not be sent and were lost "
                    "(--no-queue). Send the message again when the first hop is up.")


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


def for_servers(ctx: Context, queued: list[QueuedPacket], names: Sequence[str]
                ) -> list[QueuedPacket]:
    """The packets whose first hop one of ``names`` names (nickname, via
    the directory's KeyID, host name or KeyID; client.md §4.2 step 1);
    warns for names with none.  No names: all of them."""
    if not names:
        return queued
    directory = None
    try:
        directory = local_directory(ctx)
    except Exception:  # noqa: BLE001 - names can still match host or KeyID
        directory = None
    selected: list[QueuedPacket] = []
    for name in names:
        mine = [q for q in queued if _matches(q, name, directory, ctx.now())]
        if not mine:
            ctx.warn(f"No queued packets for {name}.")
        selected.extend(q for q in mine if q not in selected)
    return selected


async def cmd_flush(ctx: Context) -> int:
    args = ctx.args
    queue = ClientQueue(ctx.config.user_dir)
    queued = for_servers(ctx, list(queue.packets(ctx.warn)), args.servers)
    if args.count and args.count < len(queued):
        queued = ctx.random.sample(queued, args.count)
    if not queued:
        ctx.say("No packets to flush.")
        return 0
    items = [FirstHopPacket(q.destination, q.nickname, q.packet, q.handle, q.original)
             for q in queued]
    delivered = await transmit(ctx, items, queue)
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


async def cmd_clean_queue(ctx: Context) -> int:
    """Delete packets queued ``--days`` days ago or earlier (client.md
    §2.1): nothing else ever removes a packet whose first hop stays down."""
    args = ctx.args
    queue = ClientQueue(ctx.config.user_dir)
    cutoff = ctx.now() - args.days * SECONDS_PER_DAY
    old = [q for q in for_servers(ctx, list(queue.packets(ctx.warn)), args.servers)
           if q.inserted <= cutoff]
    if not old:
        ctx.say("No packets removed.")
        return 0
    removed: dict[str, int] = {}
    for q in old:
        queue.remove(q.handle)
        removed[q.nickname] = removed.get(q.nickname, 0) + 1
    for name in sorted(removed, key=str.lower):
        ctx.say(f"Removed {removed[name]} packets for {name}")
    return 0


def _clean_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("servers", nargs="*", metavar="SERVER",
                   help="only packets for these first hops (nickname, host name or address)")
    p.add_argument("-d", "--days", metavar="N", type=non_negative, default=CLEAN_AFTER_DAYS,
                   help=f"remove packets queued N or more days ago (default {CLEAN_AFTER_DAYS}; "
                        "0 = all)")


def _flush_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("servers", nargs="*", metavar="SERVER",
                   help="only packets for these first hops (nickname, host name or address)")
    p.add_argument("-n", "--count", metavar="N", type=positive,
                   help="send only N randomly chosen packets")
    legacy_option(p)


COMMANDS = (
    Command("flush", "try again to send queued packets", cmd_flush, _flush_options, locked=True),
    Command("inspect-queue", "summarise the packets waiting in the queue", cmd_inspect_queue),
    Command("clean-queue", "delete old packets from the queue", cmd_clean_queue, _clean_options,
            locked=True),
)
