"""The TPM 2.0 custody on a real software TPM (swtpm): keys made and used inside the TPM,
the master secret sealed to it (and to PCRs), stolen blobs and other TPMs refused, imports
keeping their key tag, and a whole token signing and refusing over the console."""
from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import dns.dnssec
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest
from tpm2_pytss import ESAPI, TCTILdr, TSS2_Exception
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_RC
from tpm2_pytss.types import TPM2B_DIGEST, TPML_DIGEST_VALUES, TPMT_HA, TPMT_SIG_SCHEME, TPMT_SIGNATURE

from cryptobat import algorithms, bindkey, keystore, policy
from cryptobat.console import Console
from cryptobat.custody import tpm2
from cryptobat.custody.tpm2 import Tpm2Custody
from cryptobat.errors import CryptobatError, IntegrityError, InvalidArgument
from cryptobat.home import close_token, init_token, open_engine, open_token
from support import PIN_TEXT, Officers, Swtpm, configure, need, payload, signing_data, validate

ZONE = "testzone."


@pytest.fixture(scope="module")
def swtpm(tmp_path_factory):
    with Swtpm(tmp_path_factory.mktemp("swtpm")) as t:
        yield t


def _open(home, swtpm, create=False, pcrs=()):
    home.mkdir(exist_ok=True)
    return Tpm2Custody(home, create, {"tcti": swtpm.tcti, "pcrs": pcrs})


@pytest.fixture(scope="module")
def custody(tmp_path_factory):
    """A custody on a TPM of its own: a bare swtpm has no resource manager, and this custody
    keeps the primary and two keys loaded, all three of its object slots."""
    with Swtpm(tmp_path_factory.mktemp("swtpm")) as t:
        c = _open(tmp_path_factory.mktemp("home"), t, create=True)
        yield c
        c.close()


def _rrset() -> dns.rrset.RRset:
    return dns.rrset.from_text("www." + ZONE, 300, "IN", "A", "192.0.2.1", "192.0.2.2")


def _check_signs(key_info, loaded, now=None) -> None:
    """``loaded`` signs the RRSIG signing data of an RRset; dnspython validates it against the DNSKEY."""
    now = now or int(time.time())
    tpl, data = signing_data(key_info, _rrset(), now - 60, now + 3600)
    validate(key_info, _rrset(), tpl, loaded.sign(data), now)


def _raw_esys(swtpm) -> ESAPI:
    return ESAPI(TCTILdr(*swtpm.tcti.split(":", 1)))


def test_create_then_open_across_a_power_cycle(tmp_path, swtpm):
    c = _open(tmp_path, swtpm, create=True)
    public, blob = c.generate(13, b"z")
    info = keystore.make_info("z", ZONE, 13, "zsk", public)
    assert c.describe()["kind"] == "tpm2" and c.describe()["pcrs"] == "none"
    assert c.parallel is False
    moved = c.counter().increment()  # the NV rollback counter, an ordinary index: it survives power
    c.close()
    for name in (tpm2.MASTER_FILE, tpm2.CONFIG_FILE, "nvcounter.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    swtpm.restart()
    c = Tpm2Custody(tmp_path)  # the TCTI from HOME/tpm2.json
    try:
        _check_signs(info, c.load(13, blob, b"z"))
        assert c.counter().read() == moved
        d = c.describe()
        assert d["device"].startswith("IBM firmware") and d["tcti"] == swtpm.tcti
        assert d["objects loaded"].startswith("2 of 3"), d
        assert c.unseal(c.seal(b"x", b"a"), b"a") == b"x"
        with pytest.raises(IntegrityError):
            c.unseal(c.seal(b"x", b"a"), b"b")
        r = c.random(100)
        assert len(r) == 100 and r != c.random(100)
    finally:
        c.close()


@pytest.mark.parametrize("number", [a.number for a in algorithms.SIGNING if a.tpm2])
def test_every_tpm_algorithm_signs_and_validates_against_its_dnskey(custody, number):
    alg = algorithms.by_number(number)
    public, blob = custody.generate(number, b"k")
    info = keystore.make_info("k", ZONE, number, "zsk", public)
    key = custody.load(number, blob, b"k")
    _check_signs(info, key)
    data = b"signing data"
    assert algorithms.verify(number, public, key.sign_digest(hashlib.new(alg.hash, data).digest()), data)
    if alg.signature_len:
        assert len(key.sign(data)) == alg.signature_len
    # the token's rebinding of a new key to its final label keeps working
    rebound = custody.seal(custody.unseal(blob, b"k"), b"final")
    _check_signs(info, custody.load(number, rebound, b"final"))


def test_short_ecdsa_values_are_padded_to_the_curve_width():
    """The TPM drops leading zero bytes of r and s (TPM2B); DNSSEC wants them at full width."""
    sig = TPMT_SIGNATURE(sigAlg=TPM2_ALG.ECDSA)
    sig.signature.ecdsa.hash = TPM2_ALG.SHA384
    sig.signature.ecdsa.signatureR = b"\x01" * 46
    sig.signature.ecdsa.signatureS = b"\x02" * 48
    wire = tpm2._dnssec_signature(algorithms.by_number(14), sig.marshal())
    assert wire == b"\0\0" + b"\x01" * 46 + b"\x02" * 48


@pytest.mark.parametrize("number", [15, 16])
def test_edwards_curves_are_refused_naming_the_custody(custody, number):
    alg = algorithms.by_number(number)
    with pytest.raises(InvalidArgument, match=f"algorithm {number} .* cannot be kept in tpm2 custody .*Edwards"):
        custody.generate(number, b"e")
    with pytest.raises(InvalidArgument, match="tpm2 custody"):
        custody.import_key(number, alg.dnspython.generate().key, b"e")


def test_more_keys_than_the_tpm_has_slots_sign_in_turn(custody):
    keys = []
    for i in range(5):
        public, blob = custody.generate(13, b"k%d" % i)
        keys.append((keystore.make_info(f"k{i}", ZONE, 13, "zsk", public), custody.load(13, blob, b"k%d" % i)))
    for _ in range(3):
        for info, key in keys:
            _check_signs(info, key)
    assert custody.describe()["objects loaded"].startswith("3 of 3")
    with ThreadPoolExecutor(4) as pool:  # the daemon's threads share the custody
        list(pool.map(lambda i: _check_signs(*keys[i % 5]), range(40)))
    info, key = keys[0]
    handle = key.resident()
    assert handle >> 24 == 0x80 and key.handle() == handle
    key.unload()
    assert key.handle() is None
    _check_signs(info, key)  # reloaded on use


def test_a_stolen_blob_signs_nothing_on_the_same_tpm(tmp_path, swtpm):
    """The thief has the store's blob and the TPM, not the master secret: the envelope does not
    open, and even its content (public and private areas) loaded into the TPM cannot sign:
    the key's authValue comes from the master secret, so the TPM answers TPM_RC_BAD_AUTH (TPM_RC_AUTH_FAIL without
    dictionary-attack counting: the keys are noDA)."""
    owner = _open(tmp_path / "owner", swtpm, create=True)
    _, blob = owner.generate(13, b"k")
    public, private, _ = tpm2._unpack(owner.unseal(blob, b"k"))  # as if the envelope were broken
    owner.close()
    thief = _open(tmp_path / "thief", swtpm, create=True)  # its own master, same TPM, same primary
    try:
        with pytest.raises(IntegrityError):
            thief.load(13, blob, b"k")
        forged = tpm2._pack(public, private, os.urandom(32))
        key = thief.load(13, thief.seal(forged, b"k"), b"k")  # the TPM loads the public/private pair...
        with pytest.raises(CryptobatError, match="the TPM refused to sign: .*authorization failure"):
            key.sign(b"data")  # ...but will not use it without the owner's authValue
    finally:
        thief.close()
    esys = _raw_esys(swtpm)  # a bare TPM client: the same primary, the key loaded, no authValue
    try:
        primary, *_ = esys.create_primary(None, tpm2.primary_template(), primary_handle=ESYS_TR.OWNER)
        handle = esys.load(primary, private, public)
        with pytest.raises(TSS2_Exception) as refused:
            esys.sign(handle, TPM2B_DIGEST(hashlib.sha256(b"data").digest()), TPMT_SIG_SCHEME(
                scheme=TPM2_ALG.NULL), tpm2._NULL_TICKET)
        assert refused.value.error == TPM2_RC.BAD_AUTH  # AUTH_FAIL's form for a noDA key
        esys.flush_context(handle)
        esys.flush_context(primary)
    finally:
        esys.close()
    (tmp_path / "owner" / tpm2.MASTER_FILE).rename(tmp_path / "elsewhere")
    with pytest.raises(IntegrityError, match="tpm2-master is missing"):
        _open(tmp_path / "owner", swtpm)


def test_another_tpm_cannot_open_the_token_nor_load_its_keys(tmp_path, swtpm):
    home = tmp_path / "home"
    c = _open(home, swtpm, create=True)
    _, blob = c.generate(13, b"k")
    c.close()
    with Swtpm(tmp_path / "other") as other:
        with pytest.raises(IntegrityError, match="sealed by another TPM"):
            _open(home, other)
        # even with the master secret (the blob content in hand), the other TPM refuses the key
        o = _open(tmp_path / "otherhome", other, create=True)
        try:
            c = _open(home, swtpm)
            content = c.unseal(blob, b"k")
            c.close()
            with pytest.raises(IntegrityError, match="made by another TPM"):
                o.load(13, o.seal(content, b"k"), b"k")
        finally:
            o.close()


def test_a_tpm_out_of_reach_or_bad_pcrs_are_one_line_errors(tmp_path, swtpm):
    with pytest.raises(CryptobatError, match="cannot reach the TPM at swtpm:path=/nonexistent"):
        Tpm2Custody(tmp_path, True, {"tcti": "swtpm:path=/nonexistent/sock"})
    for bad in ("0,x", [24], "-1", [[1]]):
        with pytest.raises(InvalidArgument, match="PCRs must be numbers from 0 to 23"):
            _open(tmp_path, swtpm, create=True, pcrs=bad)
    assert list(tmp_path.iterdir()) == []  # nothing written: the next init starts afresh
    c = Tpm2Custody(tmp_path, True, {"tcti": swtpm.tcti, "pcrs": "7, 0"})
    assert c.pcrs == (0, 7)
    c.close()


def test_a_master_sealed_to_pcrs_does_not_unseal_after_an_extend(tmp_path, swtpm):
    pcrs = [0, 2, 4, 7]
    c = _open(tmp_path, swtpm, create=True, pcrs=pcrs)
    assert c.describe()["pcrs"] == "0,2,4,7"
    public, blob = c.generate(13, b"k")
    c.close()
    _open(tmp_path, swtpm).close()  # same boot state: opens
    esys = _raw_esys(swtpm)
    try:
        measurement = TPMT_HA(hashAlg=TPM2_ALG.SHA256)
        measurement.digest.sha256 = hashlib.sha256(b"another boot loader").digest()
        esys.pcr_extend(ESYS_TR.PCR7, TPML_DIGEST_VALUES([measurement]))
    finally:
        esys.close()
    with pytest.raises(IntegrityError, match="PCRs 0,2,4,7 differ"):
        _open(tmp_path, swtpm)
    swtpm.restart()  # a power cycle resets the PCRs to the values sealed to
    c = _open(tmp_path, swtpm)
    try:
        _check_signs(keystore.make_info("k", ZONE, 13, "zsk", public), c.load(13, blob, b"k"))
    finally:
        c.close()


@pytest.mark.parametrize("args", [("-a", "RSASHA256", "-b", "2048"), ("-a", "RSASHA512", "-b", "3072"),
                                  ("-a", "ECDSAP256SHA256"), ("-a", "ECDSAP384SHA384")])
def test_an_imported_bind_key_keeps_its_dnskey_and_key_tag(tmp_path, custody, args):
    exe = need("dnssec-keygen", "bind9-utils")
    name = subprocess.run([exe, "-K", str(tmp_path), *args, "-n", "ZONE", ZONE], capture_output=True,
                          text=True, check=True, timeout=60).stdout.strip()
    published = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.DNSKEY,
                                    (tmp_path / f"{name}.key").read_text().split("DNSKEY", 1)[1])
    number, private = bindkey.load((tmp_path / f"{name}.private").read_text())
    public, blob = custody.import_key(number, private, b"imported")
    info = keystore.make_info("imported", ZONE, number, "zsk", public)
    assert public == published.key and info.keytag == dns.dnssec.key_id(published)
    _check_signs(info, custody.load(number, blob, b"imported"))


def test_a_whole_token_signs_and_refuses_on_the_console(tmp_path, swtpm):
    home = tmp_path / "token"
    factory = lambda h, create=False: Tpm2Custody(h, create, {"tcti": swtpm.tcti, "pcrs": []})  # noqa: E731
    tok = init_token(home, quorum=2, custody_factory=factory)
    try:
        c = Console(tok)
        officers = Officers(c)
        configure(officers, enrol=("lamb", "jakob"), maxval=3600, pin=PIN_TEXT,
                  keys=("13 zsk testzone z13", "8 ksk testzone k8"))
        assert c.handle("keygen 15 zsk testzone e15").startswith(
            "fail: algorithm 15 (ED25519) cannot be kept in tpm2 custody")
        assert c.handle("tpmloadkey z13").startswith("fail: signing needs the signer PIN")
        c.handle("signerlogin")
        assert c.handle(PIN_TEXT) == "ok: signer logged in\n"
        out = c.handle("tpmloadkey z13")
        handle = out.split("handle=")[1].strip()
        assert out.startswith("ok: key loaded handle=80") and len(handle) == 8, out
        key = tok.key("z13")
        now = tok.now()
        out = c.handle(f"tpmtimedsign {handle} {payload(key, now=now).hex()}")
        assert "ok: signature" in out and out.endswith("DONE\n"), out
        tpl, data = signing_data(key, _rrset(), now - 60, now + 3000)
        out = c.handle(f"tpmtimedsign {handle} {data.hex()}")
        sig = bytes.fromhex("".join(out.split("ok: signature\n")[1].split("DONE")[0].split()))
        validate(key, _rrset(), tpl, sig, now)
        out = c.handle(f"tpmtimedsign {handle} {payload(key, now=now, exp=now + 7200).hex()}")
        assert out.endswith(f"fail: {policy.EXPIRATION_EXCEEDS}\n"), out
        ksk_data = payload(tok.key("k8"), now=now)  # a KSK signing an A RRset: refused by the policy
        h8 = c.handle("tpmloadkey k8").split("handle=")[1].strip()
        assert c.handle(f"tpmtimedsign {h8} {ksk_data.hex()}").endswith(f"fail: {policy.KSK_ONLY}\n")
        assert tok.loaded_key("z13").handle() == int(handle, 16)
        assert c.handle(f"tpmflush {handle}") == "ok: flushed\n"
        assert tok.loaded_key("z13").handle() is None
        assert c.handle(f"tpmtimedsign {handle} {data.hex()}").startswith("fail: no key loaded")
        c.handle("tpmloadkey z13")
        assert c.handle("tpmreset") == "ok: reset\n"
        assert tok.loaded_key("k8").handle() is None and c.handle(f"tpmflush {h8}").startswith("fail:")
        status = tok.custody.describe()
        assert status["kind"] == "tpm2" and "IBM" in status["device"]
        assert len(tok.random(64)) == 64  # C_GenerateRandom: the OS generator and the TPM's mixed
        swtpm.stop()
        with pytest.raises(Exception):  # ... so it does reach the TPM
            tok.random(64)
        swtpm.start()
    finally:
        tok.close()
    tok = open_token(home, custody_factory=factory)
    engine = open_engine(tok)
    try:
        assert engine.workers == 1  # the TPM is used from the token's process only
        key = tok.key("z13")
        now = tok.now()
        tpl, data = signing_data(key, _rrset(), now - 60, now + 3000)
        ksk_data = payload(tok.key("k8"), now=now)  # a KSK signing an A RRset: refused
        results = tok.timed_sign([("z13", data), ("k8", ksk_data)] * 150, run=engine.run)  # a worker-sized batch
        for r in results[::2]:
            validate(key, _rrset(), tpl, r.signature, now)
        assert {r.reason for r in results[1::2]} == {policy.KSK_ONLY}
    finally:
        close_token(tok, engine)
