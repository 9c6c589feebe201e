#!/usr/bin/env python3
"""Benchmark ``cryptobat signzone`` (real token) against BIND, ldns and Knot, in one run.

    python3 bench/signzone_bench.py [--names 100000] [--runs 1] [--small 20] [--zones 1000] [--keep DIR]

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

``--small RUNS`` also signs a 50-name zone RUNS times per signer (medians, the signers taking
turns, beside the interpreter's own start-up), and ``--zones K`` signs K zones of 50 names with one
``cryptobat signzone --zones DIR`` against K ``dnssec-signzone`` runs. Every cryptobat output is
checked by BIND's ``dnssec-verify`` (``--no-verify`` skips it), and a run that leaves a process
behind fails the benchmark.

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


def _proc_table() -> tuple[dict[int, list[int]], dict[int, int]]:
    """(children of each pid, RSS in bytes of each pid), from /proc."""
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
    return kids, rss


def _descendants(root: int) -> set[int]:
    kids, _ = _proc_table()
    out, todo = set(), [root]
    while todo:
        p = todo.pop()
        out.add(p)
        todo += kids.get(p, [])
    return out


def _tree_rss(root: int) -> int:
    """Summed RSS (bytes) of ``root`` and its descendants."""
    kids, rss = _proc_table()
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
    left = _descendants(me) - {me}
    while True:  # reap whatever the command left behind (e.g. a forkserver)
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break
    done.set()
    th.join()
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"rc": rc, "wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "maxrss": ru.ru_maxrss * 1024,
            "treerss": peak[0], "left": len(left)}


def run_measured(cmd: list[str], cwd: str, env: dict | None = None, log: str | None = None) -> dict:
    log = log or os.path.join(cwd, "run.log")
    w = [sys.executable, os.path.abspath(__file__), "--_measure", json.dumps({"cmd": cmd, "cwd": cwd, "env": env, "log": log})]
    r = subprocess.run(w, capture_output=True, text=True, check=True)
    res = json.loads(r.stdout)
    if res["left"]:
        raise SystemExit(f"FAILED: {res['left']} processes outlived {' '.join(cmd)}")
    if res["rc"] != 0:
        with open(log, errors="replace") as f:
            tail = f.read()[-3000:]
        raise SystemExit(f"FAILED ({res['rc']}): {' '.join(cmd)}\n{tail}")
    return res


# ---------------------------------------------------------------- setup


def make_zone(path: str, n: int, origin: str = ORIGIN) -> int:
    """Write the zone; return the number of records."""
    lines = [f"$TTL 3600\n$ORIGIN {origin}.\n@ IN SOA ns1 hostmaster 1 7200 3600 1209600 3600\n",
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
    import contextlib
    with contextlib.redirect_stdout(sys.stderr):  # the key files it lists are not the report
        zt = zone_token(Path(d) / "token", ORIGIN, Path(d) / "keys", algs=(13,), max_validity=MAXVAL)
    return str(zt.home), zt.keys[(13, "ksk")], zt.keys[(13, "zsk")]


def setup_bind(d: str, origin: str = ORIGIN) -> tuple[str, str]:
    ksk = _run(["dnssec-keygen", "-q", "-a", "ECDSAP256SHA256", "-f", "KSK", origin], d).strip()
    zsk = _run(["dnssec-keygen", "-q", "-a", "ECDSAP256SHA256", origin], d).strip()
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


# ---------------------------------------------------------------- scenarios


def dnssec_verify(path: str, origin: str = ORIGIN) -> None:
    """BIND's validator on an output: the benchmark fails on a zone it does not accept."""
    r = subprocess.run(["dnssec-verify", "-q", "-o", origin, path], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"dnssec-verify rejects {path}:\n{r.stdout}{r.stderr}"[-3000:])


def large(a, d: str) -> dict:
    """One zone of ``--names`` names, every signer once per ``--runs`` (the fastest is reported)."""
    dirs = {k: os.path.join(d, k) for k in ("cryptobat", "bind", "ldns", "knot")}
    for p in dirs.values():
        os.makedirs(p, exist_ok=True)
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
    if not a.no_verify:
        for out in ("out.signed", "outP.signed"):
            t0 = time.perf_counter()
            dnssec_verify(os.path.join(dirs["cryptobat"], out))
            print(f"dnssec-verify accepts cryptobat's {out} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return {"names": a.names, "records": nrec, "rows": rows, "verified": not a.no_verify}


def small(a, d: str) -> dict:
    """A 50-name zone signed ``--small`` times by each signer, the signers taking turns; medians.

    Also timed: the interpreter alone and with the libraries every run imports, the floor
    under any Python signer on this machine."""
    names = 50
    cdir, bdir = os.path.join(d, "cryptobat"), os.path.join(d, "bind")
    os.makedirs(cdir)
    os.makedirs(bdir)
    make_zone(os.path.join(cdir, f"{ORIGIN}.zone"), names)
    make_zone(os.path.join(bdir, f"{ORIGIN}.zone"), names)
    home, cksk, czsk = setup_cryptobat(cdir)
    bksk, bzsk = setup_bind(bdir)
    with open(os.path.join(bdir, f"{ORIGIN}.zone"), "a") as f:
        f.write(f"$INCLUDE {bksk}.key\n$INCLUDE {bzsk}.key\n")
    cb = [sys.executable, "-m", "cryptobat", "--home", home, "signzone"]
    zc = os.path.join(cdir, f"{ORIGIN}.zone")
    zb = os.path.join(bdir, f"{ORIGIN}.zone")
    runs = [
        ("cryptobat signzone -P", cdir, cb + ["-P", "-o", ORIGIN, "-f", "outP.signed", "-k", cksk, zc, czsk], "outP.signed"),
        ("cryptobat signzone", cdir, cb + ["-o", ORIGIN, "-f", "out.signed", "-k", cksk, zc, czsk], "out.signed"),
        ("dnssec-signzone -P -n 2", bdir,
         ["dnssec-signzone", "-P", "-n", "2", "-o", ORIGIN, "-f", "outP.signed", "-k", bksk, zb, bzsk], "outP.signed"),
        ("dnssec-signzone -n 2", bdir,
         ["dnssec-signzone", "-n", "2", "-o", ORIGIN, "-f", "out.signed", "-k", bksk, zb, bzsk], "out.signed"),
        ("python3 -c pass (interpreter start)", cdir, [sys.executable, "-c", "pass"], None),
        ("python3 importing dnspython + cryptography", cdir,
         [sys.executable, "-c", "import dns.zone, dns.dnssec, cryptography.hazmat.primitives.asymmetric.ec"], None),
    ]
    walls: dict[str, list[float]] = {r[0]: [] for r in runs}
    for _ in range(a.small):
        for name, cwd, cmd, _out in runs:
            walls[name].append(run_measured(cmd, cwd, None, os.path.join(cwd, "run.log"))["wall"])
    rows = []
    for name, cwd, cmd, out in runs:
        w = sorted(walls[name])
        rows.append({"name": name, "cmd": " ".join(cmd), "median": w[len(w) // 2], "best": w[0],
                     "sigs": count_rrsigs(os.path.join(cwd, out)) if out else 0})
        print(f"{name}: median {rows[-1]['median'] * 1000:.1f} ms, best {w[0] * 1000:.1f} ms", file=sys.stderr)
    if not a.no_verify:
        for out in ("out.signed", "outP.signed"):
            dnssec_verify(os.path.join(cdir, out))
    return {"names": names, "runs": a.small, "rows": rows}


def fleet(a, d: str) -> dict:
    """``--zones`` zones of 50 names: one ``cryptobat signzone --zones DIR`` run against as many
    ``dnssec-signzone`` runs (one shell loop), each zone with its own KSK and ZSK."""
    k, names = a.zones, 50
    cdir, bdir = os.path.join(d, "cryptobat"), os.path.join(d, "bind")
    czones = os.path.join(cdir, "zones")
    os.makedirs(czones)
    os.makedirs(bdir)
    origins = [f"z{i:05d}.example" for i in range(k)]
    t0 = time.perf_counter()
    sys.path.insert(0, str(TESTS))
    from support import make_token
    home = os.path.join(cdir, "token")
    make_token(Path(home), quorum=1, maxval=MAXVAL,
               keys=[f"13 {role} {o}" for o in origins for role in ("ksk", "zsk")])
    script = ["set -e"]
    for o in origins:
        make_zone(os.path.join(czones, f"{o}.zone"), names, o)
        bz = os.path.join(bdir, f"{o}.zone")
        make_zone(bz, names, o)
        ksk, zsk = setup_bind(bdir, o)
        with open(bz, "a") as f:
            f.write(f"$INCLUDE {ksk}.key\n$INCLUDE {zsk}.key\n")
        script.append(f"dnssec-signzone -q -P -n 2 -o {o} -f {o}.signed -k {ksk} {o}.zone {zsk}")
    with open(os.path.join(bdir, "all.sh"), "w") as f:
        f.write("\n".join(script) + "\n")
    print(f"{k} zones of {names} names set up in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    runs = [
        (f"cryptobat signzone -P --zones ({k} zones, one process)", cdir,
         [sys.executable, "-m", "cryptobat", "--home", home, "signzone", "-P", "--zones", czones]),
        (f"dnssec-signzone -P -n 2 ({k} runs)", bdir, ["sh", os.path.join(bdir, "all.sh")]),
    ]
    rows = []
    for name, cwd, cmd in runs:
        r = run_measured(cmd, cwd, None, os.path.join(cwd, "run.log"))
        r["name"], r["cmd"] = name, " ".join(cmd)
        rows.append(r)
        print(f"{name}: wall {r['wall']:.2f} s, CPU {r['cpu']:.2f} s, tree {r['treerss'] / 2**20:.0f} MiB",
              file=sys.stderr)
    rows[0]["sigs"] = sum(count_rrsigs(os.path.join(czones, f"{o}.zone.signed")) for o in origins)
    rows[1]["sigs"] = sum(count_rrsigs(os.path.join(bdir, f"{o}.signed")) for o in origins)
    if not a.no_verify:  # BIND's validator on a spread of the zones
        for o in origins[:: max(1, k // 20)]:
            dnssec_verify(os.path.join(czones, f"{o}.zone.signed"), o)
    return {"zones": k, "names": names, "rows": rows}


# ---------------------------------------------------------------- main


def report(results: dict, m: dict) -> str:
    when = results["date"]
    out = [f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['ram_gib']} GiB RAM, {m['os']}, Linux {m['kernel']}, "
           f"Python {m['python']}; load before the run {results['load']}; token custody {results.get('custody', 'software')}\n",
           "Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + "\n"]
    if "large" in results:
        r = results["large"]
        out += [f"### {r['names']} names, {r['records']} records, ECDSAP256SHA256 KSK+ZSK, NSEC ({when})\n",
                table(r["rows"], r["rows"][0]), ""]
        bind = next(x for x in r["rows"] if x["name"].startswith("dnssec-signzone -P"))
        ours = r["rows"][1]
        out.append(f"cryptobat -P / BIND -P: wall {ours['wall'] / bind['wall']:.2f}×, "
                   f"process-tree peak RSS {ours['treerss'] / max(bind['treerss'], 1):.2f}×; "
                   f"outputs accepted by dnssec-verify: {'yes' if r['verified'] else 'not checked'}\n")
    if "small" in results:
        r = results["small"]
        bind = next(x for x in r["rows"] if x["name"] == "dnssec-signzone -P -n 2")
        out += [f"### {r['names']} names, {r['runs']} runs each, signers taking turns ({when})\n",
                "| run | median ms | best ms | RRSIGs | median / BIND -P |", "|---|---:|---:|---:|---:|"]
        for x in r["rows"]:
            out.append(f"| {x['name']} | {x['median'] * 1000:.1f} | {x['best'] * 1000:.1f} | {x['sigs'] or ''} "
                       f"| {x['median'] / bind['median']:.2f} |")
        out.append("")
    if "fleet" in results:
        r = results["fleet"]
        bind = r["rows"][1]
        out += [f"### {r['zones']} zones of {r['names']} names ({when})\n",
                "| run | wall s | CPU s | peak RSS MiB (process tree) | RRSIGs | wall / BIND |",
                "|---|---:|---:|---:|---:|---:|"]
        for x in r["rows"]:
            out.append(f"| {x['name']} | {x['wall']:.2f} | {x['cpu']:.2f} | {x['treerss'] / 2**20:.0f} | {x['sigs']} "
                       f"| {x['wall'] / bind['wall']:.2f} |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--names", type=int, default=100000, help="names in the large zone (0: no large zone)")
    ap.add_argument("--runs", type=int, default=1, help="runs per signer on the large zone; the fastest is reported")
    ap.add_argument("--small", type=int, default=0, metavar="RUNS",
                    help="also sign a 50-name zone RUNS times per signer (medians)")
    ap.add_argument("--zones", type=int, default=0, metavar="K",
                    help="also sign K zones of 50 names: signzone --zones against K dnssec-signzone runs")
    ap.add_argument("--no-verify", action="store_true", help="do not run dnssec-verify on the outputs")
    ap.add_argument("--keep", metavar="DIR", help="work in DIR and keep it")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--custody", default="software", choices=("software", "tpm2", "pkcs11"),
                    help="the custody of the benchmark's tokens: tpm2 on a swtpm behind tpm2-abrmd, "
                         "pkcs11 on SoftHSMv2 (both started here, as the tests start them)")
    a = ap.parse_args(argv)

    missing = [t for t in TOOLS + ("dnssec-verify",) if shutil.which(t) is None]
    if missing:
        print(f"signzone_bench: missing tools: {' '.join(missing)} "
              "(apt-get install -y bind9-utils ldnsutils knot-dnssecutils knot softhsm2)", file=sys.stderr)
        return 2

    # bytecode as an installed package has it (pip compiles on install): with PYTHONDONTWRITEBYTECODE
    # set, a source tree would otherwise be compiled again by every run
    import compileall

    import cryptobat
    compileall.compile_dir(os.path.dirname(cryptobat.__file__), quiet=1)

    if a.custody != "software":
        sys.path.insert(0, str(TESTS))
        from support import use_custody
        use_custody(a.custody)  # every token made below keeps its keys there ($CRYPTOBAT_CUSTODY)
    d = a.keep or tempfile.mkdtemp(prefix="signzone-bench-")
    os.makedirs(d, exist_ok=True)
    results: dict = {"custody": a.custody,
                     "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                     "load": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    try:
        if a.names:
            results["large"] = large(a, os.path.join(d, "large"))
        if a.small:
            results["small"] = small(a, os.path.join(d, "small"))
        if a.zones:
            results["fleet"] = fleet(a, os.path.join(d, "fleet"))
        m = machine()
        print(report(results, m))
        if a.json:
            results["machine"] = m
            if "large" in results:  # the layout before the other scenarios: names, records, rows at the top
                results.update({k: results["large"][k] for k in ("names", "records", "rows")})
            with open(a.json, "w") as f:
                json.dump(results, f, indent=1)
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
