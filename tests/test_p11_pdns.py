"""PowerDNS 4.7 (pdns_server + gsqlite3) signing live answers through the daemon's PKCS#11 socket.

p11-kit finds the token through a remote-only module file ``cryptobat.module`` in the
user's ``~/.config/pkcs11/modules`` (HOME is a temp dir), so nothing is written to /etc.
p11-kit ignores user configuration in a process running as root, so when the tests
run as root, pdns_server and pdnsutil run as an unprivileged user that owns the temp
dir and whose group is the daemon's signer group (``--signer-group``); the daemon itself
runs as the test user.

What PowerDNS sends (``log-calls: yes`` in the module file shows it, and the tests check):
RSA: C_Sign(CKM_SHA256_RSA_PKCS) over the full RRSIG signing data, so the token's full
policy applies; ECDSA P-256: C_Digest(CKM_SHA256) over the full data, then
C_Sign(CKM_ECDSA) of that hash (with CKM_SHA_1 digests of the public key in between),
which the token's digest binding accepts without compat mode.
"""
from __future__ import annotations

from cryptobat.policy import EXPIRATION_EXCEEDS, NOT_COMPAT
from support import DAY, ZONES, pdns_mechanisms, pdns_validates


def test_pdns_signs_under_the_full_policy(signer):
    """Max validity 14 days covers PowerDNS's window: RSA via CKM_SHA256_RSA_PKCS, ECDSA via digest binding."""
    hsm, pdns = signer(14 * DAY)
    pdns_validates(pdns, "example.org.", hsm.keys_of("example.org."))
    pdns_validates(pdns, "example.net.", hsm.keys_of("example.net."))
    mechs = pdns_mechanisms(pdns)
    assert "CKM_SHA256_RSA_PKCS" in mechs and "CKM_ECDSA" in mechs and "CKM_SHA256" in mechs, mechs
    assert "CKM_RSA_PKCS" not in mechs
    assert not any(k.compat for k in hsm.keys_of("example.org.").values())
    assert not any(k.compat for k in hsm.keys_of("example.net.").values())
    assert hsm.compat_count() == 0 and hsm.refusals() == {}


def test_pdns_refused_beyond_max_validity(signer):
    """Max validity 6 days is shorter than any PowerDNS expiration: no signature leaves the token."""
    hsm, pdns = signer(6 * DAY)
    for zone in ZONES:
        for name, rdtype in ((zone, "SOA"), ("www." + zone, "A"), (zone, "DNSKEY")):
            status, sets = pdns.query(name, rdtype)
            assert status == "SERVFAIL" or not any(t.startswith("RRSIG") for _, t in sets), (status, sets)
    why = hsm.refusals()
    assert why.get(EXPIRATION_EXCEEDS, 0) >= 1, why  # RSA: the full data failed the policy
    assert why.get(NOT_COMPAT, 0) >= 1, why  # ECDSA: the hash was not bound to checked data
    assert hsm.compat_count() == 0
