"""Authority belongs to a console session: through the real daemon, its pty and its console socket.

The attack these tests replay: while two officers were logged in on the pty, a separate
console.sock connection changed the policy, the PIN, an officer's passphrase and the
officers themselves, and the audit credited the officers on the pty.
"""
from __future__ import annotations

import json
import os
import tty

import pytest

from cryptobat import officers as off
from cryptobat.console import Console
from support import Clocked, Codes, ConsoleSocket, Daemon, cli, pty_talk

class Pty:
    def __init__(self, home) -> None:
        self.fd = os.open(home / "console.pty", os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        tty.setraw(self.fd)
        pty_talk(self.fd, b"", timeout=0.5)

    def __call__(self, line: str) -> str:
        out = pty_talk(self.fd, line.encode() + b"\r").decode().replace("\r\n", "\n")
        out = out.split("\n", 1)[1] if "\n" in out else out  # drop the echoed line
        return out[: out.rfind("\n") + 1]

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def daemon(tmp_path):
    home = tmp_path / "t"
    assert cli("init", home=home).returncode == 0
    d = Daemon(home, "--pty", "--no-pkcs11")
    yield d
    d.stop()


def _audit(home) -> list[dict]:
    r = cli("audit", "-n", "200", home=home)
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


def test_socket_session_cannot_use_officers_logged_in_on_the_pty(daemon):
    home = daemon.home
    pty, codes = Pty(home), Codes()
    try:
        for name in ("lamb", "jakob"):
            out = pty(f"coadd {name}")
            assert out.startswith(f"Added CO: {name}\n"), out
            codes.enrol(name, out)
        for name in ("lamb", "jakob"):
            assert pty(f"cologin {name} {codes(name)}") == f" CO {name} Ok\n"
        assert pty("colist") == " |lamb| present\n |jakob| present\n"
        sock = ConsoleSocket(home / "console.sock")
        try:
            assert sock("colist") == " |lamb| not present\n |jakob| not present\n"
            for attack in ("setmaxval 315360000", "setpin 99999999", "settime now", "p11window 60 x.example",
                           "setquorum 1", "coadd mallory", "keygen 13 ksk evil.example", "signerpeers uid:0"):
                assert sock(attack) == " Configuration disabled\n", attack
            assert sock("copass lamb").startswith("fail: CO lamb must be logged in on this session")
            assert sock("approve 1").startswith("fail:")
        finally:
            sock.close()
        # the seed's session on the pty is untouched and still works exactly as before
        assert pty("setmaxval 3600") == " Maximum validity period set to +3600 seconds\n"
        assert pty("coreset") == ""
        assert pty("colist") == " |lamb| not present\n |jakob| not present\n"
    finally:
        pty.close()
    audit = _audit(home)
    assert not any(e["event"] in ("setquorum", "codel", "setpin", "copass") for e in audit)
    refused = [e for e in audit if e["event"] == "refused"]
    assert refused and all(e["officers"] == [] and e["session"].startswith("socket#") for e in refused
                           if "session" in e)
    assert max(e["seconds"] for e in audit if e["event"] == "setmaxval") == 3600


def test_first_officers_are_not_enrolled_over_the_socket(daemon):
    sock = ConsoleSocket(daemon.home / "console.sock")
    try:
        assert sock("coadd mallory").startswith("fail: the first officers are enrolled on the token's own console")
        assert sock("colist") == ""
    finally:
        sock.close()


def test_remote_m_of_n_is_an_approval_of_one_operation(daemon):
    """lamb proposes on the socket (say over ssh); jakob approves on the pty; the audit names both."""
    home = daemon.home
    pty, codes = Pty(home), Codes()
    try:
        for name in ("lamb", "jakob"):
            codes.enrol(name, pty(f"coadd {name}"))
        sock = ConsoleSocket(home / "console.sock")
        try:
            assert sock(f"cologin lamb {codes('lamb')}") == " CO lamb Ok\n"
            out = sock("setmaxval 7200")
            assert out.startswith(" Configuration disabled\n pending 1: setmaxval 7200 (1 of 2 approvals)"), out
            assert pty("pending").startswith(" 1  setmaxval 7200  (1 of 2: lamb@socket#")
            assert pty("approve 1") == " Configuration disabled\n"  # nobody logged in on the pty yet
            assert pty(f"cologin jakob {codes('jakob')}") == " CO jakob Ok\n"
            out = pty("approve 1")
            assert out.startswith(" Approved 1: setmaxval 7200; running it\n"
                                  " Maximum validity period set to +7200 seconds"), out
            assert pty("pending") == "" and sock("approve 1") == "fail: no pending operation 1\n"
            # an approval is for that very operation: a second one needs its own approvals
            assert sock("setquorum 1").startswith(" Configuration disabled\n pending 2:")
            assert pty("cancel 2") == " Cancelled 2\n"
            assert pty("approve 2") == "fail: no pending operation 2\n"
        finally:
            sock.close()
    finally:
        pty.close()
    audit = _audit(home)
    run = [e for e in audit if e["event"] == "setmaxval"][-1]
    assert run["seconds"] == 7200 and run["officers"] == ["jakob", "lamb"] and run["pending"] == 1
    assert sorted(a.split("@")[1].split("#")[0] for a in run["approvals"]) == ["pty", "socket"]
    assert "setquorum" not in [e["event"] for e in audit]
    assert "max validity +7200 s" in cli("status", home=home).stdout


def test_a_disconnect_ends_the_sessions_logins(daemon):
    home = daemon.home
    pty, codes = Pty(home), Codes()
    try:
        for name in ("lamb", "jakob"):
            codes.enrol(name, pty(f"coadd {name}"))
    finally:
        pty.close()
    a = ConsoleSocket(home / "console.sock")
    a(f"cologin lamb {codes('lamb')}")
    a.close()
    b = ConsoleSocket(home / "console.sock")
    try:
        assert b("colist") == " |lamb| not present\n |jakob| not present\n"
    finally:
        b.close()


# --- the core, without transports -------------------------------------------------------------

def test_copass_changes_only_your_own_passphrase_and_needs_the_old_one(clocked):
    t, c, o = clocked.token, clocked.console, clocked.officers
    o.add("lamb")
    o.login("lamb")
    o.add("jakob")
    c.handle("copass lamb"), c.handle("first-passphrase"), c.handle("first-passphrase")
    assert c.handle("copass jakob").startswith("fail: CO jakob must be logged in on this session")
    assert c.handle("copass lamb") == "" and c.prompt == "Old passphrase: "
    c.handle("not-the-old-one"), c.handle("mallory-chose-this")
    assert c.handle("mallory-chose-this") == "fail: old passphrase is wrong\n"
    assert c.handle("copass lamb") == "" and c.prompt == "Old passphrase: "
    c.handle("first-passphrase"), c.handle("second-passphrase")
    assert c.handle("second-passphrase") == " Passphrase set for CO lamb\n"
    rec = t.state.officers["lamb"].passphrase
    assert rec.keyed and off.check_passphrase(rec, "second-passphrase", t._pepper)
    assert not off.check_passphrase(rec, "second-passphrase")  # the store alone cannot test guesses


def test_a_refused_setpin_refreshes_nobody(clocked):
    t, c, o = clocked.token, clocked.console, clocked.officers
    o.add("lamb")
    o.login("lamb")
    seq = t.state.audit.seq
    for _ in range(3):
        clocked.advance(t.quorum.idle_timeout // 2)
        assert c.handle("setpin 123").startswith("fail: PIN must be at least 6 characters")
    assert c.handle("colist") == " |lamb| not present\n"  # idle: the refused commands did not refresh
    assert c.handle("setmaxval 60") == " Configuration disabled\n"
    assert t.state.pin is None and t.state.audit.seq > seq


def test_remote_failures_do_not_lock_out_the_local_console(tmp_path):
    c = Clocked(tmp_path / "c")
    try:
        c.officers.add("lamb")
        remote = Console(c.token, transport="socket")
        for _ in range(off.MAX_FAILURES + 2):
            assert remote.handle("cologin lamb 000000") == " Failed\n"
        assert remote.handle(f"cologin lamb {c.officers.code('lamb')}") == " Failed\n"  # locked, remotely
        c.advance(30)
        assert c.console.handle(f"cologin lamb {c.officers.code('lamb')}") == " CO lamb Ok\n"
        assert "remote locked until" in c.console.handle("status")
    finally:
        c.token.close()


def test_non_ascii_digits_are_a_failed_login(console, officers):
    officers.add("lamb")
    assert console.handle("cologin lamb \u0661\u0662\u0663\u0664\u0665\u0666") == " Failed\n"
    assert console.handle("cologin lamb \uff11\uff12\uff13\uff14\uff15\uff16") == " Failed\n"


def test_pending_operations_expire_and_are_bounded(clocked):
    from cryptobat.quorum import MAX_PENDING, PENDING_WINDOW
    con, offs = clocked.console, clocked.officers
    offs.add("lamb")
    offs.login("lamb")
    offs.add("jakob")
    assert con.handle("setquorum 2") == " Quorum set to 2 officers\n"
    for i in range(MAX_PENDING):
        assert con.handle(f"setmaxval {100 + i}").startswith(" Configuration disabled\n pending ")
    assert con.handle("setmaxval 99") == f"fail: {MAX_PENDING} operations are already pending\n"
    clocked.advance(PENDING_WINDOW + 1)
    assert con.handle("pending") == ""


def test_totp_runs_on_real_time_across_settime_and_a_correction(clocked):
    """settime far from real time used to lock the officers out; a correction back refused their
    next codes as replayed for as long as the clock had been ahead."""
    t, c, o = clocked.token, clocked.console, clocked.officers
    o.add("lamb")
    o.login("lamb")
    real = int(clocked.now)
    assert c.handle(f"settime {real + 86400}").startswith(" Token time set")
    assert t.now() >= real + 86400
    c.handle("coreset")
    clocked.advance(30)
    o.login("lamb")  # codes from the authenticator app (real time) still work
    assert c.handle(f"settime {int(clocked.now)}").startswith(" Token time set")  # corrected back
    c.handle("coreset")
    clocked.advance(30)
    code = o.code("lamb")
    assert c.handle(f"cologin lamb {code}") == " CO lamb Ok\n"
    c.handle("coreset")
    assert c.handle(f"cologin lamb {code}") == " Failed\n"  # no code counts twice
    assert c.handle(f"cologin lamb {code}") == " Failed\n"
    assert "code replayed" in t.audit_tail(1)[0]
