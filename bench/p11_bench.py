#!/usr/bin/env python3
"""PKCS#11 signing throughput: Cryptobat's daemon vs SoftHSMv2, both behind p11-kit-client.so.

One command:  python3 bench/p11_bench.py [--seconds 5] [--clients 1,2,8,32]

Cryptobat: a throwaway token (two officers, max validity, signer PIN, RSA-2048 and
ECDSA P-256 keys) served by ``cryptobat serve`` on HOME/pkcs11.sock.  SoftHSMv2:
a throwaway token exported by ``p11-kit server --provider libsofthsm2.so`` on a Unix
socket.  Each client is its own process running python-pkcs11 over the stock
p11-kit-client.so: log in, find the key, then sign real RRSIG signing data in a loop.

Rows: RSA-2048 CKM_SHA256_RSA_PKCS over the signing data; ECDSA P-256 as PowerDNS
does it (Cryptobat: C_Digest(SHA256) then C_Sign(CKM_ECDSA), the bound-digest flow;
SoftHSM: CKM_ECDSA over a locally computed SHA-256, as p11-kit 0.24.1's client does
not forward CKM_ECDSA_SHA256).  Prints signatures/s per row, the ratio and failures.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support import PIN_TEXT as PIN, Daemon, client_module, make_token, stop_process  # noqa: E402

WORKER = r"""
import hashlib, json, sys, time, pkcs11
from pkcs11 import KeyType, Mechanism, ObjectClass
module, kind, flow, data, start, seconds = sys.argv[1], sys.argv[2], sys.argv[3], bytes.fromhex(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6])
ok = errors = 0
first = None
try:
    lib = pkcs11.lib(module)
    with lib.get_token().open(user_pin="123456") as s:
        key = s.get_key(ObjectClass.PRIVATE_KEY, KeyType.RSA if kind == "rsa" else KeyType.EC, label="k" + kind)  # krsa or kec
        while time.time() < start:
            time.sleep(0.005)
        end = start + seconds
        while time.time() < end:
            try:
                if kind == "rsa":
                    sig = key.sign(data, mechanism=Mechanism.SHA256_RSA_PKCS)
                elif flow == "bound":
                    sig = key.sign(s.digest(data, mechanism=Mechanism.SHA256), mechanism=Mechanism.ECDSA)
                else:
                    sig = key.sign(hashlib.sha256(data).digest(), mechanism=Mechanism.ECDSA)
                ok += 1
            except Exception as e:
                errors += 1
                first = first or repr(e)
except Exception as e:
    errors += 1
    first = first or repr(e)
print(json.dumps({"ok": ok, "errors": errors, "first": first}))
"""


def softhsm_module() -> str:
    cands = sorted(glob.glob("/usr/lib/softhsm/libsofthsm2.so") + glob.glob("/usr/lib/*/softhsm/libsofthsm2.so")
                   + glob.glob("/usr/local/lib/softhsm/libsofthsm2.so"))
    if not cands or not shutil.which("softhsm2-util") or not shutil.which("p11-kit"):
        sys.exit("SoftHSMv2 or p11-kit not found (apt-get install softhsm2 p11-kit)")
    return cands[0]


def _wait_for(path: Path, proc: subprocess.Popen, what: str) -> None:
    deadline = time.time() + 30
    while not path.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            sys.exit(f"{what} did not start: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.05)


def setup_cryptobat(work: Path):
    """A configured token; returns (home, {kind: KeyInfo}, token time)."""
    home = work / "cryptobat"
    o = make_token(home, close=False, maxval=86400, pin=PIN,
                   keys=("8 zsk bench.example krsa", "13 zsk bench.example kec"))
    tok = o.console.token
    try:
        return home, {"rsa": tok.key("krsa"), "ec": tok.key("kec")}, tok.now()
    finally:
        tok.close()


def setup_softhsm(work: Path) -> dict:
    lib = softhsm_module()
    (work / "softhsm").mkdir()
    conf = work / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {work / 'softhsm'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    env = dict(os.environ, SOFTHSM2_CONF=str(conf))
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "bench", "--pin", PIN, "--so-pin", "5678"],
                   env=env, check=True, capture_output=True)
    gen = ("import pkcs11, sys\nfrom pkcs11 import KeyType\nfrom pkcs11.util.ec import encode_named_curve_parameters\n"
           "lib = pkcs11.lib(sys.argv[1])\n"
           "with lib.get_token(token_label='bench').open(user_pin='123456', rw=True) as s:\n"
           "    s.generate_keypair(KeyType.RSA, 2048, label='krsa', store=True)\n"
           "    p = s.create_domain_parameters(KeyType.EC, {pkcs11.Attribute.EC_PARAMS: encode_named_curve_parameters('secp256r1')}, local=True)\n"
           "    p.generate_keypair(label='kec', store=True)\n")
    subprocess.run([sys.executable, "-c", gen, lib], env=env, check=True)
    return env


def rrsig_data(key, now: int) -> bytes:
    import dns.rrset
    from cryptobat import rrsig
    rrset = dns.rrset.from_text("www.bench.example.", 300, "IN", "A", "192.0.2.7")
    tpl = rrsig.template(rrset, key, now - 60, now + 3600)
    return rrsig.signing_data(rrset, tpl)


def run_row(module: str, address: str, kind: str, flow: str, data: bytes, clients: int, seconds: float) -> dict:
    env = dict(os.environ, P11_KIT_SERVER_ADDRESS=address)
    start = time.time() + 1.5 + 0.15 * clients
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, module, kind, flow, data.hex(), str(start), str(seconds)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(clients)]
    ok = errors = failed_clients = 0
    first = None
    for p in procs:
        out, err = p.communicate(timeout=seconds + 120)
        try:
            r = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            r = {"ok": 0, "errors": 1, "first": err.strip()[-200:]}
        ok += r["ok"]
        errors += r["errors"]
        failed_clients += 1 if r["errors"] else 0
        first = first or r["first"]
    return {"rate": ok / seconds, "errors": errors, "failed_clients": failed_clients, "first": first}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="measured seconds per row (default 5)")
    ap.add_argument("--clients", default="1,2,8,32", help="concurrent client processes per row")
    ap.add_argument("--kinds", default="rsa,ec", help="rows to run: rsa, ec or both (default rsa,ec)")
    ap.add_argument("--only", choices=("cryptobat", "softhsm"), help="measure one side only")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    a = ap.parse_args(argv)
    counts = [int(x) for x in a.clients.split(",")]
    module = client_module()
    softhsm_module()
    work = Path(tempfile.mkdtemp(prefix="p11bench-"))
    daemon = server = None
    try:
        home, keys, now = setup_cryptobat(work)
        daemon = Daemon(home, timeout=30)
        shenv = setup_softhsm(work)
        sock = work / "softhsm.sock"
        server = subprocess.Popen(["p11-kit", "server", "-f", "-n", str(sock), "--provider", softhsm_module(),
                                   "pkcs11:token=bench"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True, env=shenv)
        _wait_for(sock, server, "p11-kit server")
        data = {kind: rrsig_data(k, now) for kind, k in keys.items()}
        targets = {"cryptobat": (daemon.address, {"rsa": "full", "ec": "bound"}),
                   "softhsm": (f"unix:path={sock}", {"rsa": "full", "ec": "hash"})}
        rows = []
        kinds = a.kinds.split(",")
        for kind, name in (("rsa", "RSA-2048 SHA256-RSA-PKCS"), ("ec", "ECDSA P-256 (digest+ECDSA)")):
            if kind not in kinds:
                continue
            for n in counts:
                row = {"mech": name, "clients": n}
                for t, (addr, flows) in targets.items():
                    if a.only and t != a.only:
                        row[t] = {"rate": 0.0, "errors": 0, "failed_clients": 0, "first": None}
                        continue
                    row[t] = run_row(module, addr, kind, flows[kind], data[kind], n, a.seconds)
                rows.append(row)
                c, s = row["cryptobat"], row["softhsm"]
                print(f"  {name:<28} {n:>3} clients: cryptobat {c['rate']:8.1f}/s  softhsm {s['rate']:8.1f}/s",
                      file=sys.stderr, flush=True)
        print("\n| mechanism | clients | cryptobat sig/s | SoftHSMv2 sig/s | ratio | failures (cryptobat / softhsm) |")
        print("|---|---:|---:|---:|---:|---|")
        for r in rows:
            c, s = r["cryptobat"], r["softhsm"]
            ratio = c["rate"] / s["rate"] if s["rate"] else float("inf")
            fails = f"{c['errors']} ({c['failed_clients']} clients) / {s['errors']} ({s['failed_clients']} clients)"
            print(f"| {r['mech']} | {r['clients']} | {c['rate']:.1f} | {s['rate']:.1f} | {ratio:.2f} | {fails} |")
            for t in ("cryptobat", "softhsm"):
                if r[t]["first"]:
                    print(f"|   first {t} failure: {r[t]['first']} | | | | | |")
        if a.json:
            Path(a.json).write_text(json.dumps(rows, indent=1))
        bad = [r for r in rows if r["cryptobat"]["errors"] or r["softhsm"]["errors"]]
        return 1 if bad else 0
    finally:
        if daemon is not None:
            daemon.stop()
        if server is not None:
            stop_process(server)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
