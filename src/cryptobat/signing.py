"""Timed signing: run the policy check, then sign, for a batch of payloads.

The same :func:`run` serves the token in-process and the worker processes an adapter
may start (:mod:`cryptobat.workers`); either way each payload passes
:func:`cryptobat.policy.check` before its key signs it.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

from . import policy, rrsig
from .api import KeyInfo, SignResult
from .custody import Custody, LoadedKey
from .errors import Refusal

CACHE_KEYS = 64  # unsealed keys the token's own process keeps at most
PARALLEL_MIN = 256  # batches at least this large go to an adapter's worker processes (cryptobat.workers);
# smaller ones are signed in the token's process, where no worker need be started for them
KEY_IDLE = 60.0  # seconds an unsealed key stays cached unused


@dataclass(frozen=True)
class SignKey:
    info: KeyInfo
    zone_wire: bytes
    blob: bytes


@dataclass(frozen=True)
class Job:
    """A snapshot of everything needed to sign a batch; picklable for the workers."""

    policy: policy.Policy
    now: int
    keys: dict[str, SignKey]
    items: Sequence[tuple[str, bytes]]


def narrowed(job: Job) -> Job:
    """``job`` with its policy cut to its keys' zones (:func:`cryptobat.policy.for_zones`):
    the same decisions, fewer bytes to send a worker process for a signature or two."""
    zones = {k.zone_wire for k in job.keys.values()}
    return Job(policy.for_zones(job.policy, zones), job.now, job.keys, job.items)


class KeyCache:
    """Keys unsealed for use, keyed by their sealed blob (so a deleted or replaced key drops out).

    At most ``size`` keys, least recently used out first; a key unused for ``idle`` seconds
    is dropped at the next :meth:`get` or :meth:`expire`. With ``opener`` instead of a
    custody, the custody itself is opened on demand and dropped with the last key.
    """

    def __init__(self, custody: Custody | None, size: int = CACHE_KEYS, idle: float = KEY_IDLE,
                 opener: Callable[[], Custody] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        if custody is None and opener is None:
            raise ValueError("KeyCache needs a custody or an opener")
        self.custody = custody
        self._opener = opener
        self._size = size
        self._idle = idle
        self._clock = clock
        self._loaded: OrderedDict[bytes, list] = OrderedDict()  # blob -> [LoadedKey, last use]
        self._lock = threading.Lock()
        self._swept = clock()

    def get(self, label: str, key: SignKey) -> LoadedKey:
        now = self._clock()
        if now - self._swept > self._idle / 4:
            self.expire(now)
        with self._lock:
            entry = self._loaded.get(key.blob)
            if entry is not None:
                entry[1] = now
                self._loaded.move_to_end(key.blob)
                return entry[0]
            custody = self.custody
        if custody is None:
            custody = self._open()
        k = custody.load(key.info.algorithm, key.blob, label.encode())
        with self._lock:
            self._loaded[key.blob] = [k, now]
            self._loaded.move_to_end(key.blob)
            while len(self._loaded) > self._size:
                self._loaded.popitem(last=False)
        return k

    def _open(self) -> Custody:
        custody = self._opener()
        with self._lock:
            if self.custody is None:
                self.custody = custody
            return self.custody

    def expire(self, now: float | None = None) -> None:
        """Drop the keys unused for ``idle`` seconds (and an opened custody with the last of them)."""
        now = self._clock() if now is None else now
        with self._lock:
            self._swept = now
            for blob in [b for b, (_, used) in self._loaded.items() if now - used >= self._idle]:
                del self._loaded[blob]
            if not self._loaded and self._opener is not None:
                self.custody = None

    def clear(self) -> None:
        with self._lock:
            self._loaded.clear()
            if self._opener is not None:
                self.custody = None

    def __len__(self) -> int:
        return len(self._loaded)


def refusal(job: Job, label: str, data: bytes) -> str | None:
    """Why ``job`` may not sign ``data`` with ``label``'s key, or None: the policy check every
    signature passes, in the token's process and in the workers alike."""
    return verdict(job, label, data)[0]


def verdict(job: Job, label: str, data: bytes) -> tuple[str | None, rrsig.SigningData | None]:
    """:func:`refusal`, with the parsed signing data when it passed (kept with a bound digest)."""
    key = job.keys.get(label)
    if key is None:
        return f"no key labelled {label!r}", None
    try:
        return None, policy.check(key.info, key.zone_wire, data, job.policy, job.now)
    except Refusal as e:
        return e.reason, None


def sign_one(cache: KeyCache, job: Job, label: str, data: bytes) -> SignResult:
    """Check one payload against the policy and sign it, or say why not."""
    why = refusal(job, label, data)
    if why is not None:
        return SignResult(reason=why)
    return SignResult(signature=cache.get(label, job.keys[label]).sign(data))


def signatures(cache: KeyCache, job: Job) -> tuple[list[bytes | None], dict[int, str]]:
    """:func:`sign_one` for every payload of ``job``, compactly: the signatures (None where
    refused) and the refusal reasons by position.

    The same check (:func:`refusal`), then the same signing, per payload; the key's unsealed
    form is fetched from the cache once per run of payloads for one key (a zone's items come
    grouped by key; this loop is a zone's hot path, and the worker processes answer in this form).
    """
    sigs: list[bytes | None] = []
    reasons: dict[int, str] = {}
    add = sigs.append
    last, sign = None, None
    for i, (label, data) in enumerate(job.items):
        why = refusal(job, label, data)
        if why is not None:
            add(None)
            reasons[i] = why
            continue
        if label != last:
            sign, last = cache.get(label, job.keys[label]).sign, label
        add(sign(data))
    return sigs, reasons


def results(part: tuple[list[bytes | None], dict[int, str]]) -> list[SignResult]:
    """The SignResults of :func:`signatures`' answer."""
    sigs, reasons = part
    out = [SignResult(s) for s in sigs]
    for i, reason in reasons.items():
        out[i] = SignResult(reason=reason)
    return out


def run(cache: KeyCache, job: Job) -> list[SignResult]:
    return results(signatures(cache, job))


