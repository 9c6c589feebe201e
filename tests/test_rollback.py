"""Rollback detection with a real TPM NV counter (swtpm): a restored older ``state.db`` is refused.

The custody here is the software custody plus a real :class:`NvCounter` on a real swtpm,
so the token's side (which commits move the counter, the checks at open, the held mode
and the quorum's decision) is tested on the device it will run on.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import re
import shutil
from pathlib import Path

import pytest
from tpm2_pytss import ESAPI, TCTILdr

from cryptobat import rollback
from cryptobat.console import Console
from cryptobat.custody import SoftwareCustody
from cryptobat.custody.nvcounter import NvCounter, attach
from cryptobat.custody.tpm2 import Tpm2Custody
from cryptobat.errors import CryptobatError, IntegrityError, StoreError
from cryptobat.home import init_token, open_token
from cryptobat.officers import MAX_FAILURES
from cryptobat.token import MAX_PIN_FAILURES
from cryptobat.store import FILES, from_json, to_json
from support import Officers, Swtpm, make_signing_data

START = 1_800_000_000.0


class SoftwareWithCounter(SoftwareCustody):
    """The software custody with a TPM NV rollback counter, attached as a TPM custody attaches its own."""

    name = "software"
    parallel = False

    def __init__(self, home: Path, create: bool = False, config: dict | None = None, *, tcti: str) -> None:
        super().__init__(home, create)
        self.home = Path(home)
        self._esapi = ESAPI(TCTILdr(*tcti.split(":", 1)))
        auth = hmac.new(self.mac_key(), b"cryptobat rollback counter", hashlib.sha256).digest()
        self._counter = attach(self._esapi, home, auth, create)

    def counter(self) -> NvCounter:
        return self._counter

    def renew_counter(self) -> NvCounter:
        auth = hmac.new(self.mac_key(), b"cryptobat rollback counter", hashlib.sha256).digest()
        self._counter = attach(self._esapi, self.home, auth, True)
        return self._counter

    def describe(self) -> dict[str, str]:
        return {"device": "swtpm", "nv-index": f"{self._counter.index:#010x}"}

    def close(self) -> None:
        self._esapi.close()


class Rig:
    """A token on a swtpm counter, its wall/boot clocks moved by hand (TOTP steps never clash)."""

    def __init__(self, tmp: Path) -> None:
        self.tpm = Swtpm(tmp / "tpm")
        self.home = tmp / "token"
        self.now = START
        self.token = None
        self.officers: Officers | None = None

    def factory(self, home: Path, create: bool = False) -> SoftwareWithCounter:
        return SoftwareWithCounter(home, create, tcti=self.tpm.tcti)

    def clocks(self) -> dict:
        return {"wall": lambda: self.now, "mono": lambda: self.now}

    def init(self, quorum: int = 1, names=("solo",)):
        self.token = init_token(self.home, quorum, self.factory, **self.clocks())
        self.officers = Officers(Console(self.token))
        for n in names:
            self.officers.add(n)
        self.login(*names)
        return self.token

    def open(self, **kw):
        self.token = open_token(self.home, self.factory, **self.clocks(), **kw)
        secrets, used = (self.officers.secrets, self.officers.used) if self.officers else ({}, {})
        self.officers = Officers(Console(self.token))
        self.officers.secrets, self.officers.used = secrets, used
        return self.token

    def login(self, *names: str) -> None:
        for n in names:
            self.now += 31
            self.officers.login(n)

    def cmd(self, line: str) -> str:
        return self.officers.console.handle(line)

    def device(self) -> int:
        return self.token.counter.read()

    def close(self) -> None:
        if self.token is not None:
            self.token.close()
            self.token = None

    def copy_files(self, to: Path) -> None:
        """The token's files as an attacker (or a careless restore) copies them: all of them, marker too."""
        to.mkdir(exist_ok=True)
        for name in FILES + ("custody.json", "nvcounter.json"):
            if name != "lock" and (self.home / name).exists():
                shutil.copy2(self.home / name, to / name)

    def restore_files(self, frm: Path) -> None:
        for name in FILES:
            if name != "lock":
                (self.home / name).unlink(missing_ok=True)
        for p in frm.iterdir():
            shutil.copy2(p, self.home / p.name)


class Tpm2Rig(Rig):
    """The same, on the TPM 2.0 custody itself: keys and master secret in the TPM, its own counter."""

    def factory(self, home: Path, create: bool = False) -> Tpm2Custody:
        return Tpm2Custody(home, create, {"tcti": self.tpm.tcti})


@pytest.fixture(params=["software+counter", "tpm2"])
def rig(tmp_path, request):
    r = (Rig if request.param == "software+counter" else Tpm2Rig)(tmp_path)
    yield r
    r.close()
    r.tpm.stop()


def test_decisions():
    assert rollback.decide(7, 7).action == "ok"
    assert rollback.decide(8, 7).action == "repair"
    behind = rollback.decide(12, 15)
    assert behind.action == "refuse" and "state.db is older than the TPM's rollback counter (store 12, TPM 15)" \
        in behind.message and "not serving" in behind.message
    ahead = rollback.decide(20, 15)
    assert ahead.action == "refuse" and "another TPM" in ahead.message
    assert not rollback.counts("sign", {}) and not rollback.counts("refused-sign", {})
    assert not rollback.counts("clock", {"hwm": 1}) and not rollback.counts("command", {})
    assert rollback.counts("setmaxval", {}) and rollback.counts("cologin", {"ok": False})
    assert rollback.counts("pin", {"ok": False, "why": rollback.PIN_LOCKED})
    assert not rollback.counts("pin", {"ok": False}) and not rollback.counts("pin", {"ok": True})
    assert rollback.counts("some-future-change", {})  # protected unless named audit-only


def test_only_changes_to_what_a_copy_could_bring_back_count(tmp_path):
    t = init_token(tmp_path / "t", quorum=1)
    try:
        s = t.snapshot()
        assert rollback.guarded(s.replace(counters=s.counters.add(signatures=5))) == rollback.guarded(s)
        assert rollback.guarded(s.with_clock(hwm=s.clock.hwm + 60)) == rollback.guarded(s)
        assert rollback.guarded(s.replace(max_validity=60)) != rollback.guarded(s)
        assert rollback.guarded(s.with_clock(tampered=True)) != rollback.guarded(s)
    finally:
        t.close()


def test_old_store_documents_open_without_a_counter_value(tmp_path):
    t = init_token(tmp_path / "t", quorum=1)
    try:
        doc = to_json(t.snapshot())
    finally:
        t.close()
    del doc["rollback"]
    assert from_json(doc).rollback == 0


def test_counter_moves_on_every_security_change_and_never_on_signing(rig):
    t = rig.init(quorum=1)
    assert t.snapshot().rollback == rig.device() > 0

    def moves(line: str, expect: str) -> None:
        before = rig.device()
        out = rig.cmd(line)
        assert expect in out, (line, out)
        assert rig.device() == before + 1 == t.snapshot().rollback, line

    moves("setmaxval 3600", "Maximum validity")
    moves("keygen 13 zsk testzone z", "ok: key generated")
    moves("keygen 13 zsk testzone gone", "ok: key generated")
    moves("keydel gone", "")
    moves("setclockgap 3600", "")
    moves(f"settime {int(rig.now) + 30}", "")  # (the time it already had would change nothing)
    before = rig.device()
    rig.officers.add("other")
    assert rig.device() == before + 1
    moves("setquorum 2", "Quorum set to 2")
    rig.login("other")
    moves("setquorum 1", "Quorum set to 1")
    moves("codel other", "")
    moves("signerpeers uid:4242", "")
    moves("cdsdelete 60 testzone", "")
    moves("p11window 60 testzone", "")
    moves("keyallow testzone 257 3 13 " + "A" * 88, "")
    moves("setcompat z on", "")
    before = rig.device()
    assert rig.cmd("setpin") == "" and rig.cmd("123456") == " Signer PIN set\n"
    assert rig.device() == before + 1
    rig.now += 31
    before = rig.device()
    rig.officers.login("solo")  # the TOTP step a login uses
    assert rig.device() == before + 1
    assert rig.cmd("cologin solo 000000") == " Failed\n"  # a failure: counted towards the lockout
    assert rig.device() == before + 2
    # the signer PIN: wrong PINs between right ones spend nothing (the signing host knows the PIN:
    # counted, they would wear a real TPM's NV out); the wrong PIN that locks it is counted, so a
    # copy cannot undo the lockout
    for _ in range(3):
        for _ in range(MAX_PIN_FAILURES - 1):
            assert not t.check_pin("wrong-pin")
        assert t.check_pin("123456")
    assert rig.device() == before + 2 == t.snapshot().rollback
    for _ in range(MAX_PIN_FAILURES):
        assert not t.check_pin("wrong-pin")
    assert t.pin_locked() and rig.device() == before + 3 == t.snapshot().rollback
    rig.login("solo")
    assert rig.cmd("setpin") == "" and rig.cmd("123456") == " Signer PIN set\n"  # a quorum's new PIN
    before = rig.device()

    # reads, signing batches and the clock's high-water mark do not move it
    before = rig.device()
    for line in ("status", "keylist", "colist", "audit 3", "date"):
        rig.cmd(line)
    key = t.key("z")
    data = make_signing_data(key, int(rig.now) + 600, int(rig.now) - 60)
    signed = 0
    for _ in range(10):
        results = t.timed_sign([("z", data)] * 100)
        signed += sum(r.ok for r in results)
        rig.now += 61  # a flushed "sign" entry and an advanced high-water mark each round
    t.flush_audit(force=True)
    assert signed == 1000 and t.counters()["signatures"] == 1000
    assert rig.device() == before == t.snapshot().rollback
    status = rig.cmd("status")
    assert re.search(rf"^rollback +counter store {before} / TPM {before}$", status, re.M), status
    kind = "software  device swtpm  nv-index 0x01" if type(rig) is Rig else "tpm2  device IBM firmware"
    assert re.search(rf"^custody +{kind}", status, re.M), status
    info = t.info()  # the native API's and PKCS#11's view: the store's value, no device round trip
    assert info["custody"] == ("software" if type(rig) is Rig else "tpm2") and info["rollback"] == before and "held" not in info

    # an officer locked out: each failure up to the lockout moves it, then attempts change nothing
    for _ in range(MAX_FAILURES):
        rig.cmd("cologin solo 000000")
    assert t.snapshot().officers["solo"].locked_until > rig.now
    before = rig.device()
    for _ in range(20):
        assert rig.cmd("cologin solo 000000") == " Failed\n"
    assert rig.device() == before == t.snapshot().rollback and t.counters()["login_failures"] >= 25


def test_restored_store_is_refused_until_a_quorum_accepts_it(rig, tmp_path):
    t = rig.init(quorum=2, names=("lamb", "jakob"))
    assert rig.cmd("setmaxval 3600").startswith(" Maximum validity")
    assert rig.cmd("keygen 13 zsk testzone z").startswith("ok: key generated")
    rig.close()
    rig.copy_files(tmp_path / "backup")  # state.db (+ WAL), commit marker, everything

    t = rig.open()
    rig.login("lamb", "jakob")
    assert rig.cmd("setmaxval 600").startswith(" Maximum validity")
    assert rig.cmd("keydel z").startswith(" Key")
    stored, device = t.snapshot().rollback, rig.device()
    rig.close()

    rig.restore_files(tmp_path / "backup")
    with pytest.raises(IntegrityError) as e:
        rig.open()
    old = stored - 4  # two logins, setmaxval, keydel since the copy
    assert str(e.value).startswith(f"state.db is older than the TPM's rollback counter (store {old}, TPM {device}): "
                                   f"a copy was restored")
    assert "not serving" in str(e.value) and "\n" not in str(e.value)

    t = rig.open(rollback_hold=True)  # the officers' decision, signing refused meanwhile
    assert t.held and "HELD: state.db is older" in rig.cmd("status")
    key = t.key("z")
    with pytest.raises(IntegrityError, match="older than the TPM's rollback counter"):
        t.timed_sign([("z", make_signing_data(key, int(rig.now) + 600, int(rig.now) - 60))])
    with pytest.raises(IntegrityError):
        t.check_pin("123456")
    rig.login("lamb")
    assert rig.cmd("setmaxval 100").startswith("fail: state.db is older")
    assert rig.cmd("keydel z").startswith("fail: state.db is older")
    out = rig.cmd("acceptrollback")  # one officer of two: held for approval
    assert " Configuration disabled" in out and "pending" in out
    op = out.split("pending ")[1].split(":")[0]
    second = Console(t)
    rig.now += 31
    assert second.handle(f"cologin jakob {rig.officers.code('jakob')}") == " CO jakob Ok\n"
    out = second.handle(f"approve {op}")
    assert f"Rollback accepted: the store's counter {old} set to the TPM's {device}" in out, out
    assert t.held is None and t.snapshot().rollback == device == rig.device()
    entry = next(e for e in reversed(t.audit_tail(10)) if "rollback-accepted" in e)
    assert f'"store":{old}' in entry.replace(" ", "") and f'"device":{device}' in entry.replace(" ", "")
    assert t.snapshot().max_validity == 3600 and "z" in t.snapshot().keys  # what was accepted: the copy
    assert t.timed_sign([("z", make_signing_data(key, int(rig.now) + 600, int(rig.now) - 60))])[0].ok
    rig.close()

    t = rig.open()  # served normally from now on, and changes move the counter again
    rig.login("lamb", "jakob")
    assert rig.device() == t.snapshot().rollback == device + 2


def test_a_crash_between_commit_and_increment_is_repaired_at_open(rig):
    t = rig.init()
    real = t.counter

    class Crashing:
        """The increment lost, as if the process were killed right after the store's commit."""

        def read(self) -> int:
            return real.read()

        def increment(self) -> int:
            raise CryptobatError("killed")

    t.counter = Crashing()
    device = rig.device()
    assert rig.cmd("setmaxval 3600").startswith(" Maximum validity")  # committed; the increment lost
    assert t.snapshot().rollback == device + 1 and real.read() == device
    # a second change before the counter caught up is refused: the store never gets two ahead
    assert rig.cmd("setmaxval 7200").startswith("fail: changes refused until the rollback counter can be moved")
    assert t.snapshot().max_validity == 3600
    t.counter = real
    rig.close()

    t = rig.open()
    assert rig.device() == t.snapshot().rollback == device + 1
    assert any("rollback-repaired" in e for e in t.audit_tail(5))
    rig.close()
    t = rig.open()  # nothing left to repair
    assert rig.device() == t.snapshot().rollback == device + 1


def test_a_store_ahead_of_the_counter_is_refused(rig):
    rig.init()
    for _ in range(3):
        rig.cmd("setmaxval 3600")
    stored = rig.token.snapshot().rollback
    rig.close()
    # the counter replaced: another index (as another TPM's would) behind this store
    custody = rig.factory(rig.home)
    try:
        device = custody.renew_counter().read()
    finally:
        custody.close()
    assert device + 1 < stored
    with pytest.raises(IntegrityError, match=rf"state.db is ahead of the TPM's rollback counter "
                                             rf"\(store {stored}, TPM {device}\): a store from another TPM"):
        rig.open()


def test_the_counter_survives_a_tpm_power_cycle(rig):
    rig.init()
    rig.cmd("setmaxval 3600")
    value = rig.device()
    rig.close()
    rig.tpm.restart()
    t = rig.open()
    assert rig.device() == value == t.snapshot().rollback
    rig.login("solo")
    assert rig.device() == value + 1


def test_a_missing_counter_is_refused(rig):
    rig.init()
    rig.close()
    (rig.home / "nvcounter.json").write_text(json.dumps({"index": 0x01000001}))
    with pytest.raises(IntegrityError, match="rollback counter .* cannot be found"):
        rig.open()


def test_an_increment_whose_answer_was_lost_is_not_repeated(rig):
    """The TPM moved the counter but its answer never came back: the next change must not move it
    again (the device would pass the store, and the next open refuse a store never rolled back)."""
    t = rig.init()
    real = t.counter

    class LostAnswer:
        def read(self) -> int:
            return real.read()

        def increment(self) -> int:
            real.increment()
            raise CryptobatError("the TPM's answer was lost")

    t.counter = LostAnswer()
    assert rig.cmd("setmaxval 3600").startswith(" Maximum validity")
    assert t.snapshot().rollback == real.read()  # the device did move
    t.counter = real
    assert rig.cmd("setmaxval 7200").startswith(" Maximum validity")  # catches up by reading: no double step
    assert t.snapshot().rollback == real.read()
    rig.close()
    t = rig.open()  # served, nothing to repair or refuse
    assert t.held is None and t.snapshot().max_validity == 7200
    assert not any("rollback-repaired" in e for e in t.audit_tail(5))


def test_changes_without_the_counter_device_are_refused_not_lost(rig):
    t = rig.init()
    rig.tpm.stop()
    out = rig.cmd("setmaxval 3600")  # committed; the increment fails: the store one ahead
    assert out.startswith(" Maximum validity"), out
    assert rig.cmd("setmaxval 60").startswith("fail: changes refused until the rollback counter")
    assert t.snapshot().max_validity == 3600
    with pytest.raises(StoreError):
        t.counter.read()


def test_a_counter_removed_from_the_tpm_holds_the_token_until_a_quorum_makes_a_new_one(rig):
    """Whoever reaches the TPM (owner authorization empty, as it is by default) can undefine
    the counter's NV index: the token then refuses to serve, but still opens held, and a quorum's
    acceptrollback makes a new counter: no one outside the quorum can lock the officers out."""
    t = rig.init()
    assert rig.cmd("setmaxval 3600").startswith(" Maximum validity")
    index = t.counter.index
    rig.close()
    rig.tpm.restart()  # no other connection to a bare swtpm while the token holds one
    esys = ESAPI(TCTILdr(*rig.tpm.tcti.split(":", 1)))
    try:
        from tpm2_pytss.constants import ESYS_TR
        esys.nv_undefine_space(esys.tr_from_tpmpublic(index), ESYS_TR.OWNER)
    finally:
        esys.close()
    with pytest.raises(IntegrityError, match="cannot be found") as e:
        rig.open()
    assert "\n" not in str(e.value) and "acceptrollback" in str(e.value)
    t = rig.open(rollback_hold=True)
    assert t.held and "cannot be found" in t.held
    assert rig.cmd("setmaxval 60").startswith("fail:")
    rig.login("solo")
    out = rig.cmd("acceptrollback")
    assert "Rollback accepted" in out, out
    assert t.held is None and t.counter.index != index and t.snapshot().rollback == rig.device()
    before = rig.device()
    assert rig.cmd("setmaxval 600").startswith(" Maximum validity")
    assert rig.device() == before + 1 == t.snapshot().rollback
    rig.close()
    t = rig.open()  # served normally again, on the new counter
    assert t.held is None and t.snapshot().max_validity == 600
