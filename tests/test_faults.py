"""Faults, through the real binaries: the daemon or an embedded signzone killed with SIGKILL mid-run,
a daemon connection cut mid-command, and the fault campaign (``bench/faults.py``) in small.

What must hold: a client whose daemon dies says so in one line and exits 1 (a broken pipe on the
daemon's socket is not a closed stdout); nothing the token started (signing workers, which hold
unsealed keys) outlives the process that started it, however that process ends; a normal run
leaves no process behind.
"""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cryptobat import signing, workers
from cryptobat.client import connect
from cryptobat.errors import CryptobatError
from support import (MAX_VALIDITY, PIN, ROOT, Daemon, alive, children, cli, cmdline, descendants,
                     make_signing_data, make_token, mentioning, signing_token, survivors)


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def reaper():
    """PIDs to SIGKILL at the end of the test if still alive (a failing test leaves nothing behind)."""
    pids: set[int] = set()
    yield pids
    for p in pids:
        if alive(p):
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass


def watch(pid: int, into: set[int], stop: threading.Event) -> threading.Thread:
    """Record every descendant of ``pid`` seen until ``stop``."""
    def loop() -> None:
        while not stop.is_set():
            into.update(descendants(pid))
            time.sleep(0.01)
    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return t


# ---------------------------------------------------------------- a token and zones

def csk_token(home: Path) -> None:
    """A quorum-1 token set up as the PKCS#11 tests do (signer PIN ``PIN``), with a CSK for testzone."""
    make_token(home, quorum=1, maxval=MAX_VALIDITY, pin=PIN.decode(), keys=("13 csk testzone c13",))


def write_zone(path: Path, names: int, txt: bool = True) -> Path:
    with open(path, "w") as f:
        f.write("$TTL 3600\n$ORIGIN testzone.\n@ IN SOA ns1 hostmaster 1 7200 3600 1209600 300\n  NS ns1\n"
                "ns1 A 192.0.2.1\n")
        for i in range(names):
            f.write(f"h{i} A 192.0.2.{i % 250 + 1}\n")
            if txt:
                f.write(f'  TXT "host {i}"\n')
    return path


def signzone_cmd(zone: Path, out: Path, *pre: str) -> list[str]:
    return [sys.executable, "-m", "cryptobat", *pre, "signzone", "-S", "-o", "testzone", "-e", "+86400",
            "-f", str(out), str(zone)]


# ---------------------------------------------------------------- 1: the daemon dies under a client

def test_signzone_hsm_daemon_killed_mid_run_fails_in_one_line(tmp_path, reaper):
    """signzone --hsm: the daemon gets SIGKILL while it signs signzone's batches. signzone exits 1
    with one line naming the daemon, writes no output file and leaves no temporary file."""
    home = tmp_path / "token"
    csk_token(home)
    zone = write_zone(tmp_path / "testzone", 20000)
    d = Daemon(home, "--no-pkcs11")
    reaper.add(d.pid)
    out = tmp_path / "testzone.signed"
    sock = home / "native.sock"
    p = subprocess.Popen(signzone_cmd(zone, out) + ["--hsm", f"unix:{sock}"],
                         env=dict(os.environ, CRYPTOBAT_PIN=PIN.decode()),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reaper.add(p.pid)
    try:
        # mid-run: the daemon has started its signing workers for signzone's first large batch
        wait_for(lambda: children(d.pid) or p.poll() is not None, 120, "the daemon's signing workers")
        time.sleep(random.uniform(0.2, 1.0))
        assert p.poll() is None, "signzone finished before the daemon could be killed"
        family = descendants(d.pid)
        reaper.update(family)
        os.kill(d.pid, signal.SIGKILL)
        d.p.wait()
        stdout, stderr = p.communicate(timeout=120)
    finally:
        d.stop()
    lines = stderr.strip().splitlines()
    assert p.returncode == 1, (p.returncode, stdout, stderr)
    assert "Traceback" not in stderr
    assert len(lines) == 1, stderr
    assert "closed the connection mid-request" in lines[0] and str(sock) in lines[0], lines[0]
    assert stdout == ""
    assert not out.exists()
    assert not list(tmp_path.glob(".testzone.signed.*")), "a temporary output file was left"
    assert not survivors(family)


class FakeConsole:
    """A console socket in ``home`` that shows a prompt and then does ``what`` with each connection."""

    def __init__(self, home: Path, what: str) -> None:
        home.mkdir(exist_ok=True)
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(str(home / "console.sock"))
        self.sock.listen()
        self.what = what
        self.conns: list[socket.socket] = []
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)
            threading.Thread(target=self.one, args=(c,), daemon=True).start()

    def one(self, c: socket.socket) -> None:
        try:
            if self.what == "cut":  # the daemon stops reading: the command sent meets a closed socket
                c.shutdown(socket.SHUT_RD)
                c.sendall(b"> ")
            else:  # a long answer to whatever comes, for a reader that went away
                c.sendall(b"> ")
                if c.recv(100):
                    c.sendall((b"x" * 99 + b"\n") * 160 + b"> ")
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


def test_console_command_cut_by_the_daemon_is_an_error(tmp_path):
    """A daemon that goes away mid-command: the broken pipe on its socket is an error (exit 1, one
    line), not the quiet exit of a closed stdout."""
    home = tmp_path / "home"
    fake = FakeConsole(home, "cut")
    try:
        r = cli("status", home=home, timeout=60)
    finally:
        fake.close()
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "connection" in r.stderr, r.stderr


def test_closed_stdout_still_exits_quietly(tmp_path):
    """`cryptobat status | head -1`: the reader goes away; cryptobat stops with status 0 and no message."""
    import fcntl
    home = tmp_path / "home"
    fake = FakeConsole(home, "long")
    r, w = os.pipe()
    fcntl.fcntl(r, 1031, 4096)  # F_SETPIPE_SZ: the answer does not fit, the write meets the closed end
    try:
        p = subprocess.Popen([sys.executable, "-m", "cryptobat", "--home", str(home), "status"],
                             stdout=w, stderr=subprocess.PIPE)
        os.close(w)
        os.read(r, 1)
        os.close(r)
        stderr = p.stderr.read().decode()
        p.wait(timeout=60)
    finally:
        fake.close()
    assert p.returncode == 0 and stderr == "", (p.returncode, stderr)


# ---------------------------------------------------------------- 2: nothing outlives its parent

def test_daemon_kill9_leaves_no_process(tmp_path, reaper):
    """The daemon gets SIGKILL while its workers sign a large native-API batch: every process it
    started (the workers hold unsealed keys) is gone within seconds."""
    home = tmp_path / "token"
    csk_token(home)
    d = Daemon(home, "--no-pkcs11")
    reaper.add(d.pid)
    client = connect(f"unix:{home / 'native.sock'}", pin=PIN.decode())
    key = next(k for k in client.keys() if k.label == "c13")
    now = client.time()
    data = make_signing_data(key, now + 86400, now - 3600)
    errors: list[BaseException] = []

    def sign() -> None:
        try:
            for _ in range(20):
                client.timed_sign([("c13", data)] * 20000)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=sign, daemon=True)
    t.start()
    try:
        wait_for(lambda: len(children(d.pid)) >= 1, 60, "the daemon's signing workers")
        time.sleep(0.5)
        family = descendants(d.pid)
        reaper.update(family)
        os.kill(d.pid, signal.SIGKILL)
        d.p.wait()
        left = survivors(family)
        t.join(30)
    finally:
        client.close()
        d.stop()
    assert family
    assert not left, f"processes outlived the daemon: {left}"
    assert not {p: cmdline(p) for p in mentioning(str(home))}
    assert len(errors) == 1 and isinstance(errors[0], CryptobatError), errors


def _kill_embedded_signzone(tmp_path, reaper, names: int, settle) -> dict[int, str]:
    home = tmp_path / "token"
    csk_token(home)
    zone = write_zone(tmp_path / "testzone", names, txt=False)
    p = subprocess.Popen(signzone_cmd(zone, tmp_path / "out", "--home", str(home)),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    reaper.add(p.pid)
    seen: set[int] = set()
    stop = threading.Event()
    w = watch(p.pid, seen, stop)
    try:
        wait_for(lambda: settle(p.pid) or p.poll() is not None, 120, "signzone's worker processes")
        assert p.poll() is None, "signzone finished before it could be killed"
        stop.set()
        w.join()
        family = seen | descendants(p.pid)
        reaper.update(family)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    finally:
        stop.set()
    assert family
    left = survivors(family)
    left.update({q: cmdline(q) for q in mentioning(str(home))})
    return left


def test_embedded_signzone_kill9_leaves_no_process(tmp_path, reaper):
    """An embedded signzone (the token in-process) gets SIGKILL while its signing workers run:
    they, and anything else it started, are gone within seconds. (A zone file under 240 kB, so that
    signzone verifies in threads; see the next test for its verifier processes.)"""
    left = _kill_embedded_signzone(tmp_path, reaper, 9000, lambda pid: len(children(pid)) >= 1)
    assert not left, f"processes outlived signzone: {left}"


def test_embedded_signzone_kill9_with_verifier_processes_leaves_no_process(tmp_path, reaper):
    """The same with a zone big enough for verifier processes (forked from signzone, beside
    the token's signing workers): none outlives it."""
    def verifying(pid: int) -> bool:
        return sum(1 for q in children(pid) if cmdline(q) == cmdline(pid)) >= 1
    left = _kill_embedded_signzone(tmp_path, reaper, 20000, verifying)
    assert not left, f"processes outlived signzone: {left}"


def _signzone_watched(tmp_path, reaper, names: int) -> tuple[int, str, set[int]]:
    """An embedded signzone run over a zone of ``names`` names: exit status, stderr and every
    process it started (all handed to ``reaper``)."""
    home = tmp_path / "token"
    csk_token(home)
    zone = write_zone(tmp_path / "testzone", names, txt=False)
    p = subprocess.Popen(signzone_cmd(zone, tmp_path / "out", "--home", str(home)),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reaper.add(p.pid)
    seen: set[int] = set()
    stop = threading.Event()
    w = watch(p.pid, seen, stop)
    _, err = p.communicate(timeout=300)
    stop.set()
    w.join()
    reaper.update(seen)
    return p.returncode, err, seen


def test_a_small_zone_is_signed_without_starting_any_process(tmp_path, reaper):
    """A zone whose signatures fit one in-process batch starts no signing worker (their start-up
    would cost more than the signing): the embedded signzone runs alone."""
    rc, err, seen = _signzone_watched(tmp_path, reaper, 50)
    assert rc == 0, err
    assert not seen, f"signzone started {len(seen)} process(es) for a 50-name zone"


def test_a_worker_killed_mid_zone_fails_signzone_in_one_line(tmp_path, reaper):
    """A signing worker gets SIGKILL while signzone signs a zone (parts queued in its pipe): signzone
    exits 1 with one line saying so, writes no output file, leaves no temporary file and no process."""
    home = tmp_path / "token"
    csk_token(home)
    zone = write_zone(tmp_path / "testzone", 40000, txt=False)
    out = tmp_path / "out"
    cmd = signzone_cmd(zone, out, "--home", str(home))
    cmd.insert(cmd.index("signzone") + 1, "-P")
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reaper.add(p.pid)
    seen: set[int] = set()
    stop = threading.Event()
    w = watch(p.pid, seen, stop)
    try:
        def signing() -> bool:  # the workers are up and a first batch is written
            temps = list(tmp_path.glob(".out.*.tmp"))
            return len(children(p.pid)) >= 2 and bool(temps) and temps[0].stat().st_size > 0
        wait_for(lambda: signing() or p.poll() is not None, 120, "signzone's first signed batch")
        assert p.poll() is None, "signzone finished before a worker could be killed"
        os.kill(min(children(p.pid)), signal.SIGKILL)
        _, err = p.communicate(timeout=120)
    finally:
        stop.set()
        w.join()
        reaper.update(seen)
    assert p.returncode == 1, err
    assert err.count("\n") == 1 and "fatal: signing worker failed" in err and "killed by signal 9" in err, err
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
    assert seen and not survivors(seen)


def test_normal_runs_leave_no_process(tmp_path, reaper):
    """A signzone run that uses the signing workers, and a daemon stopped with SIGTERM after a
    large batch, leave no process behind."""
    rc, err, seen = _signzone_watched(tmp_path, reaper, 3000)
    assert rc == 0, err
    home = tmp_path / "token"
    assert seen, "signzone started no worker process"
    assert not survivors(seen)

    d = Daemon(home, "--no-pkcs11")
    reaper.add(d.pid)
    client = connect(f"unix:{home / 'native.sock'}", pin=PIN.decode())
    try:
        key = next(k for k in client.keys() if k.label == "c13")
        now = client.time()
        res = client.timed_sign([("c13", make_signing_data(key, now + 86400, now - 3600))] * 2000)
        assert all(r.ok for r in res)
        workers = descendants(d.pid)
        reaper.update(workers)
    finally:
        client.close()
        d.stop()
    assert workers and d.p.returncode == 0
    assert not survivors(workers)
    assert not mentioning(str(home))


def test_workers_outlive_the_thread_that_asked_for_them(tmp_path):
    """A worker's parent-death signal follows the thread that started it: the daemon's connection
    threads come and go, and the workers they used must stay (and be reused) until the token closes."""
    t, engine = signing_token(tmp_path / "t")
    try:
        k = t.key("z")
        now = t.now()
        items = [("z", make_signing_data(k, now + 600, now - 60))] * (workers.PARALLEL_MIN * 4)
        pids: list[set[int]] = []

        def batch() -> None:
            assert all(r.ok for r in t.timed_sign(items, run=engine.run))
            pids.append(children(os.getpid()))

        for _ in range(2):
            th = threading.Thread(target=batch)
            th.start()
            th.join()
            time.sleep(0.5)  # the thread is gone: a signal tied to it would have fired by now
        assert len(pids) == 2 and pids[0] and pids[0] == pids[1], pids
        assert all(alive(p) for p in pids[0])
    finally:
        engine.close()
        t.close()
    assert not survivors(pids[0])


def test_a_killed_worker_fails_one_batch_not_the_token(tmp_path):
    """A worker killed mid-batch fails that batch with one CryptobatError; one killed while idle
    costs nothing; either way the next batch runs on fresh workers."""
    t, engine = signing_token(tmp_path / "t")
    try:
        k = t.key("z")
        now = t.now()
        items = [("z", make_signing_data(k, now + 600, now - 60))] * 40000
        out: list = []

        def batch() -> None:
            try:
                out.append(t.timed_sign(items, run=engine.run))
            except CryptobatError as e:
                out.append(e)

        th = threading.Thread(target=batch)
        th.start()
        wait_for(lambda: len(children(os.getpid())) >= 2, 60, "the workers")
        time.sleep(0.3)
        victim = min(children(os.getpid()))
        os.kill(victim, signal.SIGKILL)
        th.join(120)
        assert isinstance(out[0], CryptobatError) and "signing worker failed" in str(out[0]), out[0]
        assert all(r.ok for r in t.timed_sign(items[:1000], run=engine.run))
        os.kill(min(children(os.getpid())), signal.SIGKILL)  # idle
        time.sleep(0.2)
        assert all(r.ok for r in t.timed_sign(items[:1000], run=engine.run))
        assert len(children(os.getpid())) == 2
    finally:
        engine.close()
        t.close()


def test_key_cache_holds_few_keys_and_forgets_idle_ones():
    """Workers keep at most a few unsealed keys, drop a key unused for a while, and the custody
    with the last of them."""
    now = [0.0]
    opened: list[object] = []

    class Custody:
        def load(self, algorithm, blob, aad):
            return ("loaded", blob)

    def opener():
        opened.append(Custody())
        return opened[-1]

    cache = signing.KeyCache(None, size=3, idle=60, opener=opener, clock=lambda: now[0])
    key = lambda i: signing.SignKey(info=type("I", (), {"algorithm": 13})(), zone_wire=b"", blob=bytes([i]))  # noqa: E731
    for i in range(5):
        cache.get(f"k{i}", key(i))
        now[0] += 1
    assert len(cache) == 3 and len(opened) == 1
    cache.get("k4", key(4))
    now[0] += 59.5
    cache.expire()
    assert len(cache) == 1 and cache.custody is not None  # k4 was used 59.5 s ago
    now[0] += 1
    cache.expire()
    assert len(cache) == 0 and cache.custody is None
    cache.get("k1", key(1))
    assert len(opened) == 2  # opened again for the next batch


# ---------------------------------------------------------------- 3: the fault campaign, small

def test_fault_campaign_small(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "faults.py"), "--trials", "3", "--wal-trials", "1",
                        "--flip-trials", "3", "--seed", "1", "--json", "--keep", str(tmp_path / "campaign")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    s = json.loads(r.stdout)
    assert s["trials"] == 3 and s["state_old_or_new"] == 3, s
    assert s["acked_lost"] == 0 and s["orphans"] == 0 and s["tracebacks"] == 0, s
    assert s["audit_failures"] == 0 and s["restart_failures"] == 0, s
    assert s["acked_changes"] > 0 and s["signatures"] > 0, s
    assert s["wal"]["trials"] == 1 and s["wal"]["tracebacks"] == 0, s
    assert s["flip"]["trials"] == 3 and s["flip"]["tracebacks"] == 0 and s["flip"]["opened_changed_state"] == 0, s
