"""The NYM exit module and the service it runs in the node (doc/nym.md §1).

:class:`NymModule` is what the node's delivery stage sees: it takes the
exit payloads of type ``NYM`` and publishes ``[Delivery/Nym]``.  The work
is done by one :class:`NymService` for the node's whole life (a SIGHUP
rebuilds the modules; the new one finds the running service in
``ExitContext.node_link`` and gives it the new settings, blacklist and
MTA; ``IncomingAddress`` and ``IncomingPort`` take effect at a restart):

* exit payloads: :meth:`Nymserver.receive` in the service's worker thread;
  an immediate answer (a refused ``create``, a ``delete``) is injected at
  once;
* mail for a nym: the SMTP listener (:mod:`.smtpin`) asks
  :meth:`Nymserver.check_recipient` at ``RCPT`` and
  :meth:`Nymserver.accept_mail` at the end of ``DATA``, and answers 250
  only once the mail is on disk;
* deliveries: after each of those, and every :data:`TICK` seconds, each
  nym with waiting messages gets its packets built, injected into the
  node's incoming queue (durable), and only then its message and reply
  blocks removed;
* mail a nym sends: handed to the MTA, retried on its ``Retry`` schedule,
  dropped (one WARN line) when the schedule is over.

Nothing above DEBUG names a nym or an address (server.md §11).
"""

from __future__ import annotations

import os
import re
import sqlite3
import stat
from typing import Any, Awaitable, Callable, Mapping, Optional

from cryptography.hazmat.primitives import serialization
from twisted.application import service
from twisted.internet import defer, threads
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mixminion.codec.rsa import PrivateKey
from mixminion.codec.textformat import encode_base64
from mixminion.directory.descriptor import NymInfo
from mixminion.events import Event
from mixminion.exits.blacklist import Blacklist
from mixminion.exits.context import Advertisement, ExitContext
from mixminion.exits.errors import ExitConfigError
from mixminion.exits.fragment_store import DiskReassembler, FragmentStore
from mixminion.exits.interfaces import IExitModule
from mixminion.exits.items import DeliveryItem, DeliveryResult
from mixminion.exits.mail import mta_transport
from mixminion.exits.nym.nymserver import Handled, Nymserver, NymSettings, Result
from mixminion.exits.nym.smtpin import nym_smtp_factory
from mixminion.exits.nym.store import NymStore, NymStoreError
from mixminion.exits.options import NYM, section_values
from mixminion.fileutil import atomic_write
from mixminion.listening import ListeningService
from mixminion.nym.formats import NYM_TYPE

#: seconds between two rounds of deliveries and outgoing mail
TICK = 10.0
KEY_FILE = "nym.key"
REQUESTS_DB = "requests.db"
SERVICE = "NYM"
_DOMAIN = re.compile(r"(?=.{1,253}\Z)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}\Z")


def load_or_make_key(path: str) -> PrivateKey:
    """The nymserver's RSA key: made (2048 bits, mode 0600) on first use;
    refused with one line if group or others can read it."""
    if not os.path.exists(path):
        key = PrivateKey.generate(2048)
        pem = key.key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
        atomic_write(path, pem, 0o600)
        return key
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        raise ExitConfigError(f"{path} can be read by group or others (mode {mode:o}); "
                              f"chmod 600 it")
    with open(path, "rb") as f:
        data = f.read()
    try:
        key = serialization.load_pem_private_key(data, password=None)
        return PrivateKey(key)  # type: ignore[arg-type]
    except (ValueError, TypeError) as exc:
        raise ExitConfigError(f"{path}: not an unencrypted PEM RSA key ({exc})") from None


def _private_file(path: str) -> None:
    """Create ``path`` (if missing) readable by us alone, before SQLite
    opens it: request fragments are plaintext once decrypted."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    os.chmod(path, 0o600)


class Rounds:
    """Work done one round at a time: asked for during a round, it runs
    once more after it; a round that fails is one WARN line."""

    log = Logger(namespace="mixminion.exits.nym")

    def __init__(self, work: Callable[[], Awaitable[None]], what: str,
                 running: Callable[[], bool]) -> None:
        self.work, self.what, self.running = work, what, running
        self._busy = False
        self._again = False

    def ask(self) -> None:
        if self._busy:
            self._again = True
            return
        self._busy = True
        d = defer.ensureDeferred(self.work())
        d.addBoth(self._over)

    def _over(self, result: Any) -> None:
        self._busy = False
        if isinstance(result, Failure):
            self.log.warn("NYM: {what} stopped for this round: {why}", what=self.what,
                          why=result.getErrorMessage())
        if self._again and self.running():
            self._again = False
            self.ask()


class NymService(service.MultiService):
    """The nymserver's life in the node (see the module docstring)."""

    log = Logger(namespace="mixminion.exits.nym")

    def __init__(self, folder: str, key: PrivateKey, settings: NymSettings,
                 context: ExitContext, listen: tuple[str, int]) -> None:
        super().__init__()
        self.context = context
        self.reactor = context.reactor
        self.settings = settings
        self.folder = folder
        self.key = key
        self.blacklist: Optional[Blacklist] = None
        self.transport: Any = None
        self.retry: list[int] = []
        #: opened when the service starts (building it opens nothing:
        #: ``mixminiond check`` builds the modules and stops them)
        self.store: Optional[NymStore] = None
        self.fragment_store: Optional[FragmentStore] = None
        self.nymserver: Optional[Nymserver] = None
        self._worker: Optional[ThreadPool] = None
        #: requests refused without an answer since the last tick
        self.ignored = 0
        self._deliveries = Rounds(self._deliver_all, "deliveries", lambda: self.running)
        self._mail = Rounds(self._mail_out, "outgoing mail", lambda: self.running)
        endpoint = TCP4ServerEndpoint(self.reactor, listen[1], interface=listen[0])
        self.listener = ListeningService(endpoint, nym_smtp_factory(self),
                                         program="mixminion (nymserver)")
        self.listener.setServiceParent(self)
        self._tick = LoopingCall(self.tick)
        self._tick.clock = self.reactor

    def reconfigure(self, settings: NymSettings, blacklist: Optional[Blacklist],
                    transport: Any, retry: list[int]) -> None:
        """New settings (a SIGHUP); the old MTA transport finishes what it
        has under way."""
        old = self.transport
        self.settings = settings
        if self.nymserver is not None:
            self.nymserver.settings = settings
        self.blacklist, self.transport, self.retry = blacklist, transport, retry
        if old is not None and old is not transport and hasattr(old, "stop"):
            old.stop()

    def _blocked(self, address: str) -> bool:
        return self.blacklist is not None and self.blacklist.match(address) is not None

    # --- lifecycle ---------------------------------------------------------------------

    def _open(self) -> None:
        self.store = NymStore.in_dir(self.folder)
        fragments_path = os.path.join(self.folder, REQUESTS_DB)
        _private_file(fragments_path)
        self.fragment_store = FragmentStore(fragments_path)
        self.nymserver = Nymserver(self.store, DiskReassembler.load(
            self.fragment_store, self.settings.max_request), self.key, self.settings,
            self._blocked, self.context.node_link.own_hop, os.urandom)

    def startService(self) -> None:  # noqa: N802
        try:
            self._open()
        except (NymStoreError, OSError, sqlite3.Error) as exc:
            raise SystemExit(f"mixminion (nymserver): {exc}") from None
        # One thread: the store's writes stay in the order they were asked.
        self._worker = ThreadPool(minthreads=1, maxthreads=1, name="mixminion-nym")
        self._worker.start()
        super().startService()
        self._tick.start(TICK, now=True)

    async def _stop(self) -> None:
        if self._tick.running:
            self._tick.stop()
        await super().stopService()
        if self.transport is not None and hasattr(self.transport, "stop"):
            await defer.maybeDeferred(self.transport.stop)
        if self._worker is not None:
            await threads.deferToThreadPool(self.reactor, self._worker, lambda: None)
            self._worker.stop()
        for store in (self.store, self.fragment_store):
            if store is not None:
                store.close()

    def stopService(self) -> defer.Deferred:  # noqa: N802
        return defer.ensureDeferred(self._stop())

    def _run(self, fn: Any, *args: Any) -> defer.Deferred:
        if self._worker is None:
            return defer.fail(NymStoreError("the nymserver is not running"))
        return threads.deferToThreadPool(self.reactor, self._worker, fn, *args)

    def now(self) -> float:
        return self.context.wall.seconds()

    # --- requests ------------------------------------------------------------------------

    async def receive(self, item: DeliveryItem) -> DeliveryResult:
        try:
            result: Result = await self._run(self.nymserver.receive, item.tag, item.payload,
                                             self.now())
        except (NymStoreError, sqlite3.Error, OSError) as exc:  # the disk (the nym store or
            # the request fragments' file): the payload stays queued and is tried again
            self.log.warn("NYM: could not handle a request, will retry: {why}", why=str(exc))
            return DeliveryResult.RETRY
        self.context.count(f"{Event.NYM_REQUEST}:{result.outcome.value}")
        self.log.debug("NYM: request {outcome}: {detail}", outcome=result.outcome.value,
                       detail=result.detail)
        if result.outcome is Handled.IGNORED:
            self.ignored += 1  # said in one line per TICK (a flood is one line, not thousands)
        if result.immediate is not None:
            try:
                for packet in result.immediate.packets:
                    await self.context.node_link.inject(packet)
            except Exception as exc:  # noqa: BLE001 - a full queue: the answer is lost
                self.log.warn("NYM: an answer could not be queued: {why}", why=str(exc))
        if result.outcome in (Handled.DONE, Handled.REFUSED):
            self.kick()
        return DeliveryResult.OK

    # --- mail for the nyms ---------------------------------------------------------------------

    def check_recipient(self, name: str) -> defer.Deferred:
        return self._run(self.nymserver.check_recipient, name, self.now())

    async def accept_mail(self, name: str, text: bytes) -> Optional[tuple[int, str]]:
        refusal = await self._run(self.nymserver.accept_mail, name, text, self.now())
        self.context.count(Event.NYM_MAIL_REFUSED if refusal else Event.NYM_MAIL_RECEIVED)
        if refusal is None:
            self.kick()
        return refusal

    # --- deliveries and outgoing mail ----------------------------------------------------------

    def kick(self) -> None:
        """Deliver what waits now (once more after the round under way)."""
        self._deliveries.ask()

    async def _deliver_all(self) -> None:
        for name in await self._run(self.store.nyms_waiting):
            while self.running:
                delivery = await self._run(self.nymserver.next_delivery, name, self.now())
                if delivery is None:
                    break
                for packet in delivery.packets:
                    await self.context.node_link.inject(packet)
                await self._run(self.nymserver.delivered, delivery)
                self.context.count(Event.NYM_DELIVERED)

    def tick(self) -> None:
        if not self.running:
            return
        if self.ignored:
            self.log.info("NYM: {n} request(s) refused without an answer (malformed, forged, "
                          "replayed or for an unknown nym)", n=self.ignored)
            self.ignored = 0
        d = self._run(self.store.forget_expired, int(self.now()) + self.settings.expiry_margin)
        d.addErrback(lambda f: self.log.warn("NYM: {why}", why=f.getErrorMessage()))
        self.kick()
        self._mail.ask()

    async def _mail_out(self) -> None:
        if self.transport is None:
            return
        now = self.now()
        for mail in await self._run(self.store.mail_out_due, now):
            sender = f"{mail.nym}@{self.settings.domain}"
            result = await self.transport.send(sender, mail.recipient, mail.text)
            if result is DeliveryResult.OK:
                await self._run(self.store.mail_out_done, mail.id)
                self.context.count(Event.NYM_MAIL_SENT)
            elif result is DeliveryResult.RETRY and mail.attempts < len(self.retry):
                await self._run(self.store.mail_out_later, mail.id, now + self.retry[mail.attempts])
            else:
                await self._run(self.store.mail_out_done, mail.id)
                self.context.count(Event.NYM_MAIL_FAILED)
                self.log.warn("NYM: a mail from a nym could not be delivered and was dropped")


@implementer(IExitModule)
class NymModule:
    name = "NYM"
    section_name = NYM.name
    exit_types = frozenset({NYM_TYPE})
    priority = 0
    uses_tag = True

    def __init__(self) -> None:
        self.retry_schedule: list[int] = list(NYM.default("Retry"))
        self.service: Optional[NymService] = None
        self.info: Optional[NymInfo] = None

    def configure(self, section: Mapping[str, Any], context: ExitContext) -> None:
        values = section_values(NYM, section)
        where = f"[{NYM.name}]"
        domain, port = values["Domain"], values["IncomingPort"]
        if not domain:
            raise ExitConfigError(f"{where} Domain is required when the nymserver is enabled")
        if port is None:
            raise ExitConfigError(f"{where} IncomingPort is required when the nymserver is enabled")
        if not _DOMAIN.match(domain):
            raise ExitConfigError(f"{where} Domain {domain!r} is not a domain name")
        for name in ("MaxNyms", "MaxReplyBlocksPerNym", "SendsPerNymPerDay",
                     "IncomingPerNymPerHour", "MaxQueuedPerNym"):
            if values[name] < 1:
                raise ExitConfigError(f"{where} {name} must be at least 1")
        settings = NymSettings(domain.lower(), max_nyms=values["MaxNyms"],
                               max_reply_blocks=values["MaxReplyBlocksPerNym"],
                               max_message_size=values["MaximumSize"],
                               sends_per_day=values["SendsPerNymPerDay"],
                               incoming_per_hour=values["IncomingPerNymPerHour"],
                               max_queued=values["MaxQueuedPerNym"],
                               max_queued_bytes=values["MaxQueuedBytesPerNym"])
        blacklist = None
        if values["BlacklistFile"] is not None:
            blacklist = Blacklist.from_file(os.path.join(context.base_dir, values["BlacklistFile"]))
        transport = mta_transport(values, NYM.name, context)
        self.retry_schedule = list(values["Retry"])
        folder = context.module_dir(self.name)
        key = load_or_make_key(os.path.join(folder, KEY_FILE))
        self.info = NymInfo(settings.domain, key.public)
        running = context.node_link.services.get(SERVICE)
        if running is None:
            running = NymService(folder, key, settings, context,
                                 (values["IncomingAddress"], port))
            context.node_link.keep(SERVICE, running)
        running.reconfigure(settings, blacklist, transport, self.retry_schedule)
        self.service = running

    def deliver(self, item: DeliveryItem) -> defer.Deferred:
        assert self.service is not None
        return defer.ensureDeferred(self.service.receive(item))

    def flush(self) -> defer.Deferred:
        return defer.succeed(None)

    def local_paths(self) -> list[str]:
        return [self.service.folder] if self.service is not None else []

    def advertise(self) -> Optional[Advertisement]:
        if self.info is None:
            return None
        return Advertisement(NYM.name, (("Version", "0.1"), ("Domain", self.info.domain),
                                        ("Key", encode_base64(self.info.key.der))), self.info)

    def stop(self) -> defer.Deferred:
        """Nothing of the module's own: the service runs until the node stops."""
        return defer.succeed(None)
