"""The token: officers, quorum, policy, keys, clock and audit as plain objects.

No sockets, threads or terminals live here; the console, the native socket
and PKCS#11 are adapters that call these methods. Every state change goes
through :meth:`Token._change`, which copies the state, applies the change,
appends its audit entry and commits both atomically; a refused or failed
change leaves the state as it was.
"""
from __future__ import annotations

import copy
import hashlib
import hmac
import os
import time
from pathlib import Path
from typing import Callable, Sequence

from . import keystore, officers, policy
from .api import KeyInfo, SignResult
from .audit import Chain, Head
from .clock import DEFAULT_TOLERANCE, TrustedClock, _boottime
from .custody import Custody, SoftwareCustody
from .errors import ConfigurationDisabled, CryptobatError
from .quorum import IDLE_TIMEOUT, Presence
from .signing import Engine, Job, SignKey, sign_one
from .store import Store

MANUFACTURER = "Cryptobat"
MODEL = "Cryptobat-SW"
MAX_QUORUM = 16
AUDIT_FLUSH_SECONDS = 1.0


def _new_state(quorum: int, now: int) -> dict:
    return {
        "version": 1,
        "serial": os.urandom(8).hex().upper(),
        "created": now,
        "quorum": quorum,
        "max_validity": None,
        "pin": None,
        "clock": {"offset": 0, "hwm": now, "tampered": False, "tolerance": DEFAULT_TOLERANCE},
        "idle_timeout": IDLE_TIMEOUT,
        "officers": {},
        "keys": {},
        "p11_window_until": 0,
        "p11_window_zone": ".",
        "counters": {"signatures": 0, "refusals": 0, "compat_signatures": 0, "logins": 0, "login_failures": 0},
        "audit": {"seq": 0, "hash": Head().hash},
    }


class Token:
    def __init__(self, home: Path | str, custody_factory: Callable[..., Custody] = SoftwareCustody,
                 *, wall: Callable[[], float] = time.time, mono: Callable[[], float] = _boottime,
                 workers: int | None = None, _create_quorum: int | None = None) -> None:
        self.home = Path(home)
        create = _create_quorum is not None
        if create:
            self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.custody = custody_factory(self.home, create=True) if create else custody_factory(self.home)
        self.store = Store(self.home, self.custody.mac_key(), create=create)
        try:
            state = self.store.load()
            if state is None:
                if not create:
                    raise CryptobatError(f"no token at {self.home} (run: cryptobat init)")
                state = _new_state(_create_quorum, int(wall()))
            elif create:
                raise CryptobatError(f"a token already exists at {self.home}")
        except BaseException:
            self.store.close()
            raise
        self.state = state
        self._chain = Chain(Head(**state["audit"]))
        c = state["clock"]
        self.clock = TrustedClock(c["offset"], c["hwm"], c["tampered"], c["tolerance"], wall, mono)
        self.presence = Presence(state["idle_timeout"])
        self.engine = Engine(self.custody, custody_factory, self.home, workers)
        self._pending = {"signatures": 0, "compat_signatures": 0, "batches": 0}
        self.limiter = policy.RateLimiter()
        self._pin_key = os.urandom(32)
        self._pin_ok: tuple[str, bytes] | None = None
        self._sign_keys: dict[str, tuple[dict, SignKey]] = {}  # label -> (state record, SignKey of it)
        self._last_flush = mono()
        self._mono = mono
        self.started = mono()
        if create:
            self._change("init", {"quorum": _create_quorum}, lambda s: None)

    @classmethod
    def init(cls, home: Path | str, quorum: int = 2, **kw) -> "Token":
        if not 1 <= quorum <= MAX_QUORUM:
            raise CryptobatError(f"quorum must be between 1 and {MAX_QUORUM}")
        return cls(home, _create_quorum=quorum, **kw)

    def close(self) -> None:
        self.flush_audit(force=True)
        self.engine.close()
        self.store.close()

    # --- state changes and audit --------------------------------------------
    def _change(self, event: str, fields: dict, mutate: Callable[[dict], object]):
        new = copy.deepcopy(self.state)
        result = mutate(new)
        chain = Chain(self._chain.head)
        entries = [chain.append(self._time_for_audit(), event, fields)]
        new["audit"] = {"seq": chain.head.seq, "hash": chain.head.hash}
        self.store.commit(new, entries)
        self.state, self._chain = new, chain
        return result

    def _time_for_audit(self) -> int:
        return int(self.clock._wall() + self.clock.offset)

    def audit(self, event: str, **fields) -> None:
        self._change(event, fields, lambda s: None)

    def now(self) -> int:
        """Token time; records a detected clock tamper or an advanced high-water mark."""
        r = self.clock.read()
        if r.tamper:
            def mark(s: dict) -> None:
                s["clock"].update(tampered=True)
            self._change("clock-tamper", {"why": r.tamper}, mark)
        elif r.persist_hwm:
            hwm = self.clock.hwm
            self._change("clock", {"hwm": hwm}, lambda s: s["clock"].update(hwm=hwm))
        return r.now

    def _quorum(self, now: int | None = None) -> set[str]:
        now = self.now() if now is None else now
        return self.presence.require(self.state["quorum"], now, set(self.state["officers"]))

    def _require(self, event: str) -> set[str]:
        """The officers making up the quorum for ``event``; a refusal is audited."""
        try:
            return self._quorum()
        except ConfigurationDisabled:
            self.audit("refused", command=event, why="no quorum")
            raise

    def _gated(self, event: str, fields: dict, mutate: Callable[[dict], object]):
        """A state change that needs the quorum."""
        here = self._require(event)
        return self._change(event, {**fields, "officers": sorted(here)}, mutate)

    # --- officers ----------------------------------------------------------------
    def officer_names(self) -> list[str]:
        return list(self.state["officers"])

    def _officer(self, name: str) -> dict:
        o = self.state["officers"].get(name)
        if o is None:
            raise CryptobatError(f"no officer {name!r}")
        return o

    def coadd(self, name: str) -> tuple[str, str]:
        """Enrol an officer; return (TOTP secret, otpauth URI). Needs a quorum once M are enrolled."""
        if not officers.valid_name(name):
            raise CryptobatError("officer names are 1-32 letters, digits, '.', '_' or '-'")
        if name in self.state["officers"]:
            raise CryptobatError(f"officer {name!r} already enrolled")
        secret = officers.new_secret()
        sealed = self.custody.seal(secret.encode(), b"officer:" + name.encode()).hex()
        rec = {"secret": sealed, "passphrase": None, "last_step": -1, "failures": 0,
               "locked_until": 0, "enrolled": self.now()}

        def add(s: dict) -> None:
            s["officers"][name] = rec

        if len(self.state["officers"]) < self.state["quorum"]:
            self._change("coadd", {"name": name, "bootstrap": True}, add)
        else:
            self._gated("coadd", {"name": name}, add)
        return secret, officers.provisioning_uri(name, secret, self.state["serial"])

    def codel(self, name: str) -> None:
        self._officer(name)
        if len(self.state["officers"]) - 1 < self.state["quorum"]:
            raise CryptobatError("removing this officer would leave fewer officers than the quorum")
        self._gated("codel", {"name": name}, lambda s: s["officers"].pop(name))
        self.presence.leave(name)

    def has_passphrase(self, name: str) -> bool:
        return bool(self._officer(name)["passphrase"])

    def copass(self, name: str, passphrase: str) -> None:
        """Set an officer's passphrase; the officer must be logged in."""
        self._officer(name)
        if name not in self.presence.present(self.now()):
            raise CryptobatError(f"CO {name} must be logged in to set a passphrase")
        if len(passphrase) < 8:
            raise CryptobatError("passphrase must be at least 8 characters")
        record = officers.hash_passphrase(passphrase)
        self._change("copass", {"name": name}, lambda s: s["officers"][name].update(passphrase=record))

    def cologin(self, name: str, code: str, passphrase: str | None = None) -> bool:
        if name not in self.state["officers"]:
            self.audit("cologin", name=name, ok=False, why="unknown officer")
            return False
        now = self.now()
        secret = self.custody.unseal(bytes.fromhex(self.state["officers"][name]["secret"]),
                                     b"officer:" + name.encode()).decode()
        rec = copy.deepcopy(self.state["officers"][name])
        outcome = officers.login(rec, secret, code, passphrase, now)
        counter = "logins" if outcome.ok else "login_failures"

        def apply(s: dict) -> None:
            s["officers"][name] = rec
            s["counters"][counter] += 1

        self._change("cologin", {"name": name, "ok": outcome.ok, "why": outcome.why}, apply)
        if outcome.ok:
            self.presence.arrive(name, now)
        return outcome.ok

    def present(self) -> set[str]:
        return self.presence.present(self.now())

    def uptime(self) -> float:
        return self._mono() - self.started

    def colist(self) -> list[tuple[str, bool]]:
        here = self.presence.present(self.now())
        return [(n, n in here) for n in self.state["officers"]]

    def coreset(self) -> None:
        self.presence.reset()
        self.audit("coreset")

    # --- configuration under quorum ----------------------------------------------
    def setmaxval(self, seconds: int) -> None:
        if not 0 < seconds <= 10 * 365 * 86400:
            raise CryptobatError("maximum validity must be between 1 second and 10 years")
        self._gated("setmaxval", {"seconds": seconds}, lambda s: s.update(max_validity=seconds))

    def setquorum(self, m: int) -> None:
        if not 1 <= m <= min(MAX_QUORUM, len(self.state["officers"])):
            raise CryptobatError("quorum must be at least 1 and at most the number of officers")
        self._gated("setquorum", {"quorum": m}, lambda s: s.update(quorum=m))

    def setpin(self, pin: str) -> None:
        if len(pin) < 4:
            raise CryptobatError("PIN must be at least 4 characters")
        record = officers.hash_passphrase(pin)
        self._gated("setpin", {}, lambda s: s.update(pin=record))

    def settime(self, token_time: int) -> None:
        token_time = int(token_time)
        offset = int(token_time - self.clock._wall())
        self._gated("settime", {"time": token_time},
                    lambda s: s["clock"].update(offset=offset, hwm=token_time, tampered=False))
        self.clock.set(offset, token_time)

    def setcompat(self, label: str, on: bool) -> None:
        self.key(label)
        self._gated("setcompat", {"label": label, "on": on}, lambda s: s["keys"][label].update(compat=on))

    def p11window(self, seconds: int, zone: str) -> None:
        """Open PKCS#11 key generation and deletion for ``seconds``; new keys belong to ``zone``."""
        if not 0 <= seconds <= 3600:
            raise CryptobatError("the PKCS#11 key management window is 0 to 3600 seconds")
        zone = keystore.parse_zone(zone)
        until = self.now() + seconds
        self._gated("p11window", {"seconds": seconds, "zone": zone},
                    lambda s: s.update(p11_window_until=until, p11_window_zone=zone))

    def keygen_allowed(self) -> bool:
        return self.state["p11_window_until"] > self.now()

    def generate_key(self, algorithm: int, role: str, zone: str, label: str) -> KeyInfo:
        """PKCS#11 C_GenerateKeyPair: only inside a window a quorum opened, for the window's zone."""
        if not self.keygen_allowed():
            raise PermissionError("no PKCS#11 key management window open")
        if algorithm not in keystore.SUPPORTED:
            raise CryptobatError(f"algorithm {algorithm} is not supported")
        info, rec = self._generate(algorithm, keystore.parse_role(role),
                                   zone or self.state["p11_window_zone"], label or None)
        self._change("p11-keygen", {"label": info.label, "zone": info.zone, "algorithm": algorithm,
                                    "role": info.role, "keytag": info.keytag},
                     lambda s: s["keys"].__setitem__(info.label, rec))
        return info

    def delete_key(self, label: str) -> None:
        if not self.keygen_allowed():
            raise PermissionError("no PKCS#11 key management window open")
        self.key(label)
        self._change("p11-keydel", {"label": label}, lambda s: s["keys"].pop(label))

    # --- keys -----------------------------------------------------------------------
    def keys(self) -> list[KeyInfo]:
        return [keystore.info_of(r) for r in self.state["keys"].values()]

    def key(self, label: str) -> KeyInfo:
        rec = self.state["keys"].get(label)
        if rec is None:
            raise CryptobatError(f"no key labelled {label!r}")
        return keystore.info_of(rec)

    def _generate(self, algorithm: int, role: str, zone: str, label: str | None,
                  private_key=None) -> tuple[KeyInfo, dict]:
        """Create (or, given ``private_key``, import) a key; return its info and state record."""
        zone = keystore.parse_zone(zone)
        if label is not None and (label in self.state["keys"] or not label.isprintable() or " " in label):
            raise CryptobatError(f"label {label!r} is taken or not printable")
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
                raise CryptobatError(f"key tag {info.keytag} is already in use in {zone}")
        else:
            raise CryptobatError("could not find a free key tag")
        if label is None:
            final = keystore.default_label(zone, role, info.keytag)
            while final in self.state["keys"]:
                final += "x"
            # reseal under the final label so the label stays bound to the key
            blob = self.custody.seal(self.custody.unseal(blob, tmp.encode()), final.encode())
            info = keystore.make_info(final, zone, algorithm, role, public)
        return info, keystore.record(info, blob, self.now())

    def keygen(self, algorithm: int, role: str, zone: str, label: str | None = None) -> KeyInfo:
        self._require("keygen")  # before the (slow) generation
        info, rec = self._generate(algorithm, role, zone, label)
        self._gated("keygen", {"label": info.label, "zone": info.zone, "algorithm": algorithm,
                               "role": role, "keytag": info.keytag},
                    lambda s: s["keys"].__setitem__(info.label, rec))
        return info

    def keyimport(self, role: str, zone: str, key_text: str, label: str | None = None) -> KeyInfo:
        """Take an existing private key (BIND .private or PEM) into the token, under quorum."""
        from . import bindkey
        self._require("keyimport")
        algorithm, private_key = bindkey.load(key_text)
        algorithm = algorithm or bindkey.algorithm_of(private_key)
        if algorithm not in keystore.SUPPORTED:
            raise CryptobatError(f"algorithm {algorithm} is not supported by the token")
        info, rec = self._generate(algorithm, role, zone, label, private_key)
        self._gated("keyimport", {"label": info.label, "zone": info.zone, "algorithm": algorithm,
                                  "role": role, "keytag": info.keytag},
                    lambda s: s["keys"].__setitem__(info.label, rec))
        return info

    def keydel(self, label: str) -> None:
        self.key(label)
        self._gated("keydel", {"label": label}, lambda s: s["keys"].pop(label))

    # --- signing ------------------------------------------------------------------------
    def policy(self) -> policy.Policy:
        return policy.Policy(self.state["max_validity"], self.clock.tampered or self.state["clock"]["tampered"])

    def _sign_key(self, label: str) -> SignKey | None:
        """The SignKey of the current record for ``label``; rebuilt whenever the record object changes
        (every state change deep-copies the records), so it is always derived from the current state."""
        recs = self.state["keys"]
        rec = recs.get(label)
        if rec is None:
            return None
        cached = self._sign_keys.get(label)
        if cached is None or cached[0] is not rec:
            if len(self._sign_keys) > 2 * len(recs) + 16:
                self._sign_keys.clear()
            info = keystore.info_of(rec)
            cached = self._sign_keys[label] = (rec, SignKey(info, keystore.zone_wire(info.zone),
                                                            bytes.fromhex(rec["blob"])))
        return cached[1]

    def sign_job(self, items: Sequence[tuple[str, bytes]]) -> Job:
        now = self.now()
        wanted = {label for label, _ in items}
        keys = {}
        for label in wanted:
            key = self._sign_key(label)
            if key is not None:
                keys[label] = key
        return Job(self.policy(), now, keys, items)

    def timed_sign(self, items: Sequence[tuple[str, bytes]]) -> list[SignResult]:
        """Check and sign each (label, RRSIG signing data); results in order."""
        results = self.engine.run(self.sign_job(items))
        self.account(results)
        return results

    def timed_sign_verbose(self, label: str, data: bytes) -> tuple[SignResult, int]:
        """One payload, with the latest expiration the policy allowed (for the console's report)."""
        job = self.sign_job([(label, data)])
        result = sign_one(self.engine.cache, job, label, data)
        self.account([result])
        return result, policy.limit(job.policy, job.now)

    def check_signing_data(self, label: str, data: bytes) -> str | None:
        """The policy verdict on ``data`` for ``label`` without signing: None or the reason."""
        job = self.sign_job([(label, data)])
        key = job.keys.get(label)
        if key is None:
            return f"no key labelled {label!r}"
        try:
            policy.check(key.info, key.zone_wire, data, job.policy, job.now)
        except CryptobatError as e:
            self.account([SignResult(reason=str(e))])
            return str(e)
        return None

    def sign_digest(self, label: str, digest: bytes, mechanism: str, bound: bool) -> SignResult:
        """Hash-only signing for PKCS#11 clients; see :func:`cryptobat.policy.check_digest`."""
        job = self.sign_job([])
        key = self._sign_key(label)
        if key is None:
            return SignResult(reason=f"no key labelled {label!r}")
        info = key.info
        try:
            raw = policy.check_digest(info, digest, mechanism, bound, job.policy, self.limiter, self._mono())
        except CryptobatError as e:
            result = SignResult(reason=str(e))
        else:
            result = SignResult(signature=self.engine.cache.get(label, key).sign_digest(raw))
        self.account([result], compat=not bound)
        return result

    def account(self, results: Sequence[SignResult], compat: bool = False) -> None:
        """Count signatures; audit refusals at once and successes at most once a second."""
        ok = sum(1 for r in results if r.ok)
        refused = [r.reason for r in results if not r.ok]
        self._pending["signatures"] += ok
        self._pending["compat_signatures"] += ok if compat else 0
        self._pending["batches"] += 1
        if refused:
            reasons: dict[str, int] = {}
            for why in refused:
                reasons[why] = reasons.get(why, 0) + 1
            self._flush("refused-sign", {"refusals": len(refused), "reasons": reasons}, len(refused))
        else:
            self.flush_audit(force=len(results) >= 64)

    def flush_audit(self, force: bool = False) -> None:
        if self._pending["batches"] and (force or self._mono() - self._last_flush >= AUDIT_FLUSH_SECONDS):
            self._flush("sign", {}, 0)

    def _flush(self, event: str, fields: dict, refusals: int) -> None:
        p = dict(self._pending)

        def count(s: dict) -> None:
            c = s["counters"]
            c["signatures"] += p["signatures"]
            c["compat_signatures"] += p["compat_signatures"]
            c["refusals"] += refusals

        self._change(event, {**fields, "signatures": p["signatures"], "batches": p["batches"]}, count)
        self._pending = {"signatures": 0, "compat_signatures": 0, "batches": 0}
        self._last_flush = self._mono()

    def counters(self) -> dict:
        c = dict(self.state["counters"])
        c["signatures"] += self._pending["signatures"]
        c["compat_signatures"] += self._pending["compat_signatures"]
        return c

    # --- signer PIN and other PKCS#11 needs ------------------------------------------
    def check_pin(self, pin: bytes | str) -> bool:
        """The signer PIN. A PIN once verified is remembered (as a keyed hash) so that signers
        logging in for every session do not pay scrypt each time; a wrong PIN always does."""
        rec = self.state["pin"]
        if rec is None:
            return False
        text = pin.decode(errors="replace") if isinstance(pin, bytes) else pin
        tag = (rec["hash"], hmac.new(self._pin_key, text.encode(), hashlib.sha256).digest())
        if self._pin_ok is not None and hmac.compare_digest(self._pin_ok[1], tag[1]) and self._pin_ok[0] == tag[0]:
            return True
        ok = officers.check_passphrase(rec, text)
        if ok:
            self._pin_ok = tag
        return ok

    def random(self, n: int) -> bytes:
        return os.urandom(n)

    def info(self) -> dict:
        return {"label": f"Cryptobat {self.state['serial'][:8]}", "serial": self.state["serial"],
                "manufacturer": MANUFACTURER, "model": MODEL, "time": self.now()}

    # --- audit ------------------------------------------------------------------------------
    def audit_verify(self) -> tuple[int, str | None]:
        from .audit import verify
        self.flush_audit(force=True)
        return verify(self.store.audit_rows(), self._chain.head)

    def audit_tail(self, n: int = 20) -> list[str]:
        rows = list(self.store.audit_rows(max(0, self._chain.head.seq - n)))
        return [entry for _, entry, _ in rows]


def code_hash() -> str:
    """Eight hex digits of SHA-256 over the running package's source: the 'firmware' id."""
    h = hashlib.sha256()
    pkg = Path(__file__).parent
    for p in sorted(pkg.rglob("*.py")):
        h.update(p.relative_to(pkg).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:8].upper()

