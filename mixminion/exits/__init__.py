"""Exit (delivery) modules: SMTP, MBOX, FRAGMENT, DROP, and any found as
Twisted plugins under ``mixminion/plugins`` (spec: server.md §9).

The node uses :func:`mixminion.exits.registry.build_dispatcher` to
configure the enabled modules, then hands each exit payload to
``Dispatcher.deliver_payload`` (or an item made with
:func:`make_delivery_item` to ``Dispatcher.deliver``) and applies the
:class:`DeliveryResult`.
"""

from mixminion.exits.context import Advertisement, ExitContext
from mixminion.exits.errors import (
    BrokenExitPlugin,
    ExitConfigError,
    ExitError,
    MissingExitModule,
    UndeliverableItem,
)
from mixminion.exits.interfaces import IExitModule, IExitModuleFactory
from mixminion.exits.items import (
    DeliveryItem,
    DeliveryResult,
    make_delivery_item,
    make_reassembled_item,
    split_routing_info,
)

__all__ = [
    "Advertisement", "ExitContext", "BrokenExitPlugin", "ExitConfigError", "ExitError",
    "MissingExitModule", "UndeliverableItem", "IExitModule", "IExitModuleFactory", "DeliveryItem",
    "DeliveryResult", "make_delivery_item", "make_reassembled_item", "split_routing_info",
]
