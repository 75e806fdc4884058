"""The NYM module as the node builds it from mixminiond.conf: the
blacklist a nym's mail obeys, and what it publishes (doc/nym.md §1, §4)."""

from __future__ import annotations

import os

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from mixminion.exits.context import ExitContext
from mixminion.server.config import load_config
from mixminion.server.delivery import build_exits
from mixminion.testing.daemon import node_config


class NymModuleTests(unittest.TestCase):
    def build(self, smtp_list: bool, nym_list: bool):
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        for name, address in (("smtp-list", "spam@example.com"), ("nym-list", "ex@example.com")):
            with open(os.path.join(base, name), "w") as f:
                f.write(f"deny address {address}\n")
        smtp = ("[Delivery/SMTP]\nEnabled: yes\nReturnAddress: exit@example.org\n"
                f"SMTPServer: 127.0.0.1\n"
                + (f"BlacklistFile: {base}/smtp-list\n" if smtp_list else ""))
        nym = ("[Delivery/Nym]\nEnabled: yes\nDomain: nym.example.org\nIncomingPort: 2525\n"
               + (f"BlacklistFile: {base}/nym-list\n" if nym_list else ""))
        conf = os.path.join(base, "node.conf")
        with open(conf, "w") as f:
            f.write(node_config(os.path.join(base, "base"), 48099, extra=smtp + nym))
        clock = task.Clock()
        dispatcher = build_exits(load_config(conf), ExitContext(
            base_dir=os.path.join(base, "base"), clock=clock, reactor=clock))
        self.addCleanup(dispatcher.stop)
        [module] = [m for m in dispatcher.modules if m.name == "NYM"]
        return module

    def test_the_smtp_exits_blacklist_by_default(self) -> None:
        service = self.build(smtp_list=True, nym_list=False).service
        self.assertTrue(service._blocked("spam@example.com"))
        self.assertFalse(service._blocked("ex@example.com"))

    def test_its_own_blacklist_when_given(self) -> None:
        service = self.build(smtp_list=True, nym_list=True).service
        self.assertTrue(service._blocked("ex@example.com"))
        self.assertFalse(service._blocked("spam@example.com"))

    def test_none_without_either(self) -> None:
        self.assertIsNone(self.build(smtp_list=False, nym_list=False).service.blacklist)

    def test_it_publishes_domain_and_key(self) -> None:
        module = self.build(smtp_list=False, nym_list=False)
        advert = module.advertise()
        self.assertEqual(advert.section, "Delivery/Nym")
        self.assertEqual(dict(advert.fields)["Domain"], "nym.example.org")
        self.assertEqual(advert.descriptor_value.key, module.service.key.public)
        key = os.path.join(module.service.folder, "nym.key")
        self.assertEqual(os.stat(key).st_mode & 0o777, 0o600)


class NymServiceDiskTests(unittest.TestCase):
    """A request the disk cannot take stays queued: RETRY, one WARN line."""

    def test_a_failing_store_is_retry(self) -> defer.Deferred:
        return defer.ensureDeferred(self._failing())

    async def _failing(self) -> None:
        from mixminion.codec.build import build_encrypted_forward_packet, encode_message_payloads
        from mixminion.codec.payload import ENC_FWD_OVERHEAD
        from mixminion.codec.process import Exit
        from mixminion.exits.items import DeliveryItem, DeliveryResult
        from mixminion.nym.formats import NYM_TYPE
        from mixminion.test.test_properties import Network, default_addresses
        from mixminion.testing.daemon import free_ports

        [port] = free_ports(1)
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        conf = os.path.join(base, "node.conf")
        with open(conf, "w") as f:
            f.write(node_config(os.path.join(base, "base"), 48099, extra=(
                f"[Delivery/Nym]\nEnabled: yes\nDomain: nym.example.org\nIncomingPort: {port}\n")))
        dispatcher = build_exits(load_config(conf), ExitContext(
            base_dir=os.path.join(base, "base"), clock=reactor, reactor=reactor))
        [module] = [m for m in dispatcher.modules if m.name == "NYM"]
        service = module.service
        service.startService()
        self.addCleanup(service.stopService)
        net = Network(default_addresses())
        # a request in several fragments: the first goes to the fragments' file
        big = b"Mixminion-Nym-Request: 0.1\n" + os.urandom(60_000)
        payload = encode_message_payloads(big, os.urandom, overhead=ENC_FWD_OVERHEAD)[0]
        built = build_encrypted_forward_packet(payload, service.key.public, net.path([3]),
                                               net.path([4, 0]), NYM_TYPE, b"", os.urandom)
        _, exit_ = net.deliver(built.packet, 3)
        assert isinstance(exit_, Exit)
        item = DeliveryItem(NYM_TYPE, exit_.routing_info, payload=exit_.payload)
        service.fragment_store.close()  # the disk fails under it
        self.assertIs(await service.receive(item), DeliveryResult.RETRY)
        service.store.close()
        self.assertIs(await service.receive(item), DeliveryResult.RETRY)
