"""``custodymigrate``: a software token's keys into a TPM 2.0 (swtpm) or an HSM (SoftHSM) under
quorum, DNSKEYs and key tags unchanged, the software master key destroyed, and a kill -9
between any two steps leaving a token that opens (still software, or fully migrated)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import dns.dnssec
import dns.name
import dns.rrset
import pytest

from cryptobat import migration
from cryptobat.console import Console
from cryptobat.custody import tpm2
from cryptobat.errors import CryptobatError, IntegrityError
from cryptobat.home import init_token, open_token
from cryptobat.client import SocketClient
from support import (PIN_TEXT, SOFTHSM_MODULE, Codes, Daemon, Officers, SoftHsm, Swtpm, cli, configure,
                     signing_data)

ZONE = "testzone."
KEYS = ("13 zsk testzone z13", "8 ksk testzone k8")


@pytest.fixture(scope="module")
def swtpm(tmp_path_factory):
    with Swtpm(tmp_path_factory.mktemp("swtpm")) as t:
        yield t


def _rrset() -> dns.rrset.RRset:
    return dns.rrset.from_text("www." + ZONE, 300, "IN", "A", "192.0.2.1")


def _published(tok) -> dns.rrset.RRset:
    """The zone's DNSKEY RRset as published from the token (before the migration)."""
    return dns.rrset.from_rdata(dns.name.from_text(ZONE), 300, *(k.dnskey() for k in tok.keys()))


def _signs_under(tok, dnskeys: dns.rrset.RRset, label: str = "z13") -> None:
    """The token signs through its policy; dnspython validates against ``dnskeys``."""
    key, now = tok.key(label), tok.now()
    tpl, data = signing_data(key, _rrset(), now - 60, now + 1800)
    result, = tok.timed_sign([(label, data)])
    assert result.ok, result
    dns.dnssec.validate_rrsig(_rrset(), tpl.replace(signature=result.signature),
                              {dns.name.from_text(ZONE): dnskeys}, now=now)


def _software_token(home: Path, quorum: int = 2, keys=KEYS) -> tuple[Officers, dns.rrset.RRset]:
    tok = init_token(home, quorum=quorum, kind="software")
    officers = Officers(Console(tok))
    configure(officers, enrol=("lamb", "jakob")[:quorum], quorum=quorum, maxval=3600, pin=PIN_TEXT, keys=keys)
    return officers, _published(tok)


def _set_passphrase(c: Console, name: str, text: str) -> None:
    c.handle(f"copass {name}")
    c.handle(text)
    assert c.handle(text) == f" Passphrase set for CO {name}\n"


def _login_with_passphrase(officers: Officers, name: str, text: str) -> None:
    c = officers.console
    c.handle(f"cologin {name} {officers.code(name)}")
    assert c.secret_input  # the console asks for the passphrase
    assert c.handle(text) == f" CO {name} Ok\n"


def _kind(home: Path) -> str:
    return json.loads((home / "custody.json").read_text())["kind"]


def test_tpm2_migration_keeps_dnskeys_officers_and_pin(tmp_path, swtpm):
    home = tmp_path / "t"
    officers, published = _software_token(home)
    c, tok = officers.console, officers.console.token
    _set_passphrase(c, "lamb", "horse battery staple")
    tags = {k.label: k.keytag for k in tok.keys()}
    c.handle("coreset")
    assert c.handle(f"custodymigrate tpm2:{swtpm.tcti}").startswith(" Configuration disabled")  # nobody here
    _login_with_passphrase(officers, "lamb", "horse battery staple")
    officers.login("jakob")
    out = c.handle(f"custodymigrate tpm2:{swtpm.tcti}")
    assert out.startswith("ok: custody migrated to tpm2") and f"z13={tags['z13']}" in out, out
    assert tok.custody.name == "tpm2" and {k.label: k.keytag for k in tok.keys()} == tags
    assert not (home / "master.key").exists() and not (home / migration.NEXT_FILE).exists()
    assert _kind(home) == "tpm2"
    _signs_under(tok, published)
    entry = [json.loads(e) for e in tok.audit_tail(50) if "custody-migrated" in e][-1]
    assert entry["from"] == "software" and entry["to"] == "tpm2"
    assert sorted(k["keytag"] for k in entry["keys"]) == sorted(tags.values())
    tok.close()

    tok = open_token(home)  # opened as custody.json now says: the TPM, through tpm2.json's TCTI
    try:
        assert tok.custody.name == "tpm2" and tok.rollback_values()[0] == tok.rollback_values()[1]
        officers.console = c = Console(tok)
        _login_with_passphrase(officers, "lamb", "horse battery staple")  # sealed TOTP secret, kept pepper
        officers.login("jakob")
        c.handle("signerlogin")
        assert c.handle(PIN_TEXT) == "ok: signer logged in\n"  # the PIN hash checks with the kept pepper
        _signs_under(tok, published)
        assert c.handle(f"custodymigrate tpm2:{swtpm.tcti}").startswith("fail: this token's keys are in tpm2 custody")
        assert c.handle("custodymigrate software").startswith("fail: this token's keys are in tpm2 custody")
    finally:
        tok.close()


def test_cryptobat_console_migrates_a_token_into_the_tpm(tmp_path, swtpm):
    """The whole path an operator takes: ``cryptobat init``, ``cryptobat console``, ``status``."""
    home = tmp_path / "t"
    codes = Codes()
    assert cli("init", "--quorum", "1", "--custody", "software", home=home).returncode == 0
    codes.enrol("solo", cli("console", home=home, input="coadd solo\n").stdout)

    def console(*lines: str) -> str:
        r = cli("console", home=home, input="".join(f"{x}\n" for x in (f"cologin solo {codes('solo')}", *lines)))
        assert " CO solo Ok" in r.stdout, r.stdout + r.stderr
        return r.stdout

    assert console("setmaxval 3600", f"setpin {PIN_TEXT}", "keygen 13 zsk testzone z13").count("ok:") == 1
    tok = open_token(home)
    published, tag = _published(tok), tok.key("z13").keytag
    tok.close()
    out = console(f"custodymigrate tpm2:{swtpm.tcti}")
    assert f"ok: custody migrated to tpm2; keys moved (label=tag): z13={tag}; master.key destroyed" in out, out
    status = cli("status", home=home).stdout
    assert "tpm2" in status, status
    tok = open_token(home)
    try:
        _signs_under(tok, published)
    finally:
        tok.close()


def test_a_running_daemon_signs_through_the_tpm_after_migrating_on_its_console(tmp_path, swtpm):
    """Migrated on the daemon's own console socket: its signers go on, large batches included
    (the worker processes that held the software custody are replaced), and the signatures
    validate against the DNSKEY RRset published before."""
    home = tmp_path / "t"
    officers, published = _software_token(home)
    officers.console.token.close()
    d = Daemon(home, codes=officers)
    try:
        out = d.quorum(f"custodymigrate tpm2:{swtpm.tcti}")
        assert any("ok: custody migrated to tpm2" in line for line in out), out
        signer = SocketClient(str(home / "native.sock"), pin=PIN_TEXT)
        try:
            key = {k.label: k for k in signer.keys()}["z13"]
            now = int(time.time())
            tpl, data = signing_data(key, _rrset(), now - 60, now + 1800)
            results = signer.timed_sign([("z13", data)] * 300)  # a batch for the worker engine
            assert all(r.ok for r in results), results[0]
            dns.dnssec.validate_rrsig(_rrset(), tpl.replace(signature=results[-1].signature),
                                      {dns.name.from_text(ZONE): published}, now=now)
        finally:
            signer.close()
        assert not (home / "master.key").exists()
    finally:
        d.stop()


def test_the_hsm_pin_file_is_read_only_after_the_quorum_and_only_a_regular_file(tmp_path):
    """Anyone at a console could otherwise make the daemon read a path of their choosing (a FIFO
    would hang it, /dev/zero fill it) before any officer approved anything."""
    officers, _ = _software_token(tmp_path / "t")
    c = officers.console
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    lone = Console(c.token)  # nobody logged in
    out = lone.handle(f"custodymigrate pkcs11:{SOFTHSM_MODULE} tok {fifo}")
    assert "not a regular file" not in out and "cannot read" not in out, out  # not read: no quorum
    out = c.handle(f"custodymigrate pkcs11:{SOFTHSM_MODULE} tok {fifo}")  # the quorum: read now, refused
    assert out.startswith("fail:") and "not a regular file" in out, out
    assert _kind(tmp_path / "t") == "software"
    c.token.close()


def test_pkcs11_migration_through_the_console_command(tmp_path):
    hsm = SoftHsm.shared().token()
    home = tmp_path / "t"
    officers, published = _software_token(home, quorum=1)
    c, tok = officers.console, officers.console.token
    pin_file = tmp_path / "hsm-pin"
    pin_file.write_text(hsm["pin"] + "\n")
    assert c.handle(f"custodymigrate pkcs11:{hsm['module']} {hsm['token']}").startswith("fail: usage:")
    out = c.handle(f"custodymigrate pkcs11:{hsm['module']} {hsm['token']} {pin_file}")
    assert out.startswith("ok: custody migrated to pkcs11"), out
    assert hsm["pin"] not in json.dumps(tok.audit_tail(50))
    _signs_under(tok, published)
    tok.close()
    tok = open_token(home)
    try:
        assert tok.custody.name == "pkcs11"
        _signs_under(tok, published)
    finally:
        tok.close()


def test_a_planted_next_custody_file_does_not_switch_off_the_lost_commit_check(tmp_path):
    """custody.next.json on a token migrated long ago (no master.key left): the commit marker is
    not moved to whatever head the store has, so a store that lost acknowledged changes is still
    refused (on pkcs11 custody no rollback counter would catch it)."""
    import shutil
    hsm = SoftHsm.shared().token()
    home = tmp_path / "t"
    officers, _ = _software_token(home, quorum=1)
    c, tok = officers.console, officers.console.token
    (tmp_path / "pin").write_text(hsm["pin"] + "\n")
    assert c.handle(f"custodymigrate pkcs11:{hsm['module']} {hsm['token']} {tmp_path / 'pin'}").startswith("ok:")
    tok.close()
    backup = tmp_path / "backup"
    backup.mkdir()
    for name in ("state.db", "state.db-wal"):
        if (home / name).exists():
            shutil.copy2(home / name, backup / name)
    tok = open_token(home)
    tok.audit("note", what="an acknowledged change the copy does not have")
    tok.close()
    for name in ("state.db", "state.db-wal", "state.db-shm"):
        (home / name).unlink(missing_ok=True)
    for f in backup.iterdir():
        shutil.copy2(f, home / f.name)
    with pytest.raises(IntegrityError, match="lost"):
        open_token(home)
    (home / migration.NEXT_FILE).write_text(json.dumps({"kind": "pkcs11"}))
    with pytest.raises(IntegrityError):
        open_token(home)


def test_a_key_the_target_cannot_hold_aborts_the_whole_migration(tmp_path, swtpm):
    home = tmp_path / "t"
    officers, published = _software_token(home, quorum=1, keys=KEYS + ("15 zsk testzone e15",))
    c, tok = officers.console, officers.console.token
    before = tok.snapshot()
    assert c.handle("custodymigrate software").startswith("fail: a software token migrates to tpm2 or pkcs11")
    assert c.handle("custodymigrate hsm:x").startswith("fail: unknown custody 'hsm'")
    assert c.handle("custodymigrate tpm2 pcrs").startswith("fail: usage: custodymigrate")
    assert c.handle("custodymigrate tpm2 pcrs 0,99").startswith("fail: --pcrs takes PCR numbers")
    assert c.handle(f"custodymigrate pkcs11:/nonexistent.so T {home}/none").startswith("fail: cannot read the PIN")
    out = c.handle(f"custodymigrate tpm2:{swtpm.tcti}")
    assert out.startswith("fail: algorithm 15 (ED25519) cannot be kept in tpm2 custody"), out
    assert tok.custody.name == "software" and tok.snapshot().keys == before.keys
    assert (home / "master.key").exists() and _kind(home) == "software"
    assert not any((home / n).exists() for n in (*migration.TARGET_FILES["tpm2"], migration.NEXT_FILE))
    _signs_under(tok, published)
    tok.close()


def test_the_target_files_named_are_the_custodies_own():
    from cryptobat.custody import pkcs11
    from cryptobat.custody import nvcounter
    assert migration.TARGET_FILES["tpm2"] == (tpm2.MASTER_FILE, tpm2.CONFIG_FILE, nvcounter.COUNTER_FILE)
    assert migration.TARGET_FILES["pkcs11"] == (pkcs11.CONFIG, pkcs11.PIN_FILE)


# ------------------------------------------------------------------ a kill between the steps

CHILD = """
import os, sys
from cryptobat import migration, store
from cryptobat.home import open_token
from cryptobat.quorum import Approval, Approver
home, tcti, where, when = sys.argv[1:5]
owner = store.Store if where == "rekey" else migration
name = where
original = getattr(owner, name)
def crash(*a, **k):
    if when == "before":
        os._exit(9)
    original(*a, **k)
    os._exit(9)
setattr(owner, name, crash)
tok = open_token(home)
tok.custodymigrate("tpm2", {"tcti": tcti, "pcrs": []}, Approval((Approver("lamb", "local#1"),)), migration)
print("not killed")
"""

# (function, before/after): every gap between two steps of the migration
CRASHES = [("prepare_target", "after"), ("reseal", "after"), ("write_next", "before"), ("write_next", "after"),
           ("rekey", "before"), ("rekey", "after"), ("finish", "before"), ("destroy_master", "before"),
           ("destroy_master", "after")]


@pytest.mark.parametrize("where,when", CRASHES)
def test_a_kill_between_any_two_steps_leaves_a_token_that_opens(tmp_path, where, when):
    # a TPM of its own: a bare swtpm keeps the objects a killed process had loaded
    with Swtpm(tmp_path / "swtpm") as swtpm:
        _kill_between(tmp_path / "t", swtpm, where, when)


def _kill_between(home: Path, swtpm: Swtpm, where: str, when: str) -> None:
    officers, published = _software_token(home, quorum=1)
    tags = {k.label: k.keytag for k in officers.console.token.keys()}
    officers.console.token.close()
    run = subprocess.run([sys.executable, "-c", CHILD, str(home), swtpm.tcti, where, when],
                         capture_output=True, text=True, timeout=120, env=os.environ)
    assert run.returncode == 9, run.stderr[-2000:]
    committed = (where, when) in {("rekey", "after"), ("finish", "before"), ("destroy_master", "before"),
                                  ("destroy_master", "after")}
    tok = open_token(home)
    try:
        assert tok.custody.name == ("tpm2" if committed else "software"), (where, when)
        assert not (home / migration.NEXT_FILE).exists() and (home / "master.key").exists() != committed
        assert _kind(home) == tok.custody.name and {k.label: k.keytag for k in tok.keys()} == tags
        if (where, when) in {("write_next", "after"), ("rekey", "before")}:  # undone at open, and audited
            assert not any((home / n).exists() for n in migration.TARGET_FILES["tpm2"])
        if (where, when) not in {("prepare_target", "after"), ("reseal", "after"), ("write_next", "before"),
                                 ("destroy_master", "after")}:  # (nothing was left half done)
            assert any("custody-resumed" in e for e in tok.audit_tail(5)), (where, when)
        officers.console = c = Console(tok)
        officers.login("lamb")  # the officer's sealed TOTP secret opens under whichever custody
        c.handle("signerlogin")
        assert c.handle(PIN_TEXT) == "ok: signer logged in\n"
        _signs_under(tok, published)
        if not committed:  # and the migration can be run again, the leftovers of the first gone
            assert c.handle(f"custodymigrate tpm2:{swtpm.tcti}").startswith("ok: custody migrated to tpm2")
            _signs_under(tok, published)
    finally:
        tok.close()


# --- a custody that never came to be leaves nothing in its device ---

def _nv_indices(swtpm: Swtpm) -> set[int]:
    from tpm2_pytss import ESAPI
    from cryptobat.custody import nvcounter
    esys = ESAPI(swtpm.tcti)
    try:
        return nvcounter._used_indices(esys)
    finally:
        esys.close()


def _hsm_objects(hsm: dict) -> list[str]:
    """The objects SoftHSMv2 keeps on disk, one file each in its token directories (the file
    store; listing them with pkcs11-tool from another process missed objects at times)."""
    return sorted(p.name for p in (SoftHsm.shared().dir / "tokens").glob("*/*.object") if p.name != "token.object")


@pytest.mark.parametrize("kind,blocker", [
    ("tpm2", "nvcounter.json"),  # the counter's index cannot be recorded: undefined again
    ("tpm2", "custody.json"),  # the whole custody made, then its kind cannot be recorded
    ("pkcs11", "pkcs11-pin"),  # the master secret made, then the custody's files cannot be written
    ("pkcs11", "custody.json"),
])
def test_an_init_failing_after_the_device_was_written_leaves_it_as_it_was(tmp_path, swtpm, kind, blocker):
    """A file the new custody writes cannot be (a directory is in its place): the init fails
    with one line, and the NV index or the HSM objects it had made are gone again."""
    if kind == "tpm2":
        config, device = {"tcti": swtpm.tcti}, lambda: _nv_indices(swtpm)
    else:
        hsm = SoftHsm.shared().token()
        config = {"module": hsm["module"], "token": hsm["token"], "pin": hsm["pin"]}
        device = lambda: _hsm_objects(hsm)  # noqa: E731
    before = device()
    home = tmp_path / "t"
    home.mkdir()
    (home / blocker).mkdir()
    with pytest.raises(CryptobatError, match="Is a directory"):
        init_token(home, 1, kind=kind, config=config)
    assert device() == before
    assert sorted(p.name for p in home.iterdir()) == [blocker]


def test_a_migration_failing_half_way_leaves_nothing_in_the_tpm_or_the_hsm(tmp_path, swtpm, monkeypatch):
    """The target made its counter (tpm2) or its master secret and a key (pkcs11) before the
    second key failed (the failure put in here, in the migration's own step): all of it is
    removed again, and the token is the software one it was."""
    moved = migration._moved_key

    def second_fails(rec, source, target):
        if rec.info.label == "k8":
            raise IntegrityError("key 'k8' came out of the target with another DNSKEY (injected)")
        return moved(rec, source, target)
    monkeypatch.setattr(migration, "_moved_key", second_fails)
    hsm = SoftHsm.shared().token()
    (tmp_path / "pin").write_text(hsm["pin"] + "\n")
    for target, device in ((f"tpm2:{swtpm.tcti}", lambda: _nv_indices(swtpm)),
                           (f"pkcs11:{hsm['module']} {hsm['token']} {tmp_path / 'pin'}", lambda: _hsm_objects(hsm))):
        home = tmp_path / target.split(":")[0]
        officers, published = _software_token(home, quorum=1)
        c, tok = officers.console, officers.console.token
        before = device()
        out = c.handle(f"custodymigrate {target}")
        assert out.startswith("fail: key 'k8' came out of the target"), out
        assert device() == before, target
        assert tok.custody.name == "software" and _kind(home) == "software"
        _signs_under(tok, published)
        tok.close()


def test_a_commit_that_reported_an_error_keeps_the_target_for_the_next_open_to_decide(tmp_path, monkeypatch):
    """The store's commit of the migration raises: whether it landed may only show at the next
    open (a WAL frame written before the error), so neither the target's files nor its HSM
    objects are removed now. The token signs on in software custody once its next write
    succeeds; the next open finds the store still software and removes the target's files."""
    from cryptobat.errors import StoreError
    from cryptobat.store import Store
    hsm = SoftHsm.shared().token()
    (tmp_path / "pin").write_text(hsm["pin"] + "\n")
    home = tmp_path / "t"
    officers, published = _software_token(home, quorum=1)
    c, tok = officers.console, officers.console.token

    def failing_commit(self, *a, **k):
        raise StoreError("state store write failed (disk I/O error); nothing changed")
    before = _hsm_objects(hsm)
    with monkeypatch.context() as m:
        m.setattr(Store, "rekey", failing_commit)
        out = c.handle(f"custodymigrate pkcs11:{hsm['module']} {hsm['token']} {tmp_path / 'pin'}")
    assert out.startswith("fail: state store write failed"), out
    assert len(_hsm_objects(hsm)) > len(before)  # the master secret and the keys: kept, not destroyed
    assert (home / migration.NEXT_FILE).exists() and (home / "pkcs11.json").exists()
    assert tok.custody.name == "software" and (home / "master.key").exists()
    _signs_under(tok, published)  # the audit written first, then the signature
    tok.close()
    tok = open_token(home)
    try:
        assert tok.custody.name == "software" and not (home / migration.NEXT_FILE).exists()
        assert not (home / "pkcs11.json").exists()
        _signs_under(tok, published)
    finally:
        tok.close()
