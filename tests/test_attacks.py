"""A compromised signing host against the real daemon: it reaches the signer sockets and knows the
signer PIN, nothing else. Each attack of the security review, through each transport it used.
(PKCS#11 clients: tests/test_p11_clients.py; officer sessions: tests/test_sessions.py.)
"""
from __future__ import annotations

import os
import subprocess
import sys

import dns.dnssec
import dns.name
import dns.rdata
import dns.rdatatype
import dns.rrset
import pytest

from cryptobat import policy
from cryptobat.client import SocketClient
from support import PIN, ConsoleSocket, Daemon, cli, payload, setup_home

WRAP = (1 << 31) + 10  # expiration = now + 2^31 + 10 read as "in the past" by the old check
CDS = int(dns.rdatatype.CDS)
CDNSKEY = int(dns.rdatatype.CDNSKEY)
DNSKEY = int(dns.rdatatype.DNSKEY)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    home = tmp_path_factory.mktemp("attacks") / "token"
    codes = setup_home(home, keys=(("8", "k8"), ("13", "k13")), compat=())
    d = Daemon(home, "--no-pkcs11", codes=codes)
    c = d.officers_session()
    assert c.cmd("keygen 13 ksk testzone ksk13").startswith("ok: key generated")
    d.officers = c
    yield d
    c.close()
    d.stop()


@pytest.fixture
def signer(daemon):
    c = SocketClient(str(daemon.home / "native.sock"), pin=PIN.decode())
    yield c
    c.close()


def _keys(signer) -> dict:
    return {k.label: k for k in signer.keys()}


def _rrs(zone: str, rdtype: str, *texts: str) -> list:
    """(owner, type, class, ttl, canonical rdata) tuples, in canonical order, for test_policy.payload."""
    rds = sorted(dns.rdata.from_text("IN", rdtype, t).to_digestable(dns.name.from_text(zone)) for t in texts)
    return [(zone, int(dns.rdatatype.from_text(rdtype)), 1, 300, rd) for rd in rds]


# --- finding 1: RFC 1982 wrap ------------------------------------------------------------------------

def test_wrap_is_refused_on_the_native_socket(signer):
    k = _keys(signer)["k13"]
    now = signer.time()
    res = signer.timed_sign([("k13", payload(k, now=now, inc=now + 20, exp=now + WRAP)),
                             ("k13", payload(k, now=now, exp=now + (1 << 32) - 1)),
                             ("k13", payload(k, now=now, exp=now - 10)),
                             ("k13", payload(k, now=now, inc=now + 3600, exp=now + 7200)),
                             ("k13", payload(k, now=now))])
    assert [r.reason for r in res[:4]] == [policy.EXPIRED, policy.EXPIRED, policy.EXPIRED,
                                           policy.INCEPTION_FUTURE]
    assert res[4].ok


def test_wrap_is_refused_on_the_console(daemon, signer):
    k = _keys(signer)["k13"]
    now = signer.time()
    c = ConsoleSocket(daemon.home / "console.sock")
    try:
        assert c("tpmloadkey k13").startswith("fail: signing needs the signer PIN")
        assert c("signerlogin") == "PIN: "
        assert c("wrong-pin") == "fail: PIN incorrect\n"
        c("signerlogin")
        assert c(PIN.decode()) == "ok: signer logged in\n"
        handle = c("tpmloadkey k13").split("handle=")[1].strip()
        out = c(f"tpmtimedsign {handle} {payload(k, now=now, inc=now + 20, exp=now + WRAP).hex()}")
        assert out.endswith(f"fail: {policy.EXPIRED}\n"), out
        out = c(f"tpmtimedsign {handle} {payload(k, now=now).hex()}")
        assert "ok: signature" in out and out.endswith("DONE\n")
    finally:
        c.close()


def test_wrap_is_refused_by_signzone_through_the_daemon(daemon, signer, tmp_path):
    keys = _keys(signer)
    zone = tmp_path / "testzone"
    zone.write_text("$TTL 300\n@ SOA ns hostmaster 1 3600 600 86400 300\n@ NS ns\nns A 192.0.2.1\n")
    env = {**os.environ, "CRYPTOBAT_PIN": PIN.decode()}
    r = cli("keyfiles", "testzone", str(tmp_path), home=daemon.home, env=env)
    assert r.returncode == 0, r.stderr
    name = {k: f"Ktestzone.+013+{keys[k].keytag:05d}" for k in ("ksk13", "k13")}
    for end, ok in (("+7200", True), (f"+{WRAP}", False), ("+4294967295", False)):
        out = tmp_path / "testzone.signed"
        r = subprocess.run([sys.executable, "-m", "cryptobat", "signzone", "--hsm",
                            f"unix:{daemon.home / 'native.sock'}", "-P", "-x", "-o", "testzone", "-e", end,
                            "-k", name["ksk13"], "testzone", name["k13"]],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert (r.returncode == 0) == ok and out.exists() == ok, (end, r.stderr)
        if not ok:
            assert "failed to sign data: RRSIG " in r.stderr, r.stderr  # already expired / not after inception
        out.unlink(missing_ok=True)


# --- finding 3: the native API wants the PIN ---------------------------------------------------------

def test_native_signing_needs_the_signer_pin(daemon):
    c = SocketClient(str(daemon.home / "native.sock"))
    try:
        k = next(k for k in c.keys() if k.label == "k13")  # public keys are public
        data = payload(k, now=c.time())
        with pytest.raises(Exception, match="not logged in"):
            c.timed_sign([("k13", data)])
        with pytest.raises(Exception, match="PIN incorrect"):
            c.login("not-the-pin")
        with pytest.raises(Exception, match="not logged in"):
            c.timed_sign([("k13", data)])
        c.login(PIN.decode())
        assert c.timed_sign([("k13", data)])[0].ok
    finally:
        c.close()


# --- finding 4: what a KSK signs ---------------------------------------------------------------------

def test_ksk_signs_only_key_sets_of_held_or_allowed_keys(daemon, signer):
    keys = _keys(signer)
    ksk, zsk = keys["ksk13"], keys["k13"]
    now = signer.time()
    zone = "testzone."
    held = [k.dnskey().to_text() for k in (ksk, zsk)]
    attacker = dns.dnssec.make_dnskey(
        __import__("cryptography.hazmat.primitives.asymmetric.ec", fromlist=["ec"]).generate_private_key(
            __import__("cryptography.hazmat.primitives.asymmetric.ec", fromlist=["ec"]).SECP256R1()).public_key(),
        13, flags=257)
    ds_attacker = dns.dnssec.make_ds(zone, attacker, 2).to_text()
    cases = {
        "own DNSKEY set": (DNSKEY, _rrs(zone, "DNSKEY", *held), True),
        "attacker KSK in DNSKEY": (DNSKEY, _rrs(zone, "DNSKEY", *held, attacker.to_text()), False),
        "attacker ZSK in DNSKEY": (DNSKEY, _rrs(zone, "DNSKEY", *held, attacker.to_text().replace("257", "256", 1)),
                                   False),
        "only the attacker's key": (DNSKEY, _rrs(zone, "DNSKEY", attacker.to_text()), False),
        "CDS of own KSK": (CDS, _rrs(zone, "CDS", ksk.ds(2).to_text()), True),
        "CDS for attacker": (CDS, _rrs(zone, "CDS", ds_attacker), False),
        "CDS delete": (CDS, _rrs(zone, "CDS", "0 0 0 00"), False),
        "CDNSKEY delete": (CDNSKEY, _rrs(zone, "CDNSKEY", "0 3 0 AA=="), False),
    }
    items = [("ksk13", payload(ksk, now=now, tc=t, rrs=rrs, labels=1)) for t, rrs, _ in cases.values()]
    items.append(("k13", payload(zsk, now=now, tc=DNSKEY, rrs=_rrs(zone, "DNSKEY", *held), labels=1)))
    res = signer.timed_sign(items)
    got = {name: r.ok for name, r in zip(cases, res)}
    assert got == {name: ok for name, (_, _, ok) in cases.items()}, [r.reason for r in res]
    assert res[-1].reason == "a ZSK does not sign DNSKEY, CDS or CDNSKEY"
    # a quorum's keyallow lets the new key in (a rollover); a delete window lets the delete through
    c = daemon.officers
    assert "allowed" in c.cmd(f"keyallow testzone {attacker.to_text()}")
    assert "allowed for 60 seconds" in c.cmd("cdsdelete 60 testzone")
    try:
        res = signer.timed_sign([items[1], items[5], items[6]])
        assert all(r.ok for r in res), [r.reason for r in res]
    finally:
        c.cmd(f"keydisallow testzone {dns.dnssec.key_id(attacker)}")
        c.cmd("cdsdelete 0 testzone")
    assert not any(r.ok for r in signer.timed_sign([items[1], items[6]]))


def test_records_of_another_class_are_refused(signer):
    k = _keys(signer)["k13"]
    now = signer.time()
    ch = [("www.testzone.", 1, 3, 300, bytes([192, 0, 2, 1]))]
    assert signer.timed_sign([("k13", payload(k, now=now, rrs=ch))])[0].reason == policy.NOT_IN
