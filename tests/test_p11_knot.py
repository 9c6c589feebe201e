"""Knot DNS 3.2 (kzonesign over GnuTLS) signing through the daemon's PKCS#11 socket and p11-kit-client.so.

GnuTLS hashes the data itself and sends CKM_ECDSA (ECDSA) or CKM_RSA_PKCS with a
DigestInfo (RSA), so the token sees no RRSIG data: Knot signs only with keys a quorum
put in compat mode.  Keys are generated on the console and made known to Knot with
``keymgr ZONE import-pkcs11 <hex CKA_ID>`` (our CKA_ID is the UTF-8 key label).

Also holds the helpers the PowerDNS test shares: a token with one officer behind a
daemon, tool lookup that fails (never skips), and the p11-kit client module's path.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyotp
import pytest

from conftest import cli

PIN = "123456"
SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")


def need(tool: str, package: str) -> str:
    """The tool's path; the test FAILS (not skips) when it is missing."""
    path = shutil.which(tool) or shutil.which(tool, path=os.pathsep.join(SBIN))
    if not path:
        pytest.fail(f"{tool} not found (apt-get install {package})")
    return path


def p11_kit_client() -> str:
    """p11-kit-client.so: pkg-config's p11_module_path first, then the usual (multiarch) directories."""
    dirs = []
    if shutil.which("pkg-config"):
        r = subprocess.run(["pkg-config", "--variable=p11_module_path", "p11-kit-1"],
                           capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.strip():
            dirs.append(r.stdout.strip())
    dirs += sorted(glob.glob("/usr/lib/*/pkcs11")) + ["/usr/lib64/pkcs11", "/usr/lib/pkcs11"]
    for d in dirs:
        p = os.path.join(d, "p11-kit-client.so")
        if os.path.exists(p):
            return p
    pytest.fail("p11-kit-client.so not found (apt-get install p11-kit-modules)")


class Hsm:
    """A token with one officer (quorum 1) and a signer PIN, then `cryptobat serve` for it."""

    def __init__(self, home: Path, maxval: int, keygen: list[str]) -> None:
        self.home = home
        self.used = -1
        self.proc: subprocess.Popen | None = None
        assert cli("init", "--quorum", "1", home=home).returncode == 0
        r = cli("console", home=home, input="coadd solo\n")
        self.secret = re.search(r"Secret: ([A-Z2-7]+)", r.stdout).group(1)
        out = self.console(f"setmaxval {maxval}", f"setpin {PIN}", *(f"keygen {k}" for k in keygen))
        assert out.count("ok: key generated") == len(keygen), out
        self.label = re.search(r"^token\s+(.+?)\s+serial", cli("status", home=home).stdout, re.M).group(1)

    def code(self) -> str:
        """A TOTP code never used before (the token refuses replays), waiting a step if need be."""
        while self.used > time.time() // 30:
            time.sleep(1)
        step = max(int(time.time() // 30), self.used + 1)
        self.used = step
        return pyotp.TOTP(self.secret).at(step * 30)

    def console(self, *lines: str) -> str:
        """Log the officer in and run console lines (through the daemon when it runs)."""
        r = cli("console", home=self.home, input="".join(l + "\n" for l in (f"cologin solo {self.code()}",) + lines))
        assert " CO solo Ok" in r.stdout, r.stdout + r.stderr
        return r.stdout

    def audit(self, n: int = 20) -> list[dict]:
        out = cli("console", home=self.home, input=f"audit {n}\n").stdout
        return [json.loads(l[l.index("{"):]) for l in out.splitlines() if "{" in l]

    def refusals(self) -> dict[str, int]:
        seen: dict[str, int] = {}
        for e in self.audit(50):
            if e.get("event") == "refused-sign":
                for why, n in e["reasons"].items():
                    seen[why] = seen.get(why, 0) + n
        return seen

    def compat_count(self) -> int:
        return int(re.search(r"compat (\d+)", cli("console", home=self.home, input="status\n").stdout).group(1))

    def start(self, p11_socket: Path | None = None, *extra: str) -> Path:
        sock = p11_socket or self.home / "pkcs11.sock"
        args = (["--pkcs11-socket", str(sock)] if p11_socket else []) + list(extra)
        self.proc = subprocess.Popen([sys.executable, "-m", "cryptobat", "--home", str(self.home), "serve", *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 20
        while not (sock.exists() and (self.home / "console.sock").exists()):
            if time.time() > deadline or self.proc.poll() is not None:
                self.stop()
                pytest.fail("cryptobat serve did not start")
            time.sleep(0.05)
        time.sleep(0.2)
        return sock

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


ZONE = """\
$ORIGIN example.
$TTL 3600
@    IN SOA ns1 hostmaster 1 7200 3600 1209600 3600
@    IN NS  ns1
ns1  IN A   192.0.2.1
www  IN A   192.0.2.80
mail IN MX  10 ns1
"""

KNOT_CONF = """\
server:
    rundir: {d}
database:
    storage: {d}
keystore:
  - id: hsm
    backend: pkcs11
    config: "pkcs11:token={token};pin-value={pin} {module}"
policy:
  - id: hsm
    keystore: hsm
    manual: on
    algorithm: {algorithm}
    rrsig-lifetime: 7d
    rrsig-refresh: 1d
template:
  - id: default
    storage: {d}/zones
    file: "%s.zone"
    kasp-db: {d}/kasp
zone:
  - domain: example.
    dnssec-signing: on
    dnssec-policy: hsm
"""


@pytest.mark.parametrize("alg,name,size", [
    (13, "ecdsap256sha256", 256),  # GnuTLS sends CKM_ECDSA with the SHA-256 hash
    (8, "rsasha256", 2048),  # GnuTLS sends CKM_RSA_PKCS with a SHA-256 DigestInfo
])
def test_kzonesign_signs_only_with_compat_keys(tmp_path, alg, name, size):
    for tool, pkg in (("kzonesign", "knot-dnssecutils"), ("kzonecheck", "knot-dnssecutils"),
                      ("keymgr", "knot"), ("ldns-verify-zone", "ldnsutils")):
        need(tool, pkg)
    module = p11_kit_client()
    hsm = Hsm(tmp_path / "token", 8 * 86400, [f"{alg} ksk example. ksk", f"{alg} zsk example. zsk"])
    d = tmp_path / "knot"
    (d / "zones").mkdir(parents=True)
    (d / "out").mkdir()
    (d / "zones" / "example.zone").write_text(ZONE)
    conf = d / "knot.conf"
    conf.write_text(KNOT_CONF.format(d=d, token=hsm.label.replace(" ", "%20"), pin=PIN, module=module,
                                     algorithm=name))
    try:
        sock = hsm.start()
        env = dict(os.environ, P11_KIT_SERVER_ADDRESS=f"unix:path={sock}")

        def run(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run(list(args), capture_output=True, text=True, env=env, timeout=120)

        # Knot's key ID is the hex CKA_ID; ours is the label ("ksk" -> 6b736b)
        for label, flags in (("ksk", ("ksk=yes", "zsk=no")), ("zsk", ("ksk=no", "zsk=yes"))):
            r = run("keymgr", "-c", str(conf), "example.", "import-pkcs11", label.encode().hex(),
                    f"algorithm={alg}", f"size={size}", *flags)
            assert r.returncode == 0, r.stdout + r.stderr
        listed = run("keymgr", "-c", str(conf), "example.", "list").stdout
        tags = {k.label: k.keytag for k in _keys(hsm)}
        assert f"{tags['ksk']} KSK" in listed and f"{tags['zsk']} ZSK" in listed, listed

        # not in compat mode: GnuTLS's hash-only signature is refused, kzonesign fails
        r = run("kzonesign", "-c", str(conf), "-o", str(d / "out"), "example.")
        assert r.returncode != 0 and "signing error" in r.stderr, r.stdout + r.stderr
        assert not (d / "out" / "example.zone").exists()
        assert hsm.refusals() == {"hash-only signing refused: key is not in compat mode": 1}

        # a quorum puts both keys in compat mode: Knot signs, the zone validates
        out = hsm.console("setcompat ksk on", "setcompat zsk on")
        assert out.count("Compat (hash-only) signing on") == 2, out
        before = hsm.compat_count()
        r = run("kzonesign", "-c", str(conf), "-o", str(d / "out"), "example.")
        assert r.returncode == 0, r.stdout + r.stderr
        signed = d / "out" / "example.zone"
        text = signed.read_text()
        assert re.search(rf"RRSIG\s+DNSKEY {alg} 1 3600 \d+ \d+ {tags['ksk']} example\.", text), text
        assert re.search(rf"RRSIG\s+A {alg} 2 3600 \d+ \d+ {tags['zsk']} example\.", text), text
        assert hsm.compat_count() - before == len(re.findall(r"^\S+\s+\d+\s+RRSIG\s", text, re.M)) > 5
        r = run("kzonecheck", "-d", "on", "-o", "example.", str(signed))
        assert r.returncode == 0, r.stdout + r.stderr
        r = run("ldns-verify-zone", str(signed))
        assert r.returncode == 0 and "Zone is verified and complete" in r.stdout, r.stdout + r.stderr
    finally:
        hsm.stop()


def _keys(hsm: Hsm):
    """The token's keys, asked of the running daemon."""
    from cryptobat.client import connect
    c = connect(home=hsm.home, pin=PIN)
    try:
        return c.keys()
    finally:
        c.close()
