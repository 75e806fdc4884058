"""Replay logs kept in the node's packet store.

Recording a packet's replay value and queueing what the packet became must
happen in one transaction: if the log entry were durable and the queued
item not, a crash would lose an acknowledged packet (its resend would be
refused as a replay); the other way round, a crash would let a replay
through.  So the node's replay logs are a table of the packet store, and
processing commits entries and results together.
"""

from __future__ import annotations

from typing import Iterable

from mixminion.codec.replay import ReplayLog, check_entry
from mixminion.server.packetstore import PacketStore


class StoreReplayLog(ReplayLog):
    """The replay log of one packet key (``key_digest`` =
    ``H(DER(packet public key))``) inside a :class:`PacketStore`.

    Inside ``store.transaction()`` its entries commit with everything else
    in the transaction; outside one, each call commits on its own.
    """

    def __init__(self, store: PacketStore, key_digest: bytes) -> None:
        if len(key_digest) != 20:
            raise ValueError("key_digest is the 20-byte H(DER(packet public key))")
        self.store = store
        self.key_digest = key_digest

    def seen_or_add(self, entry: bytes) -> bool:
        return self.seen_or_add_many([entry])[0]

    def seen_or_add_many(self, entries: Iterable[bytes]) -> list[bool]:
        entries = list(entries)
        for entry in entries:
            check_entry(entry)
        return self.store.replay_seen_or_add_many(self.key_digest, entries)

    def close(self) -> None:
        """Nothing to release: the store owns the connection."""

    def forget(self) -> None:
        """Delete every entry, when the packet key is retired."""
        self.store.forget_replay_log(self.key_digest)
