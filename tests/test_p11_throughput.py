"""What the PKCS#11 signing path does to go faster, and that it decides exactly as before.

- A bound digest's signing data is parsed once, at C_DigestFinal; C_Sign decides on it
  again (policy and clock as they are then) without parsing it again.
- RSA signatures are made in the Engine's worker processes while several clients sign
  at once (not for one client alone), through the same signing path.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cryptobat import policy, prehash, rrsig
from cryptobat.signing import Job
from support import PIN, Daemon, SoftHsm, client_module, make_signing_data, make_token, setup_home, signing_token


@pytest.fixture
def clocked(tmp_path):
    """(officers, token, clock): a quorum-of-one token whose clock the test moves (``clock[0]``)."""
    t = [time.time()]
    o = make_token(tmp_path / "t", quorum=1, officers=("solo",), close=False, wall=lambda: t[0], mono=lambda: t[0],
                   maxval=3600, keys=("13 zsk testzone k13", "8 zsk testzone k8"))
    yield o, o.console.token, t
    o.console.token.close()


@pytest.fixture
def parses(monkeypatch):
    """How many times signing data is parsed (rrsig.parse, as policy.check calls it)."""
    n = [0]
    real = rrsig.parse

    def counting(data: bytes) -> rrsig.SigningData:
        n[0] += 1
        return real(data)
    monkeypatch.setattr(rrsig, "parse", counting)
    return n


def test_a_bound_digest_is_parsed_once_and_decided_again_when_signed(clocked, parses):
    _, tok, clock = clocked
    k = tok.key("k13")
    now = tok.now()
    data = make_signing_data(k, now + 600, now - 60)
    digest = hashlib.sha256(data).digest()
    assert tok.bind_digest("sha256", data, digest) == [("k13", digest)]
    assert parses[0] == 1
    assert tok.sign_digest("k13", digest, "ecdsa", data).ok
    assert parses[0] == 1  # C_Sign decided on the data parsed at C_DigestFinal

    assert tok.bind_digest("sha256", data, digest) == [("k13", digest)]
    clock[0] += 601  # the signature would now be born expired: refused at C_Sign, not parsed again
    r = tok.sign_digest("k13", digest, "ecdsa", data)
    assert r.reason == policy.EXPIRED and parses[0] == 2



def test_a_bound_digest_is_refused_at_sign_time_once_the_policy_tightened(clocked, parses):
    officers, tok, _ = clocked
    k = tok.key("k13")
    now = tok.now()
    data = make_signing_data(k, now + 3000, now - 60)
    digest = hashlib.sha256(data).digest()
    assert tok.bind_digest("sha256", data, digest) == [("k13", digest)]
    assert "+1800" in officers.console.handle("setmaxval 1800")  # the officer is still logged in
    r = tok.sign_digest("k13", digest, "ecdsa", data)
    assert r.reason == policy.EXPIRATION_EXCEEDS and parses[0] == 1


def test_data_not_kept_parsed_is_parsed_again(clocked, parses):
    _, tok, _ = clocked
    k8 = tok.key("k8")
    now = tok.now()
    data = make_signing_data(k8, now + 600, now - 60)
    d = hashlib.sha256(data).digest()
    raw = prehash.mechanism_input(k8, d)
    assert tok.bind_digest("sha256", data, d) == [("k8", raw)]
    other = make_signing_data(k8, now + 601, now - 60)  # never bound: nothing kept for it
    assert not tok.sign_digest("k8", raw, "rsa-pkcs", other).ok  # does not hash to the input
    assert parses[0] == 2
    assert tok.sign_digest("k8", raw, "rsa-pkcs", data).ok and parses[0] == 2


def test_kept_parses_are_bounded_in_number_and_bytes():
    sd = rrsig.SigningData(1, 13, 1, 3600, 0, 0, 0, b"\0", b"\0", 1, 1)
    kept = prehash.Parsed(entries=3, size=100)
    for i in range(5):
        kept.keep(bytes([i]) * 10, sd)
    assert len(kept) == 3 and kept.take(b"\0" * 10) is None and kept.take(b"\4" * 10) is sd
    assert kept.take(b"\4" * 10) is None  # taken once
    kept.keep(b"x" * 101, sd)  # larger than the whole budget: not kept
    assert kept.take(b"x" * 101) is None
    for i in range(3):
        kept.keep(bytes([i]) * 45, sd)
    assert len(kept) == 2  # 3 x 45 bytes > 100


def test_policy_for_zones_decides_as_the_whole_policy(clocked):
    _, tok, _ = clocked
    whole = tok.policy()
    zone = next(iter(whole.zone_keys))
    cut = policy.for_zones(whole, {zone, b"\x05other\x00"})
    assert cut.zone_keys == {zone: whole.zone_keys[zone]} and cut.max_validity == whole.max_validity
    assert cut.clock_tampered == whole.clock_tampered and dict(cut.delete_until) == {}


def test_spread_jobs_sign_in_free_workers_alongside_a_batch(tmp_path):
    t, engine = signing_token(tmp_path / "t")
    try:
        key = t.key("z")
        now = t.now()
        good = make_signing_data(key, now + 600, now - 60)
        bad = make_signing_data(key, now + 7200, now - 60)  # beyond max validity
        single = t.sign_job([("z", good), ("z", bad)])
        out = engine.run(single, spread=True)
        assert out[0].ok and out[1].reason == policy.EXPIRATION_EXCEEDS
        assert engine._pool is not None and len(engine._pool) == 2 and not engine._lent  # signed in a worker
        batch = t.sign_job([("z", good)] * 600)
        results: dict = {}

        def spread(i: int) -> None:
            results[i] = [engine.run(single, spread=True) for _ in range(20)]

        threads = [threading.Thread(target=spread, args=(i,)) for i in range(4)]
        for th in threads:
            th.start()
        big = engine.run(batch)
        for th in threads:
            th.join()
        assert len(big) == 600 and all(r.ok for r in big)
        for runs in results.values():
            for r in runs:
                assert r[0].ok and r[1].reason == policy.EXPIRATION_EXCEEDS
        assert not engine._lent
        assert len(engine.run(Job(single.policy, single.now, single.keys, []), spread=True)) == 0
    finally:
        engine.close()
        t.close()


def _daemon_workers(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


SIGNER = r"""
import sys, pkcs11
from pkcs11 import KeyType, Mechanism, ObjectClass
data, n = bytes.fromhex(sys.argv[2]), int(sys.argv[3])
with pkcs11.lib(sys.argv[1]).get_token().open(user_pin=sys.argv[4]) as s:
    key = s.get_key(ObjectClass.PRIVATE_KEY, KeyType.RSA, label="k8")
    for _ in range(n):
        print(key.sign(data, mechanism=Mechanism.SHA256_RSA_PKCS).hex())
"""


def _thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of ``pid``."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


@pytest.mark.parametrize("custody", ["software", "pkcs11"])
def test_rsa_clients_signing_at_once_sign_off_the_loop(tmp_path, monkeypatch, custody):
    """One client's RSA signatures are made on the loop. Several clients': in helper threads
    when the custody signs from threads at once (software: cryptography releases the GIL),
    in the worker processes when it does not (pkcs11: one module lock in the daemon)."""
    from cryptobat import algorithms
    if custody == "pkcs11":
        cfg = SoftHsm.shared().token()
        monkeypatch.setenv("CRYPTOBAT_CUSTODY", f"pkcs11:{cfg['module']}")
        monkeypatch.setenv("CRYPTOBAT_CUSTODY_TOKEN", cfg["token"])
        monkeypatch.setenv("CRYPTOBAT_CUSTODY_PIN", cfg["pin"])
    else:
        monkeypatch.delenv("CRYPTOBAT_CUSTODY", raising=False)
    home = tmp_path / "h"
    setup_home(home)
    from cryptobat.home import open_token
    tok = open_token(home)
    try:
        assert tok.custody.name == custody
        k8 = tok.key("k8")
        now = tok.now()
    finally:
        tok.close()
    data = make_signing_data(k8, now + 3600, now - 60)
    d = Daemon(home)
    try:
        env = dict(os.environ, P11_KIT_SERVER_ADDRESS=d.address)

        def sign(clients: int, n: int) -> list[str]:
            procs = [subprocess.Popen([sys.executable, "-c", SIGNER, client_module(), data.hex(), str(n), PIN.decode()],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                     for _ in range(clients)]
            sigs = []
            for p in procs:
                out, err = p.communicate(timeout=300)
                assert p.returncode == 0, err
                sigs += out.split()
            return sigs

        alone = sign(1, 30)
        assert len(alone) == 30 and _daemon_workers(d.pid) == []  # one client: signed in the loop
        before = _thread_cpu(d.pid)
        together = sign(4, 60)
        assert len(together) == 240
        if custody == "software":
            assert _daemon_workers(d.pid) == []
            helpers = [cpu for tid, cpu in _thread_cpu(d.pid).items() if tid not in before]
            assert len(helpers) >= 2 and sum(helpers) >= 0.05, helpers  # helper threads signed
        else:
            assert _daemon_workers(d.pid)  # several at once: the worker processes signed too
        pub = algorithms.public_key_of(k8.dnskey())
        for sig in set(alone + together):
            pub.verify(bytes.fromhex(sig), data)
        assert d.alive
    finally:
        d.stop()
