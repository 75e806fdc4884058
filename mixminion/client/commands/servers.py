"""The directory commands (client.md §7-§8): ``list-servers``,
``update-servers`` and ``import-server``.

``list-servers`` shows *features* of each server: a few computed ones
(:data:`DERIVED`: capabilities, status, fingerprint, address, and what
the directory measured: reliability, latency, pingers; doc/reliability.md
§4) and every field a descriptor can carry, named ``Section:Key`` or by a
key that only one section has.  Each feature is one :class:`Feature` row,
so a new column is one more entry in :data:`DERIVED`; the option parser,
``--list-features``, the name lookup and every output layout take it from
there.
"""

from __future__ import annotations

import argparse
import functools
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

from mixminion.client.commands.common import (
    Command,
    Context,
    UserError,
    directory_option,
    load_directory,
    local_directory,
)
from mixminion.client.config import ClientConfig
from mixminion.codec.textformat import format_date
from mixminion.directory.descriptor import ServerDescriptor
from mixminion.directory.reliability import ServerReliability, format_reliability

# --- features -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Facts:
    """What a feature may consult besides the descriptor itself: the
    directory (recommendations), the configuration (block lists), the
    time, every known descriptor by lower-cased nickname, and what the
    directory measured by identity fingerprint."""

    directory: Any
    config: ClientConfig
    now: float
    known: Mapping[str, Sequence[ServerDescriptor]]
    reliability: Mapping[str, ServerReliability]


@dataclass(frozen=True)
class Feature:
    """One thing ``list-servers -F`` can show about a descriptor."""

    #: canonical name: a word for computed features, ``Section:Key`` for fields
    name: str
    #: the value shown for one descriptor ("" when it has none)
    value: Callable[[ServerDescriptor, Facts], str]
    #: other names accepted by ``-F`` (matched case-insensitively)
    aliases: tuple[str, ...] = ()
    #: one line for ``--list-features`` (computed features only)
    summary: str = ""


def _status(d: ServerDescriptor, facts: Facts) -> str:
    """Why the path selector would not pick this server at random, per
    nickname (recommendations and block lists are by nickname)."""
    nick = d.nickname.lower()
    config = facts.config
    measured = facts.reliability.get(d.fingerprint)
    notes = [note for note, applies in (
        ("not recommended", not facts.directory.is_recommended(d.nickname)),
        ("unreliable", measured is not None
         and measured.reliability < config.reliability_floor),
        ("blocked", nick in config.block_servers),
        ("blocked as entry", nick in config.block_entries),
        ("blocked as exit", nick in config.block_exits),
        ("expired", not any(x.is_valid_at(facts.now) for x in facts.known.get(nick, [d]))),
    ) if applies]
    return "(" + (", ".join(notes) if notes else "ok") + ")"


def _address(d: ServerDescriptor, facts: Facts) -> str:
    return f"{d.hostname}:{d.port}" if d.incoming is not None else ""


def _measured(show: Callable[[ServerReliability], str]) -> Callable[[ServerDescriptor, Facts], str]:
    """A feature showing what the directory measured of the server's
    identity, ``-`` when it measured nothing (too few pingers, or a
    server only imported descriptors know)."""

    def value(d: ServerDescriptor, facts: Facts) -> str:
        r = facts.reliability.get(d.fingerprint)
        return "-" if r is None else show(r)

    return value


#: the computed features, in ``--list-features`` order
DERIVED: tuple[Feature, ...] = (
    Feature("caps", lambda d, f: d.caps, ("capabilities",),
            "what the server does: mbox, smtp (delivery), relay, frag (reassembly)"),
    Feature("status", _status, (),
            "(ok), or why it is not chosen at random: not recommended, unreliable (measured "
            "below [Security] ReliabilityFloor), blocked, blocked as entry, blocked as exit "
            "([Security] Block*), expired (no descriptor valid now)"),
    Feature("fingerprint", lambda d, f: d.fingerprint, (),
            "hex SHA-1 of the identity key (compare with the operator's)"),
    Feature("address", _address, (), "HOST:PORT that clients and servers connect to"),
    Feature("reliability", _measured(lambda r: format_reliability(r.reliability)), (),
            "share of packets the server delivers, as the directory's pingers measured it "
            "(0.000-1.000; - when unmeasured)"),
    Feature("latency", _measured(lambda r: f"{r.latency_ms} ms"), (),
            "median round trip of pings through the server (- when unmeasured)"),
    Feature("pingers", _measured(lambda r: str(r.pingers)), (),
            "how many independent pingers the measurement rests on (- when unmeasured)"),
)

#: what ``list-servers`` shows without ``-F`` (client.md §7)
DEFAULT_FEATURES = ("caps", "status")
DEFAULT_RECOMMENDED_FEATURES = ("caps",)


def _field(section: str, key: str) -> Callable[[ServerDescriptor, Facts], str]:
    """The value of ``[section] key`` as written in the descriptor
    (repeated keys joined with ``, ``)."""

    def value(d: ServerDescriptor, facts: Facts) -> str:
        for s in d.sections:
            if s.name == section:
                return ", ".join(e.value for e in s.entries if e.key == key)
        return ""

    return value


def _schema() -> Mapping[str, Iterable[str]]:
    """Section -> keys a descriptor may carry: the parser's own schema, so
    the feature list follows the descriptor format without a copy."""
    from mixminion.directory.descriptor import _SCHEMAS

    return _SCHEMAS


@functools.cache
def feature_table() -> tuple[Feature, ...]:
    """Every feature: :data:`DERIVED`, then one per descriptor field.  A
    field's bare key is an alias when only one section has it and no
    computed feature is called that."""
    schema = _schema()
    taken = {n.lower() for f in DERIVED for n in (f.name, *f.aliases)}
    sections_of: dict[str, int] = {}
    for keys in schema.values():
        for key in keys:
            sections_of[key.lower()] = sections_of.get(key.lower(), 0) + 1
    fields = tuple(
        Feature(f"{section}:{key}", _field(section, key),
                (key.lower(),) if sections_of[key.lower()] == 1 and key.lower() not in taken
                else ())
        for section, keys in schema.items() for key in keys)
    return DERIVED + fields


class Column(NamedTuple):
    """A feature to show, under the name the user gave it."""

    label: str
    feature: Feature


def resolve_feature(name: str) -> Feature:
    """The feature ``name`` means (case-insensitive); ValueError says why
    none does: unknown, or a key several sections have."""
    table = feature_table()
    wanted = name.strip().lower()
    by_name = {n.lower(): f for f in table for n in (f.name, *f.aliases)}
    if wanted in by_name:
        return by_name[wanted]
    sections = {s.lower(): s for s in _schema()}
    if ":" in wanted:
        section = wanted.partition(":")[0]
        if section in sections:
            raise ValueError(f"descriptor section [{sections[section]}] has no field "
                             f"{name.partition(':')[2]!r} (see --list-features)")
        raise ValueError(f"no descriptor section is called [{name.partition(':')[0]}] "
                         "(see --list-features)")
    several = [f.name for f in table if f.name.lower().endswith(":" + wanted)]
    if several:
        raise ValueError(f"{name!r} is ambiguous: say {', '.join(several[:-1])} or {several[-1]}")
    if wanted in sections:
        raise ValueError(f"{name!r} is a section: name one of its fields, as "
                         f"{sections[wanted]}:KEY (see --list-features)")
    import difflib

    close = difflib.get_close_matches(wanted, list(by_name), n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    raise ValueError(f"unknown feature {name!r} ({hint}see --list-features)")


def _columns(text: str) -> list[Column]:
    """argparse type of ``-F``: comma-separated feature names."""
    names = [n.strip() for n in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"{text!r}: feature names separated by commas, "
                                         "none empty")
    try:
        return [Column(n, resolve_feature(n)) for n in names]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def feature_list() -> list[str]:
    """``--list-features``: each name, its aliases, and what computed ones mean."""
    heads = [f.name + (f" ({', '.join(f.aliases)})" if f.aliases else "")
             for f in feature_table()]
    width = max(len(h) for h, f in zip(heads, feature_table()) if f.summary)
    return [(f"{h:<{width}}  {f.summary}" if f.summary else h)
            for h, f in zip(heads, feature_table())]


# --- rows: which descriptors share a line ---------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One output entry: a server over ``[valid_after, valid_until]``."""

    nickname: str
    valid_after: int
    valid_until: int
    values: tuple[str, ...]


def server_rows(descriptors: Sequence[ServerDescriptor], columns: Sequence[Column],
                facts: Facts, mode: str) -> list[Row]:
    """The rows for one server's descriptors.

    ``mode`` ``"each"`` (``--no-collapse``): one row per descriptor;
    ``"runs"`` (``-T``): descriptors that overlap or touch and show the
    same values share a row; ``"server"`` (default): one row, each value
    that differs between descriptors shown once, joined with `` / ``.
    """
    ordered = sorted(descriptors, key=lambda d: (d.valid_after, d.valid_until, d.published))
    rows = [Row(d.nickname, d.valid_after, d.valid_until,
                tuple(c.feature.value(d, facts) for c in columns)) for d in ordered]
    if mode == "each":
        return rows
    if mode == "runs":
        runs: list[Row] = []
        for row in rows:
            last = runs[-1] if runs else None
            if last is not None and row.valid_after <= last.valid_until and \
                    row.values == last.values:
                runs[-1] = Row(last.nickname, last.valid_after,
                               max(last.valid_until, row.valid_until), last.values)
            else:
                runs.append(row)
        return runs
    merged = tuple(" / ".join(dict.fromkeys(r.values[i] for r in rows))
                   for i in range(len(columns)))
    return [Row(rows[-1].nickname, min(r.valid_after for r in rows),
                max(r.valid_until for r in rows), merged)]


# --- layout ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """How rows become lines (client.md §7)."""

    #: show ``YYYY-MM-DD to YYYY-MM-DD`` (``-T``, ``--no-collapse``)
    times: bool
    #: ``""`` one line per row; ``"c"`` nickname line, then one per row;
    #: ``"C"`` nickname line, then one per feature
    cascade: str
    separator: str
    justify: bool


def _span(row: Row) -> str:
    return f"{format_date(row.valid_after)} to {format_date(row.valid_until)}"


def format_rows(servers: Sequence[tuple[str, Sequence[Row]]], columns: Sequence[Column],
                layout: Layout) -> list[str]:
    """The output lines for ``servers`` (nickname, its rows), in order."""
    every = [row for _, rows in servers for row in rows]
    widths = [max((len(r.values[i]) for r in every), default=0) for i in range(len(columns))]
    nick_width = max((len(name) for name, _ in servers), default=0) + 1

    def joined(values: Sequence[str]) -> str:
        if layout.justify:
            values = [v.ljust(w) for v, w in zip(values[:-1], widths)] + list(values[-1:])
        return layout.separator.join(values)

    lines: list[str] = []
    for name, rows in servers:
        if layout.cascade:
            lines.append(f"{name}:")
        for row in rows:
            if layout.cascade == "C":
                if layout.times:
                    lines.append(f"  [{_span(row)}]")
                lines += [f"    {c.label}:{v}" for c, v in zip(columns, row.values)]
            elif layout.cascade == "c":
                lines.append("  " + (f"[{_span(row)}] " if layout.times else "")
                             + joined(row.values))
            else:
                head = f"{name}:".ljust(nick_width) if layout.justify else f"{name}:"
                lines.append(head + (f"{_span(row)}:" if layout.times else "")
                             + joined(row.values))
    return lines


# --- list-servers --------------------------------------------------------------------------


def _by_name(descriptors: Iterable[ServerDescriptor]) -> dict[str, list[ServerDescriptor]]:
    out: dict[str, list[ServerDescriptor]] = {}
    for d in descriptors:
        out.setdefault(d.nickname.lower(), []).append(d)
    return out


async def cmd_list_servers(ctx: Context) -> int:
    """Show the chosen features of every known server (client.md §7);
    ``--list-features`` needs no directory, so it never downloads one."""
    args = ctx.args
    if args.list_features:
        for line in feature_list():
            ctx.say(line)
        return 0
    if args.old_recommended:
        ctx.warn("list-servers -R is deprecated: use -r (--recommended).")
    recommended = args.recommended or args.old_recommended
    if args.features:
        columns = [c for group in args.features for c in group]
    else:
        names = DEFAULT_RECOMMENDED_FEATURES if recommended else DEFAULT_FEATURES
        columns = [Column(n, resolve_feature(n)) for n in names]
    directory = await load_directory(ctx, args.download)
    now = ctx.now()
    known = _by_name(directory.all_descriptors())
    shown = _by_name(directory.recommended(now)) if recommended else known
    wanted: dict[str, str] = {}  # lower-cased name -> as the user spelled it
    for name in args.servers:
        wanted.setdefault(name.lower(), name)
    for key, name in wanted.items():
        if key in shown:
            continue
        if key in known:
            raise UserError(f"{name} has no recommended descriptor valid now; drop -r to "
                            "list it anyway.")
        raise UserError(f"No descriptors known for {name}; check the spelling, or run "
                        "update-servers.")
    if not shown:
        what = "recommended servers valid now" if recommended else "servers"
        ctx.say(f"(No {what} known: run update-servers or import-server)")
        return 0
    facts = Facts(directory, ctx.config, now, known, directory.reliability())
    mode = "each" if args.no_collapse else "runs" if args.with_time else "server"
    servers = [(shown[key][-1].nickname, server_rows(shown[key], columns, facts, mode))
               for key in sorted(shown) if not wanted or key in wanted]
    separator = args.separator if args.separator is not None else (" " if args.justify else "\t")
    layout = Layout(times=mode != "server", cascade=args.cascade or "",
                    separator=separator, justify=args.justify)
    for line in format_rows(servers, columns, layout):
        ctx.say(line)
    return 0


# --- update-servers ------------------------------------------------------------------------


def _kept(directory: Any, now: float) -> str:
    """What the client falls back on when no authority gave a directory."""
    from mixminion.client.directory import DIR_FILE

    info = directory.directory
    if info is None:
        return ("There is no cached directory to keep, so servers can only be named by "
                "imported descriptors.")
    expired = " (expired)" if now > info.valid_until else ""
    return (f"Keeping the cached directory {os.path.join(directory.root, DIR_FILE)}, valid "
            f"after {format_date(info.valid_after)} until "
            f"{format_date(info.valid_until)}{expired}.")


async def cmd_update_servers(ctx: Context) -> int:
    """Download now; exit 1 (and say what is still in use) when no
    authority gave a directory, rather than claim an update."""
    from mixminion.client.directory import ClientDirectoryError, DirectoryUpdateError

    directory = local_directory(ctx)
    if not ctx.config.authorities:
        raise UserError("No directory authorities are configured, so no directory can be "
                        "downloaded. Add '[DirectoryServers] Authority: URL FINGERPRINT' "
                        f"lines to {ctx.config.filename}.")
    try:
        result = await directory.update(force=True)
    except DirectoryUpdateError as exc:
        lines = [f"Could not update the directory: none of the {len(directory.authorities)} "
                 "configured authorities gave a valid one."]
        lines += [f"  {failure}" for failure in exc.failures]
        lines.append(_kept(directory, ctx.now()))
        raise UserError("\n".join(lines)) from None
    except ClientDirectoryError as exc:  # e.g. a malformed http_proxy
        raise UserError(str(exc)) from None
    for warning in result.warnings:
        ctx.warn(warning)
    advice = directory.version_advice()
    if advice:
        ctx.warn(advice)
    ctx.say("Directory updated")
    return 0


# --- import-server -------------------------------------------------------------------------


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


# --- options -------------------------------------------------------------------------------


def _list_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("servers", nargs="*", metavar="NICKNAME",
                   help="only these servers (a name with no descriptor is an error)")
    p.add_argument("-F", "--feature", dest="features", action="append", type=_columns,
                   metavar="NAME[,NAME...]",
                   help="what to show, in this order (repeatable): caps, status, fingerprint, "
                        "address, reliability, latency, pingers, or any descriptor field as "
                        "Section:Key or a Key only one section has (software, valid-after, valid-until, contact...); see "
                        "--list-features (default: caps,status; caps with -r)")
    p.add_argument("--list-features", action="store_true",
                   help="print every feature name -F accepts, with its short forms, and exit")
    p.add_argument("-r", "--recommended", action="store_true",
                   help="only servers the directory recommends, with a descriptor valid now")
    p.add_argument("-R", dest="old_recommended", action="store_true",
                   help="deprecated spelling of -r")
    p.add_argument("-T", "--with-time", action="store_true",
                   help="one line per run of overlapping descriptors that show the same values: "
                        "NICK:YYYY-MM-DD to YYYY-MM-DD:VALUES")
    p.add_argument("--no-collapse", action="store_true",
                   help="one line per descriptor, with its dates (as -T, never merged)")
    cascade = p.add_mutually_exclusive_group()
    cascade.add_argument("-c", "--cascade", action="store_const", const="c",
                         help="the nickname on a line of its own, then the values indented")
    cascade.add_argument("-C", "--cascade-features", dest="cascade", action="store_const",
                         const="C",
                         help="the nickname on a line of its own, then one FEATURE:VALUE line "
                              "per feature")
    p.add_argument("-J", "--justify", action="store_true",
                   help="pad nicknames and values into columns (separator: a space)")
    p.add_argument("-s", "--separator", metavar="SEP",
                   help="put SEP between values (default: a tab; a space with -J)")
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
