"""Standard PKCS#11 clients against the REAL token through ``cryptobat serve``.

The stock p11-kit-client.so talks to HOME/pkcs11.sock; OpenSC's pkcs11-tool and
python-pkcs11 drive it.  Also: ``cryptobat p11-stdio`` behind p11-kit's proxy module
(relay and embedded), p11-kit's fuzz corpus and mutations over the daemon's socket,
and 20 concurrent signing clients with the daemon's memory watched.
"""
from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dns.rrset
import pkcs11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.exceptions import FunctionRejected, PinIncorrect

from cryptobat.client import connect
from cryptobat.p11rpc import constants as C
from cryptobat.p11rpc.calls import BY_NAME
from cryptobat.p11rpc.codec import encode_request, parse_response
from cryptobat.p11rpc.framing import HEADER, encode_frame
from cryptobat.p11rpc.module import HANDSHAKE, SLOT_ID
from support import (PIN, ROOT, SockClient, cli, client_module, corpus_files, p11_daemon, p11_served,
                     setup_home, signing_data, tool, valid_requests, validate)

KEYS = (("8", "k8"), ("13", "k13"), ("13", "c13"), ("14", "k14"), ("15", "k15"))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    with p11_daemon(tmp_path_factory.mktemp("p11d") / "token", keys=KEYS) as d:
        yield d


@pytest.fixture(scope="module")
def lib(daemon):
    return pkcs11.lib(client_module())  # python-pkcs11 loads one module per process: this daemon's


def keyinfo(home: Path, label: str):
    c = connect(home=home, pin=PIN.decode())
    try:
        now = c.time()
        return next(k for k in c.keys() if k.label == label), now
    finally:
        c.close()


def rrsig_data(home: Path, label: str, valid: int = 1800):
    key, now = keyinfo(home, label)
    rrset = dns.rrset.from_text("www.testzone.", 300, "IN", "A", "192.0.2.7")
    tpl, data = signing_data(key, rrset, now - 60, now + valid)
    return key, rrset, tpl, data, now


# --- (a) OpenSC pkcs11-tool ---------------------------------------------------------------

def test_pkcs11_tool_lists_slots_token_mechanisms(daemon):
    label = cli("status", home=daemon.home).stdout.split()[1:3]
    r = tool("-L")
    assert "token label        : " + " ".join(label) in r.stdout and "Cryptobat" in r.stdout
    r = tool("-M")
    for m in ("SHA256-RSA-PKCS", "RSA-PKCS", "ECDSA", "SHA256", "RSA-PKCS-KEY-PAIR-GEN", "ECDSA-KEY-PAIR-GEN"):
        assert m in r.stdout
    r = tool("-O")
    assert "Public Key Object" in r.stdout and "Private Key Object" not in r.stdout
    r = tool("-O", "--login", "--pin", PIN.decode())
    assert "Private Key Object" in r.stdout and "label:      k13" in r.stdout
    r = tool("-O", "--login", "--pin", "9999", check=False)
    assert r.returncode != 0 and "CKR_PIN_INCORRECT" in r.stderr


def test_pkcs11_tool_keygen_needs_quorum_window(daemon):
    args = ("--login", "--pin", PIN.decode(), "--keypairgen", "--key-type", "EC:prime256v1", "--label", "toolgen")
    r = tool(*args, check=False)
    assert r.returncode != 0 and "(0x200)" in r.stderr
    out = daemon.quorum("p11window 60 testzone.")
    assert "open for 60 seconds" in out[0]
    tool(*args)
    tool("--login", "--pin", PIN.decode(), "--keypairgen", "--key-type", "rsa:2048", "--label", "toolrsa")
    daemon.quorum("p11window 0 testzone.")
    keys = cli("console", home=daemon.home, input="keylist\n").stdout
    assert "toolgen" in keys and "toolrsa" in keys
    key, _ = keyinfo(daemon.home, "toolgen")
    assert key.zone == "testzone." and key.algorithm == 13


def test_pkcs11_tool_signs_rrsig_data_only(daemon, tmp_path):
    key, rrset, tpl, data, now = rrsig_data(daemon.home, "k8")
    (tmp_path / "in").write_bytes(data)
    tool("--login", "--pin", PIN.decode(), "--sign", "-m", "SHA256-RSA-PKCS", "--id", b"k8".hex(),
         "--input-file", str(tmp_path / "in"), "--output-file", str(tmp_path / "sig"))
    validate(key, rrset, tpl, (tmp_path / "sig").read_bytes(), now)
    (tmp_path / "junk").write_bytes(b"arbitrary data, not an RRSIG")
    r = tool("--login", "--pin", PIN.decode(), "--sign", "-m", "SHA256-RSA-PKCS", "--id", b"k8".hex(),
             "--input-file", str(tmp_path / "junk"), "--output-file", str(tmp_path / "sig2"), check=False)
    assert r.returncode != 0 and "(0x200)" in r.stderr


def test_pkcs11_tool_self_test(daemon):
    """pkcs11-tool --test: what remains are the refusals listed in docs/pkcs11-tool-test.md."""
    r = tool("--test", "--login", "--pin", PIN.decode(), check=False)
    out = r.stdout + r.stderr
    assert "C_GenerateRandom(buf1,0) failed" not in out
    assert "all 4 digest functions seem to work" in out
    errors = [l for l in out.splitlines() if "ERR:" in l]
    # the only error: CKM_RSA_PKCS over pkcs11-tool's test string, which is no checked RRSIG digest
    assert all("RSA-PKCS" in l and "(0x200)" in l for l in errors), out
    assert 1 <= len(errors) <= 2, out  # one per RSA key (k8, toolrsa)
    assert daemon.alive()


# --- (b) python-pkcs11 --------------------------------------------------------------------

def test_python_pkcs11_slots_login_sign(lib, daemon):
    (slot,) = lib.get_slots()
    token = slot.get_token()
    assert token.manufacturer_id == "Cryptobat"
    assert Mechanism.SHA256_RSA_PKCS in slot.get_mechanisms()
    with pytest.raises(PinIncorrect):
        token.open(user_pin="wrong")
    key, rrset, tpl, data, now = rrsig_data(daemon.home, "k8")
    with token.open(user_pin=PIN.decode()) as s:
        priv = s.get_key(ObjectClass.PRIVATE_KEY, KeyType.RSA, label="k8")
        assert priv[Attribute.SENSITIVE] and not priv[Attribute.EXTRACTABLE]
        sig = priv.sign(data, mechanism=Mechanism.SHA256_RSA_PKCS)
        validate(key, rrset, tpl, sig, now)
        with pytest.raises(FunctionRejected):
            priv.sign(b"arbitrary data", mechanism=Mechanism.SHA256_RSA_PKCS)
        _, _, _, too_long, _ = rrsig_data(daemon.home, "k8", valid=90 * 86400)
        with pytest.raises(FunctionRejected):
            priv.sign(too_long, mechanism=Mechanism.SHA256_RSA_PKCS)


def test_python_pkcs11_keygen_window(lib, daemon):
    with lib.get_token().open(user_pin=PIN.decode(), rw=True) as s:
        with pytest.raises(FunctionRejected):
            s.generate_keypair(KeyType.RSA, 2048, label="pygen", store=True)
        daemon.quorum("p11window 60 testzone.")
        pub, priv = s.generate_keypair(KeyType.RSA, 2048, label="pygen", store=True)
        daemon.quorum("p11window 0 testzone.")
    key, _ = keyinfo(daemon.home, "pygen")
    assert key.algorithm == 8 and key.zone == "testzone."


def _compat_count(home: Path) -> int:
    line = next(l for l in cli("status", home=home).stdout.splitlines() if l.startswith("counters"))
    return int(line.split("compat")[1].split()[0])


def test_python_pkcs11_ecdsa_compat_and_bound_digest(lib, daemon):
    key, rrset, tpl, data, now = rrsig_data(daemon.home, "k13")
    with lib.get_token().open(user_pin=PIN.decode()) as s:
        c13 = s.get_key(ObjectClass.PRIVATE_KEY, KeyType.EC, label="c13")
        with pytest.raises(FunctionRejected):
            c13.sign(bytes(range(32)), mechanism=Mechanism.ECDSA)  # hash-only, key not in compat mode
        before = _compat_count(daemon.home)
        assert "Compat (hash-only) signing on" in daemon.quorum("setcompat c13 on")[0]
        sig = c13.sign(bytes(range(32)), mechanism=Mechanism.ECDSA)
        assert len(sig) == 64
        daemon.quorum("setcompat c13 off")
        time.sleep(1.2)  # the daemon flushes counters about once a second
        assert _compat_count(daemon.home) == before + 1
        # PowerDNS style, no compat needed: C_Digest(SHA256) of RRSIG data, then C_Sign(CKM_ECDSA)
        k13 = s.get_key(ObjectClass.PRIVATE_KEY, KeyType.EC, label="k13")
        digest = s.digest(data, mechanism=Mechanism.SHA256)
        sig = k13.sign(digest, mechanism=Mechanism.ECDSA)
        validate(key, rrset, tpl, sig, now)
        with pytest.raises(FunctionRejected):  # one checked digest, one signature
            k13.sign(digest, mechanism=Mechanism.ECDSA)
        _, _, _, bad, _ = rrsig_data(daemon.home, "k13", valid=90 * 86400)
        with pytest.raises(FunctionRejected):
            k13.sign(s.digest(bad, mechanism=Mechanism.SHA256), mechanism=Mechanism.ECDSA)


# --- (c) cryptobat p11-stdio behind p11-kit's proxy -----------------------------------------

STDIO_CLIENT = textwrap.dedent("""
    import sys, pkcs11
    from pkcs11 import KeyType, Mechanism, ObjectClass
    lib = pkcs11.lib(sys.argv[1])
    tok = next(t for t in (s.get_token() for s in lib.get_slots()) if t.manufacturer_id == "Cryptobat")
    data = bytes.fromhex(sys.argv[2])
    with tok.open(user_pin="123456") as s:
        k = s.get_key(ObjectClass.PRIVATE_KEY, KeyType.RSA, label="k8")
        print(k.sign(data, mechanism=Mechanism.SHA256_RSA_PKCS).hex())
        try:
            k.sign(b"junk", mechanism=Mechanism.SHA256_RSA_PKCS)
            print("SIGNED-JUNK")
        except pkcs11.exceptions.FunctionRejected:
            print("refused")
""")


def _stdio_env(home: Path) -> dict:
    """p11-kit-client.so's exec transport: the same `|command` a module file's `remote:` line takes.

    (A module file in ~/.config/pkcs11/modules would do too, but p11-kit ignores user
    configuration in a process running as root, as CI's does.)
    """
    env = dict(os.environ, P11_KIT_SERVER_ADDRESS=f"|{sys.executable} -m cryptobat --home {home} p11-stdio")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    return env


def _stdio_sign(home: Path, key, rrset, tpl, data, now) -> None:
    r = subprocess.run([sys.executable, "-c", STDIO_CLIENT, client_module(), data.hex()], capture_output=True,
                       text=True, env=_stdio_env(home), timeout=120)
    assert r.returncode == 0, r.stderr
    sig_hex, verdict = r.stdout.split()
    validate(key, rrset, tpl, bytes.fromhex(sig_hex), now)
    assert verdict == "refused"


def test_p11_stdio_relay_through_daemon(daemon):
    key, rrset, tpl, data, now = rrsig_data(daemon.home, "k8")
    _stdio_sign(daemon.home, key, rrset, tpl, data, now)
    assert daemon.alive()


def test_p11_stdio_embedded_without_daemon(tmp_path):
    home = tmp_path / "token"
    setup_home(home, keys=(("8", "k8"),), compat=())
    key, rrset, tpl, data, now = rrsig_data(home, "k8")
    assert not (home / "pkcs11.sock").exists()
    _stdio_sign(home, key, rrset, tpl, data, now)


# --- robustness over the daemon's real socket ---------------------------------------------

@pytest.mark.parametrize("version", [0, 2])
def test_corpus_over_daemon_socket(daemon, version):
    c = SockClient(daemon.p11, version)
    c.start()
    for path in corpus_files():
        body = c.raw(path.read_bytes())  # every input gets a reply on the same connection
        cid = struct.unpack(">I", body[:4])[0]
        assert cid == 0 or path.name.startswith(next(x.name for x in BY_NAME.values() if x.id == cid))
    c.raw(encode_request("C_Initialize", [HANDSHAKE, 0, None], version))  # the corpus finalizes too
    c.ok("C_GetInfo")
    c.close()
    p11_served(daemon)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(idx=st.integers(0, 8), cut=st.integers(0, 400),
       flips=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=6),
       tail=st.binary(max_size=16), header=st.booleans())
def test_mutations_over_daemon_socket(daemon, idx, cut, flips, tail, header):
    body = bytearray(valid_requests()[idx])
    for pos, val in flips:
        if body:
            body[pos % len(body)] = val
    body = bytes(body[:cut]) + tail if cut < len(body) else bytes(body) + tail
    c = SockClient(daemon.p11)
    c.ok("C_Initialize", HANDSHAKE, 0, None)
    if header:  # a broken frame header: the daemon may close this connection, nothing more
        c.s.sendall(HEADER.pack(0, 0, len(body)) + body)
        c.s.settimeout(5)
        try:
            c.s.recv(65536)
        except (socket.timeout, ConnectionResetError):
            pass
    else:
        assert len(c.raw(body)) >= 8
        c.ok("C_GetInfo")
    c.close()
    p11_served(daemon)


STRESS_CLIENT = textwrap.dedent("""
    import sys, time, pkcs11
    from pkcs11 import KeyType, Mechanism, ObjectClass
    lib = pkcs11.lib(sys.argv[1]); data = bytes.fromhex(sys.argv[2]); until = time.time() + float(sys.argv[3])
    n = errors = 0
    with lib.get_token().open(user_pin="123456") as s:
        k = s.get_key(ObjectClass.PRIVATE_KEY, KeyType.RSA, label="k8")
        while time.time() < until:
            try:
                assert len(k.sign(data, mechanism=Mechanism.SHA256_RSA_PKCS)) == 256
                n += 1
            except Exception as e:
                errors += 1
                print(repr(e), file=sys.stderr)
    print(n, errors)
""")


def _stress(daemon, data: bytes, seconds: int) -> int:
    procs = [subprocess.Popen([sys.executable, "-c", STRESS_CLIENT, client_module(), data.hex(), str(seconds)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
             for _ in range(20)]
    total = 0
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        n, errors = map(int, out.split())
        assert errors == 0 and n > 0, err
        total += n
    return total


def test_twenty_clients_sign_for_ten_seconds(daemon):
    """20 clients at once: no errors; after a warm-up round, a second round leaves memory flat."""
    _, _, _, data, _ = rrsig_data(daemon.home, "k8", valid=3600)
    p11_served(daemon)
    rss = [daemon.rss_kb()]
    for seconds in (5, 10, 10):
        assert _stress(daemon, data, seconds) > 100
        rss.append(daemon.rss_kb())
    print("daemon VmRSS kB:", rss)
    assert rss[3] - rss[1] < 30 * 1024, rss
    p11_served(daemon)


def test_bench_runs_with_tiny_counts(tmp_path):
    """bench/p11_bench.py must keep working; needs SoftHSMv2 and p11-kit (fails, not skips, without)."""
    out = tmp_path / "rows.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "p11_bench.py"),
                        "--seconds", "0.3", "--clients", "1", "--kinds", "rsa,ec", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert "| mechanism | clients |" in r.stdout, r.stdout + r.stderr
    import json
    rows = json.loads(out.read_text())
    assert len(rows) == 2
    for row in rows:
        assert row["cryptobat"]["errors"] == 0 and row["cryptobat"]["rate"] > 0, row
        assert row["softhsm"]["rate"] > 0, row


def test_floor_bench_runs_with_tiny_counts():
    """bench/p11_floor.py: every server of its table answered the clients, and the sans-I/O
    replay of the recorded session ran on the real token."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "p11_floor.py"), "--seconds", "0.3", "--clients", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    row = next(line for line in r.stdout.splitlines() if line.startswith("| 1 |"))
    assert all(float(x) > 0 for x in row.split("|")[2:6]), r.stdout  # cryptobat, both floors, SoftHSM
    assert "failures" not in r.stdout and "floor: no recorded reply" not in r.stderr, r.stdout + r.stderr
    assert "sans-I/O:" in r.stdout and "C_Digest" in r.stdout, r.stdout


# --- the signing host's PKCS#11 attacks (they run last: they change the shared daemon's policy) ---

@pytest.fixture(scope="module")
def officers(daemon):
    """Both officers logged in once on their own console session, for the quorum commands below."""
    c = daemon.officers_session()
    yield c.cmd
    c.close()


def test_bound_digest_is_checked_again_after_the_policy_tightened(lib, daemon, officers):
    from support import MAX_VALIDITY
    key, rrset, tpl, data, now = rrsig_data(daemon.home, "k13", valid=3 * 3600)
    with lib.get_token().open(user_pin=PIN.decode()) as s:
        k13 = s.get_key(ObjectClass.PRIVATE_KEY, KeyType.EC, label="k13")
        digest = s.digest(data, mechanism=Mechanism.SHA256)  # bound now: 3 h is within 30 days
        try:
            assert "set to +3600" in officers("setmaxval 3600")
            with pytest.raises(FunctionRejected):
                k13.sign(digest, mechanism=Mechanism.ECDSA)
        finally:
            officers(f"setmaxval {MAX_VALIDITY}")
    assert "RRSIG expiration time exceeds HSM policy" in cli("audit", "-n", "30", home=daemon.home).stdout


def test_key_management_window_is_scoped_to_its_zone(lib, daemon, officers):
    from pkcs11.exceptions import PKCS11Error
    assert "open for 120 seconds" in officers("p11window 120 other.example")
    try:
        with lib.get_token().open(user_pin=PIN.decode(), rw=True) as s:
            k8 = s.get_key(ObjectClass.PRIVATE_KEY, KeyType.RSA, label="k8")  # a testzone key
            with pytest.raises(PKCS11Error):
                k8.destroy()
    finally:
        officers("p11window 0 other.example")
    key, _ = keyinfo(daemon.home, "k8")
    assert key.zone == "testzone."  # still there
    assert '"why":"the PKCS#11 key management window is for other.example., not testzone."' in \
        cli("audit", "-n", "30", home=daemon.home).stdout


def test_wrong_pins_lock_the_signer_pin_until_a_quorum_sets_it(lib, daemon, officers):
    from pkcs11 import TokenFlag
    from pkcs11.exceptions import PinLocked
    from cryptobat.token import MAX_PIN_FAILURES
    tok = lib.get_token()
    try:
        for i in range(MAX_PIN_FAILURES):
            with pytest.raises((PinIncorrect, PinLocked)):
                tok.open(user_pin="wrong-pin")
            flags = lib.get_token().flags
            if i == 0:
                assert flags & TokenFlag.USER_PIN_COUNT_LOW
            if i == MAX_PIN_FAILURES - 2:
                assert flags & TokenFlag.USER_PIN_FINAL_TRY
        assert lib.get_token().flags & TokenFlag.USER_PIN_LOCKED
        with pytest.raises(PinLocked):  # the right PIN no longer opens it
            tok.open(user_pin=PIN.decode())
        assert "LOCKED" in cli("status", home=daemon.home).stdout
    finally:
        assert officers(f"setpin {PIN.decode()}").strip() == "Signer PIN set"
    with lib.get_token().open(user_pin=PIN.decode()):
        pass
    assert not lib.get_token().flags & (TokenFlag.USER_PIN_LOCKED | TokenFlag.USER_PIN_COUNT_LOW)


def test_pipelined_wrong_logins_cost_no_more_than_the_lockout(lib, daemon, officers):
    """400 C_Login frames in one write: ten wrong PINs are checked, the rest are refused unchecked,
    and a signer on another connection is served meanwhile and afterwards."""
    from cryptobat.token import MAX_PIN_FAILURES
    c = SockClient(daemon.p11)
    c.ok("C_Initialize", HANDSHAKE, 0, None)
    (h,) = c.ok("C_OpenSession", SLOT_ID, C.CKF_SERIAL_SESSION)
    body = encode_request("C_Login", [h, C.CKU_USER, b"wrong-pin"], c.version)
    frames = b"".join(encode_frame(c.code + 1 + i, body, b"client") for i in range(400))
    key, rrset, tpl, data, now = rrsig_data(daemon.home, "k8")
    before = json.loads(cli("audit", "-n", "1", home=daemon.home).stdout.splitlines()[-1])["seq"]
    try:
        # the signer logs in before the frames are sent: a right PIN while they are being checked
        # would reset the failure count, and more than MAX_PIN_FAILURES wrong ones be checked
        with lib.get_token().open(user_pin=PIN.decode()) as s:
            c.s.sendall(frames)
            k8 = s.get_key(ObjectClass.PRIVATE_KEY, KeyType.RSA, label="k8")
            validate(key, rrset, tpl, k8.sign(data, mechanism=Mechanism.SHA256_RSA_PKCS), now)
            got: list[int] = []
            while len(got) < 400:
                for f in c.frames.feed(c.s.recv(65536)):
                    got.append(parse_response(f.body, BY_NAME["C_Login"], c.version)[0])
            assert set(got) <= {C.CKR_PIN_INCORRECT, C.CKR_PIN_LOCKED}
            assert got.count(C.CKR_PIN_INCORRECT) <= MAX_PIN_FAILURES
            validate(key, rrset, tpl, k8.sign(data, mechanism=Mechanism.SHA256_RSA_PKCS), now)
        audit = [e for e in map(json.loads, cli("audit", "-n", "500", home=daemon.home).stdout.splitlines())
                 if e["seq"] > before]
        assert sum(e.get("pin_refused", 0) for e in audit) >= 400 - 2 * MAX_PIN_FAILURES  # counted, unchecked
        assert max(e.get("failures", 0) for e in audit if e["event"] == "pin") == MAX_PIN_FAILURES
        assert len(audit) < 100  # a few bounded entries, not one per attempt
    finally:
        c.close()
        assert officers(f"setpin {PIN.decode()}").strip() == "Signer PIN set"


def test_every_boolean_attribute_reads_back_through_the_stock_client(lib, daemon):
    """CKA_DESTROYABLE is a byte array to p11-kit 0.24: reading it used to raise in the daemon."""
    with lib.get_token().open(user_pin=PIN.decode()) as s:
        k = s.get_key(ObjectClass.PRIVATE_KEY, KeyType.EC, label="k13")
        assert k[Attribute.DESTROYABLE] in (True, b"\x01")
        for a in (Attribute.TOKEN, Attribute.PRIVATE, Attribute.SENSITIVE, Attribute.EXTRACTABLE,
                  Attribute.MODIFIABLE, Attribute.COPYABLE, Attribute.SIGN):
            assert isinstance(k[a], bool), a
    p11_served(daemon)
