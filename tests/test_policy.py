"""The refusal matrix: each policy and form rule, with a payload that only that rule refuses."""
from __future__ import annotations

import struct

import dns.name
import dns.rdatatype
import dns.rrset
import pytest

from cryptobat.home import init_token
from cryptobat import policy
from support import Officers, payload, signing_data, signing_token, validate, wire
from cryptobat.console import Console

A, DNSKEY, MX, NS, CDS, TXT = (dns.rdatatype.A, dns.rdatatype.DNSKEY, dns.rdatatype.MX, dns.rdatatype.NS,
                               dns.rdatatype.CDS, dns.rdatatype.TXT)


def sign(token, label, data):
    return token.timed_sign([(label, data)])[0]


@pytest.fixture
def keys(ready):
    return {k.label: k for k in ready.keys()}


def test_valid_payload_is_signed_and_verifies(ready, keys):
    now = ready.now()
    rr = dns.rrset.from_text("www.testzone.", 300, "IN", "A", "192.0.2.1", "192.0.2.2")
    for label in ("zsk8", "zsk13"):
        tpl, data = signing_data(keys[label], rr, now - 60, now + 300)
        assert data == payload(keys[label], now=now)  # our hand-built payload matches dnspython's
        res = sign(ready, label, data)
        assert res.ok, res.reason
        validate(keys[label], rr, tpl, res.signature, now)


def test_nothing_is_signed_before_a_policy_is_set(token, console, officers):
    officers.add("lamb"), officers.add("jakob"), officers.login("lamb", "jakob")
    console.handle("keygen 13 zsk testzone z")
    k = token.key("z")
    res = sign(token, "z", payload(k, now=token.now()))
    assert res.reason == "no maximum validity policy set"


def test_expiration_beyond_max_validity_refused_at_limit_accepted(ready, keys):
    now = ready.now()
    k = keys["zsk13"]
    assert sign(ready, "zsk13", payload(k, now=now, exp=now + 3600)).ok
    assert sign(ready, "zsk13", payload(k, now=now, exp=now + 3602)).reason == policy.EXPIRATION_EXCEEDS
    assert sign(ready, "zsk13", payload(k, now=now, exp=now + 3700)).reason == "RRSIG expiration time exceeds HSM policy"


def test_serial_arithmetic_across_the_2106_wrap(tmp_path):
    """Token time just before 2^32: an expiration that wrapped to a small number is still +300 s."""
    wall = [float(2**32 - 100)]
    t = init_token(tmp_path / "t", quorum=1, wall=lambda: wall[0])
    try:
        c = Console(t)
        o = Officers(c)
        o.add("solo")
        o.login("solo")
        assert c.handle("setmaxval 3600").startswith(" Maximum")
        c.handle("keygen 13 zsk testzone z")
        k = t.key("z")
        now = t.now()
        data = payload(k, now=now, exp=now + 300, inc=now - 60)
        assert struct.unpack_from("!I", data, 8)[0] == 200  # wrapped
        assert sign(t, "z", data).ok
        # the same wrapped value interpreted without serial arithmetic would look 68 years in the past;
        # one that lands beyond the policy after wrapping is refused
        assert sign(t, "z", payload(k, now=now, exp=now + 4000)).reason == policy.EXPIRATION_EXCEEDS
    finally:
        t.close()


@pytest.mark.parametrize("change,reason", [
    (dict(exp_rel=-100, inc_rel=-50), "RRSIG expiration is not after inception"),
    (dict(alg=13), "algorithm 13 does not match key algorithm 8"),
    (dict(tag_delta=1), "does not match key"),
    (dict(signer="other."), "signer name is not the key's zone"),
])
def test_header_rules(ready, keys, change, reason):
    k = keys["zsk8"]
    now = ready.now()
    kw = {}
    if "exp_rel" in change:
        kw.update(exp=now + change["exp_rel"], inc=now + change["inc_rel"])
    if "alg" in change:
        kw["alg"] = change["alg"]
    if "tag_delta" in change:
        kw["tag"] = (k.keytag + 1) & 0xFFFF
    if "signer" in change:
        kw["signer"] = change["signer"]
    res = sign(ready, "zsk8", payload(k, now=now, **kw))
    assert not res.ok and reason in res.reason


def _rr(owner="www.testzone.", t=A, c=1, ttl=300, rd=bytes([192, 0, 2, 1])):
    return (owner, t, c, ttl, rd)


@pytest.mark.parametrize("rrs,kw,reason", [
    ([_rr(owner="www.example.")], {}, "owner name is outside the key's zone"),
    ([_rr(), _rr(t=TXT, rd=b"\x01x")], {}, "RR type differs from type covered"),
    ([_rr(), _rr(c=3, rd=bytes([192, 0, 2, 2]))], {}, "RR class mismatch"),
    ([_rr(), _rr(ttl=301, rd=bytes([192, 0, 2, 2]))], {}, "RR TTL differs from original TTL"),
    ([_rr(rd=bytes([192, 0, 2, 2])), _rr(rd=bytes([192, 0, 2, 1]))], {}, "RRs not in canonical order"),
    ([_rr(), _rr()], {}, "duplicate RR"),
    ([_rr(), _rr(owner="ftp.testzone.", rd=bytes([192, 0, 2, 2]))], {}, "RRs with different owner names"),
    ([_rr()], {"labels": 3}, "RRSIG labels field does not match owner name"),
    ([_rr(owner="*.testzone.")], {"labels": 2}, "RRSIG labels field does not match owner name"),
    ([_rr(rd=bytes([192, 0, 2, 1, 0]))], {}, "malformed A RDATA"),
    ([_rr(t=MX, rd=b"\x00\x0a\x04mail\xc0\x0c")], {"tc": MX}, "malformed MX RDATA"),
    ([_rr(t=MX, rd=b"\x00\x0a\x04MAIL\x08testzone\x00")], {"tc": MX}, "MX RDATA not in canonical form"),
    ([], {}, "no RRs in signing data"),
    ([_rr()], {"trailer": b"\x00"}, "truncated RR"),
    ([_rr()], {"tc": dns.rdatatype.RRSIG}, "type RRSIG is never signed"),
])
def test_form_rules(ready, keys, rrs, kw, reason):
    k = keys["zsk8"]
    res = sign(ready, "zsk8", payload(k, now=ready.now(), rrs=rrs, **kw))
    assert res.reason == reason


def test_wildcard_owner_with_labels_excluding_the_star_is_signed(ready, keys):
    k = keys["zsk13"]
    rr = dns.rrset.from_text("*.testzone.", 300, "IN", "A", "192.0.2.9")
    now = ready.now()
    tpl, data = signing_data(k, rr, now - 60, now + 300)
    assert tpl.labels == 1
    res = sign(ready, "zsk13", data)
    assert res.ok
    validate(k, rr, tpl, res.signature, now)


def test_upper_case_and_compressed_names_refused(ready, keys):
    k = keys["zsk8"]
    now = ready.now()
    good = payload(k, now=now)
    upper = good.replace(b"\x03www", b"\x03WWW", 1)
    assert sign(ready, "zsk8", upper).reason == "name not in canonical (lower case) form"
    # a compression pointer in place of the owner name
    i = good.index(b"\x03www")
    compressed = good[:i] + b"\xc0\x12" + good[i + len(wire("www.testzone.")):]
    assert sign(ready, "zsk8", compressed).reason == "compressed or invalid label in name"


def test_ksk_signs_only_dnskey_cds_cdnskey_at_apex(ready, keys):
    k = keys["ksk8"]
    now = ready.now()
    apex = "testzone."
    # the DNSKEY RRset holds the signing key; a CDS names a token key (tests/test_policy_rules.py)
    dnskeys = sorted(keys[x].dnskey().to_digestable() for x in ("ksk8", "zsk8"))
    assert sign(ready, "ksk8", payload(k, now=now, tc=DNSKEY, rrs=[(apex, DNSKEY, 1, 300, d) for d in dnskeys])).ok
    cds = k.ds(2).to_digestable()
    assert sign(ready, "ksk8", payload(k, now=now, tc=CDS, rrs=[(apex, CDS, 1, 300, cds)])).ok
    ksk_only = "a KSK signs only DNSKEY, CDS and CDNSKEY at the zone apex"
    assert sign(ready, "ksk8", payload(k, now=now)).reason == ksk_only
    below = "sub.testzone."
    assert sign(ready, "ksk8", payload(k, now=now, tc=DNSKEY, rrs=[(below, DNSKEY, 1, 300, d) for d in dnskeys])).reason == ksk_only
    # the ZSK may sign A records
    assert sign(ready, "zsk8", payload(keys["zsk8"], now=now)).ok


def test_unknown_label_and_garbage(ready):
    assert sign(ready, "nope", b"x").reason == "no key labelled 'nope'"
    assert sign(ready, "zsk8", b"").reason == "signing data too short"
    assert sign(ready, "zsk8", bytes(40)).reason is not None


def test_refusals_are_counted_and_audited(ready, keys):
    before = ready.counters()["refusals"]
    now = ready.now()
    sign(ready, "zsk8", payload(keys["zsk8"], now=now, exp=now + 9999))
    assert ready.counters()["refusals"] == before + 1
    last = ready.audit_tail(1)[0]
    assert '"event":"refused-sign"' in last and "RRSIG expiration time exceeds HSM policy" in last


def test_batch_results_in_order_across_workers(tmp_path):
    """A large batch goes to the worker processes; results still come back in order, each checked."""
    t, engine = signing_token(tmp_path / "t")
    try:
        k = t.key("z")
        now = t.now()
        items = []
        for i in range(600):
            exp = now + (9999 if i % 7 == 0 else 300)
            items.append(("z", payload(k, now=now, exp=exp, rrs=[_rr(rd=bytes([10, 0, i >> 8, i & 255]))])))
        res = t.timed_sign(items, run=engine.run)
        assert [r.ok for r in res] == [i % 7 != 0 for i in range(600)]
        assert t.counters()["signatures"] == sum(i % 7 != 0 for i in range(600))
    finally:
        engine.close()
        t.close()
