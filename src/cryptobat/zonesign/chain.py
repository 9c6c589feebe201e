"""The NSEC and NSEC3 chains (RFC 4034 §4, RFC 5155): type bitmaps and the NSEC3 records.

NSEC records are made during the signing walk (:mod:`.inputs`), one name ahead; the NSEC3
chain needs every hashed name sorted first, so it is added to the zone before the walk.
"""
from __future__ import annotations

import base64
import hashlib
import struct
from collections.abc import Callable, Iterable

import dns.rdatatype

from . import reader
from .fatal import Fatal
from .reader import DELEGATION, NS, NSEC3, NSEC3PARAM, OCCLUDED, RRSIG, Node, RRset, key_text, key_wire

DS = 43


def bitmap(types: Iterable[int]) -> bytes:
    """The RFC 4034 §4.1.2 type bitmap of ``types``."""
    windows: dict[int, bytearray] = {}
    for t in types:
        w = windows.setdefault(t >> 8, bytearray(32))
        w[(t & 0xFF) >> 3] |= 0x80 >> (t & 7)
    out = bytearray()
    for win in sorted(windows):
        bits = windows[win].rstrip(b"\0")
        out += bytes((win, len(bits))) + bits
    return bytes(out)


class TypeMaps:
    """Type bitmap wire + text per distinct type set (few per zone, so cached)."""

    def __init__(self) -> None:
        self._c: dict[tuple, tuple[bytes, str]] = {}

    def get(self, types: Iterable[int]) -> tuple[bytes, str]:
        k = tuple(sorted(types))
        r = self._c.get(k)
        if r is None:
            r = self._c[k] = (bitmap(k), " ".join(dns.rdatatype.to_text(t) for t in k))
        return r


def lower_text(node: Node) -> str:
    """The owner as the next-name field of an NSEC shows it (lower case, escapes kept)."""
    low = node.lower_disp
    return low if low is not None else key_text(node.key)


def chain_types(node: Node) -> list[int]:
    """The types a name's NSEC or NSEC3 lists, before RRSIG and NSEC: a delegation has only NS and DS."""
    if node.kind == DELEGATION:
        return [t for t in node.types() if t in (NS, DS)]
    return node.types()


def nsec3_hasher(salt: bytes, iterations: int) -> Callable[[bytes], bytes]:
    """RFC 5155 §5 hash of a canonical wire name (hashlib: dnspython's nsec3_hash takes names, not wire)."""
    sha1 = hashlib.sha1

    def h(wire: bytes) -> bytes:
        d = sha1(wire + salt).digest()
        for _ in range(iterations):
            d = sha1(d + salt).digest()
        return d

    return h


def _nsec3_covered(zone: reader.Zone, order: list[tuple], optout: bool) -> dict[tuple, list[int]]:
    """Names with an NSEC3 and their types: authoritative names and delegations (insecure ones
    not under opt-out), and the empty non-terminals above them."""
    nodes = zone.nodes
    okey = zone.origin_key
    covered: dict[tuple, list[int]] = {}
    for key in order:
        node = nodes[key]
        if node.kind == OCCLUDED:
            continue
        if node.kind == DELEGATION and optout and DS not in node:
            continue
        types = chain_types(node)
        if node.kind != DELEGATION or DS in node:
            types.append(RRSIG)
        covered[key] = types
        for i in range(len(okey) + 1, len(key)):
            anc = key[:i]
            if anc not in nodes and anc not in covered:
                covered[anc] = []
    return covered


def add_nsec3(zone: reader.Zone, order: list[tuple], ttl: int, salt: bytes, iterations: int, optout: bool) -> int:
    """Add NSEC3PARAM and the NSEC3 chain to ``zone``; return the number of NSEC3 records."""
    nodes = zone.nodes
    okey = zone.origin_key
    flags = 1 if optout else 0
    p = zone.apex.put(NSEC3PARAM, RRset(0))
    p.add(struct.pack("!BBHB", 1, 0, iterations, len(salt)) + salt, f"1 0 {iterations} {salt.hex() or '-'}")
    h = nsec3_hasher(salt, iterations)
    hashed = sorted((h(key_wire(k)), types) for k, types in _nsec3_covered(zone, order, optout).items())
    for i in range(1, len(hashed)):
        if hashed[i][0] == hashed[i - 1][0]:
            raise Fatal("NSEC3 hash collision; choose another salt")
    maps = TypeMaps()
    pre = struct.pack("!BBHB", 1, flags, iterations, len(salt)) + salt + b"\x14"
    ptext = f"1 {flags} {iterations} {salt.hex() or '-'} "
    b32 = base64.b32hexencode
    otext = zone.origin_text
    for i, (d, types) in enumerate(hashed):
        nd = hashed[i + 1][0] if i + 1 < len(hashed) else hashed[0][0]
        label = b32(d).decode().lower()
        key = okey + (label,)
        if key in nodes:
            raise Fatal(f"NSEC3 owner {label}.{otext} is already in the zone")
        node = nodes[key] = Node(key, f"{label}.{otext}" if otext != "." else f"{label}.")
        bw, bt = maps.get(types)
        rrs = node.put(NSEC3, RRset(ttl))
        rrs.add(pre + nd + bw, ptext + b32(nd).decode() + (" " + bt if bt else ""))
    return len(hashed)
