"""PowerDNS 4.7 (pdns_server + gsqlite3) signing live answers through the daemon's PKCS#11 socket.

p11-kit finds the token through a remote-only module file ``cryptobat.module`` in the
user's ``~/.config/pkcs11/modules`` (HOME is a temp dir), so nothing is written to /etc.
p11-kit ignores user configuration in a process running as root, so when the tests
run as root, pdns_server and pdnsutil run as an unprivileged user that owns the temp
dir and whose group is the daemon's signer group (``--signer-group``); the daemon itself
runs as the test user.

What PowerDNS sends (``log-calls: yes`` in the module file shows it, and the tests check):
RSA: C_Sign(CKM_SHA256_RSA_PKCS) over the full RRSIG signing data, so the token's full
policy applies; ECDSA P-256: C_Digest(CKM_SHA256) over the full data, then
C_Sign(CKM_ECDSA) of that hash (with CKM_SHA_1 digests of the public key in between),
which the token's digest binding accepts without compat mode.
"""
from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import dns.dnssec
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

from cryptobat.policy import EXPIRATION_EXCEEDS, NOT_COMPAT
from test_p11_knot import PIN, Hsm, need

DAY = 86400
ZONES = {"example.org.": (8, "rsasha256"), "example.net.": (13, "ecdsa256")}


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
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
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


@pytest.fixture
def signer(tmp_path):
    """Make (Hsm, Pdns) for a max validity; everything started is stopped and removed afterwards."""
    for tool, pkg in (("pdns_server", "pdns-server"), ("pdnsutil", "pdns-server"),
                      ("kdig", "knot-dnsutils")):
        need(tool, pkg)
    made: list = []

    def make(maxval: int) -> tuple[Hsm, Pdns]:
        keygen = [f"{alg} {role} {zone} {zone.split('.')[1]}-{role}"
                  for zone, (alg, _) in ZONES.items() for role in ("ksk", "zsk")]
        hsm = Hsm(tmp_path / "token", maxval, keygen)
        made.append(hsm)
        base = Path(tempfile.mkdtemp(prefix="cryptobat-pdns-"))  # not under pytest's 0700 dir
        made.append(base)
        os.chmod(base, 0o755)
        pdns = Pdns(base, base / "pkcs11.sock", _free_port())
        made.append(pdns)
        # as root, PowerDNS runs as another user: the socket's group (and the daemon's peer check) let it in
        group = ["--signer-group", grp.getgrgid(pdns.user.pw_gid).gr_name] if pdns.user else []
        hsm.start(base / "pkcs11.sock", *group)
        for zone, (_, name) in ZONES.items():
            pdns.util("create-zone", zone, "ns1." + zone)
            pdns.util("add-record", zone, "ns1", "A", "192.0.2.1")
            pdns.util("add-record", zone, "www", "A", "192.0.2.80")
            for role in ("ksk", "zsk"):
                out = pdns.util("hsm", "assign", zone, name, role, "cryptobat", hsm.label, PIN,
                                f"{zone.split('.')[1]}-{role}")
                assert f"Module cryptobat slot {hsm.label} assigned to {zone.rstrip('.')}" in out, out
        pdns.start()
        return hsm, pdns

    yield make
    for thing in reversed(made):
        if isinstance(thing, Path):
            shutil.rmtree(thing, ignore_errors=True)
        else:
            thing.stop()


def _free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (PowerDNS binds both)."""
    import socket
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


def _validate(pdns: Pdns, zone: str, hsm_keys: dict) -> None:
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


def _keys_of(hsm: Hsm, zone: str) -> dict:
    from test_p11_knot import _keys
    return {k.role: k for k in _keys(hsm) if k.zone == zone}


def _mechanisms(pdns: Pdns) -> list[str]:
    """Mechanisms of C_SignInit/C_DigestInit as p11-kit's log-calls printed them."""
    return re.findall(r"^\tmechanism: (CKM_\w+)", pdns.text(), re.M)


def test_pdns_signs_under_the_full_policy(signer):
    """Max validity 14 days covers PowerDNS's window: RSA via CKM_SHA256_RSA_PKCS, ECDSA via digest binding."""
    hsm, pdns = signer(14 * DAY)
    _validate(pdns, "example.org.", _keys_of(hsm, "example.org."))
    _validate(pdns, "example.net.", _keys_of(hsm, "example.net."))
    mechs = _mechanisms(pdns)
    assert "CKM_SHA256_RSA_PKCS" in mechs and "CKM_ECDSA" in mechs and "CKM_SHA256" in mechs, mechs
    assert "CKM_RSA_PKCS" not in mechs
    assert not any(k.compat for k in _keys_of(hsm, "example.org.").values())
    assert not any(k.compat for k in _keys_of(hsm, "example.net.").values())
    assert hsm.compat_count() == 0 and hsm.refusals() == {}


def test_pdns_refused_beyond_max_validity(signer):
    """Max validity 6 days is shorter than any PowerDNS expiration: no signature leaves the token."""
    hsm, pdns = signer(6 * DAY)
    for zone in ZONES:
        for name, rdtype in ((zone, "SOA"), ("www." + zone, "A"), (zone, "DNSKEY")):
            status, sets = pdns.query(name, rdtype)
            assert status == "SERVFAIL" or not any(t.startswith("RRSIG") for _, t in sets), (status, sets)
    why = hsm.refusals()
    assert why.get(EXPIRATION_EXCEEDS, 0) >= 1, why  # RSA: the full data failed the policy
    assert why.get(NOT_COMPAT, 0) >= 1, why  # ECDSA: the hash was not bound to checked data
    assert hsm.compat_count() == 0
