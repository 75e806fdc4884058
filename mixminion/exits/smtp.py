"""The SMTP exit module: mails exit type SMTP (0x0100) to the address in
the routing info (spec: server.md §9.3, §9.5, §14.9 ``[Delivery/SMTP]``)."""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

from zope.interface import implementer

from mixminion.events import Event
from mixminion.codec.errors import ParseError
from mixminion.codec.routing import SMTP_TYPE, check_smtp_address
from mixminion.exits.blacklist import Blacklist
from mixminion.exits.context import ExitContext
from mixminion.exits.interfaces import IExitModule
from mixminion.exits.items import DeliveryItem
from mixminion.exits.mail import MAX_ADDRESS, Drop, MailModule
from mixminion.exits.options import SMTP


@implementer(IExitModule)
class SMTPModule(MailModule):
    """Checks the address (a mailbox, not an IP literal, not blacklisted)
    and sends through the configured MTA."""

    name = "SMTP"
    exit_types = frozenset({SMTP_TYPE})
    spec = SMTP

    def __init__(self) -> None:
        super().__init__()
        self.blacklist: Optional[Blacklist] = None

    def _configure_more(self, values: Mapping[str, Any], context: ExitContext) -> None:
        if values["BlacklistFile"] is not None:
            path = os.path.join(context.base_dir, values["BlacklistFile"])
            self.blacklist = Blacklist.from_file(path)
            self.log.info("Loaded {n} blacklist rules", n=len(self.blacklist))

    def recipient(self, item: DeliveryItem) -> str:
        try:
            if len(item.address) > MAX_ADDRESS:
                raise ParseError("address too long")
            check_smtp_address(item.address)
        except ParseError:
            raise Drop("the address is not a valid mailbox", Event.EXIT_INVALID_ADDRESS) from None
        address = item.address.decode("ascii")
        if self.blacklist is not None and self.blacklist.match(address) is not None:
            raise Drop("the address is blacklisted", Event.EXIT_BLACKLISTED)
        return address
