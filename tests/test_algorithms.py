"""The algorithm table against the standards, and against the rest of the source.

Numbers and mnemonics per RFC 8624, EC parameters per the curves' OIDs as cryptography
names them, DigestInfo prefixes per what PKCS#1 v1.5 signatures really carry, lengths per
the keys and signatures the token makes; ``verify`` against the token's signatures and
the RFC 5702 / 8080 / 6605 examples of ``test_vectors``; and no module but the table compares
against, lists or keys a dict by algorithm numbers.
"""
from __future__ import annotations

import ast
import hashlib
import re
from pathlib import Path

import dns.dnssec
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.x509.oid import PublicKeyAlgorithmOID

from cryptobat import algorithms, bindkey, keystore
from cryptobat.custody import SoftwareCustody
from cryptobat.errors import InvalidArgument
from cryptobat.p11rpc import constants as C
from support import load_vectors, vector_rr, vector_rrset

SRC = Path(algorithms.__file__).parent

# RFC 8624 §3.1 (IANA "DNS Security Algorithm Numbers" mnemonics)
RFC8624 = {5: "RSASHA1", 7: "RSASHA1NSEC3SHA1", 8: "RSASHA256", 10: "RSASHA512",
           13: "ECDSAP256SHA256", 14: "ECDSAP384SHA384", 15: "ED25519", 16: "ED448"}
SIGNING = (8, 10, 13, 14, 15, 16)


def test_numbers_and_mnemonics_are_rfc8624():
    assert {a.number: a.mnemonic for a in algorithms.TABLE.values()} == RFC8624
    assert list(algorithms.TABLE) == sorted(RFC8624)
    for a in algorithms.TABLE.values():
        assert dns.dnssec.algorithm_to_text(a.number) == a.mnemonic


def test_what_the_token_does_with_each_algorithm():
    rows = algorithms.TABLE.values()
    assert [a.number for a in rows if a.generate] == list(SIGNING)
    assert [a.number for a in rows if a.sign] == list(SIGNING)
    assert [a.number for a in algorithms.SIGNING] == list(SIGNING)
    assert [a.number for a in rows if a.tpm2] == [8, 10, 13, 14]
    assert {a.number: a.mnemonic for a in rows if a.generate} == {n: RFC8624[n] for n in SIGNING}


def test_kinds_hashes_and_curves():
    kinds = {a.number: (a.kind, a.hash) for a in algorithms.TABLE.values()}
    assert kinds == {5: ("rsa", "sha1"), 7: ("rsa", "sha1"), 8: ("rsa", "sha256"), 10: ("rsa", "sha512"),
                     13: ("ecdsa", "sha256"), 14: ("ecdsa", "sha384"), 15: ("eddsa", None), 16: ("eddsa", None)}
    for a in algorithms.TABLE.values():
        if a.hash:
            assert a.hash_len == hashlib.new(a.hash).digest_size == a.hash_algorithm.digest_size
            assert a.dnspython.public_cls.chosen_hash.name == a.hash_algorithm.name
        if a.kind == "ecdsa":
            assert a.dnspython.public_cls.curve.name == a.curve.name
        if a.kind == "rsa":
            assert a.key_bits == (1024, 4096) and a.rsa_default_bits == 2048
            assert a.public_key_len is None and a.signature_len is None and a.ec_params is None


def _oid_der(dotted: str) -> bytes:
    """DER OBJECT IDENTIFIER (X.690 §8.19), to check the table's bytes independently of it."""
    arcs = [int(x) for x in dotted.split(".")]
    body = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        while arc > 0x7F:
            arc >>= 7
            chunk.append(0x80 | (arc & 0x7F))
        body += bytes(reversed(chunk))
    return bytes([0x06, len(body)]) + bytes(body)


@pytest.mark.parametrize("number,oid,private", [
    (13, ec.EllipticCurveOID.SECP256R1, lambda: ec.generate_private_key(ec.SECP256R1())),
    (14, ec.EllipticCurveOID.SECP384R1, lambda: ec.generate_private_key(ec.SECP384R1())),
    (15, PublicKeyAlgorithmOID.ED25519, ed25519.Ed25519PrivateKey.generate),
    (16, PublicKeyAlgorithmOID.ED448, ed448.Ed448PrivateKey.generate),
])
def test_ec_params_are_the_curve_oids(number, oid, private):
    a = algorithms.by_number(number)
    assert a.ec_params == _oid_der(oid.dotted_string)
    spki = private().public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    assert a.ec_params in spki
    assert algorithms.by_ec_params(a.ec_params) is a
    for alias in a.ec_params_aliases:
        assert algorithms.by_ec_params(alias) is a


def test_ec_params_lookup():
    assert algorithms.by_ec_params(b"\x13\x0cedwards25519").number == 15
    assert algorithms.by_ec_params(b"\x13\x0aedwards448").number == 16
    assert algorithms.by_ec_params(_oid_der(ec.EllipticCurveOID.SECP521R1.dotted_string)) is None
    assert algorithms.by_ec_params(b"") is None


@pytest.mark.parametrize("number", [5, 7, 8, 10])
def test_digest_info_is_what_pkcs1_signatures_carry(number):
    a = algorithms.by_number(number)
    key = rsa.generate_private_key(65537, 1024)
    digest = hashlib.new(a.hash, b"data").digest()
    sig = key.sign(digest, padding.PKCS1v15(), Prehashed(a.hash_algorithm))
    assert key.public_key().recover_data_from_signature(sig, padding.PKCS1v15(), None) == a.digest_info + digest
    assert a.digest_info[-1] == a.hash_len


def test_pkcs11_numbers_match_the_rpc_layer():
    names = [n for n in vars(algorithms) if n.startswith(("CKM_", "CKK_"))]
    shared = [n for n in names if hasattr(C, n)]
    assert len(shared) >= len(names) - 1  # CKM_SHA1_RSA_PKCS: the RPC layer offers no SHA-1 signing
    for n in shared:
        assert getattr(algorithms, n) == getattr(C, n), n
    for a in algorithms.TABLE.values():
        assert a.mech_keygen in (C.CKM_RSA_PKCS_KEY_PAIR_GEN, C.CKM_EC_KEY_PAIR_GEN, C.CKM_EC_EDWARDS_KEY_PAIR_GEN)
        assert a.p11_key_type == {"rsa": C.CKK_RSA, "ecdsa": C.CKK_EC, "eddsa": C.CKK_EC_EDWARDS}[a.kind]
        assert a.mech_hash_sign == {"rsa": C.CKM_RSA_PKCS, "ecdsa": C.CKM_ECDSA, "eddsa": None}[a.kind]


def test_by_name_accepts_what_keygen_accepts():
    assert algorithms.by_name("8").number == 8
    assert algorithms.by_name("rsasha256").number == 8
    assert algorithms.by_name("ECDSAP384SHA384").number == 14
    assert algorithms.by_name("Ed448").number == 16
    assert keystore.parse_algorithm("ed25519") == 15
    for bad in ("5", "RSASHA1", "7", "3", "99", "", "RSA", "-8"):
        with pytest.raises(InvalidArgument) as e:
            algorithms.by_name(bad)
        assert str(e.value) == (f"unsupported algorithm {bad!r}; use one of 8 (RSASHA256), 10 (RSASHA512), "
                                f"13 (ECDSAP256SHA256), 14 (ECDSAP384SHA384), 15 (ED25519), 16 (ED448)")


def test_by_number():
    assert algorithms.by_number(5).mnemonic == "RSASHA1"
    for bad in (0, 3, 6, 12, 17, 253):
        with pytest.raises(InvalidArgument):
            algorithms.by_number(bad)


def test_keystore_errors_are_invalid_argument():
    for call in (lambda: keystore.parse_role("boss"), lambda: keystore.parse_zone("a..b"),
                 lambda: keystore.parse_algorithm("GOST")):
        with pytest.raises(InvalidArgument):
            call()


def test_private_key_implies_algorithm():
    assert bindkey.algorithm_of(rsa.generate_private_key(65537, 1024)) == 8
    assert bindkey.algorithm_of(ec.generate_private_key(ec.SECP256R1())) == 13
    assert bindkey.algorithm_of(ec.generate_private_key(ec.SECP384R1())) == 14
    assert bindkey.algorithm_of(ed25519.Ed25519PrivateKey.generate()) == 15
    assert bindkey.algorithm_of(ed448.Ed448PrivateKey.generate()) == 16
    assert bindkey.algorithm_of(ec.generate_private_key(ec.SECP521R1())) == 0


@pytest.fixture(scope="module")
def custody(tmp_path_factory):
    return SoftwareCustody(tmp_path_factory.mktemp("custody"), create=True)


@pytest.mark.parametrize("number", SIGNING)
def test_token_signatures_verify_and_have_the_table_lengths(custody, number):
    a = algorithms.by_number(number)
    public, blob = custody.generate(number, b"k")
    key = custody.load(number, blob, b"k")
    data = b"signing data for " + a.mnemonic.encode()
    sig = key.sign(data)
    if a.public_key_len is not None:
        assert len(public) == a.public_key_len and len(sig) == a.signature_len
    else:
        assert len(sig) * 8 == a.rsa_default_bits
    assert algorithms.verify(number, public, sig, data)
    assert not algorithms.verify(number, public, sig, data + b".")
    assert not algorithms.verify(number, public, sig[:-1] + bytes([sig[-1] ^ 1]), data)
    assert not algorithms.verify(number, public, sig[:-1], data)
    assert not algorithms.verify(number, public[:-1], sig, data)
    assert not algorithms.verify(number, public + b"\0", sig, data)
    assert not algorithms.verify(99, public, sig, data)
    if a.hash:  # hash-only (PKCS#11 compat) signing yields the same DNSSEC signature format
        assert algorithms.verify(number, public, key.sign_digest(hashlib.new(a.hash, data).digest()), data)


@pytest.mark.parametrize("number", [5, 7])
def test_sha1_signatures_verify(number):
    """The token does not make them, but reads them: a SHA-1 signature dnspython makes verifies."""
    cls = algorithms.by_number(number).dnspython
    key = cls.generate(1024)
    public = key.public_key().encode_key_bytes()
    assert algorithms.verify(number, public, key.sign(b"data"), b"data")
    assert not algorithms.verify(8, public, key.sign(b"data"), b"data")


def _examples():
    for name in ("rfc5702.json", "rfc8080.json", "rfc6605.json"):
        for ex in load_vectors(name):
            yield pytest.param(ex, id=f"{name[:-5]}-{ex['section']}-{ex['key_tag']}")


@pytest.mark.parametrize("ex", _examples())
def test_rfc_examples_verify(ex):
    dnskey = vector_rr(ex["dnskey"])[0]
    rrsig = vector_rr(ex["rrsig"])[0]
    data = dns.dnssec._make_rrsig_signature_data(vector_rrset(ex["rrset"]), rrsig.replace(signature=b""))
    assert algorithms.verify(dnskey.algorithm, dnskey.key, rrsig.signature, data)
    assert not algorithms.verify(dnskey.algorithm, dnskey.key, rrsig.signature, data[:-1])
    assert algorithms.public_key_of(dnskey).encode_key_bytes() == dnskey.key


# --- every algorithm number the source compares against is in the table ---------------------
_ALG_NAMES = {"alg", "algorithm"}
# module-level tables keyed by (or listing) algorithm numbers
_TABLE_NAMES = re.compile(r"_?(RSA|ALG_\w+|\w*CURVES|SIG_LEN|SUPPORTED|FULL_SIGN|HASH_SIGN|HASH_LEN|DIGEST_INFO)")


def _ints(node: ast.AST) -> set[int]:
    """The int constants of a literal number or an all-int tuple/list/set."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return {node.value}
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and node.elts and all(
            isinstance(e, ast.Constant) and type(e.value) is int for e in node.elts):
        return {e.value for e in node.elts}
    return set()


def _is_alg(node: ast.AST) -> bool:
    return (isinstance(node, ast.Name) and node.id in _ALG_NAMES) or (
        isinstance(node, ast.Attribute) and node.attr == "algorithm")


def _algorithm_numbers(tree: ast.AST) -> set[int]:
    found: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(_is_alg(o) for o in operands):
                for o in operands:
                    found |= _ints(o)
        elif isinstance(node, ast.Assign) and any(_is_alg(t) for t in node.targets):
            found |= _ints(node.value)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [t.id for t in targets if isinstance(t, ast.Name)]
            if node.value is not None and any(_TABLE_NAMES.fullmatch(n) for n in names):
                if not isinstance(node.value, ast.Constant):  # a tuple of numbers, not a scalar
                    found |= _ints(node.value)
                for sub in ast.walk(node.value):
                    if isinstance(sub, ast.Dict):  # int keys, and values that list numbers
                        found |= {k.value for k in sub.keys if isinstance(k, ast.Constant) and type(k.value) is int}
                        found |= {n for v in sub.values if not isinstance(v, ast.Constant) for n in _ints(v)}
    return found


def _algorithm_dicts(tree: ast.AST) -> list[int]:
    """Lines of dict literals keyed by two or more algorithm numbers of the table."""
    return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Dict)
            and len(keys := [k.value for k in node.keys if isinstance(k, ast.Constant)]) >= 2
            and all(type(k) is int and k in algorithms.TABLE for k in keys)]


def test_no_algorithm_number_outside_the_table():
    """Every algorithm fact lives in algorithms.py: no other module compares an algorithm
    against a number, lists algorithm numbers or keys a dict by them."""
    found: dict[str, object] = {}
    for path in sorted(SRC.rglob("*.py")):
        if path.name == "algorithms.py":
            continue
        tree = ast.parse(path.read_text(), str(path))
        if numbers := _algorithm_numbers(tree):
            found[f"{path.relative_to(SRC)}: numbers"] = sorted(numbers)
        if lines := _algorithm_dicts(tree):
            found[f"{path.relative_to(SRC)}: dicts at lines"] = lines
    assert not found, f"algorithm facts outside the table: {found}"


def test_scan_catches_a_stray_algorithm():
    tree = ast.parse("if key.algorithm in (8, 12):\n    pass\nALG_X = {3: 'dsa', 4: (1,)}\nalg = 6\n"
                     "SIG_LEN = {17: 64}\n_RSA = (5, 9)\nCKM_RSA_X = 40\n")
    assert _algorithm_numbers(tree) == {8, 12, 3, 4, 1, 6, 17, 5, 9}
    assert _algorithm_dicts(ast.parse("X = {8: 'a', 13: 'b'}\nY = {1: 2, 8: 3}\nZ = {13: 1}\n")) == [1]
