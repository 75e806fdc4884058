"""Exit (delivery) modules: SMTP, MBOX, FRAGMENT, DROP, and any found as
Twisted plugins under ``mixminion/plugins`` (spec: server.md §9).

The node uses :func:`mixminion.exits.registry.build_dispatcher` to
configure the enabled modules, then hands each exit payload, a
:class:`DeliveryItem`, to ``Dispatcher.deliver`` and applies the
:class:`DeliveryResult`.

The names below are imported when first used: the processing child
imports :mod:`mixminion.exits.items` alone, and must not pay for Twisted's
logger and the descriptor code that :mod:`mixminion.exits.context` pulls in
(about 10 MB of its memory).
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "Advertisement": "context", "ExitContext": "context",
    "BrokenExitPlugin": "errors", "ExitConfigError": "errors", "ExitError": "errors",
    "MissingExitModule": "errors", "UndeliverableItem": "errors",
    "IExitModule": "interfaces", "IExitModuleFactory": "interfaces",
    "DeliveryItem": "items", "DeliveryResult": "items", "make_delivery_item": "items",
    "make_reassembled_item": "items", "split_routing_info": "items",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
