"""The trusted clock, the hash-chained audit log, and the integrity and crash safety of the store."""
from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from cryptobat import tally
from cryptobat.errors import IntegrityError, TokenBusy
from cryptobat.home import open_token
from support import ROOT, cli, make_token, payload


def _ready_token(path, wall=None, mono=None):
    o = make_token(path, quorum=1, officers=("solo",), close=False, wall=wall, mono=mono, maxval=3600,
                   keys=("13 zsk testzone z",))
    return o.console.token, o.console, o


def test_clock_jump_enters_tamper_until_settime(tmp_path):
    wall, mono = [1_800_000_000.0], [1000.0]
    t, c, o = _ready_token(tmp_path / "t", lambda: wall[0], lambda: mono[0])
    try:
        k = t.key("z")
        assert t.timed_sign([("z", payload(k, now=t.now()))])[0].ok
        wall[0] += 7200  # the wall clock leaps two hours; the boot-time clock saw 10 s pass
        mono[0] += 10
        res = t.timed_sign([("z", payload(k, now=t.now()))])[0]
        assert res.reason == "token clock tamper state: a quorum must run settime"
        assert any('"event":"clock-tamper"' in e for e in t.audit_tail(5))
        assert "TAMPER" in c.handle("status")
        wall[0] += 31
        mono[0] += 31
        o.login("solo")
        assert c.handle(f"settime {int(wall[0]) - 7200}").startswith(" Token time set")
        now = t.now()
        assert abs(now - (wall[0] - 7200)) <= 1
        assert t.timed_sign([("z", payload(k, now=now))])[0].ok
    finally:
        t.close()


def test_small_drift_is_tolerated(tmp_path):
    wall, mono = [1_800_000_000.0], [1000.0]
    t, c, o = _ready_token(tmp_path / "t", lambda: wall[0], lambda: mono[0])
    try:
        wall[0] += 100 + 5  # NTP slewing a few seconds over a long while
        mono[0] += 100
        assert not t.policy().clock_tampered
        t.now()
        assert not t.policy().clock_tampered
    finally:
        t.close()


def test_clock_rollback_across_restart_with_faketime(tmp_path):
    """A real process whose clock is set a day back (libfaketime) finds the stored high-water mark ahead."""
    home = tmp_path / "t"
    assert cli("init", "--quorum", "1", home=home).returncode == 0
    r = cli("status", home=home, prefix=["faketime", "-f", "-1d"])
    assert r.returncode == 0, r.stderr
    assert "TAMPER" in r.stdout
    r = cli("status", home=home)  # the tamper state persists with the right time back
    assert "TAMPER" in r.stdout
    assert '"event":"clock-tamper"' in cli("audit", "-n", "5", home=home).stdout


def _entries(db):
    return db.execute("SELECT seq, entry FROM audit ORDER BY seq").fetchall()


def _audit_setup(tmp_path):
    home = tmp_path / "t"
    t, c, o = _ready_token(home)
    t.close()
    return home


def test_audit_verify_ok(tmp_path):
    home = _audit_setup(tmp_path)
    r = cli("audit", "verify", home=home)
    assert r.returncode == 0 and r.stdout.startswith("ok: audit log verified"), r.stdout + r.stderr


@pytest.mark.parametrize("how", ["edit", "reorder", "delete-middle"])
def test_audit_tampering_is_detected(tmp_path, how):
    home = _audit_setup(tmp_path)
    db = sqlite3.connect(home / "state.db")
    rows = _entries(db)
    if how == "edit":
        seq, entry = rows[2]
        db.execute("UPDATE audit SET entry = ? WHERE seq = ?", (entry.replace('"solo"', '"mallory"'), seq))
    elif how == "reorder":
        (s1, e1), (s2, e2) = rows[1], rows[2]
        h1, h2 = (db.execute("SELECT hash FROM audit WHERE seq=?", (s,)).fetchone()[0] for s in (s1, s2))
        db.execute("UPDATE audit SET entry=?, hash=? WHERE seq=?", (e2, h2, s1))
        db.execute("UPDATE audit SET entry=?, hash=? WHERE seq=?", (e1, h1, s2))
    else:
        db.execute("DELETE FROM audit WHERE seq = ?", (rows[2][0],))
    db.commit()
    db.close()
    r = cli("audit", "verify", home=home)
    assert r.returncode == 1 and r.stdout.startswith("fail: audit log: entry"), r.stdout + r.stderr
    assert len(r.stdout.strip().splitlines()) == 1


def test_truncated_audit_tail_refuses_to_open(tmp_path):
    home = _audit_setup(tmp_path)
    db = sqlite3.connect(home / "state.db")
    db.execute("DELETE FROM audit WHERE seq = (SELECT MAX(seq) FROM audit)")
    db.commit()
    db.close()
    with pytest.raises(IntegrityError):
        open_token(home)
    r = cli("status", home=home)
    assert r.returncode == 1
    assert r.stderr.strip() == "cryptobat: audit log does not match the state (entries edited or deleted)"


def test_state_edited_on_disk_is_refused(tmp_path):
    home = _audit_setup(tmp_path)
    db = sqlite3.connect(home / "state.db")
    doc = json.loads(db.execute("SELECT doc FROM state").fetchone()[0])
    doc["max_validity"] = 10 * 365 * 86400  # an attacker lifting the policy
    db.execute("UPDATE state SET doc = ?", (json.dumps(doc, sort_keys=True, separators=(",", ":")),))
    db.commit()
    db.close()
    with pytest.raises(IntegrityError, match="edited outside Cryptobat"):
        open_token(home)
    r = cli("status", home=home)
    assert r.returncode == 1 and "integrity check failed" in r.stderr and "Traceback" not in r.stderr


def test_garbage_state_file_gives_one_line(tmp_path):
    home = _audit_setup(tmp_path)
    for p in home.glob("state.db*"):
        p.unlink()
    (home / "state.db").write_bytes(b"not a database" * 100)
    r = cli("status", home=home)
    assert r.returncode == 1 and r.stderr.startswith("cryptobat: state store is damaged") and len(r.stderr.splitlines()) == 1


def test_second_process_cannot_open_the_store(tmp_path):
    home = _audit_setup(tmp_path)
    t = open_token(home)
    try:
        with pytest.raises(TokenBusy):
            open_token(home)
        r = cli("status", home=home)
        assert r.returncode == 1 and "in use by process" in r.stderr
    finally:
        t.close()


WRITER = textwrap.dedent("""
    import sys
    from cryptobat.home import open_token
    from support import payload
    t = open_token(sys.argv[1])
    k = t.key("z")
    i = 0
    while True:
        items = [("z", payload(k, now=t.now()))] * 64
        t.timed_sign(items)            # 64 signatures: counted,
        t.flush_audit(force=True)      # and audited in one commit
        t.audit("tick", i=i)
        i += 1
        print(i, flush=True)
""")


def test_kill_9_during_writes_never_loses_or_mixes_state(tmp_path):
    home = tmp_path / "t"
    t, c, o = _ready_token(home)
    t.close()
    rng = random.Random(7)
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}:{ROOT / 'tests'}")
    for round_ in range(8):
        p = subprocess.Popen([sys.executable, "-c", WRITER, str(home)], stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(2):  # the writer is in its stream of commits (however slow the machine is) ...
            assert p.stdout.readline(), "writer died"
        time.sleep(rng.random() * 0.05)  # ... then dies at some instant inside a commit or between two
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        t = open_token(home)  # opens: integrity and audit head intact
        try:
            n, problem = t.audit_verify()
            assert problem is None, problem
            ticks = sum(1 for e in t.audit_tail(10**6) if '"event":"tick"' in e)
            sig_entries = [json.loads(e) for e in t.audit_tail(10**6) if '"event":"sign"' in e]
            assert t.counters()["signatures"] == sum(e["signatures"] for e in sig_entries)
            assert t.counters()["signatures"] % 64 == 0
            # each killed writer may have committed its last batch but not the tick after it
            assert ticks <= t.counters()["signatures"] // 64 <= ticks + round_ + 1
        finally:
            t.close()
    assert ticks >= 16  # every writer got into its stream of commits before it was killed


def test_refusal_reasons_in_one_audit_entry_are_bounded(ready):
    """A client sending refusals with ever-new reasons (labels it invents) adds one bounded entry."""
    before = ready.audit_seq()
    ready.timed_sign([(f"nokey{i}", b"x") for i in range(100)])
    ready.flush_audit(force=True)
    entry = json.loads(ready.audit_tail(1)[0])
    assert entry["event"] == "refused-sign" and entry["refusals"] == 100
    assert len(entry["reasons"]) <= tally.MAX_REASONS + 1 and entry["reasons"].get(tally.OTHER, 0) > 0
    assert ready.audit_seq() == before + 1


@pytest.mark.parametrize("where", ["top", "officer", "clock", "counters", "version"])
def test_a_store_this_code_would_not_write_back_whole_is_refused(tmp_path, where):
    """A field this code does not know (a newer Cryptobat wrote it) would be dropped by the next
    commit: the store is refused in one line instead, and stays as it was."""
    import json as _json
    from cryptobat.custody import SoftwareCustody
    from cryptobat.store import Store
    home = tmp_path / "t"
    make_token(home, quorum=1, officers=("lamb",))
    st = Store(home, SoftwareCustody(home).mac_key())
    doc = _json.loads(st.db.execute("SELECT doc FROM state").fetchone()[0])
    {"top": lambda d: d.__setitem__("future", 1), "officer": lambda d: d["officers"]["lamb"].__setitem__("future", 1),
     "clock": lambda d: d["clock"].__setitem__("future", 1), "counters": lambda d: d["counters"].__setitem__("future", 1),
     "version": lambda d: d.__setitem__("version", 2)}[where](doc)
    text = _json.dumps(doc, sort_keys=True, separators=(",", ":"))
    with st.db:
        st.db.execute("UPDATE state SET doc = ?, mac = ? WHERE id = 1", (text, st._mac(text)))
    st.close()
    r = cli("status", home=home)
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "state store" in r.stderr
    st = Store(home, SoftwareCustody(home).mac_key())
    assert st.db.execute("SELECT doc FROM state").fetchone()[0] == text  # nothing dropped
    st.close()
