"""What the tests and the benches share: plain functions and small classes, no pytest fixtures.

A token is set up the way officers set one up at the console (enrol, log in with a
TOTP code from their authenticator apps, set the policy, generate keys), in this
process (:func:`make_token`) or through the ``cryptobat`` command (:class:`Hsm`,
whose files must belong to whoever runs the command).  The daemon runs as a
subprocess (:class:`Daemon`), its console socket is driven by :class:`ConsoleSocket`
and its PKCS#11 socket by :class:`SockClient`.
"""
from __future__ import annotations

import atexit
import base64
import errno
import glob
import json
import math
import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import dns.dnssec
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pyotp
import pytest

from cryptobat import native, rrsig
from cryptobat.api import KeyInfo
from cryptobat.client import serving
from cryptobat.console import Console
from cryptobat.p11rpc import constants as C
from cryptobat.p11rpc.calls import BY_NAME, CALLS
from cryptobat.p11rpc.codec import Attribute, Mechanism, RpcError, encode_request, parse_response
from cryptobat.p11rpc.framing import FrameDecoder, encode_frame
from cryptobat.p11rpc.module import HANDSHAKE, SLOT_ID, Module
from cryptobat.p11serve import ServiceBackend
from cryptobat.serve import Service
from cryptobat.token import Token
from cryptobat.home import init_token, open_token

ROOT = Path(__file__).resolve().parents[1]
PIN = b"123456"  # the signer PIN every configured token gets
PIN_TEXT = PIN.decode()
CONFIGURED_PIN = "signer-pin-1"  # the `configured` fixture's
DAY = 86400
MAX_VALIDITY = 30 * DAY  # setup_home's
EXAMPLE_ZONE = """\
$ORIGIN example.
$TTL 3600
@    IN SOA ns1 hostmaster 1 7200 3600 1209600 3600
@    IN NS  ns1
ns1  IN A   192.0.2.1
www  IN A   192.0.2.80
mail IN MX  10 ns1
"""  # the zone the external signers (OpenDNSSEC, Knot) sign through the token
MONTH = 31 * DAY  # covers signzone's default validity (start - 1 h .. + 30 days)
KEYS = (("8", "k8"), ("13", "k13"), ("14", "k14"), ("15", "k15"))  # setup_home's (algorithm, label), zone testzone
# the custody this run's tokens get (scripts/test runs part of the suite on each) and the
# algorithms it can hold: TPM 2.0 has no Edwards curves, so tests made of several algorithms
# leave 15/16 out there (tpm2's refusal of them is tested in test_custody_tpm2)
TEST_CUSTODY = os.environ.get("CRYPTOBAT_TEST_CUSTODY", "software")
HOLDS = (8, 10, 13, 14) if TEST_CUSTODY == "tpm2" else (8, 10, 13, 14, 15, 16)
COMPAT = ("k14",)
STEP = 30  # RFC 6238 time step
ZONES = {"example.org.": (8, "rsasha256"), "example.net.": (13, "ecdsa256")}  # the PowerDNS tests' zones
ZONE_KEYS = [f"{alg} {role} {zone} {zone.split('.')[1]}-{role}"  # keygen arguments: org-ksk, org-zsk, ...
             for zone, (alg, _) in ZONES.items() for role in ("ksk", "zsk")]
SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")


# ---------------------------------------------------------------- officers and their TOTP codes

def secret_of(text: str) -> str:
    """The TOTP secret in ``coadd``'s answer."""
    m = re.search(r"Secret: ([A-Z2-7]+)", text)
    assert m, text
    return m.group(1)


class Codes:
    """The officers' authenticator apps: a code per login, never from a time step already used.

    The token takes a code of the current step or either neighbour, once each (it remembers
    the steps used), so a fourth login within one step waits for the next one; on an
    injected clock there is nothing to wait for and the next step is given as it is.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.secrets: dict[str, str] = {}
        self.used: dict[str, set[int]] = {}

    def enrol(self, name: str, coadd_answer: str) -> None:
        self.secrets[name] = secret_of(coadd_answer)

    def real_time(self) -> bool:
        return self.clock is time.time

    def free_step(self, name: str) -> int | None:
        """The step a code should come from now (current, next, previous), or None if all are used."""
        now, used = int(self.clock()) // STEP, self.used.get(name, set())
        return next((s for s in (now, now + 1, now - 1) if s not in used), None)

    def code(self, name: str) -> str:
        while (step := self.free_step(name)) is None and self.real_time():
            time.sleep(1)
        if step is None:
            step = max(self.used[name]) + 1
        self.used.setdefault(name, set()).add(step)
        return pyotp.TOTP(self.secrets[name]).at(step * STEP)

    __call__ = code


class Officers(Codes):
    """Officers at one console: enrolled there, logging in there, their apps on the token's wall clock."""

    def __init__(self, console: Console) -> None:
        super().__init__(clock=lambda: self.console.token.clock._wall())  # the app's clock, not token time
        self.console = console

    def real_time(self) -> bool:
        return self.console.token.clock._wall is time.time

    def add(self, name: str) -> str:
        out = self.console.handle(f"coadd {name}")
        assert out.startswith(f"Added CO: {name}\n"), out
        self.enrol(name, out)
        return out

    def login(self, *names: str) -> None:
        for n in names:
            out = self.console.handle(f"cologin {n} {self.code(n)}")
            assert out == f" CO {n} Ok\n", out


# ---------------------------------------------------------------- tokens set up at the console

def configure(officers: Officers, *, enrol: Iterable[str] = (), quorum: int = 2, maxval: int | None = None,
              pin: str | None = None, keys: Iterable[str] = (), compat: Iterable[str] = (),
              imports: Iterable[str] = ()) -> None:
    """Enrol and log in officers, then set what is given: max validity, signer PIN, ``keygen``
    arguments, labels put in compat mode, ``keyimport`` arguments.  Once ``quorum`` officers
    exist, enrolling one more takes a quorum: those enrolled log in first."""
    c = officers.console
    present: list[str] = []
    for name in enrol:
        if len(officers.secrets) >= quorum:
            officers.login(*(n for n in officers.secrets if n not in present))
            present = list(officers.secrets)
        officers.add(name)
    officers.login(*(n for n in officers.secrets if n not in present))
    if maxval is not None:
        out = c.handle(f"setmaxval {maxval}")
        assert out == f" Maximum validity period set to +{maxval} seconds\n", out
    if pin is not None:
        assert c.handle(f"setpin {pin}") == " Signer PIN set\n"
    for args in keys:
        out = c.handle(f"keygen {args}")
        assert out.startswith("ok: key generated"), (args, out)
    for label in compat:
        assert "Compat" in c.handle(f"setcompat {label} on")
    for args in imports:
        out = c.handle(f"keyimport {args}")
        assert out.startswith("ok: key imported"), (args, out)


def make_token(home: Path, *, quorum: int = 2, officers: Iterable[str] | None = None, close: bool = True,
               wall: Callable[[], float] | None = None, mono: Callable[[], float] | None = None,
               **settings) -> Officers:
    """A new token at ``home`` configured by ``officers`` (lamb and jakob as the quorum needs
    them); ``settings`` as :func:`configure`'s.  The token is closed unless ``close`` is false
    (then it is ``officers.console.token``); the officers' codes stay usable either way."""
    clocks = {k: v for k, v in (("wall", wall), ("mono", mono)) if v}
    tok = init_token(home, quorum=quorum, **clocks)
    try:
        o = Officers(Console(tok))
        configure(o, enrol=("lamb", "jakob")[:max(quorum, 1)] if officers is None else officers, quorum=quorum,
                  **settings)
    except BaseException:
        tok.close()
        raise
    if close:
        tok.close()
    return o


def signing_token(home: Path, workers: int = 2):
    """An open token (one officer, max validity 3600 s, ECDSA zone key ``z`` for testzone) and a
    worker-process Engine for it; the caller closes both."""
    from cryptobat.home import open_engine
    t = make_token(home, quorum=1, officers=("solo",), close=False, maxval=3600,
                   keys=("13 zsk testzone z",)).console.token
    return t, open_engine(t, workers=workers)


def setup_home(home: Path, keys=KEYS, compat=COMPAT, quorum: int = 2) -> Officers:
    """The PKCS#11 tests' token: max validity 30 days, signer PIN, zone-signing ``keys`` for testzone."""
    return make_token(home, quorum=quorum, maxval=MAX_VALIDITY, pin=PIN_TEXT,
                      keys=[f"{alg} zsk testzone {label}" for alg, label in keys if int(alg) in HOLDS],
                      compat=compat)


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


def module_session(rt: RealToken) -> tuple[Module, int]:
    """The PKCS#11 module on ``rt`` without the RPC layer: initialised, one R/W session, logged in."""
    m = Module(rt.backend())
    m.call("C_Initialize", [HANDSHAKE, 0, None])
    h = m.call("C_OpenSession", [SLOT_ID, C.CKF_SERIAL_SESSION | C.CKF_RW_SESSION])[0]
    m.call("C_Login", [h, C.CKU_USER, PIN])
    return m, h


_SHARED: list[RealToken] = []


def shared_token() -> RealToken:
    """One real token (keys k8, k13, k14 in compat mode, k15) for whoever needs any, made on first use."""
    if not _SHARED:
        _SHARED.append(RealToken())
    return _SHARED[0]


def close_shared_token() -> None:
    while _SHARED:
        _SHARED.pop().close()


class Clocked:
    """A quorum-1 token whose wall and boot-time clocks the test moves by hand (the core takes them injected)."""

    def __init__(self, path: Path, start: float = 1_800_000_000.0) -> None:
        self.now = start
        self.token = init_token(path, quorum=1, wall=lambda: self.now, mono=lambda: self.now)
        self.console = Console(self.token)
        self.officers = Officers(self.console)

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class ZoneToken:
    """A closed token for one zone and the BIND key files ``cryptobat keyfiles`` wrote for it."""
    home: Path
    officers: Officers
    keys: dict[tuple[int, str], str] = field(default_factory=dict)  # (alg, role) -> K-file base path

    def open_console(self, token: Token) -> Console:
        """A console on ``token`` (e.g. the one an EmbeddedClient opened), officer logged in."""
        self.officers.console = Console(token)
        self.officers.login("lamb")
        return self.officers.console


def zone_token(home: Path, zone: str, keydir: Path, *, algs=(13,), roles=("ksk", "zsk"),
               max_validity: int = MONTH, imports: list[tuple[str, str]] = ()) -> ZoneToken:
    """A quorum-1 token for ``zone``: a key per role per algorithm (KSK+ZSK unless ``roles``) plus
    ``imports`` ((role, BIND private key file)); key files for all its keys are written to ``keydir``."""
    from cryptobat import cli as cryptobat_cli
    o = make_token(home, quorum=1, close=False, maxval=max_validity,
                   keys=[f"{alg} {role} {zone}" for alg in algs for role in roles],
                   imports=[f"{role} {zone} {path}" for role, path in imports])
    try:
        infos = o.console.token.keys()
    finally:
        o.console.token.close()
    assert cryptobat_cli.main(["--home", str(home), "keyfiles", zone, str(keydir)]) == 0
    zt = ZoneToken(home, o)
    for k in infos:
        zt.keys[(k.algorithm, k.role)] = str(keydir / f"K{k.zone}+{k.algorithm:03d}+{k.keytag:05d}")
    return zt


# ---------------------------------------------------------------- the command and the daemon

def stop_process(p: subprocess.Popen, timeout: float = 20) -> None:
    """SIGTERM, then SIGKILL if it is still there after ``timeout`` seconds."""
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def cli(*args: str, home: Path | None = None, input: str | None = None, env: dict | None = None,
        timeout: float = 60, prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run the real ``cryptobat`` command."""
    cmd = (prefix or []) + [sys.executable, "-m", "cryptobat"]
    if home is not None:
        cmd += ["--home", str(home)]
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run(cmd + list(args), input=input, capture_output=True, text=True, timeout=timeout, env=e)


class Daemon:
    """`cryptobat serve` in a subprocess, up once its sockets (and the pty link, with --pty) exist
    and the native API answers.

    ``codes`` are the officers' apps, for :meth:`quorum`; stderr goes to ``log`` if given
    (else to a pipe, read once the daemon stopped)."""

    def __init__(self, home: Path, *args: str, codes: Codes | None = None, log: Path | None = None,
                 timeout: float = 20) -> None:
        self.home, self.codes, self.log = home, codes, log
        self.err = open(log, "ab") if log else None
        self.p = subprocess.Popen([sys.executable, "-m", "cryptobat", "--home", str(home), "serve", *args],
                                  stdout=subprocess.DEVNULL, stderr=self.err or subprocess.PIPE, text=not log)
        self.p11 = Path(args[args.index("--pkcs11-socket") + 1]) if "--pkcs11-socket" in args else home / "pkcs11.sock"
        self.address = f"unix:path={self.p11}"
        want = [home / "native.sock", home / "console.sock"]
        want += [] if "--no-pkcs11" in args else [self.p11]
        want += [home / "console.pty"] if "--pty" in args else []
        deadline = time.time() + timeout
        # native.sock is bound after console.sock; a stale one (a killed daemon's) answers nobody
        while not (all(p.exists() for p in want) and serving(home / "native.sock")):
            if time.time() > deadline or self.p.poll() is not None:
                self.kill()
                raise RuntimeError(f"daemon did not start: {log.read_text() if log else self.p.stderr.read()}")
            time.sleep(0.05)

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

    def officers_session(self) -> ConsoleSocket:
        """A console socket session with every officer logged in."""
        c = ConsoleSocket(self.home / "console.sock")
        for name in self.codes.secrets:
            out = c.cmd(f"cologin {name} {self.codes.code(name)}")
            assert "Ok" in out, out
        return c

    def quorum(self, *lines: str) -> list[str]:
        """The officers log in on a console socket session and run ``lines`` there."""
        c = self.officers_session()
        try:
            return [c.cmd(l) for l in lines]
        finally:
            c.close()

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()
        self._close_log()

    def stop(self) -> None:
        stop_process(self.p)
        self._close_log()

    def _close_log(self) -> None:
        if self.err:
            self.err.close()


PROMPTS = (b"> ", b"Passphrase: ", b"Old passphrase: ", b"New passphrase: ", b"Repeat passphrase: ",
           b"New PIN: ", b"PIN: ")


class ConsoleSocket:
    """One connection to the daemon's console.sock (its own console session), a line at a time.

    An answer is what came before the next prompt: "> ", or one asking for a passphrase or a
    PIN (then the prompt is part of the answer)."""

    def __init__(self, path: Path, timeout: float = 30) -> None:
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(str(path))
        self.s.settimeout(timeout)
        self.read()

    def read(self) -> str:
        out = b""
        while not any(out.endswith(p) for p in PROMPTS):
            chunk = self.s.recv(65536)
            if not chunk:
                break
            out += chunk
        return out.decode()

    def cmd(self, line: str) -> str:
        self.s.sendall(line.encode() + b"\n")
        out = self.read()
        return out[: out.rfind("\n") + 1] if out.endswith("> ") else out

    __call__ = cmd

    def close(self) -> None:
        self.s.close()


def pty_talk(fd: int, line: bytes, until: bytes = b"> ", timeout: float = 10) -> bytes:
    """Write ``line`` to a (non-blocking) terminal and read until ``until`` or the timeout."""
    os.write(fd, line)
    out = b""
    deadline = time.time() + timeout
    while not out.endswith(until) and time.time() < deadline:
        try:
            out += os.read(fd, 4096)
        except BlockingIOError:
            time.sleep(0.02)
    return out


def need(tool: str, package: str) -> str:
    """The tool's path; the test FAILS (not skips) when it is missing."""
    path = shutil.which(tool) or shutil.which(tool, path=os.pathsep.join(SBIN))
    if not path:
        pytest.fail(f"{tool} not found (apt-get install {package})")
    return path


def need_root(why: str) -> None:
    """Skip unless root; under CI, fail instead (CI runs as root: the test must run there)."""
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail(f"this test needs root ({why})")
        pytest.skip(f"needs root ({why})")


class Swtpm:
    """A real software TPM 2.0 (``swtpm``) on a Unix socket in ``state_dir``, for one test or module.

    The TCTI is :attr:`tcti` (``swtpm:path=...``; the control socket is that path plus
    ``.ctrl``, where the TCTI looks for it). Unix sockets, not TCP: no port pair to find, and
    about twice the round trips a second. swtpm's log goes to a file, not a pipe (a pipe nobody
    reads stalls it after ~2,000 commands), and it dies with the test process (parent-death
    signal), so a killed run leaves no swtpm behind. The TPM state persists in ``state_dir``
    across :meth:`restart` (a power cycle)."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.sock = self.dir / "swtpm.sock"
        self.log = self.dir / "swtpm.log"
        self.tcti = f"swtpm:path={self.sock}"
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        from cryptobat.workers import die_with_parent
        exe = need("swtpm", "swtpm")
        for stale in (self.sock, Path(f"{self.sock}.ctrl")):
            stale.unlink(missing_ok=True)
        me = os.getpid()
        self.proc = subprocess.Popen(
            [exe, "socket", "--tpm2", "--tpmstate", f"dir={self.dir}",
             "--server", f"type=unixio,path={self.sock}", "--ctrl", f"type=unixio,path={self.sock}.ctrl",
             "--flags", "not-need-init,startup-clear", "--log", f"file={self.log}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=lambda: die_with_parent(me))
        deadline = time.monotonic() + 20
        while not (self._accepts(self.sock) and self._accepts(Path(f"{self.sock}.ctrl"))):
            if self.proc.poll() is not None:
                raise RuntimeError(f"swtpm exited with {self.proc.returncode}: {self.log.read_text()[-500:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("swtpm did not create its sockets")
            time.sleep(0.02)

    @staticmethod
    def _accepts(path: Path) -> bool:
        """Whether swtpm listens on ``path`` yet (the file appears at bind, before listen)."""
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(path))
            except OSError:
                return False
        return True

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=5)
            self.proc = None

    def restart(self) -> None:
        """Power-cycle the TPM: stop swtpm and start it again on the same state."""
        self.stop()
        self.start()

    def __enter__(self) -> "Swtpm":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"


class SoftHsm:
    """SoftHSMv2 as the backing HSM of a PKCS#11 custody, one token directory per process.

    The module reads ``SOFTHSM2_CONF`` and lists its tokens once, at its first C_Initialize
    in a process (a token initialised later by ``softhsm2-util`` stays invisible to it), so
    the configuration is put in this process's environment, which worker processes inherit,
    and :data:`TOKENS` tokens are made up front; :meth:`token` hands out the next one."""

    TOKENS = 32
    PIN = "backing-pin-1"
    _shared: "SoftHsm | None" = None

    def __init__(self, tokens: int = TOKENS) -> None:
        tool_path = need("softhsm2-util", "softhsm2")
        if not os.path.exists(SOFTHSM_MODULE):
            pytest.fail(f"{SOFTHSM_MODULE} not found (apt-get install softhsm2)")
        self.dir = Path(tempfile.mkdtemp(prefix="cbsofthsm-"))
        atexit.register(shutil.rmtree, self.dir, True)
        (self.dir / "tokens").mkdir()
        self.conf = self.dir / "softhsm2.conf"
        self.conf.write_text(f"directories.tokendir = {self.dir / 'tokens'}\nobjectstore.backend = file\n"
                             "log.level = ERROR\n")
        os.environ["SOFTHSM2_CONF"] = str(self.conf)
        self.module = SOFTHSM_MODULE
        self._free = [f"cb{os.getpid()}-{i}" for i in range(tokens)]
        for label in self._free:
            subprocess.run([tool_path, "--init-token", "--free", "--label", label, "--pin", self.PIN,
                            "--so-pin", "so-pin-1"], check=True, capture_output=True)

    @classmethod
    def shared(cls) -> "SoftHsm":
        if cls._shared is None:
            cls._shared = cls()
        return cls._shared

    def token(self) -> dict:
        """An unused token: the custody ``config`` that opens it (module, token label, user PIN)."""
        if not self._free:
            pytest.fail("all the SoftHSM tokens made for this process are used (raise SoftHsm.TOKENS)")
        return {"module": self.module, "token": self._free.pop(0), "pin": self.PIN}


class TpmBroker:
    """A TPM with a resource manager, as ``/dev/tpmrm0`` is on a host: a real swtpm behind a real
    ``tpm2-abrmd`` on a private D-Bus session bus. Several processes (a daemon, the CLI, the
    test itself) use it at once, each with its own transient objects, which a bare swtpm (one
    connection at a time, objects shared) cannot give. Everything dies with the test process."""

    def __init__(self, state_dir: Path) -> None:
        from cryptobat.workers import die_with_parent
        self.dir = Path(state_dir)
        self.tpm = Swtpm(self.dir / "tpm")
        me = os.getpid()
        bus = self.dir / "bus"
        self.bus_address = f"unix:path={bus}"
        self.procs = [subprocess.Popen(
            [need("dbus-daemon", "dbus"), "--config-file=/usr/share/dbus-1/session.conf", "--nofork",
             f"--address={self.bus_address}"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(self.dir / "dbus.log", "wb"), preexec_fn=lambda: die_with_parent(me))]
        _wait_for(lambda: bus.exists(), "dbus-daemon did not start", self.procs[0])
        name = f"com.intel.tss2.Tabrmd.cb{me}"
        env = {**os.environ, "DBUS_SESSION_BUS_ADDRESS": self.bus_address}
        root = ["--allow-root"] if os.geteuid() == 0 else []
        self.procs.append(subprocess.Popen(
            [need("tpm2-abrmd", "tpm2-abrmd"), "--session", *root, f"--dbus-name={name}", "--max-connections=100",
             f"--tcti={self.tpm.tcti}"], env=env, stdin=subprocess.DEVNULL,
            stdout=open(self.dir / "abrmd.log", "wb"), stderr=subprocess.STDOUT,
            preexec_fn=lambda: die_with_parent(me)))
        self.tcti = f"tabrmd:bus_name={name},bus_type=session"
        os.environ["DBUS_SESSION_BUS_ADDRESS"] = self.bus_address  # the TCTI finds the bus here

        def answers() -> bool:
            from tpm2_pytss import ESAPI, TCTILdr
            try:
                ESAPI(TCTILdr(*self.tcti.split(":", 1))).close()
                return True
            except Exception:
                return False
        _wait_for(answers, "tpm2-abrmd did not come up", self.procs[1])

    def stop(self) -> None:
        for proc in reversed(self.procs):
            stop_process(proc, timeout=5)
        self.tpm.stop()


def _wait_for(ready: Callable[[], bool], why: str, proc: subprocess.Popen, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{why} (exit status {proc.poll()})")
        time.sleep(0.05)


CUSTODIES = ("software", "tpm2", "pkcs11")


def use_custody(kind: str) -> None:
    """Every token this test run creates (in process, by the CLI, by a daemon) gets ``kind``
    custody, through ``$CRYPTOBAT_CUSTODY`` as an operator's host would set it: tpm2 on a
    :class:`TpmBroker`, pkcs11 in one SoftHSMv2 token shared by all (each token's master
    secret and keys are objects of their own there)."""
    if kind not in CUSTODIES:
        raise pytest.UsageError(f"CRYPTOBAT_TEST_CUSTODY must be one of {', '.join(CUSTODIES)}, not {kind!r}")
    if kind == "tpm2":
        state = Path(tempfile.mkdtemp(prefix="cbtpm-"))
        broker = TpmBroker(state)
        atexit.register(shutil.rmtree, state, True)
        atexit.register(broker.stop)
        os.environ["CRYPTOBAT_CUSTODY"] = f"tpm2:{broker.tcti}"
    elif kind == "pkcs11":
        cfg = SoftHsm(tokens=1).token()
        os.environ.update(CRYPTOBAT_CUSTODY=f"pkcs11:{cfg['module']}", CRYPTOBAT_CUSTODY_TOKEN=cfg["token"],
                          CRYPTOBAT_CUSTODY_PIN=cfg["pin"])


@contextlib.contextmanager
def p11_daemon(home: Path, keys, compat=()):
    """A daemon on a :func:`setup_home` token, the address p11-kit-client.so reads pointing at it."""
    d = Daemon(home, codes=setup_home(home, keys=keys, compat=compat))
    old = os.environ.get("P11_KIT_SERVER_ADDRESS")
    os.environ["P11_KIT_SERVER_ADDRESS"] = d.address
    try:
        yield d
    finally:
        d.stop()
        if old is None:
            os.environ.pop("P11_KIT_SERVER_ADDRESS", None)
        else:
            os.environ["P11_KIT_SERVER_ADDRESS"] = old


def client_module() -> str:
    """The stock p11-kit client module, wherever this system's p11-kit keeps its modules."""
    dirs = []
    try:
        d = subprocess.run(["pkg-config", "--variable=p11_module_path", "p11-kit-1"],
                           capture_output=True, text=True, check=True).stdout.strip()
        if d:
            dirs.append(d)
    except (OSError, subprocess.CalledProcessError):
        pass
    dirs += sorted(glob.glob("/usr/lib/*/pkcs11")) + sorted(glob.glob("/usr/lib*/pkcs11"))
    dirs += sorted(glob.glob("/usr/local/lib*/pkcs11"))
    for d in dirs:
        if os.path.exists(p := os.path.join(d, "p11-kit-client.so")):
            return p
    raise AssertionError("p11-kit-client.so not found: apt-get install p11-kit-modules")


def tool(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    r = subprocess.run(["pkcs11-tool", "--module", client_module(), *args], capture_output=True, text=True,
                       env=dict(os.environ), timeout=timeout)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


# ---------------------------------------------------------------- processes, from /proc

def children(pid: int) -> set[int]:
    out: set[int] = set()
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            out |= {int(x) for x in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()}
        except OSError:
            pass
    return out


def descendants(pid: int) -> set[int]:
    seen: set[int] = set()
    todo = list(children(pid))
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.add(p)
            todo += children(p)
    return seen


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"  # a zombie is dead, waiting for its reaper


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def mentioning(text: str) -> set[int]:
    return {int(d) for d in os.listdir("/proc")
            if d.isdigit() and int(d) != os.getpid() and alive(int(d)) and text in cmdline(int(d))}


def survivors(pids: set[int], timeout: float = 5.0) -> dict[int, str]:
    """Those of ``pids`` still running after ``timeout`` seconds, with their command lines."""
    deadline = time.monotonic() + timeout
    left = {p for p in pids if alive(p)}
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = {p for p in left if alive(p)}
    return {p: cmdline(p)[:200] for p in left}


# ---------------------------------------------------------------- what is signed

def signing_data(key, rrset: dns.rrset.RRset, inception: int, expiration: int):
    tpl = rrsig.template(rrset, key, inception, expiration)
    return tpl, rrsig.signing_data(rrset, tpl)


def validate(key, rrset, tpl, signature: bytes, now: int) -> None:
    """Validate a token signature with dnspython against the key's DNSKEY (raises if invalid)."""
    zone = dns.name.from_text(key.zone)
    dnskeys = dns.rrset.from_rdata(zone, 300, key.dnskey())
    dns.dnssec.validate_rrsig(rrset, tpl.replace(signature=signature), {zone: dnskeys}, now=now)


def make_signing_data(key: KeyInfo, expiration: int, inception: int, rrs: bytes = b"",
                      type_covered: int = 1) -> bytes:
    """RRSIG RDATA without signature (owner/signer the key's zone) followed by ``rrs``."""
    signer = b"".join(bytes([len(p)]) + p.encode() for p in key.zone.rstrip(".").split(".")) + b"\0"
    rr = rrs or signer + struct.pack(">HHIH", type_covered, 1, 3600, 4) + bytes([192, 0, 2, 1])
    return struct.pack(">HBBIIIH", type_covered, key.algorithm, 1, 3600, expiration, inception,
                       key.keytag) + signer + rr


def wire(name: str) -> bytes:
    return dns.name.from_text(name).to_wire()


def payload(key, *, tc=dns.rdatatype.A, alg=None, labels=None, ttl=300, exp=None, inc=None, tag=None, signer=None,
            rrs=None, now=0, trailer=b"") -> bytes:
    """RFC 4034 §3.1.8.1 signing data built field by field, so each can be made wrong."""
    owner, a = "www.testzone.", dns.rdatatype.A
    if rrs is None:
        rrs = [(owner, a, 1, ttl, bytes([192, 0, 2, 1])), (owner, a, 1, ttl, bytes([192, 0, 2, 2]))]
    if labels is None:
        labels = len(dns.name.from_text(rrs[0][0]).labels) - 1 if rrs else 2
    head = struct.pack("!HBBIIIH", tc, key.algorithm if alg is None else alg, labels, ttl,
                       (now + 300 if exp is None else exp) & 0xFFFFFFFF, (now - 60 if inc is None else inc) & 0xFFFFFFFF,
                       key.keytag if tag is None else tag)
    head += wire(signer or key.zone)
    body = b"".join(wire(o) + struct.pack("!HHIH", t, c, tt, len(rd)) + rd for o, t, c, tt, rd in rrs)
    return head + body + trailer


# ---------------------------------------------------------------- the p11-kit RPC wire

class WireClient:
    """Speaks the p11-kit RPC protocol the way p11-kit-client does, over :meth:`exchange`."""

    def __init__(self, version: int) -> None:
        self.version, self.code, self.frames = version, 0, FrameDecoder()

    def exchange(self, frame: bytes) -> list:
        raise NotImplementedError

    def raw(self, body: bytes) -> bytes:
        self.code += 1
        frames = self.exchange(encode_frame(self.code, body, b"client"))
        assert len(frames) == 1 and frames[0].code == self.code
        return frames[0].body

    def call(self, name: str, *args):
        return parse_response(self.raw(encode_request(name, list(args), self.version)), BY_NAME[name], self.version)

    def ok(self, name: str, *args):
        rv, vals = self.call(name, *args)
        assert rv == 0, hex(rv)
        return vals

    def start(self, login: bool = True) -> int:
        self.ok("C_Initialize", HANDSHAKE, 0, None)
        (h,) = self.ok("C_OpenSession", SLOT_ID, C.CKF_SERIAL_SESSION | C.CKF_RW_SESSION)
        if login:
            self.ok("C_Login", h, C.CKU_USER, PIN)
        return h


class SockClient(WireClient):
    """A p11-kit RPC connection to the daemon's PKCS#11 socket."""

    def __init__(self, path: Path, version: int = 0) -> None:
        super().__init__(version)
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(20)
        self.s.connect(str(path))
        self.s.sendall(bytes([version]))
        assert self.s.recv(1) == bytes([version])

    def exchange(self, frame: bytes) -> list:
        self.s.sendall(frame)
        while True:
            if frames := self.frames.feed(self.s.recv(65536) or b""):
                return frames

    def close(self) -> None:
        self.s.close()


def p11_served(daemon: Daemon) -> None:
    """The daemon still serves PKCS#11: a fresh connection initialises and reads the token's info."""
    c = SockClient(daemon.p11)
    c.ok("C_Initialize", HANDSHAKE, 0, None)
    assert c.ok("C_GetTokenInfo", SLOT_ID)[1].rstrip() == b"Cryptobat"
    c.close()
    assert daemon.alive()


CORPUS_CANDIDATES = [ROOT.parent / "shared" / "corpus" / "p11-kit-rpc", ROOT / "shared" / "corpus" / "p11-kit-rpc"]


class Input:
    """One corpus input: a call's request body, named after the call (as p11-kit's files are)."""

    def __init__(self, name: str, body: bytes) -> None:
        self.name, self.body = name, body

    def read_bytes(self) -> bytes:
        return self.body


# Arguments by request signature token: a plausible value and an abusive one for each.
_ARGS = {"y": (1, 255), "u": (1, 0xFFFFFFFFFFFFFFFF), "z": ("x", "\xff" * 300), "s": ("x", "y" * 64),
         "ay": (b"k13", b"\0" * 4096), "au": ([1, 2], list(range(600))),
         "aA": ([Attribute(C.CKA_LABEL, b"k13")], [Attribute(C.CKA_CLASS, 3)] * 300),
         "fy": (16, 1 << 31), "fu": (4, 1 << 31), "fA": (2, 1 << 31),
         "M": (Mechanism(C.CKM_SHA256, None), Mechanism(C.CKM_ECDSA, b"\x00" * 300)), "v": ((2, 40), (255, 255))}


def _tokens(sig: str) -> list[str]:
    out, i = [], 0
    while i < len(sig):
        n = 2 if sig[i] in "af" else 1
        out.append(sig[i:i + n])
        i += n
    return out


def generated_corpus() -> list[Input]:
    """Every call of protocol version 0, once with plausible and once with abusive arguments:
    the robustness tests need no files from outside the repository."""
    out = []
    for call in CALLS[1:]:
        if call.min_version:
            continue
        toks = _tokens(call.request)
        if any(t not in _ARGS for t in toks):
            continue
        for which in (0, 1):
            try:
                body = encode_request(call.name, [_ARGS[t][which] for t in toks])
            except (RpcError, ValueError, TypeError, OverflowError, struct.error):
                continue
            out.append(Input(f"{call.name}_generated_{which}", body))
    return out


def corpus_files() -> list[Input]:
    """The generated corpus, plus p11-kit's own fuzz inputs when ../shared has them."""
    files = generated_corpus()
    for c in CORPUS_CANDIDATES:
        if c.is_dir():
            files += [Input(p.name, p.read_bytes()) for p in sorted(c.iterdir()) if p.name.startswith("C_")]
            break
    return files


def valid_requests() -> list[bytes]:
    """Well-formed requests, one per kind of call, for mutation tests to break."""
    rt = shared_token()
    data = make_signing_data(rt.key("k13"), rt.now + 3600, rt.now)
    return [
        encode_request("C_GetInfo", []),
        encode_request("C_GetSlotList", [1, 8]),
        encode_request("C_Login", [1, C.CKU_USER, PIN]),
        encode_request("C_FindObjectsInit", [1, [Attribute(C.CKA_LABEL, b"k13"), Attribute(C.CKA_SIGN, 1)]]),
        encode_request("C_GetAttributeValue", [1, 2, [(C.CKA_LABEL, 0), (C.CKA_VALUE, 32)]]),
        encode_request("C_SignInit", [1, Mechanism(C.CKM_ECDSA_SHA256, b""), 3]),
        encode_request("C_Sign", [1, data, 64]),
        encode_request("C_DigestInit", [1, Mechanism(C.CKM_SHA256, None)]),
        encode_request("C_GenerateRandom", [1, 16]),
    ]


# ---------------------------------------------------------------- a token served to DNS servers

class Hsm:
    """A token with one officer (quorum 1) and a signer PIN, then `cryptobat serve` for it, all
    through the ``cryptobat`` command (:meth:`cli`), so the files belong to whoever runs it."""

    def __init__(self, home: Path, maxval: int, keygen: list[str]) -> None:
        self.home = home
        self.codes = Codes()
        self.proc: subprocess.Popen | None = None
        assert self.cli("init", "--quorum", "1").returncode == 0
        self.codes.enrol("solo", self.cli("console", input="coadd solo\n").stdout)
        out = self.console(f"setmaxval {maxval}", f"setpin {PIN_TEXT}", *(f"keygen {k}" for k in keygen))
        assert out.count("ok: key generated") == len(keygen), out
        self.label = re.search(r"^token\s+(.+?)\s+serial", self.cli("status").stdout, re.M).group(1)

    def cli(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
        return cli(*args, home=self.home, input=input)

    def console(self, *lines: str) -> str:
        """Log the officer in and run console lines (through the daemon when it runs)."""
        r = self.cli("console", input="".join(l + "\n" for l in (f"cologin solo {self.codes.code('solo')}",) + lines))
        assert " CO solo Ok" in r.stdout, r.stdout + r.stderr
        return r.stdout

    def audit(self, n: int = 20) -> list[dict]:
        out = self.cli("console", input=f"audit {n}\n").stdout
        return [json.loads(l[l.index("{"):]) for l in out.splitlines() if "{" in l]

    def refusals(self) -> dict[str, int]:
        seen: dict[str, int] = {}
        for e in self.audit(50):
            if e.get("event") == "refused-sign":
                for why, n in e["reasons"].items():
                    seen[why] = seen.get(why, 0) + n
        return seen

    def compat_count(self) -> int:
        return int(re.search(r"compat (\d+)", self.cli("console", input="status\n").stdout).group(1))

    def keys(self) -> list[KeyInfo]:
        """The token's keys, asked of the running daemon."""
        from cryptobat.client import connect
        c = connect(home=self.home, pin=PIN_TEXT)
        try:
            return c.keys()
        finally:
            c.close()

    def keys_of(self, zone: str) -> dict[str, KeyInfo]:
        return {k.role: k for k in self.keys() if k.zone == zone}

    def start(self, p11_socket: Path | None = None, *extra: str) -> Path:
        args = (["--pkcs11-socket", str(p11_socket)] if p11_socket else []) + list(extra)
        try:
            d = Daemon(self.home, *args)
        except RuntimeError as e:
            pytest.fail(f"cryptobat serve did not start: {e}")
        self.proc = d.p
        time.sleep(0.2)
        return d.p11

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)


class Pdns:
    """A temp config dir, sqlite database, p11-kit user module file, and pdns_server on 127.0.0.1."""

    def __init__(self, base: Path, sock: Path, port: int) -> None:
        self.base, self.sock, self.port = base, sock, port
        self.proc: subprocess.Popen | None = None
        self.user: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            names = [p.pw_name for p in pwd.getpwall()]
            self.user = pwd.getpwnam("pdns" if "pdns" in names else "nobody")
        home = base / "home"
        (home / ".config" / "pkcs11" / "modules").mkdir(parents=True)
        (home / ".config" / "pkcs11" / "modules" / "cryptobat.module").write_text(
            f"remote: unix:path={sock}\nlog-calls: yes\n")
        (base / "sock").mkdir()
        schema = Path("/usr/share/doc/pdns-backend-sqlite3/schema.sqlite3.sql")
        if not schema.exists():
            pytest.fail(f"{schema} not found (apt-get install pdns-backend-sqlite3)")
        import sqlite3
        db = sqlite3.connect(base / "pdns.sqlite3")
        db.executescript(schema.read_text())
        db.close()
        (base / "pdns.conf").write_text(
            f"launch=gsqlite3\ngsqlite3-database={base / 'pdns.sqlite3'}\ngsqlite3-dnssec=yes\n"
            f"local-address=127.0.0.1\nlocal-port={port}\nsocket-dir={base / 'sock'}\n"
            "guardian=no\ndaemon=no\ndisable-syslog=yes\nwebserver=no\nloglevel=6\n")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("P11_KIT")}
        self.env["HOME"] = str(home)
        if self.user:
            for root, dirs, files in os.walk(base):
                for n in [root] + [os.path.join(root, x) for x in dirs + files]:
                    os.chown(n, self.user.pw_uid, self.user.pw_gid)

    def _as_user(self) -> dict:
        return dict(user=self.user.pw_uid, group=self.user.pw_gid, extra_groups=[]) if self.user else {}

    def util(self, *args: str) -> str:
        r = subprocess.run(["pdnsutil", f"--config-dir={self.base}", *args], capture_output=True, text=True,
                           env=self.env, timeout=120, **self._as_user())
        assert r.returncode == 0, f"pdnsutil {args}: {r.stdout}{r.stderr}"
        return r.stdout + r.stderr

    def add_zones(self, label: str) -> None:
        """The ZONES, signed with the keys "org-ksk", "org-zsk", ... of the token ``label``."""
        for zone, (_, name) in ZONES.items():
            self.util("create-zone", zone, "ns1." + zone)
            self.util("add-record", zone, "ns1", "A", "192.0.2.1")
            self.util("add-record", zone, "www", "A", "192.0.2.80")
            for role in ("ksk", "zsk"):
                out = self.util("hsm", "assign", zone, name, role, "cryptobat", label, PIN_TEXT,
                                f"{zone.split('.')[1]}-{role}")
                assert f"Module cryptobat slot {label} assigned to {zone.rstrip('.')}" in out, out

    def start(self) -> None:
        self.log = open(self.base / "pdns.log", "w")
        self.proc = subprocess.Popen(["pdns_server", f"--config-dir={self.base}"], stdout=self.log,
                                     stderr=subprocess.STDOUT, env=self.env, **self._as_user())
        deadline = time.time() + 30
        while "ready to distribute questions" not in self.text():
            if time.time() > deadline or self.proc.poll() is not None:
                pytest.fail(f"pdns_server did not start: {self.text()[-2000:]}")
            time.sleep(0.1)

    def text(self) -> str:
        return (self.base / "pdns.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        if self.proc is not None:
            self.log.close()

    def query(self, name: str, rdtype: str) -> tuple[str, dict]:
        """kdig +dnssec; (status, {(owner, type or 'RRSIG <covered>'): rrset})."""
        r = subprocess.run(["kdig", "@127.0.0.1", "-p", str(self.port), "+dnssec", "+time=5", "+retry=0",
                            name, rdtype], capture_output=True, text=True, timeout=60)
        status = re.search(r"status: (\w+)", r.stdout)
        assert status, r.stdout + r.stderr
        sets: dict = {}
        section = None
        for line in r.stdout.splitlines():
            if line.startswith(";; ") and line.rstrip().endswith("SECTION:"):
                section = line[3:].split()[0]
                continue
            if section != "ANSWER" or not line.strip() or line.startswith(";"):
                continue
            owner, ttl, cls, typ, rdata = line.split(None, 4)
            key = (owner, f"RRSIG {rdata.split()[0]}" if typ == "RRSIG" else typ)
            rrset = sets.setdefault(key, dns.rrset.RRset(dns.name.from_text(owner), dns.rdataclass.IN,
                                                        dns.rdatatype.from_text(typ),
                                                        dns.rdatatype.from_text(rdata.split()[0])
                                                        if typ == "RRSIG" else dns.rdatatype.NONE))
            rrset.add(dns.rdata.from_text(cls, typ, rdata), int(ttl))
        return status.group(1), sets


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (PowerDNS binds both)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.bind(("127.0.0.1", 0))
            port = t.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise AssertionError("no port free for both UDP and TCP")


def pdns_validates(pdns: Pdns, zone: str, hsm_keys: dict) -> None:
    """DNSKEY, SOA and www A answers are signed and validate (dnspython) against the token's keys."""
    status, keyset = pdns.query(zone, "DNSKEY")
    assert status == "NOERROR", status
    dnskeys = keyset[(zone, "DNSKEY")]
    assert sorted(r.to_text() for r in dnskeys) == sorted(k.dnskey().to_text() for k in hsm_keys.values())
    z = dns.name.from_text(zone)
    now = time.time()
    for name, rdtype in ((zone, "DNSKEY"), (zone, "SOA"), ("www." + zone, "A")):
        status, sets = pdns.query(name, rdtype)
        assert status == "NOERROR" and (name, f"RRSIG {rdtype}") in sets, (status, sets)
        sigs = sets[(name, f"RRSIG {rdtype}")]
        role = "ksk" if rdtype == "DNSKEY" else "zsk"
        assert {s.key_tag for s in sigs} == {hsm_keys[role].keytag}
        # PowerDNS's window: inception Thursday-7d, expiration Thursday+14d: 7 to 14 days ahead
        assert all(7 * DAY < s.expiration - now <= 14 * DAY for s in sigs)
        dns.dnssec.validate(sets[(name, rdtype)], sigs, {z: dnskeys}, now=now)


def pdns_mechanisms(pdns: Pdns) -> list[str]:
    """Mechanisms of C_SignInit/C_DigestInit as p11-kit's log-calls printed them."""
    return re.findall(r"^\tmechanism: (CKM_\w+)", pdns.text(), re.M)


# ---------------------------------------------------------------- who may use what

HELLO = {"console.sock": b"", "native.sock": native.encode({"op": "info"}), "pkcs11.sock": b"\x00"}


def probe(path: str) -> str:
    """A socket: 'served', 'closed' (accepted, then closed by the daemon) or connect()'s errno name.
    Another file: 'read' or open()'s errno name."""
    if not path.endswith(".sock"):
        try:
            with open(path, "rb") as f:
                f.read(1)
            return "read"
        except OSError as e:
            return errno.errorcode.get(e.errno, str(e.errno))
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    try:
        s.connect(path)
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    try:
        hello = HELLO[os.path.basename(path)]
        if hello:
            s.sendall(hello)
        return "served" if s.recv(64) else "closed"
    except (ConnectionResetError, BrokenPipeError):
        return "closed"
    finally:
        s.close()


def as_user(uid: int, gid: int, groups: list[int], checks: list[Path | Callable[[], str]]) -> list[str]:
    """Run each check in a forked child running as uid/gid/groups: a path is probe()d, a
    callable called (the child has every module this process imported)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop privileges for good, check, report, exit
        try:
            os.close(r)
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            res = []
            for c in checks:
                try:
                    res.append(probe(str(c)) if isinstance(c, Path) else c())
                except Exception as e:
                    res.append(f"{type(e).__name__}: {e}")
            out = json.dumps(res).encode()
        except BaseException as e:
            out = json.dumps([f"child failed: {e!r}"]).encode()
        while out:
            out = out[os.write(w, out):]
        os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return json.loads(data)


# ---------------------------------------------------------------- zones

def zone_validates(path: str, origin: str, ksk_only: bool) -> None:
    for tool in ("dnssec-verify", "ldns-verify-zone", "kzonecheck"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed (apt-get install -y bind9-utils ldnsutils knot-dnssecutils)")
    runs = [
        ["dnssec-verify", *(["-x"] if ksk_only else []), "-o", origin, path],
        ["ldns-verify-zone", path],
        ["kzonecheck", "-d", "on", "-o", origin, path],
    ]
    for cmd in runs:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}"


def _wsum(data: bytes, odd: bool) -> int:  # RFC 4034 Appendix B checksum terms
    return sum(b << 8 if (i + odd) % 2 == 0 else b for i, b in enumerate(data))


def rsa_private_file(path: Path, flags: int, keytag: int) -> Path:
    """Write a BIND ``Private-key-format`` RSASHA256 key whose DNSKEY (``flags``) has ``keytag``
    (found by varying the public exponent)."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    for _ in range(20):  # a fresh modulus if no exponent of this one fits
        e, p, q, lam = _exponent_for(rsa.generate_private_key(65537, 2048).private_numbers(), flags, keytag)
        if e:
            break
    else:
        raise AssertionError(f"no exponent gives key tag {keytag}")
    d = pow(e, -1, lam)

    def b64(v: int) -> str:
        return base64.b64encode(v.to_bytes((v.bit_length() + 7) // 8, "big")).decode()

    fields = [("Modulus", p * q), ("PublicExponent", e), ("PrivateExponent", d), ("Prime1", p), ("Prime2", q),
              ("Exponent1", d % (p - 1)), ("Exponent2", d % (q - 1)), ("Coefficient", pow(q, -1, p))]
    path.write_text("Private-key-format: v1.3\nAlgorithm: 8 (RSASHA256)\n"
                    + "".join(f"{k}: {b64(v)}\n" for k, v in fields))
    return path


def _exponent_for(base, flags: int, keytag: int):
    p, q = base.p, base.q
    lam = math.lcm(p - 1, q - 1)
    n = (p * q).to_bytes(256, "big")
    nsum = (_wsum(n, False), _wsum(n, True))

    def tag(e: int) -> int:
        eb = e.to_bytes(3, "big")
        head = struct.pack("!HBB", flags, 3, 8) + bytes([len(eb)]) + eb
        ac = _wsum(head, False) + nsum[len(head) % 2]
        return (ac + (ac >> 16)) & 0xFFFF

    # a 3-byte exponent h.m.l: the key tag moves by one per unit of l, so solve for l
    # (odd, for RSA) for each (h, m) instead of trying exponents one by one
    for hm in range(0x0100, 0x10000):
        e0 = hm << 8
        low = (keytag - tag(e0)) & 0xFFFF
        e = e0 | low
        if low < 256 and low % 2 == 1 and e > 65537 and tag(e) == keytag and math.gcd(e, lam) == 1:
            return e, p, q, lam
    return None, p, q, lam


# --- the standards' signed examples (tests/vectors/*.json) -----------------------------------------
VECTORS = Path(__file__).parent / "vectors"


def load_vectors(name: str) -> list[dict]:
    return json.loads((VECTORS / name).read_text())["examples"]


def vector_rrset(lines: list[str]) -> dns.rrset.RRset:
    """An RRset from presentation lines of one owner, TTL, class and type."""
    name, ttl, cls, typ = lines[0].split()[:4]
    return dns.rrset.from_text_list(name, int(ttl), cls, typ, [" ".join(l.split()[4:]) for l in lines])


def vector_rr(text: str) -> dns.rrset.RRset:
    name, ttl, cls, typ, rdata = text.split(None, 4)
    return dns.rrset.from_text(name, int(ttl), cls, typ, rdata)
