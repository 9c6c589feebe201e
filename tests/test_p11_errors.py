"""Token refusals reach PKCS#11 clients as their own return codes, through one boundary.

Key management refused by the token (taken or malformed label, no window, deletion
outside the window) answers a specific CKR through the stock p11-kit-client.so, and the
daemon logs no traceback for it: a refusal is an answer, not a failure. The hash-only
binding rules (cryptobat.prehash) are checked on a real token without the RPC layer.
"""
from __future__ import annotations

import hashlib

import pytest

from cryptobat import algorithms
from cryptobat.errors import Conflict, InvalidArgument, KeygenRefused, NotPermitted
from cryptobat.p11rpc import constants as C
from cryptobat.p11rpc.codec import Attribute, Buffer, Mechanism
from cryptobat.p11rpc.module import Module, P11Error
from support import module_session as session, PIN, RealToken, make_signing_data, p11_daemon, tool

P256 = bytes.fromhex("06082a8648ce3d030107")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    with p11_daemon(tmp_path_factory.mktemp("p11err") / "token", keys=(("13", "k13"),)) as d:
        yield d


def rv(ckr: int) -> str:
    """How pkcs11-tool prints a return code (by number: it does not name the vendor-range ones)."""
    return f"(0x{ckr:x})"


def keypairgen(label: str) -> tuple[int, str]:
    r = tool("--login", "--pin", PIN.decode(), "--keypairgen", "--key-type", "EC:prime256v1",
             "--label", label, check=False)
    return r.returncode, r.stdout + r.stderr


def test_key_management_refusals_answer_their_own_codes_without_traceback(daemon):
    rc, out = keypairgen("outside")
    assert rc != 0 and rv(C.CKR_FUNCTION_REJECTED) in out, out  # no window open
    assert "open for 60 seconds" in daemon.quorum("p11window 60 testzone.")[0]
    try:
        rc, out = keypairgen("twice")
        assert rc == 0, out
        rc, out = keypairgen("twice")
        assert rc != 0 and rv(C.CKR_TEMPLATE_INCONSISTENT) in out, out  # the label is taken
        rc, out = keypairgen("k13")
        assert rc != 0 and rv(C.CKR_TEMPLATE_INCONSISTENT) in out, out
        rc, out = keypairgen("two words")
        assert rc != 0 and rv(C.CKR_ATTRIBUTE_VALUE_INVALID) in out, out  # not a printable label
        rc, out = keypairgen("L" * 65)
        assert rc != 0 and rv(C.CKR_ATTRIBUTE_VALUE_INVALID) in out, out  # too long
    finally:
        daemon.quorum("p11window 0 testzone.")
    r = tool("--login", "--pin", PIN.decode(), "--delete-object", "--type", "privkey", "--label", "twice",
             check=False)
    assert r.returncode != 0 and rv(C.CKR_ACTION_PROHIBITED) in r.stdout + r.stderr, r.stdout + r.stderr
    daemon.stop()
    log = daemon.p.stderr.read()
    assert "Traceback" not in log and "failed" not in log, log


# --- the same boundary without the RPC layer, on a real token ---------------------------------

@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    t = RealToken(tmp_path_factory.mktemp("p11err-rt"), keys=(("8", "k8"), ("13", "k13")), compat=())
    yield t
    t.close()




def keygen(m: Module, h: int, label: bytes) -> list:
    return m.call("C_GenerateKeyPair", [h, Mechanism(C.CKM_EC_KEY_PAIR_GEN, None),
                                        [Attribute(C.CKA_EC_PARAMS, P256)], [Attribute(C.CKA_LABEL, label)]])


def test_module_answers_token_errors_with_their_code(rt):
    m, h = session(rt)
    with pytest.raises(P11Error) as e:
        keygen(m, h, b"k13")
    assert e.value.ckr == C.CKR_FUNCTION_REJECTED == KeygenRefused.ckr
    rt.quorum("p11window 60 testzone.")
    try:
        for label, err in ((b"k13", Conflict), (b"a\tb", InvalidArgument), (b"x" * 65, InvalidArgument)):
            with pytest.raises(P11Error) as e:
                keygen(m, h, label)
            assert e.value.ckr == err.ckr, label
            with pytest.raises(err):
                rt.token.generate_key(13, "csk", "", label.decode())
        pub, priv = keygen(m, h, b"fresh")
    finally:
        rt.quorum("p11window 0 testzone.")
    with pytest.raises(P11Error) as e:
        m.call("C_DestroyObject", [h, priv])
    assert e.value.ckr == C.CKR_ACTION_PROHIBITED == NotPermitted.ckr
    with pytest.raises(NotPermitted):
        rt.token.delete_key("fresh")


def test_bound_digest_signs_once_and_only_its_own_data(rt):
    k8, k13 = rt.key("k8"), rt.key("k13")
    data = make_signing_data(k13, rt.now + 86400, rt.now - 3600)
    digest = hashlib.sha256(data).digest()
    assert rt.token.bind_digest("sha256", data, digest) == [("k13", digest)]
    assert rt.token.bind_digest("sha384", data, hashlib.sha384(data).digest()) == []  # not the key's hash
    assert rt.token.bind_digest("sha256", b"not signing data", digest) == []
    assert rt.token.bind_digest("sha256", make_signing_data(k13, rt.now + 90 * 86400, rt.now), digest) == []
    rsa = make_signing_data(k8, rt.now + 86400, rt.now - 3600)
    d8 = hashlib.sha256(rsa).digest()
    assert rt.token.bind_digest("sha256", rsa, d8) == [("k8", algorithms.by_number(8).digest_info + d8)]

    other = hashlib.sha256(data + b"x").digest()
    assert not rt.token.sign_digest("k13", other, "ecdsa", data).ok  # bound data must hash to the input
    assert rt.token.sign_digest("k13", digest, "ecdsa", data).ok
    assert rt.token.sign_digest("k8", algorithms.by_number(8).digest_info + d8, "rsa-pkcs", rsa).ok

    m, h = session(rt)
    k13_handle = next(hd for hd, (k, private) in m._objects().items() if k.label == "k13" and private)
    m.call("C_DigestInit", [h, Mechanism(C.CKM_SHA256, None)])
    m.call("C_Digest", [h, data, Buffer(64)])
    for ok in (True, False):  # one bound digest authorises one signature
        m.call("C_SignInit", [h, Mechanism(C.CKM_ECDSA, None), k13_handle])
        if ok:
            assert len(m.call("C_Sign", [h, digest, Buffer(64)])[0].data) == 64
        else:
            with pytest.raises(P11Error) as e:
                m.call("C_Sign", [h, digest, Buffer(64)])
            assert e.value.ckr == C.CKR_FUNCTION_REJECTED
