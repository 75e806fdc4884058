"""Vector checks that span the whole codec: decoding handles, SURBs,
recipient-side decoding, and the exit-side view of processed packets
(the ``decoded`` field and case extras of server_processing.json)."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from mixminion.codec import crypto
from mixminion.codec.compression import decompress
from mixminion.codec.decode import CorruptPayload, Decoded, decode_payload
from mixminion.codec.errors import CodecError, ParseError
from mixminion.codec.exit_headers import parse_message
from mixminion.codec.routing import tag_from_random
from mixminion.codec.rsa import PrivateKey
from mixminion.codec.surb import (
    ReplyBlock,
    parse_reply_blocks,
    secret_generator,
    seed_is_valid,
)
from mixminion.test.vectorkit import Entry, blob, register, unhex


def _eq(got: object, want: object, what: str) -> None:
    if got != want:
        raise AssertionError(f"{what}: got {got!r}, want {want!r}")


def _no_extra(d: Mapping[str, Any], allowed: str, what: str) -> None:
    extra = set(d) - set(allowed.split())
    if extra:
        raise AssertionError(f"{what}: unknown fields {sorted(extra)}")


@register("primitives", "tag", "random_hex tag_hex")
def check_tag(e: Entry) -> None:
    tag = tag_from_random(unhex(e["random_hex"]))
    _eq(tag.hex(), e["tag_hex"], "tag")
    _eq(tag[0] & 0x80, 0, "tag top bit")


# --- surbs.json ------------------------------------------------------------


@register("surbs", "surbs", "path user_key_hex exit_type exit_address_hex surb_b64 surb_text "
          "parsed tag_hex validate_digest_hex generate_key_hex secrets_hex hop_secrets_hex "
          "exit_routing_info_hex")
def check_surb(e: Entry) -> None:
    from mixminion.codec.process import Exit, PacketProcessor, Relay
    from mixminion.codec.replay import MemoryReplayLog

    binary = blob(e, "surb")
    block = ReplyBlock.parse(binary)
    _eq(block.pack(), binary, "binary re-encoding")
    _eq(block.to_text(), e["surb_text"], "text encoding")
    _eq(parse_reply_blocks(e["surb_text"].encode()), [block], "text parse")
    _eq(parse_reply_blocks(binary + b"\n " + binary), [block, block], "concatenated")
    parsed = e["parsed"]
    _no_extra(parsed, "timestamp routing_type routing_info_hex encryption_key_hex "
              "header_sha1_hex", "parsed")
    _eq(block.timestamp, parsed["timestamp"], "timestamp")
    _eq(block.routing_type, parsed["routing_type"], "routing type")
    _eq(block.routing_info.hex(), parsed["routing_info_hex"], "routing info")
    _eq(block.key.hex(), parsed["encryption_key_hex"], "key")
    _eq(crypto.sha1(block.header).hex(), parsed["header_sha1_hex"], "header sha1")

    tag, user_key = unhex(e["tag_hex"]), unhex(e["user_key_hex"])
    _eq(crypto.sha1(tag + user_key + b"Validate").hex(), e["validate_digest_hex"], "validate")
    if not seed_is_valid(tag, user_key):
        raise AssertionError("seed does not validate")
    _eq(crypto.sha1(tag + user_key + b"Generate")[:16].hex(), e["generate_key_hex"], "generate")
    gen = secret_generator(tag, user_key)
    secrets = [gen(16).hex() for _ in e["secrets_hex"]]
    _eq(secrets, e["secrets_hex"], "secrets")
    n = len(e["path"])
    _eq(e["hop_secrets_hex"], [secrets[n - 1 - i] for i in range(n)], "hop secrets")
    _eq(secrets[n], parsed["encryption_key_hex"], "last secret is the key")
    _eq(e["exit_routing_info_hex"], e["tag_hex"] + e["exit_address_hex"], "exit routing")

    # Peel the SURB header hop by hop with the path's private keys.
    packet = block.header + bytes(2048) + bytes(28672)
    for i, hop in enumerate(e["path"]):
        _no_extra(hop, "nickname packet_private_keys_der_hex routing_info_hex", "path hop")
        keys = [(PrivateKey.from_der(unhex(k)), MemoryReplayLog())
                for k in hop["packet_private_keys_der_hex"]]
        if i == 0:
            _eq(hop["routing_info_hex"], parsed["routing_info_hex"], "first hop routing info")
        result = PacketProcessor(keys).process(packet)
        _eq(result.subheader.secret.hex(), e["hop_secrets_hex"][i], f"hop {i} secret")
        if i < n - 1:
            if not isinstance(result, Relay):
                raise AssertionError(f"hop {i}: {result!r}")
            _eq(result.routing_info.hex(), e["path"][i + 1]["routing_info_hex"], "next hop")
            packet = result.packet
        else:
            if not isinstance(result, Exit):
                raise AssertionError(f"last hop: {result!r}")
            _eq(result.exit_type, int(e["exit_type"]), "exit type")
            _eq(result.routing_info.hex(), e["exit_routing_info_hex"], "exit routing info")


@register("surbs", "surb_parse_invalid", "surb_b64 why")
def check_surb_invalid(e: Entry) -> None:
    data = blob(e, "surb")
    for parse in (ReplyBlock.parse, parse_reply_blocks):
        try:
            parse(data)
        except ParseError:
            continue
        raise AssertionError(f"invalid SURB accepted by {parse.__name__}: {e['why']}")


@register("surbs", "reply_decode", "user_key_hex tag_hex payload_b64 message_hex")
def check_reply_decode(e: Entry) -> None:
    decoded = decode_payload(blob(e, "payload"), unhex(e["tag_hex"]),
                             {"owner": unhex(e["user_key_hex"])})
    if decoded is None or decoded.kind != "reply":
        raise AssertionError(f"reply not decoded: {decoded!r}")
    _eq(decoded.message().hex(), e["message_hex"], "reply message")


# --- payloads.json: decode -------------------------------------------------


@register("payloads", "decode", "why payload_b64 tag_hex rsa_private_key_der_hex user_key_hex "
          "expected message_hex")
def check_payload_decode(e: Entry) -> None:
    user_keys = {"u": unhex(e["user_key_hex"])} if "user_key_hex" in e else {}
    rsa_keys = ([PrivateKey.from_der(unhex(e["rsa_private_key_der_hex"]))]
                if "rsa_private_key_der_hex" in e else [])
    try:
        decoded = decode_payload(blob(e, "payload"), unhex(e["tag_hex"]), user_keys, rsa_keys)
    except CorruptPayload:
        _eq("error", e["expected"], e["why"])
        return
    if decoded is None:
        _eq("unknown", e["expected"], e["why"])
        return
    _eq("message", e["expected"], e["why"])
    _eq(decoded.message().hex(), e["message_hex"], e["why"])
