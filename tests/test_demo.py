"""The README's first command: `cryptobat demo` replays the original device on a throwaway token."""
from __future__ import annotations

from support import cli


def test_demo_replays_the_seed(tmp_path):
    r = cli("demo", "--keep", str(tmp_path / "demo"), timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr
    out = r.stdout
    for expected in (" |lamb| not present", " CO lamb Ok", " Configuration disabled", " Failed", " CO jakob Ok",
                     " Maximum validity period set to +3600 seconds", "Zone fully signed:",
                     "failed to sign data: RRSIG expiration time exceeds HSM policy",
                     "As the original: +300 signed and validated, +3700 refused by the token."):
        assert expected in out, expected
    assert out.index(" Configuration disabled") < out.index(" Maximum validity period set")
    signed = (tmp_path / "demo" / "testzone.signed").read_text()
    assert "RRSIG\tDNSKEY 8 1 300" in signed or "RRSIG DNSKEY 8 1 300" in signed
    # the token refused the +3700 run: its audit log says so, and the chain verifies
    home = tmp_path / "demo" / "token"
    assert "RRSIG expiration time exceeds HSM policy" in cli("audit", "-n", "50", home=home).stdout
    assert cli("audit", "verify", home=home).returncode == 0
