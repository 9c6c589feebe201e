"""C_FindObjects on a token with many keys: by label, id and class, through the stock client.

The lookups run in a child process with python-pkcs11 over p11-kit-client.so against the
daemon (python-pkcs11 loads one module per process). That a lookup's cost does not grow
with the number of keys is checked without a clock: the objects whose attributes a lookup
computes are counted on an embedded token, as ``cryptobat p11-stdio`` serves one.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cryptobat.p11rpc import constants as C
from cryptobat.p11rpc.codec import Attribute
from cryptobat.p11rpc.server import Connection
from support import PIN, ROOT, Daemon, RealToken, SockClient, WireClient, client_module, make_token

N = 120  # keys over ZONES zones
ZONES = 30
KEYS = [f"13 zsk z{i % ZONES}.find.example m{i}" for i in range(N)] + ["8 ksk z0.find.example r0"]

LOOKUPS = r"""
import json, sys, pkcs11
from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11.exceptions import NoSuchKey
lib = pkcs11.lib(sys.argv[1])
out = {}
tok = lib.get_token()
with tok.open() as s:  # not logged in: public objects only
    out["public_before_login"] = len(list(s.get_objects({Attribute.CLASS: ObjectClass.PUBLIC_KEY})))
    out["private_before_login"] = len(list(s.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY})))
with tok.open(user_pin=sys.argv[2]) as s:
    out["by_label"] = [s.get_key(ObjectClass.PRIVATE_KEY, label=l).label for l in ("m0", "m57", "m119", "r0")]
    out["by_id"] = [s.get_key(ObjectClass.PUBLIC_KEY, id=l.encode()).id.decode() for l in ("m1", "m118", "r0")]
    out["both_of_m7"] = sorted(int(o[Attribute.CLASS]) for o in s.get_objects({Attribute.LABEL: "m7"}))
    out["private"] = len(list(s.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY})))
    out["all"] = len(list(s.get_objects()))
    out["rsa_private"] = [o.label for o in s.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY,
                                                          Attribute.KEY_TYPE: KeyType.RSA})]
    out["m5_as_rsa"] = len(list(s.get_objects({Attribute.LABEL: "m5", Attribute.KEY_TYPE: KeyType.RSA})))
    try:
        s.get_key(ObjectClass.PRIVATE_KEY, label="m120")
        out["missing"] = "found"
    except NoSuchKey:
        out["missing"] = "none"
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    home = tmp_path_factory.mktemp("find") / "token"
    d = Daemon(home, codes=make_token(home, maxval=86400, pin=PIN.decode(), keys=KEYS))
    try:
        yield d
    finally:
        d.stop()


def test_lookups_by_label_id_and_class_with_many_keys(daemon):
    r = subprocess.run([sys.executable, "-c", LOOKUPS, client_module(), PIN.decode()], capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, P11_KIT_SERVER_ADDRESS=daemon.address))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["public_before_login"] == N + 1 and out["private_before_login"] == 0
    assert out["by_label"] == ["m0", "m57", "m119", "r0"]
    assert out["by_id"] == ["m1", "m118", "r0"]
    assert out["both_of_m7"] == [C.CKO_PUBLIC_KEY, C.CKO_PRIVATE_KEY]
    assert out["private"] == N + 1 and out["all"] == 2 * (N + 1)
    assert out["rsa_private"] == ["r0"] and out["m5_as_rsa"] == 0
    assert out["missing"] == "none"


def find(client: WireClient, h: int, *template: Attribute) -> list[int]:
    client.ok("C_FindObjectsInit", h, list(template))
    (found,) = client.ok("C_FindObjects", h, 1000)
    client.ok("C_FindObjectsFinal", h)
    return found.data


def test_keys_added_and_deleted_on_the_console_are_found_and_gone(daemon):
    """The index follows the token's keys: a connection open across the change sees it."""
    c = SockClient(daemon.p11)
    try:
        h = c.start()
        assert find(c, h, Attribute(C.CKA_LABEL, b"late")) == []
        out = daemon.quorum("keygen 13 zsk z3.find.example late")[0]
        assert out.startswith("ok: key generated"), out
        assert len(find(c, h, Attribute(C.CKA_LABEL, b"late"))) == 2
        assert len(find(c, h, Attribute(C.CKA_ID, b"late"), Attribute(C.CKA_CLASS, C.CKO_PRIVATE_KEY))) == 1
        assert daemon.quorum("keydel late")[0] == " Key late deleted\n"
        assert find(c, h, Attribute(C.CKA_LABEL, b"late")) == []
        assert len(find(c, h, Attribute(C.CKA_CLASS, C.CKO_PRIVATE_KEY))) == N + 1
        c.ok("C_Logout", h)  # logging out hides the private objects from the index too
        assert find(c, h, Attribute(C.CKA_CLASS, C.CKO_PRIVATE_KEY)) == []
        assert len(find(c, h, Attribute(C.CKA_LABEL, b"m3"))) == 1
    finally:
        c.close()


class Counting(WireClient):
    """The wire protocol straight into a Connection whose module counts attribute computations."""

    def __init__(self, tok: RealToken) -> None:
        super().__init__(0)
        self.conn = Connection(tok.backend())
        assert self.conn.feed(b"\0") == b"\0"
        self.computed = 0
        attributes = self.conn.module.attributes

        def counted(key, private):
            self.computed += 1
            return attributes(key, private)
        self.conn.module.attributes = counted

    def exchange(self, frame: bytes) -> list:
        return self.frames.feed(self.conn.feed(frame))


@pytest.mark.parametrize("keys", [2, 300])
def test_a_lookup_computes_the_attributes_of_its_matches_only(tmp_path, keys):
    tok = RealToken(tmp_path, keys=[("13", f"m{i}") for i in range(keys)], compat=())
    try:
        c = Counting(tok)
        h = c.start()
        assert len(find(c, h, Attribute(C.CKA_LABEL, b"m1"))) == 2  # builds the index: every object once
        assert c.computed == 2 * keys
        for i in range(20):
            c.computed = 0
            label = f"m{i % keys}".encode()
            assert len(find(c, h, Attribute(C.CKA_LABEL, label))) == 2
            assert len(find(c, h, Attribute(C.CKA_ID, label))) == 2
            assert len(find(c, h, Attribute(C.CKA_CLASS, C.CKO_PRIVATE_KEY), Attribute(C.CKA_LABEL, label))) == 1
            assert c.computed == 0  # label, id and class are all looked up in the index
    finally:
        tok.close()


def test_bench_find_rows_run_with_few_keys(tmp_path):
    """bench/p11_bench.py's FindObjects rows keep working (SoftHSMv2 and p11-kit needed: fails without)."""
    out = tmp_path / "rows.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "p11_bench.py"), "--seconds", "0.3", "--kinds", "find",
                        "--find-keys", "20", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "| lookup (python-pkcs11 get_key, 1 client) |" in r.stdout, r.stdout + r.stderr
    rows = json.loads(out.read_text())
    assert [row["mech"] for row in rows] == ["C_FindObjects by label, 2 keys", "C_FindObjects by label, 20 keys",
                                             "C_FindObjects by id, 20 keys"]
    for row in rows:
        assert row["kind"] == "find" and row["cryptobat"]["rate"] > 0 and row["softhsm"]["rate"] > 0, row
        assert row["cryptobat"]["errors"] == 0 and row["softhsm"]["errors"] == 0, row
