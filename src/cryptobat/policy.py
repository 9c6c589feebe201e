"""The signing policy: the one place that decides whether the token signs.

Every path that produces a signature (console ``tpmtimedsign``, the native
API, PKCS#11, ``signzone``) calls :func:`check` on the parsed signing data
before the private key is touched.
"""
from __future__ import annotations

from dataclasses import dataclass

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
