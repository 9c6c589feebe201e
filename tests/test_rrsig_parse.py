"""rrsig.parse's fast paths decide exactly as the label-by-label reading does.

``read_name`` accepts a well-formed canonical name in one pass and hands anything else to
``_read_name_checked``; ``parse`` compares the later RRs' owners with the first's bytes.
Both must give the same answer, and the same refusal reason, as reading every name in full.
"""
from __future__ import annotations

import random
import struct

import pytest

from cryptobat import rrsig
from cryptobat.errors import Refusal

SIGNER = b"\x07example\x03com\x00"
OWNER = b"\x01a\x07example\x03com\x00"


def _outcome(fn, *args):
    try:
        return fn(*args)
    except Refusal as e:
        return e.reason


def _data(rrs: list[tuple[bytes, bytes]], labels: int = 3, rdtype: int = 1) -> bytes:
    head = struct.pack("!HBBIIIH", rdtype, 13, labels, 3600, 2000000000, 1900000000, 12345) + SIGNER
    return head + b"".join(o + struct.pack("!HHIH", rdtype, 1, 3600, len(rd)) + rd for o, rd in rrs)


def _mutations(rnd: random.Random, seed: bytes, n: int):
    for _ in range(n):
        d = bytearray(seed)
        for _ in range(rnd.randint(1, 3)):
            op = rnd.random()
            if op < 0.5 and d:
                d[rnd.randrange(len(d))] = rnd.choice([0, 1, 2, 3, 63, 64, 0x41, 0x5A, 0x61, 0xC0, rnd.randrange(256)])
            elif op < 0.7 and d:
                del d[rnd.randrange(len(d)):]
            elif op < 0.85:
                i = rnd.randrange(len(d) + 1)
                d[i:i] = bytes([rnd.randrange(256)])
            elif d:
                del d[rnd.randrange(len(d))]
        yield bytes(d)


def test_read_name_fast_path_agrees_with_the_checked_reading():
    rnd = random.Random(4034)
    long_name = b"".join(b"\x3f" + b"a" * 63 for _ in range(4)) + b"\x00"  # 257 octets: too long
    seeds = [SIGNER, OWNER, b"\x01*" + OWNER[2:], b"\x00", long_name, b"\x01A\x00", b"\x01a\xc0\x0c"]
    for seed in seeds:
        for d in _mutations(rnd, seed + b"\x00\x01", 3000):
            for pos in (0, 1):
                assert _outcome(rrsig.read_name, d, pos) == _outcome(rrsig._read_name_checked, d, pos), d.hex()


def test_read_name_refusals():
    assert _outcome(rrsig.read_name, b"\x01A\x00", 0) == "name not in canonical (lower case) form"
    assert _outcome(rrsig.read_name, b"\x01a\xc0\x0c", 0) == "compressed or invalid label in name"
    assert _outcome(rrsig.read_name, b"\x03ab", 0) == "truncated name"
    assert _outcome(rrsig.read_name, b"\x01a", 0) == "truncated name"
    assert _outcome(rrsig.read_name, b"".join(b"\x3f" + b"a" * 63 for _ in range(4)) + b"\x00", 0) == "name too long"
    assert rrsig.read_name(b"\xff" + OWNER, 1) == (OWNER, 3, 1 + len(OWNER))


@pytest.mark.parametrize("second, reason", [
    (b"\x01b\x07example\x03com\x00", "RRs with different owner names"),
    (b"\x01b\x01a\x07example\x03com\x00", "RRs with different owner names"),  # the owner as its suffix
    (b"\x01A\x07example\x03com\x00", "name not in canonical (lower case) form"),
    (b"\x01a\xc0\x0c", "compressed or invalid label in name"),
])
def test_a_later_owner_that_differs_is_refused(second, reason):
    data = _data([(OWNER, b"\x01\x02\x03\x04"), (second, b"\x01\x02\x03\x05")])
    assert _outcome(rrsig.parse, data) == reason


def test_parse_reads_every_rr_of_one_owner():
    rds = [bytes([10, 0, 0, i]) for i in range(1, 6)]
    sd = rrsig.parse(_data([(OWNER, rd) for rd in rds]))
    assert (sd.owner, sd.signer, sd.count, sd.rdclass, sd.labels) == (OWNER, SIGNER, 5, 1, 3)
    assert rrsig.rdatas(_data([(OWNER, rd) for rd in rds])) == rds


def test_parse_mutations_refuse_cleanly():
    """Mangled signing data is accepted or refused with a reason, never an exception."""
    rnd = random.Random(6605)
    seed = _data([(OWNER, b"\x01\x02\x03\x04"), (OWNER, b"\x01\x02\x03\x05"), (OWNER, b"\x01\x02\x03\x06")])
    for d in _mutations(rnd, seed, 5000):
        out = _outcome(rrsig.parse, d)
        assert isinstance(out, (str, rrsig.SigningData))
        if isinstance(out, rrsig.SigningData):
            assert out.count >= 1 and len(rrsig.rdatas(d)) == out.count
