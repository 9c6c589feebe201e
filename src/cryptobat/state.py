"""The token's state as typed, frozen records.

A change never edits a record: it builds the next state with
``dataclasses.replace`` (see the ``with_*`` helpers), so the state a reader holds
cannot change under it, and a refused or failed change has nothing to undo.
Mappings are read-only views (``types.MappingProxyType``) over dicts no one else
holds, sequences are tuples. JSON conversion and schema upgrades live in
:mod:`cryptobat.store`, the only place that reads or writes the stored form.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping, TypeVar

from .api import KeyInfo
from .audit import GENESIS

K = TypeVar("K")
V = TypeVar("V")


def frozen(d: Mapping[K, V] | None = None) -> Mapping[K, V]:
    """A read-only mapping over a private copy of ``d``."""
    return MappingProxyType(dict(d or {}))


def with_item(d: Mapping[K, V], key: K, value: V) -> Mapping[K, V]:
    return frozen({**d, key: value})


def without(d: Mapping[K, V], key: K) -> Mapping[K, V]:
    return frozen({k: v for k, v in d.items() if k != key})


@dataclass(frozen=True)
class Secret:
    """A keyed scrypt hash of a passphrase or PIN (see :func:`cryptobat.officers.hash_passphrase`)."""

    salt: str
    hash: str
    keyed: bool = False


@dataclass(frozen=True)
class Officer:
    secret: str  # the TOTP secret, sealed by the custody (hex)
    passphrase: Secret | None = None
    used_steps: tuple[int, ...] = ()  # TOTP steps already used: a code counts once
    failures: int = 0
    locked_until: int = 0
    remote_failures: int = 0
    remote_locked_until: int = 0
    enrolled: int = 0


@dataclass(frozen=True)
class KeyRecord:
    info: KeyInfo
    blob: str  # the private key sealed by the custody under its label (hex)
    created: int
    # made through a PKCS#11 window and not yet used: its role (and DNSKEY flags) follow the first
    # RRSIG it signs, then stay fixed; only a quorum's keyrole changes them afterwards
    role_open: bool = False


@dataclass(frozen=True)
class ClockRecord:
    offset: int
    hwm: int  # the latest token time ever trusted
    tampered: bool
    tolerance: int
    max_gap: int


@dataclass(frozen=True)
class Counters:
    signatures: int = 0
    refusals: int = 0
    compat_signatures: int = 0
    logins: int = 0
    login_failures: int = 0
    # refused calls by key label, then reason, bounded (see cryptobat.tally.merge)
    refused: Mapping[str, Mapping[str, int]] = dataclasses.field(default_factory=frozen)

    def add(self, **more: int) -> "Counters":
        return dataclasses.replace(self, **{k: getattr(self, k) + v for k, v in more.items()})

    def with_refused(self, pairs: Mapping[tuple[str, str], int]) -> "Counters":
        """These counters with (key, reason) refusal counts added, bounded as :func:`tally.merge` does."""
        from .tally import merge
        total = merge(self.refused, pairs)
        return dataclasses.replace(self, refused=frozen({k: frozen(v) for k, v in total.items()}))


@dataclass(frozen=True)
class AuditHead:
    seq: int = 0
    hash: str = GENESIS


@dataclass(frozen=True)
class TokenState:
    serial: str
    created: int
    quorum: int
    clock: ClockRecord
    idle_timeout: int
    version: int = 1
    max_validity: int | None = None
    pin: Secret | None = None
    pin_failures: int = 0
    officers: Mapping[str, Officer] = dataclasses.field(default_factory=frozen)
    keys: Mapping[str, KeyRecord] = dataclasses.field(default_factory=frozen)
    allowed_keys: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=frozen)  # zone -> DNSKEY hex
    cds_delete: Mapping[str, int] = dataclasses.field(default_factory=frozen)  # zone -> delete allowed until
    signer_peers: tuple[str, ...] = ()  # "uid:N" / "gid:N" allowed on the signer sockets without a PIN
    p11_window_until: int = 0
    p11_window_zone: str = "."
    p11_window_keys: int = 0  # keys the open window may still generate
    counters: Counters = Counters()
    audit: AuditHead = AuditHead()
    audit_checked: AuditHead = AuditHead()  # the head verified at the last start
    # the custody's rollback counter as of this state (0 where the custody has none): a store
    # behind the device's counter is an older copy (see cryptobat.rollback)
    rollback: int = 0
    # the passphrase pepper sealed by the custody (hex), kept across a custody migration so the
    # officers' passphrases and the PIN still check; empty: derived from the custody's MAC key
    pepper: str = ""

    def replace(self, **changes) -> "TokenState":
        return dataclasses.replace(self, **changes)

    def with_officer(self, name: str, officer: Officer) -> "TokenState":
        return self.replace(officers=with_item(self.officers, name, officer))

    def with_key(self, rec: KeyRecord) -> "TokenState":
        return self.replace(keys=with_item(self.keys, rec.info.label, rec))

    def with_clock(self, **changes) -> "TokenState":
        return self.replace(clock=dataclasses.replace(self.clock, **changes))
