#!/usr/bin/env python3
"""Signatures per second through the token, per key custody, against the raw devices (one run).

    python3 bench/custody_bench.py [--seconds 0.5] [--repeat 8] [--custodies software,pkcs11,tpm2]
                                   [--workers 2] [--baseline OLD.json] [--json]

Through the token: a real token per custody (``home.init_token`` with that custody, one
officer, max validity, an RSA-2048 and an ECDSA P-256 zone key), signing real RRSIG signing
data with ``Token.timed_sign`` (policy check, then the custody's key; the batch path of
``cryptobat.signing``) in batches of 1 and 64, in this process. Beside them, per custody:
``KIND-key``, the custody's loaded key signing alone (what the custody costs without the
policy check), and ``KIND+Nworkers``, batches of ``workers.PARALLEL_MIN`` through the
signing engine's worker processes (their CPU counted too).

Anchors, measured in the same run: pyca/cryptography in-process (RSA-2048 PKCS#1 v1.5 SHA-256,
P-256 ECDSA SHA-256); SoftHSMv2 in-process through python-pkcs11 with the mechanisms the
PKCS#11 custody uses (CKM_SHA256_RSA_PKCS over the data, CKM_ECDSA over a SHA-256 computed
here); a raw swtpm through tpm2-pytss (a key loaded: TPM2_Sign only; and TPM2_Load + TPM2_Sign
+ TPM2_FlushContext per signature). The tpm2 rows appear when ``cryptobat.custody.tpm2`` exists.

Each row is measured in ``--repeat`` slices of ``--seconds``, the rows taking turns, and keeps
its best rate and its least CPU per signature (user+sys of this process and of the engine's
workers; a swtpm's own CPU is not in it): on a shared machine a busy moment then hits every row
alike, and the CPU ratio shows what the rate ratio cannot when others use the cores. Goals:
pkcs11 custody >= 80 % of SoftHSM in-process; tpm2 custody >= 90 % of raw load+sign+flush and
>= 90 % of keys-loaded (the two keys fit the TPM's slots); software custody unchanged
(``--baseline``: an earlier ``--json`` run, e.g. of the tree before a change).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support import Officers, SoftHsm, Swtpm, configure, payload  # noqa: E402

from cryptobat.console import Console  # noqa: E402
from cryptobat.custody import SoftwareCustody  # noqa: E402
from cryptobat.home import close_token, init_token, open_engine  # noqa: E402
from cryptobat.workers import PARALLEL_MIN  # noqa: E402

ZONE = "testzone"
KEYS = {"rsa": (8, "krsa"), "ec": (13, "kec")}
NAMES = {"rsa": "RSA-2048", "ec": "P-256"}
BATCHES = (1, 64)
ENGINE_BATCH = PARALLEL_MIN  # the smallest batch the engine gives its worker processes
GOALS = {"pkcs11": [("softhsm", 0.80)], "tpm2": [("tpm-lsf", 0.90), ("tpm-loaded", 0.90)]}


def payloads(key, now: int, n: int = 64) -> list[bytes]:
    """``n`` different RRSIG signing data for ``key`` (an A RRset each), all within the policy."""
    return [payload(key, now=now, rrs=[("www.testzone.", 1, 1, 300, bytes([192, 0, 2, i % 250]))])
            for i in range(n)]


# --- what is measured ---------------------------------------------------------------------------
class Row:
    def __init__(self, kind: str, alg: str, batch: int, fn: Callable[[], object],
                 cpu: Callable[[], float] = time.process_time) -> None:
        self.kind, self.alg, self.batch, self.fn, self.cpu = kind, alg, batch, fn, cpu
        self.rate = 0.0
        self.cpu_us = 0.0  # this process's user+sys per signature
        self.error: str | None = None

    def measure(self, seconds: float) -> None:
        """One slice of ``seconds`` (at least one call); the best rate and least CPU are kept."""
        if self.error:
            return
        fn, n = self.fn, 0
        try:
            c0, t0 = self.cpu(), time.perf_counter()
            end = t0 + seconds
            while True:
                fn()
                n += self.batch
                t = time.perf_counter()
                if t >= end:
                    break
            c = self.cpu() - c0
        except Exception as e:  # a device that fails is reported in its row, the others still run
            self.error = f"{type(e).__name__}: {e}"
            return
        self.rate = max(self.rate, n / (t - t0))
        self.cpu_us = min(self.cpu_us or float("inf"), 1e6 * c / n)

    def as_dict(self) -> dict:
        return {"kind": self.kind, "alg": self.alg, "batch": self.batch, "rate": round(self.rate, 1),
                "cpu_us_per_sig": round(self.cpu_us, 1), "error": self.error}


def token_rows(kind: str, factory, home: Path, engine: int = 0) -> tuple[list[Row], Callable[[], None]]:
    """A configured token on ``factory``'s custody; its timed_sign rows, a row of its custody's
    key signing alone (no policy check: what the custody itself costs) and, given ``engine``
    worker processes, rows of batches of PARALLEL_MIN through them; a closer."""
    tok = init_token(home, quorum=1, custody_factory=factory)
    eng = None
    try:
        configure(Officers(Console(tok)), enrol=("solo",), quorum=1, maxval=86400,
                  keys=[f"{alg} zsk {ZONE} {label}" for alg, label in KEYS.values()])
        now = tok.now()
        rows = []
        for alg, (_, label) in KEYS.items():
            data = payloads(tok.key(label), now)
            items = [(label, d) for d in data]
            bad = [r.reason for r in tok.timed_sign(items) if not r.ok]
            if bad:
                raise RuntimeError(f"{kind}: the token refused the benchmark's signing data: {bad[0]}")
            for batch in BATCHES:
                rows.append(Row(kind, alg, batch, _token_call(tok, items, batch)))
            rec = tok.state.keys[label]
            key = tok.custody.load(rec.info.algorithm, bytes.fromhex(rec.blob), label.encode())
            rows.append(Row(f"{kind}-key", alg, 1, lambda key=key, d=data[0]: key.sign(d)))
        if engine:
            eng = open_engine(tok, workers=engine)
            for alg, (_, label) in KEYS.items():
                many = [(label, d) for d in payloads(tok.key(label), now, ENGINE_BATCH)]
                bad = [r.reason for r in tok.timed_sign(many, run=eng.run) if not r.ok]
                if bad:
                    raise RuntimeError(f"{kind}: the token's workers refused the benchmark's signing data: {bad[0]}")
                rows.append(Row(f"{kind}+{engine}workers", alg, ENGINE_BATCH,
                                lambda many=many: tok.timed_sign(many, run=eng.run), cpu=lambda: _engine_cpu(eng)))
    except BaseException:
        close_token(tok, eng)
        raise
    return rows, lambda: close_token(tok, eng)


def _engine_cpu(eng) -> float:
    """CPU seconds of this process and the engine's worker processes (user+sys, from /proc):
    what a signature costs wherever it is made, so the workers' gain on free cores can be read
    even on a busy machine."""
    tick = os.sysconf("SC_CLK_TCK")
    total = time.process_time()
    for w in eng._pool or ():  # the engine's own processes (a swtpm is a child of this one too)
        try:
            fields = Path(f"/proc/{w.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total


def _token_call(tok, items, batch: int) -> Callable[[], object]:
    if batch == 1:
        it = [0]

        def one():
            i = it[0] = (it[0] + 1) % len(items)
            return tok.timed_sign(items[i:i + 1])
        return one
    chunk = items[:batch]
    return lambda: tok.timed_sign(chunk)


def pyca_rows(data: bytes) -> list[Row]:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
    r = rsa.generate_private_key(65537, 2048)
    e = ec.generate_private_key(ec.SECP256R1())
    pad, sha, ecdsa = padding.PKCS1v15(), hashes.SHA256(), ec.ECDSA(hashes.SHA256())
    return [Row("pyca", "rsa", 1, lambda: r.sign(data, pad, sha)), Row("pyca", "ec", 1, lambda: e.sign(data, ecdsa))]


def softhsm_rows(cfg: dict, data: bytes) -> list[Row]:
    import pkcs11
    from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag
    from pkcs11 import exceptions as p11e
    tok = pkcs11.lib(cfg["module"]).get_token(token_label=cfg["token"])
    try:
        s = tok.open(rw=True, user_pin=cfg["pin"])
    except p11e.UserAlreadyLoggedIn:
        s = tok.open(rw=True)
    kw = dict(store=True, capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
              private_template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False})
    _, rk = s.generate_keypair(KeyType.RSA, 2048, label="anchor-rsa", id=b"anchor-rsa", **kw)
    _, ek = s.generate_keypair(KeyType.EC, label="anchor-ec", id=b"anchor-ec",
                               public_template={Attribute.EC_PARAMS: bytes.fromhex("06082a8648ce3d030107")}, **kw)
    sha256 = hashlib.sha256
    return [Row("softhsm", "rsa", 1, lambda: rk.sign(data, mechanism=Mechanism.SHA256_RSA_PKCS)),
            Row("softhsm", "ec", 1, lambda: ek.sign(sha256(data).digest(), mechanism=Mechanism.ECDSA))]


def _esapi(tcti: str):
    """An ESAPI context on ``tcti``, retried for a few seconds: a just-started swtpm may have
    made its socket before it listens on it."""
    from tpm2_pytss import ESAPI, TCTILdr
    deadline = time.monotonic() + 10
    while True:
        try:
            return ESAPI(TCTILdr(*tcti.split(":", 1)))
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def tpm_rows(tcti: str, data: bytes) -> tuple[list[Row], Callable[[], None]]:
    from tpm2_pytss.constants import TPM2_ALG, TPM2_RH, TPM2_ST, TPMA_OBJECT
    from tpm2_pytss.types import TPM2B_PUBLIC, TPMT_SIG_SCHEME, TPMT_TK_HASHCHECK
    esys = _esapi(tcti)
    primary = esys.create_primary(None, "ecc256:aes128cfb")[0]
    attrs = (TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.FIXEDTPM
             | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN)
    scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)  # the key's own (RSASSA / ECDSA with SHA-256)
    ticket = TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL)
    sha256 = hashlib.sha256
    rows, loaded = [], []
    for alg, spec in (("rsa", "rsa2048:rsassa-sha256:null"), ("ec", "ecc256:ecdsa-sha256:null")):
        priv, pub = esys.create(primary, None, TPM2B_PUBLIC.parse(spec, objectAttributes=attrs))[:2]

        def lsf(priv=priv, pub=pub):
            h = esys.load(primary, priv, pub)
            try:
                return esys.sign(h, sha256(data).digest(), scheme, ticket)
            finally:
                esys.flush_context(h)

        state = {"h": None, "priv": priv, "pub": pub}

        def signed_loaded(state=state):  # loads on first use; swtpm holds the primary and two keys
            if state["h"] is None:
                for other in loaded:
                    if other["h"] is not None:
                        esys.flush_context(other["h"])
                        other["h"] = None
                state["h"] = esys.load(primary, state["priv"], state["pub"])
            return esys.sign(state["h"], sha256(data).digest(), scheme, ticket)

        loaded.append(state)
        rows += [Row("tpm-loaded", alg, 1, signed_loaded), Row("tpm-lsf", alg, 1, lsf)]

    def close() -> None:
        esys.close()
    return rows, close


# --- the run ------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=0.5, help="length of one slice of a row's measurement")
    ap.add_argument("--repeat", type=int, default=8, help="slices per row, taking turns; each row's best is kept")
    ap.add_argument("--workers", type=int, default=2, help="worker processes of the engine rows (0: none)")
    ap.add_argument("--custodies", default="software,pkcs11,tpm2")
    ap.add_argument("--baseline", help="an earlier --json output: the software rows are compared with it")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    a = ap.parse_args(argv)
    wanted = [c.strip() for c in a.custodies.split(",") if c.strip()]
    work = Path(tempfile.mkdtemp(prefix="cbcustody-"))
    notes: list[str] = []
    closers: list[Callable[[], None]] = []
    rows: list[Row] = []
    data = payloads_for_anchor()
    try:
        rows += pyca_rows(data)
        hsm = SoftHsm(tokens=2) if "pkcs11" in wanted else None
        if hsm is not None:
            rows += softhsm_rows(hsm.token(), data)
        tpm2_cls = None
        if "tpm2" in wanted:
            try:
                from cryptobat.custody.tpm2 import Tpm2Custody as tpm2_cls  # written beside this bench
            except ImportError:
                notes.append("tpm2 custody: cryptobat.custody.tpm2 is not in this tree (raw swtpm anchors only)")
            raw = Swtpm(work / "swtpm-raw")
            closers.append(raw.stop)
            r, close = tpm_rows(raw.tcti, data)
            closers.insert(0, close)
            rows += r
        for kind in wanted:
            if kind == "software":
                factory = SoftwareCustody
            elif kind == "pkcs11":
                from cryptobat.custody.pkcs11 import Pkcs11Custody
                cfg = hsm.token()

                def factory(h, create=False, cfg=cfg):
                    return Pkcs11Custody(h, create, cfg)
            elif kind == "tpm2":
                if tpm2_cls is None:
                    continue
                sw = Swtpm(work / "swtpm-custody")
                closers.append(sw.stop)
                _esapi(sw.tcti).close()  # listening before the custody connects

                def factory(h, create=False, tcti=sw.tcti):
                    return tpm2_cls(h, create, {"tcti": tcti})
            else:
                sys.exit(f"unknown custody {kind!r} (software, pkcs11, tpm2)")
            r, close = token_rows(kind, factory, work / kind, a.workers if kind != "tpm2" else 0)
            closers.insert(0, close)
            rows += r
        for _ in range(a.repeat):
            for row in rows:
                row.measure(a.seconds)
    finally:
        for close in closers:
            try:
                close()
            except Exception as e:
                notes.append(f"closing: {type(e).__name__}: {e}")
        shutil.rmtree(work, ignore_errors=True)
    report = build_report(rows, a, notes)
    if a.json:
        print(json.dumps(report, indent=1))
    else:
        print(render(report))
    return 1 if any(r["error"] for r in report["rows"]) else 0


def payloads_for_anchor() -> bytes:
    """Signing data of the size the token rows sign (an A RRset's RRSIG data)."""
    from cryptobat.api import KeyInfo
    probe = KeyInfo("x", f"{ZONE}.", 13, "zsk", 0, 256, b"\0" * 64)
    return payloads(probe, 1_800_000_000, 1)[0]


def build_report(rows: list[Row], a, notes: list[str]) -> dict:
    by = {(r.kind, r.alg, r.batch): r for r in rows}
    goals: list[dict] = []

    def compare(mine: Row | None, base: Row | dict | None, anchor: str, want: float | None) -> None:
        if mine is None or base is None or mine.error:
            return
        rate, cpu = (base["rate"], base["cpu_us_per_sig"]) if isinstance(base, dict) else (base.rate, base.cpu_us)
        if not rate:
            return
        ratio = mine.rate / rate
        # CPU per signature, this process's: meaningful where both sides sign in this process
        cpu_ratio = cpu / mine.cpu_us if cpu and mine.cpu_us and not anchor.startswith("tpm") else None
        goals.append({"custody": mine.kind, "alg": mine.alg, "batch": mine.batch, "anchor": anchor,
                      "ratio": round(ratio, 3), "cpu_ratio": None if cpu_ratio is None else round(cpu_ratio, 3),
                      "goal": want, "met": None if want is None else ratio >= want})

    for kind, anchors in GOALS.items():
        for alg in KEYS:
            for batch in BATCHES:
                for anchor, want in anchors:
                    compare(by.get((kind, alg, batch)), by.get((anchor, alg, 1)), anchor, want)
            for anchor, _ in anchors:
                compare(by.get((f"{kind}-key", alg, 1)), by.get((anchor, alg, 1)), anchor, None)
    if a.baseline:
        old = {(r["kind"], r["alg"], r["batch"]): r for r in json.loads(Path(a.baseline).read_text())["rows"]}
        for alg in KEYS:
            for batch in BATCHES:
                compare(by.get(("software", alg, batch)), old.get(("software", alg, batch)), "baseline", 0.95)
    for alg in KEYS:
        for batch in BATCHES:
            compare(by.get(("software", alg, batch)), by.get(("pyca", alg, 1)), "pyca", None)
        for r in rows:
            if "workers" in r.kind and r.alg == alg:
                compare(r, by.get((r.kind.split("+")[0], alg, 64)), f"{r.kind.split('+')[0]}, batch 64", None)
    out_rows = [r.as_dict() for r in rows]
    return {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "seconds": a.seconds, "repeat": a.repeat,
            "machine": f"{os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
                       f"Python {platform.python_version()}, load {os.getloadavg()[0]:.2f}",
            "rows": out_rows, "goals": goals, "notes": notes}


def render(rep: dict) -> str:
    lines = [f"Custody benchmark ({rep['when']}; best of {rep['repeat']} slices of {rep['seconds']} s; "
             f"{rep['machine']})", "",
             "| what | key | batch | sig/s | CPU µs / sig |", "|---|---|---:|---:|---:|"]
    for r in rep["rows"]:
        val = f"error: {r['error']}" if r["error"] else f"{r['rate']:,.0f}"
        lines.append(f"| {r['kind']} | {NAMES[r['alg']]} | {r['batch']} | {val} | {r['cpu_us_per_sig']:,.1f} |")
    lines += ["", "| custody | key | batch | against | sig/s ratio | CPU ratio | goal | met |",
              "|---|---|---:|---|---:|---:|---:|---|"]
    for g in rep["goals"]:
        goal = f">= {g['goal']:.0%}" if g["goal"] is not None else "-"
        met = "-" if g["met"] is None else ("yes" if g["met"] else "NO")
        cpu = "-" if g["cpu_ratio"] is None else f"{g['cpu_ratio']:.1%}"
        lines.append(f"| {g['custody']} | {NAMES[g['alg']]} | {g['batch']} | {g['anchor']} | {g['ratio']:.1%} "
                     f"| {cpu} | {goal} | {met} |")
    lines += [f"note: {n}" for n in rep["notes"]]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
