"""The signing policy: the one place that decides whether the token signs.

Every path that produces a signature (console ``tpmtimedsign``, the native
API, PKCS#11, ``signzone``) calls :func:`check` on the parsed signing data
before the private key is touched.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache

import dns.dnssec
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype

from . import rrsig
from .keystore import with_role
from .api import ROLES, KeyInfo
from .errors import Refusal

EXPIRATION_EXCEEDS = "RRSIG expiration time exceeds HSM policy"
EXPIRED = "RRSIG already expired"
INCEPTION_FUTURE = "RRSIG inception is in the future"
NOT_IN = "only class IN is signed"
KSK_ONLY = "a KSK signs only DNSKEY, CDS and CDNSKEY at the zone apex"
ZSK_NO_KEYSET = "a ZSK does not sign DNSKEY, CDS or CDNSKEY"
KEYSET_APEX = "DNSKEY, CDS and CDNSKEY are signed only at the zone apex"
DNSKEY_NO_SIGNER = "DNSKEY RRset does not hold the signing key"
DNSKEY_FOREIGN = "DNSKEY RRset holds a key the token does not hold or allow"
CDNSKEY_FOREIGN = "CDNSKEY for a key the token does not hold or allow"
CDS_FOREIGN = "CDS for a key the token does not hold or allow"
DELETE_CLOSED = "CDS/CDNSKEY delete request outside a quorum's delete window"
DELETE_NOT_ALONE = "a CDS/CDNSKEY delete request must be the only record"

SKEW = 300
"""Seconds an RRSIG inception may lie ahead of token time. Signers stamp inception from
their own clock, which may run a little ahead of the token's; anything further is a
pre-dated signature, made now to be used later, and is refused."""

DNSKEY, CDS, CDNSKEY = int(dns.rdatatype.DNSKEY), int(dns.rdatatype.CDS), int(dns.rdatatype.CDNSKEY)
KSK_TYPES = frozenset({DNSKEY, CDS, CDNSKEY})
DS_DIGESTS = (1, 2, 4)  # SHA-1, SHA-256, SHA-384
# RFC 8078 §4 delete requests, canonical RDATA: "CDNSKEY 0 3 0 AA==" and "CDS 0 0 0 00".
CDNSKEY_DELETE = bytes.fromhex("0000030000")
CDS_DELETE = bytes.fromhex("0000000000")
_IN = int(dns.rdataclass.IN)
_ROLES = frozenset(ROLES)
_HALF = 1 << 31
_MOD = 1 << 32


@dataclass(frozen=True, slots=True)
class Policy:
    """What a quorum has set; ``max_validity`` None means nothing may be signed yet.

    ``zone_keys``: zone name (canonical wire) -> canonical DNSKEY RDATA (``to_digestable()``)
    of every key the token holds for the zone plus every key a quorum allowed for it
    (``keyallow``: rollovers, multi-signer). Only these may be SEP keys in a DNSKEY RRset
    and only these may be named by CDS/CDNSKEY, so a compromised signer cannot get a foreign
    key (and through the parent's DS, the zone) trusted.
    ``delete_until``: zone name (canonical wire) -> token time until which a quorum opened an
    RFC 8078 delete window; outside it the delete CDS/CDNSKEY (going insecure) is refused.
    """

    max_validity: int | None
    clock_tampered: bool = False
    zone_keys: Mapping[bytes, frozenset[bytes]] = field(default_factory=dict, hash=False)
    delete_until: Mapping[bytes, int] = field(default_factory=dict, hash=False)


def for_zones(policy: Policy, zones: set[bytes]) -> Policy:
    """The policy as it decides for keys of ``zones`` (canonical wire names): :func:`check`
    reads the zone-keyed parts only at the key's own zone, so this decides the same for them,
    and a job for one key sent to another process does not carry every zone's keys."""
    return Policy(policy.max_validity, policy.clock_tampered,
                  zone_keys={z: policy.zone_keys[z] for z in zones if z in policy.zone_keys},
                  delete_until={z: policy.delete_until[z] for z in zones if z in policy.delete_until})


def serial_gt(a: int, b: int) -> bool:
    """RFC 1982 ``a > b`` for 32-bit serial numbers."""
    d = (a - b) % _MOD
    return 0 < d < _HALF


def limit(policy: Policy, now: int) -> int:
    """The latest expiration the token accepts at ``now``."""
    return now + (policy.max_validity or 0)


def in_force(policy: Policy) -> None:
    """Raise :class:`Refusal` unless the token may sign at all: its clock is trusted and a
    quorum has set a maximum validity (every signature, whole-data or hash-only, first)."""
    if policy.clock_tampered:
        raise Refusal("token clock tamper state: a quorum must run settime")
    if policy.max_validity is None:
        raise Refusal("no maximum validity policy set")


def check(key: KeyInfo, zone_wire: bytes, data: bytes, policy: Policy, now: int) -> rrsig.SigningData:
    """Parse ``data`` and raise :class:`Refusal` unless ``key`` may sign it at token time ``now``.

    RRSIG times are 32-bit serials (RFC 4034 §3.1.5, RFC 1982): they are only ever compared
    as offsets from ``now`` on the 2^32 circle, never turned into absolute times, so no
    value can wrap into looking acceptable.
    """
    in_force(policy)
    return check_parsed(key, zone_wire, rrsig.parse(data), data, policy, now)


def check_parsed(key: KeyInfo, zone_wire: bytes, sd: rrsig.SigningData, data: bytes, policy: Policy,
                 now: int) -> rrsig.SigningData:
    """:func:`check` of ``data`` that ``sd = rrsig.parse(data)`` already parsed: the whole
    decision again (policy, key and clock as they are now), only not the parse. A bound digest
    is checked at C_Digest and again at C_Sign; parsing is the costly part and depends on the
    bytes alone, so the token parses them once."""
    in_force(policy)
    if sd.rdclass != _IN:
        raise Refusal(NOT_IN)
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
    ahead = (sd.expiration - now) % _MOD
    if ahead == 0 or ahead > _HALF:
        raise Refusal(EXPIRED)
    if ahead > policy.max_validity or ahead == _HALF:  # 2^31 ahead: RFC 1982 leaves the order undefined
        raise Refusal(EXPIRATION_EXCEEDS)
    if SKEW < (sd.inception - now) % _MOD < _HALF:
        raise Refusal(INCEPTION_FUTURE)
    role = key.role
    if role not in _ROLES:
        raise Refusal(f"unknown key role {role!r}")
    if sd.type_covered in KSK_TYPES:
        if role == "zsk":
            raise Refusal(ZSK_NO_KEYSET)
        if sd.owner != zone_wire:
            raise Refusal(KSK_ONLY if role == "ksk" else KEYSET_APEX)
        _check_keyset(key, zone_wire, sd.type_covered, rrsig.rdatas(data), policy, now)
    elif role == "ksk":
        raise Refusal(KSK_ONLY)
    return sd


def _check_keyset(key: KeyInfo, zone_wire: bytes, rdtype: int, rds: list[bytes], policy: Policy,
                  now: int) -> None:
    """The content of an apex DNSKEY, CDS or CDNSKEY RRset: these decide which keys the zone
    (and, through the parent's DS, the world) trusts, so they may name only keys of this zone
    the token holds or a quorum allowed. The signing key counts as held: it is the token's."""
    own = key.dnskey().to_digestable()
    allowed = policy.zone_keys.get(zone_wire, frozenset())
    if own not in allowed:
        allowed = allowed | {own}
    if rdtype == DNSKEY:
        if own not in rds:
            raise Refusal(DNSKEY_NO_SIGNER)
        for rd in rds:  # every key, SEP or not: validators ignore the flag, and a foreign ZSK in a
            if rd not in allowed:  # signed DNSKEY set would sign anything, CDS deletes included
                raise Refusal(DNSKEY_FOREIGN)
    elif rdtype == CDNSKEY:
        if not _delete_request(rds, CDNSKEY_DELETE, policy, zone_wire, now):
            for rd in rds:
                if rd not in allowed:
                    raise Refusal(CDNSKEY_FOREIGN)
    elif not _delete_request(rds, CDS_DELETE, policy, zone_wire, now):
        ds = _ds_set(zone_wire, allowed)
        for rd in rds:
            if rd not in ds:
                raise Refusal(CDS_FOREIGN)


def _delete_request(rds: list[bytes], delete: bytes, policy: Policy, zone_wire: bytes, now: int) -> bool:
    """True for an allowed RFC 8078 delete request; refuse one outside the window or not alone."""
    if delete not in rds:
        return False
    if not now < policy.delete_until.get(zone_wire, 0):
        raise Refusal(DELETE_CLOSED)
    if len(rds) != 1:
        raise Refusal(DELETE_NOT_ALONE)
    return True


@lru_cache(maxsize=64)
def _ds_set(zone_wire: bytes, dnskeys: frozenset[bytes]) -> frozenset[bytes]:
    """Canonical RDATA of every DS (digest types 1, 2, 4) of ``dnskeys`` for the zone."""
    zone = dns.name.from_wire(zone_wire, 0)[0]
    out = set()
    for rd in dnskeys:
        k = dns.rdata.from_wire(dns.rdataclass.IN, dns.rdatatype.DNSKEY, rd, 0, len(rd))
        for digest in DS_DIGESTS:  # SHA-1 too: RFC 8624 discourages it, yet parents still take it
            out.add(dns.dnssec.make_ds(zone, k, digest, policy=dns.dnssec.allow_all_policy).to_digestable())
    return frozenset(out)


# --- hash-only signing (PKCS#11 CKM_RSA_PKCS / CKM_ECDSA): see cryptobat.prehash -------------
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


def settled_role(key: KeyInfo, type_covered: int, key_tag: int) -> str | None:
    """The role a role-open key (made as a CSK, flags 257) settles to with an RRSIG it is asked
    for, or None to leave it open.

    The application published the key with the flags it chose, and the tag in the RRSIG says
    which: the tag of flags 256 over an ordinary RRset makes a ZSK, the tag of flags 257 over
    one a CSK. A keyset settles nothing: a CSK signs its DNSKEY set first as often as a KSK
    does, and only a quorum's ``keyrole`` makes a KSK. Every outcome signs no more than the
    CSK the key was made as."""
    if type_covered in KSK_TYPES:
        return None
    if key_tag == key.keytag:
        return "csk"
    if key_tag == with_role(key, "zsk").keytag:
        return "zsk"
    return None
