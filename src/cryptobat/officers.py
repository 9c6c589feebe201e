"""Crypto officers and their two factors: a TOTP code and a passphrase.

TOTP follows RFC 6238 as authenticator apps expect it (SHA-1, 6 digits, 30 s
steps), with a window of one step either side. A code from a time step the
officer already used is refused, so an observed code cannot be replayed;
five failures in a row lock the officer out for a while. Secrets are stored
sealed by the key custody; passphrases only as scrypt hashes.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import re
from dataclasses import dataclass, replace

import pyotp

from .state import Officer, Secret

STEP = 30
DIGITS = 6
SECRET_CHARS = 32  # base32 characters: 160 bits, RFC 4226's recommended length
MAX_FAILURES = 5
USED_STEPS = 16  # time steps remembered per officer against replay
LOCKOUT = 300
ISSUER = "Cryptobat"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$")
_SCRYPT = dict(n=2**14, r=8, p=1, dklen=32)


def valid_name(name: str) -> bool:
    return bool(NAME_RE.match(name))


def new_secret() -> str:
    return pyotp.random_base32(SECRET_CHARS)


def provisioning_uri(name: str, secret: str, token_serial: str) -> str:
    return pyotp.TOTP(secret).provisioning_uri(name=f"{name}@{token_serial}", issuer_name=ISSUER)


def match_step(secret: str, code: str, now: int) -> int | None:
    """Return the time step (now ±1) whose TOTP equals ``code``, or None."""
    if not (len(code) == DIGITS and code.isascii() and code.isdigit()):
        return None
    totp = pyotp.TOTP(secret, digits=DIGITS, interval=STEP)
    step = now // STEP
    for s in (step, step - 1, step + 1):
        if hmac.compare_digest(totp.at(s * STEP), code):
            return s
    return None


def _derive(passphrase: str, salt: bytes, pepper: bytes | None) -> str:
    h = hashlib.scrypt(passphrase.encode(), salt=salt, **_SCRYPT)
    return (hmac.new(pepper, h, hashlib.sha256).digest() if pepper is not None else h).hex()


def hash_passphrase(passphrase: str, pepper: bytes | None = None) -> Secret:
    """scrypt, then keyed with ``pepper`` (a key the custody holds): a copy of the store alone
    does not let anyone try 6-digit PINs or passphrases offline."""
    salt = os.urandom(16)
    return Secret(salt.hex(), _derive(passphrase, salt, pepper), pepper is not None)


def check_passphrase(record: Secret, passphrase: str, pepper: bytes | None = None) -> bool:
    h = _derive(passphrase, bytes.fromhex(record.salt), pepper if record.keyed else None)
    return hmac.compare_digest(h, record.hash)


@dataclass
class LoginOutcome:
    ok: bool
    why: str  # for the audit log only; the console answers just Ok / Failed


def login(officer: Officer, secret: str, code: str, passphrase: str | None, now: int,
          remote: bool = False, pepper: bytes | None = None) -> tuple[Officer, LoginOutcome]:
    """Check both factors; return the officer's record as it is after this attempt, and the outcome.

    Failures count separately for remote sessions (the console socket) and for the
    token's own terminals (local, pty, serial): whoever reaches the socket can lock an
    officer out of the socket, never out of the console at the token itself.
    """
    fails, until = ("remote_failures", "remote_locked_until") if remote else ("failures", "locked_until")
    if getattr(officer, until) > now:
        return officer, LoginOutcome(False, "locked out")
    step = match_step(secret, code, now)
    used = officer.used_steps
    if step is None:
        why = "bad code"
    elif step in used:
        why = "code replayed"
    else:
        # a code counts once, whatever the passphrase. The steps used are remembered as a set,
        # not as a high-water mark, so a clock corrected backwards does not refuse every code
        # until it catches up; a code is valid only within a step of now anyway.
        officer = replace(officer, used_steps=(*used, step)[-USED_STEPS:])
        if officer.passphrase and (passphrase is None
                                   or not check_passphrase(officer.passphrase, passphrase, pepper)):
            why = "bad passphrase"
        else:
            return replace(officer, **{fails: 0}), LoginOutcome(True, "ok")
    n = getattr(officer, fails) + 1
    if n >= MAX_FAILURES:
        why += f"; locked out for {LOCKOUT} s"
        return replace(officer, **{fails: 0, until: now + LOCKOUT}), LoginOutcome(False, why)
    return replace(officer, **{fails: n}), LoginOutcome(False, why)
