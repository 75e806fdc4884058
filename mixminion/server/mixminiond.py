"""``mixminiond``: the operator's command beside ``twistd mixminion``.

``mixminiond check -c FILE`` reads a configuration the way the node
would (syntax, every option's type, the cross-field rules, which exit
modules are installed, file permissions) without starting anything, like
``tor --verify-config``: it prints ``OK`` and exits 0, or prints each
problem on a line of its own and exits 1.

The other commands act on the node that runs with that configuration,
found through its pid file (:mod:`mixminion.server.control`):
``fingerprint``, ``status``, ``reload`` (SIGHUP), ``stop`` (SIGTERM),
``republish`` (SIGUSR2) and ``keys``.  Exit status: 0 done, 1 failed (or
the node is unhealthy), 2 usage, configuration or permission error, 3 the
node is not running.  Whatever an operator can cause is one line on
standard error, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Optional, Sequence

from twisted.internet import task

from mixminion.exits.context import ExitContext
from mixminion.exits.errors import ExitConfigError
from mixminion.server import control
from mixminion.server.config import ConfigError, ServerConfig, load_config
from mixminion.server.control import EXIT_FAILED, EXIT_OK, EXIT_USAGE, OperatorError
from mixminion.server.delivery import build_exits
from mixminion.server.keys import IDENTITY_FILE, InvalidKeyset, KeyStore, keyset_name, read_pem_key
from mixminion.server.paranoia import problems_for
from mixminion.server.pidfile import NodeAlreadyRunning, PidFile
from mixminion.server.statusview import judge_status, keys_lines, relative

#: seconds ``reload`` waits for the node's answer (it writes its status at
#: least every 10 seconds)
RELOAD_TIMEOUT = 15.0
#: seconds ``stop`` waits for the process to end
STOP_TIMEOUT = 60.0
#: seconds ``republish`` waits for the result of the upload
REPUBLISH_TIMEOUT = 90.0


def exit_problems(config: ServerConfig) -> list[str]:
    """What the exit modules find wrong in their sections (the rules in a
    BlacklistFile, the aliases of an AddressFile, a ReturnAddress they can
    use); building them opens nothing, and they are stopped at once."""
    context = ExitContext(base_dir=config.server.base_dir, clock=task.Clock(), reactor=task.Clock())
    try:
        build_exits(config, context).stop()
    except ExitConfigError as exc:
        return [f"{config.filename}: {exc}"]
    return []


def check(path: str) -> tuple[Optional[ServerConfig], list[str]]:
    """The parsed configuration (None if it cannot be read) and every
    problem found, each one line."""
    try:
        config = load_config(os.path.abspath(path))
    except ConfigError as exc:
        return None, list(exc.problems)
    return config, [str(p) for p in problems_for(config)] + exit_problems(config)


def _check(args: argparse.Namespace) -> int:
    config, problems = check(args.config)
    for problem in problems:
        print(problem)
    if problems:
        return 1
    assert config is not None
    for warning in config.warnings:
        print(f"warning: {warning}")
    print("OK")
    return 0


def _config(args: argparse.Namespace) -> ServerConfig:
    try:
        return load_config(os.path.abspath(args.config))
    except ConfigError as exc:
        raise OperatorError(str(exc), EXIT_USAGE) from None


def key_store(config: ServerConfig) -> KeyStore:
    server = config.server
    return KeyStore(server.key_dir, server.hashlog_dir, server.identity_key_bits,
                    server.public_key_lifetime, server.public_key_overlap)


def identity_fingerprint(config: ServerConfig) -> str:
    """The identity key's fingerprint, as descriptors and authorities spell it."""
    path = os.path.join(config.server.key_dir, IDENTITY_FILE)
    try:
        return read_pem_key(path).public.fingerprint
    except FileNotFoundError:
        raise OperatorError(f"no identity key at {path} (the node creates it at its "
                            "first start)") from None
    except PermissionError:
        raise control.permission_error(path) from None
    except InvalidKeyset as exc:
        raise OperatorError(str(exc)) from None


def _fingerprint(args: argparse.Namespace) -> int:
    print(identity_fingerprint(_config(args)))
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    config = _config(args)
    node = control.find_node(config.server.pid_file)
    doc = control.read_status(config.server.work_dir)
    lines, code = judge_status(doc, node, time.time(), control.status_path(config.server.work_dir))
    if args.json and doc is not None:
        print(json.dumps({**doc, "running": node.running}, indent=2))
    elif args.json:
        print(lines[0], file=sys.stderr)
    else:
        print("\n".join(lines))
    return code


def _signal_and_wait(args: argparse.Namespace, config: ServerConfig, signum: int, answered):
    """Signal the running node, then wait up to ``--timeout`` for its first
    status that ``answered(doc, sent)`` accepts (``sent``: the wall time of
    the signal).  Returns ``(pid, sent, doc)``; OperatorError if no answer
    came, and ``doc`` None for a node that writes no status (it cannot
    answer: the signal is all we know)."""
    pid = control.running_node(config.server.pid_file)
    work_dir = config.server.work_dir
    had_status = control.read_status(work_dir) is not None
    sent = time.time()
    control.send_signal(pid, signum)
    if not had_status:
        print(f"{signal.Signals(signum).name} sent to process {pid} (it writes no status "
              "to answer)")
        return pid, sent, None

    def answer():
        doc = control.status_since(work_dir, pid, sent)
        return doc if doc is not None and answered(doc, sent) else None
    doc = control.wait_for(answer, args.timeout)
    if doc is None:
        raise OperatorError(f"{signal.Signals(signum).name} sent to process {pid}; no answer "
                            f"within {args.timeout:g} s (see mixminiond status)")
    return pid, sent, doc


#: how the node's log says an upload round ended short of a majority
INCOMPLETE = "Publication incomplete"


def _since(doc: dict, sent: float, prefix: str) -> list[str]:
    """The node's last WARN/ERROR lines logged at or after ``sent`` that
    start with ``prefix``."""
    return [str(e.get("message")) for e in doc.get("last_errors") or []
            if isinstance(e, dict) and str(e.get("message")).startswith(prefix)
            and isinstance(e.get("time"), (int, float)) and e["time"] >= sent]


def _reload(args: argparse.Namespace) -> int:
    config = _config(args)
    problems = exit_problems(config)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        raise OperatorError("not reloaded: the node would refuse this configuration", EXIT_USAGE)
    pid, sent, doc = _signal_and_wait(args, config, signal.SIGHUP, lambda doc, sent: True)
    if doc is None:
        return EXIT_OK
    # What the node said of this reload (at WARN: a refusal, options that
    # need a restart) is among its last errors.
    said = _since(doc, sent, "SIGHUP")
    refused = [message for message in said if "not reloaded" in message]
    if refused:
        raise OperatorError(refused[-1])
    for message in said:
        print(message)
    print(f"reloaded (process {pid})")
    return EXIT_OK


def _stop(args: argparse.Namespace) -> int:
    config = _config(args)
    pid = control.running_node(config.server.pid_file)
    control.send_signal(pid, signal.SIGTERM)
    if not control.wait_for(lambda: not control.pid_alive(pid), args.timeout):
        raise OperatorError(f"process {pid} still runs {args.timeout:g} s after SIGTERM")
    print(f"stopped (process {pid})")
    return EXIT_OK


def _succeeded(doc: dict, sent: float) -> bool:
    success = (doc.get("publication") or {}).get("last_success")
    return isinstance(success, (int, float)) and success >= sent


def _round_ended(doc: dict, sent: float) -> bool:
    """The status shows an upload round that ended after ``sent``: a
    success, or the line the node logs when a round fell short."""
    return _succeeded(doc, sent) or bool(_since(doc, sent, INCOMPLETE))


def _republish(args: argparse.Namespace) -> int:
    config = _config(args)
    if not (config.directory.publish and config.directory.authorities):
        raise OperatorError("this node publishes no descriptor ([DirectoryServers] needs "
                            "Publish: yes and an Authority line)")
    _pid, sent, doc = _signal_and_wait(args, config, signal.SIGUSR2, _round_ended)
    if doc is None:
        return EXIT_OK
    publication = doc.get("publication") or {}
    if _succeeded(doc, sent):
        print(f"published to {', '.join(publication.get('authorities') or [])}")
        return EXIT_OK
    raise OperatorError(f"publication incomplete: {publication.get('last_error') or 'no majority'}"
                        " (the node retries on its own)")


def _keys(args: argparse.Namespace) -> int:
    config = _config(args)
    fingerprint = identity_fingerprint(config)
    keys = key_store(config)
    lock = None
    if args.delete_expired:
        # The running node is the only writer of its keys: hold its lock,
        # so that it can neither run now nor start while we delete.
        try:
            lock = PidFile(config.server.pid_file)
        except NodeAlreadyRunning:
            raise OperatorError("the node is running: it deletes expired keysets itself, at "
                                "each key rotation; stop it to delete them now") from None
        lock.write(os.getpid())
    try:
        now = time.time()
        unusable = {keyset_name(n): why for n, why in keys.inspect().items()}
        print("\n".join(keys_lines(fingerprint, keys.keysets, unusable, now, keys.overlap)))
        if lock is not None:
            deleted = keys.delete_dead(now)
            for keyset in deleted:
                print(f"deleted {keyset.name} (expired {relative(keyset.valid_until, now)})")
            if not deleted:
                print("no expired keysets to delete")
    finally:
        if lock is not None:
            lock.release()
    return EXIT_OK


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="mixminiond", description="Manage a Type III mix node "
                                  "(run it with: twistd mixminion -c mixminiond.conf).")
    commands = top.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, run, help: str, timeout: Optional[float] = None):
        sub = commands.add_parser(name, help=help, description=help)
        sub.add_argument("-c", "--config", required=True, metavar="FILE",
                         help="the node's configuration (mixminiond.conf)")
        if timeout is not None:
            sub.add_argument("--timeout", type=float, default=timeout, metavar="SECONDS",
                             help=f"how long to wait for the node (default {timeout:g})")
        sub.set_defaults(run=run)
        return sub

    command("check", _check, "check a configuration file without starting a node")
    command("fingerprint", _fingerprint, "print the node's identity key fingerprint")
    command("status", _status, "say whether the node runs, and how it is").add_argument(
        "--json", action="store_true", help="print the node's status document (JSON)")
    command("reload", _reload, "make the node re-read its configuration (SIGHUP)",
            RELOAD_TIMEOUT)
    command("stop", _stop, "stop the node (SIGTERM) and wait until it has ended", STOP_TIMEOUT)
    command("republish", _republish, "upload the node's descriptors to the authorities now "
            "(SIGUSR2)", REPUBLISH_TIMEOUT)
    command("keys", _keys, "list the keysets").add_argument(
        "--delete-expired", action="store_true",
        help="also delete expired keysets (only while the node is stopped)")
    return top


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except OperatorError as exc:
        print(f"mixminiond: {exc}", file=sys.stderr)
        return exc.code
    except BrokenPipeError:  # ``mixminiond status | head``: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"mixminiond: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, PermissionError) else EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
