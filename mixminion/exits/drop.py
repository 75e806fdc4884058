"""The DROP exit module: counts and discards (exit type 0x0000).

Processing already discards DROP packets as dummies (server.md §18 item 5),
so this module mostly serves items made by other means; it is always
enabled and has no configuration section.
"""

from __future__ import annotations

from typing import Any, Mapping

from twisted.internet import defer

from mixminion.events import Event
from mixminion.codec.routing import DROP_TYPE
from mixminion.exits.context import ExitContext
from mixminion.exits.errors import ExitConfigError
from mixminion.exits.interfaces import ExitModuleBase
from mixminion.exits.items import DeliveryItem, DeliveryResult


class DropModule(ExitModuleBase):
    name = "DROP"
    exit_types = frozenset({DROP_TYPE})
    uses_tag = False

    def __init__(self) -> None:
        self.dropped = 0

    def configure(self, section: Mapping[str, Any], context: ExitContext) -> None:
        unknown = set(section or {}) - {"Enabled"}
        if unknown:
            raise ExitConfigError(f"DROP takes no options (got {', '.join(sorted(unknown))})")
        self.context = context

    def deliver(self, item: DeliveryItem) -> defer.Deferred:
        self.dropped += 1
        if self.context is not None:
            self.context.count(Event.EXIT_DROP_MODULE)
        return defer.succeed(DeliveryResult.OK)
