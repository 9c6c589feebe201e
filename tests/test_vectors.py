"""Signatures through the token reproduce the standards' examples (RFC 5702, RFC 8080) bit for bit,
and ECDSA keys imported from RFC 6605 sign what validates against the RFC's DNSKEY and DS.

Each example key is imported under quorum (``keyimport``) into a token whose clock reads a
moment inside the example's validity window, so the real policy check runs on every payload.
"""
from __future__ import annotations

import base64
import json

import dns.dnssec
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

from cryptobat.console import Console
from cryptobat.token import Token
from support import VECTORS, load_vectors, make_token, vector_rr, vector_rrset



def _token_at(tmp_path, when: int, maxval: int) -> tuple[Token, Console]:
    o = make_token(tmp_path / "t", quorum=1, officers=("solo",), close=False, wall=lambda: float(when),
                   mono=lambda: 0.0, maxval=maxval)
    return o.console.token, o.console


def _import(c: Console, tmp_path, ex, role: str) -> str:
    keyfile = tmp_path / "example.private"
    keyfile.write_text(ex["private_key"])
    zone = vector_rr(ex["dnskey"]).name.to_text()
    out = c.handle(f"keyimport {role} {zone} {keyfile} rfc")
    assert out.startswith("ok: key imported") and f"tag={ex['key_tag']}" in out, out
    return zone


def _sign_example(t: Token, ex):
    rrset = vector_rrset(ex["rrset"])
    rrsig = vector_rr(ex["rrsig"])[0]
    template = rrsig.replace(signature=b"")
    data = dns.dnssec._make_rrsig_signature_data(rrset, template)
    res = t.timed_sign([("rfc", data)])[0]
    assert res.ok, res.reason
    return rrset, rrsig, res.signature


def _validate(ex, rrset, rrsig, signature, when):
    dnskey = vector_rr(ex["dnskey"])
    dns.dnssec.validate_rrsig(rrset, rrsig.replace(signature=signature), {dnskey.name: dnskey}, now=when)


@pytest.mark.parametrize("ex", load_vectors("rfc5702.json"), ids=lambda e: e["section"])
def test_rfc5702_rsa_signatures_bit_for_bit(tmp_path, ex):
    rrsig = vector_rr(ex["rrsig"])[0]
    when = rrsig.expiration - 86400  # a day before the example expires
    t, c = _token_at(tmp_path, when, 2 * 86400)
    try:
        _import(c, tmp_path, ex, "zsk")
        rrset, rrsig, sig = _sign_example(t, ex)
        assert sig == rrsig.signature
        _validate(ex, rrset, rrsig, sig, when)
    finally:
        t.close()


@pytest.mark.parametrize("ex", load_vectors("rfc8080.json"), ids=lambda e: f"{e['section']}-{e['key_tag']}")
def test_rfc8080_eddsa_signatures_bit_for_bit(tmp_path, ex):
    rrsig = vector_rr(ex["rrsig"])[0]
    when = rrsig.expiration - 86400
    t, c = _token_at(tmp_path, when, 2 * 86400)
    try:
        _import(c, tmp_path, ex, "csk")  # the examples sign an MX with a flags-257 key
        rrset, rrsig, sig = _sign_example(t, ex)
        assert sig == rrsig.signature
        _validate(ex, rrset, rrsig, sig, when)
    finally:
        t.close()


@pytest.mark.parametrize("ex", load_vectors("rfc6605.json"), ids=lambda e: e["section"])
def test_rfc6605_ecdsa_key_signs_what_validates(tmp_path, ex):
    rrsig = vector_rr(ex["rrsig"])[0]
    when = rrsig.expiration - 86400
    t, c = _token_at(tmp_path, when, 2 * 86400)
    try:
        zone = _import(c, tmp_path, ex, "csk")
        k = t.key("rfc")
        assert k.dnskey() == vector_rr(ex["dnskey"])[0]
        ds = vector_rr(ex["ds"])[0]
        assert dns.dnssec.make_ds(zone, k.dnskey(), ds.digest_type) == ds
        rrset, rrsig, sig = _sign_example(t, ex)
        assert sig != rrsig.signature  # ECDSA is randomized (or deterministic per RFC 6979): a new signature
        _validate(ex, rrset, rrsig, sig, when)
    finally:
        t.close()


def test_example_outside_policy_is_refused(tmp_path):
    """The same RFC 5702 payload, on a token whose clock is years before the example expires."""
    ex = load_vectors("rfc5702.json")[0]
    rrsig = vector_rr(ex["rrsig"])[0]
    t, c = _token_at(tmp_path, rrsig.expiration - 5 * 365 * 86400, 2 * 86400)
    try:
        _import(c, tmp_path, ex, "zsk")
        rrset = vector_rrset(ex["rrset"])
        data = dns.dnssec._make_rrsig_signature_data(rrset, rrsig.replace(signature=b""))
        assert t.timed_sign([("rfc", data)])[0].reason == "RRSIG expiration time exceeds HSM policy"
    finally:
        t.close()


def test_rfc5155_nsec3_hashes():
    """The signer's NSEC3 owner hashing against RFC 5155 Appendix A (salt aabbccdd, 12 iterations)."""
    from cryptobat.signzone import nsec3_hasher
    v = json.loads((VECTORS / "rfc5155.json").read_text())
    p = v["nsec3param"]
    h = nsec3_hasher(bytes.fromhex(p["salt"]), p["iterations"])
    for item in v["hashed_owner_names"]:
        name = dns.name.from_text(item["name"])
        assert base64.b32hexencode(h(name.canonicalize().to_wire())).decode().lower() == item["hash"], item["name"]
