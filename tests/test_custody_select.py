"""Choosing a custody at ``cryptobat init`` and opening the same one again; what ``status`` shows;
key deletion reaching the custody; the signing Engine forking only for custodies that allow it."""
from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import pytest

from cryptobat.console import Console
from cryptobat.custody import DEFAULT_TCTI, SoftwareCustody, open_custody, parse_spec
from cryptobat.errors import CryptobatError, IntegrityError, InvalidArgument
from cryptobat.home import init_token, open_engine, open_token
from support import Officers, children, cli, configure, payload

SOFTHSM = "/usr/lib/softhsm/libsofthsm2.so"


def test_specs():
    assert parse_spec("software") == ("software", {})
    assert parse_spec("tpm2") == ("tpm2", {"tcti": DEFAULT_TCTI, "pcrs": []})
    assert DEFAULT_TCTI == "device:/dev/tpmrm0"
    assert parse_spec("tpm2:swtpm:path=/x/s.sock") == ("tpm2", {"tcti": "swtpm:path=/x/s.sock", "pcrs": []})
    assert parse_spec("tpm2:/dev/tpm0") == ("tpm2", {"tcti": "device:/dev/tpm0", "pcrs": []})
    assert parse_spec("tpm2", pcrs="7,0,2,4") == ("tpm2", {"tcti": DEFAULT_TCTI, "pcrs": [0, 2, 4, 7]})
    assert parse_spec(f"pkcs11:{SOFTHSM}", token="hsm", pin="1234") == \
        ("pkcs11", {"module": SOFTHSM, "token": "hsm", "pin": "1234"})


@pytest.mark.parametrize("spec,kw,why", [
    ("hsm", {}, "unknown custody 'hsm': use software, tpm2[:TCTI] or pkcs11:MODULE"),
    ("software:x", {}, "software custody takes no parameters"),
    ("tpm2:", {}, "give a TCTI after the colon"),
    ("tpm2", {"pcrs": "0,24"}, "--pcrs takes PCR numbers 0-23"),
    ("tpm2", {"pcrs": "a"}, "--pcrs takes PCR numbers"),
    ("software", {"pcrs": "7"}, "--pcrs is for tpm2 custody only"),
    ("tpm2", {"token": "x"}, "for pkcs11 custody only"),
    ("pkcs11", {}, "pkcs11 custody needs the HSM's module"),
    ("pkcs11:/nonexistent/module.so", {"token": "t", "pin": "p"}, "PKCS#11 module /nonexistent/module.so not found"),
    (f"pkcs11:{SOFTHSM}", {"pin": "p"}, "needs the HSM token's label: --custody-token LABEL"),
    (f"pkcs11:{SOFTHSM}", {"token": "t"}, "needs the HSM token's PIN"),
])
def test_bad_specs_are_one_clear_line(spec, kw, why):
    with pytest.raises(InvalidArgument) as e:
        parse_spec(spec, **kw)
    assert why in str(e.value) and "\n" not in str(e.value)


def test_init_records_the_custody_and_existing_tokens_open_as_software(tmp_path):
    home = tmp_path / "t"
    r = cli("init", "--quorum", "1", "--custody", "software", home=home)
    assert r.returncode == 0 and "custody software" in r.stdout, r.stderr
    path = home / "custody.json"
    assert json.loads(path.read_text()) == {"kind": "software"}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not (home / "custody.json.tmp").exists()
    r = cli("status", home=home)
    assert r.returncode == 0 and re.search(r"^custody +software$", r.stdout, re.M), r.stdout
    assert "rollback" not in r.stdout  # the software custody has no counter
    r = cli("console", "--rollback-hold", home=home, input="status\n")  # no counter: nothing to hold
    assert r.returncode == 0 and "HELD" not in r.stdout + r.stderr and "custody" in r.stdout, r.stderr
    path.unlink()  # a token made before custodies could be chosen
    t = open_token(home)
    try:
        assert isinstance(t.custody, SoftwareCustody) and t.counter is None
    finally:
        t.close()
    path.write_text('{"kind": "quantum"}')
    with pytest.raises(IntegrityError, match="custody.json names no custody this Cryptobat knows"):
        open_token(home)


@pytest.mark.parametrize("args,why", [
    (["--custody", "hsm"], "cryptobat: unknown custody 'hsm'"),
    (["--custody", "pkcs11:/nonexistent/p11.so", "--custody-token", "t"], "cryptobat: PKCS#11 module"),
    (["--custody", "tpm2:swtpm:path=/nonexistent/swtpm.sock"], "cryptobat: cannot reach the TPM at swtpm:path=/nonexistent"),
    (["--custody", "software", "--pcrs", "7"], "cryptobat: --pcrs is for tpm2 custody only"),
])
@pytest.mark.parametrize("existing", [False, True])
def test_init_that_fails_leaves_nothing_behind(tmp_path, args, why, existing):
    """A TPM that cannot be reached, a missing module or an unknown kind: one line, and no half-made token."""
    home = tmp_path / "t"
    if existing:
        home.mkdir()
        (home / "notes.txt").write_text("the operator's")
    r = cli("init", "--quorum", "1", *args, home=home, env={"CRYPTOBAT_CUSTODY_PIN": "1234"})
    assert r.returncode == 1 and r.stderr.startswith(why) and r.stderr.count("\n") == 1, r.stderr
    if existing:
        assert sorted(p.name for p in home.iterdir()) == ["notes.txt"]
    else:
        assert not home.exists()


def test_a_custody_failing_half_way_through_init_leaves_nothing(tmp_path):
    class Failing(SoftwareCustody):
        def __init__(self, home: Path, create: bool = False) -> None:
            super().__init__(home, create)  # master.key written...
            raise CryptobatError("the device went away")  # ...then the device fails

    with pytest.raises(CryptobatError, match="the device went away"):
        init_token(tmp_path / "t", 1, Failing)
    assert not (tmp_path / "t").exists()
    with pytest.raises(CryptobatError, match="cannot be created"):  # a device library's own error, one line
        open_custody(tmp_path / "u", create=True, kind="software", config={"x": 1})


class Recording(SoftwareCustody):
    """The software custody, not shared with worker processes, recording what the token asks of it."""

    parallel = False
    destroyed: list[tuple[bytes, bytes, bool]] = []
    home: Path

    def __init__(self, home: Path, create: bool = False) -> None:
        super().__init__(home, create)
        self.home = Path(home)

    def destroy(self, blob: bytes, aad: bytes) -> None:
        # the deletion is committed before the backing object goes: the store as it is on disk now
        Recording.destroyed.append((blob, aad, aad.decode() in _committed_keys(self.home)))

    def describe(self) -> dict[str, str]:
        return {"kind": "software", "device": "test-device", "objects": "2"}


def _committed_keys(home: Path) -> set[str]:
    import sqlite3
    db = sqlite3.connect(f"file:{home / 'state.db'}?mode=ro", uri=True)
    try:
        return set(json.loads(db.execute("SELECT doc FROM state").fetchone()[0])["keys"])
    finally:
        db.close()


def _token(home: Path, factory, keys=("13 zsk testzone z",)):
    t = init_token(home, 1, factory)
    o = Officers(Console(t))
    configure(o, enrol=("solo",), quorum=1, maxval=3600, keys=keys)
    return t, o


def test_key_deletion_destroys_the_custody_object_after_the_commit(tmp_path):
    Recording.destroyed = []
    t, o = _token(tmp_path / "t", Recording, keys=("13 zsk testzone z", "13 zsk testzone gone", "8 zsk testzone p"))
    try:
        blob = bytes.fromhex(t.snapshot().keys["gone"].blob)
        assert o.console.handle("keydel gone").startswith(" Key")
        assert Recording.destroyed == [(blob, b"gone", False)]  # gone from the committed state first
        o.console.handle("p11window 60 testzone")
        assert t.keygen_allowed()
        blob = bytes.fromhex(t.snapshot().keys["p"].blob)
        t.delete_key("p")  # PKCS#11 C_DestroyObject
        assert Recording.destroyed[1] == (blob, b"p", False)
        assert re.search(r"^custody +software  device test-device  objects 2$", o.console.handle("status"), re.M)
    finally:
        t.close()


def test_a_custody_not_shared_with_workers_signs_in_the_token_process(tmp_path):
    """parallel=False (a TPM, an HSM session): a batch far above the worker threshold forks nothing."""
    from cryptobat.workers import PARALLEL_MIN
    t, _ = _token(tmp_path / "t", Recording)
    engine = open_engine(t, workers=2)
    try:
        before = children(os.getpid())
        k = t.key("z")
        now = t.now()
        items = [("z", payload(k, now=now, exp=now + 300, ttl=i)) for i in range(4 * PARALLEL_MIN)]
        results = t.timed_sign(items, run=engine.run)
        assert all(r.ok for r in results) and len(results) == 4 * PARALLEL_MIN
        assert engine._pool is None and children(os.getpid()) == before
    finally:
        engine.close()
        t.close()
    t, _ = _token(tmp_path / "u", SoftwareCustody)  # the software custody still uses its workers
    engine = open_engine(t, workers=2)
    try:
        k = t.key("z")
        now = t.now()
        assert all(r.ok for r in t.timed_sign([("z", payload(k, now=now, exp=now + 300, ttl=i))
                                               for i in range(2 * PARALLEL_MIN)], run=engine.run))
        assert engine._pool is not None and len(engine._pool) == 2
    finally:
        engine.close()
        t.close()


def test_a_custody_run_really_uses_that_custody(tmp_path):
    """Under ``CRYPTOBAT_TEST_CUSTODY`` (scripts/test runs a part of the suite on each custody),
    tokens made in process and by the CLI are of that custody: the run cannot fall back quietly."""
    want = os.environ.get("CRYPTOBAT_TEST_CUSTODY", "software")
    t = init_token(tmp_path / "a", quorum=1)
    try:
        assert t.custody.name == want
        if want != "software":
            assert not (tmp_path / "a" / "master.key").exists()
    finally:
        t.close()
    r = cli("init", "--quorum", "1", home=tmp_path / "b")
    assert r.returncode == 0 and f"custody {want})" in r.stdout, r.stderr


def test_a_second_init_of_the_same_home_meanwhile_is_refused(tmp_path):
    """While one init runs (its lock on the home held here), another is refused at once with
    one line and touches nothing; afterwards the home initialises as usual."""
    import fcntl
    import os
    from cryptobat.errors import Conflict
    home = tmp_path / "t"
    home.mkdir(mode=0o700)
    fd = os.open(home, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(Conflict, match="another cryptobat init is running"):
            init_token(home, 1)
        r = cli("init", "--quorum", "1", home=home)
        assert r.returncode == 1 and "another cryptobat init is running" in r.stderr and r.stderr.count("\n") == 1
        assert list(home.iterdir()) == []
    finally:
        os.close(fd)
    init_token(home, 1).close()
    with pytest.raises(Conflict, match="a token already exists"):
        init_token(home, 1)
