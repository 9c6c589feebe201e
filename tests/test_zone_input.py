"""``cryptobat signzone`` on hostile and unusual zone input, through the real command.

Every run is ``python3 -m cryptobat signzone`` (:func:`support.cli`) on zone files
written here, signing with a real token made by
:func:`test_signzone_backend.make_token` (an ECDSA KSK and ZSK for example.org).
Each run is capped at 4 GB of address space and a timeout, so that unbounded
reading fails the test instead of the machine.  A bad zone ends the run with one
line, ``cryptobat signzone: fatal: FILE:LINE: message``, exit status 1, and
neither an output file nor a temporary file left behind.
"""
from __future__ import annotations

import fcntl
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import dns.zone
import pytest

from support import cli, zone_token, zone_validates

LIMIT = ["prlimit", "--as=4294967296", "--"]
BASE = """\
$TTL 300
@       SOA     ns hostmaster 1 7200 3600 1209600 300
        NS      ns
ns      A       192.0.2.1
"""
N_BASE = BASE.count("\n")


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    d = tmp_path_factory.mktemp("zone_input")
    return zone_token(d / "home", "example.org.", d, algs=[13])


def _sign(rt, zf, *extra, out=None, timeout=120) -> subprocess.CompletedProcess:
    out = out or str(zf) + ".signed"
    return cli("signzone", "-o", "example.org", "-f", out, *extra, "-k", rt.keys[(13, "ksk")], str(zf),
               rt.keys[(13, "zsk")], home=rt.home, prefix=LIMIT, timeout=timeout)


def _zone(path: Path, tail: bytes | str) -> Path:
    path.write_bytes(BASE.encode() + (tail.encode() if isinstance(tail, str) else tail))
    return path


def _temps(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".tmp"))


def _refused(r, zf, where: str, *fragments: str) -> str:
    """Exit 1, one ``fatal: WHERE: ...`` line naming the file and line, no output or temp file."""
    err = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(err) == 1, (r.returncode, r.stderr[-3000:])
    assert err[0].startswith(f"cryptobat signzone: fatal: {where}: "), err
    for f in fragments:
        assert f in err[0], err
    assert not os.path.exists(str(zf) + ".signed")
    assert _temps(Path(zf).parent) == []
    return err[0]


# ---------------------------------------------------------------- $INCLUDE and input bounds


@pytest.mark.parametrize("kind", ["dev-zero", "fifo", "directory", "missing"])
def test_include_of_a_non_regular_file_is_refused(rt, tmp_path, kind):
    """Only regular files are read: /dev/zero (read for ever before), a FIFO without a writer
    (its open blocked for ever), a directory, a missing file: FILE:LINE of the $INCLUDE."""
    target, why = {
        "dev-zero": ("/dev/zero", "not a regular file (a character device)"),
        "fifo": (str(tmp_path / "fifo"), "not a regular file (a FIFO)"),
        "directory": (str(tmp_path / "sub"), "not a regular file (a directory)"),
        "missing": (str(tmp_path / "missing"), "No such file or directory"),
    }[kind]
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "directory":
        os.mkdir(target)
    zf = _zone(tmp_path / "example.org", f"www A 192.0.2.80\n$INCLUDE {target}\n")
    _refused(_sign(rt, zf, timeout=60), zf, f"{zf}:{N_BASE + 2}", f"$INCLUDE {target}: {why}")


def test_zone_file_itself_must_be_regular(rt, tmp_path):
    fifo = tmp_path / "example.org"
    os.mkfifo(fifo)
    r = _sign(rt, fifo, timeout=60)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"cryptobat signzone: fatal: {fifo}: not a regular file (a FIFO)"], r.stderr


def test_include_loop_and_depth(rt, tmp_path):
    # a loop through a second file: refused where it closes, not after 20 levels
    zf = _zone(tmp_path / "example.org", f"$INCLUDE {tmp_path}/loop\n")
    (tmp_path / "loop").write_text(f"a A 192.0.2.2\n$INCLUDE {zf}\n")
    _refused(_sign(rt, zf), zf, f"{tmp_path}/loop:2", f"$INCLUDE {zf}: an $INCLUDE loop")

    # a chain of 20 nested $INCLUDEs is read; the 21st level is refused
    def chain(levels: int) -> None:
        for i in range(levels):
            last = i == levels - 1
            (tmp_path / f"d{i}").write_text(f"n{i} A 192.0.2.3\n" + ("" if last else f"$INCLUDE {tmp_path}/d{i + 1}\n"))

    zf = _zone(tmp_path / "example.org", f"$INCLUDE {tmp_path}/d0\n")
    chain(20)
    r = _sign(rt, zf)
    assert r.returncode == 0, r.stderr
    names = {line.split()[0] for line in open(str(zf) + ".signed")}
    assert {f"n{i}.example.org." for i in range(20)} <= names
    os.unlink(str(zf) + ".signed")
    chain(21)
    _refused(_sign(rt, zf), zf, f"{tmp_path}/d19:2", f"$INCLUDE {tmp_path}/d20: $INCLUDE nested more than 20 deep")


def test_line_and_record_length_are_bounded(rt, tmp_path):
    # a comment line of 70,000 bytes: over the 64 KiB a line may hold
    zf = _zone(tmp_path / "example.org", "www A 192.0.2.80\n;" + "x" * 70000 + "\nmail A 192.0.2.25\n")
    _refused(_sign(rt, zf), zf, f"{zf}:{N_BASE + 2}", "line longer than 65536 bytes")
    # an included file of 3 MB without a newline
    (tmp_path / "blob").write_bytes(b"a" * 3_000_000)
    zf = _zone(tmp_path / "example.org", f"$INCLUDE {tmp_path}/blob\n")
    _refused(_sign(rt, zf), zf, f"{tmp_path}/blob:1", "line longer than 65536 bytes")
    # an unclosed parenthesis swallowing the rest of a large file: one record of over 1 MiB
    zf = _zone(tmp_path / "example.org", "txt TXT ( \"open\"\n" + "".join(f'"{i:0250d}"\n' for i in range(5000)))
    _refused(_sign(rt, zf), zf, f"{zf}:{N_BASE + 1}", "record longer than 1048576 characters (unbalanced parentheses?)")


def test_total_input_is_bounded(rt, tmp_path):
    """$INCLUDE fan-out (each level includes the next twice: 2 GiB of reading from 1 MB files)
    and a $GENERATE of 2^31 records both stop at 1 GiB of input, with the file and line."""
    leaf = tmp_path / "leaf"
    leaf.write_text(("; " + "c" * 1022 + "\n") * 1024)  # 1 MiB of comments
    for i in range(11):
        nxt = tmp_path / (f"fan{i + 1}" if i < 10 else "leaf")
        (tmp_path / f"fan{i}").write_text(f"$INCLUDE {nxt}\n$INCLUDE {nxt}\n")
    zf = _zone(tmp_path / "example.org", f"$INCLUDE {tmp_path}/fan0\n")
    err = _refused(_sign(rt, zf, timeout=300), zf, f"{leaf}:1", "the zone input exceeds 1073741824 bytes")
    assert "$INCLUDEs" in err

    zf = _zone(tmp_path / "example.org", "$GENERATE 0-2147483647 h$ A 192.0.2.1\n")
    _refused(_sign(rt, zf, timeout=120), zf, f"{zf}:{N_BASE + 1}",
             "the zone input exceeds 1073741824 bytes (this $GENERATE makes 2147483648 records)")


def test_generate_is_read_with_the_same_checks(rt, tmp_path):
    """$GENERATE lines are expanded in place (no longer by re-reading the whole zone with
    dnspython, which followed $INCLUDE without any bound); their records are checked as any."""
    zf = _zone(tmp_path / "example.org",
               "$GENERATE 1-3 h$ 77 A 10.0.0.$\nq A 192.0.2.9\n$GENERATE 1-2 r$ PTR h$.example.org.\n")
    r = _sign(rt, zf)
    assert r.returncode == 0, r.stderr
    recs = {tuple(line.split()) for line in open(str(zf) + ".signed")}
    assert {("h2.example.org.", "77", "IN", "A", "10.0.0.2"), ("q.example.org.", "300", "IN", "A", "192.0.2.9"),
            ("r1.example.org.", "300", "IN", "PTR", "h1.example.org.")} <= recs
    zone_validates(str(zf) + ".signed", "example.org", ksk_only=True)
    os.unlink(str(zf) + ".signed")
    zf = _zone(tmp_path / "example.org", "$GENERATE 1-3 h$ OPT x\n")
    _refused(_sign(rt, zf), zf, f"{zf}:{N_BASE + 1}", "invalid use of a meta type: OPT")
    zf = _zone(tmp_path / "example.org", f"$GENERATE 1-2 h$ A 10.0.0.$\n$INCLUDE /dev/zero\n")
    _refused(_sign(rt, zf), zf, f"{zf}:{N_BASE + 2}", "not a regular file")


# ---------------------------------------------------------------- RDATA length


def _txt(octets: int) -> str:
    """A TXT record of exactly ``octets`` octets of RDATA, over several lines."""
    full, rest = divmod(octets, 256)
    strings = ['"' + "a" * 255 + '"'] * full + (['"' + "b" * (rest - 1) + '"'] if rest else [])
    return "x TXT (\n" + "\n".join(strings) + " )\n"


def test_rdata_too_long_for_the_wire(rt, tmp_path):
    """RDATA longer than a DNS message can hold is FILE:LINE (it was a traceback, OverflowError,
    over 65535 octets): TXT over several lines, or any type in the generic \\# form."""
    zf = _zone(tmp_path / "example.org", "www A 192.0.2.80\n" + _txt(300 * 256))
    _refused(_sign(rt, zf), zf, f"{zf}:{N_BASE + 2}", "RDATA of 76800 octets is too long for a DNS message")
    zf = _zone(tmp_path / "example.org", _txt(65535))
    _refused(_sign(rt, zf), zf, f"{zf}:{N_BASE + 1}",
             "RDATA of 65535 octets is too long for a DNS message (at most 65498 with this owner name)")
    hexdata = "00" * 65536
    zf = _zone(tmp_path / "example.org",
               "y TYPE65000 \\# 65536 (\n" + "\n".join(hexdata[i:i + 1024] for i in range(0, len(hexdata), 1024)) + " )\n")
    _refused(_sign(rt, zf), zf, f"{zf}:{N_BASE + 1}", "RDATA of 65536 octets is too long for a DNS message")

    # the longest that fits: 65535 - 12 (header) - 15 (x.example.org.) - 10 octets; BIND and
    # Knot validate it (ldns-verify-zone cannot: it cuts presentation lines at ~65,535
    # characters, as ldns-read-zone shows, whoever wrote the zone)
    zf = _zone(tmp_path / "example.org", _txt(65498))
    r = _sign(rt, zf)
    assert r.returncode == 0, r.stderr
    out = str(zf) + ".signed"
    for cmd in (["dnssec-verify", "-x", "-o", "example.org", out], ["kzonecheck", "-d", "on", "-o", "example.org", out]):
        v = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert v.returncode == 0, f"{cmd}: {v.stdout}{v.stderr}"
    z = dns.zone.from_file(out, origin="example.org.", relativize=False, check_origin=False)
    assert len(z.find_rdataset("x.example.org.", "TXT")[0].to_wire()) == 65498


# ---------------------------------------------------------------- octets in names


def _bind_records(zf: Path) -> set[tuple[str, ...]]:
    """The zone's records as BIND's named-checkzone reads them (-D: dump)."""
    r = subprocess.run(["named-checkzone", "-k", "ignore", "-D", "-o", "-", "example.org", str(zf)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return {tuple(line.split()) for line in r.stdout.splitlines() if line.strip()}


def test_raw_octets_in_names_are_octets_as_in_bind(rt, tmp_path):
    """Raw control and non-ASCII octets in names are the octets themselves, as BIND reads them
    (named-checkzone: ``caf\\xe9`` -> ``caf\\233``), written as \\DDD escapes (they were written
    raw, or turned into IDNA punycode); the output passes dnssec-verify, ldns-verify-zone
    and kzonecheck."""
    tail = (b"a\x01b A 192.0.2.10\n"          # control octet in an owner name
            b"del\x7f A 192.0.2.11\n"         # DEL
            b"vt\x0btab A 192.0.2.12\n"       # vertical tab: not a blank to BIND
            b"caf\xe9 A 192.0.2.13\n"         # latin-1
            b"utf\xc3\xa9 A 192.0.2.14\n"     # UTF-8 is two octets, not IDNA
            b"mx MX 10 ma\xefl\n"             # in an RDATA name
            b"t TXT \"caf\xe9\" x\x02y\n"      # in character-strings
            b"esc\\\xe9 A 192.0.2.15\n")      # escaped raw octet: the octet
    zf = _zone(tmp_path / "example.org", tail)
    r = _sign(rt, zf, "-x")
    assert r.returncode == 0, r.stderr
    out = str(zf) + ".signed"
    text = open(out, "rb").read()
    assert all(32 <= c < 127 or c in b"\t\n" for c in text), "raw octets in the output"
    assert b"xn--" not in text
    zone_validates(out, "example.org", ksk_only=True)

    ours = {tuple(line.split()) for line in text.decode().splitlines()
            if line.split()[3] not in ("RRSIG", "NSEC", "DNSKEY")}
    assert ours == _bind_records(zf)
    owners = {r[0] for r in ours}
    assert {"a\\001b.example.org.", "del\\127.example.org.", "vt\\011tab.example.org.", "caf\\233.example.org.",
            "utf\\195\\169.example.org.", "esc\\233.example.org."} <= owners
    assert ("mx.example.org.", "300", "IN", "MX", "10", "ma\\239l.example.org.") in ours
    assert ("t.example.org.", "300", "IN", "TXT", '"caf\\233"', '"x\\002y"') in ours


def test_nul_octet_is_refused(rt, tmp_path):
    """A raw NUL is refused with FILE:LINE, as BIND refuses it (\\000 is the way to write it)."""
    zf = _zone(tmp_path / "example.org", b"www A 192.0.2.80\na\x00b A 192.0.2.10\n")
    _refused(_sign(rt, zf), zf, f"{zf}:{N_BASE + 2}", "NUL octet in the zone file")
    zf = _zone(tmp_path / "example.org", b"a\\000b A 192.0.2.10\n")
    r = _sign(rt, zf)
    assert r.returncode == 0, r.stderr
    assert "a\\000b.example.org.\t300\tIN\tA\t192.0.2.10\n" in open(str(zf) + ".signed").read()
    zone_validates(str(zf) + ".signed", "example.org", ksk_only=True)


# ---------------------------------------------------------------- types


@pytest.mark.parametrize("rtype", ["TYPE0", "OPT", "TSIG", "TKEY", "IXFR", "AXFR", "MAILB", "MAILA", "ANY", "TYPE128"])
def test_meta_types_refused_with_file_and_line(rt, tmp_path, rtype):
    """Meta types are refused while reading, with FILE:LINE, as BIND refuses them
    ("invalid use of a meta type"); TYPE0 and OPT used to fail only at signing time."""
    zf = _zone(tmp_path / "example.org", f"www A 192.0.2.80\nx IN {rtype} \\# 0\n")
    _refused(_sign(rt, zf), zf, f"{zf}:{N_BASE + 2}", f"invalid use of a meta type: {rtype}")


def test_resigning_a_signed_zone(rt, tmp_path):
    """RRSIG, NSEC, NSEC3 and NSEC3PARAM in the input are dropped and re-made; names that held
    nothing else (the old NSEC3 owners) go with them: re-signing with another salt or with
    NSEC works (it failed: "NSEC3 owner ... is already in the zone", or NSECs for them)."""
    zf = _zone(tmp_path / "example.org", "www A 192.0.2.80\nsub NS ns.example.net.\n")
    first = tmp_path / "first"
    assert _sign(rt, zf, "-3", "ab", out=str(first)).returncode == 0
    hashed = {line.split()[0] for line in open(first) if line.split()[3] == "NSEC3"}
    assert len(hashed) == 4
    for mode, out in ((["-3", "cd", "-H", "1"], tmp_path / "nsec3"), ([], tmp_path / "nsec")):
        r = _sign(rt, first, *mode, out=str(out))
        assert r.returncode == 0, r.stderr
        zone_validates(str(out), "example.org", ksk_only=True)
        owners = {line.split()[0] for line in open(out)}
        assert not owners & hashed
        assert "www.example.org." in owners


# ---------------------------------------------------------------- temporary output files


def _zone_of(n: int) -> str:
    return BASE + "".join(f"h{i} A 10.0.{i >> 8 & 255}.{i & 255}\n" for i in range(n))


def test_killed_run_leaves_no_stale_temp_for_long(rt, tmp_path):
    """kill -9 while writing leaves ``.NAME.XXXXXXXX.tmp``; the next run writing NAME removes it
    (its writer's flock is gone) and writes a valid zone."""
    zf = tmp_path / "example.org"
    zf.write_text(_zone_of(5000))
    out = tmp_path / "example.org.signed"
    cmd = [sys.executable, "-m", "cryptobat", "--home", str(rt.home), "signzone", "-o", "example.org", "-f", str(out),
           "-k", rt.keys[(13, "ksk")], str(zf), rt.keys[(13, "zsk")]]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not _temps(tmp_path):
            assert p.poll() is None, f"finished before its temporary file was seen: {p.stderr.read()}"
            assert time.monotonic() < deadline
            time.sleep(0.001)
        os.kill(p.pid, signal.SIGKILL)  # only the signer itself: any helper it started may live on
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stderr.close()
    stale = _temps(tmp_path)
    assert len(stale) == 1 and re.fullmatch(r"\.example\.org\.signed\.[a-z0-9_]{8}\.tmp", stale[0]), stale
    assert not out.exists()
    try:
        r = _sign(rt, zf, out=str(out))
        assert r.returncode == 0, r.stderr
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # what is left of the killed run's process group
        except ProcessLookupError:
            pass
    assert _temps(tmp_path) == []
    zone_validates(str(out), "example.org", ksk_only=True)


def test_only_our_stale_temps_are_removed(rt, tmp_path):
    """A temporary file whose writer still holds its lock is left alone, as are files of other
    names; an unlocked one of the exact pattern for this output is removed."""
    zf = _zone(tmp_path / "example.org", "www A 192.0.2.80\n")
    out = tmp_path / "example.org.signed"
    stale = tmp_path / ".example.org.signed.abcd1234.tmp"
    live = tmp_path / ".example.org.signed.live0001.tmp"
    others = [tmp_path / n for n in (".example.org.signed.abc.tmp", ".example.org.signed.abcd12345.tmp",
                                     ".other.signed.abcd1234.tmp", "example.org.signed.abcd1234.tmp",
                                     ".example.org.signed.ABCD1234.tmp")]
    for p in [stale, live, *others]:
        p.write_bytes(b"x" * 1000)
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        r = _sign(rt, zf, out=str(out))
        assert r.returncode == 0, r.stderr
        assert live.exists() and not stale.exists()
        assert all(p.exists() for p in others)
    finally:
        os.close(fd)
    zone_validates(str(out), "example.org", ksk_only=True)


def test_a_prepared_zone_is_frozen_while_it_lives(tmp_path):
    """prepare() builds the zone without the cycle collector and freezes it (no full collection
    walks it during the run); the collector is back on, and everything unfrozen, once it goes."""
    import gc

    import dns.name

    from cryptobat.zonesign.prepare import ChainSpec, prepare
    zone = tmp_path / "testzone"
    zone.write_text("$TTL 300\n$ORIGIN testzone.\n@ SOA ns1 hostmaster 1 7200 3600 1209600 300\n@ NS ns1\n"
                    "ns1 A 192.0.2.1\n")
    gc.unfreeze()
    prep = prepare(str(zone), dns.name.from_text("testzone."), ChainSpec(None), [], "keep", 0)
    assert gc.isenabled() and gc.get_freeze_count() > 0
    assert prep.auth == [("testzone",), ("testzone", "ns1")]
    del prep
    assert gc.get_freeze_count() == 0
