#!/usr/bin/env python3
"""TPM 2.0 custody signing throughput on swtpm, against the raw TPM rates in the same run.

    PYTHONPATH=src python3 bench/tpm2_custody_bench.py [--rounds 5] [--n 300]

One swtpm (Unix socket) and one custody. For P-256 and RSA-2048, rounds of: raw ESAPI
TPM2_Sign with the key loaded; raw TPM2_Load + Sign + FlushContext; the custody's
``LoadedKey.sign`` (hash of 400 bytes of signing data plus TPM2_Sign) with 1 key, 2 keys
(both fit beside the primary) and 5 keys round-robin (every signature reloads a key, by
TPM2_ContextLoad). The rows are interleaved round by round so the noise of a shared machine
hits them alike; the best round of each is printed, with the client's CPU time per signature.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support import Swtpm  # noqa: E402
from tpm2_pytss.constants import TPM2_ALG  # noqa: E402
from tpm2_pytss.types import TPM2B_DIGEST, TPMT_SIG_SCHEME  # noqa: E402

from cryptobat.custody import tpm2  # noqa: E402


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n", type=int, default=300, help="signatures per row and round")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, Swtpm(Path(tmp) / "tpm") as t:
        home = Path(tmp) / "home"
        home.mkdir()
        c = tpm2.Tpm2Custody(home, True, {"tcti": t.tcti})
        try:
            esys, data = c._esys, os.urandom(400)
            scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)
            for alg in (13, 8):
                keys = [c.load(alg, c.generate(alg, b"k")[1], b"k") for _ in range(5)]
                digest = TPM2B_DIGEST(os.urandom(32))

                def raw_loaded(k=keys[0]):
                    esys.sign(c._handle(k), digest, scheme, tpm2._NULL_TICKET)

                def raw_load_sign_flush(k=keys[0]):
                    h = esys.load(c._primary, k.private, k.public)
                    esys.tr_set_auth(h, k.auth)
                    esys.sign(h, digest, scheme, tpm2._NULL_TICKET)
                    esys.flush_context(h)

                def rr(n):
                    ks, i = keys[:n], [0]

                    def one():
                        ks[i[0] % n].sign(data)
                        i[0] += 1
                    return one
                rows = {"raw, key loaded": raw_loaded, "raw, load+sign+flush": raw_load_sign_flush,
                        "custody, 1 key": rr(1), "custody, 2 keys round-robin": rr(2),
                        "custody, 5 keys round-robin": rr(5)}
                best: dict[str, tuple[float, float]] = {}
                for _ in range(args.rounds):
                    for name, f in rows.items():
                        for k in keys:
                            c._unload(k)  # every row starts with no key loaded
                        w, u = time.perf_counter(), _cpu()
                        for _ in range(args.n):
                            f()
                        rate, cpu = args.n / (time.perf_counter() - w), (_cpu() - u) / args.n * 1e6
                        if rate > best.get(name, (0.0, 0.0))[0]:
                            best[name] = (rate, cpu)
                mnemonic = keys[0].alg.mnemonic
                for name, (rate, cpu) in best.items():
                    print(f"{mnemonic:16} {name:30} {rate:7.0f} sig/s  client CPU {cpu:5.0f} us/sig")
        finally:
            c.close()


if __name__ == "__main__":
    main()
