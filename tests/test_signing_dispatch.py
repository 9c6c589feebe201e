"""How a batch is signed: per payload the same check and signature in-process and across the
worker processes, whatever the parts (a second one queued in a busy worker's pipe or not)."""
from __future__ import annotations

import dns.rdatatype
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from cryptobat import algorithms, signing, workers
from cryptobat.custody.software import _DnssecKey
from support import payload, signing_token


def _mixed(k, now: int, n: int) -> list[tuple[str, bytes]]:
    """``n`` payloads for key ``z``: every 7th refused (expiration beyond the policy), every 11th
    for a key the token does not have, the rest distinct and valid."""
    items = []
    for i in range(n):
        rrs = [("www.testzone.", dns.rdatatype.A, 1, 300, bytes([10, i >> 16 & 255, i >> 8 & 255, i & 255]))]
        data = payload(k, now=now, exp=now + (9999 if i % 7 == 0 else 300), rrs=rrs)
        items.append(("nokey" if i % 11 == 0 else "z", data))
    return items


def test_signatures_is_sign_one_for_each_payload(tmp_path):
    """The compact loop (key unsealed once per job) answers exactly as sign_one does, payload by payload."""
    t, engine = signing_token(tmp_path / "t")
    try:
        items = _mixed(t.key("z"), t.now(), 200)
        job = t.sign_job(items)
        sigs, reasons = signing.signatures(t.cache, job)
        one = [signing.sign_one(t.cache, job, label, data) for label, data in items]
        assert sigs == [r.signature for r in one]  # deterministic ECDSA (RFC 6979): the same bytes
        assert reasons == {i: r.reason for i, r in enumerate(one) if not r.ok}
        assert reasons[11] == "no key labelled 'nokey'" and "expiration" in reasons[7]
        assert signing.results((sigs, reasons)) == one
    finally:
        engine.close()
        t.close()


@pytest.mark.parametrize("roomy", [True, False])
def test_worker_parts_come_back_in_order(tmp_path, monkeypatch, roomy):
    """A batch over the workers (big parts, then quarter-size ones; a second part queued in each
    worker's pipe where it could be enlarged) gives the in-process answers in the same order."""
    if not roomy:
        monkeypatch.setattr(workers, "_grow_pipe", lambda fd: False)
    t, engine = signing_token(tmp_path / "t")
    try:
        items = _mixed(t.key("z"), t.now(), 3001)
        expected = signing.run(t.cache, t.sign_job(items))
        assert t.timed_sign(items, run=engine.run) == expected
        assert engine._pool is not None and all(w.roomy is roomy for w in engine._pool)
    finally:
        engine.close()
        t.close()


@pytest.mark.parametrize("n,nworkers", [(256, 2), (8192, 2), (1000, 3), (300, 8), (5, 2), (257, 1)])
def test_split_covers_the_batch_in_order(n, nworkers):
    parts = workers._split(n, nworkers)
    assert parts[0][0] == 0 and parts[-1][1] == n
    assert all(a < b for a, b in parts) and all(p[1] == q[0] for p, q in zip(parts, parts[1:]))
    sizes = [b - a for a, b in parts]
    assert sizes[-1] <= sizes[0]  # the batch ends in the small parts


@pytest.mark.parametrize("number,curve", [(13, ec.SECP256R1()), (14, ec.SECP384R1())])
def test_ecdsa_signing_is_dnspythons(number, curve):
    """The custody's ECDSA signature (parameters made once per key) is dnspython's, byte for byte."""
    alg = algorithms.by_number(number)
    dnspython_key = alg.dnspython(key=ec.generate_private_key(curve))
    ours = _DnssecKey(dnspython_key, alg)
    for data in (b"", b"rrsig data" * 50):
        assert ours.sign(data) == dnspython_key.sign(data)
