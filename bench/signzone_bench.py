#!/usr/bin/env python3
"""Benchmark ``cryptobat signzone`` (real token) against BIND, ldns and Knot, in one run.

    python3 bench/signzone_bench.py [--names 100000] [--runs 1] [--keep DIR]

Generates a zone of N names under example.com (an A record for each name, a TXT
record for every fourth, and for every tenth a delegation: NS plus an in-bailiwick
glue A), then signs it with ECDSA P-256 (KSK + ZSK) and NSEC by:

* ``cryptobat signzone`` through a real token (embedded, in ``--home``): the
  token checks every RRSIG against its policy; default (post-sign verification)
  and ``-P``;
* ``dnssec-signzone -P -n 2`` (and without -P) with ``dnssec-keygen`` keys;
* ``ldns-signzone`` with ``ldns-keygen`` keys;
* Knot's ``kzonesign`` with its keys (``keymgr``) in a SoftHSM token (PKCS#11).

Each run happens in its own wrapper process (this script with ``--_measure``),
which becomes a child subreaper, waits for every descendant and reports wall
time, CPU (user+sys of all descendants, ``RUSAGE_CHILDREN``), the peak RSS of
the largest single process (``ru_maxrss``) and the sampled peak of the summed
RSS of the whole process tree (worker processes included).

A missing tool is an error (exit status 2), never skipped.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"

ORIGIN = "example.com"
TOOLS = ("dnssec-keygen", "dnssec-signzone", "ldns-keygen", "ldns-signzone", "keymgr", "kzonesign",
         "softhsm2-util")
SOFTHSM_LIBS = ("/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so")
MAXVAL = 40 * 86400  # token policy: every tool signs for about 30 days (Knot: 14)
PIN = "123456"


# ---------------------------------------------------------------- measuring one run


def _tree_rss(root: int) -> int:
    """Summed RSS (bytes) of ``root`` and its descendants, from /proc."""
    kids: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                st = f.read()
        except OSError:
            continue
        fields = st[st.rfind(b")") + 2:].split()
        pid = int(d)
        kids.setdefault(int(fields[1]), []).append(pid)
        rss[pid] = int(fields[21]) * page
    total, todo = 0, [root]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        todo += kids.get(p, [])
    return total


def measure(cmd: list[str], cwd: str, env: dict | None, log: str) -> dict:
    """Run in this (wrapper) process: ``cmd`` and all its descendants, then report."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphaned descendants are ours to reap
    me = os.getpid()
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], _tree_rss(me))

    th = threading.Thread(target=sample, daemon=True)
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        th.start()
        rc = p.wait()
        wall = time.perf_counter() - t0
    while True:  # reap whatever the command left behind (e.g. a forkserver)
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break
    done.set()
    th.join()
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"rc": rc, "wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "maxrss": ru.ru_maxrss * 1024,
            "treerss": peak[0]}


def run_measured(cmd: list[str], cwd: str, env: dict | None = None, log: str | None = None) -> dict:
    log = log or os.path.join(cwd, "run.log")
    w = [sys.executable, os.path.abspath(__file__), "--_measure", json.dumps({"cmd": cmd, "cwd": cwd, "env": env, "log": log})]
    r = subprocess.run(w, capture_output=True, text=True, check=True)
    res = json.loads(r.stdout)
    if res["rc"] != 0:
        with open(log, errors="replace") as f:
            tail = f.read()[-3000:]
        raise SystemExit(f"FAILED ({res['rc']}): {' '.join(cmd)}\n{tail}")
    return res


# ---------------------------------------------------------------- setup


def make_zone(path: str, n: int) -> int:
    """Write the zone; return the number of records."""
    lines = [f"$TTL 3600\n$ORIGIN {ORIGIN}.\n@ IN SOA ns1 hostmaster 1 7200 3600 1209600 3600\n",
             "@ NS ns1\n@ NS ns2\nns1 A 192.0.2.1\nns2 A 192.0.2.2\n"]
    count = 5
    for i in range(n):
        a = f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
        lines.append(f"h{i} A {a}\n")
        count += 1
        if i % 4 == 0:
            lines.append(f'h{i} TXT "record {i}" "v=bench1"\n')
            count += 1
        if i % 10 == 0:
            lines.append(f"d{i} NS ns.d{i}\nns.d{i} A 172.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}\n")
            count += 2
    with open(path, "w") as f:
        f.writelines(lines)
    return count


def _run(cmd, cwd, env=None) -> str:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"setup failed: {' '.join(cmd)}\n{r.stdout}\n{r.stderr}")
    return r.stdout


def setup_cryptobat(d: str) -> tuple[str, str, str]:
    """A real token (quorum 1), one officer logged in, max validity set, ECDSA KSK+ZSK; key files."""
    sys.path.insert(0, str(TESTS))
    from support import zone_token  # here, not at the top: the measuring wrapper runs this file too,
    # and what it imports counts in every signer's process-tree RSS
    zt = zone_token(Path(d) / "token", ORIGIN, Path(d) / "keys", algs=(13,), max_validity=MAXVAL)
    return str(zt.home), zt.keys[(13, "ksk")], zt.keys[(13, "zsk")]


def setup_bind(d: str) -> tuple[str, str]:
    ksk = _run(["dnssec-keygen", "-q", "-a", "ECDSAP256SHA256", "-f", "KSK", ORIGIN], d).strip()
    zsk = _run(["dnssec-keygen", "-q", "-a", "ECDSAP256SHA256", ORIGIN], d).strip()
    return ksk, zsk


def setup_ldns(d: str) -> tuple[str, str]:
    ksk = _run(["ldns-keygen", "-a", "ECDSAP256SHA256", "-k", ORIGIN], d).strip()
    zsk = _run(["ldns-keygen", "-a", "ECDSAP256SHA256", ORIGIN], d).strip()
    return ksk, zsk


def setup_knot(d: str, zonefile: str) -> tuple[str, dict]:
    lib = next((p for p in SOFTHSM_LIBS if os.path.exists(p)), None)
    if lib is None:
        raise SystemExit("libsofthsm2.so not found (apt-get install -y softhsm2)")
    hsm = os.path.join(d, "softhsm")
    os.makedirs(os.path.join(hsm, "tokens"))
    conf = os.path.join(hsm, "softhsm2.conf")
    with open(conf, "w") as f:
        f.write(f"directories.tokendir = {hsm}/tokens\nobjectstore.backend = file\nlog.level = ERROR\n")
    env = dict(os.environ, SOFTHSM2_CONF=conf)
    _run(["softhsm2-util", "--init-token", "--free", "--label", "bench", "--pin", PIN, "--so-pin", PIN], d, env)
    for sub in ("run", "db", "out"):
        os.makedirs(os.path.join(d, sub))
    kconf = os.path.join(d, "knot.conf")
    with open(kconf, "w") as f:
        f.write(f"""server:
    rundir: "{d}/run"
database:
    storage: "{d}/db"
keystore:
  - id: hsm
    backend: pkcs11
    config: "pkcs11:token=bench;pin-value={PIN} {lib}"
policy:
  - id: bench
    keystore: hsm
    algorithm: ecdsap256sha256
    manual: on
    nsec3: off
    signing-threads: 2
zone:
  - domain: {ORIGIN}.
    storage: "{d}"
    file: "{os.path.basename(zonefile)}"
    dnssec-signing: on
    dnssec-policy: bench
    semantic-checks: off
""")
    _run(["keymgr", "-c", kconf, f"{ORIGIN}.", "generate", "algorithm=ecdsap256sha256", "ksk=yes", "zsk=no"], d, env)
    _run(["keymgr", "-c", kconf, f"{ORIGIN}.", "generate", "algorithm=ecdsap256sha256", "ksk=no", "zsk=yes"], d, env)
    return kconf, env


def count_rrsigs(path: str) -> int:
    n = 0
    with open(path, "rb") as f:
        for line in f:
            if b"RRSIG" in line:
                for t in line.split()[:4]:  # owner (lower case here), TTL, class, then the type
                    if t == b"RRSIG":
                        n += 1
                    if t.isupper() and t != b"IN":
                        break
    return n


# ---------------------------------------------------------------- report


def machine() -> dict:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) * 1024
    osname = platform.platform()
    try:
        with open("/etc/os-release") as f:
            osname = dict(l.rstrip().split("=", 1) for l in f if "=" in l).get("PRETTY_NAME", osname).strip('"')
    except OSError:
        pass

    def ver(cmd):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True)
            return (r.stdout + r.stderr).strip().splitlines()[0]
        except (OSError, IndexError):
            return "?"

    import cryptography
    import dns.version

    from cryptobat import __version__

    return {
        "nproc": os.cpu_count(), "cpu": cpu, "ram_gib": round(mem / 2**30, 1), "os": osname,
        "kernel": platform.release(), "python": platform.python_version(),
        "versions": {
            "cryptobat": __version__, "dnspython": dns.version.version, "cryptography": cryptography.__version__,
            "dnssec-signzone": ver(["dnssec-signzone", "-V"]), "ldns-signzone": ver(["ldns-signzone", "-v"]),
            "kzonesign": ver(["kzonesign", "-V"]), "softhsm2": ver(["softhsm2-util", "-v"]),
        },
    }


def table(rows: list[dict], ref: dict) -> str:
    out = ["| signer | wall s | CPU s | peak RSS MiB (largest process) | peak RSS MiB (process tree) | RRSIGs "
           "| wall / ours | CPU / ours | RSS / ours | tree RSS / ours |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(
            f"| {r['name']} | {r['wall']:.2f} | {r['cpu']:.2f} | {r['maxrss'] / 2**20:.0f} | {r['treerss'] / 2**20:.0f} "
            f"| {r['sigs']} | {r['wall'] / ref['wall']:.2f} | {r['cpu'] / ref['cpu']:.2f} "
            f"| {r['maxrss'] / ref['maxrss']:.2f} | {r['treerss'] / max(ref['treerss'], 1):.2f} |")
    return "\n".join(out)


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--names", type=int, default=100000)
    ap.add_argument("--runs", type=int, default=1, help="runs per signer; the fastest is reported")
    ap.add_argument("--keep", metavar="DIR", help="work in DIR and keep it")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    a = ap.parse_args(argv)

    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        print(f"signzone_bench: missing tools: {' '.join(missing)} "
              "(apt-get install -y bind9-utils ldnsutils knot-dnssecutils knot softhsm2)", file=sys.stderr)
        return 2

    d = a.keep or tempfile.mkdtemp(prefix="signzone-bench-")
    os.makedirs(d, exist_ok=True)
    dirs = {k: os.path.join(d, k) for k in ("cryptobat", "bind", "ldns", "knot")}
    for p in dirs.values():
        os.makedirs(p, exist_ok=True)
    try:
        zsrc = os.path.join(d, "zone")
        nrec = make_zone(zsrc, a.names)
        zones = {}
        for k, p in dirs.items():
            zones[k] = os.path.join(p, f"{ORIGIN}.zone")
            shutil.copyfile(zsrc, zones[k])
        print(f"zone: {a.names} names, {nrec} records; work dir {d}", file=sys.stderr)

        home, cksk, czsk = setup_cryptobat(dirs["cryptobat"])
        bksk, bzsk = setup_bind(dirs["bind"])
        with open(zones["bind"], "a") as f:  # dnssec-signzone without -S wants the DNSKEYs in the zone
            f.write(f"$INCLUDE {bksk}.key\n$INCLUDE {bzsk}.key\n")
        lksk, lzsk = setup_ldns(dirs["ldns"])
        kconf, kenv = setup_knot(dirs["knot"], zones["knot"])

        cb = [sys.executable, "-m", "cryptobat", "--home", home, "signzone"]
        runs = [
            ("cryptobat signzone (real token, policy-checked)", dirs["cryptobat"],
             cb + ["-o", ORIGIN, "-f", "out.signed", "-k", cksk, zones["cryptobat"], czsk], None, "out.signed"),
            ("cryptobat signzone -P (real token, policy-checked)", dirs["cryptobat"],
             cb + ["-P", "-o", ORIGIN, "-f", "outP.signed", "-k", cksk, zones["cryptobat"], czsk], None, "outP.signed"),
            ("dnssec-signzone -P -n 2", dirs["bind"],
             ["dnssec-signzone", "-P", "-n", "2", "-o", ORIGIN, "-f", "outP.signed", "-k", bksk, zones["bind"], bzsk],
             None, "outP.signed"),
            ("dnssec-signzone -n 2 (verifies)", dirs["bind"],
             ["dnssec-signzone", "-n", "2", "-o", ORIGIN, "-f", "out.signed", "-k", bksk, zones["bind"], bzsk],
             None, "out.signed"),
            ("ldns-signzone", dirs["ldns"],
             ["ldns-signzone", "-o", ORIGIN, "-f", "out.signed", zones["ldns"], lzsk, lksk], None, "out.signed"),
            ("kzonesign (SoftHSM, 2 threads)", dirs["knot"],
             ["kzonesign", "-c", kconf, "-o", os.path.join(dirs["knot"], "out"), f"{ORIGIN}."], kenv,
             os.path.join("out", f"{ORIGIN}.zone")),
        ]
        rows = []
        for name, cwd, cmd, env, out in runs:
            best = None
            for _ in range(a.runs):
                r = run_measured(cmd, cwd, env, os.path.join(cwd, "run.log"))
                if best is None or r["wall"] < best["wall"]:
                    best = r
            best["name"] = name
            best["cmd"] = " ".join(cmd)
            best["sigs"] = count_rrsigs(os.path.join(cwd, out))
            rows.append(best)
            print(f"{name}: wall {best['wall']:.2f} s, CPU {best['cpu']:.2f} s, "
                  f"max RSS {best['maxrss'] / 2**20:.0f} MiB, tree {best['treerss'] / 2**20:.0f} MiB, "
                  f"{best['sigs']} RRSIGs", file=sys.stderr)
        m = machine()
        when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        print(f"### {a.names} names, {nrec} records, ECDSAP256SHA256 KSK+ZSK, NSEC ({when})\n")
        print(f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['ram_gib']} GiB RAM, {m['os']}, Linux {m['kernel']}, "
              f"Python {m['python']}\n")
        print("Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + "\n")
        print(table(rows, rows[0]))
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"names": a.names, "records": nrec, "date": when, "machine": m, "rows": rows}, f, indent=1)
        return 0
    finally:
        if not a.keep:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--_measure":
        spec = json.loads(sys.argv[2])
        print(json.dumps(measure(spec["cmd"], spec["cwd"], spec["env"], spec["log"])))
        sys.exit(0)
    sys.exit(main())
