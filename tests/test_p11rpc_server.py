"""The sans-I/O server spoken to directly: p11-kit's fuzz corpus, mutations, protocol v0 and v2."""
from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cryptobat.p11rpc import constants as C
from cryptobat.p11rpc.calls import CALLS
from cryptobat.p11rpc.codec import Attribute, Mechanism, RpcError, parse_request, parse_response
from cryptobat.p11rpc.framing import HEADER
from cryptobat.p11rpc.module import HANDSHAKE, SLOT_ID, verify_signature
from cryptobat.p11rpc.server import Connection
from support import (PIN, RealToken, WireClient, close_shared_token, corpus_files, generated_corpus,
                     make_signing_data, shared_token as token, valid_requests)


@pytest.fixture(scope="module", autouse=True)
def _close_token():
    yield
    close_shared_token()


class RawClient(WireClient):
    """Speaks the wire protocol to a Connection, the way p11-kit-client does."""

    def __init__(self, version: int = 0, tok: RealToken | None = None) -> None:
        super().__init__(version)
        self.conn = Connection((tok or token()).backend())
        assert self.conn.feed(bytes([version])) == bytes([version])

    def exchange(self, frame: bytes) -> list:
        return self.frames.feed(self.conn.feed(frame))

    def find(self, h: int, *template: Attribute) -> list[int]:
        self.ok("C_FindObjectsInit", h, list(template))
        (found,) = self.ok("C_FindObjects", h, 100)
        self.ok("C_FindObjectsFinal", h)
        return found.data


def healthy(client: RawClient) -> None:
    """The connection still answers well-formed calls (re-initializing after a C_Finalize)."""
    rv, _ = client.call("C_GetTokenInfo", SLOT_ID)
    if rv == C.CKR_CRYPTOKI_NOT_INITIALIZED:
        client.ok("C_Initialize", HANDSHAKE, 0, None)
    vals = client.ok("C_GetTokenInfo", SLOT_ID)
    assert vals[0].rstrip() == token().label.encode()


def test_corpus_present():
    gen = generated_corpus()
    assert len(gen) > 100 and len({i.name.rsplit("_generated", 1)[0] for i in gen}) > 50
    assert len(corpus_files()) >= len(gen)


@pytest.mark.parametrize("version", [0, 2])
def test_corpus_inputs_get_replies(version):
    for path in corpus_files():
        client = RawClient(version)
        client.start()
        body = client.raw(path.read_bytes())
        cid = struct.unpack(">I", body[:4])[0]
        if cid == 0:
            rv, _ = parse_response(body, CALLS[0])
            assert rv != 0
        else:
            call = CALLS[cid]
            assert path.name.startswith(call.name)
            parse_response(body, call, version)
        assert not client.conn.closed
        healthy(client)
    fresh = RawClient(version)
    fresh.start()
    healthy(fresh)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(idx=st.integers(0, 8), cut=st.integers(0, 400), flips=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=6),
       tail=st.binary(max_size=16))
def test_mutated_requests(idx, cut, flips, tail):
    body = bytearray(valid_requests()[idx])
    for pos, val in flips:
        if body:
            body[pos % len(body)] = val
    body = bytes(body[:cut]) + tail if cut < len(body) else bytes(body) + tail
    client = RawClient()
    client.start()
    reply = client.raw(body)
    assert len(reply) >= 8
    assert not client.conn.closed
    healthy(client)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 2))
def test_codec_raises_only_rpcerror(data, version):
    try:
        parse_request(data, version)
    except RpcError:
        pass


def test_bad_frame_closes_but_big_length_does_not_allocate():
    c = Connection(token().backend())
    c.feed(b"\x00")
    assert c.feed(HEADER.pack(1, 0, 0xFFFFFFF0)) == b""
    assert c.closed


def test_version_negotiation():
    c = Connection(token().backend())
    assert c.feed(b"\x07") == b"\x02"


def test_v2_mechanisms_and_eddsa():
    """Protocol 2 (p11-kit >= 0.25.6) encodes mechanisms differently; EdDSA works on the wire."""
    client = RawClient(version=2)
    h = client.start()
    TOKEN = token()
    k = TOKEN.key("k15")
    (priv,) = client.find(h, Attribute(C.CKA_CLASS, C.CKO_PRIVATE_KEY), Attribute(C.CKA_LABEL, b"k15"))
    client.ok("C_SignInit", h, Mechanism(C.CKM_EDDSA, None), priv)
    data = make_signing_data(k, TOKEN.now + 3600, TOKEN.now)
    (size,) = client.ok("C_Sign", h, data, None)
    assert size.data is None and size.length == 64
    (sig,) = client.ok("C_Sign", h, data, 64)
    assert verify_signature(k, C.CKM_EDDSA, data, sig.data)
    k14 = TOKEN.key("k14")
    (p14,) = client.find(h, Attribute(C.CKA_CLASS, C.CKO_PRIVATE_KEY), Attribute(C.CKA_ID, b"k14"))
    client.ok("C_SignInit", h, Mechanism(C.CKM_ECDSA_SHA384), p14)
    bad = make_signing_data(k14, TOKEN.now + 90 * 86400, TOKEN.now)
    rv, _ = client.call("C_Sign", h, bad, 96)
    assert rv == C.CKR_FUNCTION_REJECTED
    rv, _ = client.call("C_Sign", h, bad, 96)
    assert rv == C.CKR_OPERATION_NOT_INITIALIZED
    client.ok("C_SignInit", h, Mechanism(C.CKM_ECDSA_SHA384), p14)
    client.ok("C_SignInit", h, None, 0)  # v2 NULL mechanism cancels


def test_objects_attributes_and_refusals():
    client = RawClient()
    h = client.start(login=False)
    assert client.find(h, Attribute(C.CKA_CLASS, C.CKO_PRIVATE_KEY)) == []
    rv, _ = client.call("C_Login", h, C.CKU_SO, PIN)
    assert rv == C.CKR_USER_TYPE_INVALID
    client.ok("C_Login", h, C.CKU_USER, PIN)
    (priv,) = client.find(h, Attribute(C.CKA_CLASS, C.CKO_PRIVATE_KEY), Attribute(C.CKA_LABEL, b"k8"))
    attrs, rv = client.ok("C_GetAttributeValue", h, priv, [(C.CKA_PRIVATE_EXPONENT, 512), (C.CKA_MODULUS, 0),
                                                           (C.CKA_SIGN, 1), (C.CKA_KEY_TYPE, 8)])
    assert rv == C.CKR_ATTRIBUTE_SENSITIVE
    assert attrs[0].value is None and attrs[1].length == 256 and attrs[2].value == 1 and attrs[3].value == C.CKK_RSA
    rv, _ = client.call("C_SetAttributeValue", h, priv, [Attribute(C.CKA_LABEL, b"x")])
    assert rv == C.CKR_ATTRIBUTE_READ_ONLY
    rv, _ = client.call("C_EncryptInit", h, Mechanism(C.CKM_RSA_PKCS, b""), priv)
    assert rv == C.CKR_FUNCTION_NOT_SUPPORTED
    rv, _ = client.call("C_SeedRandom", h, b"seed")
    assert rv == C.CKR_RANDOM_SEED_NOT_SUPPORTED
    (rnd,) = client.ok("C_GenerateRandom", h, 33)
    assert len(rnd.data) == 33
    info = client.ok("C_GetTokenInfo", SLOT_ID)
    assert info[4] & C.CKF_CLOCK_ON_TOKEN and len(info[-1]) == 16


def test_unbound_ecdsa_digest_refused_unless_compat():
    client = RawClient()
    h = client.start()
    (p13,) = client.find(h, Attribute(C.CKA_CLASS, C.CKO_PRIVATE_KEY), Attribute(C.CKA_LABEL, b"k13"))
    client.ok("C_SignInit", h, Mechanism(C.CKM_ECDSA, b""), p13)
    rv, _ = client.call("C_Sign", h, bytes(32), 64)
    assert rv == C.CKR_FUNCTION_REJECTED
    (p14,) = client.find(h, Attribute(C.CKA_CLASS, C.CKO_PRIVATE_KEY), Attribute(C.CKA_LABEL, b"k14"))
    client.ok("C_SignInit", h, Mechanism(C.CKM_ECDSA, b""), p14)
    (sig,) = client.ok("C_Sign", h, bytes(48), 96)
    assert len(sig.data) == 96
    # multi-part digest binds too
    TOKEN = token()
    k13 = TOKEN.key("k13")
    data = make_signing_data(k13, TOKEN.now + 3600, TOKEN.now)
    client.ok("C_DigestInit", h, Mechanism(C.CKM_SHA256, b""))
    client.ok("C_DigestUpdate", h, data[:10])
    client.ok("C_DigestUpdate", h, data[10:])
    (dg,) = client.ok("C_DigestFinal", h, 32)
    client.ok("C_SignInit", h, Mechanism(C.CKM_ECDSA, b""), p13)
    (sig,) = client.ok("C_Sign", h, dg.data, 64)
    assert verify_signature(k13, C.CKM_ECDSA, dg.data, sig.data)


def test_keygen_and_destroy_need_quorum(tmp_path):
    tok = RealToken(tmp_path, keys=(("13", "k13"),), compat=())
    try:
        client = RawClient(tok=tok)
        h = client.start()
        pub_t = [Attribute(C.CKA_EC_PARAMS, bytes.fromhex("06082a8648ce3d030107")), Attribute(C.CKA_LABEL, b"new")]
        rv, _ = client.call("C_GenerateKeyPair", h, Mechanism(C.CKM_EC_KEY_PAIR_GEN, b""), pub_t, [])
        assert rv == C.CKR_FUNCTION_REJECTED  # no quorum window
        assert "open" in tok.quorum("p11window 60 testzone.")[0]
        pub, priv = client.ok("C_GenerateKeyPair", h, Mechanism(C.CKM_EC_KEY_PAIR_GEN, b""), pub_t, [])
        new = tok.key("new")
        assert new.algorithm == 13 and new.zone == "testzone." and priv + 1 == pub
        tok.quorum("p11window 0 testzone.")
        rv, _ = client.call("C_DestroyObject", h, priv)
        assert rv == C.CKR_ACTION_PROHIBITED
        tok.quorum("p11window 60 testzone.")
        client.ok("C_DestroyObject", h, priv)
        assert "new" not in {k.label for k in tok.token.keys()}
    finally:
        tok.close()
