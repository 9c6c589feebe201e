"""The token at rest and under abuse: its files, its clock across restarts, its audit log, a full disk."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import time

import dns.rrset
import pytest

from cryptobat.errors import StoreError
from cryptobat.home import init_token
from support import (CONFIGURED_PIN, PIN, ConsoleSocket, Daemon, Officers, SockClient, cli, make_signing_data, payload,
                     setup_home, signing_data)


def _init(home, quorum: int = 1):
    r = cli("init", "--quorum", str(quorum), home=home)
    assert r.returncode == 0, r.stderr


# --- files -----------------------------------------------------------------------------------

def test_home_and_files_are_owner_only_whatever_the_umask(tmp_path):
    home = tmp_path / "t"
    home.mkdir(mode=0o755)
    os.chmod(home, 0o755)
    r = subprocess.run(["sh", "-c", f'umask 022; exec "$0" -m cryptobat --home "$1" init --quorum 1',
                        __import__("sys").executable, str(home)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert cli("status", home=home).returncode == 0
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    files = [p for p in home.iterdir()]
    assert {p.name for p in files} >= {"state.db", "master.key", "lock"}
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p


def test_missing_master_key_is_named_and_init_does_not_overwrite(tmp_path):
    home = tmp_path / "t"
    _init(home)
    (home / "master.key").rename(tmp_path / "saved.key")
    r = cli("status", home=home)
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1
    assert "master.key is missing" in r.stderr and "cryptobat init" not in r.stderr
    r = cli("init", home=home)
    assert r.returncode == 1 and "a token already exists" in r.stderr
    assert not (home / "master.key").exists()
    (tmp_path / "saved.key").rename(home / "master.key")
    assert cli("status", home=home).returncode == 0


def test_a_replaced_master_key_is_named_as_such(tmp_path):
    home = tmp_path / "t"
    _init(home)
    (home / "master.key").write_bytes(os.urandom(32))
    r = cli("status", home=home)
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1
    assert "is not the master key of this store" in r.stderr, r.stderr


# --- clock across a restart ------------------------------------------------------------------------

def test_a_clock_far_ahead_at_start_is_tamper(tmp_path):
    """A daemon started with the clock a year ahead signed a one-year RRSIG; now it signs nothing."""
    if shutil.which("faketime") is None:
        pytest.fail("faketime missing: apt-get install faketime")
    home = tmp_path / "t"
    _init(home)
    r = cli("status", home=home, prefix=["faketime", "-f", "+2h"])  # within the allowance: trusted
    assert "trusted" in r.stdout, r.stdout
    r = cli("status", home=home, prefix=["faketime", "-f", "+365d"])
    assert "TAMPER" in r.stdout, r.stdout
    r = cli("status", home=home)  # back to the right time: still distrusted until a quorum's settime
    assert "TAMPER" in r.stdout
    assert "past the last trusted time" in cli("audit", home=home).stdout


# --- audit log ---------------------------------------------------------------------------------------

def test_a_broken_audit_chain_is_refused_at_start(configured):
    import sqlite3
    home, _ = configured
    db = sqlite3.connect(home / "state.db")
    # an entry written since the chain was last checked at a start (earlier ones were checked then)
    seq, entry = db.execute("SELECT seq, entry FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    edited = json.dumps({**json.loads(entry), "officers": ["mallory"]})
    db.execute("UPDATE audit SET entry = ? WHERE seq = ?", (edited, seq))
    db.commit()
    db.close()
    for args in (["status"], ["console"]):
        r = cli(*args, home=home, input="")
        assert r.returncode == 1 and r.stderr.startswith(f"cryptobat: audit log is broken (entry {seq}"), r.stderr
    d = subprocess.run([__import__("sys").executable, "-m", "cryptobat", "--home", str(home), "serve"],
                       capture_output=True, text=True, timeout=30)
    assert d.returncode == 1 and "audit log is broken" in d.stderr and "Traceback" not in d.stderr
    r = cli("audit", "verify", home=home)
    assert r.returncode == 1 and r.stdout.startswith(f"fail: audit log: entry {seq}")


def test_audit_entries_are_bounded_whatever_a_client_sends(ready):
    now = ready.now()
    res = ready.timed_sign([("L" * 1_000_000, b"x" * 10)] + [(f"k{i}", b"") for i in range(500)])
    assert not any(r.ok for r in res)
    ready.flush_audit(force=True)
    last = ready.audit_tail(3)
    assert all(len(e) < 8192 for e in last), [len(e) for e in last]
    with pytest.raises(Exception):
        ready.generate_key(13, "zsk", "", "L" * 8_000_000)  # no window, and a label that long never
    assert ready.now() >= now


# --- keyimport ------------------------------------------------------------------------------------

def test_keyimport_checks_the_quorum_first_and_reads_only_regular_files(configured, tmp_path):
    home, codes = configured
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    d = Daemon(home, "--no-pkcs11")
    try:
        c = ConsoleSocket(home / "console.sock")
        try:
            assert c(f"keyimport zsk testzone {fifo}") == " Configuration disabled\n"
            assert c(f"cologin solo {codes('solo')}") == " CO solo Ok\n"
            assert c(f"keyimport zsk testzone {fifo}") == f"fail: cannot read {fifo}: not a regular file\n"
            assert c("keyimport zsk testzone /dev/zero") == "fail: cannot read /dev/zero: not a regular file\n"
            big = tmp_path / "big"
            big.write_bytes(b"A" * (1 << 20))
            assert "larger than" in c(f"keyimport zsk testzone {big}")
            secret_file = tmp_path / "secret.txt"
            secret_file.write_text("TOPSECRET-CONTENT\n")
            out = c(f"keyimport zsk testzone {secret_file}")
            assert out.startswith("fail:") and "TOPSECRET" not in out
        finally:
            c.close()
        assert " |solo| not present" in cli("console", home=home, input="colist\n").stdout  # still serving
    finally:
        d.stop()


def test_settime_far_out_is_refused_before_anything_is_committed(clocked):
    c, o = clocked.console, clocked.officers
    o.add("lamb")
    o.login("lamb")
    seq = clocked.token.state.audit.seq
    assert c.handle("settime 18446744073709551617").startswith("fail:")
    assert c.handle("settime 0").startswith("fail:")
    assert clocked.token.state.clock.offset == 0 and clocked.token.state.audit.seq <= seq + 2
    assert c.handle("date").endswith(f"{int(clocked.now)}\n")


# --- a full disk --------------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("the full-disk test needs root (tmpfs mount)")
        pytest.skip("needs root to mount a small tmpfs")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(path) -> None:
    """Write ``path`` until its file system is full (unbuffered: a partly written last block must
    not be left in a buffer for close() to fail on, whatever the free space was)."""
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


def test_full_disk_refuses_changes_and_signing_keeps_status_and_recovers(small_disk):
    from cryptobat.console import Console
    t = init_token(small_disk / "t", quorum=1)
    try:
        c = Console(t)
        o = Officers(c)
        o.add("lamb")
        o.login("lamb")
        assert "set to +3600" in c.handle("setmaxval 3600")
        assert c.handle("keygen 13 zsk testzone z").startswith("ok:")
        key = t.key("z")
        rrset = dns.rrset.from_text("www.testzone.", 300, "IN", "A", "192.0.2.1")
        _, data = signing_data(key, rrset, t.now() - 60, t.now() + 600)
        filler = small_disk / "filler"
        fill(filler)
        for i in range(500):  # the last free pages go to a few more changes, then none fits
            out = c.handle(f"setmaxval {3000 + i}")
            if out.startswith("fail:"):
                break
        assert out.startswith("fail: state store write failed"), out
        assert t.state.max_validity != 3000 + i
        for _ in range(3):
            with pytest.raises(Exception, match="signing refused"):
                t.timed_sign([("z", data)])
        assert "max validity" in c.handle("status")
        assert c.handle("setpin 123456").startswith("fail:")  # no PIN was set: the store is full
        filler.unlink()
        assert c.handle("setpin 123456") == " Signer PIN set\n"
        fill(filler)  # full again: a PIN check whose failure could not be counted would allow
        # unlimited guesses, so none is checked at all
        for j in range(500):
            if c.handle(f"setmaxval {2000 + j}").startswith("fail:"):
                break
        for pin in ("wrong-1", "123456", "wrong-2", "123456"):
            with pytest.raises(StoreError):
                t.check_pin(pin)
        assert t.state.pin_failures == 0
        filler.unlink()
        assert t.check_pin("123456") and not t.check_pin("wrong-3")
        assert t.state.pin_failures == 1
        assert c.handle("setmaxval 1800") == " Maximum validity period set to +1800 seconds\n"
        assert t.timed_sign([("z", data)])[0].ok
        n, problem = t.audit_verify()
        assert problem is None, problem
    finally:
        t.close()
    assert "max validity +1800 s" in cli("status", home=small_disk / "t").stdout


# --- a lost WAL ------------------------------------------------------------------------------------

def test_a_store_that_lost_acknowledged_changes_is_refused(configured):
    """kill -9 leaves acknowledged changes in state.db-wal; deleting it used to lose them silently."""
    import signal
    home, codes = configured
    d = Daemon(home, "--no-pkcs11")
    try:
        c = ConsoleSocket(home / "console.sock")
        assert c(f"cologin solo {codes('solo')}") == " CO solo Ok\n"
        assert c("setmaxval 1800") == " Maximum validity period set to +1800 seconds\n"  # acknowledged
        c.close()
        os.kill(d.pid, signal.SIGKILL)
        d.p.wait()
    finally:
        d.stop()
    assert (home / "state.db-wal").stat().st_size > 0
    (home / "state.db-wal").unlink()
    (home / "state.db-shm").unlink(missing_ok=True)
    r = cli("status", home=home)
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "lost" in r.stderr and "acknowledged change" in r.stderr and "Traceback" not in r.stderr
    assert cli("serve", home=home).returncode == 1  # the daemon refuses it too
    r = cli("recover", home=home)
    assert r.returncode == 1 and "--accept-lost-changes" in r.stderr
    r = cli("recover", "--accept-lost-changes", home=home)
    assert r.returncode == 0, r.stderr
    r = cli("status", home=home)
    assert r.returncode == 0 and "max validity +3600 s" in r.stdout  # the change is gone, and said so
    assert '"event":"accepted-loss"' in cli("audit", home=home).stdout
    assert cli("audit", "verify", home=home).returncode == 0


@pytest.mark.parametrize("damage", ["master.key dir", "lock dir", "header byte", "empty state"])
def test_damaged_files_give_one_line_naming_the_file(tmp_path, damage):
    home = tmp_path / "t"
    _init(home)
    name = damage.split()[0]
    if damage.endswith("dir"):
        (home / name).unlink()
        (home / name).mkdir()
    elif damage == "header byte":
        with open(home / "state.db", "r+b") as f:
            f.seek(16)  # the page size, now 0x0310: not a power of two
            f.write(b"\x03\x10")
    else:
        (home / "state.db").write_bytes(b"")
    for args in (["status"], ["audit", "verify"], ["serve"]):
        r = cli(*args, home=home, timeout=30)
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, (args, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr and "cryptobat init" not in r.stderr
        assert str(home / ("state.db" if name in ("header", "empty") else name)) in r.stderr, r.stderr


def test_deeply_nested_native_frame_gets_one_error(configured):
    import socket
    home, _ = configured
    d = Daemon(home, "--no-pkcs11")
    try:
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(home / "native.sock"))
        body = b"[" * 30000 + b"]" * 30000  # under the 64 KiB allowed before login
        s.sendall(len(body).to_bytes(4, "big") + body)
        n = int.from_bytes(s.recv(4), "big")
        resp = b""
        while len(resp) < n:
            resp += s.recv(n - len(resp))
        assert json.loads(resp) == {"error": "frame is nested too deeply", "code": "protocol"}
        s.close()
        assert " |solo| not present" in cli("console", home=home, input="colist\n").stdout
    finally:
        d.stop()
    assert "RecursionError" not in d.p.stderr.read()


def test_a_request_whose_client_left_is_not_signed(configured):
    """200 abandoned 4,096-item requests used to be signed for clients that were gone."""
    import socket
    from cryptobat import native
    from cryptobat.client import SocketClient
    home, _ = configured
    d = Daemon(home, "--no-pkcs11")
    try:
        c = SocketClient(str(home / "native.sock"), CONFIGURED_PIN)
        k = next(k for k in c.keys() if k.label == "z")
        now = c.time()
        c.close()

        def signatures() -> int:
            line = next(l for l in cli("status", home=home).stdout.splitlines() if l.startswith("counters"))
            return int(line.split("signatures")[1].split()[0])

        before = signatures()
        frame = native.encode(native.sign_request([("z", payload(k, now=now))] * 4096))
        for _ in range(20):
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(home / "native.sock"))
            s.sendall(native.encode(native.login_request(CONFIGURED_PIN)))
            n = int.from_bytes(s.recv(4), "big")
            s.recv(n)
            s.sendall(frame)
            s.shutdown(socket.SHUT_WR)
            s.close()
        c = SocketClient(str(home / "native.sock"), CONFIGURED_PIN)  # a client that stays gets its signatures
        assert c.timed_sign([("z", payload(k, now=now))])[0].ok
        c.close()
        time.sleep(1.5)  # counters reach the audit log about once a second
        assert signatures() - before < 4096, "abandoned requests were signed"
    finally:
        d.stop()


def test_a_digest_that_failed_at_the_token_ends_its_operation(small_disk):
    """C_Digest whose binding could not be recorded (full disk) fails and ends the operation, as
    PKCS#11 says; a retry is refused, not answered with the hash of the data fed twice."""
    from cryptobat.p11rpc import constants as C
    from cryptobat.p11rpc.codec import Mechanism
    home = small_disk / "t"
    d = Daemon(home, codes=setup_home(home, keys=(("13", "k13"),), compat=()))
    try:
        c = SockClient(home / "pkcs11.sock")
        h = c.start()
        officers = d.officers_session()
        from cryptobat.client import SocketClient
        sc = SocketClient(str(home / "native.sock"), PIN.decode())
        key, now = sc.keys()[0], sc.time()
        sc.close()
        data = make_signing_data(key, now + 3600, now - 60)  # RRSIG data the policy accepts: bound
        fill(small_disk / "filler")
        for j in range(500):
            if officers.cmd(f"setmaxval {3000 + j}").startswith("fail:"):
                break
        else:
            pytest.fail("the store never filled up")
        c.ok("C_DigestInit", h, Mechanism(C.CKM_SHA256, None))
        rv, _ = c.call("C_Digest", h, data, 32)
        assert rv == C.CKR_DEVICE_ERROR, hex(rv)
        rv, _ = c.call("C_Digest", h, data, 32)
        assert rv == C.CKR_OPERATION_NOT_INITIALIZED, hex(rv)
        (small_disk / "filler").unlink()
        c.ok("C_DigestInit", h, Mechanism(C.CKM_SHA256, None))
        (digest,) = c.ok("C_Digest", h, data, 32)
        assert digest.data == hashlib.sha256(data).digest()
        officers.close()
        c.close()
    finally:
        d.stop()
