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


def test_bench_script_small_zone_and_many_zones(tmp_path):
    """The 50-name and many-zones scenarios, each output checked by dnssec-verify inside the script,
    every run checked for processes left behind."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "signzone_bench.py"), "--names", "0", "--small", "1",
                        "--zones", "4", "--keep", str(tmp_path / "work"), "--json", str(tmp_path / "r.json")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    import json
    res = json.loads((tmp_path / "r.json").read_text())
    small = {row["name"]: row for row in res["small"]["rows"]}
    assert small["cryptobat signzone -P"]["sigs"] == small["cryptobat signzone"]["sigs"] > 100
    fleet = res["fleet"]["rows"]
    assert fleet[0]["name"].startswith("cryptobat signzone -P --zones") and fleet[0]["left"] == 0
    assert abs(fleet[0]["sigs"] - fleet[1]["sigs"]) <= 4 and fleet[0]["sigs"] > 400
    assert "### 4 zones of 50 names" in r.stdout and "median / BIND -P" in r.stdout

