"""A software key holder standing in for the token in signzone tests (and a benchmark).

:class:`SoftToken` implements the :class:`cryptobat.client.Client` protocol with
real private keys (dnspython's ``dns.dnssecalgs`` over ``cryptography``).  It is
a *test backend*, not the token: its only policy is a maximum validity (refuse
an RRSIG whose expiration is beyond ``time() + max_validity``) and a check that
the signing input names the key's algorithm and tag.  Signatures it makes are
real, so the zones signzone writes can be checked by BIND, ldns and Knot.

Benchmark:  ``python tests/test_signzone_backend.py --bench 100000 [-- signzone options]``
"""
from __future__ import annotations

import os
import struct
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import dns.dnssec
import dns.dnssecalgs
import dns.name
import dns.rdataclass
import dns.rdatatype
import pytest

from cryptobat.api import KeyInfo, SignResult

ALGS = {8: "RSASHA256", 13: "ECDSAP256SHA256", 15: "ED25519"}


class SoftToken:
    """Client protocol over local keys; big batches are signed in worker processes."""

    def __init__(self, max_validity: int | None = None, clock=None, processes: int | None = None):
        self.max_validity = max_validity
        self._clock = clock or (lambda: int(time.time()))
        self._keys: dict[str, tuple[KeyInfo, object]] = {}
        self._nproc = processes or os.cpu_count() or 2
        self._pool = None

    def add_key(self, zone: str, algorithm: int, role: str, label: str | None = None, keytag: int | None = None) -> KeyInfo:
        cls = dns.dnssecalgs.get_algorithm_cls(algorithm)
        if keytag is not None:
            priv = _rsa_with_tag(cls, 257 if role in ("ksk", "csk") else 256, keytag)
        else:
            priv = cls.generate(2048) if algorithm in (5, 7, 8, 10) else cls.generate()
        flags = 257 if role in ("ksk", "csk") else 256
        dnskey = priv.public_key().to_dnskey(flags=flags)
        zone = dns.name.from_text(zone).to_text().lower()
        label = label or f"{zone.rstrip('.')}-{role}-{algorithm}-{len(self._keys)}"
        info = KeyInfo(label, zone, algorithm, role, dns.dnssec.key_id(dnskey), flags, dnskey.key)
        self._keys[label] = (info, priv)
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        return info

    # -- Client protocol
    def keys(self) -> list[KeyInfo]:
        return [k for k, _ in self._keys.values()]

    def time(self) -> int:
        return self._clock()

    def timed_sign(self, items):
        items = list(items)
        now = self._clock()
        if len(items) < 1024:
            raw = _sign_chunk(items, now, self.max_validity, self._keys)
        else:
            if self._pool is None:
                from concurrent.futures import ProcessPoolExecutor
                import multiprocessing

                ctx = multiprocessing.get_context("forkserver")
                ctx.set_forkserver_preload([__name__])
                keys = {lb: (info, _der(priv)) for lb, (info, priv) in self._keys.items()}
                self._pool = ProcessPoolExecutor(self._nproc, mp_context=ctx, initializer=_load_keys, initargs=(keys,))
            n = -(-len(items) // (2 * self._nproc))
            futs = [self._pool.submit(_sign_chunk, items[a : a + n], now, self.max_validity) for a in range(0, len(items), n)]
            raw = [r for f in futs for r in f.result()]
        return [SignResult(signature=r) if isinstance(r, bytes) else SignResult(reason=r) for r in raw]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def _rsa_with_tag(cls, flags: int, keytag: int):
    """An RSA key whose DNSKEY has the given key tag (found by varying the public exponent)."""
    import math

    from cryptography.hazmat.primitives.asymmetric import rsa

    base = rsa.generate_private_key(65537, 2048).private_numbers()
    p, q = base.p, base.q
    lam = math.lcm(p - 1, q - 1)
    n = (p * q).to_bytes(256, "big")

    def wsum(data: bytes, odd: bool) -> int:  # RFC 4034 Appendix B checksum terms
        return sum(b << 8 if (i + odd) % 2 == 0 else b for i, b in enumerate(data))

    nsum = (wsum(n, False), wsum(n, True))
    e = 65537
    while True:
        e += 2
        eb = e.to_bytes((e.bit_length() + 7) // 8, "big")
        head = struct.pack("!HBB", flags, 3, cls.public_cls.algorithm) + bytes([len(eb)]) + eb
        ac = wsum(head, False) + nsum[len(head) % 2]
        if (ac + (ac >> 16)) & 0xFFFF == keytag and math.gcd(e, lam) == 1:
            break
    d = pow(e, -1, lam)
    nums = rsa.RSAPrivateNumbers(p, q, d, rsa.rsa_crt_dmp1(d, p), rsa.rsa_crt_dmq1(d, q), rsa.rsa_crt_iqmp(p, q), rsa.RSAPublicNumbers(e, p * q))
    return cls(key=nums.private_key())


def _der(priv) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return priv.key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


_worker_keys: dict = {}


def _load_keys(keys) -> None:
    from cryptography.hazmat.primitives import serialization

    for label, (info, der) in keys.items():
        cls = dns.dnssecalgs.get_algorithm_cls(info.algorithm)
        _worker_keys[label] = (info, cls(key=serialization.load_der_private_key(der, None)))


def _sign_chunk(items, now, max_validity, keys=None) -> list:
    """Signature bytes, or the refusal reason, per (label, signing input)."""
    keys = _worker_keys if keys is None else keys
    out = []
    for label, data in items:
        entry = keys.get(label)
        if entry is None:
            out.append("no such key")
            continue
        info, priv = entry
        _tc, alg, _labels, _ttl, exp, _inc, tag = struct.unpack_from("!HBBIIIH", data)
        if alg != info.algorithm or tag != info.keytag:
            out.append("RRSIG algorithm or key tag does not match the key")
        elif max_validity is not None and exp > now + max_validity:
            out.append("RRSIG expiration time exceeds HSM policy")
        else:
            out.append(priv.sign(data))
    return out


def write_keyfiles(directory: str, info: KeyInfo, ttl: int | None = None) -> str:
    """BIND key files for a token key; returns the K<zone>.+<alg>+<tag> base path."""
    zone = info.zone.rstrip(".") or "."
    base = os.path.join(directory, f"K{zone}.+{info.algorithm:03d}+{info.keytag:05d}")
    rd = info.dnskey()
    with open(base + ".key", "w") as f:
        f.write(f"; This is a {'key' if info.flags & 1 else 'zone'}-signing key, keyid {info.keytag}, for {info.zone}\n")
        f.write(f"{info.zone} {'' if ttl is None else str(ttl) + ' '}IN DNSKEY {rd.to_text()}\n")
    with open(base + ".private", "w") as f:
        f.write("Private-key-format: v1.3\n")
        f.write(f"Algorithm: {info.algorithm} ({ALGS.get(info.algorithm, '?')})\n")
        f.write("Engine: cryptobat\n")
        f.write(f"Label: {info.label}\n")
    return base


# ---------------------------------------------------------------- tests of the backend itself


def _signing_input(info: KeyInfo, exp: int) -> bytes:
    return struct.pack("!HBBIIIH", 1, info.algorithm, 1, 300, exp, exp - 600, info.keytag) + b"\x07example\x00"


@pytest.mark.parametrize("alg", [8, 13, 15])
def test_backend_signatures_verify(alg):
    tok = SoftToken(processes=2)
    info = tok.add_key("example.", alg, "zsk")
    data = [("x", b"")] + [(info.label, _signing_input(info, tok.time() + 60 + i)) for i in range(1100)]
    res = tok.timed_sign(data)
    assert len(res) == 1101 and res[0].reason == "no such key"
    pub = dns.dnssecalgs.get_algorithm_cls(alg).public_cls.from_dnskey(info.dnskey())
    for (_, d), r in zip(data[1:], res[1:]):
        pub.verify(r.signature, d)  # raises on a bad signature
    tok.close()


def test_backend_refuses_long_validity():
    tok = SoftToken(max_validity=3600)
    info = tok.add_key("example.", 13, "zsk")
    ok, bad = tok.timed_sign([(info.label, _signing_input(info, tok.time() + 3600)), (info.label, _signing_input(info, tok.time() + 3700))])
    assert ok.ok and not bad.ok and bad.reason == "RRSIG expiration time exceeds HSM policy"
    tok.close()


# ---------------------------------------------------------------- benchmark


def make_zone(path: str, n: int, origin: str = "example.com.") -> None:
    """n names, ~1.35 records each (A for all, AAAA for 35%)."""
    with open(path, "w") as f:
        f.write(f"$TTL 3600\n$ORIGIN {origin}\n@ IN SOA ns1 hostmaster 1 7200 3600 1209600 3600\n")
        f.write("@ NS ns1\n@ NS ns2\nns1 A 192.0.2.1\nns2 A 192.0.2.2\n")
        for i in range(n):
            f.write(f"h{i} A 10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}\n")
            if i % 20 < 7:
                f.write(f"h{i} AAAA 2001:db8::{i >> 16:x}:{i & 0xFFFF:x}\n")


def _bench(argv: list[str]) -> int:
    import tempfile

    from cryptobat import signzone

    n = int(argv[0]) if argv else 100000
    extra = argv[2:] if len(argv) > 1 and argv[1] == "--" else []
    d = tempfile.mkdtemp(prefix="signzone-bench-")
    zf = os.path.join(d, "example.com")
    make_zone(zf, n)
    tok = SoftToken()
    ksk = write_keyfiles(d, tok.add_key("example.com.", 13, "ksk"))
    zsk = write_keyfiles(d, tok.add_key("example.com.", 13, "zsk"))
    t = time.perf_counter()
    rc = signzone.main(["-t", "-o", "example.com", "-k", ksk, *extra, zf, zsk], client=tok)
    print(f"wall time {time.perf_counter() - t:.2f} s for {n} names, rc={rc}, output {zf}.signed", file=sys.stderr)
    tok.close()
    return rc


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--bench":
        sys.exit(_bench(sys.argv[2:]))
