"""Knot DNS 3.2 (kzonesign over GnuTLS) signing through the daemon's PKCS#11 socket and p11-kit-client.so.

GnuTLS hashes the data itself and sends CKM_ECDSA (ECDSA) or CKM_RSA_PKCS with a
DigestInfo (RSA), so the token sees no RRSIG data: Knot signs only with keys a quorum
put in compat mode.  Keys are generated on the console and made known to Knot with
``keymgr ZONE import-pkcs11 <hex CKA_ID>`` (our CKA_ID is the UTF-8 key label).
"""
from __future__ import annotations

import os
import re
import subprocess

import pytest

from support import EXAMPLE_ZONE as ZONE, PIN_TEXT, ConsoleSocket, Hsm, client_module, need, zone_validates

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
    module = client_module()
    hsm = Hsm(tmp_path / "token", 8 * 86400, [f"{alg} ksk example. ksk", f"{alg} zsk example. zsk"])
    d = tmp_path / "knot"
    (d / "zones").mkdir(parents=True)
    (d / "out").mkdir()
    (d / "zones" / "example.zone").write_text(ZONE)
    conf = d / "knot.conf"
    conf.write_text(KNOT_CONF.format(d=d, token=hsm.label.replace(" ", "%20"), pin=PIN_TEXT, module=module,
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
        tags = {k.label: k.keytag for k in hsm.keys()}
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


@pytest.mark.parametrize("alg,name", [(13, "ecdsap256sha256"), (8, "rsasha256")])
def test_keymgr_generates_keys_in_the_token(tmp_path, alg, name):
    """``keymgr generate`` over PKCS#11: a binary 20-byte CKA_ID and no label. Refused (and
    audited) outside a window; inside one the token keeps Knot's id (a label derived from it),
    the ZSK gets its role from a quorum (compat keys sign no data the token sees), and
    kzonesign's zone validates."""
    for tool, pkg in (("kzonesign", "knot-dnssecutils"), ("keymgr", "knot")):
        need(tool, pkg)
    hsm = Hsm(tmp_path / "token", 8 * 86400, [])
    d = tmp_path / "knot"
    (d / "zones").mkdir(parents=True)
    (d / "out").mkdir()
    (d / "zones" / "example.zone").write_text(ZONE)
    conf = d / "knot.conf"
    conf.write_text(KNOT_CONF.format(d=d, token=hsm.label.replace(" ", "%20"), pin=PIN_TEXT, module=client_module(),
                                     algorithm=name))
    try:
        sock = hsm.start()
        env = dict(os.environ, P11_KIT_SERVER_ADDRESS=f"unix:path={sock}")

        def run(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run(list(args), capture_output=True, text=True, env=env, timeout=120)

        r = run("keymgr", "-c", str(conf), "example.", "generate", f"algorithm={alg}", "ksk=yes", "zsk=no")
        assert r.returncode != 0, r.stdout + r.stderr
        assert any(e.get("command") == "p11-keygen" and e.get("why") == "no PKCS#11 key management window open"
                   for e in hsm.audit(10))
        # one officer session for the whole test: a TOTP code per login, and few logins in a row
        officer = ConsoleSocket(hsm.home / "console.sock")
        assert " Ok" in officer.cmd(f"cologin solo {hsm.codes.code('solo')}")
        assert "up to 2 new keys" in officer.cmd("p11window 300 example. keys 2")
        ids = {}
        for role, flags in (("ksk", ("ksk=yes", "zsk=no")), ("zsk", ("ksk=no", "zsk=yes"))):
            r = run("keymgr", "-c", str(conf), "example.", "generate", f"algorithm={alg}", *flags)
            assert r.returncode == 0, r.stdout + r.stderr
            ids[role] = r.stdout.strip().split()[-1]  # keymgr prints the key ID (hex CKA_ID)
        keys = {k.p11_id.hex(): k for k in hsm.keys() if k.p11_id is not None}
        assert set(keys) == set(ids.values()) and all(len(bytes.fromhex(i)) == 20 for i in ids.values()), (keys, ids)
        assert all(k.label == k.p11_id.hex() and k.role == "csk" for k in keys.values())
        zsk = keys[ids["zsk"]].label
        out = [officer.cmd(line) for line in (f"setcompat {keys[ids['ksk']].label} on", f"setcompat {zsk} on",
                                              f"keyrole {zsk} zsk")]
        officer.close()
        assert "role=zsk flags=256" in out[2], out
        tags = {role: next(k.keytag for k in hsm.keys() if k.p11_id == bytes.fromhex(i)) for role, i in ids.items()}
        listed = run("keymgr", "-c", str(conf), "example.", "list").stdout
        assert f"{tags['ksk']} KSK" in listed and f"{tags['zsk']} ZSK" in listed, (listed, tags)
        r = run("kzonesign", "-c", str(conf), "-o", str(d / "out"), "example.")
        assert r.returncode == 0, r.stdout + r.stderr
        zone_validates(str(d / "out" / "example.zone"), "example.", ksk_only=False)
    finally:
        hsm.stop()
