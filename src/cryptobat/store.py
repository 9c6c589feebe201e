"""The token's one state store: SQLite in WAL mode, integrity protected.

One row holds the whole token state as JSON with an HMAC over it; the audit
log lives beside it in the same database. A change writes the new state and
its audit entries in one transaction with ``synchronous=FULL``, so a crash at
any instant leaves the old state or the new one, never a mix. An exclusive
lock file keeps a second process from opening the same token.

A committed change sits in ``state.db-wal`` until SQLite checkpoints it; a
lost or damaged WAL would silently take acknowledged changes with it. So a
change is acknowledged only once a separate, MAC'd marker file (``commit``)
says which audit head it reached (written and fsynced after the commit), and
a store whose audit head is behind its marker is refused.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import hmac
import json
import os
import sqlite3
from pathlib import Path
from typing import Iterator, Mapping

from .api import KeyInfo
from .audit import GENESIS, Head
from .clock import DEFAULT_GAP
from .errors import IntegrityError, NotFound, StoreError, TokenBusy
from .state import AuditHead, ClockRecord, Counters, KeyRecord, Officer, Secret, TokenState, frozen

SCHEMA = """
CREATE TABLE IF NOT EXISTS state (id INTEGER PRIMARY KEY CHECK (id = 1), doc TEXT NOT NULL, mac TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS audit (seq INTEGER PRIMARY KEY, entry TEXT NOT NULL, hash TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS keycheck (id INTEGER PRIMARY KEY CHECK (id = 1), kcv TEXT NOT NULL);
"""
def upgrade(state: dict) -> dict:
    """Fields added since a store was created, with their defaults."""
    state["clock"].setdefault("max_gap", DEFAULT_GAP)
    state.setdefault("pin_failures", 0)
    state.setdefault("allowed_keys", {})  # zone -> [DNSKEY RDATA hex] a quorum allowed (keyallow)
    state.setdefault("cds_delete", {})  # zone -> token time until which an RFC 8078 delete may be signed
    state.setdefault("p11_window_keys", 0)  # windows before the key count allowed any number: none open now
    state.setdefault("rollback", 0)  # stores from before rollback counters: no counter yet
    state.setdefault("pepper", "")  # stores never migrated: the pepper derives from the MAC key
    state.setdefault("signer_peers", [])  # "uid:N" / "gid:N" allowed on the signer sockets without a PIN
    state.setdefault("audit_checked", dict(state["audit"]) if state["audit"]["seq"] == 0 else
                     {"seq": 0, "hash": Head().hash})
    for o in state["officers"].values():
        if "used_steps" not in o:  # records from before used_steps kept only the last one
            last = o.get("last_step", -1)
            o["used_steps"] = [last] if last >= 0 else []
        o.pop("last_step", None)
    return state


def _secret(d: dict | None) -> Secret | None:
    return None if d is None else Secret(d["salt"], d["hash"], bool(d.get("keyed", False)))


def _officer(d: dict) -> Officer:
    return Officer(secret=d["secret"], passphrase=_secret(d.get("passphrase")),
                   used_steps=tuple(d["used_steps"]), failures=d.get("failures", 0),
                   locked_until=d.get("locked_until", 0), remote_failures=d.get("remote_failures", 0),
                   remote_locked_until=d.get("remote_locked_until", 0), enrolled=d.get("enrolled", 0))


def _key(d: dict) -> KeyRecord:
    return KeyRecord(KeyInfo.from_json({k: v for k, v in d.items() if k not in _RECORD_ONLY}),
                     d["blob"], d["created"], bool(d.get("role_open", False)))


_RECORD_ONLY = ("blob", "created", "role_open")  # key record fields that are not KeyInfo's


def _counters(d: dict) -> Counters:
    return Counters(**{**d, "refused": frozen({k: frozen(v) for k, v in d.get("refused", {}).items()})})


VERSION = TokenState.version  # the newest stored form this code reads and writes


def _unknown(stored, typed, path: str = "") -> list[str]:
    """Fields of the stored document that the typed state would not write back."""
    if not isinstance(stored, dict) or not isinstance(typed, dict):
        return []
    out = []
    for k, v in stored.items():
        if k not in typed:
            out.append(path + k)
        else:
            out += _unknown(v, typed[k], f"{path}{k}.")
    return out


def from_json(d: dict) -> TokenState:
    """The typed state of a stored document (upgraded to the current schema first).

    A document this code would not write back whole (a newer version, a field it does not
    know) is refused rather than read: committing the next change would drop what it holds."""
    if not isinstance(d, dict) or d.get("version") != VERSION:
        v = d.get("version") if isinstance(d, dict) else None
        raise StoreError(f"state store is version {v!r}; this Cryptobat reads version {VERSION} "
                         f"(a newer Cryptobat wrote it?)")
    try:
        state = _typed(upgrade(d))
        unknown = _unknown(d, to_json(state))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise IntegrityError(f"state store document is malformed ({type(e).__name__}: {e})") from None
    if unknown:
        raise StoreError(f"state store has fields this Cryptobat does not know: {', '.join(sorted(unknown)[:8])} "
                         f"(a newer Cryptobat wrote it?)")
    return state


def _typed(d: dict) -> TokenState:
    return TokenState(
        version=d["version"], serial=d["serial"], created=d["created"], quorum=d["quorum"],
        max_validity=d["max_validity"], pin=_secret(d["pin"]), pin_failures=d["pin_failures"],
        clock=ClockRecord(**{k: d["clock"][k] for k in ("offset", "hwm", "tampered", "tolerance", "max_gap")}),
        idle_timeout=d["idle_timeout"],
        officers=frozen({n: _officer(o) for n, o in d["officers"].items()}),
        keys=frozen({label: _key(k) for label, k in d["keys"].items()}),
        allowed_keys=frozen({z: tuple(w) for z, w in d["allowed_keys"].items()}),
        cds_delete=frozen(d["cds_delete"]), signer_peers=tuple(d["signer_peers"]),
        p11_window_until=d["p11_window_until"], p11_window_zone=d["p11_window_zone"],
        p11_window_keys=d["p11_window_keys"],
        counters=_counters(d["counters"]), audit=AuditHead(**d["audit"]),
        audit_checked=AuditHead(**d["audit_checked"]), rollback=d["rollback"],
        pepper=d["pepper"])


def _plain(value):
    """Records as the stored JSON has them: dicts and lists."""
    if isinstance(value, KeyRecord):
        return {**value.info.to_json(), "blob": value.blob, "created": value.created,
                **({"role_open": True} if value.role_open else {})}
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def to_json(state: TokenState) -> dict:
    return _plain(state)


FILES = ("state.db", "state.db-wal", "state.db-shm", "lock", "master.key", "commit", "custody.json")
_MARKER = "commit"  # the last acknowledged audit head, MAC'd: a store that lost commits is refused


class Store:
    def __init__(self, home: Path, mac_key: bytes, create: bool = False) -> None:
        self.home = Path(home)
        self._mac_key = mac_key
        self._lock = self._acquire_lock()
        path = self.home / "state.db"
        if not create and not path.exists():
            os.close(self._lock)
            raise NotFound(f"no token at {self.home}: {path} is missing (run: cryptobat init, "
                                 f"or restore the token's files)")
        try:
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(SCHEMA)
            self._check_key(create)
        except sqlite3.DatabaseError as e:
            os.close(self._lock)
            raise IntegrityError(f"state store is damaged: {path}: {e}") from None
        except BaseException:
            self.db.close()
            os.close(self._lock)
            raise
        for name in FILES:  # owner-only whatever the umask was when SQLite made them
            with contextlib.suppress(FileNotFoundError):
                os.chmod(self.home / name, 0o600)
        self._marker: int | None = None

    # --- the acknowledged-commit marker -------------------------------------------------
    def _marker_text(self, head: Head) -> str:
        body = f"{head.seq} {head.hash}"
        return f"{body} {self._mac('commit ' + body)}\n"

    def _read_marker(self) -> Head | None:
        path = self.home / _MARKER
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as e:
            raise IntegrityError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
        parts = text.split()
        if len(parts) != 3 or not parts[0].isdigit() or not hmac.compare_digest(
                self._marker_text(Head(int(parts[0]), parts[1])).strip(), text.strip()):
            raise IntegrityError(f"{path} is damaged (not this store's commit marker)")
        return Head(int(parts[0]), parts[1])

    def mark(self, head: Head) -> None:
        """Record ``head`` as acknowledged: written in place and fsynced (one small block)."""
        data = self._marker_text(head).encode()
        if self._marker is None:
            self._marker = os.open(self.home / _MARKER, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            os.pwrite(self._marker, data.ljust(160), 0)
            os.fsync(self._marker)
        except OSError as e:
            raise StoreError(f"cannot record the commit in {self.home / _MARKER}: {e.strerror}") from None

    def check_marker(self, head: Head, accept_loss: bool = False) -> tuple[int, int] | None:
        """Refuse a store whose audit head is behind the last acknowledged one.

        With ``accept_loss`` (an operator's explicit decision) the marker is moved back to the
        store's head instead; returns (acknowledged seq, store seq) when that happened."""
        marker = self._read_marker()
        if marker is None or marker.seq < head.seq:
            return None  # a store from before markers, or a crash between commit and marker
        if marker.seq == head.seq and marker.hash == head.hash:
            return None
        if not accept_loss:
            lost = marker.seq - head.seq
            raise IntegrityError(
                f"state store lost {lost if lost > 0 else 'some'} acknowledged change(s): the audit head "
                f"is {head.seq}, {self.home / _MARKER} says {marker.seq} (state.db-wal deleted or damaged?). "
                f"Restore the token's files, or accept the loss: cryptobat recover --accept-lost-changes")
        self.mark(head)
        return marker.seq, head.seq

    def _check_key(self, create: bool) -> None:
        """A key check value: a master key that is not this store's is named as such, not as an edit."""
        kcv = self._mac("cryptobat key check")
        row = self.db.execute("SELECT kcv FROM keycheck WHERE id = 1").fetchone()
        if row is None:
            if create or self.db.execute("SELECT 1 FROM state").fetchone() is None:
                self.db.execute("INSERT INTO keycheck (id, kcv) VALUES (1, ?)", (kcv,))
            return  # a store from before key check values: the state MAC still guards it
        if not hmac.compare_digest(row[0], kcv):
            raise IntegrityError(f"{self.home / 'master.key'} is not the master key of this store "
                                 f"(replaced?); restore the token's own master.key")

    def _acquire_lock(self) -> int:
        try:
            fd = os.open(self.home / "lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            raise StoreError(f"cannot open {self.home / 'lock'}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise TokenBusy(f"token {self.home} is in use by process {pid}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def _mac(self, doc: str) -> str:
        return hmac.new(self._mac_key, doc.encode(), hashlib.sha256).hexdigest()

    def load(self) -> TokenState | None:
        """Return the verified state, or None for a new store."""
        path = self.home / "state.db"
        try:
            row = self.db.execute("SELECT doc, mac FROM state WHERE id = 1").fetchone()
            last = self.db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        except sqlite3.DatabaseError as e:
            raise IntegrityError(f"state store is damaged: {path}: {e}") from None
        if row is None:
            if last is not None or self._read_marker() is not None:
                raise IntegrityError(f"state store is damaged: {path} has no state "
                                     f"(restore the token's files from backup)")
            return None
        doc, mac = row
        if not hmac.compare_digest(self._mac(doc), mac):
            raise IntegrityError("state store integrity check failed: edited outside Cryptobat")
        state = json.loads(doc)
        head = Head(**state["audit"])
        if (tuple(last) if last else (0, GENESIS)) != (head.seq, head.hash):
            raise IntegrityError("audit log does not match the state (entries edited or deleted)")
        return from_json(state)

    def commit(self, state: TokenState, entries: list[tuple[int, str, str]]) -> None:
        """Write ``state`` and append audit ``entries`` atomically."""
        doc = json.dumps(to_json(state), sort_keys=True, separators=(",", ":"))
        mac = self._mac(doc)
        db = self.db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany("INSERT INTO audit (seq, entry, hash) VALUES (?, ?, ?)", entries)
                db.execute("INSERT OR REPLACE INTO state (id, doc, mac) VALUES (1, ?, ?)", (doc, mac))
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:  # disk full, I/O error: nothing was changed
            raise StoreError(f"state store write failed ({e}); nothing changed") from None

    def rekey(self, state: TokenState, entries: list[tuple[int, str, str]], mac_key: bytes) -> None:
        """Commit ``state`` MAC'd under ``mac_key`` (another custody's) with its key check value, in
        one transaction: a crash leaves the store whole under the old key or under the new one.

        The commit marker is the caller's to rewrite (:meth:`mark`) under the new key afterwards."""
        old, self._mac_key = self._mac_key, mac_key
        doc = json.dumps(to_json(state), sort_keys=True, separators=(",", ":"))
        db = self.db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany("INSERT INTO audit (seq, entry, hash) VALUES (?, ?, ?)", entries)
                db.execute("INSERT OR REPLACE INTO state (id, doc, mac) VALUES (1, ?, ?)", (doc, self._mac(doc)))
                db.execute("INSERT OR REPLACE INTO keycheck (id, kcv) VALUES (1, ?)",
                           (self._mac("cryptobat key check"),))
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except BaseException as e:
            self._mac_key = old
            if isinstance(e, sqlite3.Error):
                raise StoreError(f"state store write failed ({e}); nothing changed") from None
            raise

    def keyed_under(self, mac_key: bytes) -> bool | None:
        """Whether the store's key check value is ``mac_key``'s (None: it cannot be read): after
        a :meth:`rekey` that raised, whether its commit landed anyway."""
        try:
            row = self.db.execute("SELECT kcv FROM keycheck WHERE id = 1").fetchone()
        except sqlite3.Error:
            return None
        return row is not None and hmac.compare_digest(
            row[0], hmac.new(mac_key, b"cryptobat key check", hashlib.sha256).hexdigest())

    def marker_under(self, mac_key: bytes) -> Head | None:
        """The commit marker if ``mac_key`` (the custody's before a migration) wrote it, else None."""
        mine, self._mac_key = self._mac_key, mac_key
        try:
            return self._read_marker()
        except IntegrityError:
            return None
        finally:
            self._mac_key = mine

    def audit_rows(self, since: int = 0) -> Iterator[tuple[int, str, str]]:
        try:
            yield from self.db.execute("SELECT seq, entry, hash FROM audit WHERE seq > ? ORDER BY seq", (since,))
        except sqlite3.DatabaseError as e:
            raise IntegrityError(f"state store is damaged: {self.home / 'state.db'}: {e}") from None

    def close(self) -> None:
        self.db.close()
        if self._marker is not None:
            os.close(self._marker)
        os.close(self._lock)
