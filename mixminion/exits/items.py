"""Delivery items and results (spec: server.md §9.1, §9.2; packet.md §14).

A :class:`DeliveryItem` is one payload that reached the exit, decoded once
when a module first looks at it: the routing info split into decoding
handle (tag) and address, and the payload classified by
:func:`mixminion.codec.exit.classify_payload`.  Modules only ever look at
items; they never re-parse payloads.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Optional

from mixminion.codec.exit import Classification, Corrupt, classify_compressed, classify_payload
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
    """One exit payload, from processing to its module: the one type the
    pool, the delivery queues and the modules share.

    Queues store the payload as the packet body and the other fields as
    the record (:mod:`mixminion.server.items`), so an item read back for
    mixing has an empty payload.  ``routing_info`` is all of it; ``tag``
    and ``address`` are its split by the tag rule of the module that
    takes the item (``uses_tag``; None: the codec's rule for the exit
    type), computed when first asked for.  ``payload`` is the 28 KiB
    decrypted payload or, for a message the FRAGMENT module reassembled
    (``reassembled``), its compressed body; ``classification`` is worked
    out from it once, when first asked for, unless ``classified`` gives it.
    """

    exit_type: int
    routing_info: bytes
    application_key: bytes = field(default=b"", repr=False)
    payload: bytes = field(default=b"", repr=False)
    queued_at: float = 0.0
    reassembled: bool = False
    uses_tag: Optional[bool] = None
    classified: Optional[Classification] = field(default=None, repr=False, compare=False)

    @cached_property
    def _split(self) -> tuple[bytes, bytes]:
        return split_routing_info(self.exit_type, self.routing_info,
                                  False if self.reassembled else self.uses_tag)

    @property
    def tag(self) -> bytes:
        """The decoding handle; raises :class:`UndeliverableItem` when a
        tagged module's routing info is shorter than 20 bytes."""
        return self._split[0]

    @property
    def address(self) -> bytes:
        return self._split[1]

    @cached_property
    def classification(self) -> Classification:
        if self.classified is not None:
            return self.classified
        if self.reassembled:
            return classify_compressed(self.payload)
        return classify_payload(self.payload)

    def for_module(self, uses_tag: bool) -> "DeliveryItem":
        """This item as a module with that tag rule reads it."""
        if uses_tag is self.uses_tag or self.reassembled:
            return self
        return replace(self, uses_tag=uses_tag)

    @property
    def is_corrupt(self) -> bool:
        return isinstance(self.classification, Corrupt)

    @property
    def kind(self) -> str:
        """``plain``, ``overcompressed``, ``fragment``, ``encrypted`` or
        ``corrupt``: for logs and counters (never the contents)."""
        return self.classification.kind


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
    """An item whose routing info is checked now (server.md §9.1).

    Raises :class:`UndeliverableItem` when a tagged module's routing info is
    shorter than 20 bytes.  A payload that does not decode gets a
    :class:`~mixminion.codec.exit.Corrupt` classification; the dispatcher
    drops such items.
    """
    item = DeliveryItem(exit_type, routing_info, application_key, payload, queued_at,
                        uses_tag=uses_tag)
    item.tag  # noqa: B018 - raises UndeliverableItem now, not in a module
    return item


def make_reassembled_item(exit_type: int, address: bytes, compressed: bytes,
                          queued_at: float = 0.0) -> DeliveryItem:
    """The item for a message the FRAGMENT module put back together
    (fragments.md §5.3): no tag, the address is the routing info carried in
    the message, and decompression is limited to 20 x the compressed
    length (beyond: overcompressed)."""
    return DeliveryItem(exit_type, address, b"", compressed, queued_at, reassembled=True,
                        uses_tag=False)
