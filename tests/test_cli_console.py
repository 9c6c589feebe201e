"""The real CLI and console: a terminal session replaying the seed, and the daemon's transports."""
from __future__ import annotations

import os
import re
import sys
import time
import tty

import pexpect

from cryptobat.client import SocketClient, connect
from support import CONFIGURED_PIN, Codes, Daemon, cli, payload, pty_talk



def test_seed_slides_on_a_terminal(tmp_path):
    """`cryptobat console` on a pseudo-terminal, typed as the seed's first two slides."""
    home, codes = tmp_path / "t", Codes()
    assert cli("init", home=home).returncode == 0
    child = pexpect.spawn(sys.executable, ["-m", "cryptobat", "--home", str(home), "console"],
                          encoding="utf-8", timeout=20, dimensions=(60, 200))
    try:
        child.expect_exact("> ")
        child.sendline("version")
        custody = os.environ.get("CRYPTOBAT_TEST_CUSTODY", "software")  # the seed's device: rst:software
        child.expect(r"Cryptobat firmware version \d+\.\d+\.\d+\.[0-9A-F]{8} \(c\) Cryptobat rst:" + custody)
        child.expect_exact("> ")
        child.sendline("date")
        child.expect(r"Y:\d\d M:\d\d D:\d\d h:\d\d m:\d\d s:\d\d ok\r\n(\d+)\r\n")
        assert abs(int(child.match.group(1)) - time.time()) < 5
        child.expect_exact("> ")
        child.sendline("colist")
        child.expect_exact("> ")
        child.sendline("coadd lamb")
        child.expect(r"Added CO: lamb\r\nSecret: [A-Z2-7]+\r\n")
        codes.enrol("lamb", child.after)
        child.expect_exact("> ")
        child.sendline("colist")
        child.expect_exact(" |lamb| not present")
        child.expect_exact("> ")
        child.sendline(f"cologin lamb {codes('lamb')}")
        child.expect_exact(" CO lamb Ok")
        child.expect_exact("> ")
        child.sendline("colist")
        child.expect_exact(" |lamb| present")
        child.expect_exact("> ")
        child.sendline("setmaxval 3600")
        child.expect_exact(" Configuration disabled")
        child.expect_exact("> ")
        child.sendline("coadd jakob")
        child.expect(r"Added CO: jakob\r\nSecret: [A-Z2-7]+\r\n")
        codes.enrol("jakob", child.after)
        child.expect_exact("> ")
        child.sendline("colist")
        child.expect_exact(" |lamb| present\r\n |jakob| not present")
        child.expect_exact("> ")
        wrong = f"{(int(codes('jakob')) + 500000) % 10**6:06d}"
        child.sendline(f"cologin jakob {wrong}")
        child.expect_exact(" Failed")
        child.expect_exact("> ")
        child.sendline(f"cologin jakob {codes('jakob')}")
        child.expect_exact(" CO jakob Ok")
        child.expect_exact("> ")
        child.sendline("colist")
        child.expect_exact(" |lamb| present\r\n |jakob| present")
        child.expect_exact("> ")
        child.sendline("setmaxval 3600")
        child.expect_exact(" Maximum validity period set to +3600 seconds")
        child.expect_exact("> ")
        child.sendline("coreset")
        child.expect_exact("> ")
        child.sendline("colist")
        child.expect_exact(" |lamb| not present\r\n |jakob| not present")
        child.expect_exact("> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert "max validity +3600 s" in cli("status", home=home).stdout


def test_passphrase_prompt_does_not_echo(tmp_path):
    home, codes = tmp_path / "t", Codes()
    cli("init", "--quorum", "1", home=home)
    child = pexpect.spawn(sys.executable, ["-m", "cryptobat", "--home", str(home), "console"],
                          encoding="utf-8", timeout=20, dimensions=(60, 200))
    try:
        child.expect_exact("> ")
        child.sendline("coadd lamb")
        child.expect(r"Secret: [A-Z2-7]+")
        codes.enrol("lamb", child.after)
        child.expect_exact("> ")
        child.sendline(f"cologin lamb {codes('lamb')}")
        child.expect_exact(" CO lamb Ok")
        child.expect_exact("> ")
        child.sendline("copass lamb")
        child.expect_exact("New passphrase: ")
        child.sendline("hunter2hunter2")
        child.expect_exact("Repeat passphrase: ")
        child.sendline("hunter2hunter2")
        child.expect_exact(" Passphrase set for CO lamb")
        assert "hunter2" not in child.before
        child.expect_exact("> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)


def test_daemon_serves_all_transports_at_once(configured, tmp_path):
    home, codes = configured
    master, slave = os.openpty()  # stands for a USB serial adapter: we talk on the master side
    tty.setraw(master)
    serial_dev = os.ttyname(slave)
    d = Daemon(home, "--pty", "--serial", serial_dev, "--no-pkcs11")
    try:
        # console on the Unix socket, through `cryptobat console` attaching to the daemon
        r = cli("console", home=home, input="colist\ndate\n")
        assert " |solo| not present" in r.stdout and " ok\n" in r.stdout
        # the pseudo-terminal, as `screen PATH 115200` would open it
        fd = os.open(home / "console.pty", os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        tty.setraw(fd)
        out = pty_talk(fd, b"colist\r")
        assert out == b"colist\r\n |solo| not present\r\n> "
        out = pty_talk(fd, b"datx\x7fe\r")  # backspace edits the line, as on the device
        assert b"date\r\n" not in out or b"Y:" in out
        assert re.search(rb"Y:\d\d M:\d\d D:\d\d h:\d\d m:\d\d s:\d\d ok\r\n\d+\r\n> $", out), out
        # the serial line
        os.set_blocking(master, False)
        pty_talk(master, b"", timeout=1)
        out = pty_talk(master, b"version\r")
        assert b"Cryptobat firmware version" in out
        # an officer logged in on the serial line is present there, and only there (tests/test_sessions.py)
        out = pty_talk(master, f"cologin solo {codes('solo')}\r".encode())
        assert b" CO solo Ok" in out
        assert b" |solo| present" in pty_talk(master, b"colist\r")
        assert " |solo| not present" in cli("console", home=home, input="colist\n").stdout
        # the native signing API, via the client class
        c = connect(home=home, pin=CONFIGURED_PIN)
        assert isinstance(c, SocketClient)
        k = next(k for k in c.keys() if k.label == "z")
        now = c.time()
        res = c.timed_sign([("z", payload(k, now=now)), ("z", payload(k, now=now, exp=now + 9999))])
        assert res[0].ok and res[1].reason == "RRSIG expiration time exceeds HSM policy"
        c.close()
        os.close(fd)
    finally:
        d.stop()
        os.close(master)
        os.close(slave)
    assert not (home / "native.sock").exists() and not (home / "console.pty").exists()


def test_daemon_survives_bad_input(configured):
    import socket
    home, _ = configured
    d = Daemon(home, "--no-pkcs11")
    try:
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(home / "native.sock"))
        for body in (b"hello", b"[]", b'{"op":"nope"}', b'{"op":"sign","items":[1]}',
                     b'{"op":"sign","items":[["z","!!"]]}', b"\xff\xfe"):
            s.sendall(len(body).to_bytes(4, "big") + body)
            n = int.from_bytes(s.recv(4), "big")
            assert b"error" in s.recv(n)
        s.sendall(b"\xff\xff\xff\xff")  # an absurd frame length: one error, then the connection closes
        n = int.from_bytes(s.recv(4), "big")
        assert b"limit" in s.recv(n)
        s.close()
        c = socket.socket(socket.AF_UNIX)
        c.connect(str(home / "console.sock"))
        c.sendall(b"\xff\xfe garbage \x00\n" + b"A" * 100 + b"\n")
        time.sleep(0.5)
        assert b"fail:" in c.recv(65536)
        c.close()
        r = cli("console", home=home, input="colist\n")  # everyone else is still served
        assert " |solo| not present" in r.stdout
    finally:
        d.stop()


def test_embedded_console_and_cli_without_daemon(configured):
    home, _ = configured
    r = cli("console", home=home, input="keylist\nbogus\n")
    assert "IN DNSKEY 256 3 13" in r.stdout and "IN DS" in r.stdout
    assert "fail: unknown command 'bogus'" in r.stdout
    r = cli("status", home=home)
    assert "quorum      1 of 1 officers" in r.stdout and "full policy" in r.stdout
    r = cli("keyfiles", "testzone", str(home / "keys"), home=home)
    assert r.returncode == 0, r.stderr
    priv = next((home / "keys").glob("Ktestzone.+013+*.private")).read_text()
    assert "Label: z" in priv and "PrivateKey" not in priv


def test_no_token_gives_one_line(tmp_path):
    r = cli("status", home=tmp_path / "none")
    assert r.returncode == 1 and r.stderr.strip() == f"cryptobat: no token at {tmp_path / 'none'} (run: cryptobat init)"
