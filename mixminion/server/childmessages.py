"""The messages between the node and its processing child.

One dataclass per message, used by both ends
(:class:`mixminion.server.processing.Processor` and
:mod:`mixminion.server.processing_child`); on the pipe each is one JSON
line ``{"kind": ..., fields...}``.  No Twisted here: the child imports it.

node -> child: :class:`Keys`, :class:`Drain`, :class:`More`.
child -> node: :class:`Ready`, :class:`Batch`, :class:`Idle`,
:class:`Paused`, :class:`Failed`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Optional, Union


@dataclass(frozen=True)
class Keys:
    """The packet keys to decrypt with, newest first (PKCS#1 DER)."""

    keys: tuple[bytes, ...]


@dataclass(frozen=True)
class Drain:
    """Process what is queued, up to the last incoming id the node
    committed, stamping items on the node's clock (its monotonic clock
    plus ``clock``; None: the wall clock), while the store's disks keep
    ``floor`` bytes free."""

    through: int
    clock: Optional[float] = None
    floor: int = 0


@dataclass(frozen=True)
class More:
    """The node committed more, up to incoming id ``through``: a drain under
    way goes on to it rather than end and wait for the next Drain (a
    packet that arrives during a drain waits for one batch, not for the
    whole drain).  Outside a drain it says nothing the next Drain will
    not."""

    through: int


@dataclass(frozen=True)
class Ready:
    """The child's stores are open and its lock held."""


@dataclass(frozen=True)
class Batch:
    """One committed batch: incoming ids up to ``through`` are done;
    ``counts`` are the outcomes to count."""

    through: int
    counts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Idle:
    """The queue is empty."""


@dataclass(frozen=True)
class Paused:
    """``path``'s disk has ``free`` bytes, under the drain's ``floor``:
    the rest waits in the incoming log; ask again later."""

    path: str
    free: int
    floor: int


@dataclass(frozen=True)
class Failed:
    """A drain failed (``why``); ask again."""

    why: str


Message = Union[Keys, Drain, More, Ready, Batch, Idle, Paused, Failed]

_KINDS: dict[str, type] = {cls.__name__.lower(): cls
                           for cls in (Keys, Drain, More, Ready, Batch, Idle, Paused, Failed)}


def encode(message: Message) -> bytes:
    """The message as one line (newline included)."""
    fields: dict[str, Any] = dataclasses.asdict(message)
    if isinstance(message, Keys):
        fields["keys"] = [key.hex() for key in message.keys]
    return json.dumps({"kind": type(message).__name__.lower(), **fields}).encode() + b"\n"


def decode(line: bytes) -> Message:
    """The message on ``line``; ValueError if it is not one."""
    try:
        fields = json.loads(line)
        cls = _KINDS[fields.pop("kind")]
        if cls is Keys:
            fields["keys"] = tuple(bytes.fromhex(key) for key in fields["keys"])
        return cls(**fields)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"not a processing message: {exc}") from None
