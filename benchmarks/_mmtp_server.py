"""Child process of benchmarks/mmtp.py: a responder to measure against.

``mmtp WORKDIR``: an MMTP responder with a durable sink; prints
``PORT KEYID`` and, when stdin closes, the number of packets stored.
Its identity key is ``WORKDIR/identity.der`` if that exists.
``raw WORKDIR BYTES``: a plain TLS server that answers one byte once it
has received BYTES bytes.
"""

from __future__ import annotations

import os
import sys

from twisted.internet import defer, protocol, reactor, stdio
from twisted.protocols.tls import TLSMemoryBIOFactory

from mixminion.codec.rsa import PrivateKey
from mixminion.mmtp.responder import responder_factory
from mixminion.mmtp.tls import ResponderTLS
from mixminion.server.durable import DurableSink
from mixminion.server.packetstore import PacketStore


class _Counter(protocol.Protocol):
    def __init__(self, expect: int) -> None:
        self.expect, self.got = expect, 0

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.got += len(data)
        if self.got >= self.expect:
            self.transport.write(b"!")


class _StdinWatcher(protocol.Protocol):
    def __init__(self, on_close) -> None:
        self.on_close = on_close

    def connectionLost(self, reason=None) -> None:  # noqa: N802
        self.on_close()


def main() -> None:
    mode, workdir = sys.argv[1], sys.argv[2]
    # A caller that must describe this responder (benchmarks/client.py
    # writes its descriptor) leaves the identity key in WORKDIR.
    key_file = os.path.join(workdir, "identity.der")
    if os.path.exists(key_file):
        with open(key_file, "rb") as f:
            identity = PrivateKey.from_der(f.read())
    else:
        identity = PrivateKey.generate(2048)
    tls = ResponderTLS(identity, "bench", clock=reactor)
    if mode == "mmtp":
        store = PacketStore(os.path.join(workdir, "store.db"))
        sink = DurableSink(store, reactor)
        factory = responder_factory(sink, tls, reactor)
    else:
        expect = int(sys.argv[3])
        inner = protocol.Factory.forProtocol(lambda: _Counter(expect))
        factory = TLSMemoryBIOFactory(tls, False, inner)
        store = sink = None
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    print(port.getHost().port, identity.public.keyid.hex(), flush=True)

    def finish() -> None:
        d = sink.stop() if sink is not None else defer.succeed(None)

        def report(_):
            if store is not None:
                print(store.count(), flush=True)
            reactor.stop()

        d.addCallback(report)

    stdio.StandardIO(_StdinWatcher(finish))
    reactor.run()


if __name__ == "__main__":
    main()
