"""The token: officers, quorum, policy, keys, clock and audit as plain objects.

No sockets, threads, terminals or worker processes live here, and no files are
opened: :mod:`cryptobat.home` opens the store and custody a token is given, and
the console, the native socket and PKCS#11 are adapters that call these methods.
Every state change goes through :meth:`Token._change`, which builds the next
frozen :class:`cryptobat.state.TokenState`, appends its audit entry and commits
both atomically; a refused or failed change leaves the state as it was.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import os
import time
from dataclasses import replace
from typing import Callable, Sequence

from . import audit as auditlog
from . import algorithms, keystore, officers, policy, prehash, rollback, rrsig
from .api import KeyInfo, SignResult
from .audit import Chain, Head
from .clock import DEFAULT_GAP, DEFAULT_TOLERANCE, TrustedClock, _boottime
from .custody import Custody, LoadedKey, RollbackCounter, release
from .errors import (ConfigurationDisabled, Conflict, CryptobatError, IntegrityError, InvalidArgument, KeygenRefused,
                     NotFound, NotPermitted, PinIncorrect, StoreError)
from .quorum import IDLE_TIMEOUT, Approval, PendingOperation, Quorum, Session
from . import signing
from .signing import Job, KeyCache, SignKey, sign_one
from .state import AuditHead, ClockRecord, KeyRecord, Officer, TokenState, with_item, without
from .store import Store
from . import tally
from .tally import Tally

MANUFACTURER = "Cryptobat"
MODEL = "Cryptobat-SW"
MAX_QUORUM = 16
AUDIT_FLUSH_SECONDS = 1.0
MIN_PIN = 6
MAX_PIN_FAILURES = 10  # then the signer PIN is locked until a quorum sets it again
MAX_LABEL = 64
MAX_KEY_FILE = 64 * 1024
MIN_TIME = 1577836800  # 2020-01-01: no token time before this is plausible
# keys one p11window may generate unless the quorum says otherwise: OpenDNSSEC with Debian's
# default conf.xml and KASP pre-generates a year of keys at once (8 a zone: 2 KSKs, 6 ZSKs)
WINDOW_KEYS = 16
MAX_WINDOW_KEYS = 1000


def _generates(algorithm: object) -> bool:
    """Whether the token creates and imports keys of DNSSEC ``algorithm`` (any value a caller sent)."""
    row = algorithms.TABLE.get(algorithm) if isinstance(algorithm, int) else None
    return row is not None and row.generate


def new_state(quorum: int, now: int) -> TokenState:
    """The state of a token just made: no officers, no keys, token time = system time."""
    return TokenState(serial=os.urandom(8).hex().upper(), created=now, quorum=quorum,
                      clock=ClockRecord(offset=0, hwm=now, tampered=False, tolerance=DEFAULT_TOLERANCE,
                                        max_gap=DEFAULT_GAP),
                      idle_timeout=IDLE_TIMEOUT)


class Token:
    """The token's decisions over an opened store and custody (see :mod:`cryptobat.home` to open one).

    Signing runs in this process unless the caller passes another ``run`` (an adapter's
    :class:`cryptobat.workers.Engine`), so a token starts no processes of its own.

    ``counter`` is the custody's rollback counter (None: the custody has none); ``held`` the
    reason a store was refused by it when opened for the officers to decide (see
    :meth:`acceptrollback`): until then nothing is signed and only logins and that decision commit.
    """

    def __init__(self, store: Store, custody: Custody, state: TokenState, *,
                 wall: Callable[[], float] = time.time, mono: Callable[[], float] = _boottime,
                 counter: RollbackCounter | None = None, held: str | None = None) -> None:
        self.store = store
        self.custody = custody
        self.counter = counter
        self.held = held
        self._counter_behind = False  # the last counted change committed, its increment failed
        self.home = store.home
        self.state = state
        self.generation = 0  # counts state changes: caches derived from the state key on it
        self._chain = Chain(Head(state.audit.seq, state.audit.hash))
        c = state.clock
        self.clock = TrustedClock(c.offset, c.hwm, c.tampered, c.tolerance, wall, mono, gap=c.max_gap)
        self.quorum = Quorum(state.idle_timeout)
        self.cache = KeyCache(custody)  # keys unsealed for signing in this process
        self._pending = Tally()
        self.limiter = policy.RateLimiter()
        self._pin_key = os.urandom(32)
        self._pepper = self._read_pepper()
        self._pin_ok: tuple[str, bytes] | None = None
        self._sign_keys: dict[str, tuple[KeyRecord, SignKey]] = {}  # label -> (its record, SignKey of it)
        self._policy: tuple[tuple, policy.Policy] | None = None
        self._parsed = prehash.Parsed()  # bound digests' signing data, parsed at C_DigestFinal
        self._by_tag: tuple[int, dict[tuple[int, int], list[KeyInfo]]] = (-1, {})  # (generation, see _tagged)
        self._write_failed = False
        self._last_flush = mono()
        self._last_refusal_entry: dict[tuple[str, str], float] = {}  # (command, why) -> when last audited alone
        self._open_roles: tuple[int, frozenset[str]] = (-1, frozenset())  # (generation, role-open labels)
        self._mono = mono
        self.started = mono()

    def _read_pepper(self) -> bytes:
        """The key passphrases and the PIN are hashed with: sealed in the state once the token
        changed custody (see :meth:`custodymigrate`), else derived from the custody's MAC key."""
        if self.state.pepper:
            return self.custody.unseal(bytes.fromhex(self.state.pepper), b"cryptobat passphrase pepper")
        return hmac.new(self.custody.mac_key(), b"cryptobat passphrase pepper", hashlib.sha256).digest()

    def close(self) -> None:
        try:
            self.flush_audit(force=True)
        except CryptobatError:
            pass  # the counts are lost with a full disk; the store itself stays consistent
        self.cache.clear()
        self.store.close()
        close = getattr(self.custody, "close", None)  # a device session (the software custody has none)
        if close is not None:
            close()

    # --- state changes and audit --------------------------------------------
    def _change(self, event: str, fields: dict,
                change: Callable[[TokenState], TokenState] = lambda s: s) -> TokenState:
        """Apply ``change`` to the state, audit it as ``event``, and commit both; returns the new state.

        A security-relevant change (:func:`cryptobat.rollback.counts`) commits the state carrying
        the rollback counter's next value, then increments the device: a crash in between leaves
        the store one ahead, which the next open repairs, never behind."""
        if self.held is not None and event not in rollback.HELD_EVENTS:
            raise IntegrityError(self.held)
        counted = self.counter is not None and self.held is None and rollback.counts(event, fields)
        chain = Chain(self._chain.head)
        entries = [chain.append(self._time_for_audit(), event, auditlog.bounded(fields))]
        new = change(self.state).replace(audit=AuditHead(chain.head.seq, chain.head.hash))
        counted = counted and rollback.guarded(new) != rollback.guarded(self.state)
        if counted:
            if self._counter_behind:  # the store is one ahead already: catch up first
                self._increment()
            new = new.replace(rollback=self.state.rollback + 1)
        try:
            self.store.commit(new, entries)
        except CryptobatError:
            self._write_failed = True
            raise
        self.state, self._chain = new, chain
        self.generation += 1
        try:
            self.store.mark(chain.head)  # only now is the change acknowledged
        except CryptobatError:
            self._write_failed = True
            raise
        self._write_failed = False
        if counted:
            self._counter_behind = True
            with contextlib.suppress(CryptobatError):  # committed: retried before the next counted change
                self._increment()
        return new

    def _increment(self) -> None:
        """Bring the device's counter up to the store's (one behind it at most).

        Read first: an increment the TPM carried out but whose answer was lost must not be
        repeated, or the device would pass the store and the next open refuse a store that
        was never rolled back."""
        assert self.counter is not None
        try:
            if self.counter.read() < self.state.rollback:
                self.counter.increment()
        except CryptobatError as e:
            raise StoreError(f"changes refused until the rollback counter can be moved: {e}") from None
        self._counter_behind = False

    # --- rollback detection ---------------------------------------------------------
    def rollback_values(self) -> tuple[int, int | str] | None:
        """(the store's counter value, the device's) for ``status``; None without a counter."""
        if self.counter is None:
            return None
        try:
            return self.state.rollback, self.counter.read()
        except CryptobatError as e:
            return self.state.rollback, f"unreadable ({e})"

    def acceptrollback(self, by: Approval) -> tuple[int, int]:
        """A quorum accepts the store as it is (an older copy, another TPM's): its counter value
        becomes the device's, audited with both; signing resumes. Returns (was, now)."""
        if self.held is None or self.counter is None:
            raise Conflict("the store and the rollback counter agree: nothing to accept")
        try:
            device = self.counter.read()
        except IntegrityError:  # the counter itself is gone: the quorum's decision makes a new one
            renew = getattr(self.custody, "renew_counter", None)
            if renew is None:
                raise
            self.require(by, "rollback-accepted")
            self.counter = renew()
            device = self.counter.read()
        was = self.state.rollback
        self._gated("rollback-accepted", {"store": was, "device": device, "why": self.held},
                    lambda s: s.replace(rollback=device), by)
        self.held = None
        return was, device

    def _time_for_audit(self) -> int:
        return int(self.clock._wall() + self.clock.offset)

    def audit(self, event: str, **fields) -> None:
        self._change(event, fields)

    def now(self) -> int:
        """Token time; records a detected clock tamper or an advanced high-water mark."""
        r = self.clock.read()
        if r.tamper:
            self._change("clock-tamper", {"why": r.tamper}, lambda s: s.with_clock(tampered=True))
        elif r.persist_hwm:
            hwm = self.clock.hwm
            with contextlib.suppress(CryptobatError):  # a full disk must not stop reading the time
                self._change("clock", {"hwm": hwm}, lambda s: s.with_clock(hwm=hwm))
        return r.now

    # --- quorum: sessions, approvals, pending operations -----------------------------
    def open_session(self, transport: str) -> Session:
        return self.quorum.open_session(transport)

    def require(self, by: Approval, event: str) -> set[str]:
        """The officers of ``by`` that make up the quorum for ``event``; a refusal is audited.

        A held token (see :meth:`acceptrollback`) takes no quorum command but that decision."""
        if self.held is not None and event != "rollback-accepted":
            raise IntegrityError(self.held)
        names = by.names() & set(self.state.officers)
        if len(names) < self.state.quorum:
            self.audit("refused", command=event, why="no quorum", **by.audit_fields())
            raise ConfigurationDisabled()
        return names

    def _gated(self, event: str, fields: dict, change: Callable[[TokenState], TokenState],
               by: Approval) -> TokenState:
        """A state change that needs the quorum; the audit names every approving officer and session."""
        self.require(by, event)
        return self._change(event, {**fields, **by.audit_fields()}, change)

    def hold(self, session: Session, text: str, run: Callable[[Approval], str]) -> PendingOperation:
        """Keep a quorum command typed on ``session`` for other officers to approve."""
        op = self.quorum.hold(session, text, run, self.now())
        self.audit("pending", id=op.id, command=text, session=session.id, officers=sorted(op.approvals))
        return op

    def approve(self, session: Session, op_id: int) -> tuple[PendingOperation, str | None]:
        """Approve a pending operation from ``session``; run it once M officers approved it.

        Returns the operation and, if it ran, its answer. Approvals of officers no longer
        enrolled do not count; a failed run leaves nothing pending.
        """
        now = self.now()
        op, names = self.quorum.approve(session, op_id, now)
        self.audit("approve", id=op.id, command=op.text, officers=names, session=session.id)
        enrolled = set(self.state.officers)
        if len(set(op.approvals) & enrolled) < self.state.quorum:
            return op, None
        self.quorum.drop(op.id)
        return op, op.run(op.approval())

    def cancel(self, session: Session, op_id: int) -> None:
        op = self.quorum.get(op_id, self.now())
        here = session.present(self.now())
        if not here:
            raise ConfigurationDisabled()
        self.quorum.drop(op.id)
        self.audit("cancel", id=op.id, command=op.text, officers=sorted(here), session=session.id)

    def pending(self) -> list[PendingOperation]:
        return self.quorum.pending(self.now())

    # --- what adapters read -----------------------------------------------------
    def snapshot(self) -> TokenState:
        """The current state: frozen, so a reader's copy never changes under it."""
        return self.state

    def serial(self) -> str:
        return self.state.serial

    def quorum_size(self) -> int:
        """M: the officers a quorum command needs."""
        return self.state.quorum

    def audit_seq(self) -> int:
        return self._chain.head.seq

    def can_approve(self) -> bool:
        """Whether at least M officers are enrolled (else a quorum command can never be approved)."""
        return len(self.state.officers) >= self.state.quorum

    # --- officers ----------------------------------------------------------------
    def officer_names(self) -> list[str]:
        return list(self.state.officers)

    def is_officer(self, name: str) -> bool:
        return name in self.state.officers

    def _officer(self, name: str) -> Officer:
        o = self.state.officers.get(name)
        if o is None:
            raise NotFound(f"no officer {name!r}")
        return o

    def coadd(self, name: str, session: Session, by: Approval) -> tuple[str, str]:
        """Enrol an officer; return (TOTP secret, otpauth URI).

        The first M officers are enrolled at the token itself (local terminal, pty or
        serial console), never over a socket; after that it takes the quorum.
        """
        if not officers.valid_name(name):
            raise InvalidArgument("officer names are 1-32 letters, digits, '.', '_' or '-'")
        if name in self.state.officers:
            raise Conflict(f"officer {name!r} already enrolled")
        bootstrap = len(self.state.officers) < self.state.quorum
        if bootstrap and not session.local:
            self.audit("refused", command="coadd", why="first officers are enrolled at the token's own console",
                       session=session.id)
            raise NotPermitted("the first officers are enrolled on the token's own console "
                                 "(cryptobat console without a daemon, the pty or the serial line)")
        if not bootstrap:
            self.require(by, "coadd")
        secret = officers.new_secret()
        sealed = self.custody.seal(secret.encode(), b"officer:" + name.encode()).hex()
        rec = Officer(secret=sealed, enrolled=self.now())

        def add(s: TokenState) -> TokenState:
            return s.with_officer(name, rec)

        if bootstrap:
            self._change("coadd", {"name": name, "bootstrap": True, "session": session.id}, add)
        else:
            self._gated("coadd", {"name": name}, add, by)
        return secret, officers.provisioning_uri(name, secret, self.state.serial)

    def codel(self, name: str, by: Approval) -> None:
        self._officer(name)
        if len(self.state.officers) - 1 < self.state.quorum:
            raise Conflict("removing this officer would leave fewer officers than the quorum")
        self._gated("codel", {"name": name}, lambda s: s.replace(officers=without(s.officers, name)), by)
        self.quorum.forget(name)

    def has_passphrase(self, name: str) -> bool:
        return bool(self._officer(name).passphrase)

    def copass(self, name: str, old: str | None, new: str, session: Session) -> None:
        """An officer sets their own passphrase: logged in on ``session``, and knowing the old one."""
        rec = self._officer(name)
        now = self.now()
        if name not in session.present(now):
            raise NotPermitted(f"CO {name} must be logged in on this session to set a passphrase")
        if rec.passphrase and (old is None or not officers.check_passphrase(rec.passphrase, old, self._pepper)):
            self.audit("copass", name=name, ok=False, why="old passphrase wrong", session=session.id)
            raise PinIncorrect("old passphrase is wrong")
        if len(new) < 8:
            raise InvalidArgument("passphrase must be at least 8 characters")
        record = officers.hash_passphrase(new, self._pepper)
        self._change("copass", {"name": name, "ok": True, "session": session.id},
                     lambda s: s.with_officer(name, replace(s.officers[name], passphrase=record)))
        session.refresh({name}, now)

    def cologin(self, name: str, code: str, passphrase: str | None, session: Session) -> bool:
        if name not in self.state.officers:
            self.audit("cologin", name=name, ok=False, why="unknown officer", session=session.id)
            return False
        now = self.now()
        rec = self.state.officers[name]
        secret = self.custody.unseal(bytes.fromhex(rec.secret), b"officer:" + name.encode()).decode()
        # TOTP runs on real time (the system clock), not token time: a quorum's settime, or a
        # token clock in tamper state, must not lock the officers out of fixing it
        rec, outcome = officers.login(rec, secret, code, passphrase, int(self.clock._wall()),
                                 remote=not session.local, pepper=self._pepper)
        counter = "logins" if outcome.ok else "login_failures"

        def apply(s: TokenState) -> TokenState:
            return s.with_officer(name, rec).replace(counters=s.counters.add(**{counter: 1}))

        self._change("cologin", {"name": name, "ok": outcome.ok, "why": outcome.why, "session": session.id}, apply)
        if outcome.ok:
            session.arrive(name, now)
        return outcome.ok

    def present(self, session: Session | None = None) -> set[str]:
        """Officers present on ``session``, or on any session."""
        now = self.now()
        if session is not None:
            return session.present(now)
        return set().union(*(s.present(now) for s in self.quorum.sessions()))

    def uptime(self) -> float:
        return self._mono() - self.started

    def colist(self, session: Session) -> list[tuple[str, bool]]:
        here = session.present(self.now())
        return [(n, n in here) for n in self.state.officers]

    def coreset(self, session: Session) -> None:
        session.reset()
        self.audit("coreset", session=session.id)

    # --- configuration under quorum ----------------------------------------------
    def setmaxval(self, seconds: int, by: Approval) -> None:
        if not 0 < seconds <= 10 * 365 * 86400:
            raise InvalidArgument("maximum validity must be between 1 second and 10 years")
        self._gated("setmaxval", {"seconds": seconds}, lambda s: s.replace(max_validity=seconds), by)

    def setquorum(self, m: int, by: Approval) -> None:
        if not 1 <= m <= min(MAX_QUORUM, len(self.state.officers)):
            raise InvalidArgument("quorum must be at least 1 and at most the number of officers")
        self._gated("setquorum", {"quorum": m}, lambda s: s.replace(quorum=m), by)

    @staticmethod
    def check_new_pin(pin: str) -> None:
        if len(pin) < MIN_PIN:
            raise InvalidArgument(f"PIN must be at least {MIN_PIN} characters")
        if len(pin) > 256 or not pin.isprintable():
            raise InvalidArgument("PIN must be at most 256 printable characters")

    def setpin(self, pin: str, by: Approval) -> None:
        self.check_new_pin(pin)
        record = officers.hash_passphrase(pin, self._pepper)
        self._gated("setpin", {}, lambda s: s.replace(pin=record, pin_failures=0), by)
        self._pin_ok = None

    def settime(self, token_time: int, by: Approval) -> None:
        token_time = int(token_time)
        if not MIN_TIME <= token_time < 2**32:
            raise InvalidArgument("time must be between 2020-01-01 and 2106-02-07 (RRSIG time range)")
        offset = int(token_time - self.clock._wall())
        self._gated("settime", {"time": token_time},
                    lambda s: s.with_clock(offset=offset, hwm=token_time, tampered=False), by)
        self.clock.set(offset, token_time)

    def setclockgap(self, seconds: int, by: Approval) -> None:
        """How far past the last trusted time the clock may be found at start (downtime allowance)."""
        if not 60 <= seconds <= 365 * 86400:
            raise InvalidArgument("the clock gap allowance is 60 seconds to 365 days")
        self._gated("setclockgap", {"seconds": seconds}, lambda s: s.with_clock(max_gap=seconds), by)
        self.clock.gap = seconds

    def setcompat(self, label: str, on: bool, by: Approval) -> None:
        self.key(label)
        self._gated("setcompat", {"label": label, "on": on},
                    lambda s: s.with_key(replace(s.keys[label], info=replace(s.keys[label].info, compat=on))), by)

    def p11window(self, seconds: int, zone: str, by: Approval, keys: int = WINDOW_KEYS) -> None:
        """Open PKCS#11 key generation and deletion for ``seconds``, for ``zone``'s keys only,
        for at most ``keys`` new keys (a KASP policy makes its spare keys at once)."""
        if not 0 <= seconds <= 3600:
            raise InvalidArgument("the PKCS#11 key management window is 0 to 3600 seconds")
        if not 0 <= keys <= MAX_WINDOW_KEYS:
            raise InvalidArgument(f"a PKCS#11 key management window generates 0 to {MAX_WINDOW_KEYS} keys")
        zone = keystore.parse_zone(zone)
        until = self.now() + seconds
        self._gated("p11window", {"seconds": seconds, "zone": zone, "keys": keys},
                    lambda s: s.replace(p11_window_until=until, p11_window_zone=zone, p11_window_keys=keys), by)

    def keyrole(self, label: str, role: str, by: Approval) -> KeyInfo:
        """A quorum sets a key's role (and so its DNSKEY flags and key tag) and fixes it."""
        role = keystore.parse_role(role)
        old = self.key(label)
        info = keystore.with_role(old, role)
        self._check_tag(info)
        self._gated("keyrole", {"label": label, "role": role, "keytag": info.keytag, "was": old.keytag},
                    lambda s: s.with_key(replace(s.keys[label], info=info, role_open=False)), by)
        return info

    def _check_tag(self, info: KeyInfo) -> None:
        """A key's new tag must not be another key's in its zone (RRSIGs name keys by tag)."""
        if any(k.keytag == info.keytag and k.label != info.label for k in self.keys() if k.zone == info.zone):
            raise Conflict(f"key tag {info.keytag} is already in use in {info.zone}")

    def keyallow(self, zone: str, dnskey_text: str, by: Approval) -> int:
        """Let the zone's KSKs sign DNSKEY/CDS/CDNSKEY sets holding a key the token does not hold
        (a rollover's incoming key, another signer's key); returns its key tag."""
        import dns.dnssec
        import dns.rdata
        zone = keystore.parse_zone(zone)
        try:
            rd = dns.rdata.from_text("IN", "DNSKEY", dnskey_text)
        except Exception as e:  # dnspython raises many types for bad text
            raise InvalidArgument(f"not DNSKEY RDATA: {e}") from None
        wire = rd.to_digestable().hex()
        tag = dns.dnssec.key_id(rd)

        def add(s: TokenState) -> TokenState:
            keys = s.allowed_keys.get(zone, ())
            return s.replace(allowed_keys=with_item(s.allowed_keys, zone, keys if wire in keys else (*keys, wire)))

        self._gated("keyallow", {"zone": zone, "keytag": tag, "flags": rd.flags, "algorithm": int(rd.algorithm)},
                    add, by)
        return tag

    def keydisallow(self, zone: str, keytag: int, by: Approval) -> None:
        import dns.dnssec
        import dns.rdata
        zone = keystore.parse_zone(zone)
        keep = tuple(w for w in self.state.allowed_keys.get(zone, ())
                if dns.dnssec.key_id(dns.rdata.from_wire("IN", "DNSKEY", bytes.fromhex(w), 0,
                                                         len(w) // 2)) != keytag)
        if len(keep) == len(self.state.allowed_keys.get(zone, ())):
            raise NotFound(f"no allowed key with tag {keytag} for {zone}")
        self._gated("keydisallow", {"zone": zone, "keytag": keytag},
                    lambda s: s.replace(allowed_keys=with_item(s.allowed_keys, zone, keep)), by)

    def cdsdelete(self, seconds: int, zone: str, by: Approval) -> None:
        """Open a window in which the zone's KSK signs the RFC 8078 delete CDS/CDNSKEY."""
        if not 0 <= seconds <= 7 * 86400:
            raise InvalidArgument("the CDS delete window is 0 seconds to 7 days")
        zone = keystore.parse_zone(zone)
        until = self.now() + seconds
        self._gated("cdsdelete", {"seconds": seconds, "zone": zone},
                    lambda s: s.replace(cds_delete=with_item(s.cds_delete, zone, until)), by)

    def signerpeers(self, peers: list[str], by: Approval) -> None:
        """Unix users/groups whose connections to the signer sockets need no PIN."""
        for p in peers:
            kind, _, num = p.partition(":")
            if kind not in ("uid", "gid") or not num.isdigit() or int(num) > 2**32 - 1:
                raise InvalidArgument(f"signer peer {p!r} is not uid:N or gid:N")
        self._gated("signerpeers", {"peers": peers}, lambda s: s.replace(signer_peers=tuple(peers)), by)

    def peer_allowed(self, uid: int, gid: int) -> bool:
        peers = self.state.signer_peers
        return f"uid:{uid}" in peers or f"gid:{gid}" in peers

    def keygen_allowed(self) -> bool:
        return self.state.p11_window_until > self.now()

    def _window_zone(self, zone: str) -> str:
        if not self.keygen_allowed():
            raise KeygenRefused("no PKCS#11 key management window open")
        wz = self.state.p11_window_zone
        if zone and keystore.parse_zone(zone) != wz:
            raise KeygenRefused(f"the PKCS#11 key management window is for {wz}, not {zone}")
        return wz

    def _check_label(self, label: str) -> None:
        """A label a new key may take: a PKCS#11 client learns which rule it broke by the code."""
        if label in self.state.keys:
            raise Conflict(f"label {label[:MAX_LABEL]!r} is taken")
        if any(k.cka_id == label.encode() for k in self.keys()):  # a key without an id of its own
            raise Conflict(f"label {label[:MAX_LABEL]!r} is another key's CKA_ID")  # is found by its label
        if not label.isprintable() or " " in label or len(label) > MAX_LABEL:
            raise InvalidArgument(f"label {label[:MAX_LABEL]!r} is too long or not printable")

    def generate_key(self, algorithm: int, role: str, zone: str, label: str,
                     p11_id: bytes | None = None) -> KeyInfo:
        """PKCS#11 C_GenerateKeyPair: only inside a window a quorum opened, for the window's zone,
        as many keys as it allows. ``label`` and ``p11_id`` are the application's CKA_LABEL and
        CKA_ID (either may be empty); refusals are audited with their reason.

        The key is made as ``role`` (a CSK) with its role open: its first signature settles it
        (see :meth:`_settle_roles`), so its flags and key tag become what the application publishes."""
        try:
            zone = self._window_zone(zone)
            if self.state.p11_window_keys <= 0:
                raise KeygenRefused("the PKCS#11 key management window has generated all the keys it allows")
        except KeygenRefused as e:
            self._refused_management("p11-keygen", label, str(e))
            raise
        if not _generates(algorithm):
            raise InvalidArgument(f"algorithm {algorithm} is not supported")
        if p11_id is not None and not 0 < len(p11_id) <= MAX_LABEL:
            raise InvalidArgument(f"CKA_ID must be 1 to {MAX_LABEL} bytes")
        if p11_id is not None and any(k.cka_id == p11_id for k in self.keys()):
            raise Conflict(f"CKA_ID {p11_id.hex()} is taken")
        if label:
            self._check_label(label)
        elif p11_id:
            label = base = keystore.p11_label(p11_id)
            n = 1
            while label in self.state.keys:  # printable and unique; the CKA_ID stays the application's
                n += 1
                label = f"{base[:MAX_LABEL - 4]}-{n}"
        info, rec = self._generate(algorithm, keystore.parse_role(role), zone, label or None)
        if p11_id is not None and p11_id != info.label.encode():
            info = replace(info, p11_id=p11_id)
        rec = replace(rec, info=info, role_open=True)

        def add(s: TokenState) -> TokenState:
            return s.with_key(rec).replace(p11_window_keys=s.p11_window_keys - 1)

        self._change("p11-keygen", {"label": info.label, "zone": info.zone, "algorithm": algorithm,
                                    "role": info.role, "keytag": info.keytag,
                                    "keys_left": self.state.p11_window_keys - 1,
                                    **({"id": p11_id.hex()} if p11_id is not None else {})}, add)
        return info

    def delete_key(self, label: str) -> None:
        """PKCS#11 C_DestroyObject: only inside a window, and only keys of the window's zone."""
        try:
            self._window_zone(self.key(label).zone)
        except KeygenRefused as e:
            self._refused_management("p11-keydel", label, str(e))
            raise NotPermitted(str(e)) from None
        rec = self.state.keys[label]
        self._change("p11-keydel", {"label": label}, lambda s: s.replace(keys=without(s.keys, label)))
        self._destroy(rec)

    # --- keys -----------------------------------------------------------------------
    def keys(self) -> list[KeyInfo]:
        return [r.info for r in self.state.keys.values()]

    def key(self, label: str) -> KeyInfo:
        rec = self.state.keys.get(label)
        if rec is None:
            raise NotFound(f"no key labelled {label!r}")
        return rec.info

    def _generate(self, algorithm: int, role: str, zone: str, label: str | None,
                  private_key=None) -> tuple[KeyInfo, KeyRecord]:
        """Create (or, given ``private_key``, import) a key; return its info and state record."""
        zone = keystore.parse_zone(zone)
        if label is not None:
            self._check_label(label)
        tags = {k.keytag for k in self.keys() if k.zone == zone}
        for _ in range(16):  # a fresh key whose tag collides with one in the zone is discarded
            tmp = label or os.urandom(8).hex()
            if private_key is not None:
                public, blob = self.custody.import_key(algorithm, private_key, tmp.encode())
            else:
                public, blob = self.custody.generate(algorithm, tmp.encode())
            info = keystore.make_info(tmp, zone, algorithm, role, public)
            if info.keytag not in tags:
                break
            if private_key is not None:
                raise Conflict(f"key tag {info.keytag} is already in use in {zone}")
        else:
            raise Conflict("could not find a free key tag")
        if label is None:
            final = keystore.default_label(zone, role, info.keytag)
            while final in self.state.keys:
                final += "x"
            # reseal under the final label so the label stays bound to the key
            blob = self.custody.seal(self.custody.unseal(blob, tmp.encode()), final.encode())
            info = keystore.make_info(final, zone, algorithm, role, public)
        return info, KeyRecord(info, blob.hex(), self.now())

    def keygen(self, algorithm: int, role: str, zone: str, label: str | None, by: Approval) -> KeyInfo:
        self.require(by, "keygen")  # before the (slow) generation
        info, rec = self._generate(algorithm, role, zone, label)
        self._gated("keygen", {"label": info.label, "zone": info.zone, "algorithm": algorithm,
                               "role": role, "keytag": info.keytag},
                    lambda s: s.with_key(rec), by)
        return info

    def keyimport(self, role: str, zone: str, key_text: str, label: str | None, by: Approval) -> KeyInfo:
        """Take an existing private key (the text of a BIND .private or PEM file) into the token.

        Adapters check the quorum with :meth:`require` before they read the file."""
        from . import bindkey
        self.require(by, "keyimport")
        algorithm, private_key = bindkey.load(key_text)
        algorithm = algorithm or bindkey.algorithm_of(private_key)
        if not _generates(algorithm):
            raise InvalidArgument(f"algorithm {algorithm} is not supported by the token")
        info, rec = self._generate(algorithm, role, zone, label, private_key)
        self._gated("keyimport", {"label": info.label, "zone": info.zone, "algorithm": algorithm,
                                  "role": role, "keytag": info.keytag},
                    lambda s: s.with_key(rec), by)
        return info

    def keydel(self, label: str, by: Approval) -> None:
        self.key(label)
        rec = self.state.keys[label]
        self._gated("keydel", {"label": label}, lambda s: s.replace(keys=without(s.keys, label)), by)
        self._destroy(rec)

    def _destroy(self, rec: KeyRecord) -> None:
        """Remove a deleted key's backing object from the custody (an HSM's key object).

        Only after the deletion committed: a crash in between leaves an orphan object in the
        device, never a key in the state whose object is gone. A failure is audited, not raised:
        the key is deleted from the token either way."""
        destroy = getattr(self.custody, "destroy", None)
        if destroy is None:  # a custody whose blob is all there is (software)
            return
        try:
            destroy(bytes.fromhex(rec.blob), rec.info.label.encode())
        except CryptobatError as e:
            with contextlib.suppress(CryptobatError):
                self.audit("custody-orphan", label=rec.info.label, why=str(e))

    # --- changing custody ---------------------------------------------------------------
    def custodymigrate(self, kind: str, config: dict, by: Approval, migration) -> list[dict]:
        """Move this software-custody token's keys and sealed values into ``kind`` custody (a
        quorum decision); the keys moved, each with its unchanged key tag.

        ``migration`` is :mod:`cryptobat.migration`, given by the adapter (the core opens no
        files): its steps, and why each is safe to die after, are there. The commit point is
        the one transaction that writes the re-sealed state under the target's MAC key; after
        it this token signs through the target custody."""
        self.require(by, "custody-migrated")
        migration.check_direction(self.custody.name, kind)
        target = migration.prepare_target(self.home, kind, config)
        committing = False
        try:
            new, moved = migration.reseal(self.state, self.custody, target, self._pepper)
            counter = getattr(target, "counter", None)
            counter = counter() if counter is not None else None
            fields = {"from": self.custody.name, "to": target.name, "keys": moved, **by.audit_fields()}
            chain = Chain(self._chain.head)
            entries = [chain.append(self._time_for_audit(), "custody-migrated", auditlog.bounded(fields))]
            new = new.replace(audit=AuditHead(chain.head.seq, chain.head.hash),
                              rollback=counter.read() if counter is not None else 0)
            migration.write_next(self.home, kind)
            committing = True
            self.store.rekey(new, entries, target.mac_key())
        except BaseException:
            if not committing:  # nothing refers to the target yet: its files and device objects go
                release(target, "discard", "close")
                migration.discard(self.home, kind)
                raise
            if self.store.keyed_under(target.mac_key()) is not True:
                # A commit that reported an error may still surface at the next open (a WAL frame
                # written before the error), so nothing of the target is removed: closed, and the
                # next open decides from the store (migration.resume); signing waits for a write.
                release(target, "close")
                self._write_failed = True
                raise
            # the commit landed although the write reported an error (a late I/O error): keep it
        self._switch(target, counter, new, chain)
        migration.finish(self.home)
        return moved

    def _switch(self, target: Custody, counter: RollbackCounter | None, state: TokenState, chain: Chain) -> None:
        """This token after the migration committed: the new state and custody, no key unsealed
        from the old one kept."""
        self.state, self._chain = state, chain
        self.generation += 1
        self.cache.clear()  # the same cache object: an engine sharing it sees the new custody
        self.cache.custody = target
        self.custody, self.counter, self._counter_behind = target, counter, False
        release(target, "kept")  # the store refers to what it made: never discarded now
        self._sign_keys = {}
        try:
            self.store.mark(chain.head)
        except CryptobatError:
            self._write_failed = True  # as in _change: committed, the marker retried with the next change
            raise

    # --- signing ------------------------------------------------------------------------
    def policy(self) -> policy.Policy:
        """The policy every signature is checked against, rebuilt only when what it is made of
        changes: not when an audit entry only moves the counters (once per signzone zone)."""
        tampered = self.clock.tampered or self.state.clock.tampered
        st = self.state
        basis = (st.keys, st.allowed_keys, st.cds_delete, st.max_validity, tampered)  # frozen: same object, same value
        cached = self._policy
        if cached is not None and all(a is b for a, b in zip(cached[0], basis)):
            return cached[1]
        zone_keys: dict[bytes, set[bytes]] = {}
        for rec in self.state.keys.values():
            k = rec.info
            forms = zone_keys.setdefault(keystore.zone_wire(k.zone), set())
            forms.add(k.dnskey().to_digestable())
            if rec.role_open:  # the application may publish it as a ZSK (flags 256) or a KSK (257)
                forms.update(keystore.with_role(k, r).dnskey().to_digestable() for r in ("zsk", "ksk"))
        for zone, wires in self.state.allowed_keys.items():
            zone_keys.setdefault(keystore.zone_wire(zone), set()).update(bytes.fromhex(w) for w in wires)
        p = policy.Policy(self.state.max_validity, tampered,
                          zone_keys={z: frozenset(v) for z, v in zone_keys.items()},
                          delete_until={keystore.zone_wire(z): t for z, t in self.state.cds_delete.items()})
        self._policy = (basis, p)
        return p

    def loaded_key(self, label: str) -> LoadedKey:
        """``label``'s key as the signing path holds it, for a transport that shows or unloads its
        device handle (:class:`cryptobat.custody.DeviceKey`); signing stays with :meth:`timed_sign`."""
        key = self._sign_key(label)
        if key is None:
            raise NotFound(f"no key labelled {label!r}")
        return self.cache.get(label, key)

    def _sign_key(self, label: str) -> SignKey | None:
        """The SignKey of the current record for ``label``, rebuilt whenever that record is
        another object (records are frozen), so it is always derived from the current state."""
        recs = self.state.keys
        rec = recs.get(label)
        if rec is None:
            return None
        cached = self._sign_keys.get(label)
        if cached is None or cached[0] is not rec:
            if len(self._sign_keys) > 2 * len(recs) + 16:
                self._sign_keys.clear()
            info = rec.info
            cached = self._sign_keys[label] = (rec, SignKey(info, keystore.zone_wire(info.zone),
                                                            bytes.fromhex(rec.blob)))
        return cached[1]

    def _role_open(self) -> frozenset[str]:
        """Labels of the keys whose role is still open (recomputed only when the state changes)."""
        gen, labels = self._open_roles
        if gen != self.generation:
            labels = frozenset(label for label, r in self.state.keys.items() if r.role_open)
            self._open_roles = (self.generation, labels)
        return labels

    def _settle_roles(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Fix the role of each role-open key from the first RRSIG it is asked to sign.

        The role is taken only if the key in that role passes the full policy for that very
        data, and is then fixed (audited): the signing host picks it once, as it picked the
        flags it published, and only a quorum's ``keyrole`` changes it afterwards."""
        open_ = self._role_open()
        if not open_:
            return
        for label, data in items:
            if label not in open_ or not self.state.keys[label].role_open:
                continue
            try:
                h = rrsig.header(data)
            except CryptobatError:
                continue
            info = self.state.keys[label].info
            role = policy.settled_role(info, h.type_covered, h.key_tag)
            if role is None or h.algorithm != info.algorithm:
                continue
            new = keystore.with_role(info, role)
            try:
                self._check_tag(new)
                policy.check(new, keystore.zone_wire(new.zone), data, self.policy(), self.now())
            except CryptobatError:
                continue  # refused as it stands; the role stays open
            self._change("keyrole", {"label": label, "role": role, "keytag": new.keytag, "was": info.keytag,
                                     "by": "first signature"},
                         lambda s: s.with_key(replace(s.keys[label], info=new, role_open=False)))

    def sign_job(self, items: Sequence[tuple[str, bytes]]) -> Job:
        if self.held is not None:
            raise IntegrityError(self.held)
        self._settle_roles(items)
        if self._write_failed:  # nothing is signed that the audit cannot record; retried each call
            try:
                self._flush()
            except CryptobatError as e:
                raise StoreError(f"signing refused: {e}") from None
        now = self.now()
        wanted = {label for label, _ in items}
        keys = {}
        for label in wanted:
            key = self._sign_key(label)
            if key is not None:
                keys[label] = key
        return Job(self.policy(), now, keys, items)

    def run(self, job: Job) -> list[SignResult]:
        """Sign ``job`` in this process (adapters with worker processes pass their own ``run``)."""
        return signing.run(self.cache, job)

    def timed_sign(self, items: Sequence[tuple[str, bytes]],
                   run: Callable[[Job], list[SignResult]] | None = None) -> list[SignResult]:
        """Check and sign each (label, RRSIG signing data); results in order.

        ``run`` signs the job (e.g. ``engine.run`` to use worker processes); in-process by default."""
        results = (run or self.run)(self.sign_job(items))
        self.account(results, labels=[label for label, _ in items])
        return results

    def timed_sign_verbose(self, label: str, data: bytes) -> tuple[SignResult, int]:
        """One payload, with the latest expiration the policy allowed (for the console's report)."""
        job = self.sign_job([(label, data)])
        result = sign_one(self.cache, job, label, data)
        self.account([result], labels=[label])
        return result, policy.limit(job.policy, job.now)

    def check_signing_data(self, label: str, data: bytes) -> str | None:
        """The policy verdict on ``data`` for ``label`` without signing: None or the reason."""
        return self._verdict(label, data)[0]

    def _verdict(self, label: str, data: bytes) -> tuple[str | None, rrsig.SigningData | None]:
        """:meth:`check_signing_data`, with the parsed data when it passed."""
        job = self.sign_job([(label, data)])
        if label not in job.keys:
            return f"no key labelled {label[:64]!r}", None
        why, sd = signing.verdict(job, label, data)
        if why is not None:
            self.account([SignResult(reason=why)], labels=[label])
        return why, sd

    def bind_digest(self, hashed: str, data: bytes, digest: bytes) -> list[tuple[str, bytes]]:
        """Which keys a finished digest of ``data`` binds to; see :func:`cryptobat.prehash.bindings`.
        The data that passed is kept parsed for :meth:`sign_digest` (checked again there, not parsed)."""
        open_ = self._role_open()
        if open_:
            self._settle_roles([(label, data) for label in open_])

        def accepts(label: str) -> bool:
            why, sd = self._verdict(label, data)
            if sd is not None:
                self._parsed.keep(data, sd)
            return why is None
        try:
            h = rrsig.header(data)
        except CryptobatError:
            return []
        return prehash.bindings(self._tagged().get((h.algorithm, h.key_tag), ()), hashed, data, digest, accepts)

    def _tagged(self) -> dict[tuple[int, int], list[KeyInfo]]:
        """(algorithm, key tag) -> the keys with them, recomputed only when the state changes:
        the keys a digest can bind to, found without looking at every key of a large token."""
        gen, by_tag = self._by_tag
        if gen != self.generation:
            by_tag = {}
            for r in self.state.keys.values():
                by_tag.setdefault((r.info.algorithm, r.info.keytag), []).append(r.info)
            self._by_tag = (self.generation, by_tag)
        return by_tag

    def sign_digest(self, label: str, raw: bytes, mechanism: str, bound: bytes | None) -> SignResult:
        """Hash-only signing of mechanism input ``raw``; see :func:`cryptobat.prehash.authorise`."""
        job = self.sign_job([])
        key = self._sign_key(label)
        if key is None:
            return SignResult(reason=f"no key labelled {label[:64]!r}")
        try:
            parsed = None if bound is None else self._parsed.take(bound)
            digest = prehash.authorise(key.info, key.zone_wire, mechanism, raw, bound, job.policy, job.now,
                                       self.limiter, self._mono(), parsed)
        except CryptobatError as e:
            result = SignResult(reason=str(e))
        else:
            result = SignResult(signature=self.cache.get(label, key).sign_digest(digest))
        self.account([result], compat=bound is None, labels=[label])
        return result

    def account(self, results: Sequence[SignResult], compat: bool = False,
                labels: Sequence[str] | None = None) -> None:
        """Count signatures and refusals (:class:`cryptobat.tally.Tally`), refusals by the key
        ``labels`` names for each result; audit them at most once a second."""
        if labels is not None and not all(r.ok for r in results):  # a label no key has is the client's
            keys = self.state.keys                                 # invention: counted under no key
            labels = [label if label in keys else tally.NO_KEY for label in labels]
        self._pending.add(results, compat, labels)
        self.flush_audit()

    def _refused_management(self, command: str, label: str, why: str) -> None:
        """A refused PKCS#11 key generation or deletion. The first of a reason in a second is audited
        at once in an entry of its own (``refused``, with its reason); the rest of that second are
        counted and audited together (:meth:`refused`), so a client repeating the call cannot fill
        the disk."""
        now = self._mono()
        last = self._last_refusal_entry
        if len(last) >= 64:  # forget the reasons not seen for a second
            for k in [k for k, t in last.items() if now - t >= AUDIT_FLUSH_SECONDS]:
                del last[k]
        seen = last.get((command, why))
        if (seen is not None and now - seen < AUDIT_FLUSH_SECONDS) or (seen is None and len(last) >= 64):
            # a reason audited alone this second, or 64 reasons already were (a client varying the
            # zone it names gets no more entries than that a second): counted, audited with the rest
            self.refused(label, f"{command}: {why}")
            return
        last[(command, why)] = now
        pair = {(label if label in self.state.keys else tally.NO_KEY, tally.reason_kind(f"{command}: {why}")): 1}

        self._change("refused", {"command": command, "label": label, "why": why},
                     lambda s: s.replace(counters=s.counters.with_refused(pair)))

    def refused(self, key: str, reason: str, pin: bool = False) -> None:
        """Count a refused call that is not a signature; audited with the next flush, as signatures are.
        A ``key`` the token has no key for (a label to generate, say) is counted under no key."""
        self._pending.refuse(key if key in self.state.keys else tally.NO_KEY, reason, pin)
        self.flush_audit()

    def flush_audit(self, force: bool = False) -> None:
        if not self._pending.empty and (force or self._mono() - self._last_flush >= AUDIT_FLUSH_SECONDS):
            self._flush()

    def _flush(self) -> None:
        p = self._pending
        event, fields = p.audit_event()

        def count(s: TokenState) -> TokenState:
            c = s.counters.add(signatures=p.signatures, refusals=p.refusals, compat_signatures=p.compat_signatures)
            return s.replace(counters=c.with_refused(p.keyed) if p.keyed else c)

        self._change(event, fields, count)
        self._pending = Tally()
        self._last_flush = self._mono()

    def counters(self) -> dict:
        """Cumulative counts, those not yet audited included; ``refused``: key -> reason -> count."""
        counters = self.state.counters
        c: dict = {f.name: getattr(counters, f.name) for f in dataclasses.fields(counters)}
        for k in ("signatures", "compat_signatures", "refusals"):
            c[k] += getattr(self._pending, k)
        c["refused"] = tally.merge(counters.refused, self._pending.keyed)
        return c

    # --- signer PIN and other PKCS#11 needs ------------------------------------------
    def check_pin(self, pin: bytes | str, lock=None, source: str = "pkcs11") -> bool:
        """The signer PIN, with a lockout: after MAX_PIN_FAILURES wrong PINs in a row it is
        locked until a quorum sets it again (reported to PKCS#11 as CKF_USER_PIN_LOCKED).

        ``lock`` (the adapter's token lock) is held for reading and recording, not for the
        scrypt in between, so a login never stalls signing. A PIN once verified is remembered
        (as a keyed hash) so that signers logging in for every session do not pay scrypt each
        time; a wrong PIN always does.
        """
        lock = lock or contextlib.nullcontext()
        text = pin.decode(errors="replace") if isinstance(pin, bytes) else pin
        if self.held is not None:
            raise IntegrityError(self.held)
        with lock:
            if self._write_failed:  # a wrong PIN that could not be counted would be a free guess:
                self._change("store-retry", {"why": "PIN check"}, lambda s: s)  # check nothing until it can
            rec = self.state.pin
            why = "no PIN set" if rec is None else "PIN locked" if self.pin_locked() else None
            if why:  # no scrypt spent; counted, audited with the next flush (at most once a second)
                self.refused(tally.NO_KEY, f"PIN refused: {why}", pin=True)
                return False
            tag = (rec.hash, hmac.new(self._pin_key, text.encode(), hashlib.sha256).digest())
            cached = self._pin_ok
        ok = (cached is not None and hmac.compare_digest(cached[1], tag[1]) and cached[0] == tag[0]) \
            or officers.check_passphrase(rec, text, self._pepper)
        with lock:
            if self.state.pin != rec:
                return False  # the PIN changed meanwhile
            if ok:
                self._pin_ok = tag
                if self.state.pin_failures:
                    self._change("pin", {"ok": True, "source": source}, lambda s: s.replace(pin_failures=0))
            else:
                n = self.state.pin_failures + 1
                self._change("pin", {"ok": False, "failures": n, "source": source,  # counted in this entry
                                     **({"why": rollback.PIN_LOCKED} if n >= MAX_PIN_FAILURES else {})},
                             lambda s: s.replace(pin_failures=n, counters=s.counters.with_refused(
                                 {(tally.NO_KEY, "PIN incorrect"): 1})))
        return ok

    def pin_locked(self) -> bool:
        return self.state.pin_failures >= MAX_PIN_FAILURES

    def pin_tries_left(self) -> int:
        return max(0, MAX_PIN_FAILURES - self.state.pin_failures)

    def random(self, n: int) -> bytes:
        """C_GenerateRandom: the OS generator, mixed with the custody's device where it has one."""
        device = getattr(self.custody, "random", None)
        return device(n) if device is not None else os.urandom(n)

    def info(self) -> dict:
        """What the native API's ``info`` and PKCS#11's C_GetTokenInfo report (no device round trip:
        the store's rollback counter value only; ``status`` reads the device's too)."""
        out = {"label": f"Cryptobat {self.state.serial[:8]}", "serial": self.state.serial,
               "manufacturer": MANUFACTURER, "model": MODEL, "time": self.now(),
               "pin_tries_left": self.pin_tries_left(), "pin_failures": self.state.pin_failures,
               "custody": self.custody.name}
        if self.counter is not None:
            out["rollback"] = self.state.rollback
        if self.held is not None:
            out["held"] = self.held
        return out

    # --- audit ------------------------------------------------------------------------------
    def audit_verify(self) -> tuple[int, str | None]:
        from .audit import verify
        self.flush_audit(force=True)
        return verify(self.store.audit_rows(), self._chain.head)

    def audit_tail(self, n: int = 20) -> list[str]:
        with contextlib.suppress(CryptobatError):
            self.flush_audit(force=True)
        rows = list(self.store.audit_rows(max(0, self._chain.head.seq - n)))
        return [entry for _, entry, _ in rows]
