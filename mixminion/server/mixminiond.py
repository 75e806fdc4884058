"""``mixminiond``: the operator's command beside ``twistd mixminion``.

``mixminiond check -c FILE`` reads a configuration the way the node
would (syntax, every option's type, the cross-field rules, which exit
modules are installed, file permissions) without starting anything, like
``tor --verify-config``: it prints ``OK`` and exits 0, or prints each
problem on a line of its own and exits 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from twisted.internet import task

from mixminion.exits.context import ExitContext
from mixminion.exits.errors import ExitConfigError
from mixminion.server.config import ConfigError, ServerConfig, load_config
from mixminion.server.delivery import build_exits
from mixminion.server.paranoia import problems_for


def check(path: str) -> tuple[Optional[ServerConfig], list[str]]:
    """The parsed configuration (None if it cannot be read) and every
    problem found, each one line."""
    try:
        config = load_config(os.path.abspath(path))
    except ConfigError as exc:
        return None, list(exc.problems)
    problems = [str(p) for p in problems_for(config)]
    # The exit modules check what only they know (the rules in a
    # BlacklistFile, the aliases of an AddressFile, a ReturnAddress they can
    # use); building them opens nothing, and they are stopped at once.
    context = ExitContext(base_dir=config.server.base_dir, clock=task.Clock(), reactor=task.Clock())
    try:
        build_exits(config, context).stop()
    except ExitConfigError as exc:
        problems.append(f"{config.filename}: {exc}")
    return config, problems


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


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="mixminiond", description="Manage a Type III mix node "
                                  "(run it with: twistd mixminion -c mixminiond.conf).")
    commands = top.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub = commands.add_parser("check", help="check a configuration file without starting a node")
    sub.add_argument("-c", "--config", required=True, metavar="FILE",
                     help="the node's configuration (mixminiond.conf)")
    sub.set_defaults(run=_check)
    return top


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
