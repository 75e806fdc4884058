"""The names of the node's queues, in the order a packet passes them.

``incoming`` is the append-only log reception writes; the others are
tables of the main packet store (doc/server.md, "Map").
"""

from __future__ import annotations

#: received packets, not processed yet
INCOMING = "incoming"
#: the pool: processed items waiting for a mix time
MIX = "mix"
#: relay packets waiting for their next hop
OUT = "out"
#: pings that came back to this node (PING exits carrying a handle), for
#: its pinger: kept apart from the pool so that our own mixing delay is not
#: part of the round trip measured; the row's meta is the handle, its
#: ``added`` the time processing took it, its body empty
PING = "ping"
#: where an item goes that can no longer be delivered as it is (its body is
#: unreadable, its record damaged): out of its module's way, kept for the
#: operator to look at, counted and logged once
QUARANTINE = "quarantine/deliver"


def delivery_queue(module_name: str) -> str:
    """Exit payloads waiting for the exit module ``module_name``."""
    return f"deliver/{module_name}"
