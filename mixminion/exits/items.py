"""Delivery items and results (spec: server.md §9.1, §9.2; packet.md §14).

A :class:`DeliveryItem` is one payload that reached the exit, decoded once:
the routing info split into decoding handle (tag) and address, and the
payload classified by :func:`mixminion.codec.exit.classify_payload`.
Modules only ever look at items; they never re-parse payloads.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

from mixminion.codec.exit import (
    Classification,
    Corrupt,
    Encrypted,
    FragmentPiece,
    Overcompressed,
    Plain,
    classify_compressed,
    classify_payload,
)
from mixminion.codec.routing import TAG_LEN, TAGLESS_EXIT_TYPES, is_exit_type
from mixminion.exits.errors import UndeliverableItem


class DeliveryResult(enum.Enum):
    """What a module did with an item (server.md §9.2)."""

    #: delivered (or deliberately discarded): delete the item
    OK = "ok"
    #: temporary failure: keep the item and retry per the module's schedule (§6.3)
    RETRY = "retry"
    #: permanent failure: delete the item
    NORETRY = "noretry"


@dataclass(frozen=True)
class DeliveryItem:
    """One payload for one exit module.

    ``payload`` is the 28 KiB decrypted payload, or, for a message the
    FRAGMENT module reassembled (``reassembled`` true), its compressed body.
    ``classification`` was computed from it once, when the item was made.
    """

    exit_type: int
    address: bytes
    tag: bytes
    application_key: bytes = field(repr=False)
    classification: Classification = field(repr=False)
    payload: bytes = field(repr=False)
    queued_at: float
    reassembled: bool = False

    @property
    def is_corrupt(self) -> bool:
        return isinstance(self.classification, Corrupt)

    @property
    def kind(self) -> str:
        """``plain``, ``overcompressed``, ``fragment``, ``encrypted`` or
        ``corrupt``: for logs and counters (never the contents)."""
        return _KINDS[type(self.classification)]


_KINDS = {
    Plain: "plain",
    Overcompressed: "overcompressed",
    FragmentPiece: "fragment",
    Encrypted: "encrypted",
    Corrupt: "corrupt",
}


def split_routing_info(exit_type: int, routing_info: bytes, uses_tag: Optional[bool] = None) -> tuple[bytes, bytes]:
    """``(tag, address)`` by the rule of §9.1: a module that uses decoding
    handles takes the first 20 bytes as the tag (fewer: the item is
    dropped); the others take the whole routing info as the address.
    ``uses_tag=None`` applies the codec's default for the exit type."""
    if uses_tag is None:
        uses_tag = is_exit_type(exit_type) and exit_type not in TAGLESS_EXIT_TYPES
    if not uses_tag:
        return b"", routing_info
    if len(routing_info) < TAG_LEN:
        raise UndeliverableItem(
            f"routing info of {len(routing_info)} bytes cannot hold a {TAG_LEN}-byte decoding handle")
    return routing_info[:TAG_LEN], routing_info[TAG_LEN:]


def make_delivery_item(
    exit_type: int,
    routing_info: bytes,
    payload: bytes,
    application_key: bytes = b"",
    queued_at: float = 0.0,
    uses_tag: Optional[bool] = None,
) -> DeliveryItem:
    """Decode what processing handed over for an exit (server.md §9.1).

    Raises :class:`UndeliverableItem` when a tagged module's routing info is
    shorter than 20 bytes.  A payload that does not decode gets a
    :class:`~mixminion.codec.exit.Corrupt` classification; the dispatcher
    drops such items.
    """
    tag, address = split_routing_info(exit_type, routing_info, uses_tag)
    return DeliveryItem(exit_type, address, tag, application_key, classify_payload(payload),
                        payload, queued_at)


def make_reassembled_item(exit_type: int, address: bytes, compressed: bytes,
                          queued_at: float = 0.0) -> DeliveryItem:
    """The item for a message the FRAGMENT module put back together
    (fragments.md §5.3): no tag, the address is the routing info carried in
    the message, and decompression is limited to 20 x the compressed
    length (beyond: overcompressed)."""
    return DeliveryItem(exit_type, address, b"", b"", classify_compressed(compressed), compressed,
                        queued_at, reassembled=True)
