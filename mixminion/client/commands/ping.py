"""``ping``: is a server up, and is it the server its descriptor says?

One MMTP connection per server: TLS, the identity check of mmtp.md §5
against the descriptor's key, one JUNK frame (§9), the close of §7.4.
A ``host[:port]`` target has no descriptor, so its identity cannot be
checked (the all-zero KeyID), and the output says so.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any

from mixminion.client.commands.common import (
    Command,
    Context,
    UsageError,
    UserError,
    directory_option,
    legacy_option,
    load_directory,
    make_selector,
)
from mixminion.client.commands.queue import runs_original_software
from mixminion.client.paths import PathError

#: mmtp.md §1: the port a ``host`` without one is pinged on
DEFAULT_PORT = 48099
WARNING = ("Pinging a server tells whoever watches your network, and the server, that you "
           "mean to use it; use ping for testing only.")


@dataclass(frozen=True)
class Target:
    """One server to ping: what the user called it and how to reach it."""

    name: str
    host: str
    port: int
    keyid: bytes
    legacy: bool


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        return text, DEFAULT_PORT
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"mixminion-client ping: {text!r}: the port must be a number from "
                         "1 to 65535")
    return host, int(port)


def _is_address(text: str) -> bool:
    """client.md §2.1: a dotted argument that is not a file is host[:port]."""
    return "." in text and not os.path.exists(text)


async def _targets(ctx: Context) -> list[Target]:
    from mixminion.mmtp.chain import ZERO_KEYID

    always_legacy = ctx.config.legacy or bool(ctx.args.legacy)
    named = [n for n in ctx.args.servers if not _is_address(n)]
    selector: Any = None
    if named:
        now = ctx.now()
        directory = await load_directory(ctx, ctx.args.download)
        selector = make_selector(ctx, directory, now, now)
    targets = []
    for name in ctx.args.servers:
        if _is_address(name):
            host, port = _host_port(name)
            targets.append(Target(name, host, port, ZERO_KEYID, always_legacy))
            continue
        try:
            d = selector.resolve(name)
        except PathError as exc:
            raise UserError(str(exc)) from None
        if d.hostname is None or d.port is None:
            raise UserError(f"{d.nickname} has no MMTP address in its descriptor.")
        targets.append(Target(d.nickname, d.hostname, d.port, d.identity_digest,
                              always_legacy or runs_original_software(d)))
    return targets


def _ping_one(ctx: Context, target: Target) -> Any:
    from mixminion.mmtp.blocking import ping

    return ping(target.host, target.port, target.keyid, legacy=target.legacy,
                timeout=float(ctx.config.timeout), now=ctx.now, rng=ctx.rng)


async def cmd_ping(ctx: Context) -> int:
    from mixminion.mmtp.chain import ZERO_KEYID

    targets = await _targets(ctx)
    ctx.warn(WARNING)
    down = 0
    for target in targets:
        result = await ctx.offload(_ping_one, ctx, target)
        if result.accepted or result.rejected:  # REJECTED is an answer too (mmtp.md §7.4)
            status = "Server seems to be running"
            if target.keyid == ZERO_KEYID:
                status += " (its identity was not checked: no descriptor)"
            up = True
        elif result.wrong_key:
            status = "Server seems to be running, but its key is wrong!"
            up = False
        else:
            status = f"Couldn't connect to server: {result.failure}"
            up = False
        ctx.say(f">>> {status}")
        ctx.say(f"{target.name} is {'up' if up else 'down'}")
        down += not up
    return 1 if down else 0


def _ping_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("servers", nargs="+", metavar="SERVER",
                   help="a nickname, a descriptor file, or host[:port] (port 48099 if "
                        "omitted; the identity of a server named this way is not checked)")
    directory_option(p)
    legacy_option(p)


COMMANDS = (
    Command("ping", "check that servers accept MMTP and hold the key their descriptor names",
            cmd_ping, _ping_options, locked=True),
)
