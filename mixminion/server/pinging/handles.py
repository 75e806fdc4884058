"""The handle a ping's PING exit carries (doc/reliability.md §1).

The handle is 20 random bytes and nothing else: no counter, no time, no
key derived from the path.  Any PING exit's routing info looks the same, so
the packet says no more than that it is a ping; only the pinger's store
(:meth:`mixminion.server.pinging.store.PingStore.lookup`) links a handle
to the ping it sent.
"""

from __future__ import annotations

import os
from typing import Optional

from mixminion.codec.crypto import RandomSource

#: bytes of a handle: the PING exit's whole routing info
HANDLE_LEN = 20


def new_handle(rng: RandomSource = os.urandom) -> bytes:
    """A fresh handle: unguessable, so nobody can fake a ping's return."""
    return rng(HANDLE_LEN)


def handle_of(routing_info: bytes) -> Optional[bytes]:
    """The handle in a delivered PING exit's routing info, or None when it
    cannot be one of ours (wrong length)."""
    return bytes(routing_info) if len(routing_info) == HANDLE_LEN else None
