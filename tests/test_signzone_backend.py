"""The signzone tests' real tokens (:func:`support.zone_token`), and the token's fast RDATA
checks against dnspython."""
from __future__ import annotations

import random
import struct
from pathlib import Path

import dns.exception
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import pytest

from cryptobat import rrsig
from cryptobat.errors import Refusal
from support import rsa_private_file, zone_token

# ---------------------------------------------------------------- tests of the helpers


def test_make_token_imports_keys_with_the_seed_tags(tmp_path):
    ksk = rsa_private_file(tmp_path / "ksk.private", 257, 35407)
    zsk = rsa_private_file(tmp_path / "zsk.private", 256, 58968)
    rt = zone_token(tmp_path / "home", "testzone", tmp_path / "keys", algs=(),
                    imports=[("ksk", str(ksk)), ("zsk", str(zsk))])
    assert rt.keys == {(8, "ksk"): str(tmp_path / "keys" / "Ktestzone.+008+35407"),
                       (8, "zsk"): str(tmp_path / "keys" / "Ktestzone.+008+58968")}
    text = Path(rt.keys[(8, "ksk")] + ".private").read_text()
    assert "Label:" in text and "Modulus" not in text  # the key stays in the token


# ---------------------------------------------------------------- the token's fast RDATA checks


def _dnspython_verdict(rdtype: int, rdata: bytes) -> bool:
    try:
        rd = dns.rdata.from_wire(dns.rdataclass.IN, rdtype, rdata, 0, len(rdata))
        return rd.to_digestable() == rdata
    except (dns.exception.DNSException, ValueError, IndexError, struct.error):
        return False


def _fast_verdict(rdtype: int, rdata: bytes) -> bool:
    try:
        rrsig._check_rdata(rdtype, dns.rdataclass.IN, rdata)
        return True
    except Refusal:
        return False


def _mutations(rng: random.Random, good: bytes):
    yield good
    for _ in range(60):
        b = bytearray(good)
        op = rng.randrange(5)
        if op == 0 and b:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 1 and b:
            del b[rng.randrange(len(b)):]
        elif op == 2:
            b += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4)))
        elif op == 3 and b:
            b.insert(rng.randrange(len(b)), rng.randrange(256))
        elif b:
            i = rng.randrange(len(b))
            b[i] = rng.choice([0, 1, 32, 33, 63, 64, 0xC0, 0xFF])
        yield bytes(b)


NSEC_TEXTS = ["h1.example.com. A RRSIG NSEC", "Next.Example. A NS SOA MX TXT AAAA RRSIG NSEC DNSKEY TYPE1234",
              "x. NSEC", "\\000.a. TYPE65534", ". A", "a.b.c.d.e.f. CAA TYPE300 TYPE600 TYPE65000"]
TXT_TEXTS = ['"record 0" "v=bench1"', '""', '"a" "" "b"', '"' + "x" * 255 + '" "y"', '"\\000\\255"']


@pytest.mark.parametrize("rdtype,texts", [(dns.rdatatype.NSEC, NSEC_TEXTS), (dns.rdatatype.TXT, TXT_TEXTS)])
def test_fast_rdata_checks_agree_with_dnspython(rdtype, texts):
    """The NSEC and TXT fast paths accept exactly what dnspython's parser + canonical check accepts."""
    rng = random.Random(4034)
    cases = [b"", b"\x00", b"\x00\x00", b"\x00\x00\x01\x00", b"\x00\x00\x01\x40", b"\x00\x01\x01\x40\x00\x01\x40",
             b"\x01a\xc0\x00\x00\x01\x40", b"\x01a\x00\x00\x21" + b"\x01" * 33, b"\x01\x41\x00\x00\x01\x40",
             b"\x3f" + b"a" * 63 + b"\x00", b"\x40" + b"a" * 64 + b"\x00",
             (b"\x3f" + b"a" * 63) * 4 + b"\x00", (b"\x3f" + b"a" * 63) * 3 + b"\x3d" + b"a" * 61 + b"\x00",
             (b"\x3f" + b"a" * 63) * 3 + b"\x3e" + b"a" * 62 + b"\x00"]
    for t in texts:
        good = dns.rdata.from_text(dns.rdataclass.IN, rdtype, t).to_digestable()
        cases += list(_mutations(rng, good))
    accepted = 0
    for data in cases:
        want = _dnspython_verdict(rdtype, data)
        assert _fast_verdict(rdtype, data) == want, (dns.rdatatype.to_text(rdtype), data.hex())
        accepted += want
    assert 5 < accepted < len(cases) - 20  # both verdicts are exercised
