"""``cryptobat signzone --zones``: many zones in one run of the real command on a real token.

The token is made as officers make one (:func:`support.make_token`, keys per zone);
signed zones are checked by BIND's ``dnssec-verify`` (a missing tool fails the test).
"""
from __future__ import annotations

import os
import pty
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from support import MONTH, PIN_TEXT, Daemon, cli, make_token, need, zone_token

SUMMARY = re.compile(r"^signzone: (\d+) zones signed, (\d+) failed, (\d+) signatures, [\d.]+ s$")


def zone_text(origin: str, names: int = 50, serial: int = 2024010101) -> str:
    """A small zone of ``names`` names: A records, a TXT every fourth, a delegation every tenth."""
    lines = [f"$TTL 3600\n$ORIGIN {origin}.\n@ IN SOA ns1 hostmaster {serial} 7200 3600 1209600 300\n",
             "@ NS ns1\nns1 A 192.0.2.1\n"]
    for i in range(names):
        lines.append(f"h{i} A 10.0.{i >> 8}.{i & 255}\n")
        if i % 4 == 0:
            lines.append(f'h{i} TXT "record {i}"\n')
        if i % 10 == 0:
            lines.append(f"d{i} NS ns.d{i}\nns.d{i} A 172.16.{i >> 8}.{i & 255}\n")
    return "".join(lines)


def fleet_token(home: Path, zones: list[str], maxval: int = MONTH, **settings):
    """A quorum-1 token with a KSK and a ZSK (ECDSA P-256) for each of ``zones``."""
    return make_token(home, quorum=1, maxval=maxval, keys=[f"13 {role} {z}" for z in zones for role in ("ksk", "zsk")],
                      **settings)


def verify(path: Path, origin: str) -> None:
    tool = need("dnssec-verify", "bind9-utils")
    r = subprocess.run([tool, "-x", "-o", origin, str(path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"dnssec-verify {path}:\n{r.stdout}\n{r.stderr}"


def summary(stderr: str) -> tuple[int, int, int]:
    last = stderr.strip().splitlines()[-1]
    m = SUMMARY.match(last)
    assert m, stderr
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def temps(d: Path) -> list[str]:
    return sorted(n for n in os.listdir(d) if n.endswith(".tmp"))


def test_directory_of_zones(tmp_path):
    zones = [f"z{i}.example" for i in range(20)]
    fleet_token(tmp_path / "home", zones)
    d = tmp_path / "zones"
    d.mkdir()
    for i, z in enumerate(zones):  # ORIGIN.zone, and a few named ORIGIN
        (d / (z if i % 5 == 0 else z + ".zone")).write_text(zone_text(z))
    # not zones: an old output, a hidden file, an editor's backup, a key file, a stale temporary file
    for junk in ("z1.example.zone.signed", ".z2.example.zone", "z3.example.zone~", "Kz4.example.+013+00001.key",
                 ".z5.example.zone.signed.abcd1234.tmp"):
        (d / junk).write_text("not a zone\n")
    r = cli("signzone", "--zones", str(d), "-P", home=tmp_path / "home", timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    assert r.stderr.count("\n") == 1, r.stderr  # a non-terminal gets the summary and nothing else
    signed, failed, nsigs = summary(r.stderr)
    assert (signed, failed) == (20, 0) and nsigs > 20 * 100
    for i, z in enumerate(zones):
        out = d / ((z if i % 5 == 0 else z + ".zone") + ".signed")
        assert out.exists(), out
    for i in (0, 7, 19):
        verify(d / ((zones[i] if i % 5 == 0 else zones[i] + ".zone") + ".signed"), zones[i])
    assert (d / "z1.example.zone.signed").read_text().startswith("z1.example.\t")  # the old output replaced
    assert temps(d) == [".z5.example.zone.signed.abcd1234.tmp"]  # not ours to remove: another name's


def test_list_file_with_options_per_zone(tmp_path):
    zones = ["a.example", "b.example", "c.example"]
    fleet_token(tmp_path / "home", zones)
    d = tmp_path / "list"
    (d / "src").mkdir(parents=True)
    (tmp_path / "out").mkdir()
    for z in zones:
        (d / "src" / f"{z}.db").write_text(zone_text(z, names=20))
    (d / "zones.list").write_text(
        "# hoster's zones\n"
        "\n"
        "-o a.example -3 abcd -H 0 src/a.example.db   # NSEC3\n"
        "-o b.example -N unixtime -f ../out/b.signed src/b.example.db\n"
        "-o c.example 'src/c.example.db'\n")
    r = cli("signzone", "--zones", str(d / "zones.list"), "-N", "increment", "-v", home=tmp_path / "home",
            timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 4 and summary(r.stderr)[:2] == (3, 0), r.stderr
    assert {l.split(":")[0] for l in lines[:3]} == set(zones)  # -v: a line per zone
    a, b, c = d / "src/a.example.db.signed", tmp_path / "out/b.signed", d / "src/c.example.db.signed"
    for path, z in ((a, "a.example"), (b, "b.example"), (c, "c.example")):
        verify(path, z)

    def soa_serial(path: Path) -> int:
        rec = next(line.split() for line in path.read_text().splitlines() if line.split()[3:4] == ["SOA"])
        return int(rec[6])

    assert "NSEC3" in a.read_text() and "\tNSEC\t" not in a.read_text()
    assert "\tNSEC\t" in c.read_text() and "NSEC3" not in c.read_text()
    assert soa_serial(a) == soa_serial(c) == 2024010102  # -N increment from the command line
    assert soa_serial(b) > 1_700_000_000  # its own -N unixtime


def test_failures_are_isolated(tmp_path):
    """A syntax error, a refusal (-e beyond the maximum validity) and a missing file: three zones
    fail, each with one line; the good ones are signed and valid; nothing is left of the bad ones."""
    zones = ["good1.example", "good2.example", "broken.example", "refused.example", "missing.example"]
    fleet_token(tmp_path / "home", zones)
    d = tmp_path / "z"
    d.mkdir()
    for z in zones[:4]:
        (d / f"{z}.zone").write_text(zone_text(z))
    (d / "broken.example.zone").write_text(zone_text("broken.example") + "h7 A 300.1.2.3\n")
    (d / "list").write_text("".join(f"-o {z} {z}.zone\n" for z in zones[:3])
                            + "-o refused.example -e +400d refused.example.zone\n"
                            + "-o missing.example missing.example.zone\n")
    r = cli("signzone", "--zones", str(d / "list"), "-P", home=tmp_path / "home", timeout=300)
    assert r.returncode == 3, r.stderr
    lines = r.stderr.strip().splitlines()
    assert summary(r.stderr)[:2] == (2, 3)
    errors = {l.split(":", 1)[0]: l for l in lines[:-1]}
    assert len(lines) == 4 and set(errors) == {"broken.example", "refused.example", "missing.example"}, r.stderr
    assert "300.1.2.3" in errors["broken.example"] and ":" in errors["broken.example"]
    assert "validity" in errors["refused.example"] or "expiration" in errors["refused.example"], errors
    assert "missing.example.zone" in errors["missing.example"]
    for z in zones[:2]:
        verify(d / f"{z}.zone.signed", z)
    for z in zones[2:]:
        assert not (d / f"{z}.zone.signed").exists()
    assert temps(d) == []


def test_zone_without_keys_in_the_token(tmp_path):
    zt = zone_token(tmp_path / "home", "keyed.example", tmp_path)
    d = tmp_path / "zones"
    d.mkdir()
    for z in ("keyed.example", "unkeyed.example"):
        (d / f"{z}.zone").write_text(zone_text(z))
    r = cli("signzone", "--zones", str(d), "-P", home=zt.home, timeout=300)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0] == "unkeyed.example: no keys for zone unkeyed.example. in the token", r.stderr
    assert summary(r.stderr)[:2] == (1, 1)
    verify(d / "keyed.example.zone.signed", "keyed.example")
    assert not (d / "unkeyed.example.zone.signed").exists() and temps(d) == []


def test_usage_errors(tmp_path):
    zt = zone_token(tmp_path / "home", "x.example", tmp_path)
    r = cli("signzone", "--zones", str(tmp_path / "nowhere"), home=zt.home)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines()[-1].endswith(f"--zones {tmp_path / 'nowhere'}: cannot read it: "
                                                      "No such file or directory"), r.stderr
    r = cli("signzone", "--zones", str(tmp_path), "-o", "x.example", home=zt.home)
    assert r.returncode == 2 and "per zone in a list file" in r.stderr
    r = cli("signzone", "--zones", str(tmp_path), "extra.zone", home=zt.home)
    assert r.returncode == 2 and "unrecognized arguments" in r.stderr


def test_bad_list_lines_fail_their_zone_only(tmp_path):
    fleet_token(tmp_path / "home", ["ok.example"])
    (tmp_path / "ok.example.zone").write_text(zone_text("ok.example"))
    (tmp_path / "list").write_text("-o ok.example ok.example.zone\n"
                                   "-N sometimes x.zone\n"
                                   "--home /elsewhere x.zone\n"
                                   "'unterminated\n"
                                   "-f - x.zone\n"
                                   "-o ok.example -e yesterday -f other.signed ok.example.zone\n")
    r = cli("signzone", "--zones", str(tmp_path / "list"), "-P", home=tmp_path / "home", timeout=300)
    assert r.returncode == 5, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 6 and summary(r.stderr)[:2] == (1, 5), r.stderr
    assert lines[0].startswith(f"{tmp_path / 'list'}:2: argument -N: invalid choice")
    assert lines[1].startswith(f"{tmp_path / 'list'}:3: ") and "command line" in lines[1]
    assert lines[2].startswith(f"{tmp_path / 'list'}:4: ") and "quotation" in lines[2]
    assert lines[3].startswith(f"{tmp_path / 'list'}:5: ") and "standard output" in lines[3]
    assert lines[4] == "ok.example: invalid time 'yesterday' (YYYYMMDDHHMMSS, epoch, +N, now or now+N)", lines[4]
    verify(tmp_path / "ok.example.zone.signed", "ok.example")
    assert not (tmp_path / "other.signed").exists()


def _session(pid: int) -> set[int]:
    """Processes of the session ``pid`` leads (its process group and every child's)."""
    out = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[3]) == pid and fields[0] != "Z":  # session id
                out.add(int(d))
    return out


def _left(pid: int, timeout: float = 10) -> set[int]:
    """The session's processes still there after ``timeout`` seconds (the kernel kills orphans
    asynchronously)."""
    deadline = time.monotonic() + timeout
    while (left := _session(pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def _start(home: Path, d: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cryptobat", "--home", str(home), "signzone", "--zones", str(d),
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def test_nothing_left_running_and_kill_leaves_no_half_output(tmp_path):
    """Enough zones that the token's signing workers start: none of its processes outlives the
    run, and a run killed with SIGKILL leaves whole outputs only (and the temporary files the
    next run removes)."""
    zones = [f"k{i}.example" for i in range(120)]
    fleet_token(tmp_path / "home", zones)
    d = tmp_path / "zones"
    d.mkdir()
    for z in zones:
        (d / f"{z}.zone").write_text(zone_text(z, names=100))
    p = _start(tmp_path / "home", d)  # with verification: its processes too
    seen: set[int] = set()
    while p.poll() is None:
        seen |= _session(p.pid) - {p.pid}
        time.sleep(0.05)
    out, err = p.communicate()
    assert p.returncode == 0, err
    assert len(seen) >= 2 * (os.cpu_count() or 2), f"signing workers and verifiers never started: {seen}"
    assert _left(p.pid) == set(), "processes left behind"
    verify(d / "k42.example.zone.signed", "k42.example")

    for f in d.glob("*.signed"):
        f.unlink()
    p = _start(tmp_path / "home", d)
    deadline = time.monotonic() + 120
    while len(list(d.glob("*.signed"))) < 10 and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.01)
    os.killpg(p.pid, signal.SIGKILL)
    p.communicate()
    time.sleep(0.2)
    done = sorted(d.glob("*.signed"))
    assert 10 <= len(done) < len(zones), len(done)
    for f in done:  # each output there is whole
        verify(f, f.name[: -len(".zone.signed")])
    assert _left(p.pid) == set(), "processes left behind by the killed run"
    r = cli("signzone", "--zones", str(d), "-P", home=tmp_path / "home", timeout=300)
    assert r.returncode == 0, r.stderr
    assert temps(d) == []  # the killed run's temporary files are removed by the next run
    assert len(list(d.glob("*.signed"))) == len(zones)


def test_progress_on_a_terminal(tmp_path):
    zones = [f"p{i}.example" for i in range(6)]
    fleet_token(tmp_path / "home", zones)
    d = tmp_path / "zones"
    d.mkdir()
    for z in zones:
        (d / f"{z}.zone").write_text(zone_text(z))
    (d / "zz.bad.zone").write_text("garbage\n")
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "cryptobat", "--home", str(tmp_path / "home"), "signzone",
                          "--zones", str(d), "-P"], stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    p.wait(timeout=120)
    os.close(master)
    text = b"".join(chunks).decode()
    assert p.returncode == 1, text
    assert "zones 7/7, 1 failed, " in text and " signatures" in text
    assert "zz.bad: " in text and "\r\x1b[K" in text
    assert re.search(r"signzone: 6 zones signed, 1 failed, \d+ signatures, [\d.]+ s\r?\n", text), text


def test_token_failure_stops_the_run(tmp_path):
    """Through the daemon: zones are signed until the daemon dies; then the run stops (exit 101)
    with one fatal line, and what was written is whole."""
    zones = [f"d{i}.example" for i in range(300)]
    home = tmp_path / "home"
    codes = fleet_token(home, zones, pin=PIN_TEXT)
    d = tmp_path / "zones"
    d.mkdir()
    for z in zones:
        (d / f"{z}.zone").write_text(zone_text(z, names=100))
    daemon = Daemon(home, "--no-pkcs11", codes=codes)
    try:
        p = subprocess.Popen([sys.executable, "-m", "cryptobat", "signzone", "--hsm", f"unix:{home / 'native.sock'}",
                              "--zones", str(d), "-P"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "CRYPTOBAT_PIN": PIN_TEXT})
        deadline = time.monotonic() + 120
        while len(list(d.glob("*.signed"))) < 5 and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.01)
        daemon.kill()
        out, err = p.communicate(timeout=120)
    finally:
        daemon.kill()
    assert p.returncode == 101, err
    lines = err.strip().splitlines()
    assert sum(1 for l in lines if l.startswith("cryptobat signzone: fatal: ") and l.endswith("; the run stops")) == 1, err
    signed, failed, _ = summary(err)
    done = sorted(d.glob("*.signed"))
    assert 5 <= signed == len(done) < len(zones) and failed >= 1, err
    assert signed + failed < len(zones)  # zones after the failure are not started
    for f in done[:3]:
        verify(f, f.name[: -len(".zone.signed")])
    assert temps(d) == []


def test_outdir_and_an_unwritable_output(tmp_path):
    fleet_token(tmp_path / "home", ["a.example", "b.example"])
    out = tmp_path / "out"
    out.mkdir()
    for z in ("a.example", "b.example"):
        (tmp_path / f"{z}.zone").write_text(zone_text(z, names=10))
    (tmp_path / "list").write_text("a.example.zone\n-f nodir/b.signed b.example.zone\n")
    r = cli("signzone", "--zones", str(tmp_path / "list"), "--outdir", str(out), home=tmp_path / "home", timeout=300)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("b.example: cannot create a temporary file in "), r.stderr
    assert os.listdir(out) == ["a.example.zone.signed"]
    verify(out / "a.example.zone.signed", "a.example")
    assert not (tmp_path / "nodir").exists() and not (tmp_path / "a.example.zone.signed").exists()
    r = cli("signzone", "--zones", str(tmp_path / "list"), "--outdir", str(tmp_path / "nowhere"), home=tmp_path / "home")
    assert r.returncode == 2 and "--outdir" in r.stderr and "not a directory" in r.stderr
