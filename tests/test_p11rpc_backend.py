"""An in-test token implementing the p11rpc Backend protocol with real keys.

It stands in for ``cryptobat.token.Token`` until the core exists: real signatures from
``cryptography`` and a small RRSIG policy (algorithm, key tag, validity window), so the
adapter is exercised against genuine accept/refuse decisions.
"""
from __future__ import annotations

import os
import struct
import time

import dns.dnssec
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa, utils
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from cryptobat.api import KeyInfo, SignResult
from cryptobat.p11rpc.backend import Backend

PIN = b"1234"
MAX_VALIDITY = 30 * 86400
_HASH = {8: hashes.SHA256, 10: hashes.SHA512, 13: hashes.SHA256, 14: hashes.SHA384}
_PREHASH = {20: hashes.SHA1, 32: hashes.SHA256, 48: hashes.SHA384, 64: hashes.SHA512}


def _public_wire(alg: int, priv) -> bytes:
    pub = priv.public_key()
    if alg in (8, 10):
        n = pub.public_numbers()
        e = n.e.to_bytes((n.e.bit_length() + 7) // 8, "big")
        return bytes([len(e)]) + e + n.n.to_bytes((n.n.bit_length() + 7) // 8, "big")
    if alg in (13, 14):
        return pub.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)[1:]
    return pub.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _new_private(alg: int):
    if alg in (8, 10):
        return rsa.generate_private_key(65537, 2048)
    if alg == 13:
        return ec.generate_private_key(ec.SECP256R1())
    if alg == 14:
        return ec.generate_private_key(ec.SECP384R1())
    if alg == 15:
        return ed25519.Ed25519PrivateKey.generate()
    if alg == 16:
        return ed448.Ed448PrivateKey.generate()
    raise ValueError(alg)


def make_signing_data(key: KeyInfo, expiration: int, inception: int, rrs: bytes = b"") -> bytes:
    """RRSIG RDATA without signature (type A, owner/signer testzone.) followed by ``rrs``."""
    signer = b"\x08testzone\x00"
    rr = rrs or signer + struct.pack(">HHIH", 1, 1, 3600, 4) + bytes([192, 0, 2, 1])
    return struct.pack(">HBBIIIH", 1, key.algorithm, 1, 3600, expiration, inception,
                       key.keytag) + signer + rr


class FakeToken:
    """Backend protocol implementation: policy is "RRSIG matches key and expires within 30 days"."""

    def __init__(self, algorithms=((8, False), (13, False), (14, True), (15, False))) -> None:
        self.now = int(time.time())
        self.priv: dict[str, object] = {}
        self.infos: dict[str, KeyInfo] = {}
        self.keygen = True
        self.delete_allowed = True
        for i, (alg, compat) in enumerate(algorithms):
            self.generate_key(alg, "zsk", "testzone.", f"k{alg}", compat=compat)

    def info(self) -> dict:
        return {"label": "cryptobat test", "serial": "0001", "manufacturer": "Cryptobat",
                "model": "fake", "time": self.now}

    def check_pin(self, pin: bytes) -> bool:
        return pin == PIN

    def keys(self) -> list[KeyInfo]:
        return list(self.infos.values())

    def check_signing_data(self, label: str, data: bytes) -> str | None:
        key = self.infos.get(label)
        if key is None:
            return "no such key"
        if len(data) < 18:
            return "not RRSIG signing data"
        _tc, alg, _labels, _ttl, exp, inc, tag = struct.unpack(">HBBIIIH", data[:18])
        if alg != key.algorithm or tag != key.keytag:
            return "RRSIG does not name this key"
        if exp > self.now + MAX_VALIDITY:
            return "expiration too far in the future"
        if inc > exp:
            return "inception after expiration"
        return None

    def _raw_sign(self, label: str, data: bytes) -> bytes:
        key, priv = self.infos[label], self.priv[label]
        if key.algorithm in (8, 10):
            return priv.sign(data, padding.PKCS1v15(), _HASH[key.algorithm]())
        if key.algorithm in (13, 14):
            r, s = utils.decode_dss_signature(priv.sign(data, ec.ECDSA(_HASH[key.algorithm]())))
            n = 32 if key.algorithm == 13 else 48
            return r.to_bytes(n, "big") + s.to_bytes(n, "big")
        return priv.sign(data)

    def timed_sign(self, items):
        out = []
        for label, data in items:
            reason = self.check_signing_data(label, data)
            out.append(SignResult(reason=reason) if reason else SignResult(self._raw_sign(label, data)))
        return out

    def sign_digest(self, label: str, digest: bytes, mechanism: str, bound: bool) -> SignResult:
        key = self.infos.get(label)
        if key is None:
            return SignResult(reason="no such key")
        if not bound and not key.compat:
            return SignResult(reason="unbound digest for a non-compat key")
        priv = self.priv[label]
        if mechanism == "ecdsa" and key.algorithm in (13, 14) and len(digest) in _PREHASH:
            r, s = utils.decode_dss_signature(
                priv.sign(digest, ec.ECDSA(utils.Prehashed(_PREHASH[len(digest)]()))))
            n = 32 if key.algorithm == 13 else 48
            return SignResult(r.to_bytes(n, "big") + s.to_bytes(n, "big"))
        if mechanism == "rsa-pkcs" and key.algorithm in (8, 10):
            h = _PREHASH.get(len(digest) - 19) or (hashes.SHA1 if len(digest) == 35 else None)
            if h is None:
                return SignResult(reason="bad DigestInfo")
            size = h().digest_size
            return SignResult(priv.sign(digest[-size:], padding.PKCS1v15(), utils.Prehashed(h())))
        return SignResult(reason="mechanism does not fit key")

    def keygen_allowed(self) -> bool:
        return self.keygen

    def generate_key(self, algorithm: int, role: str, zone: str, label: str, compat: bool = False) -> KeyInfo:
        if label in self.infos:
            raise ValueError("label exists")
        priv = _new_private(algorithm)
        pub = _public_wire(algorithm, priv)
        flags = 257 if role in ("ksk", "csk") else 256
        tmp = KeyInfo(label, zone or "testzone.", algorithm, role, 0, flags, pub, compat)
        info = KeyInfo(label, tmp.zone, algorithm, role, dns.dnssec.key_id(tmp.dnskey()), flags, pub, compat)
        self.priv[label], self.infos[label] = priv, info
        return info

    def delete_key(self, label: str) -> None:
        if not self.delete_allowed:
            raise PermissionError("no quorum window")
        self.infos.pop(label, None)
        self.priv.pop(label, None)

    def random(self, n: int) -> bytes:
        return os.urandom(n)


def test_fake_token_satisfies_protocol():
    tok = FakeToken()
    assert isinstance(tok, Backend)
    k = tok.infos["k13"]
    good = make_signing_data(k, tok.now + 86400, tok.now - 3600)
    assert tok.check_signing_data("k13", good) is None
    assert tok.check_signing_data("k13", make_signing_data(k, tok.now + 90 * 86400, tok.now)) is not None
    assert tok.timed_sign([("k13", good)])[0].ok
