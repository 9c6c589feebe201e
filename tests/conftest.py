"""Shared helpers: tokens on temporary homes, officers who compute their TOTP codes, the CLI."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dns.name
import dns.rrset
import pyotp
import pytest

from cryptobat import rrsig
from cryptobat.console import Console
from cryptobat.home import init_token

ROOT = Path(__file__).resolve().parents[1]


def secret_of(text: str) -> str:
    return next(l.split()[1] for l in text.splitlines() if l.startswith("Secret:"))


class Officers:
    """Enrols officers on a console and logs them in the way their authenticator apps would."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.secrets: dict[str, str] = {}
        self.used: dict[str, int] = {}

    def add(self, name: str) -> str:
        out = self.console.handle(f"coadd {name}")
        assert out.startswith(f"Added CO: {name}\n"), out
        self.secrets[name] = secret_of(out)
        return out

    def code(self, name: str, step_offset: int = 0) -> str:
        """A fresh code: the current step, or the next one if this step was used already."""
        step = int(self.console.token.clock._wall()) // 30 + step_offset  # real time, as an app
        if self.used.get(name, -1) >= step:
            step = self.used[name] + 1
        self.used[name] = step
        return pyotp.TOTP(self.secrets[name]).at(step * 30)

    def login(self, *names: str) -> None:
        for n in names:
            out = self.console.handle(f"cologin {n} {self.code(n)}")
            assert out == f" CO {n} Ok\n", out


@pytest.fixture
def token(tmp_path):
    t = init_token(tmp_path / "token", quorum=2)
    yield t
    t.close()


@pytest.fixture
def console(token):
    return Console(token)


@pytest.fixture
def officers(console):
    return Officers(console)


@pytest.fixture
def ready(token, console, officers):
    """A token with two officers present, max validity 3600 s, an RSA KSK and ZSK and an ECDSA ZSK for testzone."""
    officers.add("lamb")
    officers.add("jakob")
    officers.login("lamb", "jakob")
    assert console.handle("setmaxval 3600") == " Maximum validity period set to +3600 seconds\n"
    for cmd in ("keygen 8 ksk testzone ksk8", "keygen 8 zsk testzone zsk8", "keygen 13 zsk testzone zsk13"):
        assert console.handle(cmd).startswith("ok: key generated"), cmd
    return token


def signing_data(key, rrset: dns.rrset.RRset, inception: int, expiration: int):
    tpl = rrsig.template(rrset, key, inception, expiration)
    return tpl, rrsig.signing_data(rrset, tpl)


def validate(key, rrset, tpl, signature: bytes, now: int) -> None:
    """Validate a token signature with dnspython against the key's DNSKEY (raises if invalid)."""
    import dns.dnssec
    zone = dns.name.from_text(key.zone)
    dnskeys = dns.rrset.from_rdata(zone, 300, key.dnskey())
    dns.dnssec.validate_rrsig(rrset, tpl.replace(signature=signature), {zone: dnskeys}, now=now)


def cli(*args: str, home: Path | None = None, input: str | None = None, env: dict | None = None,
        timeout: float = 60, prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run the real ``cryptobat`` command."""
    cmd = (prefix or []) + [sys.executable, "-m", "cryptobat"]
    if home is not None:
        cmd += ["--home", str(home)]
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run(cmd + list(args), input=input, capture_output=True, text=True, timeout=timeout, env=e)


class Clocked:
    """A quorum-1 token whose wall and boot-time clocks the test moves by hand (the core takes them injected)."""

    def __init__(self, path: Path, start: float = 1_800_000_000.0) -> None:
        self.now = start
        self.token = init_token(path, quorum=1, wall=lambda: self.now, mono=lambda: self.now)
        self.console = Console(self.token)
        self.officers = Officers(self.console)

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clocked(tmp_path):
    c = Clocked(tmp_path / "clocked")
    yield c
    c.token.close()


class Daemon:
    """`cryptobat serve` in a subprocess, up once its sockets (and the pty link, with --pty) exist."""

    def __init__(self, home: Path, *args: str) -> None:
        self.home = home
        self.p = subprocess.Popen([sys.executable, "-m", "cryptobat", "--home", str(home), "serve", *args],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        want = [home / "native.sock", home / "console.sock"]
        want += [] if "--no-pkcs11" in args else [home / "pkcs11.sock"]
        want += [home / "console.pty"] if "--pty" in args else []
        deadline = time.time() + 20
        while not all(p.exists() for p in want):
            if time.time() > deadline or self.p.poll() is not None:
                self.p.kill()
                raise RuntimeError(f"daemon did not start: {self.p.stderr.read()}")
            time.sleep(0.05)
        self.p11 = home / "pkcs11.sock"
        self.address = f"unix:path={self.p11}"

    @property
    def pid(self) -> int:
        return self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
