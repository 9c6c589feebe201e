"""Hash-only signing (PKCS#11 CKM_RSA_PKCS, CKM_ECDSA): when a bare hash may be signed.

A hash says nothing about what was hashed, so the token signs one only if

- the client's session hashed RRSIG signing data (RFC 4034 §3.1.8.1) itself, that data
  named the key by algorithm and key tag, was hashed with the key's algorithm hash and
  passed the policy (:func:`bindings`, at C_DigestFinal); that hash then authorises one
  signature, and the data passes the policy again, as it stands then, when it is signed
  (:func:`authorise`, at C_Sign: the whole decision, on the data the token parsed at
  C_DigestFinal); or
- a quorum put the key in compat mode, and then only at a bounded rate.

The PKCS#11 adapter keeps, per session, only what :func:`bindings` returned: it neither
parses signing data nor DigestInfo, and decides nothing. No I/O here.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterable

from . import algorithms, policy, rrsig
from .api import KeyInfo
from .errors import Refusal


def _hash_only(algorithm: int) -> algorithms.DnssecAlgorithm | None:
    """The row of ``algorithm`` if the token signs a bare hash with its keys (not EdDSA,
    which hashes inside, nor the RSASHA1 algorithms it no longer signs with)."""
    a = algorithms.TABLE.get(algorithm)
    return a if a is not None and a.sign and a.mech_hash_sign is not None and a.hash else None


def hash_name(algorithm: int) -> str | None:
    """The hashlib name of the hash DNSSEC ``algorithm`` signs with, if it signs a bare hash."""
    a = _hash_only(algorithm)
    return a.hash if a else None


def mechanism_input(key: KeyInfo, digest: bytes) -> bytes:
    """What a client passes to C_Sign to have ``key`` sign ``digest``: a DigestInfo for RSA."""
    a = _hash_only(key.algorithm)
    return ((a and a.digest_info) or b"") + digest


def bindings(keys: Iterable[KeyInfo], hashed: str, data: bytes, digest: bytes,
             accepts: Callable[[str], bool]) -> list[tuple[str, bytes]]:
    """(label, the mechanism input it may sign once) for each key a finished digest binds to.

    ``digest`` is the ``hashed`` (hashlib name) hash of ``data``; it binds to a key only if
    ``data`` names that key, the key's algorithm signs this hash, and ``accepts(label)``
    (the full policy check) holds. Data that is not signing data binds to nothing.
    """
    try:
        h = rrsig.header(data)
    except Refusal:
        return []
    return [(k.label, mechanism_input(k, digest)) for k in keys
            if k.algorithm == h.algorithm and k.keytag == h.key_tag and hash_name(k.algorithm) == hashed
            and accepts(k.label)]


KEPT = 256  # bound signing data kept parsed for C_Sign, at most
KEPT_BYTES = 4 << 20  # and their bytes, at most


class Parsed:
    """Bound signing data as :func:`cryptobat.policy.check` parsed it at C_DigestFinal, until
    C_Sign takes it (:func:`authorise`'s ``parsed``): each binding is parsed once, not again
    when it is signed. Bounded in entries and bytes; data that fell out is parsed again."""

    def __init__(self, entries: int = KEPT, size: int = KEPT_BYTES) -> None:
        self._kept: OrderedDict[bytes, rrsig.SigningData] = OrderedDict()
        self._entries, self._size, self._bytes = entries, size, 0

    def keep(self, data: bytes, sd: rrsig.SigningData) -> None:
        if data in self._kept or len(data) > self._size:
            return
        self._kept[data] = sd
        self._bytes += len(data)
        while len(self._kept) > self._entries or self._bytes > self._size:
            self._bytes -= len(self._kept.popitem(last=False)[0])

    def take(self, data: bytes) -> rrsig.SigningData | None:
        sd = self._kept.pop(data, None)
        if sd is not None:
            self._bytes -= len(data)
        return sd

    def __len__(self) -> int:
        return len(self._kept)


def authorise(key: KeyInfo, zone_wire: bytes, mechanism: str, raw: bytes, bound: bytes | None,
              pol: policy.Policy, now: int, limiter: policy.RateLimiter, t: float,
              parsed: rrsig.SigningData | None = None) -> bytes:
    """The bare hash ``key`` may sign for mechanism input ``raw``; raise Refusal otherwise.

    ``bound`` is the signing data a binding recorded for ``raw``: it must still hash to the
    very hash being signed and pass the policy now (it may have tightened since C_Digest, and
    the clock moved). ``parsed`` is ``rrsig.parse(bound)`` if the token kept it from the
    binding: the policy then decides on it without parsing the bytes again.
    """
    if bound is not None:
        if parsed is None:
            policy.check(key, zone_wire, bound, pol, now)
        else:
            policy.check_parsed(key, zone_wire, parsed, bound, pol, now)
    digest = check_digest(key, raw, mechanism, bound is not None, pol, limiter, t)
    if bound is not None:
        name = hash_name(key.algorithm)
        if name is None or hashlib.new(name, bound).digest() != digest:
            raise Refusal("digest does not match the signing data it was bound to")
    return digest


def check_digest(key: KeyInfo, raw: bytes, mechanism: str, bound: bool, pol: policy.Policy,
                 limiter: policy.RateLimiter, t: float) -> bytes:
    """Decide on a hash-only signature; return the bare hash to sign or raise Refusal.

    ``bound`` means the data behind the hash passed :func:`cryptobat.policy.check`; otherwise
    the data is unknown and only a key a quorum put in compat mode may sign it, rate-limited.
    """
    policy.in_force(pol)
    if not bound:
        if not key.compat:
            raise Refusal(policy.NOT_COMPAT)
        if not limiter.allow(key.label, t):
            raise Refusal("compat signing rate limit exceeded")
    a = _hash_only(key.algorithm)
    if mechanism == "rsa-pkcs" and a is not None and a.kind == "rsa":
        prefix = a.digest_info or b""
        if not raw.startswith(prefix) or len(raw) != len(prefix) + (a.hash_len or 0):
            raise Refusal("DigestInfo does not match the key's algorithm")
        return raw[len(prefix):]
    if mechanism == "ecdsa" and a is not None and a.kind == "ecdsa":
        if len(raw) != a.hash_len:
            raise Refusal("digest length does not match the key's algorithm")
        return raw
    raise Refusal(f"mechanism {mechanism} does not fit algorithm {key.algorithm}")
