"""The outgoing queue: relay packets to next hops over MMTP, with retries
per destination address (server.md §4.4, §6.4).

A packet leaves the queue only when the next hop answered RECEIVED; a
failure keeps it and marks its address failed, so everything queued for
that address waits for the address's next retry time and then goes out
together.  Packets older than the whole retry schedule are dropped.

``[Outgoing/MMTP] Allow``/``Deny`` (server.md §14.6) are enforced too: a
packet whose next hop the rules deny is removed, not kept for a retry (a
denied hop stays denied; keeping its packets would only fill the queue)
and counted as ``RelayDenied``.  A next hop given as an IP literal is
judged here, before MMTP sees it; one given as a hostname is judged by the
MMTP client once TCP has connected (the address the name led to), and
comes back as :class:`NextHopDenied`.  Which addresses were denied is
logged at debug only (server.md §11: no routing data above debug).

Fair scheduling (issue 12).  Anyone can make us relay to next hops of
their choosing, by the thousand, that accept TCP and never answer; before
this, the first 512 ready packets in queue order were handed to MMTP and
the rest waited for them, so one honest packet queued behind 6,000 such
hops waited for hours.  Now:

* ready packets wait here per destination, and destinations take turns:
  each turn hands one packet of one destination to MMTP;
* at most :attr:`Outgoing.max_in_flight_per_destination` packets of one
  destination are with MMTP at once (the rest stay on disk, not in
  memory);
* destinations that have not answered yet, or whose last attempt failed
  (*on probation*), together have at most
  :attr:`Outgoing.max_in_flight_on_probation` packets in flight, so the
  rest of the window is always there for next hops that answer, and those
  take their turns first.

The MMTP client applies the same distinction to its connection slots
and bounds what a silent next hop costs with its deadlines.
"""

from __future__ import annotations

import json
import math
from collections import Counter, deque
from functools import lru_cache
from typing import Callable, Generator, Iterator, Optional

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from mixminion.events import Event
from mixminion.mmtp.interfaces import IPacketSink
from mixminion.mmtp.initiator import (
    AddressPolicy,
    NextHop,
    NextHopBusy,
    NextHopDenied,
    MMTPClient,
    literal_address,
)
from mixminion.server.items import decode_item
from mixminion.server.mixing import READ_SLICE, queue_slices
from mixminion.server.packetstore import PacketStore, PacketStoreError
from mixminion.server.queues import OUT
from mixminion.server.schedule import AddressRetryState
from mixminion.server.workers import run_in, stop_when_idle, worker_thread

_STATE_KEY = "outgoing-address-state"


def _next_hop(meta: Optional[bytes]) -> NextHop:
    """Where a queued relay packet goes, from its record."""
    item, _ = decode_item(meta)  # type: ignore[arg-type]  # None: damaged, a TypeError
    if not isinstance(item, NextHop):
        raise ValueError(f"a {type(item).__name__} in the outgoing queue")
    return item


class Outgoing:
    """Sends the ``out`` queue; one flush after every mix (and on demand)."""

    log = Logger()
    #: packets handed to MMTP and not yet removed: each is 32 KiB in memory
    #: until its next hop answers, so a mix that empties a pool of 50,000
    #: packets into the queue must not load them all at once
    max_in_flight = 512
    #: packets of one destination handed to MMTP and not answered yet: far
    #: more than a connection's pipeline (six frames) needs to stay full
    max_in_flight_per_destination = 64
    #: packets in flight to destinations on probation (not answered yet, or
    #: failing), all together: the rest of the window is for those that answer
    max_in_flight_on_probation = 256
    #: packets read from the store in one query when sending (or handing
    #: to our own incoming queue)
    read_batch = 32
    #: rows of the queue a flush reads and sorts in one reactor call (on
    #: the development machine about 2 ms per 1,000 rows for a few
    #: hundred next hops, 9 ms when every row names another)
    scan_slice = READ_SLICE
    #: expired or denied packets a flush removes in one reactor call
    settle_batch = 256

    def __init__(self, store: PacketStore, client: MMTPClient, schedule: tuple[int, ...],
                 clock: IReactorTime, own_keyid: bytes, count: Callable[[str, int], None],
                 to_self: IPacketSink, reactor=None,
                 allows: Optional[AddressPolicy] = None, worker: Optional[ThreadPool] = None) -> None:
        self.store = store
        #: runs the store's deletions in a worker thread; defaults to ``clock``
        #: (the real reactor); tests pass a ``task.Clock`` as ``clock``
        self.reactor = reactor if reactor is not None else clock
        self.client = client
        self.schedule = schedule
        self.clock = clock
        self.own_keyid = own_keyid
        self.count = count
        #: where packets whose next hop is this node go (a path may name one
        #: node twice): the sink MMTP hands received packets to, so the
        #: incoming log has one writer
        self.to_self = to_self
        #: ``allows(ip, port)``: may we relay there?  (``[Outgoing/MMTP]``
        #: Allow/Deny; None allows everything.)  Replaced on a SIGHUP; the
        #: next flush applies it to everything queued.
        self.allows = allows
        self.in_flight: set[int] = set()
        #: ready packets not yet handed to MMTP, per destination, oldest first
        self._ready: dict[NextHop, deque[int]] = {}
        #: destinations whose turn comes, healthy ones and those on probation;
        #: each is in at most one of them (``_in_turn``)
        self._turns: dict[bool, deque[NextHop]] = {True: deque(), False: deque()}
        self._in_turn: set[NextHop] = set()
        #: packets handed to MMTP and not answered yet, per destination ...
        self._out: Counter[NextHop] = Counter()
        #: ... and to destinations on probation, all together
        self._probation_out = 0
        #: _send_ready is running (a send failing at once calls it again)
        self._picking = False
        self._pick_again = False
        self.addresses: dict[NextHop, AddressRetryState] = self._load_states()
        #: packets that left the queue (acknowledged, or denied), removed
        #: from the store in batches
        self._done: list[int] = []
        self._writing = False
        #: set by :meth:`stop`: sends aborted by our own shutdown are not the
        #: next hop's failures and must not delay its packets after a restart
        self.stopping = False
        #: the one-thread pool the removals run in (tests pass one that
        #: runs in place)
        self._worker = worker if worker is not None else worker_thread("mixminion-outgoing")
        #: the flush under way (see :meth:`flush`), its next step, and
        #: whether another was asked for meanwhile
        self._scan: Optional[Generator[None, None, int]] = None
        self._scan_call: Optional[IDelayedCall] = None
        self._flush_again = False
        #: told of every attempt's outcome, ``(packet id, None)`` when the
        #: next hop acknowledged it, else ``(packet id, failure)``; not of
        #: sends that never began (our own limits) or that our shutdown
        #: cut short.  The pinger records its pings' first-hop failures
        #: from this.
        self.attempt_listeners: list[Callable[[int, Optional[Failure]], None]] = []

    # --- address retry state, kept across restarts ---------------------------

    def _load_states(self) -> dict[NextHop, AddressRetryState]:
        raw = self.store.get_value(_STATE_KEY)
        states = {}
        for row in json.loads(raw) if raw else []:
            dest = NextHop(row["host"], row["port"], bytes.fromhex(row["keyid"]))
            states[dest] = AddressRetryState.from_record(self.schedule, row["state"])
        return states

    def _save_states(self) -> None:
        now = self.clock.seconds()
        for dest in [d for d, s in self.addresses.items() if s.forgettable(now)]:
            del self.addresses[dest]
        rows = [{"host": d.host, "port": d.port, "keyid": d.keyid.hex(), "state": s.to_record()}
                for d, s in self.addresses.items()]
        self.store.set_value(_STATE_KEY, json.dumps(rows).encode())

    def _state(self, dest: NextHop) -> AddressRetryState:
        if dest not in self.addresses:
            self.addresses[dest] = AddressRetryState(self.schedule)
        return self.addresses[dest]

    # --- flushing ---------------------------------------------------------------

    def flush(self) -> int:
        """Hand every ready packet to MMTP (up to :attr:`max_in_flight` at a
        time, destinations taking turns, the rest as earlier ones leave);
        returns how many went now.

        The queue is read :attr:`scan_slice` rows per reactor call, so a
        queue of any length leaves the reactor free between slices (issue
        12: 60,000 packets read and decoded in one call held it for
        seconds).  Packets go once the whole queue has been read, so
        destinations take turns over all of it; a queue of one slice goes
        at once, in this call.  A flush asked for while one is under way
        runs again when it ends."""
        if self._scan is not None:
            self._flush_again = True
            return 0
        self._scan = self._scanning()
        return self._scan_step()

    def _scan_step(self) -> int:
        """One slice of the flush under way; the next one in the next
        reactor call.  Returns how many packets went (only the last slice
        sends)."""
        self._scan_call = None
        assert self._scan is not None
        try:
            next(self._scan)
        except StopIteration as end:
            self._scan = None
            if self._flush_again and not self.stopping:
                self._flush_again = False
                self._scan_call = self.clock.callLater(0, self.flush)
            return end.value
        except PacketStoreError as exc:  # a full disk, an I/O error: the next flush starts over
            self._scan = None
            self.log.error("Could not flush the outgoing queue, the next flush tries again: "
                           "{error}", error=str(exc))
            return 0
        except Exception:
            self._scan = None
            self.log.failure("Could not flush the outgoing queue; the next flush tries again")
            return 0
        self._scan_call = self.clock.callLater(0, self._scan_step)
        return 0

    def _scanning(self) -> Generator[None, None, int]:
        """A flush, one slice of the queue per step: sorts the rows, then
        hands the ready packets to MMTP once all are read.  Only ready
        packets' ids are kept, per destination; each distinct record is
        decoded once (all the packets for a next hop carry the same)."""
        now = self.clock.seconds()
        lifetime = sum(self.schedule)
        destination = lru_cache(maxsize=self.scan_slice)(_next_hop)
        verdicts: dict[tuple[str, int], bool] = {}
        ready: dict[NextHop, deque[int]] = {}
        turns: dict[bool, deque[NextHop]] = {True: deque(), False: deque()}
        totals: Counter[str] = Counter()
        for rows in queue_slices(self.store, OUT, self.scan_slice):
            expired, local, denied = [], [], []
            for packet_id, meta, added in rows:
                if packet_id in self.in_flight:
                    continue
                try:
                    dest = destination(meta)
                except (ValueError, KeyError, TypeError, AttributeError):
                    totals["damaged"] += 1
                    continue
                if added + lifetime < now:
                    expired.append(packet_id)
                elif dest.keyid == self.own_keyid:
                    local.append(packet_id)
                elif self._denied(dest.host, dest.port, verdicts):
                    denied.append(packet_id)
                else:
                    state = self.addresses.get(dest)
                    if state is not None and not state.ready(now):
                        continue
                    ids = ready.get(dest)
                    if ids is None:  # its turn comes in the order of the oldest packets
                        ready[dest] = ids = deque()
                        turns[self.healthy(dest)].append(dest)
                    ids.append(packet_id)
            yield from self._settle(expired, local, denied, totals)
            if len(rows) == self.scan_slice:
                yield  # more rows may follow: the reactor's turn first
        if totals[Event.EXPIRED_RELAY]:
            self.log.warn("Dropped {n} packets whose retry schedule ran out",
                          n=totals[Event.EXPIRED_RELAY])
        if totals[Event.RELAY_DENIED]:
            self.log.warn("Dropped {n} packets whose next hops our [Outgoing/MMTP] Allow/Deny "
                          "rules deny", n=totals[Event.RELAY_DENIED])
        if totals["damaged"]:
            self.log.error("{n} packets in the outgoing queue have damaged records; they are "
                           "left where they are", n=totals["damaged"])
        # Destinations at their in-flight bound have a turn too: _pick
        # skips them while they are, and the answers that freed them came
        # while this flush was reading.
        self._ready, self._turns, self._in_turn = ready, turns, set(ready)
        return self._send_ready()

    def _settle(self, expired: list[int], local: list[int], denied: list[int],
                totals: Counter[str]) -> Iterator[None]:
        """Remove the expired and denied packets of a slice, and hand those
        for ourselves to our incoming log; per step, :attr:`settle_batch`
        removed (in one transaction) and :attr:`read_batch` handed over."""
        gone = [(Event.EXPIRED_RELAY, i) for i in expired] + [(Event.RELAY_DENIED, i) for i in denied]
        batch, size = self.settle_batch, self.read_batch
        for step in range(max(math.ceil(len(gone) / batch), math.ceil(len(local) / size))):
            if step:
                yield
            mine = local[step * size:(step + 1) * size]
            if mine:
                self._hand_to_self(mine)
            leaving = gone[step * batch:(step + 1) * batch]
            self.store.remove_many([packet_id for _, packet_id in leaving])
            events = Counter(event for event, _ in leaving)
            for event, n in events.items():
                self.count(event, n)
            totals.update(events)

    def _hand_to_self(self, ids: list[int]) -> None:
        """Packets for ourselves go to our own sink, like packets from a
        previous hop; each leaves the queue once stored there (a crash in
        between leaves a copy that the replay log refuses, never a lost
        packet).  One the sink refuses (full, shutting down) stays for the
        next flush."""
        self.in_flight.update(ids)
        for packet_id, packet in zip(ids, self.store.get_many(ids)):
            d = self.to_self.receivePacket(packet, "self")
            d.addCallbacks(self._stored_here, self._not_stored_here,
                           callbackArgs=(packet_id,), errbackArgs=(packet_id,))

    def _stored_here(self, _result, packet_id: int) -> None:
        self.count(Event.RELAYED_TO_SELF, 1)
        self._done.append(packet_id)
        self._remove_done()

    def _not_stored_here(self, failure: Failure, packet_id: int) -> None:
        self.in_flight.discard(packet_id)
        self.log.debug("A packet for this node waits: {why}", why=failure.getErrorMessage())

    def _denied(self, host: str, port: int, verdicts: dict[tuple[str, int], bool]) -> bool:
        """Whether the rules deny ``host:port``, judged here only for an IP
        literal (a hostname is judged by the address MMTP connects to);
        ``verdicts`` keeps the answers of one flush."""
        if self.allows is None:
            return False
        key = (host, port)
        if key not in verdicts:
            ip = literal_address(host)
            verdicts[key] = ip is not None and not self.allows(ip, port)
            if verdicts[key]:
                self.log.debug("Next hop {host}:{port} is denied by the outgoing address "
                               "rules; dropping its packets", host=host, port=port)
        return verdicts[key]

    def healthy(self, dest: NextHop) -> bool:
        """``dest`` answered before and has not failed since (otherwise it
        is on probation)."""
        state = self.addresses.get(dest)
        return (state is not None and state.last_success is not None
                and state.first_failure is None)

    def _take_turn(self, dest: NextHop) -> None:
        """Give ``dest`` a turn if it has ready packets, is not waiting for
        a turn already and has room for more in flight."""
        if (dest not in self._in_turn and dest in self._ready
                and self._out[dest] < self.max_in_flight_per_destination):
            self._in_turn.add(dest)
            self._turns[self.healthy(dest)].append(dest)

    def _pick(self, now: float, count: int) -> list[tuple[int, NextHop, bool]]:
        """Up to ``count`` ready packets (id, destination, on probation),
        one per destination's turn, healthy destinations first; counted as
        in flight at once."""
        picks: list[tuple[int, NextHop, bool]] = []
        for healthy in (True, False):
            turn = self._turns[healthy]
            while turn and len(picks) < count and len(self.in_flight) < self.max_in_flight:
                if not healthy and self._probation_out >= self.max_in_flight_on_probation:
                    break
                dest = turn.popleft()
                self._in_turn.discard(dest)
                ids = self._ready.get(dest)
                while ids and ids[0] in self.in_flight:
                    ids.popleft()
                if not ids:
                    self._ready.pop(dest, None)
                    continue
                if self._out[dest] >= self.max_in_flight_per_destination:
                    continue  # its turn comes back when one is answered
                if not self._state(dest).ready(now):
                    continue  # failed meanwhile: waits for the next flush
                packet_id = ids.popleft()
                self.in_flight.add(packet_id)
                self._out[dest] += 1
                if not healthy:
                    self._probation_out += 1
                picks.append((packet_id, dest, not healthy))
                if ids:
                    self._in_turn.add(dest)
                    turn.append(dest)
                else:
                    del self._ready[dest]
        return picks

    def _answered(self, dest: NextHop, probation: bool) -> None:
        """A packet handed to MMTP came back (acknowledged or failed)."""
        self._out[dest] -= 1
        if self._out[dest] <= 0:
            del self._out[dest]
        if probation:
            self._probation_out -= 1
        if self._out[dest] <= self.max_in_flight_per_destination // 2:
            # (half empty: its next packets are read in one query)
            self._take_turn(dest)

    def _send_ready(self, now: Optional[float] = None) -> int:
        """Send ready packets while the limits allow (see the module's
        docstring); one whose address failed meanwhile waits for the next
        flush."""
        if self._picking:  # a send failed at once, inside the loop below
            self._pick_again = True
            return 0
        now = self.clock.seconds() if now is None else now
        sent = 0
        self._picking = True
        try:
            self._pick_again = True
            while self._pick_again:
                self._pick_again = False
                while True:
                    batch = self._pick(now, self.read_batch)
                    if not batch:
                        break
                    packets = self._read([packet_id for packet_id, _, _ in batch])
                    for (packet_id, dest, probation), packet in zip(batch, packets):
                        if packet is None:  # gone from the store meanwhile
                            self.in_flight.discard(packet_id)
                            self._answered(dest, probation)
                        else:
                            self._send(packet_id, dest, packet, now, probation)
                            sent += 1
        finally:
            self._picking = False
        return sent

    def _read(self, ids: list[int]) -> list[Optional[bytes]]:
        """The packets with these ids in one query (None for one gone)."""
        try:
            return list(self.store.get_many(ids)) if ids else []
        except KeyError:
            packets: list[Optional[bytes]] = []
            for packet_id in ids:
                try:
                    packets.append(self.store.get(packet_id))
                except KeyError:
                    packets.append(None)
            return packets

    def _send(self, packet_id: int, dest: NextHop, packet: bytes, started: float,
              probation: bool) -> None:
        d = self.client.send_packet(dest, packet)
        d.addCallbacks(self._sent, self._failed, callbackArgs=(packet_id, dest, probation),
                       errbackArgs=(packet_id, dest, started, probation))

    def _tell(self, packet_id: int, failure: Optional[Failure]) -> None:
        for listener in self.attempt_listeners:
            listener(packet_id, failure)

    def _sent(self, _result, packet_id: int, dest: NextHop, probation: bool) -> None:
        self._tell(packet_id, None)
        state = self._state(dest)
        was_failing = state.first_failure is not None
        state.succeeded(self.clock.seconds())
        if was_failing:
            self._save_states()
        self._done.append(packet_id)
        self._answered(dest, probation)
        self._remove_done()
        if not self.stopping:
            self._send_ready()  # the destination's own turn, or the probation share

    def _failed(self, failure: Failure, packet_id: int, dest: NextHop, started: float,
                probation: bool) -> None:
        self._answered(dest, probation)
        if failure.check(NextHopDenied):
            # The MMTP client refused the hop (for a hostname that led to a
            # denied address it warned once for the connection): drop the
            # packet, and do not hold it against the address's retry state.
            self.count(Event.RELAY_DENIED, 1)
            self._tell(packet_id, failure)
            self._done.append(packet_id)
            self._remove_done()
            return
        self.in_flight.discard(packet_id)
        if self.stopping:
            return
        if failure.check(NextHopBusy):
            # The client's own memory bound, not the next hop's failure: the
            # packet goes again at the next flush.
            self.log.debug("Relay deferred: {why}", why=failure.getErrorMessage())
            return
        self._tell(packet_id, failure)
        state = self._state(dest)
        was_failing = state.first_failure is not None
        state.failed(started)
        self._save_states()
        # Once per failing next hop, not per packet; the reason may name the
        # next hop (a DNS error does): debug only.
        if not was_failing:
            self.log.info("Relay to a next hop failed, its packets wait for its next retry: "
                          "{kind}", kind=failure.type.__name__)
        self.log.debug("Relay failed, will retry: {why}", why=failure.getErrorMessage())
        self._send_ready()

    def _remove_done(self) -> None:
        """Delete acknowledged packets in batches, off the reactor thread."""
        if self._writing or not self._done:
            return
        batch, self._done = self._done, []
        self._writing = True
        d = run_in(self.reactor, self._worker, self.store.remove_many, batch)

        def written(result):
            self._writing = False
            if isinstance(result, Failure):
                self._done.extend(batch)
                self.log.failure("Could not remove relayed packets", result)
            else:
                self.in_flight.difference_update(batch)
                if not self.stopping:
                    self._send_ready()
            self._remove_done()

        d.addBoth(written)

    def stop(self) -> defer.Deferred:
        """Call before closing the MMTP client; fires once removals are written."""
        self.stopping = True
        if self._scan_call is not None and self._scan_call.active():
            self._scan_call.cancel()
        if self._scan is not None:
            self._scan.close()  # its removals so far are written; the rest wait in the queue
            self._scan = None
        return stop_when_idle(self.reactor, lambda: self._writing or bool(self._done), self._worker)
