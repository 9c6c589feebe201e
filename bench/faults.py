#!/usr/bin/env python3
"""Fault campaign: ``kill -9`` the daemon at random moments under load, then check what survived.

    python3 bench/faults.py [--trials 50] [--wal-trials 10] [--flip-trials 20] [--seed N]
                            [--time-limit 1800] [--keep DIR] [--json]

A quorum-1 token (twelve officers, so that each login has a fresh TOTP step) is
served by ``cryptobat serve``. Each trial puts a mixed load on the daemon: one
console session logged in as an officer changes the state (``setmaxval``,
``keygen``, ``keydel``) and a signer signs batches through the native API (large
ones on the worker processes, small ones in the daemon). At a random moment
the daemon gets SIGKILL. Then:

- every process that descended from the daemon must be gone within a few
  seconds (*orphaned processes*, each killed here and named);
- the daemon restarts; ``cryptobat audit verify`` must pass and
  ``cryptobat status`` must show exactly the state before or after the change
  that was in flight (*state exactly old or new*); every change the console
  acknowledged before the kill must be there (*acknowledged changes lost*);
- no ``Traceback`` anywhere: the daemon's stderr (its workers' too), the
  commands', the clients' (*tracebacks*).

WAL loss trials copy the home right after a kill, delete the copy's
``state.db-wal`` and open it: the token must refuse with one line or have lost
nothing. Byte flips change one random byte of ``state.db`` in a copy of the
cleanly stopped home: the token must refuse with one line, or open the same
state (a byte SQLite does not use). Exit status 0 when every check held.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

from cryptobat.client import connect  # noqa: E402
from cryptobat.errors import CryptobatError  # noqa: E402
from support import (PIN_TEXT as PIN, Codes, Daemon, cli, cmdline, descendants, make_token,  # noqa: E402
                     mentioning, survivors)

ZONE = "testzone."
OFFICERS = 12
TRACEBACK = "Traceback (most recent call last)"


# ---------------------------------------------------------------- the token

def next_code(codes: Codes) -> tuple[str, str]:
    """(officer, code) of the officer least recently used that has a usable step; waits if none has."""
    while True:
        for name in sorted(codes.secrets, key=lambda n: max(codes.used.get(n, {-1}))):
            if codes.free_step(name) is not None:
                return name, codes.code(name)
        time.sleep(1)


def setup(home: Path) -> Codes:
    """A quorum-1 token with OFFICERS officers, max validity, the signer PIN and a CSK for ZONE."""
    o = make_token(home, quorum=1, officers=[f"o{i}" for i in range(OFFICERS)], close=False, maxval=86400,
                   pin=PIN, keys=("13 csk testzone c13",))
    try:
        o.console.handle("coreset")
    finally:
        o.console.token.close()
    codes = Codes()  # the apps go on after the set-up, on real time
    codes.secrets, codes.used = o.secrets, o.used
    return codes


def start_daemon(home: Path, log: Path) -> Daemon:
    return Daemon(home, "--no-pkcs11", log=log, timeout=60)


# ---------------------------------------------------------------- state the console changed

class Model:
    """The token's state as far as the campaign's changes go: max validity and key labels."""

    def __init__(self, maxval: int, keys: set[str]) -> None:
        self.maxval = maxval
        self.keys = set(keys)

    def copy(self) -> "Model":
        return Model(self.maxval, self.keys)

    def apply(self, op: tuple[str, str]) -> None:
        kind, arg = op
        if kind == "setmaxval":
            self.maxval = int(arg)
        elif kind == "keygen":
            self.keys.add(arg)
        elif kind == "keydel":
            self.keys.discard(arg)

    def __eq__(self, other) -> bool:
        return (self.maxval, self.keys) == (other.maxval, other.keys)

    def __repr__(self) -> str:
        return f"Model(maxval={self.maxval}, keys={sorted(self.keys)})"


def parse_status(text: str) -> Model | None:
    m = re.search(r"^policy\s+max validity \+(\d+) s", text, re.M)
    if not m:
        return None
    keys: set[str] = set()
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("key ") and "zone" in line:
            keys = {l.split()[0] for l in lines[i + 1:] if l.strip()}
    return Model(int(m.group(1)), keys)


class ConsoleLoad(threading.Thread):
    """One console session: log in, then change the state until the connection goes."""

    ANSWERS = {"setmaxval": "Maximum validity period set to", "keygen": "ok: key generated", "keydel": "deleted"}

    def __init__(self, path: Path, codes: Codes, model: Model, rng: random.Random, serial: list[int]) -> None:
        super().__init__(daemon=True)
        self.path, self.codes, self.rng, self.serial = path, codes, rng, serial
        self.model = model.copy()  # as acknowledged so far
        self.acked: list[tuple[str, str]] = []
        self.inflight: tuple[str, str] | None = None
        self.unexpected: list[str] = []
        self.login_failed = ""
        self.stop = threading.Event()

    def _until_prompt(self, s: socket.socket) -> str | None:
        out = b""
        while not out.endswith(b"> "):
            chunk = s.recv(65536)
            if not chunk:
                return None
            out += chunk
        return out[:-2].decode(errors="replace")

    def _op(self) -> tuple[str, str]:
        r = self.rng.random()
        ours = sorted(k for k in self.model.keys if k.startswith("f"))
        if r < 0.45:
            v = self.rng.randrange(3600, 30 * 86400)
            while v == self.model.maxval:
                v += 1
            return "setmaxval", str(v)
        if len(ours) >= 12 or (len(ours) >= 3 and r > 0.8):  # a dozen keys at most: the state stays small
            return "keydel", self.rng.choice(ours)
        self.serial[0] += 1
        return "keygen", f"f{self.serial[0]}"

    def run(self) -> None:
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(self.path))
            s.settimeout(60)
            if self._until_prompt(s) is None:
                return
            name, code = next_code(self.codes)
            s.sendall(f"cologin {name} {code}\n".encode())
            out = self._until_prompt(s)
            if out is None:
                return
            if "Ok" not in out:
                self.login_failed = out.strip()
                return
            while not self.stop.is_set():
                op = self._op()
                line = {"setmaxval": "setmaxval {}", "keygen": "keygen 13 zsk testzone {}",
                        "keydel": "keydel {}"}[op[0]].format(op[1])
                self.inflight = op
                s.sendall(line.encode() + b"\n")
                out = self._until_prompt(s)
                if out is None:
                    return
                if self.ANSWERS[op[0]] in out:
                    self.acked.append(op)
                    self.model.apply(op)
                else:
                    self.unexpected.append(f"{line} -> {out.strip()}")
                self.inflight = None
        except OSError:
            return  # the daemon is gone


def signing_data(key, now: int, i: int) -> bytes:
    """RRSIG RDATA without signature, then an A RR at h<i>.testzone. (RFC 4034 §3.1.8.1)."""
    zone = b"".join(bytes([len(p)]) + p.encode() for p in key.zone.rstrip(".").split(".")) + b"\0"
    owner = bytes([len(f"h{i}")]) + f"h{i}".encode() + zone
    rr = owner + struct.pack(">HHIH", 1, 1, 3600, 4) + bytes([192, 0, 2, i % 250 + 1])
    return struct.pack(">HBBIIIH", 1, key.algorithm, 2, 3600, now + 1800, now - 3600, key.keytag) + zone + rr


class SignLoad(threading.Thread):
    """A signer on the native API: batches of random size until the connection goes."""

    def __init__(self, sock: Path, rng: random.Random) -> None:
        super().__init__(daemon=True)
        self.sock, self.rng = sock, rng
        self.batches = self.signatures = self.refused = 0
        self.error = ""
        self.crash = ""
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            client = connect(f"unix:{self.sock}", pin=PIN)
            try:
                key = next(k for k in client.keys() if k.label == "c13")
                while not self.stop.is_set():
                    now = client.time()
                    n = self.rng.choice([20, 300, 1000, 3000])
                    res = client.timed_sign([("c13", signing_data(key, now, i)) for i in range(n)])
                    self.batches += 1
                    self.signatures += sum(1 for r in res if r.ok)
                    self.refused += sum(1 for r in res if not r.ok)
            finally:
                client.close()
        except CryptobatError as e:
            self.error = str(e)  # the daemon went away: one line, as for any client
        except Exception as e:  # anything else would be a traceback in a real client
            import traceback
            self.crash = "".join(traceback.format_exception(e))


# ---------------------------------------------------------------- the campaign

def copy_home(home: Path, dest: Path) -> Path:
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(home, dest, ignore=lambda d, names: [n for n in names if n.endswith(".sock") or n == "console.pty"])
    return dest


def one_line_error(p: subprocess.CompletedProcess) -> bool:
    lines = [l for l in (p.stderr + p.stdout).splitlines() if l.strip()]
    return len(lines) == 1


class Campaign:
    def __init__(self, a) -> None:
        self.a = a
        self.rng = random.Random(a.seed)
        self.dir = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="cryptobat-faults-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.home = self.dir / "token"
        self.logs = self.dir / "logs"
        self.logs.mkdir(exist_ok=True)
        self.r: dict = {
            "trials": 0, "state_old_or_new": 0, "acked_changes": 0, "acked_lost": 0, "unexplained_state": 0,
            "inflight": 0, "inflight_applied": 0, "kills_with_workers": 0, "workers_at_kills": 0, "orphans": 0, "tracebacks": 0, "audit_failures": 0,
            "restart_failures": 0, "unexpected_answers": 0, "login_failures": 0,
            "batches": 0, "signatures": 0, "refusals": 0, "client_errors_after_kill": 0,
            "examples": {},
            "wal": {"trials": 0, "refused_one_line": 0, "refused_other": 0, "opened_nothing_lost": 0,
                    "opened_acked_lost": 0, "tracebacks": 0},
            "flip": {"trials": 0, "refused_one_line": 0, "refused_other": 0, "no_effect": 0,
                     "opened_changed_state": 0, "tracebacks": 0},
            "problems": [],
        }
        self.serial = [0]

    def problem(self, text: str) -> None:
        self.r["problems"].append(text)
        print(f"  ! {text}", file=sys.stderr)

    def tracebacks_in(self, text: str, where: str) -> None:
        n = text.count(TRACEBACK)
        if n:
            self.r["tracebacks"] += n
            self.problem(f"{n} traceback(s) in {where}")

    def status(self, home: Path) -> tuple[subprocess.CompletedProcess, Model | None]:
        p = cli("status", home=home, timeout=120)
        return p, parse_status(p.stdout) if p.returncode == 0 else None

    def run(self) -> int:
        t0 = time.monotonic()
        codes = setup(self.home)
        model = Model(86400, {"c13"})
        daemon = start_daemon(self.home, self.logs / "daemon-0.err")
        trial = 0
        try:
            while trial < self.a.trials and time.monotonic() - t0 < self.a.time_limit:
                trial += 1
                daemon, model = self.trial(trial, daemon, codes, model)
                if daemon is None:
                    break
        finally:
            if daemon is not None:
                daemon.stop()
                self.tracebacks_in(daemon.log.read_text(errors="replace"), daemon.log.name)
        for i in range(self.a.flip_trials):
            if time.monotonic() - t0 > self.a.time_limit:
                break
            self.flip(i)
        self.r["seconds"] = round(time.monotonic() - t0, 1)
        self.report()
        if not self.a.keep:
            shutil.rmtree(self.dir, ignore_errors=True)
        return 0 if self.ok() else 1

    def trial(self, n: int, daemon: Daemon, codes: Codes, model: Model):
        r = self.r
        con = ConsoleLoad(self.home / "console.sock", codes, model, self.rng, self.serial)
        signer = SignLoad(self.home / "native.sock", self.rng)
        con.start()
        signer.start()
        time.sleep(self.rng.uniform(0.2, 2.5))
        family = descendants(daemon.pid)
        daemon.kill()
        con.stop.set()
        signer.stop.set()
        con.join(30)
        signer.join(30)
        r["trials"] += 1
        r["kills_with_workers"] += bool(family)
        r["workers_at_kills"] += len(family)

        # nothing the daemon started may outlive it
        left = set(survivors(family, 5.0)) | mentioning(str(self.home))
        for p in left:
            self.problem(f"trial {n}: orphan {p}: {cmdline(p)[:160]}")
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        r["orphans"] += len(left)

        # the clients: one line each, never a traceback
        r["batches"] += signer.batches
        r["signatures"] += signer.signatures
        r["refusals"] += signer.refused
        if signer.error:
            r["client_errors_after_kill"] += 1
            if not any(w in signer.error for w in ("closed the connection", "cannot reach")):
                self.problem(f"trial {n}: signer error: {signer.error}")
        if signer.crash:
            r["tracebacks"] += 1
            self.problem(f"trial {n}: signer client crashed: {signer.crash.strip().splitlines()[-1]}")
        if con.login_failed:
            r["login_failures"] += 1
            self.problem(f"trial {n}: console login refused: {con.login_failed}")
        for u in con.unexpected:
            r["unexpected_answers"] += 1
            self.problem(f"trial {n}: unexpected console answer: {u[:200]}")
        r["acked_changes"] += len(con.acked)
        self.tracebacks_in(daemon.log.read_text(errors="replace"), daemon.log.name)

        wal_copy = None
        if r["wal"]["trials"] < self.a.wal_trials and (
                self.a.wal_trials - r["wal"]["trials"] >= self.a.trials - n + 1 or self.rng.random() < 0.5):
            wal_copy = copy_home(self.home, self.dir / "wal-copy")

        # restart: the audit chain holds, the state is the old or the new one
        try:
            daemon = start_daemon(self.home, self.logs / f"daemon-{n}.err")
        except RuntimeError as e:
            r["restart_failures"] += 1
            self.problem(f"trial {n}: {str(e)[:300]}")
            return None, model
        v = cli("audit", "verify", home=self.home, timeout=120)
        self.tracebacks_in(v.stderr, f"trial {n} audit verify")
        if v.returncode != 0 or not v.stdout.startswith("ok:"):
            r["audit_failures"] += 1
            self.problem(f"trial {n}: audit verify: {(v.stdout + v.stderr).strip()[:300]}")
        p, seen = self.status(self.home)
        self.tracebacks_in(p.stderr, f"trial {n} status")
        old = con.model
        new = old.copy()
        if con.inflight is not None:
            r["inflight"] += 1
            new.apply(con.inflight)
        if seen is None:
            r["unexplained_state"] += 1
            self.problem(f"trial {n}: status unreadable: {(p.stdout + p.stderr).strip()[:300]}")
            seen = old
        elif seen == old or seen == new:
            r["state_old_or_new"] += 1
            if con.inflight is not None and seen == new and new != old:
                r["inflight_applied"] += 1
        else:
            r["unexplained_state"] += 1
            self.problem(f"trial {n}: state {seen} is neither {old} nor {new} (in flight: {con.inflight})")
        r["acked_lost"] += self.lost(con, seen)
        if wal_copy is not None:
            self.wal(n, wal_copy, con, seen)
        return daemon, seen

    @staticmethod
    def lost(con: ConsoleLoad, seen: Model) -> int:
        """Acknowledged changes that the state after the restart does not show."""
        lost = 0
        inflight = con.inflight
        last_maxval = next((op for op in reversed(con.acked) if op[0] == "setmaxval"), None)
        if last_maxval and seen.maxval != int(last_maxval[1]) and not (inflight and inflight[0] == "setmaxval"
                                                                        and seen.maxval == int(inflight[1])):
            lost += 1
        final: dict[str, bool] = {}
        for kind, label in con.acked:
            if kind in ("keygen", "keydel"):
                final[label] = kind == "keygen"
        for label, present in final.items():
            if inflight and inflight[1] == label:
                continue  # a later change to this key was in flight
            if (label in seen.keys) != present:
                lost += 1
        return lost

    def wal(self, n: int, copy: Path, con: ConsoleLoad, truth: Model) -> None:
        w = self.r["wal"]
        w["trials"] += 1
        for name in ("state.db-wal", "state.db-shm"):
            (copy / name).unlink(missing_ok=True)
        p, seen = self.status(copy)
        if TRACEBACK in p.stderr:
            w["tracebacks"] += 1
            self.tracebacks_in(p.stderr, f"trial {n} WAL-loss status")
        elif p.returncode != 0:
            w["refused_one_line" if one_line_error(p) else "refused_other"] += 1
            self.r["examples"].setdefault("wal_refusal", (p.stderr + p.stdout).strip()[:300])
        elif seen is not None and self.lost(con, seen) == 0 and seen == truth:
            w["opened_nothing_lost"] += 1
        else:
            w["opened_acked_lost"] += 1
            self.problem(f"trial {n}: WAL deleted: the token opened with {seen}, the acknowledged state is {truth}")
        shutil.rmtree(copy, ignore_errors=True)

    def flip(self, i: int) -> None:
        f = self.r["flip"]
        if i == 0:  # the state as an unchanged copy at the same path shows it
            self.baseline = self._status_lines(copy_home(self.home, self.dir / "flip-copy"))
        copy = copy_home(self.home, self.dir / "flip-copy")
        db = copy / "state.db"
        data = bytearray(db.read_bytes())
        at = self.rng.randrange(len(data))
        data[at] ^= self.rng.randrange(1, 256)
        db.write_bytes(bytes(data))
        f["trials"] += 1
        v = cli("audit", "verify", home=copy, timeout=120)
        s = cli("status", home=copy, timeout=120)
        if TRACEBACK in v.stderr + s.stderr:
            f["tracebacks"] += 1
            self.tracebacks_in(v.stderr + s.stderr, f"flip at byte {at}")
        elif v.returncode != 0 or s.returncode != 0:
            bad = v if v.returncode != 0 else s
            f["refused_one_line" if one_line_error(bad) else "refused_other"] += 1
            if sum(k.startswith("flip") for k in self.r["examples"]) < 2:
                self.r["examples"][f"flip_refusal_{f['trials']}"] = (bad.stderr + bad.stdout).strip()[:300]
            if not one_line_error(bad):
                self.problem(f"flip at byte {at}: refused in more than one line: {(bad.stdout + bad.stderr)[:300]}")
        elif self._lines(s.stdout) == self.baseline:
            f["no_effect"] += 1
        else:
            f["opened_changed_state"] += 1
            diff = [l for l in self._lines(s.stdout) if l not in self.baseline][:3]
            self.problem(f"flip at byte {at}: the token opened a changed state: {diff}")
        shutil.rmtree(copy, ignore_errors=True)

    def _status_lines(self, home: Path) -> list[str]:
        return self._lines(cli("status", home=home, timeout=120).stdout)

    @staticmethod
    def _lines(text: str) -> list[str]:
        return [l for l in text.splitlines() if not l.startswith("clock")]

    def ok(self) -> bool:
        r = self.r
        return (r["trials"] > 0 and r["state_old_or_new"] == r["trials"] and r["acked_lost"] == 0
                and r["orphans"] == 0 and r["tracebacks"] == 0 and r["audit_failures"] == 0
                and r["restart_failures"] == 0 and r["unexplained_state"] == 0 and r["refusals"] == 0
                and r["wal"]["opened_acked_lost"] == 0 and r["wal"]["tracebacks"] == 0
                and r["flip"]["opened_changed_state"] == 0 and r["flip"]["tracebacks"] == 0)

    def report(self) -> None:
        r = self.r
        if self.a.json:
            print(json.dumps(r, indent=1))
            return
        w, f = r["wal"], r["flip"]
        print(f"fault campaign: {r['trials']} kill -9 trials of the daemon in {r['seconds']} s (seed {self.a.seed})")
        rows = [
            ("state exactly old or new", f"{r['state_old_or_new']}/{r['trials']}"),
            ("acknowledged changes lost", f"{r['acked_lost']} (of {r['acked_changes']} acknowledged)"),
            ("orphaned processes", f"{r['orphans']} (the daemon had worker processes at {r['kills_with_workers']} "
                                   f"of the kills, {r['workers_at_kills']} processes in all)"),
            ("tracebacks", r["tracebacks"]),
            ("audit verify failures", r["audit_failures"]),
            ("restart failures", r["restart_failures"]),
            ("changes in flight at the kill", f"{r['inflight']} (applied {r['inflight_applied']}, "
                                              f"not applied {r['inflight'] - r['inflight_applied']})"),
            ("signing before the kills", f"{r['batches']} batches, {r['signatures']} signatures, "
                                         f"{r['refusals']} refused"),
            ("signer errors at the kills", f"{r['client_errors_after_kill']} (one line each)"),
            ("WAL deleted after kill -9", f"{w['trials']} trials: refused in one line {w['refused_one_line']}, "
                                          f"refused otherwise {w['refused_other']}, opened with nothing lost "
                                          f"{w['opened_nothing_lost']}, opened with acknowledged changes lost "
                                          f"{w['opened_acked_lost']}, tracebacks {w['tracebacks']}"),
            ("byte flips in state.db", f"{f['trials']} trials: refused in one line {f['refused_one_line']}, "
                                       f"refused otherwise {f['refused_other']}, no effect {f['no_effect']}, "
                                       f"opened a changed state {f['opened_changed_state']}, "
                                       f"tracebacks {f['tracebacks']}"),
        ]
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            print(f"  {k:<{width}}  {v}")
        for k, v in r["examples"].items():
            print(f"  e.g. {k.split('_')[0]}: {v}")
        if r["problems"]:
            print(f"  problems ({len(r['problems'])}):")
            for p in r["problems"][:50]:
                print(f"    {p}")
        print("result:", "every check held" if self.ok() else "FAILED")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=50, help="kill -9 trials (default 50)")
    ap.add_argument("--wal-trials", type=int, default=10, help="of those, WAL loss trials on a copy (default 10)")
    ap.add_argument("--flip-trials", type=int, default=20, help="byte flips in state.db (default 20)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--time-limit", type=float, default=1800, help="stop starting trials after this many seconds")
    ap.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (token, copies, daemon logs)")
    ap.add_argument("--json", action="store_true", help="the summary as JSON")
    a = ap.parse_args()
    if a.seed is None:
        a.seed = random.SystemRandom().randrange(1 << 32)
    a.wal_trials = min(a.wal_trials, a.trials)
    return Campaign(a).run()


if __name__ == "__main__":
    sys.exit(main())
