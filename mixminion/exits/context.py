"""What the node gives each exit module: directories, time, logging,
counters, and a way to hand a new item back to the node's delivery queues."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol

from twisted.logger import Logger

from mixminion.directory.descriptor import DeliveryInfo
from mixminion.mmtp.stats import MMTPStats

if TYPE_CHECKING:
    from mixminion.exits.items import DeliveryItem


class Counters(Protocol):
    """Anything with ``count(event, n)``, such as the node's statistics."""

    def count(self, event: str, n: int = 1) -> None: ...


class HandBack:
    """How a module hands an item it made (FRAGMENT: a reassembled
    message) to the node, which queues it for the module of its exit type
    like any exit payload.  The node's delivery stage connects itself when
    it starts; the call is durable once it returns, and raises if nothing
    is connected or the queue cannot take the item."""

    def __init__(self) -> None:
        self._target: Optional[Callable[["DeliveryItem"], None]] = None

    def connect(self, target: Callable[["DeliveryItem"], None]) -> None:
        self._target = target

    def __call__(self, item: "DeliveryItem") -> None:
        if self._target is None:
            raise RuntimeError("no delivery queue is connected to take the item")
        self._target(item)


class NodeLink:
    """What a module that sends packets as this node needs from it (the
    NYM module): :meth:`own_hop`, this node as a hop of a path (None while
    it has no descriptor valid now), and :meth:`inject`, which puts a
    packet in the node's incoming queue as if it came over MMTP (a
    Deferred that fires once it is durably stored).  The node connects it
    once it has keys and a queue.

    ``services`` keeps what a module runs for the node's whole life (a
    listener, a store): a SIGHUP rebuilds the modules, the new one finds
    the running service here and reconfigures it; :meth:`adopt` hands the
    services to the node to start and stop."""

    def __init__(self) -> None:
        self._own_hop: Optional[Callable[[], Any]] = None
        self._inject: Optional[Callable[[bytes], Any]] = None
        self.services: dict[str, Any] = {}
        self._adopter: Optional[Callable[[Any], None]] = None

    def connect(self, own_hop: Callable[[], Any], inject: Callable[[bytes], Any],
                adopt: Callable[[Any], None]) -> None:
        self._own_hop, self._inject, self._adopter = own_hop, inject, adopt
        for svc in self.services.values():
            adopt(svc)

    def own_hop(self) -> Any:
        return self._own_hop() if self._own_hop is not None else None

    def inject(self, packet: bytes) -> Any:
        if self._inject is None:
            raise RuntimeError("no node is connected to take the packet")
        return self._inject(packet)

    def keep(self, name: str, svc: Any) -> None:
        """Run ``svc`` for the node's life (started with the node, or at
        once if the node runs already)."""
        self.services[name] = svc
        if self._adopter is not None:
            self._adopter(svc)


@dataclass(frozen=True)
class ExitContext:
    """Shared services for exit modules.

    ``base_dir`` is the server's BaseDir; a module keeps its files in
    :meth:`module_dir`.  ``clock`` gives the time schedules count (a
    ``task.Clock`` in tests; the node's clock ignores wall-clock steps),
    ``wall`` (by default ``clock``) the date written on a message;
    ``reactor`` makes connections and processes.  ``hand_back`` queues an
    item a module made for delivery by another module; ``node_link``
    sends packets as this node and keeps services across reconfigurations.
    """

    base_dir: str
    clock: Any
    reactor: Any = None
    log_namespace: str = "mixminion.exits"
    counters: Counters = dataclasses.field(default_factory=MMTPStats)
    hand_back: HandBack = dataclasses.field(default_factory=HandBack)
    wall: Any = None
    node_link: NodeLink = dataclasses.field(default_factory=NodeLink)

    def __post_init__(self) -> None:
        if self.reactor is None:
            from twisted.internet import reactor

            object.__setattr__(self, "reactor", reactor)
        if self.wall is None:
            object.__setattr__(self, "wall", self.clock)

    def for_module(self, name: str) -> "ExitContext":
        """This context with a log namespace of the module's own."""
        return dataclasses.replace(self, log_namespace=f"{self.log_namespace}.{name.lower()}")

    def module_dir(self, name: str) -> str:
        """``BaseDir/deliver/NAME``, created (mode 0700) if missing."""
        path = os.path.join(self.base_dir, "deliver", name)
        os.makedirs(path, mode=0o700, exist_ok=True)
        return path

    def logger(self, source: object = None) -> Logger:
        return Logger(namespace=self.log_namespace, source=source)

    def now(self) -> float:
        return self.clock.seconds()

    def count(self, event: str, n: int = 1) -> None:
        self.counters.count(event, n)


@dataclass(frozen=True)
class Advertisement:
    """A descriptor section a module publishes.

    ``fields`` are the lines in order; ``descriptor_value`` is the same
    information for :class:`~mixminion.directory.descriptor.DescriptorFields`
    (a :class:`DeliveryInfo` for MBOX/SMTP, the fragment count for
    ``Delivery/Fragmented``).
    """

    section: str
    fields: tuple[tuple[str, str], ...]
    descriptor_value: Any = None


def mail_advertisement(section: str, max_size: int, allow_from: bool) -> Advertisement:
    """``[Delivery/MBOX]`` or ``[Delivery/SMTP]``: version, size in KiB,
    whether a sender's From name is honoured."""
    kib = max_size // 1024
    return Advertisement(
        section,
        (("Version", "0.1"), ("Maximum-Size", str(kib)), ("Allow-From", "yes" if allow_from else "no")),
        DeliveryInfo(max_size_kib=kib, allow_from=allow_from),
    )
