"""Real tokens for the signzone tests, and the token's fast RDATA checks against dnspython.

:func:`make_token` creates a real :class:`cryptobat.token.Token` (quorum 1), enrols
and logs in an officer with :class:`conftest.Officers`, sets the maximum validity,
generates (``keygen``) or imports (``keyimport``, a BIND ``Private-key-format`` file)
keys, closes the token and writes BIND key files with ``cryptobat keyfiles``.
``cryptobat signzone`` then opens the token itself (``--home``) or talks to a daemon.
"""
from __future__ import annotations

import base64
import math
import random
import struct
from dataclasses import dataclass, field
from pathlib import Path

import dns.exception
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import pytest
from conftest import Officers

from cryptobat import cli, rrsig
from cryptobat.console import Console
from cryptobat.errors import Refusal
from cryptobat.home import init_token
from cryptobat.token import Token

MONTH = 31 * 86400  # covers signzone's default validity (start - 1 h .. + 30 days)


@dataclass
class RealToken:
    home: Path
    officers: Officers
    keys: dict[tuple[int, str], str] = field(default_factory=dict)  # (alg, role) -> K-file base path

    def open_console(self, token: Token) -> Console:
        """A console on ``token`` (e.g. the one an EmbeddedClient opened), officer logged in."""
        self.officers.console = Console(token)
        self.officers.login("lamb")
        return self.officers.console


def make_token(home: Path, zone: str, keydir: Path, *, algs=(13,), roles=("ksk", "zsk"),
               max_validity: int = MONTH, imports: list[tuple[str, str]] = ()) -> RealToken:
    """A real token for ``zone``: a key per role per algorithm (keygen; KSK+ZSK unless ``roles``)
    plus ``imports`` ((role, file)); key files for all of the zone's keys are written to
    ``keydir`` by ``cryptobat keyfiles``."""
    tok = init_token(home, quorum=1)
    try:
        officers = Officers(Console(tok))
        officers.add("lamb")
        officers.login("lamb")
        out = officers.console.handle(f"setmaxval {max_validity}")
        assert out == f" Maximum validity period set to +{max_validity} seconds\n", out
        for alg in algs:
            for role in roles:
                out = officers.console.handle(f"keygen {alg} {role} {zone}")
                assert out.startswith("ok: key generated"), out
        for role, path in imports:
            out = officers.console.handle(f"keyimport {role} {zone} {path}")
            assert out.startswith("ok: key imported"), out
        infos = tok.keys()
    finally:
        tok.close()
    assert cli.main(["--home", str(home), "keyfiles", zone, str(keydir)]) == 0
    rt = RealToken(home, officers)
    for k in infos:
        rt.keys[(k.algorithm, k.role)] = str(keydir / f"K{k.zone}+{k.algorithm:03d}+{k.keytag:05d}")
    return rt


# ---------------------------------------------------------------- BIND private keys with a given tag


def _wsum(data: bytes, odd: bool) -> int:  # RFC 4034 Appendix B checksum terms
    return sum(b << 8 if (i + odd) % 2 == 0 else b for i, b in enumerate(data))


def rsa_private_file(path: Path, flags: int, keytag: int) -> Path:
    """Write a BIND ``Private-key-format`` RSASHA256 key whose DNSKEY (``flags``) has ``keytag``
    (found by varying the public exponent)."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    for _ in range(20):  # a fresh modulus if no exponent of this one fits
        e, p, q, lam = _exponent_for(rsa.generate_private_key(65537, 2048).private_numbers(), flags, keytag)
        if e:
            break
    else:
        raise AssertionError(f"no exponent gives key tag {keytag}")
    d = pow(e, -1, lam)

    def b64(v: int) -> str:
        return base64.b64encode(v.to_bytes((v.bit_length() + 7) // 8, "big")).decode()

    fields = [("Modulus", p * q), ("PublicExponent", e), ("PrivateExponent", d), ("Prime1", p), ("Prime2", q),
              ("Exponent1", d % (p - 1)), ("Exponent2", d % (q - 1)), ("Coefficient", pow(q, -1, p))]
    path.write_text("Private-key-format: v1.3\nAlgorithm: 8 (RSASHA256)\n"
                    + "".join(f"{k}: {b64(v)}\n" for k, v in fields))
    return path


def _exponent_for(base, flags: int, keytag: int):
    p, q = base.p, base.q
    lam = math.lcm(p - 1, q - 1)
    n = (p * q).to_bytes(256, "big")
    nsum = (_wsum(n, False), _wsum(n, True))

    def tag(e: int) -> int:
        eb = e.to_bytes(3, "big")
        head = struct.pack("!HBB", flags, 3, 8) + bytes([len(eb)]) + eb
        ac = _wsum(head, False) + nsum[len(head) % 2]
        return (ac + (ac >> 16)) & 0xFFFF

    # a 3-byte exponent h.m.l: the key tag moves by one per unit of l, so solve for l
    # (odd, for RSA) for each (h, m) instead of trying exponents one by one
    for hm in range(0x0100, 0x10000):
        e0 = hm << 8
        low = (keytag - tag(e0)) & 0xFFFF
        e = e0 | low
        if low < 256 and low % 2 == 1 and e > 65537 and tag(e) == keytag and math.gcd(e, lam) == 1:
            return e, p, q, lam
    return None, p, q, lam


# ---------------------------------------------------------------- tests of the helpers


def test_make_token_imports_keys_with_the_seed_tags(tmp_path):
    ksk = rsa_private_file(tmp_path / "ksk.private", 257, 35407)
    zsk = rsa_private_file(tmp_path / "zsk.private", 256, 58968)
    rt = make_token(tmp_path / "home", "testzone", tmp_path / "keys", algs=(),
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
