"""Post-sign verification: every signature against its DNSKEY, and a sample re-validated by dnspython.

The fast check (:func:`verify_chunk`) runs in a pool beside the signing, processes for
big zones (no GIL contention with the walk), threads for small ones; it checks the
token's signatures over the inputs this program built.  :func:`check_sample` checks
those inputs against an independent implementation of RFC 4034 canonical form.
"""
from __future__ import annotations

import os
import random
import sys
from collections import deque
from typing import TYPE_CHECKING

import dns.dnssec
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from cryptography.exceptions import InvalidSignature

from .. import algorithms
from ..signing import PARALLEL_MIN
from . import keys as zkeys
from .batch import Batch, Sample
from .fatal import Fatal
from .reader import DNSKEY, RRset

if TYPE_CHECKING:
    from concurrent.futures import Executor

VERIFY_CHUNK = 2048
VERIFY_INFLIGHT = 48  # verification chunks queued before the signer waits for the verifiers
SAMPLE = 24  # RRsets re-validated with dns.dnssec.validate from the text form

_pubkeys: dict[tuple, object] = {}


def verify_chunk(specs: list[tuple[int, int, bytes]], idx: bytes, datas: list[bytes], sigs: list[bytes]) -> list[int]:
    """Positions in the chunk whose signature does not verify; ``specs[idx[i]]`` is
    (algorithm, flags, public key) of the DNSKEY that made ``sigs[i]`` over ``datas[i]``.
    Runs in verifier processes (or threads for small zones)."""
    pubs = []
    for spec in specs:
        pub = _pubkeys.get(spec)
        if pub is None:
            if len(_pubkeys) >= 64:  # a process verifying many zones keeps the recent zones' keys only
                _pubkeys.clear()
            alg, _flags, key = spec
            pub = _pubkeys[spec] = algorithms.public_key_from(alg, key)
        pubs.append(pub.verify)
    bad = []
    for i, data in enumerate(datas):
        try:
            pubs[idx[i]](sigs[i], data)
        except (InvalidSignature, ValueError):
            bad.append(i)
    return bad


class _Done:
    """A call already made, answering ``result()`` as a finished Future does."""

    __slots__ = ("_value", "_error")

    def __init__(self, fn, args) -> None:
        self._value = self._error = None
        try:
            self._value = fn(*args)
        except Exception as e:
            self._error = e

    def result(self):
        if self._error is not None:
            raise self._error
        return self._value


class InPlace:
    """Runs each check at once in the caller's thread: a zone too small for the token's worker
    processes verifies in less time than a thread pool (and importing concurrent.futures) takes."""

    def submit(self, fn, *args) -> _Done:
        return _Done(fn, args)

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


def verifier_pool(nsigs_hint: int) -> Executor | InPlace:
    """Processes for big zones (no GIL contention with signing), threads for small ones, and
    none for a zone too small for the token's worker processes (:class:`InPlace`).

    The processes are forked from this one, in this thread, at once (they need only what it has
    imported) and each asks the kernel to kill it when signzone dies: a fork server and its resource tracker, or spawned
    interpreters, would outlive a killed run, and spawning costs an interpreter start each.
    """
    n = os.cpu_count() or 2
    if nsigs_hint < PARALLEL_MIN:
        return InPlace()
    if nsigs_hint < 20000:
        from concurrent.futures import ThreadPoolExecutor

        return ThreadPoolExecutor(n, thread_name_prefix="signzone-verify")
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from ..workers import die_with_parent

    pool = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("fork"),
                               initializer=die_with_parent, initargs=(os.getpid(),))
    # forked now, by the calling (main) thread: the kernel's parent-death signal follows the
    # thread that forked, so processes forked by a short-lived thread would die with it
    warm_pool(pool)
    return pool


def warm_pool(pool: Executor) -> None:
    """Start the pool's workers (processes take a while) before the first chunk needs them."""
    try:
        for f in [pool.submit(int) for _ in range(os.cpu_count() or 2)]:
            f.result()
    except Exception:
        pass


class Verifier:
    """Signatures checked in ``pool`` as batches come back; :meth:`finish` says whether all verified."""

    def __init__(self, pool: Executor, keys: list[zkeys.SignKey]) -> None:
        self._pool = pool
        self._keys = keys
        self._specs = [(k.info.algorithm, k.info.flags, k.info.public_key) for k in keys]
        self._futs: deque = deque()  # (first index, key indexes, future)
        self._bad: list[int] = []
        self._bad_key: list[zkeys.SignKey] = []

    def submit(self, batch: Batch, sigs: list[bytes]) -> None:
        n = len(batch.items)
        for a in range(0, n, VERIFY_CHUNK):
            b = min(a + VERIFY_CHUNK, n)
            kid = bytes(batch.key_index[a:b])
            datas = [it[1] for it in batch.items[a:b]]
            self._futs.append((batch.first + a, kid, self._pool.submit(verify_chunk, self._specs, kid, datas, sigs[a:b])))
        self._collect(VERIFY_INFLIGHT)

    def finish(self) -> None:
        """Wait for every check; a signature that does not verify ends the run."""
        self._collect(0)
        self._pool.shutdown()
        if self._bad:
            raise Fatal(f"post-sign verification failed: {len(self._bad)} signatures do not verify, "
                        f"first by dnskey '{self._bad_key[0].name}' (signature #{self._bad[0]})")

    def abort(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _collect(self, limit: int) -> None:
        while len(self._futs) > limit:
            a, kid, f = self._futs.popleft()
            for i in f.result():
                self._bad.append(a + i)
                self._bad_key.append(self._keys[kid[i]])


def sample_names(auth: list[tuple]) -> set:
    """The names whose RRsets :func:`check_sample` re-validates: the first few and a random few."""
    if not auth:
        return set()
    rng = random.Random()
    return set(auth[:8] + [rng.choice(auth) for _ in range(SAMPLE)])


def check_sample(origin: dns.name.Name, dk: RRset, samples: list[Sample], inception: int) -> None:
    """Re-validate ``samples`` with dnspython from their presentation form."""
    keyset = dns.rrset.from_text_list(origin, dk.ttl, "IN", "DNSKEY", [x for _, x in dk.items()])
    for sm in samples:
        name = dns.name.from_text(sm.disp)
        rrset = dns.rrset.from_text_list(name, sm.ttl, "IN", sm.rtype, sm.texts)
        rrsigs = dns.rrset.from_text_list(name, sm.ttl, "IN", "RRSIG", sm.rrsigs)
        for sig in rrsigs:
            try:
                dns.dnssec.validate_rrsig(rrset, sig, {origin: keyset}, now=inception + 1)
            except dns.dnssec.ValidationFailure as e:
                raise Fatal(
                    f"post-sign verification failed for {sm.disp}/{dns.rdatatype.to_text(sm.rtype)}: {e}"
                ) from None


def report_keys(dk: RRset, keys: list[zkeys.SignKey], keyset_keys, zone_keys) -> None:
    """dnssec-signzone's ``Zone fully signed`` report of active, stand-by and revoked keys."""
    algs = sorted({k.info.algorithm for k in keys})
    names = [algorithms.by_number(a).mnemonic for a in algs]
    print(f"Verifying the zone using the following algorithms: {' '.join(names)}.", file=sys.stderr)
    print("Zone fully signed:", file=sys.stderr)
    present = [dns.rdata.from_wire(dns.rdataclass.IN, DNSKEY, w, 0, len(w)) for w, _ in dk.items()]
    for alg, name in zip(algs, names):
        active_k = {k.info.keytag for k in keyset_keys if k.info.algorithm == alg and k.info.flags & 1}
        active_z = {k.info.keytag for k in zone_keys if k.info.algorithm == alg and not k.info.flags & 1}
        sep = [r for r in present if r.algorithm == alg and r.flags & 1]
        zsk = [r for r in present if r.algorithm == alg and not r.flags & 1]
        rk = sum(1 for r in sep if r.flags & 0x80)
        rz = sum(1 for r in zsk if r.flags & 0x80)
        print(f"Algorithm: {name}: KSKs: {len(active_k)} active, {len(sep) - len(active_k) - rk} stand-by, {rk} revoked", file=sys.stderr)
        print(f"{'':{len(name) + 13}}ZSKs: {len(active_z)} active, {len(zsk) - len(active_z) - rz} stand-by, {rz} revoked", file=sys.stderr)
