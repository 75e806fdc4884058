"""Vector checks that span the whole codec: decoding handles, SURBs,
recipient-side decoding, and the exit-side view of processed packets
(the ``decoded`` field and case extras of server_processing.json)."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from mixminion.codec import crypto
from mixminion.codec.compression import decompress
from mixminion.codec.decode import CorruptPayload, Decoded, decode_payload
from mixminion.codec.errors import ParseError
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


# --- server_processing.json: the exit's view and the case extras -----------

_DECODED_FIELDS = ("payload_sha1_hex payload_prefix_hex type singleton fragment headers "
                   "body_hex body_text compressed_hex error")


def check_decoded(decoded: Mapping[str, Any], payload: bytes) -> None:
    """Compare the exit's classification of ``payload`` with ``decoded``."""
    from mixminion.codec import exit as exit_view

    _no_extra(decoded, _DECODED_FIELDS, "decoded")
    _eq(crypto.sha1(payload).hex(), decoded["payload_sha1_hex"], "payload sha1")
    _eq(payload[:64].hex(), decoded["payload_prefix_hex"], "payload prefix")
    view = exit_view.classify_payload(payload)
    kind = decoded["type"]
    if kind == "plain":
        if not isinstance(view, exit_view.Plain):
            raise AssertionError(f"expected plain, got {view!r}")
        single = decoded["singleton"]
        _no_extra(single, "size hash_hex compressed_hex", "singleton")
        _eq(view.compressed.hex(), single["compressed_hex"], "compressed")
        _eq(len(view.compressed), single["size"], "size")
        _eq(payload[2:22].hex(), single["hash_hex"], "hash")
        _eq(view.headers, decoded["headers"], "headers")
        _eq(view.body.hex(), decoded["body_hex"], "body")
        if "body_text" in decoded:
            _eq(view.body.decode("ascii"), decoded["body_text"], "body text")
    elif kind == "fragment":
        if not isinstance(view, exit_view.FragmentPiece):
            raise AssertionError(f"expected fragment, got {view!r}")
        frag = decoded["fragment"]
        _no_extra(frag, "index hash_hex message_id_hex message_length data_length", "fragment")
        f = view.fragment
        _eq(f.index, frag["index"], "index")
        _eq(f.hash.hex(), frag["hash_hex"], "hash")
        _eq(f.message_id.hex(), frag["message_id_hex"], "message id")
        _eq(f.message_length, frag["message_length"], "message length")
        _eq(len(f.data), frag["data_length"], "data length")
    elif kind == "long":
        if not isinstance(view, exit_view.Overcompressed):
            raise AssertionError(f"expected overcompressed, got {view!r}")
        _eq(view.compressed.hex(), decoded["compressed_hex"], "compressed")
    elif kind == "enc":
        if not isinstance(view, exit_view.Encrypted):
            raise AssertionError(f"expected encrypted, got {view!r}")
    elif kind == "err":
        if not isinstance(view, exit_view.Corrupt):
            raise AssertionError(f"expected corrupt, got {view!r}")
    else:
        raise AssertionError(f"unknown decoded type {kind!r}")


def check_case_extras(case: Mapping[str, Any], exits: Sequence[tuple[Any, Optional[int]]]) -> None:
    """``message``, ``owner_decode``, ``recipient_decode``, ``surb_b64`` and
    ``reassembly`` of one case, against the exits our processor produced."""
    last = exits[-1][0] if exits else None
    if "surb_b64" in case:
        block = ReplyBlock.parse(blob(case, "surb"))
        _eq(block.pack(), blob(case, "surb"), "case SURB re-encoding")
    if "owner_decode" in case:
        _check_owner_decode(case["owner_decode"], last)
    if "recipient_decode" in case:
        _check_recipient_decode(case["recipient_decode"], last)
    if "reassembly" in case:
        _check_reassembly(case["reassembly"], exits, case.get("message"))
    elif "message" in case and last is not None:
        _check_message(case["message"], last.payload)


def _check_decoded_message(got: Decoded, spec: Mapping[str, Any], what: str) -> None:
    message = got.message()
    _eq(message.hex(), spec["message_hex"], f"{what} message")
    headers, body = parse_message(message)
    _eq(headers, spec["headers"], f"{what} headers")
    _eq(body.hex(), spec["body_hex"], f"{what} body")


def _check_owner_decode(spec: Mapping[str, Any], exit_result: Any) -> None:
    _no_extra(spec, "user_key_hex tag_hex message_hex headers body_hex", "owner_decode")
    if exit_result is None:
        raise AssertionError("owner_decode without an exit")
    _eq(exit_result.tag.hex(), spec["tag_hex"], "owner tag")
    got = decode_payload(exit_result.payload, exit_result.tag, {"owner": unhex(spec["user_key_hex"])})
    if got is None or got.kind != "reply":
        raise AssertionError(f"owner could not decode the reply: {got!r}")
    _check_decoded_message(got, spec, "owner")


def _check_recipient_decode(spec: Mapping[str, Any], exit_result: Any) -> None:
    _no_extra(spec, "recipient_private_key_der_hex tag_hex message_hex headers body_hex",
              "recipient_decode")
    if exit_result is None:
        raise AssertionError("recipient_decode without an exit")
    _eq(exit_result.tag.hex(), spec["tag_hex"], "recipient tag")
    key = PrivateKey.from_der(unhex(spec["recipient_private_key_der_hex"]))
    got = decode_payload(exit_result.payload, exit_result.tag, {}, [key])
    if got is None or got.kind != "encrypted":
        raise AssertionError(f"recipient could not decode: {got!r}")
    _check_decoded_message(got, spec, "recipient")


def _check_message(spec: Mapping[str, Any], payload: bytes) -> None:
    """What the sender encoded, as seen by a plain exit."""
    from mixminion.codec import exit as exit_view

    _no_extra(spec, "headers body_hex uncompressed_hex", "message")
    view = exit_view.classify_payload(payload)
    if "uncompressed_hex" in spec:
        if not isinstance(view, exit_view.Overcompressed):
            raise AssertionError(f"expected overcompressed, got {view!r}")
        _eq(decompress(view.compressed, len(spec["uncompressed_hex"]) // 2).hex(),
            spec["uncompressed_hex"], "uncompressed")
        return
    if isinstance(view, exit_view.Plain):
        _eq(view.headers, spec["headers"], "message headers")
        _eq(view.body.hex(), spec["body_hex"], "message body")
    elif isinstance(view, exit_view.Corrupt):
        pass  # exit_bad_compression: the sender's message never decodes
    elif not isinstance(view, exit_view.Encrypted):
        raise AssertionError(f"message case ended in {view!r}")


def _check_reassembly(spec: Mapping[str, Any], exits: Sequence[tuple[Any, Optional[int]]],
                      message: Optional[Mapping[str, Any]]) -> None:
    from mixminion.codec.compression import reassembled_limit
    from mixminion.codec.fragments import parse_server_side_message, reassemble
    from mixminion.codec.payload import FragmentPayload, parse_payload

    _no_extra(spec, "fragment_count k n chunks message_id_hex message_length "
              "fragments_used_by_index unwhitened_sha1_hex delivery_routing_type "
              "delivery_routing_type_name delivery_routing_info_hex compressed_sha1_hex "
              "message_sha1_hex headers body_sha1_hex body_length", "reassembly")
    frags = {}
    for result, _number in exits:
        parsed = parse_payload(result.payload)
        if not isinstance(parsed, FragmentPayload):
            raise AssertionError("a fragmented case delivered a non-fragment")
        frags[parsed.index] = parsed
    _eq(len(frags), spec["fragment_count"], "fragment count")
    _eq(spec["chunks"] * spec["n"], spec["fragment_count"], "chunks x n")
    for f in frags.values():
        _eq(f.message_id.hex(), spec["message_id_hex"], "message id")
        _eq(f.message_length, spec["message_length"], "message length")
    used = [frags[i] for i in spec["fragments_used_by_index"]]
    whole = reassemble(used)
    _eq(len(whole), spec["message_length"], "reassembled length")
    _eq(crypto.sha1(whole).hex(), spec["unwhitened_sha1_hex"], "unwhitened")
    # Any other k per chunk must give the same message: try the last k.
    k, n = spec["k"], spec["n"]
    alt = [frags[c * n + j] for c in range(spec["chunks"]) for j in range(n - k, n)]
    _eq(reassemble(alt), whole, "reassembly from the last k of each chunk")
    rt, ri, compressed = parse_server_side_message(whole)
    _eq(rt, spec["delivery_routing_type"], "delivery type")
    from mixminion.codec.routing import type_name
    _eq(type_name(rt), spec["delivery_routing_type_name"], "delivery type name")
    _eq(ri.hex(), spec["delivery_routing_info_hex"], "delivery address")
    _eq(crypto.sha1(compressed).hex(), spec["compressed_sha1_hex"], "compressed")
    text = decompress(compressed, reassembled_limit(len(compressed)))
    _eq(crypto.sha1(text).hex(), spec["message_sha1_hex"], "message")
    headers, body = parse_message(text)
    _eq(headers, spec["headers"], "headers")
    _eq(crypto.sha1(body).hex(), spec["body_sha1_hex"], "body")
    _eq(len(body), spec["body_length"], "body length")
    if message is not None:
        _no_extra(message, "headers body_hex", "message")
        _eq(headers, message["headers"], "message headers")
        _eq(body.hex(), message["body_hex"], "message body")
