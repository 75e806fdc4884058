"""An MMTP responder on the standard library's ``ssl``, in a thread.

For tests of initiators over real sockets where the responder must be
something the node's Twisted responder will not be: a 0.0.8-era server
(TLS 1.0 only, ``DHE-RSA-AES128-SHA``, a 1024-bit link key), or a peer
that reports exactly how the initiator ended the TLS session (close_notify
before the FIN, or a bare FIN).
"""

from __future__ import annotations

import os
import socket
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import serialization

from mixminion.codec.rsa import PrivateKey
from mixminion.mmtp.machine import NEED_DATA, JunkReceived, PacketReceived, ResponderMachine
from mixminion.mmtp.tls import FFDHE2048_PEM, make_link_credentials
from mixminion.testing.certs import sha1_signed

__all__ = ["PeerRecord", "TLSPeer"]


@dataclass
class PeerRecord:
    """What one connection brought."""

    packets: list[bytes] = field(default_factory=list)
    junk: int = 0
    #: "close_notify" (TLS closed cleanly, then TCP), "eof" (a FIN with no
    #: close_notify), "reset", or the error seen
    ending: str = ""
    tls_version: str = ""
    cipher: str = ""


class TLSPeer:
    """Listens on 127.0.0.1 (port chosen by the system), serves
    ``connections`` connections one after the other, then stops.

    ``original``: be what a 0.0.8 server is (TLS 1.0 and
    ``DHE-RSA-AES128-SHA`` only, a chain signed with SHA-1).  ``answer_close``: answer the initiator's
    close_notify with ours (as the spec asks) before closing TCP."""

    def __init__(self, identity: PrivateKey, *, link_bits: int = 2048, original: bool = False,
                 answer_close: bool = True, connections: int = 1, nickname: str = "Peer",
                 trickle: bool = False) -> None:
        self.identity = identity
        #: send what we write one byte per TLS record (a peer holding the
        #: initiator with a trickle)
        self.trickle = trickle
        self.answer_close = answer_close
        self.records: list[PeerRecord] = []
        self.errors: list[BaseException] = []
        self._context = self._make_context(identity, nickname, link_bits, original)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(30)
        self.port: int = self._listener.getsockname()[1]
        self._connections = connections
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @staticmethod
    def _make_context(identity: PrivateKey, nickname: str, link_bits: int,
                      original: bool) -> ssl.SSLContext:
        creds = make_link_credentials(identity, nickname, time.time(), link_bits)
        if original:  # 0.0.8 signed both certificates with SHA-1
            chain_der = [sha1_signed(c, identity.key) for c in creds.chain]
        else:
            chain_der = creds.chain_der
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        if original:
            ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1
            ctx.set_ciphers("DHE-RSA-AES128-SHA:@SECLEVEL=0")
        else:
            ctx.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES128-SHA:@SECLEVEL=0")
        with tempfile.TemporaryDirectory(prefix="mixminion-peer-") as tmp:
            chain, key, dh = (os.path.join(tmp, n) for n in ("chain.pem", "key.pem", "dh.pem"))
            with open(chain, "w") as f:
                for cert_der in chain_der:
                    f.write(ssl.DER_cert_to_PEM_cert(cert_der))
            with open(key, "wb") as f:
                f.write(creds.link_key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption()))
            with open(dh, "wb") as f:
                f.write(FFDHE2048_PEM)
            ctx.load_cert_chain(chain, key)
            ctx.load_dh_params(dh)
        return ctx

    def _serve(self) -> None:
        try:
            for _ in range(self._connections):
                raw, _ = self._listener.accept()
                record = PeerRecord()
                self.records.append(record)
                try:
                    self._one(raw, record)
                except BaseException as exc:  # noqa: BLE001 - reported to the test
                    record.ending = record.ending or f"error: {exc!r}"
                finally:
                    raw.close()
        except BaseException as exc:  # noqa: BLE001
            self.errors.append(exc)
        finally:
            self._listener.close()

    def _one(self, raw: socket.socket, record: PeerRecord) -> None:
        raw.settimeout(30)
        sock = self._context.wrap_socket(raw, server_side=True, suppress_ragged_eofs=False)
        record.tls_version = sock.version() or ""
        record.cipher = (sock.cipher() or ("",))[0]
        machine = ResponderMachine()
        while True:
            try:
                data = sock.recv(65536)
            except ssl.SSLEOFError:
                record.ending = "eof"
                return
            except ConnectionResetError:
                record.ending = "reset"
                return
            if not data:
                # recv returns b"" only for a close_notify here: a bare FIN
                # is an SSLEOFError (suppress_ragged_eofs is off).
                record.ending = "close_notify"
                if self.answer_close:
                    try:
                        sock.unwrap()
                    except OSError:
                        pass
                return
            machine.receive_data(data)
            while (event := machine.next_event()) is not NEED_DATA:
                if isinstance(event, PacketReceived):
                    record.packets.append(event.packet)
                    machine.accept(event.seq)
                elif isinstance(event, JunkReceived):
                    record.junk += 1
                    machine.accept(event.seq)
            out = machine.data_to_send()
            if out and self.trickle:
                for byte in out:
                    sock.sendall(bytes([byte]))
            elif out:
                sock.sendall(out)

    def join(self, timeout: float = 30) -> None:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError("the test peer is still serving")
        if self.errors:
            raise self.errors[0]

    def close(self) -> None:
        self._listener.close()
