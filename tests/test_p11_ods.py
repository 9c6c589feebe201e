"""OpenDNSSEC 2.1 (Debian's opendnssec) generating its keys in the token and signing through it.

Debian's default conf.xml and kasp.xml, changed only where they must be: the ``<Repository>``
is p11-kit-client.so with the token's label and PIN (``<SkipPublicKey/>`` kept), files live
in a temporary directory, the signer listens on a free port. The enforcer generates a
year of keys (binary 16-byte CKA_IDs, destroying each public-key object right after) inside
a quorum's ``p11window``; libhsm hashes in software, so a quorum puts the zone's keys in
compat mode and gives the ZSK its role (``keyrole``: the flags OpenDNSSEC publishes), and
the signed zone passes dnssec-verify, ldns-verify-zone and kzonecheck.

ods-enforcer-db-setup reads only /etc/opendnssec/conf.xml and the daemons talk over
/run/opendnssec/engine.sock whatever conf.xml says, so each runs in its own mount namespace
(``unshare -m``, root) with the temporary directory bound over those two paths.
"""
from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from support import EXAMPLE_ZONE as ZONE, PIN_TEXT, ConsoleSocket, Hsm, client_module, free_port, need, need_root, stop_process, zone_validates

DEBIAN = Path("/usr/share/opendnssec")


class Ods:
    """ods-enforcerd and ods-signerd for one token, all files under ``d``."""

    def __init__(self, d: Path, hsm: Hsm, sock: Path, alg: int) -> None:
        self.d = d
        self.env = dict(os.environ, P11_KIT_SERVER_ADDRESS=f"unix:path={sock}")
        for sub in ("enforcer", "signer", "signconf", "unsigned", "signed", "run"):
            (d / sub).mkdir(parents=True)
        conf = (DEBIAN / "conf.xml").read_text()
        conf, n = re.subn(r'<Repository name="SoftHSM">.*?</Repository>', f"""<Repository name="cryptobat">
\t\t\t<Module>{client_module()}</Module>
\t\t\t<TokenLabel>{hsm.label}</TokenLabel>
\t\t\t<PIN>{PIN_TEXT}</PIN>
\t\t\t<SkipPublicKey/>
\t\t</Repository>""", conf, count=1, flags=re.S)
        assert n == 1 and "<SkipPublicKey/>" in (DEBIAN / "conf.xml").read_text()
        conf = conf.replace("<Syslog><Facility>local0</Facility></Syslog>", "")  # log to stderr
        conf = conf.replace("/etc/opendnssec/", f"{d}/").replace("/var/lib/opendnssec/", f"{d}/")
        conf = conf.replace(f"<WorkingDirectory>{d}/enforcer</WorkingDirectory>",
                            f"<WorkingDirectory>{d}/enforcer</WorkingDirectory><PidFile>{d}/enforcerd.pid</PidFile>"
                            f"<SocketFile>{d}/enforcer.sock</SocketFile>")
        conf = conf.replace(f"<WorkingDirectory>{d}/signer</WorkingDirectory>",
                            f"<WorkingDirectory>{d}/signer</WorkingDirectory><Listener><Interface>"
                            f"<Address>127.0.0.1</Address><Port>{free_port()}</Port></Interface></Listener>")
        (d / "conf.xml").write_text(conf)
        kasp = (DEBIAN / "kasp.xml").read_text().replace("<Repository>SoftHSM</Repository>",
                                                         "<Repository>cryptobat</Repository>")
        if alg == 13:
            kasp = re.sub(r'<Algorithm length="\d+">8</Algorithm>', '<Algorithm length="256">13</Algorithm>', kasp)
        else:  # the token makes 2048-bit RSA keys
            kasp = kasp.replace('<Algorithm length="1024">8</Algorithm>', '<Algorithm length="2048">8</Algorithm>')
        (d / "kasp.xml").write_text(kasp)
        (d / "zonelist.xml").write_text('<?xml version="1.0" encoding="UTF-8"?>\n<ZoneList>\n</ZoneList>\n')
        (d / "unsigned" / "example").write_text(ZONE)
        os.makedirs("/run/opendnssec", exist_ok=True)
        r = subprocess.run(self.ns("ods-enforcer-db-setup -f"), capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        self.procs = [subprocess.Popen(self.ns(f"ods-{name}d -d -c {d}/conf.xml"), env=self.env,
                                       stdout=open(d / f"{name}.log", "w"), stderr=subprocess.STDOUT)
                      for name in ("enforcer", "signer")]
        for sock_file in (d / "enforcer.sock", d / "run" / "engine.sock"):
            self.wait(sock_file.exists, f"{sock_file} never appeared:\n{self.logs()}", 30)

    def ns(self, cmd: str) -> list[str]:
        return ["unshare", "-m", "sh", "-c",
                f"mount --bind {self.d}/run /run/opendnssec && mount --bind {self.d} /etc/opendnssec && exec {cmd}"]

    def logs(self) -> str:
        return "".join((self.d / f"{n}.log").read_text()[-4000:] for n in ("enforcer", "signer"))

    def wait(self, cond, what: str, timeout: float = 120) -> None:
        end = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > end:
                pytest.fail(what)
            time.sleep(0.5)

    def enforcer(self, *args: str) -> str:
        r = subprocess.run(["ods-enforcer", "-s", str(self.d / "enforcer.sock"), *args], capture_output=True,
                           text=True, env=self.env, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    def signer(self, *args: str) -> str:
        r = subprocess.run(["ods-signer", "-s", str(self.d / "run" / "engine.sock"), *args], capture_output=True,
                           text=True, env=self.env, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    def keys(self) -> list[tuple[str, str, int]]:
        """(KSK|ZSK, CKA_ID hex, key tag) of the zone's keys, as the enforcer lists them."""
        out = self.enforcer("key", "list", "--verbose")
        return [(k, cka, int(tag)) for k, cka, tag in
                re.findall(r"^example\s+(KSK|ZSK)\s.*?\s([0-9a-f]{32})\s+cryptobat\s+(\d+)\s*$", out, re.M)]

    def stop(self) -> None:
        for p in self.procs:  # SIGTERM ("ods-signer stop" waits on a socket that never closes)
            stop_process(p)


def audit_events(hsm: Hsm, n: int = 80) -> list[dict]:
    return hsm.audit(n)


@pytest.mark.parametrize("alg", [8, 13])
def test_opendnssec_generates_in_the_token_and_signs_a_valid_zone(tmp_path, alg):
    for tool, pkg in (("ods-enforcerd", "opendnssec"), ("ods-signerd", "opendnssec"),
                      ("ods-enforcer-db-setup", "opendnssec"), ("unshare", "util-linux")):
        need(tool, pkg)
    need_root("mount namespaces for OpenDNSSEC's fixed /etc/opendnssec and /run/opendnssec paths")
    hsm = Hsm(tmp_path / "token", 30 * 86400, [])
    ods = None
    try:
        sock = hsm.start()
        ods = Ods(tmp_path / "ods", hsm, sock, alg)
        ods.enforcer("policy", "import")
        # no window yet: the enforcer's key generation is refused, and the refusal is audited
        ods.enforcer("zone", "add", "--zone", "example", "--policy", "default",
                     "--input", str(ods.d / "unsigned" / "example"), "--output", str(ods.d / "signed" / "example"))
        ods.wait(lambda: any(e.get("command") == "p11-keygen" and e.get("why") == "no PKCS#11 key management "
                             "window open" for e in hsm.audit(30)), "refused keygen not audited:\n" + ods.logs())
        assert not hsm.keys()

        # a quorum opens the window: the enforcer makes its year of keys (Debian's KASP: 2 KSKs, 6 ZSKs)
        # one officer session for the whole test: a TOTP code per login, and few logins in a row
        officer = ConsoleSocket(hsm.home / "console.sock")
        assert " Ok" in officer.cmd(f"cologin solo {hsm.codes.code('solo')}")
        assert "up to 16 new keys for example." in officer.cmd("p11window 600 example. keys 16")
        ods.enforcer("key", "generate", "--policy", "default", "--duration", "P1Y")
        ods.wait(lambda: len(ods.keys()) == 2, "the enforcer assigned no keys:\n" + ods.logs())
        made = [e for e in hsm.audit(80) if e.get("event") == "p11-keygen"]
        assert 2 <= len(made) <= 16 and all(len(bytes.fromhex(e["id"])) == 16 for e in made), made
        token_keys = {k.label: k for k in hsm.keys()}
        assert {e["label"] for e in made} == set(token_keys)
        assert all(k.algorithm == alg and k.role == "csk" for k in token_keys.values())

        # libhsm sends hash-only mechanisms: refused (and counted) until a quorum allows them
        ods.wait(lambda: "hash-only signing refused: key is not in compat mode" in hsm.refusals(),
                 "the signer's refusals were not audited:\n" + ods.logs())
        lines = []
        for kind, cka, tag in ods.keys():
            lines.append(f"setcompat {cka} on")
            if kind == "ZSK":  # published with flags 256: a quorum says so (compat keys sign no data it sees)
                lines.append(f"keyrole {cka} zsk")
        out = "".join(officer.cmd(line) for line in lines)
        officer.close()
        assert "role=zsk flags=256" in out, out
        token_keys = {k.label: k for k in hsm.keys()}
        for kind, cka, tag in ods.keys():  # the key tags OpenDNSSEC publishes are the token's
            assert token_keys[cka].keytag == tag and token_keys[cka].flags == (257 if kind == "KSK" else 256)

        ods.signer("sign", "example")
        signed = ods.d / "signed" / "example"
        ods.wait(signed.exists, "no signed zone:\n" + ods.logs())
        text = signed.read_text()
        tags = {tag for _, _, tag in ods.keys()}
        used = {int(m) for m in re.findall(rf"RRSIG\s+\S+\s+{alg}\s+\d+\s+\d+\s+\d+\s+\d+\s+(\d+)\s+example\.", text)}
        assert used == tags, (used, tags, text)
        zone_validates(str(signed), "example", ksk_only=False)
    finally:
        if ods is not None:
            ods.stop()
        hsm.stop()
