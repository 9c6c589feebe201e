"""The PKCS#11 custody against a real SoftHSMv2 (its own token directory, a token per test):
keys made, imported and adopted in the HSM sign what validates against their DNSKEY, cannot
be read or wrapped out of it, go when destroyed; a whole token fronts the HSM."""
from __future__ import annotations

import json
import os
import stat

import dns.rdatatype
import dns.rrset
import pkcs11
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11e

from cryptobat import algorithms, keystore
from cryptobat.console import Console
from cryptobat.custody import SoftwareCustody
from cryptobat.custody.pkcs11 import Pkcs11Custody
from cryptobat.errors import CryptobatError, InvalidArgument, NotFound
from cryptobat.home import init_token, open_engine, open_token
from support import PIN_TEXT, Officers, SoftHsm, configure, payload, signing_data, validate

ALGS = (8, 10, 13, 14, 15, 16)  # SoftHSM 2.6 has Ed448 too


@pytest.fixture(scope="module")
def hsm() -> SoftHsm:
    return SoftHsm.shared()


@pytest.fixture()
def cfg(hsm) -> dict:
    return hsm.token()


@pytest.fixture()
def custody(tmp_path, cfg):
    c = Pkcs11Custody(tmp_path, create=True, config=cfg)
    yield c
    c.close()


def _session(cfg: dict):
    """A session of our own on the backing token, straight through python-pkcs11 (logged in:
    PKCS#11 logs in per process, and the custody's session already did)."""
    token = pkcs11.lib(cfg["module"]).get_token(token_label=cfg["token"])
    try:
        return token.open(rw=True, user_pin=cfg["pin"])
    except p11e.UserAlreadyLoggedIn:
        return token.open(rw=True)


def _ckid(custody: Pkcs11Custody, blob: bytes, aad: bytes) -> bytes:
    return bytes.fromhex(json.loads(custody.unseal(blob, aad))["id"])


def _assert_signs(custody, algorithm: int, public: bytes, blob: bytes, aad: bytes) -> None:
    """The key signs an RRset's RRSIG data; dnspython validates it against the DNSKEY."""
    key = keystore.make_info(aad.decode(), "testzone.", algorithm, "zsk", public)
    rrset = dns.rrset.from_text("www.testzone.", 300, "IN", "A", "192.0.2.1", "192.0.2.2")
    now = 1_800_000_000
    tpl, data = signing_data(key, rrset, now - 60, now + 3600)
    validate(key, rrset, tpl, custody.load(algorithm, blob, aad).sign(data), now)


def test_each_algorithm_generates_in_the_hsm_and_validates(tmp_path, cfg, custody):
    reopened = Pkcs11Custody(tmp_path)  # from HOME: pkcs11.json and the PIN file
    try:
        assert reopened.mac_key() == custody.mac_key()
        for alg in ALGS:
            public, blob = custody.generate(alg, b"k%d" % alg)
            _assert_signs(reopened, alg, public, blob, b"k%d" % alg)
        # the token rebinds a new key to its final label: seal(unseal(blob, tmp), final)
        public, blob = custody.generate(13, b"tmp")
        _assert_signs(custody, 13, public, custody.seal(custody.unseal(blob, b"tmp"), b"final"), b"final")
        k = custody.load(13, blob, b"tmp")
        digest = algorithms.by_number(13).hash_algorithm
        assert len(k.sign_digest(b"\1" * digest.digest_size)) == 64
    finally:
        reopened.close()


def test_files_keep_the_pin_apart_and_private(tmp_path, cfg, custody):
    conf = json.loads((tmp_path / "pkcs11.json").read_text())
    assert conf["module"] == cfg["module"] and conf["token"] == cfg["token"] and "pin" not in conf
    assert cfg["pin"] not in (tmp_path / "pkcs11.json").read_text()
    for name in ("pkcs11.json", "pkcs11-pin"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    d = custody.describe()
    assert d["kind"] == "pkcs11" and d["token"] == cfg["token"] and d["module"] == cfg["module"]
    assert "SoftHSM" in d["manufacturer"] and d["serial"]
    assert custody.counter() is None
    r = custody.random(100)
    assert len(r) == 100 and r != custody.random(100)


def test_keys_and_master_secret_cannot_leave_the_hsm(cfg, custody):
    blobs = {alg: custody.generate(alg, b"x")[1] for alg in (8, 13, 15)}
    with _session(cfg) as s:
        secrets = list(s.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY}))
        assert len(secrets) == 1  # the master secret
        wrapper = s.generate_key(KeyType.AES, 256, capabilities=MechanismFlag.WRAP | MechanismFlag.ENCRYPT)
        for obj in [*(s.get_key(ObjectClass.PRIVATE_KEY, id=_ckid(custody, b, b"x")) for b in blobs.values()),
                    *secrets]:
            assert obj[Attribute.SENSITIVE] is True and obj[Attribute.EXTRACTABLE] is False
            assert obj[Attribute.TOKEN] is True
            secret_attr = Attribute.PRIVATE_EXPONENT if obj.key_type == KeyType.RSA else Attribute.VALUE
            with pytest.raises(p11e.AttributeSensitive):
                obj[secret_attr]
            with pytest.raises(p11e.PKCS11Error):  # CKR_KEY_UNEXTRACTABLE
                wrapper.wrap_key(obj, mechanism=Mechanism.AES_KEY_WRAP_PAD)


def test_destroy_removes_both_objects(cfg, custody):
    public, blob = custody.generate(13, b"gone")
    ckid = _ckid(custody, blob, b"gone")
    with _session(cfg) as s:
        assert len(list(s.get_objects({Attribute.ID: ckid}))) == 2
        custody.destroy(blob, b"gone")
        assert list(s.get_objects({Attribute.ID: ckid})) == []
    with pytest.raises(NotFound, match="not on token"):
        custody.load(13, blob, b"gone")


# python-pkcs11 ends the search begun on the lost session in a finaliser, which reports the
# (expected) CKR_SESSION_HANDLE_INVALID as unraisable
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_signing_from_many_threads_and_after_the_hsm_lost_the_session(custody):
    """The daemon signs from several threads; a session the HSM closed (a network HSM restarting)
    is replaced, logged in again, and signing goes on."""
    from concurrent.futures import ThreadPoolExecutor
    keys = {alg: custody.generate(alg, b"t%d" % alg) for alg in (8, 13, 15)}
    work = [alg for alg in keys for _ in range(8)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda alg: _assert_signs(custody, alg, *keys[alg], b"t%d" % alg), work))
    loaded = custody.load(13, keys[13][1], b"t13")
    custody._session.close()  # C_CloseSession under the custody's feet: the app is logged out too
    _assert_signs(custody, 13, *keys[13], b"t13")  # load (C_FindObjects) in a new session
    rrset = dns.rrset.from_text("www.testzone.", 300, "IN", "A", "192.0.2.1")
    key = keystore.make_info("t13", "testzone.", 13, "zsk", keys[13][0])
    tpl, data = signing_data(key, rrset, 1_800_000_000 - 60, 1_800_000_000 + 3600)
    validate(key, rrset, tpl, loaded.sign(data), 1_800_000_000)  # a key loaded before: found again
    custody._session.close()
    validate(key, rrset, tpl, loaded.sign(data), 1_800_000_000)
    assert custody.describe()["objects"].startswith("3 private keys")


def test_wrong_backing_pin_is_one_clear_line(tmp_path, cfg):
    Pkcs11Custody(tmp_path, create=True, config=cfg).close()  # no session of this process stays logged in
    (tmp_path / "pkcs11-pin").write_text("not-the-pin\n")
    with pytest.raises(CryptobatError) as e:
        Pkcs11Custody(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and f"token {cfg['token']!r} refused the backing PIN" in msg, msg


def test_missing_token_label_is_one_clear_line(tmp_path, hsm):
    with pytest.raises(NotFound) as e:
        Pkcs11Custody(tmp_path, create=True, config={"module": hsm.module, "token": "no-such-token", "pin": "1"})
    msg = str(e.value)
    assert "\n" not in msg and "no token labelled 'no-such-token'" in msg, msg
    assert not (tmp_path / "pkcs11.json").exists() and not (tmp_path / "pkcs11-pin").exists()
    with pytest.raises(InvalidArgument, match="needs module, token, pin"):
        Pkcs11Custody(tmp_path, create=True, config={})


def test_the_home_without_its_hsm_objects_opens_nothing(tmp_path, hsm, cfg, custody):
    """pkcs11.json and the PIN pointed at another token (or the master object gone): no master secret."""
    from cryptobat.errors import IntegrityError
    other = hsm.token()
    conf = json.loads((tmp_path / "pkcs11.json").read_text())
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "pkcs11.json").write_text(json.dumps({**conf, "token": other["token"]}))
    (copy / "pkcs11-pin").write_text(other["pin"])
    with pytest.raises(IntegrityError) as e:
        Pkcs11Custody(copy)
    assert "the master secret object" in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "state.db").touch()
    (tmp_path / "pkcs11.json").rename(tmp_path / "moved.json")
    with pytest.raises(IntegrityError, match="pkcs11.json is missing"):
        Pkcs11Custody(tmp_path)


def test_import_keeps_dnskey_and_keytag(tmp_path, cfg, custody):
    (tmp_path / "soft").mkdir()
    soft = SoftwareCustody(tmp_path / "soft", create=True)
    for alg, private in ((8, rsa.generate_private_key(65537, 2048)), (13, ec.generate_private_key(ec.SECP256R1())),
                         (15, ed25519.Ed25519PrivateKey.generate())):
        before, _ = soft.import_key(alg, private, b"i")
        public, blob = custody.import_key(alg, private, b"i")
        assert public == before
        assert keystore.make_info("i", "testzone.", alg, "ksk", public).keytag == \
            keystore.make_info("i", "testzone.", alg, "ksk", before).keytag
        _assert_signs(custody, alg, public, blob, b"i")
        with _session(cfg) as s:
            obj = s.get_key(ObjectClass.PRIVATE_KEY, id=_ckid(custody, blob, b"i"))
            assert obj[Attribute.SENSITIVE] is True and obj[Attribute.EXTRACTABLE] is False


def test_adopt_an_existing_key_pair_by_label(cfg, custody):
    with _session(cfg) as s:
        for label, kt, params in (("ext-ksk", KeyType.EC, algorithms.by_number(13).ec_params),
                                  ("ext-rsa", KeyType.RSA, None)):
            s.generate_keypair(kt, 2048 if params is None else None, id=label.encode(), label=label, store=True,
                               capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
                               public_template={Attribute.EC_PARAMS: params} if params else None,
                               private_template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False})
        s.generate_keypair(KeyType.EC, label="readable", id=b"readable", store=True,
                           capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
                           public_template={Attribute.EC_PARAMS: algorithms.by_number(13).ec_params},
                           private_template={Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True})
        public, blob = custody.adopt("ext-ksk")
        _assert_signs(custody, 13, public, blob, b"ext-ksk")
        public, blob2 = custody.adopt("ext-rsa", algorithm=10, aad=b"zsk")
        _assert_signs(custody, 10, public, blob2, b"zsk")
        with pytest.raises(InvalidArgument, match="not a key of algorithm 14"):
            custody.adopt("ext-ksk", algorithm=14)
        with pytest.raises(InvalidArgument, match="not sensitive"):
            custody.adopt("readable")
        with pytest.raises(NotFound, match="no private key labelled 'nope'"):
            custody.adopt("nope")
        custody.destroy(blob, b"ext-ksk")  # made outside the token: left in the HSM
        assert s.get_key(ObjectClass.PRIVATE_KEY, label="ext-ksk")


def test_a_mechanism_the_hsm_lacks_is_refused_naming_the_custody(custody):
    custody._mechanisms.discard(Mechanism.EC_EDWARDS_KEY_PAIR_GEN)  # as on an HSM without Ed25519
    with pytest.raises(InvalidArgument, match=r"algorithm 15 \(ED25519\) cannot be kept in pkcs11 custody"):
        custody.generate(15, b"x")


def test_a_whole_token_fronts_the_hsm(tmp_path, cfg):
    home = tmp_path / "token"

    def factory(h, create=False):
        return Pkcs11Custody(h, create, cfg)

    tok = init_token(home, quorum=2, custody_factory=factory)
    try:
        console = Console(tok)
        configure(Officers(console), enrol=("lamb", "jakob"), maxval=3600, pin=PIN_TEXT,
                  keys=("13 zsk testzone k13", "8 zsk testzone k8"))
        assert "custody pkcs11" in console.handle("status")
        console.handle("signerlogin")  # the PIN on the next line
        assert console.handle(PIN_TEXT) == "ok: signer logged in\n"
        now = tok.now()
        for label in ("k13", "k8"):
            k = tok.key(label)
            handle = console.handle(f"tpmloadkey {label}").split("handle=")[1].strip()
            data = payload(k, now=now)
            out = console.handle(f"tpmtimedsign {handle} {data.hex()}")
            assert "ok: signature" in out, out
            sig = bytes.fromhex("".join(out.split("ok: signature\n")[1].split("DONE")[0].split()))
            algorithms.public_key_of(k.dnskey()).verify(sig, data)
            out = console.handle(f"tpmtimedsign {handle} {payload(k, now=now, exp=now + 7200).hex()}")
            assert "fail:" in out and "ok: signature" not in out, out
    finally:
        tok.close()
    tok = open_token(home, Pkcs11Custody)  # the daemon's way: from HOME alone
    engine = open_engine(tok, workers=2)  # worker processes open the module and log in themselves
    try:
        k = tok.key("k13")
        now = tok.now()
        data = [payload(k, now=now, rrs=[("www.testzone.", dns.rdatatype.A, 1, 300, bytes([192, 0, 2, i % 250]))])
                for i in range(300)]
        res = tok.timed_sign([("k13", d) for d in data], run=engine.run)
        pub = algorithms.public_key_of(k.dnskey())
        for d, r in zip(data, res):
            assert r.ok, r.reason
            pub.verify(r.signature, d)
        assert tok.custody.name == "pkcs11" and not (home / "master.key").exists()
    finally:
        engine.close()
        tok.close()
    assert os.environ["SOFTHSM2_CONF"]
