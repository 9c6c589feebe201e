"""Restarting the daemon (``cryptobat serve --replace``, SIGHUP) without its signers noticing.

The daemon re-executes itself in place (same pid) with its listening and client sockets and
each connection's state handed over; the stock p11-kit-client.so keeps its connection and
its sessions, so a PKCS#11 client that never re-initialises signs on. Also: PowerDNS across
a restart, an upgrade to changed code (a copy of the source on PYTHONPATH), and restarts
that fail (new code that cannot start, new code that cannot take the state over) leaving
the old daemon serving the very same connections.
"""
from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dns.rrset
import pytest

from cryptobat import native
from cryptobat.client import connect
from cryptobat.p11rpc import constants as C
from cryptobat.p11rpc.calls import BY_NAME
from cryptobat.p11rpc.codec import encode_request, parse_response
from cryptobat.p11rpc.framing import FrameDecoder, encode_frame
from cryptobat.p11rpc.module import HANDSHAKE, SLOT_ID
from cryptobat.serve import RESTART_NOTICE
from support import (DAY, PIN, ROOT, ConsoleSocket, Daemon, as_user, cli, client_module, pdns_validates,
                     setup_home, signing_data, validate)

KEYS = (("8", "k8"), ("13", "k13"))

CLIENT = textwrap.dedent("""
    import sys, pkcs11
    from pkcs11 import KeyType, Mechanism, ObjectClass
    lib = pkcs11.lib(sys.argv[1])
    tok = next(t for t in (s.get_token() for s in lib.get_slots()) if t.manufacturer_id == "Cryptobat")
    s = tok.open(user_pin=sys.argv[2])
    keys = {"rsa": s.get_key(ObjectClass.PRIVATE_KEY, KeyType.RSA, label="k8"),
            "ecdsa": s.get_key(ObjectClass.PRIVATE_KEY, KeyType.EC, label="k13")}
    mechs = {"rsa": Mechanism.SHA256_RSA_PKCS, "ecdsa": Mechanism.ECDSA}
    print("ready", flush=True)
    for line in sys.stdin:
        cmd, arg = line.split()
        try:
            if cmd == "digest":
                out = s.digest(bytes.fromhex(arg), mechanism=Mechanism.SHA256).hex()
            else:
                out = keys[cmd].sign(bytes.fromhex(arg), mechanism=mechs[cmd]).hex()
        except pkcs11.exceptions.PKCS11Error as e:
            out = "error:" + type(e).__name__
        print(out, flush=True)
""")


class P11Client:
    """python-pkcs11 over p11-kit-client.so in a subprocess: one C_Initialize, one session, one login."""

    def __init__(self, daemon: Daemon) -> None:
        env = dict(os.environ, P11_KIT_SERVER_ADDRESS=daemon.address)
        self.p = subprocess.Popen([sys.executable, "-c", CLIENT, client_module(), PIN.decode()], env=env,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.ask_line() == "ready"

    def ask_line(self) -> str:
        line = self.p.stdout.readline().strip()
        assert line, self.p.stderr.read() if self.p.poll() is not None else "no answer"
        return line

    def ask(self, cmd: str, data: bytes) -> str:
        self.p.stdin.write(f"{cmd} {data.hex()}\n")
        self.p.stdin.flush()
        return self.ask_line()

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait(timeout=30)


class Signing:
    """RRSIG signing data for the token's keys, and checks of the signatures over it."""

    def __init__(self, home: Path) -> None:
        c = connect(home=home, pin=PIN.decode())
        try:
            self.now = c.time()
            self.keys = {k.label: k for k in c.keys()}
        finally:
            c.close()
        self.n = 0

    def data(self, label: str):
        self.n += 1
        rrset = dns.rrset.from_text(f"host{self.n}.testzone.", 300, "IN", "A", f"192.0.2.{self.n}")
        tpl, data = signing_data(self.keys[label], rrset, self.now - 60, self.now + 1800)
        return rrset, tpl, data

    def check(self, label: str, rrset, tpl, sig_hex: str) -> None:
        assert not sig_hex.startswith("error"), sig_hex
        validate(self.keys[label], rrset, tpl, bytes.fromhex(sig_hex), self.now)


def replace(home: Path) -> subprocess.CompletedProcess:
    """``cryptobat serve --replace``, run from this checkout (whatever code the daemon would restart into)."""
    return cli("serve", "--replace", home=home, timeout=180, env={"PYTHONPATH": str(ROOT / "src")})


def audit(home: Path, n: int = 30) -> list[dict]:
    import json
    out = cli("audit", "-n", str(n), home=home).stdout
    return [json.loads(l) for l in out.splitlines() if l.startswith("{")]


def events(home: Path) -> list[str]:
    return [e["event"] for e in audit(home)]


@pytest.fixture
def daemon(tmp_path):
    home = tmp_path / "token"
    codes = setup_home(home, keys=KEYS, compat=())
    d = Daemon(home, codes=codes)
    yield d
    d.stop()


@pytest.fixture
def source(tmp_path, monkeypatch):
    """A copy of the package on PYTHONPATH, as the code the daemon (and any restart) runs."""
    src = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "cryptobat", src / "cryptobat", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    return src / "cryptobat"


@pytest.fixture
def copied_daemon(tmp_path, source):
    home = tmp_path / "token"
    codes = setup_home(home, keys=KEYS, compat=())
    d = Daemon(home, codes=codes)
    yield d, source
    d.stop()


def _both_sign(client: P11Client, sig: Signing, native_client) -> None:
    rrset, tpl, data = sig.data("k8")
    sig.check("k8", rrset, tpl, client.ask("rsa", data))
    rrset, tpl, data = sig.data("k13")
    res = native_client.timed_sign([("k13", data)])[0]
    assert res.ok, res.reason
    validate(sig.keys["k13"], rrset, tpl, res.signature, sig.now)


# --- (a) a PKCS#11 client through p11-kit-client.so signs on across restarts -----------------

def test_p11_client_signs_on_across_restarts(daemon):
    pid = daemon.pid
    sig = Signing(daemon.home)
    client = P11Client(daemon)
    nat = connect(home=daemon.home, pin=PIN.decode())  # a native connection, logged in
    try:
        _both_sign(client, sig, nat)
        # PowerDNS's ECDSA: C_Digest over the signing data now, C_Sign(CKM_ECDSA) of it after the restart
        ec_rrset, ec_tpl, ec_data = sig.data("k13")
        digest = client.ask("digest", ec_data)
        r = replace(daemon.home)
        assert r.returncode == 0 and r.stdout.startswith("ok: restarted"), r.stdout + r.stderr
        assert "took over 1 PKCS#11 and 1 native connections" in r.stdout, r.stdout
        assert daemon.alive() and daemon.pid == pid  # the same process: systemd's main PID stays
        sig.check("k13", ec_rrset, ec_tpl, client.ask("ecdsa", bytes.fromhex(digest)))  # the bound digest survived
        _both_sign(client, sig, nat)
        daemon.p.send_signal(signal.SIGHUP)  # the other way to restart
        deadline = time.time() + 30
        while events(daemon.home).count("takeover") < 2:
            assert time.time() < deadline, events(daemon.home)
            time.sleep(0.2)
        _both_sign(client, sig, nat)
        assert client.ask("ecdsa", bytes.fromhex(digest)).startswith("error:FunctionRejected")  # used once only
    finally:
        nat.close()
        client.close()
    takeovers = [e for e in audit(daemon.home) if e["event"] == "takeover"]
    assert len(takeovers) == 2 and all(e["old_pid"] == e["pid"] == pid for e in takeovers), takeovers
    assert takeovers[0]["pkcs11"] == 1 and takeovers[0]["native"] == 1
    assert events(daemon.home).count("restart") == 2 and "restart-failed" not in events(daemon.home)


LOOP_CLIENT = textwrap.dedent("""
    import os, sys, pkcs11
    from pkcs11 import KeyType, Mechanism, ObjectClass
    lib = pkcs11.lib(sys.argv[1])
    pin, data, stop = sys.argv[2], bytes.fromhex(sys.argv[3]), sys.argv[4]
    tok = next(t for t in (s.get_token() for s in lib.get_slots()) if t.manufacturer_id == "Cryptobat")
    n = errors = 0
    last = ""
    print("ready", flush=True)
    while not os.path.exists(stop):
        try:
            with tok.open(user_pin=pin) as s:  # a session, a login, a find and five signatures each time
                k = s.get_key(ObjectClass.PRIVATE_KEY, KeyType.RSA, label="k8")
                for _ in range(5):
                    last = k.sign(data, mechanism=Mechanism.SHA256_RSA_PKCS).hex()
                    n += 1
        except pkcs11.exceptions.PKCS11Error as e:
            errors += 1
            print("error", type(e).__name__, file=sys.stderr, flush=True)
    print(n, errors, last, flush=True)
""")


def test_restarts_under_load(daemon, tmp_path):
    """Clients busy signing (PKCS#11 sessions opened, logged in and closed in a loop; native
    batches) through three restarts: not one call fails."""
    import threading
    sig = Signing(daemon.home)
    rrset, tpl, data = sig.data("k8")
    stop = tmp_path / "stop"
    env = dict(os.environ, P11_KIT_SERVER_ADDRESS=daemon.address)
    loop = subprocess.Popen([sys.executable, "-c", LOOP_CLIENT, client_module(), PIN.decode(), data.hex(), str(stop)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert loop.stdout.readline().strip() == "ready"
    native_runs = {"n": 0, "errors": []}
    done = threading.Event()

    def native_loop() -> None:
        c = connect(home=daemon.home, pin=PIN.decode())
        _, _, d13 = sig.data("k13")
        try:
            while not done.is_set():
                try:
                    res = c.timed_sign([("k13", d13)] * 20)
                    assert all(r.ok for r in res), res[0].reason
                    native_runs["n"] += 1
                except Exception as e:
                    native_runs["errors"].append(repr(e))
        finally:
            c.close()
    t = threading.Thread(target=native_loop)
    t.start()
    try:
        for _ in range(3):
            time.sleep(1.5)
            r = replace(daemon.home)
            assert r.returncode == 0, r.stdout + r.stderr
        time.sleep(1.5)
    finally:
        done.set()
        stop.touch()
        t.join(60)
        out, err = loop.communicate(timeout=120)
    n, errors, last = out.split()
    assert int(errors) == 0 and "error" not in err, err
    assert int(n) > 20 and native_runs["n"] > 10 and not native_runs["errors"], (n, native_runs)
    sig.check("k8", rrset, tpl, last)
    assert events(daemon.home).count("takeover") == 3


class RawP11:
    """p11-kit's RPC by hand, to leave a frame half sent across a restart."""

    def __init__(self, path: Path) -> None:
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(30)
        self.s.connect(str(path))
        self.s.sendall(b"\0")
        assert self.s.recv(1) == b"\0"
        self.code, self.frames = 0, FrameDecoder()

    def frame(self, name: str, *args) -> bytes:
        self.code += 1
        return encode_frame(self.code, encode_request(name, list(args), 0), b"client")

    def answer(self, name: str) -> list:
        while True:
            frames = self.frames.feed(self.s.recv(65536) or b"")
            if frames:
                rv, vals = parse_response(frames[0].body, BY_NAME[name], 0)
                assert rv == 0, hex(rv)
                return vals

    def call(self, name: str, *args) -> list:
        self.s.sendall(self.frame(name, *args))
        return self.answer(name)


def test_half_sent_requests_complete_after_restart(daemon):
    """Bytes of a request the old daemon read but could not yet act on go to the new one."""
    p = RawP11(daemon.p11)
    p.call("C_Initialize", HANDSHAKE, 0, None)
    (h,) = p.call("C_OpenSession", SLOT_ID, C.CKF_SERIAL_SESSION)
    p.call("C_Login", h, C.CKU_USER, PIN)
    half = p.frame("C_GetSessionInfo", h)
    p.s.sendall(half[:7])
    n = socket.socket(socket.AF_UNIX)
    n.settimeout(30)
    n.connect(str(daemon.home / "native.sock"))
    req = native.encode({"op": "time"})
    n.sendall(req[:6])
    time.sleep(0.5)  # both daemons' readers have taken the first bytes
    r = replace(daemon.home)
    assert r.returncode == 0, r.stdout + r.stderr
    p.s.sendall(half[7:])
    slot, state, flags, _ = p.answer("C_GetSessionInfo")
    assert slot == SLOT_ID and state == C.CKS_RO_USER_FUNCTIONS  # the session, still logged in
    n.sendall(req[6:])
    (length,) = struct.unpack("!I", n.recv(4))
    body = b""
    while len(body) < length:
        body += n.recv(length - len(body))
    assert "time" in native.decode(body)
    p.s.close()
    n.close()


def test_console_sessions_end_with_a_notice(daemon):
    con = ConsoleSocket(daemon.home / "console.sock")
    try:
        r = replace(daemon.home)
        assert r.returncode == 0, r.stdout + r.stderr
        rest = b""
        while chunk := con.s.recv(4096):
            rest += chunk
        assert rest == RESTART_NOTICE
    finally:
        con.close()
    c = ConsoleSocket(daemon.home / "console.sock")  # the console socket itself serves on
    try:
        assert "ok" in c.cmd("date")
    finally:
        c.close()


def test_control_socket_is_owner_only(daemon):
    path = daemon.home / "control.sock"
    assert path.stat().st_mode & 0o777 == 0o600
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(str(path))
    s.sendall(b"stop\n")
    assert s.recv(4096).startswith(b"fail: unknown request")
    s.close()
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")

        def reach() -> str:
            c = socket.socket(socket.AF_UNIX)
            try:
                c.connect(str(path))
                c.sendall(b"restart\n")
                return c.recv(100).decode() or "closed"
            finally:
                c.close()
        (res,) = as_user(nobody.pw_uid, nobody.pw_gid, [], [reach])
        assert res.startswith("PermissionError"), res  # the home is 0700 (and the peer check is behind it)
    assert "takeover" not in events(daemon.home)


# --- an upgrade, and restarts that fail --------------------------------------------------------

def test_upgrade_to_changed_code(copied_daemon):
    daemon, src = copied_daemon
    sig = Signing(daemon.home)
    client = P11Client(daemon)
    try:
        rrset, tpl, data = sig.data("k8")
        sig.check("k8", rrset, tpl, client.ask("rsa", data))
        init = src / "__init__.py"
        init.write_text(init.read_text().replace('__version__ = "', '__version__ = "9.9.9+upgrade.'))
        r = replace(daemon.home)
        assert r.returncode == 0, r.stdout + r.stderr
        old, new = re.search(r"runs code (\w+) \(was (\w+)\)", r.stdout).group(2, 1)
        assert old != new  # the new code runs
        assert "9.9.9+upgrade" in cli("console", home=daemon.home, input="version\n").stdout
        rrset, tpl, data = sig.data("k8")
        sig.check("k8", rrset, tpl, client.ask("rsa", data))
    finally:
        client.close()
    (t,) = [e for e in audit(daemon.home) if e["event"] == "takeover"]
    assert (t["old_code"], t["code"]) == (old, new)


def test_new_code_that_cannot_start_leaves_the_old_serving(copied_daemon):
    daemon, src = copied_daemon
    pid = daemon.pid
    sig = Signing(daemon.home)
    client = P11Client(daemon)
    nat = connect(home=daemon.home, pin=PIN.decode())
    try:
        _both_sign(client, sig, nat)
        good = (src / "serve.py").read_text()
        (src / "serve.py").write_text(good + "\nthis is not Python (\n")  # a broken upgrade
        r = replace(daemon.home)
        assert r.returncode == 1, r.stdout + r.stderr
        assert r.stdout.startswith("fail: not restarted, still serving: the new code did not start"), r.stdout
        assert "SyntaxError" in r.stdout
        assert daemon.alive() and daemon.pid == pid
        _both_sign(client, sig, nat)  # never even paused
        ev = events(daemon.home)
        assert "restart" not in ev and "takeover" not in ev
        (src / "serve.py").write_text(good)  # fixed: now it restarts
        r = replace(daemon.home)
        assert r.returncode == 0, r.stdout + r.stderr
        _both_sign(client, sig, nat)
    finally:
        nat.close()
        client.close()


def test_new_code_that_cannot_take_over_leaves_the_old_serving(copied_daemon):
    """The new code starts but refuses the old one's state (here: a handover format it does not
    know), after the old daemon stopped reading and closed the token: the old reopens the token
    and serves the same connections on, sessions, logins and all."""
    daemon, src = copied_daemon
    pid = daemon.pid
    sig = Signing(daemon.home)
    client = P11Client(daemon)
    nat = connect(home=daemon.home, pin=PIN.decode())
    try:
        _both_sign(client, sig, nat)
        ec_rrset, ec_tpl, ec_data = sig.data("k13")
        digest = client.ask("digest", ec_data)
        code = (src / "serve.py").read_text()
        (src / "serve.py").write_text(code.replace("HANDOVER_FORMAT = 1\n", "HANDOVER_FORMAT = 1000\n"))
        r = replace(daemon.home)
        assert r.returncode == 1, r.stdout + r.stderr
        assert "fail: not restarted, still serving: the new code cannot take over" in r.stdout, r.stdout
        assert "handover format 1 is not this version's (1000)" in r.stdout, r.stdout
        assert daemon.alive() and daemon.pid == pid
        sig.check("k13", ec_rrset, ec_tpl, client.ask("ecdsa", bytes.fromhex(digest)))
        _both_sign(client, sig, nat)
        ev = events(daemon.home)
        assert "restart" in ev and "restart-failed" in ev and "takeover" not in ev, ev
        assert [e for e in audit(daemon.home) if e["event"] == "restart-failed"][0]["why"].startswith(
            "the new code cannot take over")
    finally:
        nat.close()
        client.close()


def test_busy_connection_calls_the_restart_off(daemon):
    """A native client that sends requests but does not read the answers keeps its handler busy
    writing: after PARK_SECONDS the restart is called off, and everything, the connections already
    stopped for the handover included, serves on in the old code."""
    from cryptobat.serve import PARK_SECONDS
    sig = Signing(daemon.home)
    client = P11Client(daemon)
    nat = connect(home=daemon.home, pin=PIN.decode())
    stuck = socket.socket(socket.AF_UNIX)
    stuck.connect(str(daemon.home / "native.sock"))
    try:
        _both_sign(client, sig, nat)
        n = 3000  # answers far beyond what the socket buffers hold
        stuck.sendall(native.encode({"op": "keys"}) * n)
        time.sleep(1)
        t0 = time.monotonic()
        r = replace(daemon.home)
        assert r.returncode == 1, r.stdout + r.stderr
        assert r.stdout.startswith("fail: not restarted, still serving: native calls under way did not finish"), \
            r.stdout
        assert time.monotonic() - t0 >= PARK_SECONDS - 1
        _both_sign(client, sig, nat)
        stuck.settimeout(30)
        f = stuck.makefile("rb")
        for _ in range(n):
            (length,) = struct.unpack("!I", f.read(4))
            assert "keys" in native.decode(f.read(length))
        ev = events(daemon.home)
        assert "restart" not in ev and "takeover" not in ev, ev
        r = replace(daemon.home)  # with the client reading again, the restart goes through
        assert r.returncode == 0, r.stdout + r.stderr
        assert "took over 1 PKCS#11 and 2 native connections" in r.stdout, r.stdout
        _both_sign(client, sig, nat)
        stuck.sendall(native.encode({"op": "time"}))
        (length,) = struct.unpack("!I", f.read(4))
        assert "time" in native.decode(f.read(length))
    finally:
        stuck.close()
        nat.close()
        client.close()


def test_replace_without_a_daemon(tmp_path):
    home = tmp_path / "token"
    setup_home(home, keys=(), compat=())
    r = replace(home)
    assert r.returncode == 1 and "no daemon to replace" in r.stderr, r.stdout + r.stderr


# --- (b) PowerDNS keeps signing across a restart, never restarted itself ----------------------

def _signed_fresh(pdns, zone: str, name: str) -> None:
    """A name never asked before: PowerDNS must have the token sign it now."""
    pdns.util("add-record", zone, name, "A", "192.0.2.99")
    status, sets = pdns.query(f"{name}.{zone}", "A")
    assert status == "NOERROR" and (f"{name}.{zone}", "RRSIG A") in sets, (status, sets)


def test_pdns_signs_on_across_restart(signer):
    hsm, pdns = signer(14 * DAY)
    pid, pdns_pid = hsm.proc.pid, pdns.proc.pid
    for zone in ("example.org.", "example.net."):
        pdns_validates(pdns, zone, hsm.keys_of(zone))
    r = replace(hsm.home)
    assert r.returncode == 0 and r.stdout.startswith("ok: restarted"), r.stdout + r.stderr
    took = int(re.search(r"took over (\d+) PKCS#11", r.stdout).group(1))
    assert took >= 1  # PowerDNS's connections
    assert hsm.proc.poll() is None and hsm.proc.pid == pid and pdns.proc.poll() is None and pdns.proc.pid == pdns_pid
    for zone in ("example.org.", "example.net."):  # RSA through C_Sign, ECDSA through C_Digest + C_Sign
        _signed_fresh(pdns, zone, "after1")
        pdns_validates(pdns, zone, hsm.keys_of(zone))
    r = replace(hsm.home)  # and once more
    assert r.returncode == 0, r.stdout + r.stderr
    for zone in ("example.org.", "example.net."):
        _signed_fresh(pdns, zone, "after2")
        pdns_validates(pdns, zone, hsm.keys_of(zone))
    assert "CKR_DEVICE_ERROR" not in pdns.text() and "CKR_CRYPTOKI_NOT_INITIALIZED" not in pdns.text()
    time.sleep(1.5)  # the daemon writes its signing counts about once a second
    ev = [e["event"] for e in hsm.audit(60)]
    assert ev.count("takeover") == 2 and "sign" in ev[ev.index("takeover") + 1:], ev
    assert hsm.refusals() == {}
