"""Vector checks for header_construction.json: headers and packets built
byte for byte from explicit secrets, padding and OAEP seeds, then peeled
hop by hop with the private keys."""

from __future__ import annotations

import json
from functools import lru_cache

from mixminion.codec import crypto
from mixminion.codec.header import HopRouting, build_header
from mixminion.codec.packet import assemble_packet
from mixminion.codec.process import PacketProcessor, Relay, Exit
from mixminion.codec.replay import MemoryReplayLog
from mixminion.codec.rsa import PrivateKey, PublicKey
from mixminion.test.vectorkit import Entry, blob, register, unhex, vectors_dir

F = "header_construction"
_HOP_FIELDS = {"nickname", "packet_public_der_hex", "packet_private_der_hex",
               "routing_type", "routing_info_hex"}


def _hops(entry: Entry) -> list[HopRouting]:
    hops = []
    for hop in entry["hops"]:
        if set(hop) - _HOP_FIELDS:
            raise AssertionError(f"unknown hop fields {sorted(set(hop) - _HOP_FIELDS)}")
        hops.append(HopRouting(PublicKey.from_der(unhex(hop["packet_public_der_hex"])),
                               hop["routing_type"], unhex(hop["routing_info_hex"])))
    return hops


def _no_rng(n: int) -> bytes:
    raise AssertionError("vector construction must not draw randomness")


def _peel(header: bytes, entry: Entry) -> None:
    """Each hop, with its private key, must find its secret and routing."""
    junk_h2 = bytes(2048)
    payload = bytes(28672)
    for i, hop in enumerate(entry["hops"]):
        key = PrivateKey.from_der(unhex(hop["packet_private_der_hex"]))
        proc = PacketProcessor([(key, MemoryReplayLog())])
        result = proc.process(header + junk_h2 + payload)
        sub = getattr(result, "subheader", None)
        if sub is None or sub.secret != unhex(entry["secrets_hex"][i]):
            raise AssertionError(f"hop {i} did not recover its secret: {result!r}")
        if sub.routing_type != hop["routing_type"]:
            raise AssertionError(f"hop {i} routing type {sub.routing_type}")
        info = result.routing_info if isinstance(result, (Relay, Exit)) else None
        if info is not None and info != unhex(hop["routing_info_hex"]):
            raise AssertionError(f"hop {i} routing info differs")
        if not isinstance(result, Relay):
            return
        header = result.packet[:2048]


@register(F, "headers", "hops secrets_hex padding_hex oaep_seeds_hex header_b64")
def check_header(e: Entry) -> None:
    header = build_header(_hops(e), [unhex(s) for s in e["secrets_hex"]], _no_rng,
                          padding=unhex(e["padding_hex"]),
                          oaep_seeds=[unhex(s) for s in e["oaep_seeds_hex"]])
    if header != blob(e, "header"):
        raise AssertionError("built header differs from the vector")
    _peel(header, e)


@lru_cache(maxsize=None)
def _header_entries() -> tuple:
    data = json.loads((vectors_dir() / f"{F}.json").read_text())
    return tuple(data["headers"])


@register(F, "packets", "header1_index header2_index secrets1_hex secrets2_hex "
          "header1_b64 header2_b64 payload_b64 packet_sha1_hex packet_b64")
def check_packet(e: Entry) -> None:
    h1, h2, payload = blob(e, "header1"), blob(e, "header2"), blob(e, "payload")
    entries = _header_entries()
    if entries[e["header1_index"]]["header_b64"] != e["header1_b64"]:
        raise AssertionError("header1_index does not name header 1")
    if entries[e["header2_index"]]["header_b64"] != e["header2_b64"]:
        raise AssertionError("header2_index does not name header 2")
    s1 = [unhex(s) for s in e["secrets1_hex"]]
    s2 = None if e["secrets2_hex"] is None else [unhex(s) for s in e["secrets2_hex"]]
    packet = assemble_packet(h1, h2, payload, s1, s2)
    if crypto.sha1(packet).hex() != e["packet_sha1_hex"] or packet != blob(e, "packet"):
        raise AssertionError("assembled packet differs from the vector")
    # Run the packet through every hop of both legs.
    hops = list(entries[e["header1_index"]]["hops"]) + list(entries[e["header2_index"]]["hops"])
    secrets2 = entries[e["header2_index"]]["secrets_hex"]
    for i, hop in enumerate(hops):
        key = PrivateKey.from_der(unhex(hop["packet_private_der_hex"]))
        result = PacketProcessor([(key, MemoryReplayLog())]).process(packet)
        if i < len(hops) - 1:
            if not isinstance(result, Relay):
                raise AssertionError(f"hop {i}: expected relay, got {result!r}")
            packet = result.packet
        elif isinstance(result, Exit):
            final = result.payload
            if s2 is None:
                for s in reversed(secrets2):
                    final = crypto.lioness_encrypt(
                        final, crypto.lioness_keys(unhex(s), crypto.PAYLOAD_ENCRYPT_MODE))
            if final != payload:
                raise AssertionError("final hop's payload differs from the input payload")
