"""The directory commands (client.md §7-§8): ``list-servers``,
``update-servers`` and ``import-server``.
"""

from __future__ import annotations

import argparse

from mixminion.client.commands.common import (
    Command,
    Context,
    UserError,
    directory_option,
    load_directory,
    local_directory,
)
from mixminion.directory.descriptor import ServerDescriptor


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

    directory = local_directory(ctx)
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


def _list_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("servers", nargs="*", metavar="NICKNAME", help="only these servers")
    p.add_argument("-r", "--recommended", action="store_true", help="only recommended servers")
    directory_option(p)


def _import_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", metavar="FILE", help="files holding one descriptor each")


COMMANDS = (
    Command("list-servers", "list the servers known from the directory and imported descriptors",
            cmd_list_servers, _list_options, locked=True),
    Command("update-servers", "download a fresh directory now", cmd_update_servers, locked=True),
    Command("import-server", "add server descriptors from files to the local store",
            cmd_import_server, _import_options, locked=True),
)
