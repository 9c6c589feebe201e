"""The stock p11-kit-client.so (and pkcs11-tool) against our server on a Unix socket."""
from __future__ import annotations

import glob
import os
import subprocess
import threading

import pkcs11
import pytest
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.exceptions import FunctionRejected, PinIncorrect

from cryptobat.p11rpc.module import verify_signature
from cryptobat.p11rpc.unix import serve_unix
from test_p11rpc_backend import PIN, FakeToken, make_signing_data


def client_module() -> str:
    try:
        d = subprocess.run(["pkg-config", "--variable=p11_module_path", "p11-kit-1"],
                           capture_output=True, text=True, check=True).stdout.strip()
        cands = [os.path.join(d, "p11-kit-client.so")]
    except (OSError, subprocess.CalledProcessError):
        cands = []
    cands += glob.glob("/usr/lib/*/pkcs11/p11-kit-client.so") + glob.glob("/usr/lib*/pkcs11/p11-kit-client.so")
    for c in cands:
        if os.path.exists(c):
            return c
    raise AssertionError("p11-kit-client.so not found: apt-get install p11-kit-modules")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("p11") / "p11.sock")
    tok = FakeToken()
    ready, stop = threading.Event(), threading.Event()
    t = threading.Thread(target=serve_unix, args=(path, tok, threading.Lock(), ready, stop), daemon=True)
    t.start()
    assert ready.wait(5)
    old = os.environ.get("P11_KIT_SERVER_ADDRESS")
    os.environ["P11_KIT_SERVER_ADDRESS"] = f"unix:path={path}"
    yield path, tok
    stop.set()
    t.join(5)
    if old is None:
        os.environ.pop("P11_KIT_SERVER_ADDRESS", None)
    else:
        os.environ["P11_KIT_SERVER_ADDRESS"] = old


@pytest.fixture(scope="module")
def lib(server):
    return pkcs11.lib(client_module())


def test_slots_token_mechanisms(lib, server):
    slots = lib.get_slots()
    assert len(slots) == 1
    token = slots[0].get_token()
    assert token.label == "cryptobat test"
    assert token.manufacturer_id == "Cryptobat"
    mechs = slots[0].get_mechanisms()
    assert Mechanism.SHA256_RSA_PKCS in mechs and Mechanism.ECDSA in mechs and Mechanism.SHA256 in mechs


def test_login_find_sign_rsa(lib, server):
    _, tok = server
    token = lib.get_token()
    with pytest.raises(PinIncorrect):
        token.open(user_pin="wrong")
    with token.open(user_pin=PIN.decode()) as s:
        priv = s.get_key(ObjectClass.PRIVATE_KEY, KeyType.RSA, label="k8")
        pub = s.get_key(ObjectClass.PUBLIC_KEY, KeyType.RSA, label="k8")
        assert pub[Attribute.MODULUS_BITS] == 2048
        assert priv[Attribute.ID] == b"k8"
        assert priv[Attribute.SENSITIVE] and not priv[Attribute.EXTRACTABLE]
        key = tok.infos["k8"]
        data = make_signing_data(key, tok.now + 86400, tok.now - 60)
        sig = priv.sign(data, mechanism=Mechanism.SHA256_RSA_PKCS)
        assert verify_signature(key, Mechanism.SHA256_RSA_PKCS, data, sig)
        assert pub.verify(data, sig, mechanism=Mechanism.SHA256_RSA_PKCS)
        bad = make_signing_data(key, tok.now + 365 * 86400, tok.now - 60)
        with pytest.raises(FunctionRejected):
            priv.sign(bad, mechanism=Mechanism.SHA256_RSA_PKCS)


def test_ecdsa_digest_then_sign_is_bound(lib, server):
    """PowerDNS style: C_Digest(SHA256) of checked RRSIG data, then C_Sign(CKM_ECDSA)."""
    _, tok = server
    key = tok.infos["k13"]
    with lib.get_token().open(user_pin=PIN.decode()) as s:
        priv = s.get_key(ObjectClass.PRIVATE_KEY, KeyType.EC, label="k13")
        data = make_signing_data(key, tok.now + 86400, tok.now - 60)
        digest = s.digest(data, mechanism=Mechanism.SHA256)
        sig = priv.sign(digest, mechanism=Mechanism.ECDSA)
        assert verify_signature(key, Mechanism.ECDSA, digest, sig)
        # the same digest authorises one signature only; an unchecked hash is refused
        with pytest.raises(FunctionRejected):
            priv.sign(digest, mechanism=Mechanism.ECDSA)
        bad = make_signing_data(key, tok.now + 365 * 86400, tok.now - 60)
        with pytest.raises(FunctionRejected):
            priv.sign(s.digest(bad, mechanism=Mechanism.SHA256), mechanism=Mechanism.ECDSA)


def test_pkcs11_tool_lists(server):
    mod = client_module()
    env = dict(os.environ)
    for args in (["-L"], ["-M"], ["-O"], ["-O", "--login", "--pin", PIN.decode()]):
        r = subprocess.run(["pkcs11-tool", "--module", mod, *args], capture_output=True, text=True,
                           env=env, timeout=60)
        assert r.returncode == 0, r.stderr
        if args == ["-L"]:
            assert "cryptobat test" in r.stdout
        if args == ["-M"]:
            assert "SHA256-RSA-PKCS" in r.stdout
        if "--login" in args:
            assert "Private Key Object" in r.stdout and "k13" in r.stdout
        elif args == ["-O"]:
            assert "Public Key Object" in r.stdout and "Private Key Object" not in r.stdout
