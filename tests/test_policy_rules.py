"""Policy rules on time (RFC 1982 serials), class, key roles and key-set content.

Most cases call :func:`cryptobat.policy.check` directly on a :class:`Policy` and
:class:`KeyInfo` built here; the ones that show a real signature validating go through a
token (``ready``) whose policy is given the zone's key set and delete window.
"""
from __future__ import annotations

import dataclasses
import os
import struct

import dns.dnssec
import dns.name
import dns.rdata
import dns.rrset
import pytest
from hypothesis import example, given, settings, strategies as st

from cryptobat import keystore, policy, rrsig
from cryptobat.errors import Refusal
from cryptobat.policy import Policy
from cryptobat.token import Token
from support import signing_data, validate

M32 = 1 << 32
HALF = 1 << 31
ZONE = "testzone."
ZW = keystore.zone_wire(ZONE)
NOW = 1_800_000_000
TIME_REASONS = {policy.EXPIRED, policy.EXPIRATION_EXCEEDS, policy.INCEPTION_FUTURE,
                "RRSIG expiration is not after inception"}


def info(role: str, label: str | None = None, alg: int = 13, zone: str = ZONE):
    return keystore.make_info(label or role, zone, alg, role, os.urandom(64))


def rd(k) -> bytes:
    return k.dnskey().to_digestable()


KSK, ZSK, CSK = info("ksk"), info("zsk"), info("csk")
HELD = frozenset({rd(KSK), rd(ZSK), rd(CSK)})


def pol(max_validity: int = 3600, keys=HELD, delete_until: int | None = None) -> Policy:
    return Policy(max_validity, zone_keys={ZW: frozenset(keys)},
                  delete_until={} if delete_until is None else {ZW: delete_until})


def rrset(rdtype: str, *rdatas: str, owner: str = ZONE, rdclass: str = "IN"):
    return dns.rrset.from_text(owner, 300, rdclass, rdtype, *rdatas)


def keyset(rdtype: str, items, owner: str = ZONE):
    """An RRset of ``rdtype`` from rdata objects or canonical wire RDATA."""
    rds = [dns.rdata.from_wire("IN", rdtype, r, 0, len(r)) if isinstance(r, bytes) else r for r in items]
    return dns.rrset.from_rdata_list(owner, 300, rds)


def data_for(key, rr, now: int = NOW, inc: int | None = None, exp: int | None = None) -> bytes:
    return signing_data(key, rr, now - 60 if inc is None else inc, now + 300 if exp is None else exp)[1]


def verdict(key, data: bytes, p: Policy | None = None, now: int = NOW) -> str | None:
    try:
        policy.check(key, ZW, data, p or pol(), now)
    except Refusal as e:
        return e.reason
    return None


def with_times(data: bytes, inc: int, exp: int) -> bytes:
    """The same signing data with other RRSIG inception and expiration fields."""
    return data[:8] + struct.pack("!II", exp % M32, inc % M32) + data[16:]


A_DATA = data_for(ZSK, rrset("A", "192.0.2.1"), now=0)


# --- time: RFC 1982 serials relative to token time -----------------------------------------

@pytest.mark.parametrize("now", [NOW, 2**31 - 5, 2**32 - 100, 2**32 + 7, 3 * 2**32 // 2])
def test_wrap_attack_refused(now):
    """Expiration more than half the circle ahead reads, as a serial, as the past: never 'far future'."""
    assert verdict(ZSK, with_times(A_DATA, now + 20, now + HALF + 10), now=now) == policy.EXPIRED
    assert verdict(ZSK, with_times(A_DATA, now - 60, now + M32 - 1), now=now) == policy.EXPIRED
    assert verdict(ZSK, with_times(A_DATA, now - 60, now + HALF), now=now) is not None
    assert verdict(ZSK, with_times(A_DATA, now - 60, now + 300), now=now) is None


def test_wrap_attack_refused_by_the_token(ready):
    k = {x.label: x for x in ready.keys()}["zsk13"]
    now = ready.now()
    rr = rrset("A", "192.0.2.1", owner="www.testzone.")
    res = ready.timed_sign([("zsk13", data_for(k, rr, now, inc=now + 20, exp=now + HALF + 10))])[0]
    assert not res.ok and res.reason == policy.EXPIRED
    res = ready.timed_sign([("zsk13", data_for(k, rr, now, exp=now + M32 - 1))])[0]
    assert not res.ok and res.reason == policy.EXPIRED


def test_expiration_at_or_before_now_refused():
    for exp in (NOW, NOW - 1, NOW - HALF + 1):
        assert verdict(ZSK, with_times(A_DATA, exp - 60, exp)) == policy.EXPIRED
    assert verdict(ZSK, with_times(A_DATA, NOW - 3600, NOW + 1)) is None
    assert verdict(ZSK, with_times(A_DATA, NOW - 3600, NOW + 3600)) is None
    assert verdict(ZSK, with_times(A_DATA, NOW - 3600, NOW + 3601)) == policy.EXPIRATION_EXCEEDS


def test_inception_in_the_future_beyond_skew_refused():
    assert policy.SKEW == 300
    assert verdict(ZSK, with_times(A_DATA, NOW + policy.SKEW, NOW + 600)) is None
    assert verdict(ZSK, with_times(A_DATA, NOW + policy.SKEW + 1, NOW + 600)) == policy.INCEPTION_FUTURE
    # long-past inceptions are fine: the signature still dies at its (bounded) expiration
    assert verdict(ZSK, with_times(A_DATA, NOW + 600 - HALF + 1, NOW + 600)) is None


def test_max_validity_past_half_the_circle_is_still_bounded():
    """A policy wider than RFC 1982 can compare (not settable, but the rule must not depend on that)."""
    wide = pol(max_validity=M32)
    assert verdict(ZSK, with_times(A_DATA, NOW, NOW + HALF - 1), wide) is None
    assert verdict(ZSK, with_times(A_DATA, NOW, NOW + HALF), wide) is not None
    assert verdict(ZSK, with_times(A_DATA, NOW + 20, NOW + HALF + 10), wide) is not None


def _rule(now: int, inc: int, exp: int, max_validity: int) -> bool:
    ahead = (exp - now) % M32
    inc_ahead = (inc - now) % M32
    return (0 < ahead <= max_validity and 0 < (exp - inc) % M32 < HALF
            and not policy.SKEW < inc_ahead < HALF)


_NOW = st.one_of(st.integers(0, 2**34), st.integers(M32 - 5000, M32 + 5000), st.integers(HALF - 5000, HALF + 5000))
_EDGES = [0, 1, 2, 300, 301, 3599, 3600, 3601, HALF - 1, HALF, HALF + 1, HALF + 10, M32 - 301, M32 - 300,
          M32 - 60, M32 - 1]
_OFFSET = st.one_of(st.integers(0, M32 - 1), st.sampled_from(_EDGES), st.integers(-5000, 5000).map(lambda x: x % M32))


@settings(max_examples=2000, deadline=None)
@given(now=_NOW, inc_off=_OFFSET, exp_off=_OFFSET,
       max_validity=st.one_of(st.sampled_from([1, 300, 3600, 86400, 10 * 365 * 86400]),
                              st.integers(1, 10 * 365 * 86400)))
@example(now=NOW, inc_off=20, exp_off=HALF + 10, max_validity=3600)
@example(now=M32 - 100, inc_off=M32 - 60, exp_off=300, max_validity=3600)
@example(now=M32 - 100, inc_off=20, exp_off=HALF + 10, max_validity=10 * 365 * 86400)
def test_time_rule_over_the_whole_circle(now, inc_off, exp_off, max_validity):
    """Accepted iff 0 < (exp - now) mod 2^32 <= max_validity, inception serially before expiration
    and (inc - now) mod 2^32 not in (SKEW, 2^31); the token time may be any epoch, even past 2106."""
    inc, exp = now + inc_off, now + exp_off
    got = verdict(ZSK, with_times(A_DATA, inc, exp), pol(max_validity), now=now)
    if _rule(now, inc, exp, max_validity):
        assert got is None
    else:
        assert got in TIME_REASONS


# --- class ----------------------------------------------------------------------------------

@pytest.mark.parametrize("rdclass", ["CH", "HS", "CLASS42"])
def test_only_class_in_is_signed(rdclass):
    rr = rrset("TXT", '"x"', owner="www.testzone.", rdclass=rdclass)
    assert verdict(ZSK, data_for(ZSK, rr)) == policy.NOT_IN
    assert verdict(ZSK, data_for(ZSK, rrset("TXT", '"x"', owner="www.testzone."))) is None


def test_only_class_in_is_signed_by_the_token(ready):
    k = {x.label: x for x in ready.keys()}["zsk13"]
    now = ready.now()
    rr = rrset("TXT", '"x"', owner="www.testzone.", rdclass="CH")
    assert ready.timed_sign([("zsk13", data_for(k, rr, now))])[0].reason == policy.NOT_IN


# --- roles ----------------------------------------------------------------------------------

@pytest.mark.parametrize("rdtype", ["DNSKEY", "CDS", "CDNSKEY"])
def test_zsk_never_signs_keysets(rdtype):
    rr = keyset(rdtype, {"DNSKEY": [rd(KSK), rd(ZSK)], "CDNSKEY": [rd(KSK)], "CDS": [KSK.ds(2).to_digestable()]}[rdtype])
    assert verdict(ZSK, data_for(ZSK, rr)) == policy.ZSK_NO_KEYSET
    assert verdict(KSK, data_for(KSK, rr)) is None


def test_ksk_only_signs_keysets_at_the_apex_and_csk_keysets_only_there():
    assert verdict(KSK, data_for(KSK, rrset("A", "192.0.2.1", owner="www.testzone."))) == policy.KSK_ONLY
    below = keyset("DNSKEY", [KSK.dnskey(), CSK.dnskey()], owner="sub.testzone.")
    assert verdict(KSK, data_for(KSK, below)) == policy.KSK_ONLY
    assert verdict(CSK, data_for(CSK, below)) == policy.KEYSET_APEX
    assert verdict(CSK, data_for(CSK, rrset("A", "192.0.2.1", owner="www.testzone."))) is None


# --- DNSKEY RRset content -------------------------------------------------------------------

ATTACK_SEP = info("ksk", "evil").dnskey()
ATTACK_ZSK = info("zsk", "evil-z").dnskey()


@pytest.mark.parametrize("signer", [KSK, CSK])
def test_dnskey_rrset_with_attacker_sep_key_refused(signer):
    rr = keyset("DNSKEY", [signer.dnskey(), ZSK.dnskey(), ATTACK_SEP])
    assert verdict(signer, data_for(signer, rr)) == policy.DNSKEY_FOREIGN


@pytest.mark.parametrize("signer", [KSK, CSK])
def test_dnskey_rrset_with_attacker_non_sep_key_refused(signer):
    """Validators ignore the SEP flag: a foreign ZSK in a signed DNSKEY set would sign anything
    (a CDS delete, a CDS for its own key) with any expiration, unseen by the token."""
    rr = keyset("DNSKEY", [signer.dnskey(), ZSK.dnskey(), ATTACK_ZSK])
    assert verdict(signer, data_for(signer, rr)) == policy.DNSKEY_FOREIGN
    assert verdict(signer, data_for(signer, rr), pol(keys=HELD | {ATTACK_ZSK.to_digestable()})) is None


def test_dnskey_rrset_without_the_signing_key_refused():
    rr = keyset("DNSKEY", [CSK.dnskey(), ZSK.dnskey()])
    assert verdict(KSK, data_for(KSK, rr)) == policy.DNSKEY_NO_SIGNER


def test_dnskey_rrset_with_keyallowed_sep_key_accepted():
    rr = keyset("DNSKEY", [KSK.dnskey(), ZSK.dnskey(), ATTACK_SEP])
    assert verdict(KSK, data_for(KSK, rr), pol(keys=HELD | {ATTACK_SEP.to_digestable()})) is None


def test_key_allowed_for_another_zone_does_not_count():
    other = Policy(3600, zone_keys={ZW: HELD, keystore.zone_wire("other."): frozenset({ATTACK_SEP.to_digestable()})})
    rr = keyset("DNSKEY", [KSK.dnskey(), ATTACK_SEP])
    assert verdict(KSK, data_for(KSK, rr), other) == policy.DNSKEY_FOREIGN


def test_signing_key_counts_as_held_even_if_not_listed():
    rr = keyset("DNSKEY", [KSK.dnskey()])
    assert verdict(KSK, data_for(KSK, rr), Policy(3600)) is None
    for other in (ZSK, CSK):
        rr = keyset("DNSKEY", [KSK.dnskey(), other.dnskey()])
        assert verdict(KSK, data_for(KSK, rr), Policy(3600)) == policy.DNSKEY_FOREIGN


def test_flags_do_not_decide():
    """A foreign key is refused whatever its flags (SEP, REVOKE, zone key or none)."""
    evil = info("ksk", "evil2")
    for flags, want in ((385, policy.DNSKEY_FOREIGN), (128, policy.DNSKEY_FOREIGN), (1, policy.DNSKEY_FOREIGN),
                        (256, policy.DNSKEY_FOREIGN)):
        k = dataclasses.replace(evil, flags=flags).dnskey()
        assert verdict(KSK, data_for(KSK, keyset("DNSKEY", [KSK.dnskey(), k]))) == want, flags


# --- CDS / CDNSKEY --------------------------------------------------------------------------

DELETE = {"CDS": "0 0 0 00", "CDNSKEY": "0 3 0 AA=="}


def cds_of(k, digest: int) -> bytes:
    zone = dns.name.from_text(ZONE)
    return dns.dnssec.make_ds(zone, k, digest, policy=dns.dnssec.allow_all_policy).to_digestable()


@pytest.mark.parametrize("digest", [1, 2, 4])
def test_cds_for_held_keys_accepted_and_for_attacker_refused(digest):
    ok = keyset("CDS", sorted({cds_of(KSK.dnskey(), digest), cds_of(CSK.dnskey(), 2)}))
    assert verdict(KSK, data_for(KSK, ok)) is None
    bad = keyset("CDS", sorted({cds_of(KSK.dnskey(), 2), cds_of(ATTACK_SEP, digest)}))
    assert verdict(KSK, data_for(KSK, bad)) == policy.CDS_FOREIGN
    assert verdict(KSK, data_for(KSK, bad), pol(keys=HELD | {ATTACK_SEP.to_digestable()})) is None


def test_cds_with_wrong_tag_algorithm_or_digest_type_refused():
    good = dns.rdata.from_wire("IN", "CDS", cds_of(KSK.dnskey(), 2), 0, len(cds_of(KSK.dnskey(), 2)))
    for bad in (good.replace(key_tag=(good.key_tag + 1) & 0xFFFF), good.replace(algorithm=8),
                good.replace(digest_type=3), good.replace(digest=bytes(32))):
        rr = dns.rrset.from_rdata(ZONE, 300, bad)
        assert verdict(KSK, data_for(KSK, rr)) == policy.CDS_FOREIGN, bad


def test_cdnskey_for_held_keys_accepted_and_for_attacker_refused():
    ok = keyset("CDNSKEY", sorted({rd(KSK), rd(CSK)}))
    assert verdict(KSK, data_for(KSK, ok)) is None
    bad = keyset("CDNSKEY", sorted({rd(KSK), ATTACK_SEP.to_digestable()}))
    assert verdict(KSK, data_for(KSK, bad)) == policy.CDNSKEY_FOREIGN
    assert verdict(CSK, data_for(CSK, bad)) == policy.CDNSKEY_FOREIGN


@pytest.mark.parametrize("rdtype", ["CDS", "CDNSKEY"])
def test_delete_request_only_inside_the_window_and_alone(rdtype):
    rr = rrset(rdtype, DELETE[rdtype])
    d = data_for(KSK, rr)
    assert verdict(KSK, d) == policy.DELETE_CLOSED
    assert verdict(KSK, d, pol(delete_until=NOW)) == policy.DELETE_CLOSED  # the window has closed
    assert verdict(KSK, d, pol(delete_until=NOW + 1)) is None
    assert verdict(CSK, data_for(CSK, rr), pol(delete_until=NOW + 1)) is None
    other = Policy(3600, zone_keys={ZW: HELD}, delete_until={keystore.zone_wire("other."): NOW + 999})
    assert verdict(KSK, d, other) == policy.DELETE_CLOSED
    held = cds_of(KSK.dnskey(), 2) if rdtype == "CDS" else rd(KSK)
    both = keyset(rdtype, sorted({held, dns.rdata.from_text("IN", rdtype, DELETE[rdtype]).to_digestable()}))
    assert verdict(KSK, data_for(KSK, both), pol(delete_until=NOW + 1)) == policy.DELETE_NOT_ALONE


def test_rdatas_lists_the_records_in_order():
    rr = keyset("DNSKEY", [KSK.dnskey(), ZSK.dnskey(), CSK.dnskey()])
    assert rrsig.rdatas(data_for(KSK, rr)) == sorted(r.to_digestable() for r in rr)


# --- through a token: real signatures that validate -----------------------------------------

@pytest.fixture
def zone_token(ready, monkeypatch):
    """``ready`` with the policy's key set (the token's keys plus ``allow``) and delete window
    under the test's control, whether or not the token fills them itself."""
    extra: dict = {"allow": frozenset(), "delete_until": 0}

    def current() -> Policy:
        base = Token.policy(ready)
        keys = frozenset(rd(k) for k in ready.keys() if k.zone == ZONE) | extra["allow"]
        return dataclasses.replace(base, zone_keys={**base.zone_keys, ZW: keys},
                                   delete_until={**base.delete_until, ZW: extra["delete_until"]})

    monkeypatch.setattr(ready, "policy", current)
    return ready, extra


def _sign(token, label, rr):
    k = token.key(label)
    now = token.now()
    tpl, data = signing_data(k, rr, now - 60, now + 300)
    return k, tpl, token.timed_sign([(label, data)])[0], now


@pytest.mark.parametrize("kind", ["DNSKEY", "CDNSKEY", "CDS1", "CDS2", "CDS4"])
def test_token_signs_keysets_of_its_own_keys_and_they_validate(zone_token, kind):
    token, _ = zone_token
    ksk, zsk = token.key("ksk8"), token.key("zsk8")
    if kind == "DNSKEY":
        rr = keyset("DNSKEY", [ksk.dnskey(), zsk.dnskey(), token.key("zsk13").dnskey()])
    elif kind == "CDNSKEY":
        rr = keyset("CDNSKEY", [rd(ksk)])
    else:
        rr = keyset("CDS", [cds_of(ksk.dnskey(), int(kind[3]))])
    k, tpl, res, now = _sign(token, "ksk8", rr)
    assert res.ok, res.reason
    validate(k, rr, tpl, res.signature, now)


def test_token_refuses_attacker_keys_until_allowed(zone_token):
    token, extra = zone_token
    ksk = token.key("ksk8")
    for rr, reason in ((keyset("DNSKEY", [ksk.dnskey(), ATTACK_SEP]), policy.DNSKEY_FOREIGN),
                       (keyset("CDNSKEY", [ATTACK_SEP.to_digestable()]), policy.CDNSKEY_FOREIGN),
                       (keyset("CDS", [cds_of(ATTACK_SEP, 2)]), policy.CDS_FOREIGN)):
        extra["allow"] = frozenset()
        assert _sign(token, "ksk8", rr)[2].reason == reason
        extra["allow"] = frozenset({ATTACK_SEP.to_digestable()})
        k, tpl, res, now = _sign(token, "ksk8", rr)
        assert res.ok, res.reason
        validate(k, rr, tpl, res.signature, now)


def test_token_zsk_refuses_dnskey(zone_token):
    token, _ = zone_token
    rr = keyset("DNSKEY", [token.key("ksk8").dnskey(), token.key("zsk8").dnskey()])
    assert _sign(token, "zsk8", rr)[2].reason == policy.ZSK_NO_KEYSET


@pytest.mark.parametrize("rdtype", ["CDS", "CDNSKEY"])
def test_token_delete_request_inside_window_validates(zone_token, rdtype):
    token, extra = zone_token
    rr = rrset(rdtype, DELETE[rdtype])
    assert _sign(token, "ksk8", rr)[2].reason == policy.DELETE_CLOSED
    extra["delete_until"] = token.now() + 600
    k, tpl, res, now = _sign(token, "ksk8", rr)
    assert res.ok, res.reason
    validate(k, rr, tpl, res.signature, now)
    extra["delete_until"] = token.now()
    assert _sign(token, "ksk8", rr)[2].reason == policy.DELETE_CLOSED


def test_meta_type_and_class_sets_agree_with_dnspython_everywhere():
    """rrsig builds its meta type/class sets from 0-255 only: dnspython agrees on all 65536."""
    from cryptobat import rrsig
    assert all((t in rrsig._NEVER_SIGNED) == (dns.rdatatype.is_metatype(t) or t in rrsig._UNSIGNABLE)
               for t in range(65536))
    assert all((c in rrsig._META_CLASSES) == dns.rdataclass.is_metaclass(c) for c in range(65536))
