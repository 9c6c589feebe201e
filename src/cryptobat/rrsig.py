"""Parse the bytes a DNSSEC signer hands over for signing (RFC 4034 §3.1.8.1).

The data is the RRSIG RDATA without the signature field, followed by every RR
of the RRset in canonical form and order. We parse it strictly: names are read
by hand because canonical form forbids compression and upper case, which a
general wire parser (dnspython's) would silently accept; record data is then
checked with dnspython, so only well-formed, canonical RDATA passes.
"""
from __future__ import annotations

import struct
from typing import NamedTuple

import dns.exception
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype

from .errors import Refusal

_HEADER = struct.Struct("!HBBIIIH")  # type covered, alg, labels, orig TTL, exp, inc, key tag
_RR = struct.Struct("!HHIH")  # type, class, TTL, rdlength
_unpack_header = _HEADER.unpack_from
_unpack_rr = _RR.unpack_from
# Types whose RDATA is fixed-size and name-free: their canonical form is the wire form.
_FIXED = {dns.rdatatype.A: 4, dns.rdatatype.AAAA: 16}
# Meta and pseudo types that never appear in a signed RRset (RFC 4035 §2.2, RFC 6895).
_UNSIGNABLE = {dns.rdatatype.RRSIG, dns.rdatatype.OPT, dns.rdatatype.TKEY, dns.rdatatype.TSIG,
               dns.rdatatype.IXFR, dns.rdatatype.AXFR, dns.rdatatype.MAILA, dns.rdatatype.MAILB,
               dns.rdatatype.ANY, 0}
# The same decisions as dns.rdatatype.is_metatype / dns.rdataclass.is_metaclass, as set lookups.
# Meta types and classes are all below 256 (RFC 6895 §3.1: 128-255 plus OPT; NONE and ANY), so
# only those are asked at import (tests/test_policy_rules.py checks all 65536 of each).
_NEVER_SIGNED = frozenset(_UNSIGNABLE) | frozenset(t for t in range(256) if dns.rdatatype.is_metatype(t))
_META_CLASSES = frozenset(c for c in range(256) if dns.rdataclass.is_metaclass(c))
_NSEC = int(dns.rdatatype.NSEC)
_TXT = int(dns.rdatatype.TXT)


class Header(NamedTuple):
    """The fixed-size RRSIG RDATA fields that open signing data (RFC 4034 §3.1)."""

    type_covered: int
    algorithm: int
    labels: int
    original_ttl: int
    expiration: int
    inception: int
    key_tag: int


def header(data: bytes) -> Header:
    """The fixed header fields alone, without checking the rest: for choosing candidate keys
    cheaply and for echoing what was asked; :func:`parse` is what makes data signable."""
    if len(data) < _HEADER.size:
        raise Refusal("signing data too short")
    return Header(*_HEADER.unpack_from(data, 0))


class SigningData(NamedTuple):
    """What :func:`parse` found. A NamedTuple, immutable as a frozen dataclass is, because it is
    made once per signature: a frozen dataclass's ``__init__`` (one ``object.__setattr__`` per
    field) cost a third of the whole policy check."""

    type_covered: int
    algorithm: int
    labels: int
    original_ttl: int
    expiration: int
    inception: int
    key_tag: int
    signer: bytes  # canonical wire form
    owner: bytes  # canonical wire form of the RRset owner
    rdclass: int
    count: int  # number of RRs


def read_name(data: bytes, pos: int) -> tuple[bytes, int, int]:
    """Read one uncompressed, lower-case wire name; return (wire, label count, next pos).

    The common case (a well-formed canonical name) is checked in one pass over the label
    lengths and one ``lower()`` of the whole name (length octets are at most 63, below 'A',
    so lowering the name changes only its labels); anything else is read again by
    :func:`_read_name_checked`, whose refusal reason is the one given."""
    start = pos
    labels = 0
    try:
        n = data[pos]
        while n:
            if n > 63:
                return _read_name_checked(data, start)
            labels += 1
            pos += n + 1
            n = data[pos]
    except IndexError:
        return _read_name_checked(data, start)
    pos += 1
    wire = data[start:pos]
    if pos - start > 255 or wire != wire.lower():
        return _read_name_checked(data, start)
    return wire, labels, pos


def _read_name_checked(data: bytes, pos: int) -> tuple[bytes, int, int]:
    """:func:`read_name` label by label, for the names its one-pass check did not accept."""
    start = pos
    labels = 0
    end = len(data)
    while True:
        if pos >= end:
            raise Refusal("truncated name")
        n = data[pos]
        if n == 0:
            pos += 1
            break
        if n > 63:
            raise Refusal("compressed or invalid label in name")
        label = data[pos + 1:pos + 1 + n]
        if len(label) != n:
            raise Refusal("truncated name")
        if label != label.lower():
            raise Refusal("name not in canonical (lower case) form")
        labels += 1
        pos += n + 1
    if pos - start > 255:
        raise Refusal("name too long")
    return data[start:pos], labels, pos


def is_subdomain(name: bytes, zone: bytes) -> bool:
    """True if wire name ``name`` is ``zone`` or below it (both canonical)."""
    if not name.endswith(zone):
        return False
    cut = len(name) - len(zone)
    if cut == 0:
        return True
    # the suffix must start on a label boundary of ``name``
    pos = 0
    while pos < cut:
        pos += name[pos] + 1
    return pos == cut


def _nsec_ok(rdata: bytes) -> bool:
    """NSEC RDATA (RFC 4034 §4.1) accepted exactly as dnspython's parser + canonical check does:
    an uncompressed next name (case kept, RFC 6840 §5.1) of at most 255 octets, then windows
    in increasing order, each of 1..32 octets with a non-zero last octet, nothing trailing."""
    end = len(rdata)
    pos = 0
    while True:
        if pos >= end:
            return False
        n = rdata[pos]
        if n == 0:
            pos += 1
            break
        if n > 63:  # compression pointer or extended label type
            return False
        pos += n + 1
    if pos > 255:
        return False
    last = -1
    while pos < end:
        if pos + 2 > end:
            return False
        window = rdata[pos]
        n = rdata[pos + 1]
        pos += 2
        if window <= last or n == 0 or n > 32 or pos + n > end or rdata[pos + n - 1] == 0:
            return False
        last = window
        pos += n
    return True


def _txt_ok(rdata: bytes) -> bool:
    """TXT RDATA: one or more <character-string>s that exactly fill it (as dnspython accepts)."""
    end = len(rdata)
    if end == 0:
        return False
    pos = 0
    while pos < end:
        pos += rdata[pos] + 1
    return pos == end


def _check_rdata(rdtype: int, rdclass: int, rdata: bytes) -> None:
    fixed = _FIXED.get(rdtype)
    if fixed is not None:
        if len(rdata) != fixed:
            raise Refusal(f"malformed {dns.rdatatype.to_text(rdtype)} RDATA")
        return
    if rdtype == _NSEC:
        if not _nsec_ok(rdata):
            raise Refusal("malformed NSEC RDATA")
        return
    if rdtype == _TXT:
        if not _txt_ok(rdata):
            raise Refusal("malformed TXT RDATA")
        return
    try:
        rd = dns.rdata.from_wire(rdclass, rdtype, rdata, 0, len(rdata))
        canonical = rd.to_digestable()
    except (dns.exception.DNSException, ValueError, IndexError, struct.error) as e:
        raise Refusal(f"malformed {dns.rdatatype.to_text(rdtype)} RDATA") from e
    if canonical != rdata:
        raise Refusal(f"{dns.rdatatype.to_text(rdtype)} RDATA not in canonical form")


def parse(data: bytes) -> SigningData:
    """Parse and check the structure of RRSIG signing data; raise Refusal if malformed.

    Checks here are about form: every RR is well-formed and canonical, shares one
    owner, the covered type, one class and the original TTL, RRs are in canonical
    order without duplicates, the labels field fits the owner, nothing trails.
    Whether the token may sign it is :mod:`cryptobat.policy`'s decision.

    This runs once per signature, so it is written for speed: the owner of the second and
    later RRs is compared with the first's bytes (a name is self-delimiting, so equal bytes
    are the same name, read to the same position) instead of being read again.
    """
    end = len(data)
    if end < _HEADER.size + 1:
        raise Refusal("signing data too short")
    tc, alg, labels, ottl, exp, inc, tag = _unpack_header(data, 0)
    if tc in _NEVER_SIGNED:
        raise Refusal(f"type {dns.rdatatype.to_text(tc)} is never signed")
    signer, _, pos = read_name(data, _HEADER.size)
    if pos >= end:
        raise Refusal("no RRs in signing data")
    owner = b""
    olen = 0
    rdclass = None
    prev = None
    count = 0
    while True:
        if count and data.startswith(owner, pos):
            name = owner
            pos += olen
        else:
            name, nlabels, pos = read_name(data, pos)
        if pos + _RR.size > end:
            raise Refusal("truncated RR")
        rtype, rclass, ttl, rdlen = _unpack_rr(data, pos)
        pos += _RR.size
        rdata = data[pos:pos + rdlen]
        if len(rdata) != rdlen:
            raise Refusal("truncated RDATA")
        pos += rdlen
        if not count:
            owner, olen, rdclass = name, len(name), rclass
            if labels != nlabels - (name[:2] == b"\x01*"):
                raise Refusal("RRSIG labels field does not match owner name")
        elif name is not owner and name != owner:
            raise Refusal("RRs with different owner names")
        if rtype != tc:
            raise Refusal("RR type differs from type covered")
        if rclass != rdclass or rclass in _META_CLASSES:
            raise Refusal("RR class mismatch")
        if ttl != ottl:
            raise Refusal("RR TTL differs from original TTL")
        if prev is not None and rdata <= prev:
            raise Refusal("RRs not in canonical order" if rdata != prev else "duplicate RR")
        _check_rdata(rtype, rclass, rdata)
        prev = rdata
        count += 1
        if pos >= end:
            break
    return SigningData(tc, alg, labels, ottl, exp, inc, tag, signer, owner, rdclass, count)


def rdatas(data: bytes) -> list[bytes]:
    """The RDATA of every RR in signing data that :func:`parse` accepted, in order.

    Only the policy's content rules for DNSKEY, CDS and CDNSKEY need it, so :func:`parse`
    does not collect it and ordinary types pay nothing for it.
    """
    _, _, pos = read_name(data, _HEADER.size)
    out = []
    end = len(data)
    while pos < end:
        _, _, pos = read_name(data, pos)
        rdlen = _RR.unpack_from(data, pos)[3]
        pos += _RR.size
        out.append(data[pos:pos + rdlen])
        pos += rdlen
    return out


def name_text(wire: bytes) -> str:
    return dns.name.from_wire(wire, 0)[0].to_text()


def template(rrset, key, inception: int, expiration: int):
    """An RRSIG RDATA (empty signature) for ``rrset`` signed by ``key`` (a KeyInfo)."""
    import dns.rdtypes.ANY.RRSIG
    labels = len(rrset.name) - 1 - (1 if rrset.name.is_wild() else 0)
    return dns.rdtypes.ANY.RRSIG.RRSIG(
        dns.rdataclass.IN, dns.rdatatype.RRSIG, rrset.rdtype, key.algorithm, labels, rrset.ttl,
        expiration & 0xFFFFFFFF, inception & 0xFFFFFFFF, key.keytag, dns.name.from_text(key.zone), b"")


def signing_data(rrset, rrsig) -> bytes:
    """RFC 4034 §3.1.8.1 bytes for ``rrset`` under RRSIG ``rrsig``, as dnspython's validator builds them."""
    import dns.dnssec
    return dns.dnssec._make_rrsig_signature_data(rrset, rrsig)
