"""Who may reach what on the daemon: socket modes and groups, peer checks, signer login, bounds.

A signing host that is broken into reaches the signer sockets (native API, PKCS#11)
and knows the signer PIN, nothing else: the console socket is the token user's and
root's only, the signer sockets also admit the signer group (``--signer-group``), and
every connection's peer credentials are checked again (SO_PEERCRED), so a loose
socket mode does not let anyone else in. Peers other than the test's own user are
forked children that drop to ``nobody`` (root only).
"""
from __future__ import annotations

import grp
import json
import os
import pwd
import re
import shutil
import socket
import stat
import tempfile
import time
from pathlib import Path

import pytest


from cryptobat import native
from cryptobat.api import KeyInfo
from cryptobat.client import SocketClient, connect
from cryptobat.errors import CryptobatError, PinLocked
from cryptobat.serve import MAX_CONNECTIONS, MAX_LINE, LineReader, SerialLine, Service
from cryptobat.token import MAX_PIN_FAILURES
from support import (PIN_TEXT, ConsoleSocket, Daemon, as_user, cli, make_signing_data, need_root, probe,
                     setup_home)


def signer_group() -> grp.struct_group:
    """A group for --signer-group: as root one that ``nobody`` is not in, else our own."""
    if os.geteuid() != 0:
        return grp.getgrgid(os.getegid())
    nobody = pwd.getpwnam("nobody")
    for name in ("pdns", "daemon", "bin", "sys", "adm"):
        try:
            g = grp.getgrnam(name)
        except KeyError:
            continue
        if g.gr_gid != nobody.pw_gid and "nobody" not in g.gr_mem:
            return g
    pytest.fail("no group to use as the signer group")


@pytest.fixture
def base():
    """A directory every user can traverse (pytest's own tmp dirs are 0700)."""
    d = Path(tempfile.mkdtemp(prefix="cryptobat-roles-", dir="/var/tmp" if os.path.isdir("/var/tmp") else None))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def token_home(base):
    home = base / "token"
    codes = setup_home(home, keys=(("13", "k13"),), compat=())
    return home, codes


# --- helpers: raw frames, peers as other users --------------------------------------------
def call(s: socket.socket, req: dict | bytes) -> dict | None:
    """One native frame out, one in (None if the daemon closed the connection)."""
    s.sendall(native.encode(req) if isinstance(req, dict) else req)
    head = _recv_exactly(s, 4)
    if len(head) < 4:
        return None
    return json.loads(_recv_exactly(s, int.from_bytes(head, "big")))


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


def native_sock(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(str(path))
    return s


def daemon_stderr(d: Daemon) -> str:
    d.stop()
    return d.p.stderr.read()


# --- socket modes, groups and peer checks -------------------------------------------------
def test_every_socket_owner_only_without_signer_group(token_home):
    home, codes = token_home
    d = Daemon(home, codes=codes)
    try:
        for name in ("console.sock", "native.sock", "pkcs11.sock"):
            st = os.stat(home / name)
            assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600, name
            assert st.st_uid == os.geteuid()
    finally:
        d.stop()


def test_signer_group_opens_the_signer_sockets_only(token_home, base):
    home, codes = token_home
    g = signer_group()
    run = base / "run"
    d = Daemon(home, "--signer-group", g.gr_name, "--socket-dir", str(run), codes=codes)
    try:
        assert stat.S_IMODE(os.stat(run).st_mode) == 0o755
        st = os.stat(run / "console.sock")
        assert stat.S_IMODE(st.st_mode) == 0o600
        for name in ("native.sock", "pkcs11.sock"):
            st = os.stat(run / name)
            assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == g.gr_gid, name
        for name in ("console.sock", "native.sock", "pkcs11.sock"):  # the home links to them
            assert os.readlink(home / name) == str(run / name)
        assert stat.S_IMODE(os.stat(home).st_mode) == 0o700
        assert probe(str(home / "native.sock")) == "served"  # the token's user, through the link
        assert " |lamb| not present" in ConsoleSocket(home / "console.sock").cmd("colist")
    finally:
        d.stop()
    assert not any((run / n).exists() or (home / n).is_symlink()
                   for n in ("console.sock", "native.sock", "pkcs11.sock"))


def test_peers_outside_the_roles_are_refused(token_home, base):
    """nobody: no socket; a signer-group member (primary or supplementary): the signer sockets only.
    With the modes loosened by hand (0666) the daemon's own peer check still refuses them."""
    need_root("to connect as other users")
    home, codes = token_home
    g = signer_group()
    nobody = pwd.getpwnam("nobody")
    run = base / "run"
    d = Daemon(home, "--signer-group", g.gr_name, "--socket-dir", str(run), codes=codes)
    paths = [run / "console.sock", run / "native.sock", run / "pkcs11.sock"]
    try:
        stranger = (nobody.pw_uid, nobody.pw_gid, [])
        by_primary = (nobody.pw_uid, g.gr_gid, [])
        by_supplementary = (nobody.pw_uid, nobody.pw_gid, [g.gr_gid])
        assert as_user(*stranger, paths) == ["EACCES", "EACCES", "EACCES"]
        assert as_user(*by_primary, paths) == ["EACCES", "served", "served"]
        assert as_user(*by_supplementary, paths) == ["EACCES", "served", "served"]
        for p in paths:
            os.chmod(p, 0o666)  # a mistake, or a socket directory someone else controls
        assert as_user(*stranger, paths) == ["closed", "closed", "closed"]
        assert as_user(*by_primary, paths) == ["closed", "served", "served"]
        assert as_user(*by_supplementary, paths) == ["closed", "served", "served"]
        assert probe(str(paths[1])) == "served" and probe(str(paths[2])) == "served"  # root still is
    finally:
        err = daemon_stderr(d)
    for p in paths:
        assert f"cryptobat serve: refused connection from uid {nobody.pw_uid} on {p}" in err, err
    assert err.count("refused connection") == 5, err  # a stranger 3 times, the members on the console


def test_unknown_signer_group_stops_the_daemon(token_home):
    home, _ = token_home
    r = cli("serve", "--signer-group", "no-such-group-here", home=home, timeout=30)
    assert r.returncode == 1 and "no group 'no-such-group-here'" in r.stderr, r.stderr
    assert not (home / "native.sock").exists()


# --- the native API: signer login --------------------------------------------------------
def test_native_sign_needs_the_signer_pin(token_home, monkeypatch):
    home, codes = token_home
    d = Daemon(home, codes=codes)
    try:
        s = native_sock(home / "native.sock")
        assert "serial" in call(s, {"op": "info"}) and "time" in call(s, {"op": "time"})  # open
        c = SocketClient(str(home / "native.sock"), PIN_TEXT)
        k = c.keys()[0]
        c.close()
        now = call(s, {"op": "time"})["time"]
        data = make_signing_data(k, now + 3600, now - 60)
        assert call(s, native.sign_request([("k13", data)])) == {"error": "not logged in", "code": "not-logged-in"}
        assert [x["label"] for x in call(s, {"op": "keys"})["keys"]] == ["k13"]  # public, as PKCS#11's
        assert call(s, {"op": "login", "pin": "wrong-pin"}) == {"error": "PIN incorrect", "code": "pin-incorrect"}
        assert call(s, native.sign_request([("k13", data)])) == {"error": "not logged in", "code": "not-logged-in"}
        assert call(s, {"op": "login"}) == {"error": "login needs a pin", "code": "protocol"}
        assert call(s, {"op": "login", "pin": PIN_TEXT}) == {"ok": True}
        assert [x["label"] for x in call(s, {"op": "keys"})["keys"]] == ["k13"]
        sig, why = call(s, native.sign_request([("k13", data)]))["results"][0]
        assert sig and why is None
        s.close()

        # the client class: pin= logs in on connect; $CRYPTOBAT_PIN for connect()
        with pytest.raises(CryptobatError, match="PIN incorrect"):
            SocketClient(str(home / "native.sock"), "wrong-pin")
        with pytest.raises(CryptobatError, match="not logged in"):
            SocketClient(str(home / "native.sock")).timed_sign([("k13", data)])
        monkeypatch.setenv("CRYPTOBAT_PIN", PIN_TEXT)
        c = connect(f"unix:{home / 'native.sock'}")
        assert c.timed_sign([("k13", data)])[0].ok
        c.close()

        # locked after MAX_PIN_FAILURES wrong PINs: the right PIN is told "locked", not "incorrect"
        s = native_sock(home / "native.sock")
        for _ in range(MAX_PIN_FAILURES):
            call(s, {"op": "login", "pin": "wrong-pin"})
        assert call(s, {"op": "login", "pin": PIN_TEXT}) == {"error": "PIN locked", "code": "pin-locked"}
        s.close()
        with pytest.raises(PinLocked):
            SocketClient(str(home / "native.sock"), PIN_TEXT)
    finally:
        d.stop()


def test_listed_signer_peer_needs_no_pin(token_home):
    """A uid a quorum listed (signerpeers) signs without the PIN; others still need it."""
    home, codes = token_home
    d = Daemon(home, codes=codes)
    try:
        s = native_sock(home / "native.sock")
        now = call(s, {"op": "time"})["time"]
        k = next(KeyInfo.from_json(x) for x in call(s, {"op": "keys"})["keys"])
        sign = native.sign_request([("k13", make_signing_data(k, now + 3600, now - 60))])
        assert call(s, sign) == {"error": "not logged in", "code": "not-logged-in"}
        officers = d.officers_session()
        out = officers.cmd(f"signerpeers uid:{os.getuid()}")
        assert f"uid:{os.getuid()}" in out, out
        assert call(s, sign)["results"][0][0]  # open connections too
        c = SocketClient(str(home / "native.sock"))
        assert c.timed_sign([("k13", make_signing_data(k, now + 3600, now - 60))])[0].ok
        c.close()
        assert "none" in officers.cmd("signerpeers none")
        assert call(s, sign) == {"error": "not logged in", "code": "not-logged-in"}
        officers.close()
        s.close()
    finally:
        d.stop()


# --- bounds ---------------------------------------------------------------------------------
def test_frame_over_the_limit_is_refused_before_its_body(token_home):
    home, codes = token_home
    d = Daemon(home, codes=codes)
    try:
        s = native_sock(home / "native.sock")
        resp = call(s, (native.MAX_FRAME + 1).to_bytes(4, "big"))  # the header alone: no body is waited for
        assert "limit" in resp["error"], resp
        assert s.recv(1) == b""  # and the connection is closed
        s.close()
        c = SocketClient(str(home / "native.sock"), PIN_TEXT)  # everyone else is served
        assert [k.label for k in c.keys()] == ["k13"]
        # more than one frame's worth: the client splits it, every item gets its answer
        items = [("k13", b"\0" * (1 << 20))] * 36
        res = c.timed_sign(items)
        assert len(res) == 36 and all(not r.ok and "frame" not in r.reason for r in res)
        c.close()
        assert d.alive()
    finally:
        d.stop()


def test_at_most_64_connections_per_socket(token_home):
    home, codes = token_home
    d = Daemon(home, codes=codes)
    held: list[socket.socket] = []
    try:
        for _ in range(MAX_CONNECTIONS):
            s = native_sock(home / "native.sock")
            assert "serial" in call(s, {"op": "info"})
            held.append(s)
        extra = native_sock(home / "native.sock")
        assert _recv_all(extra) == native.encode({"error": "too many connections", "code": "limit"})  # then closed
        extra.close()
        for _ in range(MAX_CONNECTIONS):
            c = ConsoleSocket(home / "console.sock")
            held.append(c.s)
        extra = socket.socket(socket.AF_UNIX)
        extra.settimeout(30)
        extra.connect(str(home / "console.sock"))
        assert _recv_all(extra) == b"fail: too many connections\n"
        extra.close()
        held.pop(0).close()  # one leaves: a new native client gets its place
        deadline = time.time() + 10
        while True:
            s = native_sock(home / "native.sock")
            try:
                resp = call(s, {"op": "info"})
            except OSError:  # turned away while the daemon had not yet seen the other one leave
                resp = None
            s.close()
            if resp and "serial" in resp:
                break
            assert time.time() < deadline, resp
            time.sleep(0.1)
    finally:
        for s in held:
            s.close()
        d.stop()


def _recv_all(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def test_console_line_bounds(token_home):
    """Over 64 KiB: one fail line, quickly, without running anything; the session goes on.
    LF, CR and CR LF each end one line."""
    home, codes = token_home
    d = Daemon(home, codes=codes)
    try:
        c = ConsoleSocket(home / "console.sock")
        assert c.cmd("A" * (1 << 20)) == "fail: line too long\n"  # answered, not hung (the socket's timeout)
        assert c.cmd("x" * (MAX_LINE + 1)) == "fail: line too long\n"
        assert c.cmd("x" * MAX_LINE).startswith("fail: unknown command")  # at the limit: parsed
        c.s.sendall(b"date\r")  # a lone CR ends the line
        assert "ok\n" in c.read()
        c.s.sendall(b"colist\r\n")  # CR LF is one line end, not an empty line after it
        assert " |lamb| not present" in c.read()
        assert re.search(r"Y:\d\d .* ok\n\d+\n", c.cmd("date"))
        c.close()
        assert " |lamb| not present" in ConsoleSocket(home / "console.sock").cmd("colist")
    finally:
        d.stop()


def test_line_cut_off_by_a_disconnect_is_not_run(token_home):
    home, codes = token_home
    d = Daemon(home, codes=codes)
    try:
        c = d.officers_session()
        assert c.cmd("setmaxval 37") == " Maximum validity period set to +37 seconds\n"
        c.s.sendall(b"setmaxval 36")  # no line end: the client went away mid-line
        c.close()
        time.sleep(1)
        out = ConsoleSocket(home / "console.sock").cmd("status")
        assert "max validity +37 s" in out, out
    finally:
        d.stop()


# --- the line readers themselves ------------------------------------------------------------
def _reader(*chunks: bytes, limit: int = 16) -> LineReader:
    it = iter(chunks)
    return LineReader(lambda n: next(it, b""), limit)


def test_line_reader():
    r = _reader(b"a\r", b"\nb\rc\n\r\nd", b"\r\n", b"x" * 40, b"\ne\n", b"f")
    got = []
    while (line := r.line()) is not None:
        got.append(line)
    assert got == [b"a", b"b", b"c", b"", b"d", LineReader.TOO_LONG, b"e"]  # "f": cut off, dropped
    r = _reader(b"y" * 16 + b"\n" + b"z" * 17 + b"\n")
    assert [r.line(), r.line(), r.line()] == [b"y" * 16, LineReader.TOO_LONG, None]


def test_serial_line_editor_bounds(token):
    out: list[bytes] = []
    line = SerialLine(Service(token), out.append, "pty")
    line.feed(b"x" * (MAX_LINE + 100) + b"\r")
    text = b"".join(out)
    assert text.endswith(b"\r\nfail: line too long\r\n> ") and text.count(b"x") == MAX_LINE
    out.clear()
    line.feed(b"version\r\n")  # CR LF: one line
    assert b"Cryptobat firmware version" in b"".join(out) and b"".join(out).count(b"> ") == 1
