"""Officers, two factors, replay, lockout, presence and the quorum every change needs."""
from __future__ import annotations


import pyotp
import pytest

from cryptobat import officers as off

# RFC 6238 Appendix B, SHA-1, seed "12345678901234567890"; our codes are the 6-digit truncation.
RFC6238_SHA1 = [(59, "94287082"), (1111111109, "07081804"), (1111111111, "14050471"),
                (1234567890, "89005924"), (2000000000, "69279037"), (20000000000, "65353130")]
RFC_SECRET = "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ"  # base32 of "12345678901234567890"


@pytest.mark.parametrize("t,code8", RFC6238_SHA1)
def test_rfc6238_vectors(t, code8):
    assert off.match_step(RFC_SECRET, code8[-6:], t) == t // 30
    wrong = f"{(int(code8[-6:]) + 1) % 10**6:06d}"
    assert off.match_step(RFC_SECRET, wrong, t) is None


def test_window_is_one_step_either_side():
    t = 1234567890
    step = t // 30
    for d in (-1, 0, 1):
        assert off.match_step(RFC_SECRET, pyotp.TOTP(RFC_SECRET).at((step + d) * 30), t) == step + d
    assert off.match_step(RFC_SECRET, pyotp.TOTP(RFC_SECRET).at((step + 2) * 30), t) is None
    assert off.match_step(RFC_SECRET, pyotp.TOTP(RFC_SECRET).at((step - 2) * 30), t) is None


def test_enrolment_shows_secret_uri_and_qr(console, officers):
    out = officers.add("lamb")
    secret = officers.secrets["lamb"]
    assert len(secret) * 5 >= 80
    assert "otpauth://totp/" in out and f"secret={secret}" in out
    assert "█" in out  # the QR code, drawn in the terminal


def test_qr_code_file(console, officers, tmp_path):
    for ext, magic in (("png", b"\x89PNG"), ("svg", b"<?xml")):
        out = console.handle(f"coadd co{ext} --qr {tmp_path / ('qr.' + ext)}")
        assert f"QR code written to {tmp_path / ('qr.' + ext)}" in out
        assert (tmp_path / f"qr.{ext}").read_bytes().startswith(magic)


def test_read_commands_are_audited_without_arguments(console, officers):
    officers.add("lamb")
    console.handle("colist")
    console.handle("tpmloadkey nosuchkey")
    console.handle("date")
    tail = console.token.audit_tail(2)
    assert '"command":"colist"' in tail[0] and '"command":"date"' in tail[1]


def test_seed_first_session(console, officers):
    assert console.handle("colist") == ""
    officers.add("lamb")
    assert console.handle("colist") == " |lamb| not present\n"
    officers.login("lamb")
    assert console.handle("colist") == " |lamb| present\n"
    assert console.handle("setmaxval 3600") == " Configuration disabled\n"
    officers.add("jakob")  # bootstrap: fewer than M enrolled, so no quorum needed
    assert console.handle("colist") == " |lamb| present\n |jakob| not present\n"
    assert console.handle("cologin jakob 061612") in (" Failed\n",)  # wrong code (or astronomically lucky)
    officers.login("jakob")
    assert console.handle("setmaxval 3600") == " Maximum validity period set to +3600 seconds\n"
    assert console.handle("coreset") == ""
    assert console.handle("colist") == " |lamb| not present\n |jakob| not present\n"


QUORUM_COMMANDS = [
    ("setmaxval 3600", lambda t: t.state.max_validity == 3600),
    ("setquorum 1", lambda t: t.state.quorum == 1),
    ("keygen 13 zsk example.com k", lambda t: "k" in t.state.keys),
    ("setpin 123456", lambda t: t.state.pin is not None),
    ("settime now", lambda t: '"event":"settime"' in t.audit_tail(1)[0]),
    ("coadd carol", lambda t: "carol" in t.state.officers),
    ("codel jakob", lambda t: "jakob" not in t.state.officers),
    ("p11window 60 example.com", lambda t: t.state.p11_window_until > 0),
]


def _doc(token) -> dict:
    import json
    doc = json.loads(token.store.db.execute("SELECT doc FROM state").fetchone()[0])
    doc.pop("audit")
    return doc


@pytest.mark.parametrize("cmd,applied", QUORUM_COMMANDS)
def test_quorum_matrix(token, console, officers, cmd, applied):
    officers.add("lamb")
    officers.add("jakob")
    if cmd.startswith("codel"):
        officers.login("lamb", "jakob")
        assert console.handle("coadd carol").startswith("Added CO: carol")  # M enrolled: needs the quorum
        console.handle("coreset")
    officers.login("lamb")
    before = _doc(token)
    assert console.handle(cmd).startswith(" Configuration disabled\n pending ")  # held for approval
    assert _doc(token) == before
    officers.login("jakob")
    out = console.handle(cmd)
    assert out.strip() and "Configuration disabled" not in out and not out.startswith("fail"), out
    assert applied(token)
    assert cmd.split()[0] in token.audit_tail(1)[0]


def test_keydel_and_setcompat_need_quorum(ready, console):
    console.handle("coreset")
    assert console.handle("keydel zsk8") == " Configuration disabled\n"
    assert console.handle("setcompat zsk8 on") == " Configuration disabled\n"
    assert "zsk8" in ready.state.keys and not ready.key("zsk8").compat


def test_refused_change_leaves_state_and_is_audited(token, console, officers):
    officers.add("lamb"), officers.add("jakob"), officers.login("lamb")
    doc = token.store.db.execute("SELECT doc FROM state").fetchone()[0]
    assert console.handle("setmaxval 3600").startswith(" Configuration disabled\n")
    new = token.store.db.execute("SELECT doc FROM state").fetchone()[0]
    import json
    a, b = json.loads(doc), json.loads(new)
    a.pop("audit"), b.pop("audit")
    assert a == b
    assert '"why":"no quorum"' in token.audit_tail(2)[0]
    assert '"event":"pending"' in token.audit_tail(1)[0]


def test_replayed_code_is_refused(console, officers):
    officers.add("lamb")
    code = officers.code("lamb")
    assert console.handle(f"cologin lamb {code}") == " CO lamb Ok\n"
    console.handle("coreset")
    assert console.handle(f"cologin lamb {code}") == " Failed\n"
    assert "code replayed" in console.token.audit_tail(1)[0]


def test_lockout_after_five_failures(clocked):
    t, c, o = clocked.token, clocked.console, clocked.officers
    o.add("lamb")
    for _ in range(off.MAX_FAILURES):
        assert c.handle("cologin lamb 000000") == " Failed\n"
    assert c.handle(f"cologin lamb {o.code('lamb')}") == " Failed\n"  # right code, but locked
    assert "locked out" in t.audit_tail(1)[0]
    clocked.advance(off.LOCKOUT + 1)
    assert c.handle(f"cologin lamb {o.code('lamb')}") == " CO lamb Ok\n"


def test_presence_expires_after_idle_timeout(clocked):
    c, o = clocked.console, clocked.officers
    o.add("lamb")
    o.login("lamb")
    assert c.handle("colist") == " |lamb| present\n"
    clocked.advance(clocked.token.quorum.idle_timeout + 1)
    assert c.handle("colist") == " |lamb| not present\n"
    assert c.handle("setmaxval 60") == " Configuration disabled\n"


def test_passphrase_second_factor(clocked):
    t, console, officers = clocked.token, clocked.console, clocked.officers
    officers.add("lamb")
    officers.login("lamb")
    assert console.handle("copass lamb") == ""
    assert console.prompt == "New passphrase: " and console.secret_input
    console.handle("correct horse battery")
    assert console.prompt == "Repeat passphrase: "
    assert console.handle("correct horse battery") == " Passphrase set for CO lamb\n"
    console.handle("coreset")
    clocked.advance(30)
    assert console.handle(f"cologin lamb {officers.code('lamb')}") == ""
    assert console.prompt == "Passphrase: "
    assert console.handle("wrong passphrase") == " Failed\n"
    assert "bad passphrase" in t.audit_tail(1)[0]
    clocked.advance(30)
    console.handle(f"cologin lamb {officers.code('lamb')}")
    assert console.handle("correct horse battery") == " CO lamb Ok\n"
    assert console.handle("copass jakob").startswith("fail:")


def test_no_secret_reaches_the_store_or_audit_in_clear(token, console, officers):
    officers.add("lamb"), officers.login("lamb")
    console.handle("copass lamb")
    console.handle("sup3r-secret-pass")
    console.handle("sup3r-secret-pass")
    officers.add("jakob"), officers.login("jakob")
    console.handle("setpin 918273")
    raw = b"".join(p.read_bytes() for p in token.home.iterdir() if p.name.startswith("state.db"))
    for secret in (officers.secrets["lamb"], officers.secrets["jakob"], "sup3r-secret-pass", "918273"):
        assert secret.encode() not in raw
    assert all(s not in "".join(token.audit_tail(100)) for s in officers.secrets.values())


def test_unknown_and_malformed_console_lines(console):
    for line in ("frobnicate", "setmaxval", "setmaxval ten", "cologin", "keygen 99 zsk x", "keygen 8 boss x",
                 "tpmtimedsign 1", "tpmtimedsign ZZ 00", "coadd 'unbalanced", "coadd ../../etc", "\x00\xff",
                 "settime yesterday", "audit x", "keylist extra"):
        out = console.handle(line)
        assert out.count("\n") <= 1 and (out.startswith("fail:") or out == ""), (line, out)


def test_qr_file_that_cannot_be_written_enrols_nobody(console, officers, tmp_path):
    for target in (tmp_path / "no-such-dir" / "qr.png", tmp_path / "qr.gif"):
        out = console.handle(f"coadd carol --qr {target}")
        assert out.startswith("fail:") and out.count("\n") == 1, out
    assert console.handle("colist") == ""  # carol was not enrolled
