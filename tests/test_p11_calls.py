"""PKCS#11 calls beyond signing, through the stock p11-kit-client.so: C_Verify (one part and
C_VerifyUpdate/C_VerifyFinal), C_GetObjectSize, CKA_ALLOWED_MECHANISMS, exact C_GetMechanismInfo
and the CKF_USER_PIN_* token flags driven by the PIN lockout.

python-pkcs11 loads one module per process, so each client runs in its own subprocess (the
daemon of this module is not the one another test module's python-pkcs11 already found).
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap

import pytest

from cryptobat import algorithms
from cryptobat.client import connect
from cryptobat.p11rpc import constants as C
from cryptobat.token import MAX_PIN_FAILURES
from cryptobat.p11rpc.codec import Attribute, Mechanism
from cryptobat.p11rpc.module import HANDSHAKE, SLOT_ID
from support import PIN, SockClient, client_module, make_signing_data, p11_daemon, tool

KEYS = (("8", "k8"), ("10", "k10"), ("13", "k13"), ("14", "k14"), ("15", "k15"))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    with p11_daemon(tmp_path_factory.mktemp("p11calls") / "token", keys=KEYS) as d:
        yield d


def run_client(script: str, *args: str, timeout: float = 120) -> dict:
    """Run a client script (argv[1] the module, then ``args``); it prints one JSON object."""
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(script), client_module(), *args],
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


VERIFY_CLIENT = """
    import json, sys
    import pkcs11
    from pkcs11 import Mechanism, ObjectClass
    lib = pkcs11.lib(sys.argv[1])
    out = {}
    with lib.get_token().open(user_pin=sys.argv[3]) as s:
        for label, data, digest_mech, sign_mech, checks in json.loads(sys.argv[2]):
            data = bytes.fromhex(data)
            priv = s.get_key(ObjectClass.PRIVATE_KEY, label=label)
            pub = s.get_key(ObjectClass.PUBLIC_KEY, label=label)
            signed = s.digest(data, mechanism=Mechanism(digest_mech)) if digest_mech else data  # EC: a bound digest
            sig = priv.sign(signed, mechanism=Mechanism(sign_mech))
            for mech, given in checks:
                m, given = Mechanism(mech), bytes.fromhex(given)
                parts = [given[i:i + 7] for i in range(0, len(given), 7)]  # C_VerifyUpdate per part, C_VerifyFinal
                out[f"{label}/{mech:#x}"] = [
                    pub.verify(given, sig, mechanism=m), pub.verify(parts, sig, mechanism=m),
                    pub.verify(given[:-1] + bytes([given[-1] ^ 1]), sig, mechanism=m),
                    pub.verify(parts + [b"x"], sig, mechanism=m), pub.verify(given, bytes(len(sig)), mechanism=m)]
    print(json.dumps(out))
"""


def _keys(daemon) -> tuple[dict, int]:
    c = connect(home=daemon.home, pin=PIN.decode())
    try:
        return {k.label: k for k in c.keys()}, c.time()
    finally:
        c.close()


def test_verify_one_part_and_multi_part_through_p11_kit_client(daemon):
    """RSA: the whole-data mechanism verifies the DNSSEC signature, one part or in parts, and
    CKM_RSA_PKCS the same signature over the DigestInfo. ECDSA: Debian 12's p11-kit client (0.24.1)
    passes only CKM_ECDSA (CKM_ECDSA_SHA256/384 and CKM_EDDSA it refuses itself), so the client
    signs a bound digest and verifies it with CKM_ECDSA; the other mechanisms are checked below
    on the daemon's socket."""
    keys, now = _keys(daemon)
    jobs, want = [], {}
    for label in ("k8", "k10", "k13", "k14"):
        key = keys[label]
        alg = algorithms.by_number(key.algorithm)
        data = make_signing_data(key, now + 3600, now - 60)
        digest = hashlib.new(alg.hash, data).digest()
        if alg.kind == "rsa":
            checks = [[alg.mech_sign, data.hex()], [alg.mech_hash_sign, (alg.digest_info + digest).hex()]]
            jobs.append([label, data.hex(), None, alg.mech_sign, checks])
        else:
            checks = [[alg.mech_hash_sign, digest.hex()]]
            jobs.append([label, data.hex(), {"sha256": C.CKM_SHA256, "sha384": C.CKM_SHA384}[alg.hash],
                         alg.mech_hash_sign, checks])
        want.update({f"{label}/{m:#x}": [True, True, False, False, False] for m, _ in checks})
    assert run_client(VERIFY_CLIENT, json.dumps(jobs), PIN.decode()) == want


def _find(c: SockClient, h: int, cls: int, label: str) -> int:
    c.ok("C_FindObjectsInit", h, [Attribute(C.CKA_CLASS, cls), Attribute(C.CKA_LABEL, label.encode())])
    (found,) = c.ok("C_FindObjects", h, 4)
    c.ok("C_FindObjectsFinal", h)
    (handle,) = found.data
    return handle


def test_verify_whole_data_ec_and_eddsa_on_the_socket(daemon):
    """The mechanisms p11-kit 0.24.1's client refuses (p11-kit >= 0.25 passes them), on the wire."""
    keys, now = _keys(daemon)
    c = SockClient(daemon.p11, version=0)
    try:
        h = c.start()
        for label in ("k13", "k14", "k15"):
            key = keys[label]
            alg = algorithms.by_number(key.algorithm)
            data = make_signing_data(key, now + 3600, now - 60)
            priv, pub = (_find(c, h, cls, label) for cls in (C.CKO_PRIVATE_KEY, C.CKO_PUBLIC_KEY))
            c.ok("C_SignInit", h, Mechanism(alg.mech_sign, None), priv)
            (sig,) = c.ok("C_Sign", h, data, alg.signature_len)
            for good in (True, False):
                given = data if good else data + b"x"
                c.ok("C_VerifyInit", h, Mechanism(alg.mech_sign, None), pub)
                rv, _ = c.call("C_Verify", h, given, sig.data)
                assert rv == (C.CKR_OK if good else C.CKR_SIGNATURE_INVALID), (label, rv)
                c.ok("C_VerifyInit", h, Mechanism(alg.mech_sign, None), pub)
                for i in range(0, len(given), 50):
                    c.ok("C_VerifyUpdate", h, given[i:i + 50])
                rv, _ = c.call("C_VerifyFinal", h, sig.data)
                assert rv == (C.CKR_OK if good else C.CKR_SIGNATURE_INVALID), (label, rv)
                rv, _ = c.call("C_VerifyFinal", h, sig.data)
                assert rv == C.CKR_OPERATION_NOT_INITIALIZED  # either way the operation ended
            c.ok("C_VerifyInit", h, Mechanism(alg.mech_sign, None), pub)
            c.ok("C_VerifyUpdate", h, data[:10])
            rv, _ = c.call("C_Verify", h, data, sig.data)
            assert rv == C.CKR_OPERATION_ACTIVE  # a multi-part verify is finished by C_VerifyFinal only
            c.call("C_VerifyFinal", h, sig.data)
    finally:
        c.close()


def test_verify_answers_signature_invalid_through_pkcs11_tool(daemon, tmp_path):
    (tmp_path / "data").write_bytes(b"not signed" * 100)
    r = tool("--verify", "-m", "SHA256-RSA-PKCS", "--id", b"k8".hex(), "--input-file", str(tmp_path / "data"),
             "--signature-file", str(tmp_path / "data"), check=False)
    assert "Invalid signature" in r.stdout + r.stderr, r.stdout + r.stderr
    assert daemon.alive()


MECHANISM_CLIENT = """
    import json, sys
    import pkcs11
    lib = pkcs11.lib(sys.argv[1])
    (slot,) = lib.get_slots()
    out = {}
    for m in slot.get_mechanisms():
        try:
            i = slot.get_mechanism_info(m)
            out[int(m)] = [i.min_key_length, i.max_key_length, int(i.flags)]
        except pkcs11.exceptions.MechanismInvalid:  # listed, but the client will not pass it on
            out[int(m)] = None
    print(json.dumps(out))
"""

SIGN_VERIFY = C.CKF_SIGN | C.CKF_VERIFY
EC = C.CKF_EC_F_P | C.CKF_EC_NAMEDCURVE | C.CKF_EC_UNCOMPRESS
EXPECTED_MECHANISMS = {
    C.CKM_RSA_PKCS_KEY_PAIR_GEN: [1024, 4096, C.CKF_GENERATE_KEY_PAIR],
    C.CKM_RSA_PKCS: [1024, 4096, SIGN_VERIFY],
    C.CKM_SHA256_RSA_PKCS: [1024, 4096, SIGN_VERIFY],
    C.CKM_SHA512_RSA_PKCS: [1024, 4096, SIGN_VERIFY],
    C.CKM_EC_KEY_PAIR_GEN: [256, 384, C.CKF_GENERATE_KEY_PAIR | EC],
    C.CKM_ECDSA: [256, 384, SIGN_VERIFY | EC],
    C.CKM_ECDSA_SHA256: [256, 256, SIGN_VERIFY | EC],
    C.CKM_ECDSA_SHA384: [384, 384, SIGN_VERIFY | EC],
    C.CKM_EC_EDWARDS_KEY_PAIR_GEN: [255, 448, C.CKF_GENERATE_KEY_PAIR],
    C.CKM_EDDSA: [255, 448, SIGN_VERIFY],
    C.CKM_SHA_1: [0, 0, C.CKF_DIGEST],
    C.CKM_SHA256: [0, 0, C.CKF_DIGEST],
    C.CKM_SHA384: [0, 0, C.CKF_DIGEST],
    C.CKM_SHA512: [0, 0, C.CKF_DIGEST],
}


# what p11-kit 0.24.1's client leaves out of the list and refuses itself (no RPC serializer for them)
CLIENT_REFUSES = {C.CKM_ECDSA_SHA256, C.CKM_ECDSA_SHA384, C.CKM_EC_EDWARDS_KEY_PAIR_GEN, C.CKM_EDDSA}


def test_mechanism_info_is_exact_per_mechanism(daemon):
    got = {int(k): v for k, v in run_client(MECHANISM_CLIENT).items()}
    # (that client's list filter shifts one element too many: a stray number may end its list)
    listed = {m: v for m, v in got.items() if m in EXPECTED_MECHANISMS}
    assert set(listed) == set(EXPECTED_MECHANISMS) - CLIENT_REFUSES
    assert listed == {m: EXPECTED_MECHANISMS[m] for m in listed}
    c = SockClient(daemon.p11, version=0)  # on the wire, the daemon lists and answers every one exactly
    try:
        c.ok("C_Initialize", HANDSHAKE, 0, None)
        (mechs,) = c.ok("C_GetMechanismList", SLOT_ID, 64)
        assert sorted(mechs.data) == sorted(EXPECTED_MECHANISMS)
        for m, want in EXPECTED_MECHANISMS.items():
            assert c.ok("C_GetMechanismInfo", SLOT_ID, m) == want, hex(m)
        rv, _ = c.call("C_GetMechanismInfo", SLOT_ID, C.CKM_SHA256_RSA_PKCS_PSS)
        assert rv == C.CKR_MECHANISM_INVALID
    finally:
        c.close()


def test_allowed_mechanisms_per_key_type(daemon):
    """CKA_ALLOWED_MECHANISMS, as pkcs11-tool shows it for each private key (from algorithms.py)."""
    out = tool("--login", "--pin", PIN.decode(), "--list-objects", "--type", "privkey").stdout
    shown = {}
    label = None
    for line in out.splitlines():
        if line.strip().startswith("label:"):
            label = line.split(":", 1)[1].strip()
        elif line.strip().startswith("Allowed mechanisms:"):
            shown[label] = set(line.split(":", 1)[1].strip().split(","))
    assert shown == {"k8": {"SHA256-RSA-PKCS", "RSA-PKCS"}, "k10": {"SHA512-RSA-PKCS", "RSA-PKCS"},
                     "k13": {"ECDSA-SHA256", "ECDSA"}, "k14": {"ECDSA-SHA384", "ECDSA"}, "k15": {"EDDSA"}}, out


OBJECT_SIZE_CLIENT = """
    import ctypes, json, sys
    UL = ctypes.c_ulong
    lib = ctypes.CDLL(sys.argv[1])
    flp = ctypes.c_void_p()
    assert lib.C_GetFunctionList(ctypes.byref(flp)) == 0


    class FunctionList(ctypes.Structure):  # CK_FUNCTION_LIST: a version, then the functions in spec order
        _fields_ = [("version", ctypes.c_ubyte * 2)] + [(f"f{i}", ctypes.c_void_p) for i in range(68)]


    class Attr(ctypes.Structure):
        _fields_ = [("type", UL), ("value", ctypes.c_void_p), ("len", UL)]


    fl = ctypes.cast(flp, ctypes.POINTER(FunctionList)).contents
    def fn(i, *types):
        return ctypes.CFUNCTYPE(UL, *types)(getattr(fl, f"f{i}"))
    C_Initialize, C_OpenSession = fn(0, ctypes.c_void_p), fn(12, UL, UL, ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(UL))
    C_Login = fn(18, UL, UL, ctypes.c_char_p, UL)
    C_GetObjectSize = fn(23, UL, UL, ctypes.POINTER(UL))
    C_FindObjectsInit, C_FindObjects = fn(26, UL, ctypes.POINTER(Attr), UL), fn(27, UL, ctypes.POINTER(UL), UL, ctypes.POINTER(UL))
    C_FindObjectsFinal = fn(28, UL)
    assert C_Initialize(None) == 0
    h = UL()
    assert C_OpenSession(1, 4, None, None, ctypes.byref(h)) == 0
    pin = sys.argv[2].encode()
    assert C_Login(h, 1, pin, len(pin)) == 0
    out = {}
    for label in sys.argv[3:]:
        for cls in (2, 3):  # public, private key
            c, lab = UL(cls), ctypes.create_string_buffer(label.encode(), len(label))
            tmpl = (Attr * 2)(Attr(0, ctypes.cast(ctypes.byref(c), ctypes.c_void_p), 8),
                              Attr(3, ctypes.cast(lab, ctypes.c_void_p), len(label)))
            assert C_FindObjectsInit(h, tmpl, 2) == 0
            objs, n = (UL * 4)(), UL()
            assert C_FindObjects(h, objs, 4, ctypes.byref(n)) == 0 and n.value == 1
            C_FindObjectsFinal(h)
            size = UL()
            rv = C_GetObjectSize(h, objs[0], ctypes.byref(size))
            out[f"{label}/{cls}"] = [rv, size.value]
    size = UL()
    out["bad"] = C_GetObjectSize(h, 999999, ctypes.byref(size))
    print(json.dumps(out))
"""


def test_object_size(daemon):
    got = run_client(OBJECT_SIZE_CLIENT, PIN.decode(), "k8", "k13", "k15")
    assert got.pop("bad") == C.CKR_OBJECT_HANDLE_INVALID
    assert all(rv == C.CKR_OK and size > 0 for rv, size in got.values()), got
    assert got["k8/2"][1] > 256 + 3 > got["k13/2"][1] - 65  # the RSA modulus and EC point are counted
    assert got["k15/2"][1] < got["k13/2"][1]  # an Ed25519 point is half a P-256 one


TOKEN_FLAGS_CLIENT = """
    import json, sys
    import pkcs11
    from pkcs11.exceptions import PinIncorrect, PinLocked
    lib = pkcs11.lib(sys.argv[1])
    out = []
    for attempt in sys.argv[2:]:
        try:
            lib.get_token().open(user_pin=attempt).close()
            answer = "ok"
        except PinIncorrect:
            answer = "incorrect"
        except PinLocked:
            answer = "locked"
        out.append([answer, int(lib.get_token().flags)])
    print(json.dumps({"flags": out}))
"""
PIN_FLAGS = C.CKF_USER_PIN_COUNT_LOW | C.CKF_USER_PIN_FINAL_TRY | C.CKF_USER_PIN_LOCKED


def test_user_pin_flags_follow_the_lockout(tmp_path):
    with p11_daemon(tmp_path / "token", keys=(("13", "k13"),)) as d:
        attempts = ["wrong-1", PIN.decode()] + [f"wrong-{i}" for i in range(MAX_PIN_FAILURES)] + [PIN.decode()]
        got = run_client(TOKEN_FLAGS_CLIENT, *attempts)["flags"]
        flags = [(answer, f & PIN_FLAGS) for answer, f in got]
        assert flags[0] == ("incorrect", C.CKF_USER_PIN_COUNT_LOW)
        assert flags[1] == ("ok", 0)  # a right PIN clears the count
        assert flags[2:2 + MAX_PIN_FAILURES - 2] == [("incorrect", C.CKF_USER_PIN_COUNT_LOW)] * (MAX_PIN_FAILURES - 2)
        assert flags[MAX_PIN_FAILURES] == ("incorrect", C.CKF_USER_PIN_FINAL_TRY)
        assert flags[MAX_PIN_FAILURES + 1] == ("locked", C.CKF_USER_PIN_LOCKED)
        assert flags[-1] == ("locked", C.CKF_USER_PIN_LOCKED)  # the right PIN no longer opens it
        assert all(f & C.CKF_USER_PIN_INITIALIZED and f & C.CKF_LOGIN_REQUIRED for _, f in got)
        assert " Signer PIN set" in d.quorum(f"setpin {PIN.decode()}")[0]
        got = run_client(TOKEN_FLAGS_CLIENT, PIN.decode())["flags"]
        assert got[0][0] == "ok" and got[0][1] & PIN_FLAGS == 0
