"""End-to-end ``cryptobat signzone`` runs on real tokens, checked by BIND, ldns and Knot validators.

Every token is a real :class:`cryptobat.token.Token` made by
:func:`test_signzone_backend.make_token` (an officer enrols, logs in, sets the
maximum validity and generates or imports the keys); signzone opens it with
``--home``, through the ``cryptobat`` command, or talks to ``cryptobat serve``.
A validator that is not installed fails the test: install them with
``apt-get install -y bind9-utils ldnsutils knot-dnssecutils``.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import dns.dnssec
import dns.name
import dns.rdata
import pytest

from cryptobat import signzone
from cryptobat.client import connect
from cryptobat.zonesign import reader
from support import HOLDS, MONTH, rsa_private_file, zone_token, zone_validates

ZONE = """\
$TTL 3600
$ORIGIN example.org.
@       IN SOA  ns1 hostmaster ( 2024010101 ; serial
                7200 3600 1209600 300 )
        NS      ns1
        NS      ns2.example.net.
        MX      10 mail
        TXT     "v=spf1 mx -all" "second; string"
        CAA     0 issue "letsencrypt.org"
ns1     A       192.0.2.1
        AAAA    2001:db8::1
mail    A       192.0.2.25
WWW     CNAME   ns1
_sip._tcp SRV   10 60 5060 sip
sip     A       192.0.2.5
        NAPTR   100 10 "S" "SIP+D2T" "" _sip._tcp.example.org.
        SSHFP   4 2 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef
_443._tcp.www TLSA 3 1 1 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef
host    300 IN  HINFO "PC" "Linux"
        LOC     52 22 23.000 N 4 53 32.000 E -2.00m 0.00m 10000m 10m
*.wild  A       192.0.2.80
        TXT     "wildcard"
a.b.c.ent A     192.0.2.90          ; b.c.ent, c.ent: empty non-terminals
; a secure delegation (DS) with in-bailiwick glue
secure  NS      ns.secure
        DS      12345 13 2 0123456789ABCDEF0123456789ABCDEF0123456789ABCDEF0123456789ABCDEF
ns.secure A     192.0.2.53
; insecure delegations, one with glue, one below an empty non-terminal
insecure NS     ns.insecure
        NS      ns.example.net.
ns.insecure A   192.0.2.54
deep.optout.x NS ns.example.net.
dname   DNAME   example.net.
ptr     PTR     host.example.net.
"""


def _setup(tmp_path, algs, zone_text=ZONE, origin="example.org.", max_validity=MONTH):
    """A real token with a KSK and a ZSK per algorithm, their key files, the zone file."""
    rt = zone_token(tmp_path / "home", origin, tmp_path, algs=algs, max_validity=max_validity)
    zf = tmp_path / origin.rstrip(".")
    zf.write_text(zone_text)
    ksks = [rt.keys[(a, "ksk")] for a in algs]
    zsks = [rt.keys[(a, "zsk")] for a in algs]
    return rt, str(zf), ksks, zsks


def _sign(rt, argv, client=None) -> int:
    if client is not None:
        return signzone.main(argv, client=client)
    return signzone.main(["--home", str(rt.home), *argv])


def _records(path: str) -> list[list[str]]:
    return [line.split() for line in open(path)]


MODES = {
    "nsec": [],
    "nsec3": ["-3", "a1b2c3", "-H", "1"],
    "nsec3-optout": ["-3", "-", "-A"],
}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("alg", [a for a in (8, 13, 15) if a in HOLDS])
def test_sign_and_validate(tmp_path, alg, mode, capsys):
    rt, zf, ksks, zsks = _setup(tmp_path, [alg])
    argv = ["-x", "-N", "increment", "-j", "600", "-o", "example.org", "-k", ksks[0], *MODES[mode], zf, zsks[0]]
    assert _sign(rt, argv) == 0
    out = zf + ".signed"
    assert capsys.readouterr().out.strip().endswith(out)
    zone_validates(out, "example.org", ksk_only=True)

    recs = _records(out)
    by = {}
    for r in recs:
        by.setdefault((r[0].lower(), r[3]), []).append(r)
    assert by[("example.org.", "SOA")][0][6] == "2024010102"  # -N increment
    # glue and delegation NS unsigned, DS signed
    sigs = {(r[0].lower(), r[4]) for r in recs if r[3] == "RRSIG"}
    assert ("ns.secure.example.org.", "A") not in sigs and ("secure.example.org.", "NS") not in sigs
    assert ("secure.example.org.", "DS") in sigs and ("insecure.example.org.", "NS") not in sigs
    # wildcard RRSIG labels exclude the "*"
    wild = [r for r in recs if r[0] == "*.wild.example.org." and r[3] == "RRSIG"]
    assert wild and all(r[6] == "3" for r in wild)
    # the DNSKEY RRset is signed by the KSK only (-x)
    ksk_tag = ksks[0].rsplit("+", 1)[1].lstrip("0")
    assert {r[10] for r in recs if r[3] == "RRSIG" and r[4] == "DNSKEY"} == {ksk_tag}
    soa = by[("example.org.", "SOA")][0]
    neg_ttl = str(min(int(soa[1]), int(soa[-1])))
    if mode == "nsec":
        nsec = [r for r in recs if r[3] == "NSEC"]
        assert all(r[1] == neg_ttl for r in nsec)
        owners = {r[0].lower() for r in nsec}
        assert "c.ent.example.org." not in owners and "ns.secure.example.org." not in owners
        assert by[("insecure.example.org.", "NSEC")][0][5:] == ["NS", "RRSIG", "NSEC"]
    else:
        n3 = [r for r in recs if r[3] == "NSEC3"]
        assert all(r[1] == neg_ttl for r in n3)
        assert all(r[5] == ("1" if mode == "nsec3-optout" else "0") for r in n3)
        assert by[("example.org.", "NSEC3PARAM")][0][4:] == (["1", "0", "1", "a1b2c3"] if mode == "nsec3" else ["1", "0", "0", "-"])
        # 15 authoritative names and delegations + 8 empty non-terminals (_tcp, _tcp.www,
        # wild, ent, c.ent, b.c.ent, x, optout.x); opt-out leaves out the insecure
        # delegations insecure and deep.optout.x and the ENTs only they need (x, optout.x)
        empty = [r for r in n3 if not r[9:]]
        if mode == "nsec3":
            assert len(n3) == 23 and len(empty) == 8
        else:
            assert len(n3) == 19 and len(empty) == 6


def _tag(keyfile: str) -> str:
    return keyfile.rsplit("+", 1)[1].lstrip("0") or "0"


def _signers(path: str) -> dict[str, set[tuple[str, str]]]:
    """Covered type -> {(algorithm, key tag)} of its RRSIGs."""
    out: dict[str, set[tuple[str, str]]] = {}
    for r in _records(path):
        if r[3] == "RRSIG":
            out.setdefault(r[4], set()).add((r[5], r[10]))
    return out


def test_multi_algorithm_dnskey_by_ksks_only(tmp_path):
    """Two algorithms, no -x: still the DNSKEY RRset is signed by each algorithm's KSK only
    (the token refuses a ZSK's signature over it), the rest by each ZSK; keys found by -S."""
    second = 15 if 15 in HOLDS else 8
    rt, zf, ksks, zsks = _setup(tmp_path, [13, second])
    assert _sign(rt, ["-S", "-o", "example.org", "-f", str(tmp_path / "out"), zf]) == 0
    zone_validates(str(tmp_path / "out"), "example.org", ksk_only=False)
    zone_validates(str(tmp_path / "out"), "example.org", ksk_only=True)
    signers = _signers(str(tmp_path / "out"))
    assert signers.pop("DNSKEY") == {("13", _tag(ksks[0])), (str(second), _tag(ksks[1]))}
    assert set().union(*signers.values()) == {("13", _tag(zsks[0])), (str(second), _tag(zsks[1]))}


CDS_ZONE = ZONE + "@ CDNSKEY {dnskey}\n@ CDS {ds}\n"


def test_keys_sign_by_their_token_role(tmp_path, capsys):
    """Each key signs what its role in the token allows, whatever BIND's -k says: KSKs and CSKs
    the apex DNSKEY, CDS and CDNSKEY; ZSKs (or a CSK alone) the rest. An algorithm without a
    KSK or CSK, or with nothing but a KSK, is a one-line fatal error naming it."""
    rt, zf, _, _ = _setup(tmp_path, [13])
    rt2 = zone_token(tmp_path / "home2", "example.org.", tmp_path / "csk", algs=[13], roles=("csk",))
    ksk, zsk, csk = rt.keys[(13, "ksk")], rt.keys[(13, "zsk")], rt2.keys[(13, "csk")]
    out = str(tmp_path / "out")

    # a CSK alone, named as a zone signing key file: it signs everything
    assert _sign(rt2, ["-o", "example.org", "-f", out, zf, csk]) == 0
    zone_validates(out, "example.org", ksk_only=True)
    assert set().union(*_signers(out).values()) == {("13", _tag(csk))}

    # BIND's markers the wrong way round (ZSK after -k, KSK as a zone key): the roles decide;
    # the KSK's CDS and CDNSKEY go with the DNSKEY RRset
    dnskey = Path(ksk + ".key").read_text().split("DNSKEY", 1)[1].split(";")[0].strip()
    rd = dns.rdata.from_text("IN", "DNSKEY", dnskey)
    ds = dns.dnssec.make_ds("example.org.", rd, "SHA256")
    Path(zf).write_text(CDS_ZONE.format(dnskey=dnskey, ds=ds.to_text()))
    assert _sign(rt, ["-o", "example.org", "-f", out, "-k", zsk, zf, ksk]) == 0
    zone_validates(out, "example.org", ksk_only=True)
    signers = _signers(out)
    for t in ("DNSKEY", "CDS", "CDNSKEY"):
        assert signers.pop(t) == {("13", _tag(ksk))}, t
    assert set().union(*signers.values()) == {("13", _tag(zsk))}
    os.unlink(out)
    capsys.readouterr()

    for keyfile, want in ((zsk, "no KSK or CSK of algorithm ECDSAP256SHA256 (13) to sign DNSKEY, CDS and CDNSKEY"),
                          (ksk, "no ZSK or CSK of algorithm ECDSAP256SHA256 (13) to sign the zone")):
        assert _sign(rt, ["-o", "example.org", "-f", out, "-k", keyfile, zf]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"cryptobat signzone: fatal: {want} ("), err
        assert not os.path.exists(out)


SEED_ZONE = """\
$TTL 300
testzone.       IN SOA  ns.testzone. admin.testzone. 1 3600 900 604800 300
testzone.       IN NS   ns.testzone.
ns.testzone.    IN A    192.0.2.1
www.testzone.   IN A    192.0.2.80
"""


def _cryptobat(*args, cwd, timeout=120) -> subprocess.CompletedProcess:
    """The real ``cryptobat`` command."""
    return subprocess.run([sys.executable, "-m", "cryptobat", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def seed_keys(tmp_path_factory):
    """BIND private key files with the slides' tags: KSK 35407, ZSK 58968 (RSASHA256)."""
    d = tmp_path_factory.mktemp("seedkeys")
    return (str(rsa_private_file(d / "ksk.private", 257, 35407)), str(rsa_private_file(d / "zsk.private", 256, 58968)))


SEED = "-s now -e +300 -v 5 -x -o testzone -k Ktestzone.+008+35407 testzone Ktestzone.+008+58968"


@pytest.mark.not_on("tpm2", why="the slides' key tags are reached with RSA exponents a TPM does not import")
def test_seed_command_verbatim(tmp_path, tmp_path_factory, seed_keys):
    """The slides' session on a real token: the keys imported with the slides' tags, max validity
    3600 s; the slides' command line through the real ``cryptobat`` command."""
    home = tmp_path_factory.mktemp("seedtoken") / "home"
    (tmp_path / "testzone").write_text(SEED_ZONE)
    rt = zone_token(home, "testzone", tmp_path, algs=(), max_validity=3600,
                    imports=[("ksk", seed_keys[0]), ("zsk", seed_keys[1])])
    assert sorted(rt.keys.values()) == [str(tmp_path / "Ktestzone.+008+35407"), str(tmp_path / "Ktestzone.+008+58968")]
    r = _cryptobat("--home", str(home), "signzone", *SEED.split(), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "cryptobat signzone: testzone/DNSKEY:" in r.stderr
    assert "cryptobat signzone:  signing with dnskey testzone/RSASHA256/35407" in r.stderr
    assert "Zone fully signed:" in r.stderr and r.stdout.strip() == "testzone.signed"
    zone_validates(str(tmp_path / "testzone.signed"), "testzone", ksk_only=True)
    recs = _records(str(tmp_path / "testzone.signed"))
    assert {r[10] for r in recs if r[3] == "RRSIG" and r[4] == "DNSKEY"} == {"35407"}
    assert {r[10] for r in recs if r[3] == "RRSIG" and r[4] != "DNSKEY"} == {"58968"}
    exp = {r[8] for r in recs if r[3] == "RRSIG"}
    inc = {r[9] for r in recs if r[3] == "RRSIG"}
    assert len(exp) == 1 and len(inc) == 1  # no jitter: -e +300 from -s now
    assert signzone.parse_time(exp.pop(), 0, 0) - signzone.parse_time(inc.pop(), 0, 0) == 300

    # validity period too long: the token refuses, nothing is written
    os.unlink(tmp_path / "testzone.signed")
    r = _cryptobat("--home", str(home), "signzone", *SEED.replace("+300", "+3700").split(), cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (
        "cryptobat signzone: fatal: dnskey 'testzone/RSASHA256/35407' failed to sign data: "
        "RRSIG expiration time exceeds HSM policy"
    )
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["testzone"] + [f"Ktestzone.+008+{t}.{s}" for t in ("35407", "58968") for s in ("key", "private")]
    )


def test_signzone_through_the_daemon(tmp_path, monkeypatch):
    """``cryptobat serve`` holds the token; ``cryptobat signzone --hsm unix:...`` signs through it
    after logging in with the signer PIN (``--pin-file`` or ``$CRYPTOBAT_PIN``)."""
    from cryptobat.home import open_token
    rt, zf, ksks, zsks = _setup(tmp_path, [13], max_validity=7200)
    tok = open_token(rt.home)
    try:
        assert rt.open_console(tok).handle("setpin signer-pin-1") == " Signer PIN set\n"
    finally:
        tok.close()
    (tmp_path / "pin").write_text("signer-pin-1\n")
    sock = rt.home / "native.sock"
    log = open(tmp_path / "serve.log", "w")
    d = subprocess.Popen([sys.executable, "-m", "cryptobat", "--home", str(rt.home), "serve", "--no-pkcs11"],
                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert d.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, "the daemon did not create native.sock"
            time.sleep(0.05)
        args = ["signzone", "--hsm", f"unix:{sock}", "-e", "now+3600", "-o", "example.org", "-k", ksks[0], zf, zsks[0]]
        r = _cryptobat(*args, cwd=tmp_path)
        assert r.returncode == 1 and "not logged in" in r.stderr, r.stderr  # no PIN, no signatures
        r = _cryptobat(args[0], "--pin-file", str(tmp_path / "pin"), *args[1:], cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == zf + ".signed"
        zone_validates(zf + ".signed", "example.org", ksk_only=False)
        # the daemon's token enforces its policy too
        os.unlink(zf + ".signed")
        monkeypatch.setenv("CRYPTOBAT_PIN", "signer-pin-1")
        r = _cryptobat(*[a if a != "now+3600" else "now+7300" for a in args], cwd=tmp_path)
        assert r.returncode == 1
        assert r.stderr.strip().endswith("failed to sign data: RRSIG expiration time exceeds HSM policy")
        assert not os.path.exists(zf + ".signed")
    finally:
        d.terminate()
        d.wait(timeout=30)
        log.close()


def test_refusal_midway_leaves_previous_output(tmp_path, capsys):
    """A refusal in a later batch: exit 1, the existing output file untouched, no temp files."""
    n = 12000
    lines = [f"h{i} A 10.0.{i >> 8 & 255}.{i & 255}" for i in range(n)]
    text = "$TTL 300\n@ SOA ns hm 1 2 3 4 300\n@ NS ns\nns A 192.0.2.1\n" + "\n".join(lines) + "\n"
    rt, zf, ksks, zsks = _setup(tmp_path, [13], zone_text=text, max_validity=7200)
    out = tmp_path / "example.org.signed"
    out.write_text("previous\n")

    client = connect(home=rt.home)  # the real token, opened in this process
    console = rt.open_console(client.token)
    calls = []  # accept the first batch, then an officer sets a 60 s maximum
    orig = client.timed_sign

    def timed_sign(items):
        calls.append(len(items))
        if len(calls) == 2:
            assert console.handle("setmaxval 60") == " Maximum validity period set to +60 seconds\n"
        return orig(items)

    client.timed_sign = timed_sign
    try:
        assert _sign(rt, ["-e", "now+3600", "-o", "example.org", "-k", ksks[0], zf, zsks[0]], client) == 1
    finally:
        client.close()
    assert len(calls) >= 2
    err = capsys.readouterr().err
    assert "failed to sign data: RRSIG expiration time exceeds HSM policy" in err
    assert out.read_text() == "previous\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_bad_zone_names_file_and_line(tmp_path, capsys):
    bad = ZONE.replace("ns1     A       192.0.2.1", "ns1     A       192.0.2.300")
    rt, zf, ksks, zsks = _setup(tmp_path, [13], zone_text=bad)
    assert _sign(rt, ["-o", "example.org", "-k", ksks[0], zf, zsks[0]]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    line = 1 + bad.splitlines().index("ns1     A       192.0.2.300")
    assert len(err) == 1 and err[0].startswith(f"cryptobat signzone: fatal: {zf}:{line}: ")
    assert not os.path.exists(zf + ".signed")


def test_reader_matches_dnspython(tmp_path):
    """The fast reader and dnspython's zone parser see the same RRsets, TTLs and wire forms."""
    zf = tmp_path / "z"
    zf.write_text(ZONE + "$INCLUDE inc\n")
    (tmp_path / "inc").write_text("$ORIGIN sub.example.org.\nx 60 IN A 192.0.2.7\n\\@odd TXT \"a\\\"b\" ( c\n d )\n")
    origin = dns.name.from_text("example.org.")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        fast = reader.read_zone(str(zf), origin)
        ref = reader.from_dnspython(str(zf), origin)
    finally:
        os.chdir(cwd)

    def view(z):
        return {k: {t: (r.ttl, sorted(r.rdatas)) for t, r in n.rrsets.items()} for k, n in z.nodes.items()}

    assert view(fast) == view(ref)
    assert len(fast.nodes) == 19


@pytest.mark.parametrize(
    "s,base,now,want",
    [("now", 5, 100, 100), ("now+60", 5, 100, 160), ("+300", 5, 100, 305), ("1700000000", 0, 0, 1700000000),
     ("20240101000000", 0, 0, 1704067200), ("+1h", 0, 0, 3600)],
)
def test_time_syntax(s, base, now, want):
    assert signzone.parse_time(s, base, now) == want


def test_serial_methods():
    assert signzone.new_serial(5, "keep", 1700000000) == 5
    assert signzone.new_serial(0xFFFFFFFF, "increment", 0) == 1
    assert signzone.new_serial(5, "unixtime", 1700000000) == 1700000000
    assert signzone.new_serial(2023111315, "date", 1700000000) == 2023111400  # 2023-11-14 UTC
    assert signzone.new_serial(2023111415, "date", 1700000000) == 2023111416
    assert signzone.new_serial(2099010100, "date", 1700000000) == 2099010101


def test_bad_signature_fails_post_sign_verification(tmp_path, capsys):
    """A signature damaged between the token and the signer is caught before anything is written."""
    rt, zf, ksks, zsks = _setup(tmp_path, [13])
    client = connect(home=rt.home)
    orig = client.timed_sign

    def timed_sign(items):
        res = orig(items)
        sig = bytearray(res[-1].signature)
        sig[5] ^= 1
        res[-1] = type(res[-1])(signature=bytes(sig))
        return res

    client.timed_sign = timed_sign
    try:
        assert _sign(rt, ["-o", "example.org", "-k", ksks[0], zf, zsks[0]], client) == 1
        assert "fatal: post-sign verification failed" in capsys.readouterr().err
        assert not os.path.exists(zf + ".signed")
        # -P skips the verification and writes the zone
        assert _sign(rt, ["-P", "-o", "example.org", "-k", ksks[0], zf, zsks[0]], client) == 0
        assert os.path.exists(zf + ".signed")
    finally:
        client.close()
