"""Vector checks for primitives.json and rsa_oaep.json."""

from __future__ import annotations

from mixminion.codec import crypto
from mixminion.codec.errors import CryptoError
from mixminion.codec.rsa import PrivateKey, PublicKey, oaep_decode, oaep_encode
from mixminion.test.vectorkit import Entry, blob, register, unhex

F = "primitives"


def _eq(got: object, want: object, what: str) -> None:
    if got != want:
        raise AssertionError(f"{what}: got {got!r}, want {want!r}")


@register(F, "sha1", "input_hex digest_hex")
def check_sha1(e: Entry) -> None:
    _eq(crypto.sha1(unhex(e["input_hex"])).hex(), e["digest_hex"], "sha1")


@register(F, "aes_ctr", "key_hex offset input_hex output_hex")
def check_aes_ctr(e: Entry) -> None:
    key, data = unhex(e["key_hex"]), unhex(e["input_hex"])
    _eq(crypto.ctr(key, data, e["offset"]).hex(), e["output_hex"], "ctr")
    _eq(crypto.ctr(key, unhex(e["output_hex"]), e["offset"]), data, "ctr inverse")


@register(F, "prng", "key_hex offset length output_hex")
def check_prng(e: Entry) -> None:
    out = crypto.prng(unhex(e["key_hex"]), e["length"], e["offset"])
    _eq(out.hex(), e["output_hex"], "prng")
    if e["offset"] == 0:
        gen = crypto.AESCounterPRNG(unhex(e["key_hex"]))
        half = e["length"] // 2
        _eq((gen(half) + gen(e["length"] - half)).hex(), e["output_hex"], "AESCounterPRNG")


@register(F, "aes_block", "key_hex input_hex encrypt_hex decrypt_hex")
def check_aes_block(e: Entry) -> None:
    key, block = unhex(e["key_hex"]), unhex(e["input_hex"])
    _eq(crypto.aes_block_encrypt(key, block).hex(), e["encrypt_hex"], "aes encrypt")
    _eq(crypto.aes_block_decrypt(key, block).hex(), e["decrypt_hex"], "aes decrypt")
    # AES-CTR block 0 is AES_K(0^16): ties the ECB helper to the keystream.
    _eq(crypto.prng(key, 16), crypto.aes_block_encrypt(key, bytes(16)), "ctr block 0")


def _key_source(e: Entry, count: int) -> tuple:
    src = e["key_source"]
    if set(src) - {"master_hex", "mode_text"}:
        raise AssertionError(f"unknown key_source fields {sorted(src)}")
    keys = crypto.lioness_keys(unhex(src["master_hex"]), src["mode_text"].encode("ascii"))
    want = tuple(unhex(k) for k in e["keys_hex"])
    _eq(keys[:count], want, "derived keys")
    return want


@register(
    F,
    "lioness",
    "keys_hex key_source input_hex input_b64 encrypt_hex encrypt_b64 decrypt_hex decrypt_b64",
)
def check_lioness(e: Entry) -> None:
    keys = _key_source(e, 4)
    data = blob(e, "input")
    enc, dec = crypto.lioness_encrypt(data, keys), crypto.lioness_decrypt(data, keys)
    _eq(enc, blob(e, "encrypt"), "lioness encrypt")
    _eq(dec, blob(e, "decrypt"), "lioness decrypt")
    _eq(crypto.lioness_decrypt(enc, keys), data, "lioness round trip")


@register(F, "bear", "keys_hex key_source input_hex encrypt_hex decrypt_hex")
def check_bear(e: Entry) -> None:
    keys = _key_source(e, 2)
    data = unhex(e["input_hex"])
    enc = crypto.bear_encrypt(data, keys)
    _eq(enc.hex(), e["encrypt_hex"], "bear encrypt")
    _eq(crypto.bear_decrypt(data, keys).hex(), e["decrypt_hex"], "bear decrypt")
    _eq(crypto.bear_decrypt(enc, keys), data, "bear round trip")


_MODE_FIELDS = {"name", "mode_text", "key16_hex", "key20_hex", "lioness_keys_hex", "bear_keys_hex"}


@register(F, "keyset", "master_hex modes")
def check_keyset(e: Entry) -> None:
    master = unhex(e["master_hex"])
    for mode in e["modes"]:
        if set(mode) - _MODE_FIELDS:
            raise AssertionError(f"unknown keyset mode fields {sorted(mode)}")
        text = mode["mode_text"].encode("ascii")
        _eq(crypto.derive_key(master, text, 16).hex(), mode["key16_hex"], mode["name"])
        _eq(crypto.derive_key(master, text, 20).hex(), mode["key20_hex"], mode["name"])
        _eq([k.hex() for k in crypto.lioness_keys(master, text)], mode["lioness_keys_hex"], mode["name"])
        _eq([k.hex() for k in crypto.bear_keys(master, text)], mode["bear_keys_hex"], mode["name"])


@register(F, "whiten", "input_hex input_b64 output_hex output_b64")
def check_whiten(e: Entry) -> None:
    data, out = blob(e, "input"), blob(e, "output")
    _eq(crypto.whiten(data), out, "whiten")
    _eq(crypto.unwhiten(out), data, "unwhiten")


@register(F, "swap_keys", "header_b64 keys_from_header_hex payload_b64 keys_from_payload_hex")
def check_swap_keys(e: Entry) -> None:
    header, payload = blob(e, "header"), blob(e, "payload")
    _eq([k.hex() for k in crypto.keys_from_header(header)], e["keys_from_header_hex"], "from header")
    _eq([k.hex() for k in crypto.keys_from_payload(payload)], e["keys_from_payload_hex"], "from payload")


# --- rsa_oaep.json ---------------------------------------------------------

R = "rsa_oaep"
_KEYS: dict[str, PrivateKey] = {}


@register(R, "keys", "id bits n_hex e d_hex p_hex q_hex private_der_hex public_der_hex fingerprint")
def check_keys(e: Entry) -> None:
    priv = PrivateKey.from_der(unhex(e["private_der_hex"]))
    pub = PublicKey.from_der(unhex(e["public_der_hex"]))
    nums = priv.key.private_numbers()
    _eq(nums.public_numbers.n, int(e["n_hex"], 16), "n")
    _eq(nums.public_numbers.e, e["e"], "e")
    _eq(nums.d, int(e["d_hex"], 16), "d")
    _eq({nums.p, nums.q}, {int(e["p_hex"], 16), int(e["q_hex"], 16)}, "p, q")
    _eq(priv.public, pub, "public of private")
    _eq(pub.size_bytes * 8, e["bits"], "bits")
    _eq(priv.der.hex(), e["private_der_hex"], "private DER re-encoding")
    _eq(pub.der.hex(), e["public_der_hex"], "public DER re-encoding")
    _eq(pub.fingerprint, e["fingerprint"], "fingerprint")
    _KEYS[e["id"]] = priv


def key_by_id(key_id: str) -> PrivateKey:
    """Keys from rsa_oaep.json, loaded on demand (independent of test order)."""
    if key_id not in _KEYS:
        import json

        from mixminion.test.vectorkit import vectors_dir

        for k in json.loads((vectors_dir() / "rsa_oaep.json").read_text())["keys"]:
            _KEYS[k["id"]] = PrivateKey.from_der(unhex(k["private_der_hex"]))
    return _KEYS[key_id]


@register(R, "oaep", "key_bytes param_hex message_hex seed_hex padded_hex")
def check_oaep(e: Entry) -> None:
    k, label = int(e["key_bytes"]), unhex(e["param_hex"])
    msg = unhex(e["message_hex"])
    padded = oaep_encode(msg, k, unhex(e["seed_hex"]), label)
    _eq(padded.hex(), e["padded_hex"], "oaep encode")
    _eq(oaep_decode(padded, k, label), msg, "oaep decode")


@register(R, "oaep_invalid", "key_bytes param_hex padded_hex why")
def check_oaep_invalid(e: Entry) -> None:
    try:
        oaep_decode(unhex(e["padded_hex"]), int(e["key_bytes"]), unhex(e["param_hex"]))
    except CryptoError:
        return
    raise AssertionError(f"invalid OAEP accepted: {e['why']}")


@register(R, "pk_encrypt", "key_id message_hex seed_hex ciphertext_hex")
def check_pk_encrypt(e: Entry) -> None:
    key = key_by_id(e["key_id"])
    msg = unhex(e["message_hex"])
    ct = key.public.encrypt_with_seed(msg, unhex(e["seed_hex"]))
    _eq(ct.hex(), e["ciphertext_hex"], "pk encrypt")
    _eq(key.decrypt(ct), msg, "pk decrypt")


@register(R, "pk_sign", "key_id data_hex seed_hex signature_hex")
def check_pk_sign(e: Entry) -> None:
    key = key_by_id(e["key_id"])
    data = unhex(e["data_hex"])
    sig = key.sign_with_seed(data, unhex(e["seed_hex"]))
    _eq(sig.hex(), e["signature_hex"], "pk sign")
    _eq(key.public.verify(sig), data, "verify recovers data")
    if not key.public.check_signature(sig, data):
        raise AssertionError("check_signature refused a good signature")
