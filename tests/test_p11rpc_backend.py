"""Real tokens for the PKCS#11 tests: set up through the console, served in-process or by the daemon.

``RealToken`` opens a token with ``home.init_token`` and configures it the way officers
would at the console (two officers, max validity, signer PIN, keys, one compat key);
``backend()`` gives the p11rpc Backend the daemon itself uses
(``p11serve.ServiceBackend(Service(token))``), so the sans-I/O tests exercise the
real policy.  ``Daemon`` runs ``cryptobat serve`` on such a home and ``ConsoleSocket``
drives its console socket.
"""
from __future__ import annotations

import conftest

import glob
import os
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path

import pyotp

from cryptobat.api import KeyInfo
from cryptobat.console import Console
from cryptobat.p11rpc.backend import Backend
from cryptobat.p11serve import ServiceBackend
from cryptobat.serve import Service
from cryptobat.home import init_token, open_token
from cryptobat.token import Token

PIN = b"123456"
MAX_VALIDITY = 30 * 86400
KEYS = (("8", "k8"), ("13", "k13"), ("14", "k14"), ("15", "k15"))
COMPAT = ("k14",)


def make_signing_data(key: KeyInfo, expiration: int, inception: int, rrs: bytes = b"",
                      type_covered: int = 1) -> bytes:
    """RRSIG RDATA without signature (owner/signer the key's zone) followed by ``rrs``."""
    signer = b"".join(bytes([len(p)]) + p.encode() for p in key.zone.rstrip(".").split(".")) + b"\0"
    rr = rrs or signer + struct.pack(">HHIH", type_covered, 1, 3600, 4) + bytes([192, 0, 2, 1])
    return struct.pack(">HBBIIIH", type_covered, key.algorithm, 1, 3600, expiration, inception,
                       key.keytag) + signer + rr


class OfficerCodes:
    """TOTP codes as the officers' apps give them, never reusing a time step (the token refuses that)."""

    def __init__(self) -> None:
        self.secrets: dict[str, str] = {}
        self.used: dict[str, int] = {}

    def code(self, name: str) -> str:
        while True:
            now = int(time.time()) // 30
            step = max(now, self.used.get(name, -1) + 1)
            if step <= now + 1:
                break
            time.sleep(1)
        self.used[name] = step
        return pyotp.TOTP(self.secrets[name]).at(step * 30)


def setup_home(home: Path, keys=KEYS, compat=COMPAT, quorum: int = 2) -> OfficerCodes:
    """Initialise a token at ``home`` through its console; return the officers' code source."""
    tok = init_token(home, quorum=quorum)
    codes = OfficerCodes()
    try:
        con = Console(tok)
        for name in ("lamb", "jakob")[:max(quorum, 1)]:
            out = con.handle(f"coadd {name}")
            codes.secrets[name] = next(l.split()[1] for l in out.splitlines() if l.startswith("Secret:"))
        for name in codes.secrets:
            assert con.handle(f"cologin {name} {codes.code(name)}") == f" CO {name} Ok\n"
        assert "set" in con.handle(f"setmaxval {MAX_VALIDITY}")
        assert con.handle(f"setpin {PIN.decode()}") == " Signer PIN set\n"
        for alg, label in keys:
            assert con.handle(f"keygen {alg} zsk testzone {label}").startswith("ok: key generated")
        for label in compat:
            assert "Compat" in con.handle(f"setcompat {label} on")
    finally:
        tok.close()
    return codes


class RealToken:
    """A configured token opened in this process, as ``cryptobat p11-stdio`` opens it embedded."""

    def __init__(self, home: Path | None = None, **kw) -> None:
        self.home = Path(home or tempfile.mkdtemp(prefix="cbp11-")) / "token"
        self.codes = setup_home(self.home, **kw)
        self.token = open_token(self.home)
        self.service = Service(self.token)
        self.console = Console(self.token)

    def backend(self) -> ServiceBackend:
        return ServiceBackend(self.service)

    @property
    def now(self) -> int:
        return self.token.now()

    @property
    def label(self) -> str:
        return self.token.info()["label"]

    def key(self, label: str) -> KeyInfo:
        return self.token.key(label)

    def quorum(self, *lines: str) -> list[str]:
        """Officers log in on the console and run ``lines`` (configuration under quorum)."""
        for name in self.codes.secrets:
            self.console.handle(f"cologin {name} {self.codes.code(name)}")
        return [self.service.console_line(self.console, l) for l in lines]

    def close(self) -> None:
        self.token.close()


def client_module() -> str:
    """The stock p11-kit client module, wherever this system's p11-kit keeps its modules."""
    cands = []
    try:
        d = subprocess.run(["pkg-config", "--variable=p11_module_path", "p11-kit-1"],
                           capture_output=True, text=True, check=True).stdout.strip()
        if d:
            cands.append(os.path.join(d, "p11-kit-client.so"))
    except (OSError, subprocess.CalledProcessError):
        pass
    cands += sorted(glob.glob("/usr/lib/*/pkcs11/p11-kit-client.so")) + sorted(glob.glob("/usr/lib*/pkcs11/p11-kit-client.so"))
    cands += sorted(glob.glob("/usr/local/lib*/pkcs11/p11-kit-client.so"))
    for c in cands:
        if os.path.exists(c):
            return c
    raise AssertionError("p11-kit-client.so not found: apt-get install p11-kit-modules")


class ConsoleSocket:
    """The daemon's console socket, one command at a time."""

    def __init__(self, path: Path) -> None:
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(str(path))
        self.s.settimeout(30)
        self._until_prompt()

    def _until_prompt(self) -> str:
        out = b""
        while not out.endswith(b"> "):
            chunk = self.s.recv(65536)
            if not chunk:
                break
            out += chunk
        return out[:-2].decode() if out.endswith(b"> ") else out.decode()

    def cmd(self, line: str) -> str:
        self.s.sendall(line.encode() + b"\n")
        return self._until_prompt()

    def close(self) -> None:
        self.s.close()


class Daemon(conftest.Daemon):
    """The daemon on a home set up by :func:`setup_home`, whose officers can form a quorum."""

    def __init__(self, home: Path, codes: OfficerCodes, *args: str) -> None:
        self.codes = codes
        super().__init__(home, *args)

    def quorum(self, *lines: str) -> list[str]:
        c = ConsoleSocket(self.home / "console.sock")
        try:
            for name in self.codes.secrets:
                out = c.cmd(f"cologin {name} {self.codes.code(name)}")
                assert "Ok" in out, out
            return [c.cmd(l) for l in lines]
        finally:
            c.close()


def test_real_token_backend_satisfies_protocol(tmp_path):
    rt = RealToken(tmp_path)
    try:
        b = rt.backend()
        assert isinstance(b, Backend)
        k = rt.key("k13")
        good = make_signing_data(k, rt.now + 86400, rt.now - 3600)
        assert b.check_signing_data("k13", good) is None
        assert b.check_signing_data("k13", make_signing_data(k, rt.now + 90 * 86400, rt.now)) is not None
        assert b.timed_sign([("k13", good)])[0].ok
        assert b.check_pin(PIN) and not b.check_pin(b"nope")
        assert not b.keygen_allowed()
        assert rt.key("k14").compat and not k.compat
    finally:
        rt.close()
