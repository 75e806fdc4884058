"""The ``mixminion-client`` command (client.md §1-§8): parsing and dispatch.

:func:`main` is the console script: it runs :func:`run` under
``task.react``.  :func:`run` takes its streams, environment and reactor as
arguments so the tests can drive every command in-process on trial's
reactor.  Exit codes: 0 success (including "queued for later"), 1 a
failure the message explains, 2 a usage error (one line, from argparse or
our own option checks).

The commands themselves live in :mod:`mixminion.client.commands`, one
module per group; :data:`TABLE` lists them in ``--help`` order.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from typing import Any, BinaryIO, Coroutine, Optional, Sequence, TextIO

from mixminion import __version__
from mixminion.client import keyring as keyring_mod
from mixminion.client.commands import decode, fragments, nym, ping, queue, send, servers, surbs
from mixminion.client.commands.common import (
    PROG,
    Command,
    Context,
    UsageError,
    UserError,
    check_status_fd,
    general_options,
)
from mixminion.client.config import load_client_config
from mixminion.client.paths import PathError
from mixminion.client.store import ClientLock, private_dir
from mixminion.config.syntax import ConfigError

#: every command, in the order ``--help`` lists them
TABLE: dict[str, Command] = {
    c.name: c for group in (send, queue, servers, ping, surbs, decode, fragments, nym)
    for c in group.COMMANDS
}
#: command name -> its one-line summary
COMMANDS: dict[str, str] = {name: c.summary for name, c in TABLE.items()}
#: the reference's other names for commands (client.md §2) -> the command
ALIASES: dict[str, str] = {
    "list-server": "list-servers",
    "generate-surbs": "generate-surb",
    "inspect-surb": "inspect-surbs",
}


class _Exit(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


# --- argument parsing ----------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """argparse that reports through exceptions and writes help to our
    stream, so :func:`run` controls every byte and exit code."""

    out: TextIO = sys.stdout

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: sub-command name -> its parser (``nym create``)
        self.leaves: dict[str, "Parser"] = {}

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")

    def exit(self, status: int = 0, message: Optional[str] = None) -> None:  # type: ignore[override]
        if message:
            self.out.write(message)
        raise _Exit(status)

    def _print_message(self, message: str, file: Any = None) -> None:
        if message:
            self.out.write(message)


def _aliases_of(name: str) -> list[str]:
    return [alias for alias, target in ALIASES.items() if target == name]


def _also(name: str) -> str:
    aliases = _aliases_of(name)
    return f" (also: {', '.join(aliases)})" if aliases else ""


def build_parser(out: TextIO) -> tuple[Parser, dict[str, Parser]]:
    """The top parser and each command's (a command with sub-commands
    keeps theirs in its ``leaves``)."""
    Parser.out = out
    top = Parser(prog=PROG, description="Send and receive Type III (Mixminion) anonymous "
                 "messages.", formatter_class=argparse.RawDescriptionHelpFormatter,
                 epilog="commands:\n" + "".join(f"  {n:<15} {h}{_also(n)}\n"
                                                 for n, h in COMMANDS.items())
                 + f"\nRun '{PROG} COMMAND --help' for a command's options.")
    top.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = top.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    parsers: dict[str, Parser] = {}
    for name, command in TABLE.items():
        p = sub.add_parser(name, help=command.summary, description=command.summary + ".",
                           prog=f"{PROG} {name}", aliases=_aliases_of(name))
        command.options(p)
        general_options(p)
        parsers[name] = p
        if not command.subcommands:
            continue
        inner = p.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True,
                                 parser_class=Parser)
        for s in command.subcommands:
            q = inner.add_parser(s.name, help=s.summary, description=s.summary + ".",
                                 prog=f"{PROG} {name} {s.name}")
            s.options(q)
            general_options(q, inherited=True)
            p.leaves[s.name] = q
    return top, parsers


def _chosen(args: argparse.Namespace) -> Optional[Command]:
    """The command (or sub-command) the parsed arguments name; for a
    sub-command, ``args.command`` becomes ``"NAME SUB"``, as its messages
    name it."""
    if not args.command:
        return None
    command = TABLE[args.command]
    if command.subcommands:
        command = {s.name: s for s in command.subcommands}[args.subcommand]
        args.command = f"{args.command} {args.subcommand}"
    return command


# --- running a command ---------------------------------------------------------------------


async def run(argv: Sequence[str], *, stdin: Optional[BinaryIO] = None,
              stdout: Optional[BinaryIO] = None, stderr: Optional[TextIO] = None,
              environ: Optional[dict[str, str]] = None, reactor: Any = None,
              **hooks: Any) -> int:
    """Run one command; returns the exit status (never raises for user errors).

    ``reactor`` None: none is imported unless the command needs one (see
    :func:`main`); tests pass trial's."""
    stdin = stdin if stdin is not None else sys.stdin.buffer
    stdout = stdout if stdout is not None else sys.stdout.buffer
    stderr = stderr if stderr is not None else sys.stderr
    environ = dict(os.environ if environ is None else environ)
    help_out = io.TextIOWrapper(stdout, encoding="utf-8", write_through=True) \
        if not isinstance(stdout, io.TextIOBase) else stdout
    top, parsers = build_parser(help_out)  # type: ignore[arg-type]
    try:
        args, unknown = top.parse_known_args(list(argv))
        args.command = ALIASES.get(args.command, args.command)
        command = _chosen(args)
        if unknown:  # blamed on the command whose options they are not
            name, _, leaf = (args.command or "").partition(" ")
            blamed = parsers[name].leaves.get(leaf, parsers[name]) if name else top
            blamed.error(f"unrecognized arguments: {' '.join(unknown)}")
        if command is None:
            raise UsageError(f"{PROG}: no command given (commands: {', '.join(COMMANDS)}; "
                             f"see '{PROG} --help')")
        if args.verbose and args.quiet:
            raise UsageError(f"{PROG} {args.command}: -v and -Q contradict each other")
        check_status_fd(args)
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
    lock: Optional[ClientLock] = None
    # Notices from loading the configuration (e.g. "wrote a default
    # ~/.mixminionrc") are held back until the command's arguments have
    # been accepted, so a usage error is always exactly one line.
    notices: list[str] = []
    try:
        ctx.config = load_client_config(args.config, environ, notices.append)
        if command.locked:
            private_dir(ctx.config.user_dir)
            lock = ClientLock(ctx.config.user_dir)
            lock.acquire(ctx.info)
        for warning in ctx.config.warnings:
            ctx.warn(warning)
        status = await command.run(ctx)
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


def _flush_notices(ctx: Context, notices: list[str]) -> None:
    for notice in notices:
        ctx.info(notice)
    notices.clear()


def _finish_on_reactor(coro: Coroutine[Any, Any, int], waiting: Any) -> int:
    """Run the rest of ``coro`` under Twisted: it awaits ``waiting`` (a
    Deferred, from a directory download), so it needs the reactor after all.

    Ctrl-C stops the command where it is (our SIGINT handler, installed
    before the reactor starts, so Twisted leaves SIGINT alone): a download
    cut short must not let a send carry on with the servers already known.
    An unexpected error prints its traceback, as it would without a reactor.
    """
    import signal
    import traceback

    from twisted.internet import defer, reactor
    from twisted.logger import globalLogBeginner

    globalLogBeginner.beginLoggingTo([], redirectStandardIO=False, discardBuffer=True)
    pending: list[Any] = [waiting]
    interrupted: list[int] = []
    status: list[int] = [1]

    def interrupt(signum: int, frame: Any) -> None:
        interrupted.append(signum)
        reactor.callFromThread(pending[0].cancel)

    async def rest() -> int:
        while True:
            error: Optional[BaseException] = None
            value: Any = None
            try:
                value = await pending[0]
            except BaseException as exc:  # noqa: BLE001 - handed back to the command
                error = exc
            if interrupted:
                coro.close()  # the command's finally blocks run (the client lock)
                sys.stderr.write("Interrupted.\n")
                return 1
            try:
                pending[0] = coro.throw(error) if error is not None else coro.send(value)
            except StopIteration as stop:
                return int(stop.value or 0)
            except Exception:  # noqa: BLE001 - a bug: say where, exit 1
                traceback.print_exc()
                return 1

    def finish(result: Any) -> None:
        if isinstance(result, int):
            status[0] = result
        else:  # a Failure: the command did not even end cleanly
            sys.stderr.write(result.getTraceback())
        reactor.stop()

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        reactor.callWhenRunning(lambda: defer.ensureDeferred(rest()).addBoth(finish))
        reactor.run()
    finally:
        signal.signal(signal.SIGINT, previous)
    return status[0]


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console script: run the command and exit with its status.

    The command runs without a reactor until it awaits something (only a
    directory download does); then the rest runs under the reactor.
    Sending, queueing, decoding never import Twisted."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    coro = run(arguments)
    try:
        try:
            waiting = coro.send(None)
        except StopIteration as stop:
            status = stop.value
        else:
            status = _finish_on_reactor(coro, waiting)
    except KeyboardInterrupt:
        sys.stderr.write("Interrupted.\n")
        status = 1
    raise SystemExit(status)


if __name__ == "__main__":  # pragma: no cover
    main()
