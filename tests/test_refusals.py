"""Refusals an operator can see: audited with their reason, counted per key and reason in
``status``, streamed by ``cryptobat audit --follow``, logged to syslog; and a host sending
refused requests as fast as it can adds a bounded number of audit entries.

Clients are the stock p11-kit-client.so (python-pkcs11 in a subprocess, pkcs11-tool); syslog
is a real Unix datagram socket the test reads, standing in for /dev/log.
"""
from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from cryptobat import policy, tally
from support import PIN, Daemon, cli, payload, client_module, need_root, setup_home, tool

KEYS = (("8", "k8"), ("13", "k13"))
KEYGEN_REFUSED = "p11-keygen: no PKCS#11 key management window open"
KEYDEL_REFUSED = "p11-keydel: no PKCS#11 key management window open"


# --- the tally, on a token in this process ------------------------------------------------------

def test_refusals_by_key_and_reason_are_bounded_per_entry_and_in_total(ready):
    before = ready.audit_seq()
    ready.timed_sign([(f"nokey{i}", b"x") for i in range(100)] + [("zsk13", b"x")] * 5)
    ready.flush_audit(force=True)
    assert ready.audit_seq() == before + 1
    entry = json.loads(ready.audit_tail(1)[0])
    assert entry["event"] == "refused-sign" and entry["refusals"] == 105
    pairs = {(k, why): n for k, why, n in entry["refused"]}
    assert len(pairs) <= tally.MAX_KEYED + 1
    assert sum(pairs.values()) == 105
    # labels no key has are the client's inventions: counted under no key, by the reason's kind
    assert ready.counters()["refused"][tally.NO_KEY] == {"no key labelled '…'": 100}
    zsk13 = ready.key("zsk13")
    tags = [t for t in range(1000, 1040) if t != zsk13.keytag]
    for _ in range(20):  # ever-new labels and key tags: the cumulative counters stay bounded too
        ready.timed_sign([(os.urandom(8).hex(), b"x") for _ in range(100)])
        ready.timed_sign([("zsk13", payload(zsk13, tag=t, now=ready.now())) for t in tags])
        ready.flush_audit(force=True)
    total = ready.counters()["refused"]
    assert sum(len(v) for v in total.values()) <= tally.MAX_TOTAL + 1
    n = 2105 + 20 * len(tags)
    assert sum(n for v in total.values() for n in v.values()) == n
    assert ready.counters()["refusals"] == n
    # a real key's refusals keep rows of their own, never pushed into "other reasons"
    assert total["zsk13"]["key tag # does not match key #"] == 20 * len(tags)
    assert tally.ANY_KEY not in total


def test_refused_key_management_is_audited_at_once_then_aggregated(ready):
    """The first refused key generation or deletion of a second has an entry of its own, with its
    reason; a client repeating it adds counts, not entries."""
    from cryptobat.errors import KeygenRefused, NotPermitted
    before = ready.audit_seq()
    for i in range(300):
        with pytest.raises(KeygenRefused):
            ready.generate_key(13, "csk", "", f"gen{i % 3}")
        with pytest.raises(NotPermitted):
            ready.delete_key("zsk13")
    ready.flush_audit(force=True)
    entries = [json.loads(e) for e in ready.audit_tail(ready.audit_seq() - before)]
    assert len(entries) <= 4, entries  # a run this short spans a second or two
    first = entries[0]
    assert first["event"] == "refused" and first["command"] == "p11-keygen" and first["label"] == "gen0"
    assert first["why"] == "no PKCS#11 key management window open"
    total = ready.counters()["refused"]
    assert total["zsk13"]["p11-keydel: no PKCS#11 key management window open"] == 300
    # the labels to generate name no key: counted under no key
    assert total[tally.NO_KEY]["p11-keygen: no PKCS#11 key management window open"] == 300


def test_merge_keeps_counting_past_the_bound():
    total: dict = {}
    for i in range(tally.MAX_TOTAL + 10):
        total = tally.merge(total, {(f"k{i}", "why"): 2})
    assert sum(len(v) for v in total.values()) == tally.MAX_TOTAL + 1
    assert total[tally.ANY_KEY][tally.OTHER] == 20
    assert tally.rows({"a": {"x": 1}, "b": {"y": 5}}) == [("b", "y", 5), ("a", "x", 1)]


# --- through the daemon ---------------------------------------------------------------------------

class Syslog:
    """A Unix datagram socket standing in for /dev/log; collects what the daemon sends."""

    def __init__(self, path) -> None:
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.s.bind(str(path))
        self.s.settimeout(0.2)
        self.path = path
        self.lines: list[str] = []

    def drain(self, until=lambda lines: False, timeout: float = 10) -> list[str]:
        deadline = time.time() + timeout
        while time.time() < deadline and not until(self.lines):
            try:
                self.lines.append(self.s.recv(65536).decode())
            except socket.timeout:
                pass
        return self.lines


class Follow:
    """``cryptobat audit --follow --json`` running beside the daemon, its lines collected."""

    def __init__(self, home, *args: str) -> None:
        self.p = subprocess.Popen([sys.executable, "-m", "cryptobat", "--home", str(home), "audit", "--follow",
                                   *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.q: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.lines: list[str] = []

    def _read(self) -> None:
        for line in self.p.stdout:
            self.q.put(line)

    def wait(self, until, timeout: float = 15) -> list[str]:
        deadline = time.time() + timeout
        while time.time() < deadline and not until(self.lines):
            try:
                self.lines.append(self.q.get(timeout=0.2))
            except queue.Empty:
                pass
        return self.lines

    def stop(self) -> str:
        self.p.terminate()
        self.p.wait(10)
        return self.p.stderr.read()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    base = tmp_path_factory.mktemp("refusals")
    home = base / "token"
    codes = setup_home(home, keys=KEYS, compat=())
    log = Syslog(base / "log.sock")
    d = Daemon(home, "--syslog-socket", str(log.path), codes=codes)
    old = os.environ.get("P11_KIT_SERVER_ADDRESS")
    os.environ["P11_KIT_SERVER_ADDRESS"] = d.address  # for pkcs11-tool (support.tool)
    try:
        yield d, log, dict(os.environ)
    finally:
        d.stop()
        log.s.close()
        if old is None:
            os.environ.pop("P11_KIT_SERVER_ADDRESS", None)
        else:
            os.environ["P11_KIT_SERVER_ADDRESS"] = old


REFUSED_CLIENT = """
    import json, sys, time
    import pkcs11
    from pkcs11 import Mechanism, ObjectClass
    from pkcs11.exceptions import FunctionRejected
    lib = pkcs11.lib(sys.argv[1])
    seconds = float(sys.argv[2])
    n = {"k13": 0, "k8": 0}
    with lib.get_token().open(user_pin=sys.argv[3]) as s:
        k13 = s.get_key(ObjectClass.PRIVATE_KEY, label="k13")
        k8 = s.get_key(ObjectClass.PRIVATE_KEY, label="k8")
        until = time.monotonic() + seconds
        while True:
            for label, key, data, mech in (("k13", k13, bytes(32), Mechanism.ECDSA),
                                           ("k8", k8, b"not RRSIG data", Mechanism.SHA256_RSA_PKCS)):
                try:
                    key.sign(data, mechanism=mech)
                    raise SystemExit(f"{label} signed")
                except FunctionRejected:
                    n[label] += 1
            if time.monotonic() >= until:
                break
    print(json.dumps(n))
"""


def refused_signs(env: dict, seconds: float) -> dict:
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(REFUSED_CLIENT), client_module(), str(seconds),
                        PIN.decode()], capture_output=True, text=True, timeout=120 + seconds, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


def refused_pairs(entries: list[dict]) -> dict[tuple[str, str], int]:
    """(key, reason) -> count over aggregated entries and the ``refused`` entries of their own."""
    out: dict[tuple[str, str], int] = {}
    for e in entries:
        pairs = e.get("refused", [])
        if e["event"] == "refused" and "label" in e:  # a key management refusal, audited at once
            pairs = [[e["label"], f"{e['command']}: {e['why']}", 1]]
        if e["event"] == "pin" and e.get("ok") is False:  # a wrong PIN: its own entry, counted there
            pairs = [[tally.NO_KEY, "PIN incorrect", 1]]
        for key, why, n in pairs:
            out[(key, why)] = out.get((key, why), 0) + n
    return out


def status_refusals(home) -> dict[tuple[str, str], int]:
    out = cli("status", home=home).stdout
    lines = out.split("refused (key)")[1].split("\n\n")[0].splitlines()[1:]
    return {(l.split()[0], l.split(None, 2)[2]): int(l.split()[1]) for l in lines}


def test_refusals_are_audited_counted_followed_and_logged(served):
    d, log, env = served
    follow = Follow(d.home, "--json", "-n", "0")
    try:
        time.sleep(1)  # the follower is reading
        n = refused_signs(env, 0)
        r = tool("--login", "--pin", PIN.decode(), "--keypairgen", "--key-type", "EC:prime256v1", "--label",
                 "outside", check=False)
        assert r.returncode != 0 and "(0x200)" in r.stderr, r.stderr  # CKR_FUNCTION_REJECTED
        r = tool("--login", "--pin", PIN.decode(), "--delete-object", "--type", "privkey", "--label", "k13",
                 check=False)
        assert r.returncode != 0 and "(0x1b)" in r.stdout + r.stderr  # CKR_ACTION_PROHIBITED
        r = tool("--login", "--pin", "wrong-pin", "-O", check=False)
        assert "CKR_PIN_INCORRECT" in r.stderr

        def seen(lines):
            pairs = refused_pairs([json.loads(l) for l in lines])
            return {("k13", policy.NOT_COMPAT), ("k8", "signing data too short"), ("outside", KEYGEN_REFUSED),
                    ("k13", KEYDEL_REFUSED), ("-", "PIN incorrect")} <= set(pairs)

        lines = follow.wait(seen)
        entries = [json.loads(l) for l in lines]
        assert seen(lines), entries
        assert any(e["event"] == "pin" and e["ok"] is False for e in entries)
        pairs = refused_pairs(entries)
        assert pairs[("k13", policy.NOT_COMPAT)] == n["k13"] and pairs[("k8", "signing data too short")] == n["k8"]
    finally:
        err = follow.stop()
    assert err == "" or "Traceback" not in err, err
    counted = status_refusals(d.home)
    assert counted[("k13", policy.NOT_COMPAT)] >= n["k13"] and counted[(tally.NO_KEY, KEYGEN_REFUSED)] >= 1  # a label no key has
    assert counted[("k13", KEYDEL_REFUSED)] >= 1 and counted[("-", "PIN incorrect")] >= 1

    logged = log.drain(lambda ls: sum("refused" in l for l in ls) >= 2 and any("PIN incorrect" in l for l in ls))
    text = "\n".join(logged)
    assert "refused-sign" in text and f"k13: {policy.NOT_COMPAT}" in text, text
    assert "p11-keygen" in text and "no PKCS#11 key management window open" in text, text
    assert all(l.startswith("<") and "cryptobat[" in l for l in logged), logged  # syslog priority, tag
    assert all("\n" not in l.rstrip("\x00\n") for l in logged)  # one line each
    assert PIN.decode() not in text and "wrong-pin" not in text  # never a PIN


def test_a_flood_of_refused_signs_adds_a_bounded_number_of_audit_entries(served):
    d, log, env = served
    seq = json.loads(cli("audit", "--json", "-n", "1", home=d.home).stdout)["seq"]
    before = status_refusals(d.home).get(("k13", policy.NOT_COMPAT), 0)
    t0 = time.monotonic()
    n = refused_signs(env, 4)
    elapsed = time.monotonic() - t0
    deadline = time.monotonic() + 10
    while True:  # the last second's tally is flushed by the daemon's tick, about a second later
        entries = [json.loads(l) for l in cli("audit", "--json", "-n", "1000", home=d.home).stdout.splitlines()]
        new = [e for e in entries if e["seq"] > seq]
        if refused_pairs(new).get(("k13", policy.NOT_COMPAT)) == n["k13"] or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert n["k13"] > 50, n  # a real flood
    assert len(new) <= elapsed + 6, (len(new), elapsed)  # about one entry a second, not one a request
    assert refused_pairs(new)[("k13", policy.NOT_COMPAT)] == n["k13"]
    assert status_refusals(d.home)[("k13", policy.NOT_COMPAT)] == before + n["k13"]
    assert d.alive()


def test_audit_log_is_read_by_the_tokens_user_only(served):
    """The follower reads the store read-only beside the daemon; another user (a signing host's)
    cannot read it at all."""
    d, _, _ = served
    need_root("to run the reader as another user")
    script = textwrap.dedent("""
        import os, sqlite3, sys
        from cryptobat import auditview, cli
        os.setgroups([]); os.setgid(65534); os.setuid(65534)
        sys.exit(cli.main(["--home", sys.argv[1], "audit", "--json"]))
    """)
    r = subprocess.run([sys.executable, "-c", script, str(d.home)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stdout == "", r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and "permission denied" in r.stderr.lower(), r.stderr


def test_audit_follow_human_lines_and_refusals_only(served):
    d, _, env = served
    follow = Follow(d.home, "--refusals", "-n", "0")
    try:
        time.sleep(1)
        refused_signs(env, 0)
        lines = follow.wait(lambda ls: any("refused-sign" in l for l in ls))
    finally:
        follow.stop()
    line = next(l for l in lines if "refused-sign" in l)
    assert f"k13: {policy.NOT_COMPAT} x1" in line and line.count("\n") == 1
    assert all("refused" in l or "ok=false" in l or "pin_refused" in l for l in lines), lines


def test_a_readable_line_is_one_line_whatever_a_client_named():
    from cryptobat.auditview import line
    entry = {"seq": 7, "time": 1795930108, "event": "refused-call", "calls_refused": 1,
             "refused": [["evil\n2026-11-29 00:00:00 #1 serve", "p11-keygen: x", 1]], "label": "a\nb"}
    text = line(entry)
    assert "\n" not in text and "\\n" in text and text.startswith("2026-11-29 05:28:28 #7 refused-call")


def test_audit_reader_stops_at_an_edited_entry_and_a_missing_token_in_one_line(ready, tmp_path):
    from cryptobat.auditview import Reader
    from cryptobat.errors import IntegrityError
    ready.audit("note", text="before")
    ready.audit("note", text="after")
    seq = ready.audit_seq()
    ready.store.db.execute("UPDATE audit SET entry = replace(entry, 'before', 'edited') WHERE seq = ?", (seq - 1,))
    r = Reader(ready.home)
    try:
        r.start(5)
        with pytest.raises(IntegrityError, match=f"audit entry {seq - 1}: does not follow"):
            list(r.new())
    finally:
        r.close()
    out = cli("audit", "--follow", home=tmp_path / "none")
    assert out.returncode == 1 and out.stdout == "" and out.stderr.count("\n") == 1 and "no token" in out.stderr
