"""The record the node's queues keep beside each packet body: where a relay
packet goes (a :class:`NextHop`), or what an exit payload is for (a
:class:`DeliveryItem`, its payload being the body).

Kept as small JSON documents in the packet store's ``meta`` column so a
pool of 50,000 packets can be mixed without reading a single packet.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional, Union

from mixminion.codec.routing import NextHop
from mixminion.exits.items import DeliveryItem

Item = Union[NextHop, DeliveryItem]


@dataclass(frozen=True)
class RetryTimes:
    """What a delivery queue keeps of an item's retries (server.md §6.3):
    when its schedule started (None: when the item joined the queue) and
    its last failed attempt (None: not tried yet)."""

    queued: Optional[float] = None
    last: Optional[float] = None


NOT_TRIED = RetryTimes()


def encode_item(item: Item, retry: RetryTimes = NOT_TRIED) -> bytes:
    """The record of ``item`` (an exit item's payload is not in it) and of
    its retries."""
    if isinstance(item, NextHop):
        doc = {"k": "relay", "host": item.host, "port": item.port, "keyid": item.keyid.hex()}
    else:
        doc = {"k": "exit", "type": item.exit_type, "ri": item.routing_info.hex(),
               "app": item.application_key.hex()}
        if item.reassembled:
            doc["re"] = 1
    if retry.queued is not None:
        doc["queued"] = retry.queued
    if retry.last is not None:
        doc["last"] = retry.last
    return json.dumps(doc, separators=(",", ":")).encode()


def decode_item(meta: bytes) -> tuple[Item, RetryTimes]:
    """The item (an exit item without its payload) and its retries."""
    doc = json.loads(meta)
    kind = doc.pop("k")
    if kind == "relay":
        item: Item = NextHop(doc.pop("host"), doc.pop("port"), bytes.fromhex(doc.pop("keyid")))
    elif kind == "exit":
        item = DeliveryItem(doc.pop("type"), bytes.fromhex(doc.pop("ri")),
                            bytes.fromhex(doc.pop("app")), reassembled=bool(doc.pop("re", 0)))
    else:
        raise ValueError(f"unknown queue item kind {kind!r}")
    return item, RetryTimes(doc.get("queued"), doc.get("last"))


__all__ = ["NextHop", "DeliveryItem", "Item", "RetryTimes", "NOT_TRIED", "encode_item",
           "decode_item"]
