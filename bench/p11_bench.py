#!/usr/bin/env python3
"""PKCS#11 signing throughput: Cryptobat's daemon vs SoftHSMv2, both behind p11-kit-client.so.

One command runs every row:  python3 bench/p11_bench.py [--seconds 5] [--clients 1,2,8,32]
[--kinds rsa,ec,find] [--find-keys 2000]

Cryptobat: a throwaway token (two officers, max validity, signer PIN, RSA-2048 and
ECDSA P-256 keys) served by ``cryptobat serve`` on HOME/pkcs11.sock.  SoftHSMv2:
a throwaway token exported by ``p11-kit server --provider libsofthsm2.so`` on a Unix
socket.  Each client is its own process running python-pkcs11 over the stock
p11-kit-client.so: log in, find the key, then sign real RRSIG signing data in a loop.

Rows: RSA-2048 CKM_SHA256_RSA_PKCS over the signing data; ECDSA P-256 as PowerDNS
does it (Cryptobat: C_Digest(SHA256) then C_Sign(CKM_ECDSA), the bound-digest flow;
SoftHSM: the same calls, C_Digest on the token then CKM_ECDSA, which is what PowerDNS sends
to any token; and, as a second column, CKM_ECDSA over a locally computed SHA-256, three calls
where the bound flow makes six, as p11-kit 0.24.1's client does not forward
CKM_ECDSA_SHA256).  Prints signatures/s per row, the ratios, failures, and the CPU time per
1,000 signatures of the server (the daemon and its signing worker processes; p11-kit server
and the processes it forks per client) and of the clients (their signing loops).

FindObjects rows: a second token on each side with ``--find-keys`` ECDSA P-256 keys over
``--find-keys``/4 zones (labels and ids ``m0``, ``m1``, ...); one client looks keys up by
label and by id (python-pkcs11 ``get_key``: C_FindObjectsInit, C_FindObjects until empty,
C_FindObjectsFinal) on the two-key token and on the many-key one.  Setting those tokens up
takes most of the run (SoftHSM's 2,000 key pairs 80-100 s on the 2-vCPU test machine,
Cryptobat's about 2 s).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support import PIN_TEXT as PIN, Daemon, client_module, make_token, stop_process  # noqa: E402

WORKER = r"""
import hashlib, json, os, sys, time, pkcs11
from pkcs11 import KeyType, Mechanism, ObjectClass
module, kind, flow, data, start, seconds = sys.argv[1], sys.argv[2], sys.argv[3], bytes.fromhex(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6])
ok = errors = 0
first = None
cpu = 0.0
try:
    lib = pkcs11.lib(module)
    with lib.get_token().open(user_pin="123456") as s:
        if kind == "find":  # data: the labels to look up, comma-separated; flow: "label" or "id"
            names = data.decode().split(",")
            start = time.time()  # one client: measured from when it is ready (SoftHSM loads 4,000 objects first)
        else:
            key = s.get_key(ObjectClass.PRIVATE_KEY, KeyType.RSA if kind == "rsa" else KeyType.EC, label="k" + kind)  # krsa or kec
        while time.time() < start:
            time.sleep(0.005)
        end = start + seconds
        if time.time() >= end:  # set-up outlasted the measured interval: this client measured nothing
            raise RuntimeError("not ready before the measured interval ended")
        t0 = os.times()
        while time.time() < end:
            try:
                if kind == "find":
                    name = names[ok % len(names)]
                    if flow == "label":
                        s.get_key(ObjectClass.PRIVATE_KEY, label=name)
                    else:
                        s.get_key(ObjectClass.PRIVATE_KEY, id=name.encode())
                elif kind == "rsa":
                    sig = key.sign(data, mechanism=Mechanism.SHA256_RSA_PKCS)
                elif flow == "bound":  # C_Digest on the token, then C_Sign CKM_ECDSA of its answer
                    sig = key.sign(s.digest(data, mechanism=Mechanism.SHA256), mechanism=Mechanism.ECDSA)
                else:
                    sig = key.sign(hashlib.sha256(data).digest(), mechanism=Mechanism.ECDSA)
                ok += 1
            except Exception as e:
                errors += 1
                first = first or repr(e)
        t1 = os.times()
        cpu = (t1.user - t0.user) + (t1.system - t0.system)
except Exception as e:
    errors += 1
    first = first or repr(e)
print(json.dumps({"ok": ok, "errors": errors, "first": first, "cpu": cpu}))
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


def many_names(n: int) -> list[tuple[str, str]]:
    """(label, zone) of the FindObjects tokens' keys: ``n`` keys over n/4 zones."""
    return [(f"m{i}", f"z{i % max(1, n // 4)}.bench.example") for i in range(n)]


def setup_cryptobat_many(work: Path, n: int) -> Path:
    """A token holding ``n`` ECDSA P-256 keys, for the FindObjects rows.

    The keys go in with one audited state change: the console's keygen (one state change,
    so one rewrite of the whole state, per key) takes about 100 s for 2,000 keys."""
    home = work / "cryptobat-many"
    o = make_token(home, close=False, maxval=86400, pin=PIN)
    tok = o.console.token
    try:
        recs = [tok._generate(13, "zsk", zone, label)[1] for label, zone in many_names(n)]

        def add(st):
            for r in recs:
                st = st.with_key(r)
            return st
        tok._change("keygen", {"bench": f"{n} ECDSA P-256 keys m0..m{n - 1}"}, add)
    finally:
        tok.close()
    return home


_SOFTHSM_KEYS = ("import pkcs11, sys\nfrom pkcs11 import KeyType, Attribute\n"
                 "from pkcs11.util.ec import encode_named_curve_parameters\n"
                 "lib = pkcs11.lib(sys.argv[1])\n"
                 "with lib.get_token(token_label=sys.argv[2]).open(user_pin='123456', rw=True) as s:\n"
                 "    p = s.create_domain_parameters(KeyType.EC, {Attribute.EC_PARAMS: "
                 "encode_named_curve_parameters('secp256r1')}, local=True)\n"
                 "    if sys.argv[2] == 'bench':\n"
                 "        s.generate_keypair(KeyType.RSA, 2048, label='krsa', store=True)\n"
                 "        p.generate_keypair(label='kec', store=True)\n"
                 "    for label in sys.argv[3:]:\n"
                 "        p.generate_keypair(label=label, id=label.encode(), store=True)\n")


def setup_softhsm(work: Path, label: str, many: int = 0) -> dict:
    """A SoftHSM token ``label`` in its own token directory: ``bench`` holds krsa and kec, ``many``
    that many P-256 keys. Apart, because every process p11-kit server forks for a client loads
    every object of every token in the directory: the signing rows must not pay for the 2,000 keys."""
    lib = softhsm_module()
    (work / f"softhsm-{label}").mkdir()
    conf = work / f"softhsm2-{label}.conf"
    conf.write_text(f"directories.tokendir = {work / f'softhsm-{label}'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    env = dict(os.environ, SOFTHSM2_CONF=str(conf))
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", PIN,
                    "--so-pin", "5678"], env=env, check=True, capture_output=True)
    subprocess.run([sys.executable, "-c", _SOFTHSM_KEYS, lib, label, *(l for l, _ in many_names(many))],
                   env=env, check=True)
    return env


def p11kit_server(sock: Path, token: str, env: dict) -> subprocess.Popen:
    server = subprocess.Popen(["p11-kit", "server", "-f", "-n", str(sock), "--provider", softhsm_module(),
                               f"pkcs11:token={token}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, env=env)
    _wait_for(sock, server, "p11-kit server")
    return server


def rrsig_data(key, now: int) -> bytes:
    import dns.rrset
    from cryptobat import rrsig
    rrset = dns.rrset.from_text("www.bench.example.", 300, "IN", "A", "192.0.2.7")
    tpl = rrsig.template(rrset, key, now - 60, now + 3600)
    return rrsig.signing_data(rrset, tpl)


def cpu_seconds(pid: int, children: bool = True) -> float:
    """CPU time of ``pid``, of its children that ended (p11-kit server's per-client processes)
    and of those still running (the daemon's signing worker processes)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    total = sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    if children:
        for task in glob.glob(f"/proc/{pid}/task/*/children"):
            try:
                kids = Path(task).read_text().split()
            except OSError:
                continue
            total += sum(cpu_seconds(int(k), children=False) for k in kids)
    return total


def run_row(module: str, address: str, kind: str, flow: str, data: bytes, clients: int, seconds: float,
            pid: int | None = None) -> dict:
    env = dict(os.environ, P11_KIT_SERVER_ADDRESS=address)
    start = time.time() + 1.5 + 0.15 * clients
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, module, kind, flow, data.hex(), str(start), str(seconds)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(clients)]
    cpu0 = cpu_seconds(pid) if pid else 0.0
    ok = errors = failed_clients = 0
    clients_cpu = 0.0
    first = None
    for p in procs:
        out, err = p.communicate(timeout=seconds + 120)
        try:
            r = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            r = {"ok": 0, "errors": 1, "first": err.strip()[-200:], "cpu": 0.0}
        clients_cpu += r["cpu"]
        ok += r["ok"]
        errors += r["errors"]
        failed_clients += 1 if r["errors"] else 0
        first = first or r["first"]
    time.sleep(0.2)  # p11-kit server reaps its per-client processes
    cpu = (cpu_seconds(pid) - cpu0) if pid else 0.0
    return {"rate": ok / seconds, "errors": errors, "failed_clients": failed_clients, "first": first,
            "cpu_ms_per_1000": 1e6 * cpu / ok if ok else 0.0,
            "client_cpu_ms_per_1000": 1e6 * clients_cpu / ok if ok else 0.0}


NOTHING = {"rate": 0.0, "errors": 0, "failed_clients": 0, "first": None, "cpu_ms_per_1000": 0.0,
           "client_cpu_ms_per_1000": 0.0}


def _ratio(a: dict, b: dict | None) -> str:
    if not b:
        return ""
    return f"{a['rate'] / b['rate']:.2f}" if b["rate"] else "-"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="measured seconds per row (default 5)")
    ap.add_argument("--clients", default="1,2,8,32", help="concurrent client processes per row")
    ap.add_argument("--kinds", default="rsa,ec,find", help="rows to run: rsa, ec, find (default all three)")
    ap.add_argument("--find-keys", type=int, default=2000, help="keys on the FindObjects tokens (default 2000)")
    ap.add_argument("--only", choices=("cryptobat", "softhsm"), help="measure one side only")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    a = ap.parse_args(argv)
    counts = [int(x) for x in a.clients.split(",")]
    kinds = a.kinds.split(",")
    many = a.find_keys if "find" in kinds else 0
    module = client_module()
    softhsm_module()
    work = Path(tempfile.mkdtemp(prefix="p11bench-"))
    daemons: list = []
    servers: list[subprocess.Popen] = []
    t0 = time.time()
    try:
        home, keys, now = setup_cryptobat(work)
        daemon = Daemon(home, timeout=30)
        daemons.append(daemon)
        targets = {"cryptobat": (daemon.address, daemon.p.pid)}
        if many:
            mdaemon = Daemon(setup_cryptobat_many(work, many), timeout=60)
            daemons.append(mdaemon)
            targets["cryptobat-many"] = (mdaemon.address, mdaemon.p.pid)
        print(f"  set up Cryptobat in {time.time() - t0:.1f} s", file=sys.stderr, flush=True)
        t1 = time.time()
        servers.append(p11kit_server(work / "softhsm.sock", "bench", setup_softhsm(work, "bench")))
        targets["softhsm"] = (f"unix:path={work / 'softhsm.sock'}", servers[-1].pid)
        if many:
            servers.append(p11kit_server(work / "softhsm-many.sock", "many", setup_softhsm(work, "many", many)))
            targets["softhsm-many"] = (f"unix:path={work / 'softhsm-many.sock'}", servers[-1].pid)
        print(f"  set up SoftHSMv2 in {time.time() - t1:.1f} s", file=sys.stderr, flush=True)
        data = {kind: rrsig_data(k, now) for kind, k in keys.items()}

        def measure(side: str, target: str, kind: str, flow: str, payload: bytes, n: int) -> dict:
            if a.only and side != a.only:
                return dict(NOTHING)
            addr, pid = targets[target]
            return run_row(module, addr, kind, flow, payload, n, a.seconds, pid)

        rows = []
        for kind, name in (("rsa", "RSA-2048 SHA256-RSA-PKCS"), ("ec", "ECDSA P-256 (digest+ECDSA)")):
            if kind not in kinds:
                continue
            for n in counts:
                row = {"mech": name, "clients": n,
                       "cryptobat": measure("cryptobat", "cryptobat", kind, "full" if kind == "rsa" else "bound",
                                            data[kind], n),
                       "softhsm": measure("softhsm", "softhsm", kind, "full" if kind == "rsa" else "bound",
                                          data[kind], n)}
                if kind == "ec":
                    row["softhsm_hash"] = measure("softhsm", "softhsm", kind, "hash", data[kind], n)
                rows.append(row)
                c, sh = row["cryptobat"], row["softhsm"]
                extra = f"  (CKM_ECDSA of a local hash {row['softhsm_hash']['rate']:8.1f}/s)" if kind == "ec" else ""
                print(f"  {name:<28} {n:>3} clients: cryptobat {c['rate']:8.1f}/s  softhsm {sh['rate']:8.1f}/s{extra}",
                      file=sys.stderr, flush=True)
        find_rows = []
        if many:
            names = ",".join(label for label, _ in random.Random(1).sample(many_names(many), min(many, 200)))
            for by in ("label", "id"):
                if by == "id":  # the two-key tokens' ids are not their labels on SoftHSM
                    tokens = [(f"{many:,}", "-many", names)]
                else:
                    tokens = [("2", "", "krsa,kec"), (f"{many:,}", "-many", names)]
                for size, suffix, look in tokens:
                    row = {"mech": f"C_FindObjects by {by}, {size} keys", "clients": 1, "keys": many if suffix else 2}
                    for side in ("cryptobat", "softhsm"):
                        row[side] = measure(side, side + suffix, "find", by, look.encode(), 1)
                    find_rows.append(row)
                    print(f"  {row['mech']:<36}: cryptobat {row['cryptobat']['rate']:8.1f}/s  "
                          f"softhsm {row['softhsm']['rate']:8.1f}/s", file=sys.stderr, flush=True)
        print("\n| mechanism | clients | cryptobat sig/s | SoftHSMv2 sig/s, same calls | ratio "
              "| SoftHSMv2 CKM_ECDSA of a local hash | ratio | CPU ms / 1000 sig, server (cryptobat / softhsm) "
              "| CPU ms / 1000 sig, clients (cryptobat / softhsm) "
              "| failures (cryptobat / softhsm) |")
        print("|---|---:|---:|---:|---:|---:|---:|---|---|---|")
        for r in rows:
            c, sh, hs = r["cryptobat"], r["softhsm"], r.get("softhsm_hash")
            fails = f"{c['errors']} ({c['failed_clients']} clients) / {sh['errors']} ({sh['failed_clients']} clients)"
            if hs:
                fails += f", {hs['errors']} ({hs['failed_clients']} clients)"
            hs_rate = f"{hs['rate']:.1f}" if hs else ""
            print(f"| {r['mech']} | {r['clients']} | {c['rate']:.1f} | {sh['rate']:.1f} | {_ratio(c, sh)} "
                  f"| {hs_rate} | {_ratio(c, hs)} "
                  f"| {c['cpu_ms_per_1000']:.0f} / {sh['cpu_ms_per_1000']:.0f} "
                  f"| {c['client_cpu_ms_per_1000']:.0f} / {sh['client_cpu_ms_per_1000']:.0f} | {fails} |")
            for t in ("cryptobat", "softhsm", "softhsm_hash"):
                if r.get(t) and r[t]["first"]:
                    print(f"|   first {t} failure: {r[t]['first']} | | | | | | | | | |")
        if find_rows:
            print("\n| lookup (python-pkcs11 get_key, 1 client) | cryptobat lookups/s | SoftHSMv2 lookups/s | ratio "
                  "| cryptobat ms / lookup | SoftHSMv2 ms / lookup | failures (cryptobat / softhsm) |")
            print("|---|---:|---:|---:|---:|---:|---|")
            for r in find_rows:
                c, sh = r["cryptobat"], r["softhsm"]
                ms = [f"{1000 / x['rate']:.2f}" if x["rate"] else "-" for x in (c, sh)]
                print(f"| {r['mech']} | {c['rate']:.1f} | {sh['rate']:.1f} | {_ratio(c, sh)} | {ms[0]} | {ms[1]} "
                      f"| {c['errors']} / {sh['errors']} |")
                for t in ("cryptobat", "softhsm"):
                    if r[t]["first"]:
                        print(f"|   first {t} failure: {r[t]['first']} | | | | | | |")
        print(f"\n(whole run {time.time() - t0:.0f} s)")
        if a.json:
            Path(a.json).write_text(json.dumps(rows + [dict(r, kind="find") for r in find_rows], indent=1))
        bad = [r for r in rows + find_rows for t in ("cryptobat", "softhsm", "softhsm_hash")
               if r.get(t) and r[t]["errors"]]
        return 1 if bad else 0
    finally:
        for d in daemons:
            d.stop()
        for server in servers:
            stop_process(server)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
