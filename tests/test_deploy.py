"""The deployment of docs/deploying.md: the token as user ``cryptobat``, PowerDNS as ``pdns``.

The daemon runs as ``cryptobat`` with ``--signer-group pdns`` (and pdns as a supplementary
group, as the systemd unit's SupplementaryGroups= gives it), its home 0700 in a directory
everyone can traverse and its sockets in a runtime directory, as under systemd. A real
PowerDNS (test_p11_pdns's setup) runs as ``pdns`` and signs live answers through
pkcs11.sock; ``pdns`` cannot read the token's files nor use the console socket, ``nobody``
cannot reach the signer sockets. Needs root (to create and become those users).

The unit in contrib/systemd is checked with ``systemd-analyze verify`` (and its exposure
score), or, without systemd-analyze, parsed as INI for every hardening option.
"""
from __future__ import annotations

import configparser
import grp
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from support import (DAY, PIN_TEXT, ROOT, ZONE_KEYS, Hsm, Pdns, as_user, free_port, need, need_root,
                     pdns_mechanisms, pdns_validates)

UNIT = ROOT / "contrib" / "systemd" / "cryptobat.service"
SERIAL_DROPIN = ROOT / "contrib" / "systemd" / "cryptobat.service.d" / "serial.conf"
HARDENING = {
    "User": "cryptobat", "Group": "cryptobat", "StateDirectory": "cryptobat", "StateDirectoryMode": "0700",
    "RuntimeDirectory": "cryptobat", "UMask": "0077", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
    "ProtectHome": "yes", "PrivateTmp": "yes", "PrivateDevices": "yes", "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes", "ProtectControlGroups": "yes", "RestrictAddressFamilies": "AF_UNIX",
    "RestrictNamespaces": "yes", "LockPersonality": "yes", "MemoryDenyWriteExecute": "yes",
    "SystemCallFilter": "@system-service", "CapabilityBoundingSet": "",
}


# --- the systemd unit -------------------------------------------------------------------------
def _unit(path: Path) -> configparser.ConfigParser:
    c = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    c.optionxform = str  # keys are case-sensitive
    c.read_string(path.read_text())
    return c


def test_unit_names_every_hardening_option():
    svc = _unit(UNIT)["Service"]
    for key, value in HARDENING.items():
        assert key in svc and svc[key].strip() == value, (key, svc.get(key))
    start = svc["ExecStart"].split()
    assert start[1:] == ["--home", "/var/lib/cryptobat", "serve", "--signer-group", "pdns",
                         "--socket-dir", "/run/cryptobat"], start
    assert svc["SupplementaryGroups"] == "pdns"  # the daemon may give its sockets to pdns
    module = (ROOT / "contrib" / "p11-kit" / "cryptobat.module").read_text()
    assert "remote: unix:path=/run/cryptobat/pkcs11.sock" in module.splitlines()
    sysusers = [l.split() for l in (ROOT / "contrib" / "sysusers.d" / "cryptobat.conf").read_text().splitlines()
                if l.strip() and not l.startswith("#")]
    assert sysusers[0][:3] == ["u", "cryptobat", "-"]
    dropin = _unit(SERIAL_DROPIN)["Service"]
    assert dropin["PrivateDevices"] == "no" and "DeviceAllow" in dropin and "--serial" in dropin["ExecStart"]


def test_unit_verifies_with_systemd_analyze(tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze missing: apt-get install systemd (scripts/test does)")
        pytest.skip("systemd-analyze not installed (the INI test above still checks the unit)")
    # verify wants ExecStart's program to exist: point it at this system's cryptobat
    exe = shutil.which("cryptobat") or sys.executable
    (tmp_path / "cryptobat.service.d").mkdir()
    for src, dst in ((UNIT, tmp_path / "cryptobat.service"),
                     (SERIAL_DROPIN, tmp_path / "cryptobat.service.d" / "serial.conf")):
        dst.write_text(src.read_text().replace("/usr/local/bin/cryptobat", exe))
    r = subprocess.run([tool, "verify", str(tmp_path / "cryptobat.service")], capture_output=True, text=True,
                       timeout=60)
    complaints = [l for l in (r.stdout + r.stderr).splitlines() if "cryptobat.service" in l or "serial.conf" in l]
    assert r.returncode == 0 and not complaints, r.stdout + r.stderr
    r = subprocess.run([tool, "security", "--offline=yes", str(tmp_path / "cryptobat.service")],
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for cryptobat\.service: ([\d.]+)", r.stdout + r.stderr)
    if m is None and "--offline" in r.stderr:
        if os.environ.get("CI"):
            pytest.fail("this systemd-analyze has no offline security check: " + r.stderr[-300:])
        pytest.skip("this systemd-analyze has no offline security check")
    assert m and float(m.group(1)) <= 2.0, r.stdout + r.stderr


# --- the token as cryptobat, PowerDNS as pdns --------------------------------------------------
def _user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    r = subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                        "--shell", "/usr/sbin/nologin", name], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return pwd.getpwnam(name)


def _runs_as(user: pwd.struct_passwd, cmd: list[str], env: dict, input: str | None = None,
             ) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, input=input, capture_output=True, text=True, env=env, timeout=60, cwd="/",
                              user=user.pw_uid, group=user.pw_gid, extra_groups=[])
    except PermissionError as e:  # the program itself is out of the user's reach
        return subprocess.CompletedProcess(cmd, 126, "", str(e))


def _python_for(user: pwd.struct_passwd, lib: Path) -> tuple[list[str], dict]:
    """An interpreter command and environment in which ``user`` imports this tree's cryptobat.

    This interpreter if the user can run it and read the package; else the system python3 of
    the same version with a readable copy (in ``lib``) of the package and of the modules it
    loads from this interpreter's site-packages."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/nonexistent", "LANG": "C.UTF-8",
           "PYTHONDONTWRITEBYTECODE": "1"}
    check = ["-c", "import cryptobat.serve, cryptobat.p11serve"]
    if _runs_as(user, [sys.executable, *check], env).returncode == 0:
        return [sys.executable], env
    system = shutil.which("python3", path="/usr/bin:/bin")
    if system is None:
        pytest.fail(f"{user.pw_name} cannot run {sys.executable} and there is no /usr/bin/python3")
    version = subprocess.run([system, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True,
                             text=True).stdout.strip()
    if version != str(tuple(sys.version_info[:2])):
        pytest.fail(f"{user.pw_name} cannot run {sys.executable}, and {system} is Python {version}")
    # the modules cryptobat loads, from this interpreter (a fresh process, so nothing of pytest's)
    listing = subprocess.run([sys.executable, "-c", (
        "import sys, site, cryptobat.serve, cryptobat.p11serve, cryptobat.token, cryptobat.console\n"
        "import cryptobat.signing, cryptobat.signzone, cryptobat.client\n"
        "roots = [p for p in site.getsitepackages() + sys.path if 'site-packages' in p or p.endswith('/src')]\n"
        "tops = set()\n"
        "for m in list(sys.modules.values()):\n"
        "    f = getattr(m, '__file__', None) or ''\n"
        "    for r in roots:\n"
        "        if f.startswith(r.rstrip('/') + '/'):\n"
        "            tops.add((r, f[len(r.rstrip('/')) + 1:].split('/')[0]))\n"
        "import importlib.metadata as md\n"
        "dists = md.packages_distributions()\n"
        "for r, t in list(tops):\n"
        "    for d in dists.get(t.split('.')[0], []):\n"
        "        meta = [f for f in (md.distribution(d).files or []) if f.name == 'METADATA']\n"
        "        if meta:\n"  # dnspython asks the metadata whether cryptography is there
        "            p = md.distribution(d).locate_file(meta[0]).parent\n"
        "            tops.add((str(p.parent), p.name))\n"
        "print('\\n'.join(f'{r}\\t{t}' for r, t in sorted(tops)))\n")],
        capture_output=True, text=True, check=True).stdout.split("\n")
    lib.mkdir(mode=0o755)
    for line in filter(None, listing):
        root, top = line.split("\t")
        src = Path(root) / top
        if src.is_dir():
            shutil.copytree(src, lib / top, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, lib / top)
    for dirpath, dirs, files in os.walk(lib):
        os.chmod(dirpath, 0o755)
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o644 if not f.endswith(".so") else 0o755)
    env["PYTHONPATH"] = str(lib)
    r = _runs_as(user, [system, *check], env)
    assert r.returncode == 0, f"{user.pw_name} cannot import the copy in {lib}: {r.stderr}"
    return [system], env


class TokenAsCryptobat(Hsm):
    """support's Hsm (one officer, a PIN, keys), with the daemon and the ``cryptobat`` command
    (:meth:`cli`, which sets the token up too) run as user cryptobat."""

    def __init__(self, home: Path, run: Path, maxval: int, keygen: list[str], python: list[str], env: dict) -> None:
        self.user = pwd.getpwnam("cryptobat")
        self.run, self.python, self.env = run, python, env
        self.signer_gid = grp.getgrnam("pdns").gr_gid
        for d, mode in ((home, 0o700), (run, 0o755)):  # as systemd's StateDirectory= and RuntimeDirectory=
            d.mkdir(mode=mode)
            os.chmod(d, mode)
            os.chown(d, self.user.pw_uid, self.user.pw_gid)
        super().__init__(home, maxval, keygen)

    def cli(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
        return _runs_as(self.user, [*self.python, "-m", "cryptobat", "--home", str(self.home), *args], self.env,
                        input)

    def start(self, p11_socket: Path | None = None) -> Path:
        self.log = open(self.run.parent / "serve.log", "w")
        self.proc = subprocess.Popen(
            [*self.python, "-m", "cryptobat", "--home", str(self.home), "serve", "--signer-group", "pdns",
             "--socket-dir", str(self.run)],
            stdout=self.log, stderr=subprocess.STDOUT, env=self.env, cwd="/",
            user=self.user.pw_uid, group=self.user.pw_gid, extra_groups=[self.signer_gid])
        deadline = time.time() + 30
        while not (self.home / "pkcs11.sock").is_symlink():  # the links come once every socket is up
            if time.time() > deadline or self.proc.poll() is not None:
                self.stop()
                pytest.fail("cryptobat serve did not start: " + (self.run.parent / "serve.log").read_text())
            time.sleep(0.05)
        return self.run / "pkcs11.sock"


@pytest.fixture
def deployed():
    """(token served as cryptobat, PowerDNS as pdns signing through it, the token's base directory)."""
    need_root("it creates and becomes users cryptobat, pdns, nobody")
    for tool, pkg in (("pdns_server", "pdns-server"), ("pdnsutil", "pdns-server"), ("kdig", "knot-dnsutils"),
                      ("useradd", "passwd")):
        need(tool, pkg)
    if "pdns" not in {g.gr_name for g in grp.getgrall()}:
        pytest.fail("no group pdns (apt-get install pdns-server)")
    cryptobat = _user("cryptobat")
    base = Path(tempfile.mkdtemp(prefix="cryptobat-deploy-", dir="/var/tmp"))  # traversable, unlike pytest's
    os.chmod(base, 0o755)
    made: list = [base]
    try:
        python, env = _python_for(cryptobat, base / "pylib")
        tok = TokenAsCryptobat(base / "token", base / "run", 14 * DAY, ZONE_KEYS, python, env)
        made.append(tok)
        tok.start()
        pbase = Path(tempfile.mkdtemp(prefix="cryptobat-pdns-"))
        os.chmod(pbase, 0o755)
        made.append(pbase)
        pdns = Pdns(pbase, base / "run" / "pkcs11.sock", free_port())
        assert pdns.user is not None and pdns.user.pw_name == "pdns"
        made.append(pdns)
        pdns.add_zones(tok.label)
        pdns.start()
        yield tok, pdns, base
    finally:
        for thing in reversed(made):
            if isinstance(thing, Path):
                shutil.rmtree(thing, ignore_errors=True)
            else:
                thing.stop()


def test_powerdns_as_pdns_signs_through_a_token_run_as_cryptobat(deployed):
    tok, pdns, base = deployed
    home, run = tok.home, tok.run
    cb, pd, nobody = pwd.getpwnam("cryptobat"), pwd.getpwnam("pdns"), pwd.getpwnam("nobody")
    signers = grp.getgrnam("pdns").gr_gid

    # the daemon really is cryptobat, and its files and sockets are where and how the docs say
    status = Path(f"/proc/{tok.proc.pid}/status").read_text()
    assert re.search(rf"^Uid:\s+{cb.pw_uid}\s", status, re.M) and re.search(rf"^Gid:\s+{cb.pw_gid}\s", status, re.M)
    st = os.stat(home)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (cb.pw_uid, 0o700)
    for name in ("master.key", "state.db"):
        st = os.stat(home / name)
        assert st.st_uid == cb.pw_uid and not stat.S_IMODE(st.st_mode) & 0o077, name
    st = os.stat(run / "console.sock")
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (cb.pw_uid, 0o600)
    for name in ("native.sock", "pkcs11.sock"):
        st = os.stat(run / name)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (cb.pw_uid, signers, 0o660), name

    # PowerDNS, as pdns, signs live answers through pkcs11.sock under the full policy
    pdns_validates(pdns, "example.org.", tok.keys_of("example.org."))
    pdns_validates(pdns, "example.net.", tok.keys_of("example.net."))
    assert "CKM_SHA256_RSA_PKCS" in pdns_mechanisms(pdns)
    assert int(pdns.proc.pid) and re.search(rf"^Uid:\s+{pd.pw_uid}\s",
                                           Path(f"/proc/{pdns.proc.pid}/status").read_text(), re.M)

    # pdns: no token file, no console; the native API with the PIN, as PowerDNS's PKCS#11
    def native_as_signer() -> str:
        from cryptobat.client import SocketClient
        c = SocketClient(str(run / "native.sock"), PIN_TEXT)
        try:
            return ",".join(sorted(k.label for k in c.keys()))
        finally:
            c.close()

    got = as_user(pd.pw_uid, pd.pw_gid, [], [home / "master.key", home / "state.db", run / "console.sock",
                                              home / "console.sock", run / "native.sock", run / "pkcs11.sock",
                                              native_as_signer])
    assert got == ["EACCES", "EACCES", "EACCES", "EACCES", "served", "served",
                   "net-ksk,net-zsk,org-ksk,org-zsk"], got
    # nobody: not the signer sockets either
    got = as_user(nobody.pw_uid, nobody.pw_gid, [], [run / "native.sock", run / "pkcs11.sock",
                                                     run / "console.sock", home / "master.key"])
    assert got == ["EACCES", "EACCES", "EACCES", "EACCES"], got
    # the token's own user still has its console (officers on the token host)
    r = tok.cli("console", input="colist\n")
    assert " |solo| not present" in r.stdout, r.stdout + r.stderr
