"""Timed signing: run the policy check, then sign, for a batch of payloads.

The same :func:`run` serves the token in-process and its worker processes
(the token spreads large batches over every core); either way each payload
passes :func:`cryptobat.policy.check` before its key signs it.
"""
from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Sequence

from . import policy
from .api import KeyInfo, SignResult
from .custody import Custody, LoadedKey
from .errors import CryptobatError, Refusal

PARALLEL_MIN = 256  # batches at least this large go to the worker processes


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


class KeyCache:
    """Keys unsealed for use, keyed by their sealed blob (so a deleted or replaced key drops out)."""

    def __init__(self, custody: Custody) -> None:
        self.custody = custody
        self._loaded: dict[bytes, LoadedKey] = {}

    def get(self, label: str, key: SignKey) -> LoadedKey:
        k = self._loaded.get(key.blob)
        if k is None:
            if len(self._loaded) > 64:
                self._loaded.clear()
            k = self._loaded[key.blob] = self.custody.load(key.info.algorithm, key.blob, label.encode())
        return k


def sign_one(cache: KeyCache, job: Job, label: str, data: bytes) -> SignResult:
    """Check one payload against the policy and sign it, or say why not."""
    key = job.keys.get(label)
    if key is None:
        return SignResult(reason=f"no key labelled {label!r}")
    try:
        policy.check(key.info, key.zone_wire, data, job.policy, job.now)
    except Refusal as e:
        return SignResult(reason=e.reason)
    return SignResult(signature=cache.get(label, key).sign(data))


def run(cache: KeyCache, job: Job) -> list[SignResult]:
    return [sign_one(cache, job, label, data) for label, data in job.items]


# --- worker processes -------------------------------------------------------
_worker_cache: KeyCache | None = None


def _worker_init(custody_factory, home: str) -> None:
    global _worker_cache
    _worker_cache = KeyCache(custody_factory(Path(home)))


def _worker_run(job: Job) -> tuple[list[bytes | None], dict[int, str]]:
    """Results in a compact, fast-to-pickle form: the signatures (None where refused)
    and the refusal reasons by position; :func:`_unpack` rebuilds the SignResults."""
    assert _worker_cache is not None
    res = run(_worker_cache, job)
    return [r.signature for r in res], {i: r.reason for i, r in enumerate(res) if r.signature is None}


def _unpack(part: tuple[list[bytes | None], dict[int, str]]) -> list[SignResult]:
    sigs, reasons = part
    out = [SignResult(s) for s in sigs]
    for i, reason in reasons.items():
        out[i] = SignResult(reason=reason)
    return out


def _worker_ready() -> bool:
    return _worker_cache is not None


class Engine:
    """Signs batches, in-process for small ones and across worker processes for large ones."""

    def __init__(self, custody: Custody, custody_factory, home: Path, workers: int | None = None) -> None:
        self.cache = KeyCache(custody)
        self._factory = custody_factory
        self._home = str(home)
        self.workers = (os.cpu_count() or 1) if workers is None else workers
        self._pool: ProcessPoolExecutor | None = None

    def _get_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=get_context("forkserver"),
                                             initializer=_worker_init, initargs=(self._factory, self._home))
        return self._pool

    def run(self, job: Job) -> list[SignResult]:
        n = len(job.items)
        if self.workers <= 1 or n < PARALLEL_MIN:
            return run(self.cache, job)
        chunk = -(-n // (self.workers * 4))
        parts = [Job(job.policy, job.now, job.keys, job.items[i:i + chunk]) for i in range(0, n, chunk)]
        try:
            out: list[SignResult] = []
            for part in self._get_pool().map(_worker_run, parts):
                out.extend(_unpack(part))
            return out
        except Exception as e:  # a broken worker must not take the token down
            self.close()
            raise CryptobatError(f"signing worker failed: {e}") from None

    def warm(self) -> None:
        """Start the worker processes now (e.g. while a caller prepares its first batch)."""
        if self.workers > 1:
            try:
                pool = self._get_pool()
                for f in [pool.submit(_worker_ready) for _ in range(self.workers)]:
                    f.result()
            except Exception:  # the first real batch reports any failure
                self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
