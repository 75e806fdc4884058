"""The record the node's queues keep beside each packet body: where a relay
packet goes (a :class:`NextHop`), or what an exit payload is for (a
:class:`DeliveryItem`, its payload being the body).

Kept as small JSON documents in the packet store's ``meta`` column so a
pool of 50,000 packets can be mixed without reading a single packet.
"""

from __future__ import annotations

import json
from typing import Union

from mixminion.codec.routing import NextHop
from mixminion.exits.items import DeliveryItem

Item = Union[NextHop, DeliveryItem]


def encode_item(item: Item, **extra: object) -> bytes:
    """The record of ``item`` (an exit item's payload is not in it) and
    any ``extra`` fields (retry state...)."""
    if isinstance(item, NextHop):
        doc = {"k": "relay", "host": item.host, "port": item.port, "keyid": item.keyid.hex()}
    else:
        doc = {"k": "exit", "type": item.exit_type, "ri": item.routing_info.hex(),
               "app": item.application_key.hex()}
        if item.reassembled:
            doc["re"] = 1
    doc.update(extra)
    return json.dumps(doc, separators=(",", ":")).encode()


def decode_item(meta: bytes) -> tuple[Item, dict]:
    """The item (an exit item without its payload) and the extra fields
    stored with it."""
    doc = json.loads(meta)
    kind = doc.pop("k")
    if kind == "relay":
        item: Item = NextHop(doc.pop("host"), doc.pop("port"), bytes.fromhex(doc.pop("keyid")))
    elif kind == "exit":
        item = DeliveryItem(doc.pop("type"), bytes.fromhex(doc.pop("ri")),
                            bytes.fromhex(doc.pop("app")), reassembled=bool(doc.pop("re", 0)))
    else:
        raise ValueError(f"unknown queue item kind {kind!r}")
    return item, doc


__all__ = ["NextHop", "DeliveryItem", "Item", "encode_item", "decode_item"]
