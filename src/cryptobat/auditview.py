"""The audit log seen from outside the token: read-only, one line an entry, refusals picked out.

``cryptobat audit --follow`` reads a token's store while its daemon runs, so it opens
``state.db`` read-only (SQLite WAL lets a reader see each committed entry as soon as it
is committed) and never takes the store lock. Who may read it is who may open the file:
the home is 0700 and the store 0600, so only the token's own user (the operator) can,
never a signing host connecting to the daemon's sockets as another user.
Each entry read is checked against the hash of the one before it (:func:`cryptobat.audit.link`).
The daemon's syslog lines (``serve --syslog``) use :func:`line` and :func:`is_refusal` too.
"""
from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Iterator

from .audit import GENESIS, link
from .errors import CryptobatError, IntegrityError

POLL_SECONDS = 0.2
_QUIET = ("seq", "time", "event")


def is_refusal(entry: dict) -> bool:
    """Whether an audit entry records a refused call (a signature, key management, a PIN, a login)."""
    event = str(entry.get("event", ""))
    return event.startswith("refused") or entry.get("ok") is False or bool(entry.get("pin_refused"))


def _value(v) -> str:
    if isinstance(v, str) and v and v.isprintable() and " " not in v and "=" not in v:
        return v
    return json.dumps(v, sort_keys=True)  # escaped: a label a client chose cannot start a line of its own


def _text(v) -> str:
    return v if isinstance(v, str) and v.isprintable() else json.dumps(v)


def line(entry: dict) -> str:
    """One human-readable line: time, sequence number, event, then what it recorded."""
    t = entry.get("time")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) if isinstance(t, int) else "-"
    parts = [f"{when} #{entry.get('seq', '?')} {entry.get('event', '?')}"]
    refused = entry.get("refused")
    for k, v in entry.items():
        if k in _QUIET or k in ("refused", "reasons"):
            continue
        parts.append(f"{k}={_value(v)}")
    if isinstance(refused, list):  # [[key, reason, count], ...]: the reasons by key say it all
        parts.append("refused: " + "; ".join(f"{_text(r[0])}: {_text(r[1])} x{r[2]}" for r in refused
                                              if isinstance(r, list) and len(r) == 3))
    elif "reasons" in entry:
        parts.append(f"reasons={_value(entry['reasons'])}")
    return "  ".join(parts)


class Reader:
    """A token's audit log, opened read-only beside a daemon that may be writing it."""

    def __init__(self, home: Path) -> None:
        path = Path(home) / "state.db"
        try:
            with open(path, "rb"):  # a clear refusal for another user, before SQLite's vaguer one
                pass
            self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
            self.db.execute("SELECT 1 FROM audit LIMIT 1").fetchall()
        except FileNotFoundError:
            raise CryptobatError(f"no token at {home}: {path} is missing") from None
        except PermissionError:
            raise CryptobatError(f"cannot read {path}: permission denied (the audit log is readable "
                                 f"by the token's own user only)") from None
        except sqlite3.Error as e:
            raise CryptobatError(f"cannot read the audit log in {path}: {e}") from None
        self.seq = 0
        self.hash = GENESIS

    def close(self) -> None:
        self.db.close()

    def _rows(self, since: int) -> list[tuple[int, str, str]]:
        try:
            return self.db.execute("SELECT seq, entry, hash FROM audit WHERE seq >= ? ORDER BY seq",
                                   (since,)).fetchall()
        except sqlite3.Error as e:
            raise CryptobatError(f"cannot read the audit log: {e}") from None

    def start(self, last: int) -> None:
        """Begin after all but the last ``last`` entries (their predecessor's hash anchors the chain)."""
        head = self.db.execute("SELECT MAX(seq) FROM audit").fetchone()[0] or 0
        first = max(1, head - last + 1)
        if first > 1:
            row = self.db.execute("SELECT seq, hash FROM audit WHERE seq = ?", (first - 1,)).fetchone()
            if row is not None:
                self.seq, self.hash = row
                return
        self.seq, self.hash = first - 1, GENESIS

    def new(self) -> Iterator[dict]:
        """Entries committed since the last call, each checked against the one before it."""
        for seq, text, h in self._rows(self.seq + 1):
            try:
                entry = json.loads(text)
            except ValueError:
                raise IntegrityError(f"audit entry {seq}: not valid JSON") from None
            if seq != self.seq + 1 or link(self.hash, entry) != h:
                raise IntegrityError(f"audit entry {seq}: does not follow entry {self.seq} "
                                     f"(edited, reordered or deleted); run: cryptobat audit verify")
            self.seq, self.hash = seq, h
            yield entry

    def follow(self, stop=lambda: False) -> Iterator[dict]:
        """Entries as they are committed, until ``stop()`` (or an interrupt)."""
        while not stop():
            got = False
            for entry in self.new():
                got = True
                yield entry
            if not got:
                time.sleep(POLL_SECONDS)
