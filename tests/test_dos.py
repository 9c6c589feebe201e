"""Denial of service by a signer-group member (who need not know the PIN), through the real daemon.

Pipelined C_GenerateRandom that never reads its replies (memory stays bounded, others are
served, every reply arrives once read), connection floods on pkcs11.sock (capped; the other
sockets still answer; out of descriptors the daemon recovers), native slowloris and big
frames before login, pipelined C_Login behind a fast call, and p11-stdio on an unreadable home.
"""
from __future__ import annotations

import os
import resource
import socket
import struct
from pathlib import Path

import pytest

from cryptobat import native
from cryptobat.p11rpc import constants as C
from cryptobat.p11rpc.calls import BY_NAME
from cryptobat.p11rpc.codec import encode_request, parse_response
from cryptobat.p11rpc.framing import FrameDecoder, encode_frame
from cryptobat.p11rpc.module import HANDSHAKE, MAX_RANDOM, SLOT_ID
from cryptobat.p11rpc.server import Connection
from cryptobat.p11rpc.unix import MAX_PEERS
from cryptobat.serve import MAX_CONNECTIONS, PRELOGIN_FRAME, _Server
from support import PIN, ConsoleSocket, Daemon, SockClient, cli, need_root, p11_served, setup_home

KEYS = (("13", "k13"),)
FRAME_TIMEOUT = "2"  # seconds a native frame may stall in this module's daemon


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    home = tmp_path_factory.mktemp("dos") / "token"
    codes = setup_home(home, keys=KEYS, compat=())
    old = os.environ.get("CRYPTOBAT_NATIVE_FRAME_TIMEOUT")
    os.environ["CRYPTOBAT_NATIVE_FRAME_TIMEOUT"] = FRAME_TIMEOUT
    try:
        d = Daemon(home, codes=codes)
    finally:
        if old is None:
            os.environ.pop("CRYPTOBAT_NATIVE_FRAME_TIMEOUT")
        else:
            os.environ["CRYPTOBAT_NATIVE_FRAME_TIMEOUT"] = old
    yield d
    d.stop()


def _native(path: Path, req: dict, timeout: float = 30) -> dict:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(timeout)
    s.connect(str(path))
    try:
        s.sendall(native.encode(req))
        return _read_native(s)
    finally:
        s.close()


def _read_native(s: socket.socket) -> dict | None:
    f = s.makefile("rb")
    header = f.read(4)
    if len(header) < 4:
        return None
    return native.decode(f.read(native.frame_length(header)))


def _eof(s: socket.socket) -> bool:
    """True once the daemon closed ``s`` (whatever it sent before is read and dropped)."""
    try:
        while True:
            if not s.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


# --- 1: pipelined C_GenerateRandom that does not read its replies --------------------------

def test_random_over_the_limit_is_refused(daemon):
    c = SockClient(daemon.p11)
    c.ok("C_Initialize", HANDSHAKE, 0, None)
    (h,) = c.ok("C_OpenSession", SLOT_ID, C.CKF_SERIAL_SESSION)
    assert len(c.ok("C_GenerateRandom", h, MAX_RANDOM)[0].data) == MAX_RANDOM == 64 * 1024
    rv, _ = parse_response(c.raw(encode_request("C_GenerateRandom", [h, MAX_RANDOM + 1], 0)),
                           BY_NAME["C_GenerateRandom"], 0)
    assert rv == C.CKR_ARGUMENTS_BAD
    c.close()


def test_pipelined_random_is_bounded(daemon):
    """2000 C_GenerateRandom(64 KiB) in one write, replies unread: the daemon's memory stays
    bounded and others are served; once the client reads, every reply arrives, in order."""
    n = 2000
    base = daemon.rss_kb()
    c = SockClient(daemon.p11)
    c.ok("C_Initialize", HANDSHAKE, 0, None)
    (h,) = c.ok("C_OpenSession", SLOT_ID, C.CKF_SERIAL_SESSION)
    first = c.code + 1
    frames = [encode_frame(first, encode_request("C_GetInfo", [], 0), b"client")]
    body = encode_request("C_GenerateRandom", [h, MAX_RANDOM], 0)
    frames += [encode_frame(first + 1 + i, body, b"client") for i in range(n)]
    c.s.sendall(b"".join(frames))
    peak = base
    for _ in range(5):  # others are served meanwhile, and the daemon does not grow
        p11_served(daemon)
        assert _native(daemon.home / "native.sock", {"op": "time"})["time"] > 0
        peak = max(peak, daemon.rss_kb())
    assert peak - base < 200 * 1024, (base, peak)
    got: list[int] = []
    dec = FrameDecoder()
    while len(got) < n + 1:
        data = c.s.recv(1 << 20)
        assert data, f"closed after {len(got)} replies"
        for f in dec.feed(data):
            if f.code == first:
                rv, _ = parse_response(f.body, BY_NAME["C_GetInfo"], 0)
            else:
                rv, (rnd,) = parse_response(f.body, BY_NAME["C_GenerateRandom"], 0)
                assert len(rnd.data) == MAX_RANDOM
            assert rv == 0
            got.append(f.code)
    assert got == list(range(first, first + n + 1))
    assert daemon.rss_kb() - base < 200 * 1024
    c.ok("C_GetInfo")  # the connection serves on
    c.close()
    p11_served(daemon)


# --- 4: pipelined C_Login behind a fast call -------------------------------------------------

def test_pipelined_login_behind_fast_call_runs_off_the_loop(daemon):
    get_info = encode_frame(1, encode_request("C_GetInfo", [], 0), b"client")
    login = encode_frame(2, encode_request("C_Login", [1, C.CKU_USER, b"wrong"], 0), b"client")
    conn = Connection(RealTokenless())
    assert not conn.slow(b"\x00" + get_info)  # one fast call: on the event loop
    assert conn.slow(b"\x00" + get_info + login)  # a batch that may hold scrypt: in a helper thread
    assert conn.slow(b"\x00" + get_info + get_info)
    # through the daemon: both answered, the wrong PIN refused, a right one accepted after
    c = SockClient(daemon.p11)
    c.ok("C_Initialize", HANDSHAKE, 0, None)
    (h,) = c.ok("C_OpenSession", SLOT_ID, C.CKF_SERIAL_SESSION)
    wrong = encode_request("C_Login", [h, C.CKU_USER, b"wrong-pin"], 0)
    c.s.sendall(encode_frame(c.code + 1, encode_request("C_GetInfo", [], 0), b"client")
                + encode_frame(c.code + 2, wrong, b"client"))
    replies = []
    while len(replies) < 2:
        replies += c.frames.feed(c.s.recv(65536))
    assert [f.code for f in replies] == [c.code + 1, c.code + 2]
    assert parse_response(replies[0].body, BY_NAME["C_GetInfo"], 0)[0] == 0
    assert parse_response(replies[1].body, BY_NAME["C_Login"], 0)[0] == C.CKR_PIN_INCORRECT
    c.code += 2
    c.ok("C_Login", h, C.CKU_USER, PIN)  # resets the failure count
    c.close()
    p11_served(daemon)


class RealTokenless:
    """A backend that is never called: Connection.slow only looks at the frames."""

    def __getattr__(self, name):
        raise AssertionError(f"backend.{name} called")


# --- 2: connection floods on pkcs11.sock ---------------------------------------------------

def test_p11_connections_are_capped(daemon):
    extra = 10
    socks, answered, closed = [], 0, 0
    try:
        for _ in range(MAX_PEERS + extra):
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(20)
            s.connect(str(daemon.p11))
            socks.append(s)
            try:
                s.sendall(b"\x00")
                reply = s.recv(1)
            except (ConnectionResetError, BrokenPipeError):
                reply = b""
            if reply == b"\x00":
                answered += 1
            else:
                assert reply == b""
                closed += 1
        assert answered + closed == MAX_PEERS + extra
        assert closed >= extra and answered >= MAX_PEERS - 5, (answered, closed)
        # the other sockets still answer, and the daemon lives
        assert _native(daemon.home / "native.sock", {"op": "time"})["time"] > 0
        con = ConsoleSocket(daemon.home / "console.sock")
        assert "cryptobat" in con.cmd("version").lower()
        con.close()
        assert daemon.alive()
    finally:
        for s in socks:
            s.close()
    p11_served(daemon)


def test_out_of_descriptors_recovers(tmp_path):
    """A daemon short of descriptors (low RLIMIT_NOFILE, cap above it): while they are gone new
    clients wait; once the flood ends the daemon accepts again."""
    home = tmp_path / "token"
    codes = setup_home(home, keys=KEYS, compat=())
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    old = os.environ.get("CRYPTOBAT_P11_MAX_CONNECTIONS")
    os.environ["CRYPTOBAT_P11_MAX_CONNECTIONS"] = "100000"
    resource.setrlimit(resource.RLIMIT_NOFILE, (96, hard))  # the daemon inherits it
    try:
        d = Daemon(home, codes=codes)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        if old is None:
            os.environ.pop("CRYPTOBAT_P11_MAX_CONNECTIONS")
        else:
            os.environ["CRYPTOBAT_P11_MAX_CONNECTIONS"] = old
    socks = []
    try:
        for _ in range(150):
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(d.p11))
            s.sendall(b"\x00")
            socks.append(s)
        assert d.alive()
        for s in socks:
            s.close()
        socks = []
        p11_served(d)
        p11_served(d)
    finally:
        for s in socks:
            s.close()
        d.stop()


# --- 3: the native socket: big frames before login, stalled frames ------------------------

def test_native_big_frame_before_login_is_refused(daemon):
    path = daemon.home / "native.sock"
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(str(path))
    s.sendall(struct.pack("!I", 1 << 20) + b"{")  # the body never needs to arrive
    resp = _read_native(s)
    assert resp is not None and "limit" in resp["error"] and str(PRELOGIN_FRAME) in resp["error"]
    assert _eof(s)
    s.close()
    # after login the frame limit is native.MAX_FRAME
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(str(path))
    s.sendall(native.encode(native.login_request(PIN.decode())))
    assert _read_native(s) == {"ok": True}
    s.sendall(native.encode({"op": "time", "pad": "x" * (PRELOGIN_FRAME * 4)}))
    assert _read_native(s)["time"] > 0
    s.close()


def test_native_stalled_frames_are_dropped(daemon):
    """MAX_CONNECTIONS clients each send part of a frame and stall: the next one is turned away;
    the daemon closes the stalled ones (module daemon: FRAME_TIMEOUT) and serves again."""
    path = daemon.home / "native.sock"
    stalled = []
    try:
        for _ in range(MAX_CONNECTIONS):
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(30)
            s.connect(str(path))
            s.sendall(native.encode({"op": "time"})[:6])
            stalled.append(s)
        late = socket.socket(socket.AF_UNIX)
        late.settimeout(30)
        late.connect(str(path))
        late.sendall(native.encode({"op": "time"}))
        resp = _read_native(late)
        late.close()
        # the daemon may have dropped the first stalled ones already: then `late` was served
        assert resp is not None and (resp.get("error") == "too many connections" or resp.get("time"))
        for s in stalled:
            assert _eof(s), "a stalled native connection was kept open"
    finally:
        for s in stalled:
            s.close()
    assert _native(path, {"op": "time"})["time"] > 0
    assert daemon.alive()


def test_native_backlog(daemon):
    """64 clients connecting at once are all accepted (queued), none refused."""
    assert _Server.request_queue_size >= 2 * MAX_CONNECTIONS
    path = daemon.home / "native.sock"
    socks = []
    try:
        for _ in range(MAX_CONNECTIONS):
            s = socket.socket(socket.AF_UNIX)
            s.setblocking(False)
            s.connect(str(path))  # raises (EAGAIN) when the listen queue is full
            socks.append(s)
    finally:
        for s in socks:
            s.close()
    assert _native(path, {"op": "time"})["time"] > 0


# --- 5: p11-stdio on a home this user cannot read -------------------------------------------

def test_p11_stdio_unreadable_home(tmp_path):
    """Root without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH, as a user who may not search the home's parent."""
    need_root("to drop the capability to read any directory")
    private = tmp_path / "private"
    home = private / "token"
    home.mkdir(parents=True)
    os.chown(private, 65534, 65534)
    os.chmod(private, 0o700)
    r = cli("--home", str(home), "p11-stdio", input="",
            prefix=["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"])
    assert r.returncode == 1, r
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cryptobat: "), r.stderr
