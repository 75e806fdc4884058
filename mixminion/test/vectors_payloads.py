"""Vector checks for compression, payload layouts and fragmentation:
primitives.json ``compression``, payloads.json ``singleton``/``fragment``,
fragments.json ``params``/``fec``/``messages``."""

from __future__ import annotations

import itertools
from typing import TypeVar

from mixminion.codec import compression, fragments, payload
from mixminion.codec.crypto import sha1
from mixminion.codec.exit import Plain, classify_payload
from mixminion.codec.exit_headers import parse_message
from mixminion.test.vectorkit import Entry, register, unb64, unhex


def _eq(got: object, want: object, what: str) -> None:
    if got == want:
        return
    if isinstance(got, bytes) and isinstance(want, bytes):
        at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        raise AssertionError(
            f"{what}: {len(got)} bytes (sha1 {sha1(got).hex()[:12]}) differ from the expected "
            f"{len(want)} bytes (sha1 {sha1(want).hex()[:12]}) first at offset {at}"
        )
    if got != want:
        g, w = repr(got), repr(want)
        if len(g) > 200 or len(w) > 200:
            g, w = g[:100] + "...", w[:100] + "..."
        raise AssertionError(f"{what}: got {g}, want {w}")


def _fixed_rng(*chunks: bytes):
    """A random source that hands out exactly ``chunks``, in order, and
    fails if asked for anything else (so the draw order is checked too)."""
    queue = list(chunks)

    def rng(n: int) -> bytes:
        if not queue:
            raise AssertionError(f"unexpected random draw of {n} bytes")
        nxt = queue.pop(0)
        if len(nxt) != n:
            raise AssertionError(f"random draw of {n} bytes, expected {len(nxt)}")
        return nxt

    rng.queue = queue  # type: ignore[attr-defined]
    return rng


# --- primitives.json: compression ------------------------------------------


@register("primitives", "compression", "input_hex compressed_hex")
def check_compression(e: Entry) -> None:
    data, packed = unhex(e["input_hex"]), unhex(e["compressed_hex"])
    _eq(compression.compress(data).hex(), e["compressed_hex"], "compress")
    _eq(compression.decompress(packed, len(data)), data, "decompress at exact limit")
    if data:
        try:
            compression.decompress(packed, len(data) - 1)
        except compression.DecompressionLimitExceeded:
            pass
        else:
            raise AssertionError("decompress ignored a limit one byte too small")


# --- payloads.json ---------------------------------------------------------

_Payload = TypeVar("_Payload", payload.SingletonPayload, payload.FragmentPayload)


def _parsed(e: Entry, kind: type[_Payload], name: str) -> tuple[bytes, int, _Payload]:
    """The entry's payload bytes, its overhead, and the payload parsed as ``kind``."""
    raw, overhead = unb64(e["payload_b64"]), e["overhead"]
    _eq(len(raw), payload.PAYLOAD_LEN - overhead, "payload length")
    _eq(payload.checksum_ok(raw), True, "checksum_ok")
    p = payload.parse_payload(raw)
    if not isinstance(p, kind):
        raise AssertionError(f"parsed as {type(p).__name__}, want {name}")
    return raw, overhead, p


@register("payloads", "singleton", "overhead payload_b64 size hash_hex compressed_hex message_hex")
def check_singleton(e: Entry) -> None:
    raw, overhead, p = _parsed(e, payload.SingletonPayload, "singleton")
    compressed, message = unhex(e["compressed_hex"]), unhex(e["message_hex"])
    _eq(p.size, e["size"], "size")
    _eq(p.hash.hex(), e["hash_hex"], "hash")
    _eq(p.compressed, compressed, "compressed bytes")
    _eq(p.overhead, overhead, "overhead")
    _eq(compression.compress(message), compressed, "compress(message)")
    limit = compression.singleton_limit(len(compressed))
    _eq(compression.decompress(compressed, limit), message, "decompress")
    padding = raw[payload.SINGLETON_OVERHEAD + p.size :]
    rebuilt = payload.encode_singleton(compressed, _fixed_rng(padding), overhead)
    _eq(rebuilt, raw, "encode_singleton")
    if overhead == 0:
        got = classify_payload(raw)
        headers, body = parse_message(message)
        _eq(got, Plain(headers, body, compressed), "classify_payload")


@register(
    "payloads",
    "fragment",
    "overhead payload_b64 index hash_hex message_id_hex message_length data_sha1_hex",
)
def check_fragment(e: Entry) -> None:
    raw, overhead, p = _parsed(e, payload.FragmentPayload, "fragment")
    _eq(p.index, e["index"], "index")
    _eq(p.hash.hex(), e["hash_hex"], "hash")
    _eq(p.message_id.hex(), e["message_id_hex"], "message id")
    _eq(p.message_length, e["message_length"], "message length")
    _eq(sha1(p.data).hex(), e["data_sha1_hex"], "data sha1")
    _eq(p.overhead, overhead, "overhead")
    _eq(len(p.data), payload.fragment_capacity(overhead), "data length")
    rebuilt = payload.encode_fragment(p.index, p.message_id, p.message_length, p.data)
    _eq(rebuilt, raw, "encode_fragment")


# --- fragments.json --------------------------------------------------------

_PARAM_FIELDS = {
    "fragment_capacity": "capacity",
    "k": "k",
    "n": "n",
    "chunks": "chunks",
    "chunk_size": "chunk_size",
    "padded_length": "padded_length",
    "padding_length": "padding_length",
}


@register(
    "fragments",
    "params",
    "length overhead fragment_capacity k n chunks chunk_size padded_length padding_length",
)
def check_params(e: Entry) -> None:
    params = fragments.FragmentParams.for_message(e["length"], e["overhead"])
    for field, attr in _PARAM_FIELDS.items():
        _eq(getattr(params, attr), e[field], field)


@register("fragments", "fec", "k n input_blocks_hex encoded_blocks_hex decode_subsets")
def check_fec(e: Entry) -> None:
    k, n = e["k"], e["n"]
    blocks = [unhex(b) for b in e["input_blocks_hex"]]
    encoded = [unhex(b) for b in e["encoded_blocks_hex"]]
    _eq(len(blocks), k, "number of input blocks")
    _eq(len(encoded), n, "number of encoded blocks")
    _eq([b.hex() for b in fragments.fec_encode(blocks, n)], e["encoded_blocks_hex"], "FEC encode")
    for subset in e["decode_subsets"]:
        pairs = [(i, encoded[i]) for i in subset]
        _eq(fragments.fec_decode(k, n, pairs), blocks, f"FEC decode from {subset}")
        _eq(fragments.fec_decode(k, n, reversed(pairs)), blocks, f"FEC decode from reversed {subset}")


def _subsets(params: fragments.FragmentParams, limit: int = 12) -> list[list[int]]:
    """Per-chunk index sets of size k: the systematic one, the last k
    (non-systematic first), and some more combinations."""
    k, n = params.k, params.n
    combos = list(itertools.islice(itertools.combinations(range(n), k), limit))
    combos.append(tuple(range(n - k, n)))
    return [
        [c * n + j for c in range(params.chunks) for j in combo]
        for combo in dict.fromkeys(combos)
    ]


@register(
    "fragments",
    "messages",
    "message_b64 prefix_hex compressed_sha1_hex message_id_hex message_length k n chunks "
    "padding_hex payloads_b64 delivery_routing_type delivery_routing_info_hex",
)
def check_messages(e: Entry) -> None:
    message, prefix = unb64(e["message_b64"]), unhex(e["prefix_hex"])
    msgid, padding = unhex(e["message_id_hex"]), unhex(e["padding_hex"])
    rt, ri = e["delivery_routing_type"], unhex(e["delivery_routing_info_hex"])
    want = [unb64(p) for p in e["payloads_b64"]]

    compressed = compression.compress(message)
    _eq(sha1(compressed).hex(), e["compressed_sha1_hex"], "compressed sha1")
    _eq(fragments.server_side_prefix(rt, ri), prefix, "server-side prefix")
    m = prefix + compressed
    _eq(len(m), e["message_length"], "message length")
    params = fragments.FragmentParams.for_message(len(m))
    _eq((params.k, params.n, params.chunks), (e["k"], e["n"], e["chunks"]), "k, n, chunks")
    _eq(len(padding), params.padding_length, "padding length")
    _eq(len(want), params.fragment_count, "number of payloads")

    rng = _fixed_rng(msgid, padding)
    got = fragments.fragment_message(m, rng)
    if rng.queue:  # type: ignore[attr-defined]
        raise AssertionError("fragment_message did not draw message id and padding")
    for i, (g, w) in enumerate(zip(got, want)):
        _eq(g, w, f"payload {i}")
    _eq(len(got), len(want), "payload count")
    _eq(fragments.fragment_message(m, _fixed_rng(), message_id=msgid, padding=padding), want,
        "payloads from explicit id and padding")

    parsed = [payload.parse_payload(p) for p in want]
    for i, p in enumerate(parsed):
        if not isinstance(p, payload.FragmentPayload):
            raise AssertionError(f"payload {i} is not a fragment")
        _eq((p.index, p.message_id, p.message_length), (i, msgid, len(m)), f"payload {i} fields")

    for subset in _subsets(params):
        # feed non-systematic fragments first
        chosen = [parsed[i] for i in sorted(subset, reverse=True)]
        reassembled = fragments.reassemble(chosen)  # type: ignore[arg-type]
        _eq(reassembled, m, f"reassembly from {subset}")
    got_rt, got_ri, got_c = fragments.parse_server_side_message(m)
    _eq((got_rt, got_ri), (rt, ri), "delivery routing")
    limit = compression.reassembled_limit(len(got_c))
    _eq(compression.decompress(got_c, limit), message, "decompressed message")
