"""The signing policy: the one place that decides whether the token signs.

Every path that produces a signature (console ``tpmtimedsign``, the native
API, PKCS#11, ``signzone``) calls :func:`check` on the parsed signing data
before the private key is touched.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import dns.rdatatype

from . import rrsig
from .api import KeyInfo
from .errors import Refusal

EXPIRATION_EXCEEDS = "RRSIG expiration time exceeds HSM policy"
KSK_TYPES = frozenset({dns.rdatatype.DNSKEY, dns.rdatatype.CDS, dns.rdatatype.CDNSKEY})
_HALF = 1 << 31
_MOD = 1 << 32


@dataclass(frozen=True, slots=True)
class Policy:
    """What a quorum has set; ``max_validity`` None means nothing may be signed yet."""

    max_validity: int | None
    clock_tampered: bool = False


def serial_to_time(value: int, now: int) -> int:
    """Map a 32-bit RRSIG timestamp to the absolute time closest to ``now`` (RFC 4034 §3.1.5, RFC 1982)."""
    return now + ((value - now + _HALF) % _MOD) - _HALF


def serial_gt(a: int, b: int) -> bool:
    """RFC 1982 ``a > b`` for 32-bit serial numbers."""
    d = (a - b) % _MOD
    return 0 < d < _HALF


def limit(policy: Policy, now: int) -> int:
    """The latest expiration the token accepts at ``now``."""
    return now + (policy.max_validity or 0)


def check(key: KeyInfo, zone_wire: bytes, data: bytes, policy: Policy, now: int) -> rrsig.SigningData:
    """Parse ``data`` and raise :class:`Refusal` unless ``key`` may sign it at token time ``now``."""
    if policy.clock_tampered:
        raise Refusal("token clock tamper state: a quorum must run settime")
    if policy.max_validity is None:
        raise Refusal("no maximum validity policy set")
    sd = rrsig.parse(data)
    if sd.algorithm != key.algorithm:
        raise Refusal(f"algorithm {sd.algorithm} does not match key algorithm {key.algorithm}")
    if sd.key_tag != key.keytag:
        raise Refusal(f"key tag {sd.key_tag} does not match key {key.keytag}")
    if sd.signer != zone_wire:
        raise Refusal("signer name is not the key's zone")
    if not rrsig.is_subdomain(sd.owner, zone_wire):
        raise Refusal("owner name is outside the key's zone")
    if not serial_gt(sd.expiration, sd.inception):
        raise Refusal("RRSIG expiration is not after inception")
    if serial_to_time(sd.expiration, now) > limit(policy, now):
        raise Refusal(EXPIRATION_EXCEEDS)
    if key.role == "ksk" and (sd.type_covered not in KSK_TYPES or sd.owner != zone_wire):
        raise Refusal("a KSK signs only DNSKEY, CDS and CDNSKEY at the zone apex")
    return sd


# --- hash-only signing (PKCS#11 CKM_RSA_PKCS / CKM_ECDSA) ---------------------------------
# DER DigestInfo prefixes (RFC 8017 §9.2 note 1) and hash lengths per DNSSEC algorithm.
DIGEST_INFO = {8: bytes.fromhex("3031300d060960864801650304020105000420"),
               10: bytes.fromhex("3051300d060960864801650304020305000440")}
HASH_LEN = {8: 32, 10: 64, 13: 32, 14: 48}
NOT_COMPAT = "hash-only signing refused: key is not in compat mode"
COMPAT_RATE = 100  # signatures per second per compat key, and the burst allowed


@dataclass
class RateLimiter:
    """A token bucket per key: compat-mode signing cannot be turned into a signing oracle at full speed."""

    rate: float = COMPAT_RATE
    _buckets: dict = field(default_factory=dict)

    def allow(self, label: str, t: float) -> bool:
        level, last = self._buckets.get(label, (self.rate, t))
        level = min(self.rate, level + (t - last) * self.rate)
        if level < 1:
            self._buckets[label] = (level, t)
            return False
        self._buckets[label] = (level - 1, t)
        return True


def check_digest(key: KeyInfo, digest: bytes, mechanism: str, bound: bool, policy: Policy,
                 limiter: RateLimiter, t: float) -> bytes:
    """Decide on a hash-only signature; return the bare hash to sign or raise Refusal.

    ``bound`` means the PKCS#11 session computed this very hash over RRSIG data that
    passed :func:`check`, so the full policy already held; otherwise the data is
    unknown and only a key a quorum put in compat mode may sign it, rate-limited.
    """
    if policy.clock_tampered:
        raise Refusal("token clock tamper state: a quorum must run settime")
    if policy.max_validity is None:
        raise Refusal("no maximum validity policy set")
    if not bound:
        if not key.compat:
            raise Refusal(NOT_COMPAT)
        if not limiter.allow(key.label, t):
            raise Refusal("compat signing rate limit exceeded")
    if mechanism == "rsa-pkcs" and key.algorithm in DIGEST_INFO:
        prefix = DIGEST_INFO[key.algorithm]
        if not digest.startswith(prefix) or len(digest) != len(prefix) + HASH_LEN[key.algorithm]:
            raise Refusal("DigestInfo does not match the key's algorithm")
        return digest[len(prefix):]
    if mechanism == "ecdsa" and key.algorithm in (13, 14):
        if len(digest) != HASH_LEN[key.algorithm]:
            raise Refusal("digest length does not match the key's algorithm")
        return digest
    raise Refusal(f"mechanism {mechanism} does not fit algorithm {key.algorithm}")
