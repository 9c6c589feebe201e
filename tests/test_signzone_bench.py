"""The benchmark script runs end to end on a tiny zone (no timing asserted), so it cannot rot.

A missing anchor tool (BIND, ldns, Knot, SoftHSM) makes the script exit 2, and this test fail.
"""
from __future__ import annotations

import subprocess
import sys

from support import ROOT


def test_bench_script_on_a_tiny_zone(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "signzone_bench.py"), "--names", "300",
                        "--keep", str(tmp_path / "work"), "--json", str(tmp_path / "r.json")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    import json
    res = json.loads((tmp_path / "r.json").read_text())
    names = [row["name"] for row in res["rows"]]
    assert [n.split(" (")[0] for n in names] == [
        "cryptobat signzone", "cryptobat signzone -P", "dnssec-signzone -P -n 2", "dnssec-signzone -n 2",
        "ldns-signzone", "kzonesign"]
    sigs = {row["sigs"] for row in res["rows"]}
    assert min(sigs) > 600 and max(sigs) - min(sigs) <= 1  # everyone signed the same RRsets
    for row in res["rows"]:
        assert row["wall"] > 0 and row["cpu"] > 0 and row["maxrss"] > 0
    assert "| cryptobat signzone (real token, policy-checked) |" in r.stdout
    # our output passes BIND's validator
    v = subprocess.run(["dnssec-verify", "-o", "example.com", str(tmp_path / "work" / "large" / "cryptobat" / "out.signed")],
                       capture_output=True, text=True, timeout=120)
    assert v.returncode == 0, v.stderr
