"""Vector checks for server_processing.json: every case's packets run hop by
hop through one :class:`PacketProcessor` per server, whose replay logs live
for the whole case, with every expected field compared.

The exit payloads' decoding (``expected.decoded``) and the case extras
(SURB owner decoding, recipient decoding, reassembly) belong to the
end-to-end checks in :mod:`mixminion.test.vectors_endtoend`, imported when
needed.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Mapping, Optional

from mixminion.codec import crypto
from mixminion.codec.process import (
    Drop,
    Exit,
    PacketProcessor,
    ProcessResult,
    Reject,
    Relay,
    replay_value,
)
from mixminion.codec.replay import MemoryReplayLog
from mixminion.codec.routing import HostInfo, IPv4Info, type_name
from mixminion.codec.rsa import PrivateKey, PublicKey
from mixminion.test.vectorkit import Entry, register, unb64, unhex

F = "server_processing"

CASE_FIELDS = ("id kind description servers steps message tamper surb_b64 owner_decode "
               "recipient_decode reassembly")

_SERVER = frozenset({"nickname", "hostname", "port", "key_digest_hex",
                     "packet_private_keys_der_hex", "packet_public_keys_der_hex"})
_STEP_REQUIRED = frozenset({"server", "input_packet_b64", "expected"})
_STEP = _STEP_REQUIRED | {"packet_number"}
_TAMPER = frozenset({"byte", "bit", "before_step"})
_SUBHEADER = frozenset({"key_index", "major", "minor", "secret_hex", "digest_hex",
                        "routing_length", "routing_type", "replay_hash_hex"})
#: per result: (required fields, optional fields) of ``expected``
_EXPECTED: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "relay": (frozenset({"result", "routing_type", "routing_type_name", "routing_info_hex",
                         "next_hop", "output_packet_sha1_hex", "output_packet_prefix_hex",
                         "subheader"}), frozenset()),
    "exit": (frozenset({"result", "exit_type", "exit_type_name", "routing_info_hex",
                        "exit_address_hex", "application_key_hex", "decoded", "subheader"}),
             frozenset({"tag_hex", "exit_address_text"})),
    "drop": (frozenset({"result", "subheader"}), frozenset()),
    "reject": (frozenset({"result", "reason"}), frozenset()),
}
#: the processor's result class for each expected ``result``
_RESULT_CLASSES: dict[str, type] = {"relay": Relay, "exit": Exit, "drop": Drop, "reject": Reject}
_PREFIX_LEN = 64


def _eq(got: object, want: object, what: str) -> None:
    if got != want:
        raise AssertionError(f"{what}: got {got!r}, want {want!r}")


def _fields(d: Mapping[str, Any], required: frozenset[str], allowed: frozenset[str],
            what: str) -> None:
    """Fail on unknown fields, and on missing ones (they would go unchecked)."""
    unknown = set(d) - allowed
    if unknown:
        raise AssertionError(f"{what}: unknown fields {sorted(unknown)}")
    missing = required - set(d)
    if missing:
        raise AssertionError(f"{what}: missing fields {sorted(missing)}")


@lru_cache(maxsize=None)
def _private_key(der_hex: str) -> PrivateKey:
    return PrivateKey.from_der(unhex(der_hex))


class _Server:
    """One nickname of a case: its processor and the logs behind it."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        _fields(spec, _SERVER, _SERVER, f"server {spec.get('nickname')}")
        keys = [_private_key(k) for k in spec["packet_private_keys_der_hex"]]
        publics = [PublicKey.from_der(unhex(k)) for k in spec["packet_public_keys_der_hex"]]
        _eq([k.public for k in keys], publics, "packet public keys")
        self.key_digest = unhex(spec["key_digest_hex"])
        self.logs = [MemoryReplayLog() for _ in keys]
        self.processor = PacketProcessor(list(zip(keys, self.logs)))


def _check_subheader(result: ProcessResult, server: _Server, want: Mapping[str, Any],
                     what: str) -> None:
    _fields(want, _SUBHEADER, _SUBHEADER, f"{what} subheader")
    sub = result.subheader
    assert sub is not None
    key_index = getattr(result, "key_index", None)
    _eq(key_index, want["key_index"], f"{what} key_index")
    _eq(sub.major, want["major"], f"{what} major")
    _eq(sub.minor, want["minor"], f"{what} minor")
    _eq(sub.secret.hex(), want["secret_hex"], f"{what} secret")
    _eq(sub.digest.hex(), want["digest_hex"], f"{what} digest")
    _eq(sub.routing_length, want["routing_length"], f"{what} routing_length")
    _eq(sub.routing_type, want["routing_type"], f"{what} routing_type")
    replay = replay_value(sub.secret)
    _eq(replay.hex(), want["replay_hash_hex"], f"{what} replay hash")
    if replay not in server.logs[want["key_index"]]:
        raise AssertionError(f"{what}: replay value not recorded in key {key_index}'s log")


def _check_next_hop(hop: object, want: Mapping[str, Any], what: str) -> None:
    if isinstance(hop, HostInfo):
        fields = frozenset({"hostname", "port", "key_digest_hex"})
        _fields(want, fields, fields, f"{what} next_hop")
        _eq(hop.hostname, want["hostname"], f"{what} hostname")
    elif isinstance(hop, IPv4Info):
        fields = frozenset({"ip", "port", "key_digest_hex"})
        _fields(want, fields, fields, f"{what} next_hop")
        _eq(hop.ip, want["ip"], f"{what} ip")
    else:
        raise AssertionError(f"{what}: next hop {hop!r}")
    _eq(hop.port, want["port"], f"{what} port")
    _eq(hop.keyinfo.hex(), want["key_digest_hex"], f"{what} key digest")


def _check_routing(routing_type: int, routing_info: bytes, want: Mapping[str, Any], key: str,
                   what: str) -> None:
    """The routing type (``want[key]``), its name and the routing info."""
    _eq(routing_type, want[key], f"{what} {key.replace('_', ' ')}")
    _eq(type_name(routing_type), want[f"{key}_name"], f"{what} type name")
    _eq(routing_info.hex(), want["routing_info_hex"], f"{what} routing info")


def _check_relay(result: Relay, want: Mapping[str, Any], what: str) -> None:
    _check_routing(result.routing_type, result.routing_info, want, "routing_type", what)
    _check_next_hop(result.relay_info, want["next_hop"], what)
    _eq(len(result.packet), 32768, f"{what} output length")
    _eq(crypto.sha1(result.packet).hex(), want["output_packet_sha1_hex"], f"{what} output sha1")
    _eq(result.packet[:_PREFIX_LEN].hex(), want["output_packet_prefix_hex"], f"{what} prefix")


def _check_exit(result: Exit, want: Mapping[str, Any], what: str) -> None:
    _check_routing(result.exit_type, result.routing_info, want, "exit_type", what)
    _eq(result.tag.hex(), want.get("tag_hex", ""), f"{what} tag")
    _eq(result.address.hex(), want["exit_address_hex"], f"{what} address")
    if "exit_address_text" in want:
        _eq(result.address, want["exit_address_text"].encode("ascii"), f"{what} address text")
    _eq(result.application_key.hex(), want["application_key_hex"], f"{what} application key")
    decoded = want["decoded"]
    _eq(crypto.sha1(result.payload).hex(), decoded.get("payload_sha1_hex"), f"{what} payload")
    _eq(result.payload[:_PREFIX_LEN].hex(), decoded.get("payload_prefix_hex"),
        f"{what} payload prefix")
    from mixminion.test import vectors_endtoend

    vectors_endtoend.check_decoded(decoded, result.payload)


def _check_step(result: ProcessResult, server: _Server, want: Mapping[str, Any],
                what: str) -> None:
    kind = want.get("result")
    if kind not in _EXPECTED:
        raise AssertionError(f"{what}: unknown result {kind!r}")
    required, optional = _EXPECTED[kind]
    _fields(want, required, required | optional, f"{what} expected")
    if not isinstance(result, _RESULT_CLASSES[kind]):
        raise AssertionError(f"{what}: expected {kind}, got {result!r}")
    if isinstance(result, Reject):
        _eq(result.reason.value, want["reason"], f"{what} reason")
        return
    if isinstance(result, Relay):
        _check_relay(result, want, what)
    elif isinstance(result, Exit):
        _check_exit(result, want, what)
    _check_subheader(result, server, want["subheader"], what)


def _chained_input(case: Entry, index: int, relay: Relay,
                   servers: Mapping[str, _Server]) -> Optional[bytes]:
    """What step ``index + 1`` must receive if it is the same packet one
    hop later (same packet number, sent to the relay's next hop): the
    relay's output, with the case's tamper bit flipped if it goes there."""
    steps = case["steps"]
    if index + 1 >= len(steps):
        return None
    step, nxt = steps[index], steps[index + 1]
    if step.get("packet_number") != nxt.get("packet_number"):
        return None
    if servers[nxt["server"]].key_digest != relay.next_hop.keyid:
        return None
    out = relay.packet
    tamper = case.get("tamper")
    if tamper is not None and tamper.get("before_step", 0) == index + 1:
        flipped = bytearray(out)
        flipped[tamper["byte"]] ^= 1 << tamper["bit"]
        out = bytes(flipped)
    return out


@register(F, "cases", CASE_FIELDS)
def check_case(case: Entry) -> None:
    if "tamper" in case:
        _fields(case["tamper"], frozenset({"byte", "bit"}), _TAMPER, "tamper")
    servers = {name: _Server(spec) for name, spec in case["servers"].items()}
    exits: list[tuple[Exit, Optional[int]]] = []
    result: Optional[ProcessResult] = None
    for i, step in enumerate(case["steps"]):
        what = f"{case['id']} step {i}"
        _fields(step, _STEP_REQUIRED, _STEP, what)
        server = servers[step["server"]]
        packet = unb64(step["input_packet_b64"])
        if isinstance(result, Relay):
            chained = _chained_input(case, i - 1, result, servers)
            if chained is not None and chained != packet:
                raise AssertionError(f"{what}: input is not the previous step's output")
        result = server.processor.process(packet)
        _check_step(result, server, step["expected"], what)
        if isinstance(result, Exit):
            exits.append((result, step.get("packet_number")))
    from mixminion.test import vectors_endtoend

    vectors_endtoend.check_case_extras(case, exits)
