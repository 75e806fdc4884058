"""The MBOX exit module: mails exit type MBOX (0x0101) to the address an
alias file gives for the mailbox name in the routing info (spec: server.md
§9.4, §14.9 ``[Delivery/MBOX]``).

Mail goes to the MTA like the SMTP module's, or, with the ``MboxFile``
option (ours, for local tests), is appended to an mbox file.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

from zope.interface import implementer

from mixminion.events import Event
from mixminion.codec.routing import MBOX_TYPE
from mixminion.exits.context import ExitContext
from mixminion.exits.errors import ExitConfigError
from mixminion.exits.interfaces import IExitModule
from mixminion.exits.items import DeliveryItem
from mixminion.exits.mail import Drop, MailModule
from mixminion.exits.mta import MboxFile
from mixminion.exits.options import MBOX

_ALIAS = re.compile(r"([^\s:=]+)\s*[:=]\s*(\S+)\Z")
_MAILBOXISH = re.compile(r"[^@\s]+@[^@\s]+\Z")


def parse_address_file(text: str) -> dict[str, str]:
    """``name: address`` or ``name = address`` lines; blank and ``#`` lines
    ignored; anything else is an error.  Names are case-sensitive."""
    aliases: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        m = _ALIAS.match(stripped)
        if not m:
            raise ExitConfigError(f"address file line {number}: expected 'name: address'")
        name, address = m.groups()
        if not all(0x21 <= ord(c) <= 0x7E for c in name + address):
            raise ExitConfigError(f"address file line {number}: only printable ASCII is allowed")
        aliases[name] = address
    return aliases


@implementer(IExitModule)
class MBOXModule(MailModule):
    """Looks the mailbox name up in ``AddressFile``; unknown names are
    dropped."""

    name = "MBOX"
    exit_types = frozenset({MBOX_TYPE})
    spec = MBOX

    def __init__(self) -> None:
        super().__init__()
        self.aliases: Mapping[str, str] = {}
        self.remove_contact = ""

    def _configure_more(self, values: Mapping[str, Any], context: ExitContext) -> None:
        if values["FromTag"] != self.spec.default("FromTag"):
            raise ExitConfigError("[Delivery/MBOX] FromTag: MBOX always signs its mail [Anon]")
        if values["AddressFile"] is None:
            raise ExitConfigError("[Delivery/MBOX] AddressFile is required")
        path = os.path.join(context.base_dir, values["AddressFile"])
        try:
            with open(path, encoding="ascii") as f:
                self.aliases = parse_address_file(f.read())
        except (OSError, UnicodeDecodeError) as exc:
            raise ExitConfigError(f"[Delivery/MBOX] cannot read AddressFile {path}: {exc}") from None
        if not values["RemoveContact"]:
            raise ExitConfigError("[Delivery/MBOX] RemoveContact is required")
        self.remove_contact = values["RemoveContact"]
        assert self.options is not None
        for key, value in (("ReturnAddress", self.options.return_address),
                           ("RemoveContact", self.remove_contact)):
            if not _MAILBOXISH.match(value):
                self.log.warn("[Delivery/MBOX] {key} does not look like an e-mail address", key=key)
        if values["MboxFile"] is not None:
            if values["SMTPServer"] is not None or values["SendmailCommand"] is not None:
                raise ExitConfigError("[Delivery/MBOX] MboxFile excludes SMTPServer and SendmailCommand")
            mbox_path = os.path.join(context.base_dir, values["MboxFile"])
            self.transport = MboxFile(mbox_path, context.wall, context.logger())
        self.log.info("Loaded {n} mailbox aliases", n=len(self.aliases))

    def recipient(self, item: DeliveryItem) -> str:
        try:
            name = item.address.decode("ascii")
        except UnicodeDecodeError:
            name = ""
        if not name or name not in self.aliases:
            raise Drop("no such mailbox", Event.EXIT_UNKNOWN_MAILBOX)
        return self.aliases[name]
