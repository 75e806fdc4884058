"""What the ``mixminion-client`` command groups share.

The run :class:`Context` (streams, configuration, reactor, hooks), the two
errors that decide the exit status (:class:`UsageError` 2,
:class:`UserError` 1), the :class:`Command` table row, options used by
more than one command, and the shared steps: loading the directory,
choosing paths, reading input and passphrases, opening the keyring.
"""

from __future__ import annotations

import argparse
import fcntl
import getpass
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Awaitable, BinaryIO, Callable, Optional, Sequence, TextIO, TypeVar

from mixminion.client import keyring as keyring_mod
from mixminion.client.config import ClientConfig
from mixminion.client.paths import ExitNeeds, Legs, PathSelector, PathSpec, hop_for
from mixminion.directory.descriptor import ServerDescriptor

PROG = "mixminion-client"
PASSPHRASE_ENV = "MIXMINION_PASSPHRASE"
#: show a progress bar from this many packets on (and only on a terminal)
PROGRESS_MIN = 8
#: reply blocks with less life left than this are not used (client.md §5.2)
SURB_MIN_REMAINING = 3 * 3600
NO_AUTHORITY = "0" * 40


class UsageError(Exception):
    """Bad command line: exit 2 with this one line."""


class UserError(Exception):
    """A failure the user can act on: exit 1 with this message."""


T = TypeVar("T")


def only_one(matches: Sequence[T], none: str, several: str) -> T:
    """The one item of ``matches`` (what the user named); else UserError
    ``none`` or ``several``."""
    if len(matches) == 1:
        return matches[0]
    raise UserError(several if matches else none)


def _no_options(p: argparse.ArgumentParser) -> None:
    pass


@dataclass(frozen=True)
class Command:
    """One row of the command table: ``mixminion-client NAME``."""

    name: str
    #: one line, for ``--help``
    summary: str
    #: runs the command; returns the exit status
    run: Callable[["Context"], Awaitable[int]]
    #: adds the command's own options (the general ones are added after)
    options: Callable[[argparse.ArgumentParser], None] = _no_options
    #: touches the queue, the directory cache or the SURB log: take the client lock
    locked: bool = False
    #: ``mixminion-client NAME SUB ...``: the sub-commands, each a row of
    #: its own (the row's own ``run`` is then never called)
    subcommands: tuple["Command", ...] = ()


def general_options(p: argparse.ArgumentParser, inherited: bool = False) -> None:
    """The options every command takes (client.md §1.1), after its own.
    ``inherited``: a sub-command's, which leave what its command's parser
    set (``nym -v list``) when not given again."""
    default: dict[str, Any] = {"default": argparse.SUPPRESS} if inherited else {}
    g = p.add_argument_group("general options")
    g.add_argument("-v", "--verbose", action="store_true", **default,
                   help="log everything, including debugging detail")
    g.add_argument("-Q", "--quiet", action="store_true", **default, help="log only errors")
    g.add_argument("-f", "--config", metavar="FILE", **default,
                   help="configuration file (default $MIXMINIONRC, else ~/.mixminionrc)")
    g.add_argument("--status-fd", metavar="N", type=fd_number, **default,
                   help="write machine-readable status lines ('[MIXMINION:] TYPE ARGS') to "
                        "file descriptor N, which must be open for writing")


def _yes_no_force(text: str) -> Optional[bool]:
    value = text.strip().lower()
    if value in ("yes", "y", "1", "true", "t", "force"):
        return True
    if value in ("no", "n", "0", "false", "f"):
        return False
    raise argparse.ArgumentTypeError(f"expected yes or no, not {text!r}")


def _whole(text: str, minimum: int, too_small: str, noun: str = "whole number") -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a {noun}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(too_small)
    return value


def positive(text: str) -> int:
    return _whole(text, 1, f"{text!r} must be at least 1")


def non_negative(text: str) -> int:
    return _whole(text, 0, f"{text!r} must be 0 or more")


def fd_number(text: str) -> int:
    return _whole(text, 0, "file descriptors are not negative", "file descriptor number")


def check_status_fd(args: argparse.Namespace) -> None:
    """Refuse ``--status-fd N`` up front when N is not open for writing:
    status lines are for a program reading them, and losing them silently
    halfway would mislead it (a usage error: the option is wrong)."""
    fd = getattr(args, "status_fd", None)
    if fd is None:
        return
    try:
        mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    except OSError:
        raise UsageError(f"{PROG} {args.command}: --status-fd {fd}: file descriptor {fd} is "
                         "not open") from None
    if mode == os.O_RDONLY:
        raise UsageError(f"{PROG} {args.command}: --status-fd {fd}: file descriptor {fd} is "
                         "open for reading only")


async def run_here(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a blocking call where we are (see :attr:`Context.offload`)."""
    return fn(*args)


def legacy_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--legacy", action="store_true",
                   help="speak the weaker 0.0.8-era link (TLS 1.0, 1024-bit link keys) to "
                        "every first hop, not only to those whose descriptor names the original "
                        "software (see [Network] Legacy)")


def directory_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("-D", "--download-directory", metavar="yes|no", type=_yes_no_force,
                   dest="download", default=None,
                   help="yes: download a fresh directory first; no: never download "
                        "(default: download when the cached one is from before midnight GMT)")


def passphrase_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--passphrase-fd", metavar="N", type=fd_number,
                   help=f"read the keyring passphrase from file descriptor N (else ${PASSPHRASE_ENV}, "
                        "else ask on the terminal)")


@dataclass
class Context:
    """One command's run: its streams, arguments, configuration and the
    hooks tests use to replace the directory and how blocking calls run.
    ``reactor`` is None on the command line: the directory imports one
    only to download (a send starts faster without Twisted); tests pass
    theirs, which is also the clock."""

    stdin: BinaryIO
    stdout: BinaryIO
    stderr: TextIO
    environ: dict[str, str]
    reactor: Optional[Any]
    args: argparse.Namespace
    config: ClientConfig = field(default_factory=ClientConfig)
    rng: Callable[[int], bytes] = os.urandom
    random: random.Random = field(default_factory=random.SystemRandom)
    directory_factory: Optional[Callable[["Context"], Any]] = None
    #: runs a blocking call (an MMTP connection) and awaits its result:
    #: in place by default (the command line has nothing else to do);
    #: tests whose responder runs on the same reactor pass a thread runner
    offload: Callable[..., Awaitable[Any]] = field(default=lambda fn, *a: run_here(fn, *a))

    @property
    def quiet(self) -> bool:
        return bool(getattr(self.args, "quiet", False))

    @property
    def verbose(self) -> bool:
        return bool(getattr(self.args, "verbose", False))

    def now(self) -> float:
        return float(self.reactor.seconds()) if self.reactor is not None else time.time()

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

    def status(self, kind: str, *args: str) -> None:
        """One ``--status-fd`` line (client.md §9) for the program that
        runs us; one ``os.write`` each, so lines never interleave.  Nothing
        without ``--status-fd``."""
        fd = getattr(self.args, "status_fd", None)
        if fd is None:
            return
        line = " ".join(("[MIXMINION:]", kind) + args) + "\n"
        try:
            os.write(fd, line.encode("utf-8"))
        except OSError as exc:
            raise UserError(f"Cannot write status to file descriptor {fd} (--status-fd): "
                            f"{exc.strerror}.") from None


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


def default_directory(ctx: Context) -> Any:
    """A :class:`ClientDirectory` for the configured authorities (not yet loaded)."""
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
                           environ=ctx.environ, report=ctx.log)


def local_directory(ctx: Context) -> Any:
    """The client directory as stored (cached directory and imports)."""
    directory = (ctx.directory_factory or default_directory)(ctx)
    directory.load()
    return directory


async def load_directory(ctx: Context, download: Optional[bool]) -> Any:
    """The client directory, refreshed per ``-D`` and the daily rule."""
    from mixminion.client.directory import ClientDirectoryError

    directory = local_directory(ctx)
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
    """The path selector for ``[start, end]``: the directory's recommended
    servers and measured reliability, the configuration's block lists and
    ``ReliabilityFloor``."""
    def lookup(name: str) -> ServerDescriptor:
        return directory.lookup(name, start, end - start)

    return PathSelector(directory.recommended(start), lookup, start, end,
                        ctx.config.block_servers, ctx.config.block_entries,
                        ctx.config.block_exits, rng=ctx.random, warn=ctx.warn,
                        reliability=directory.reliability(),
                        floor=ctx.config.reliability_floor)


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


def hops_of(descriptors: Sequence[ServerDescriptor]) -> list:
    return [hop_for(d) for d in descriptors]


def choose_legs(ctx: Context, selector: PathSelector, spec: PathSpec, kind: str,
            needs: Optional[ExitNeeds], fixed_exit: Optional[ServerDescriptor] = None) -> Legs:
    legs = selector.choose(spec, kind, needs, fixed_exit, swap_at=getattr(ctx.args, "swap_at", None))
    ctx.log("DEBUG", f"Selected path is {legs}")
    return legs


def read_fd(fd: int, what: str) -> bytes:
    """Everything on file descriptor ``fd`` up to end of file (``what``
    names the data in the error)."""
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError as exc:
            raise UserError(f"Cannot read {what} from file descriptor {fd}: "
                            f"{exc.strerror}.") from None
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def read_passphrase(ctx: Context, prompt: str, confirm: bool = False) -> str:
    fd = getattr(ctx.args, "passphrase_fd", None)
    if fd is not None:
        text = read_fd(fd, "the passphrase").decode("utf-8", "replace")
        return text[:-1] if text.endswith("\n") else text
    if PASSPHRASE_ENV in ctx.environ:
        return ctx.environ[PASSPHRASE_ENV]
    no_terminal = UserError("The keyring needs a passphrase but there is no terminal to ask "
                            f"on: use --passphrase-fd N or set {PASSPHRASE_ENV}.")
    # getpass asks on the controlling terminal; without one it would read
    # standard input with echo on (a GetPassWarning): refuse instead.
    try:
        os.close(os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY))
    except OSError:
        raise no_terminal from None
    with warnings.catch_warnings():
        warnings.simplefilter("error", getpass.GetPassWarning)
        try:
            first = getpass.getpass(prompt)
            if confirm and getpass.getpass("Again, to confirm: ") != first:
                raise UserError("The two passphrases differ; nothing was changed.")
        except getpass.GetPassWarning:
            raise no_terminal from None
        except EOFError:
            raise UserError("No passphrase was given; nothing was changed.") from None
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


def write_file(name: str, data: bytes) -> None:
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except OSError as exc:
        raise UserError(f"Cannot write {name}: {exc.strerror}.") from None
