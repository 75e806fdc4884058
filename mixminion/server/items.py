"""What the pipeline stores beside each packet, between processing and
delivery: where a relay packet goes, or what an exit payload is for.

Kept as small JSON documents in the packet store's ``meta`` column so a
pool of 50,000 packets can be mixed without reading a single packet.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Union

from mixminion.codec.routing import NextHop


@dataclass(frozen=True)
class ExitItem:
    """A decrypted payload waiting for the exit module of its type."""

    exit_type: int
    routing_info: bytes
    application_key: bytes


Item = Union[NextHop, ExitItem]


def encode_item(item: Item, **extra: object) -> bytes:
    if isinstance(item, NextHop):
        doc = {"k": "relay", "host": item.host, "port": item.port, "keyid": item.keyid.hex()}
    else:
        doc = {"k": "exit", "type": item.exit_type, "ri": item.routing_info.hex(),
               "app": item.application_key.hex()}
    doc.update(extra)
    return json.dumps(doc, separators=(",", ":")).encode()


def decode_item(meta: bytes) -> tuple[Item, dict]:
    """The item and any extra fields (retry state...) stored with it."""
    doc = json.loads(meta)
    kind = doc.pop("k")
    if kind == "relay":
        item: Item = NextHop(doc.pop("host"), doc.pop("port"), bytes.fromhex(doc.pop("keyid")))
    elif kind == "exit":
        item = ExitItem(doc.pop("type"), bytes.fromhex(doc.pop("ri")), bytes.fromhex(doc.pop("app")))
    else:
        raise ValueError(f"unknown queue item kind {kind!r}")
    return item, doc


__all__ = ["NextHop", "ExitItem", "Item", "encode_item", "decode_item"]
