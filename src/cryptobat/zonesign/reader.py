"""A fast RFC 1035 master-file reader for the zone signer.

dnspython's ``dns.zone.from_file`` costs ~75 µs per record (10 s for a 135k-record
zone), more than signing the zone.  This reader handles the master-file syntax
itself ($ORIGIN, $TTL, $INCLUDE, parentheses, comments, quoted strings, omitted
owner/TTL/class) and parses the common record types (A, AAAA, NS, CNAME, PTR,
DNAME, MX) directly; every other type goes through dnspython's rdata parser.
``$GENERATE`` zones are handed to dnspython whole (:func:`from_dnspython`).

What it produces is exactly what signing needs: per owner name, per type, the
TTL and a dict *canonical wire form* (RFC 4034 §6.2) -> presentation text.
Names are kept as *keys*: tuples of lower-cased labels from the root down
(``("com", "example", "www")``), which sort in RFC 4034 §6.1 canonical order.
Labels are ``str`` holding one character per octet (latin-1), so tuple order
is octet order.
"""
from __future__ import annotations

import os
import socket
from typing import Iterator

import dns.exception
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.ttl

A, NS, CNAME, SOA, PTR, MX, TXT, AAAA, DNAME = 1, 2, 5, 6, 12, 15, 16, 28, 39
RRSIG, NSEC, DNSKEY, NSEC3, NSEC3PARAM = 46, 47, 48, 50, 51
# Records the signer regenerates: dropped from the input.
GENERATED = frozenset((RRSIG, NSEC, NSEC3, NSEC3PARAM))
_NAME_ONLY = frozenset((NS, CNAME, PTR, DNAME))
_CLASSES = frozenset(("IN", "CLASS1"))
_OTHER_CLASSES = frozenset(("CH", "HS", "CS", "NONE", "ANY"))
_inet_pton, _inet_ntop = socket.inet_pton, socket.inet_ntop
_AF4, _AF6 = socket.AF_INET, socket.AF_INET6


class ZoneError(Exception):
    """A bad zone; ``str()`` is ``FILE:LINE: message``."""


class _Generate(Exception):
    """The file uses $GENERATE: read it with dnspython instead."""


class RRset:
    """One RRset: its TTL and RRs, compactly (most RRsets hold a single RR).

    ``rd`` is ``(wire, text)`` for one RR, else a dict canonical wire -> presentation text.
    """

    __slots__ = ("ttl", "rd", "line")

    def __init__(self, ttl: int, line: int = 0):
        self.ttl = ttl
        self.rd: tuple | dict | None = None
        self.line = line

    def add(self, wire: bytes, text: str) -> None:
        rd = self.rd
        if rd is None:
            self.rd = (wire, text)
        elif type(rd) is tuple:
            if rd[0] != wire:
                self.rd = {rd[0]: rd[1], wire: text}
        else:
            rd.setdefault(wire, text)

    def __len__(self) -> int:
        rd = self.rd
        return 0 if rd is None else 1 if type(rd) is tuple else len(rd)

    @property
    def rdatas(self) -> dict[bytes, str]:
        """Canonical wire -> presentation text (a copy for a single RR)."""
        rd = self.rd
        if rd is None:
            return {}
        return {rd[0]: rd[1]} if type(rd) is tuple else rd

    @rdatas.setter
    def rdatas(self, d: dict[bytes, str]) -> None:
        self.rd = None
        for w, t in d.items():
            self.add(w, t)

    def items(self) -> list[tuple[bytes, str]]:
        """(wire, text) pairs in canonical (wire) order."""
        rd = self.rd
        if rd is None:
            return []
        return [rd] if type(rd) is tuple else sorted(rd.items())


AUTH, DELEGATION, OCCLUDED = 0, 1, 2


class Node:
    __slots__ = ("key", "disp", "rrsets", "kind")

    def __init__(self, key: tuple, disp: str):
        self.key = key
        self.disp = disp  # absolute presentation form, as first written
        self.rrsets: dict[int, RRset] = {}
        self.kind = AUTH  # AUTH, DELEGATION (NS below the apex) or OCCLUDED (glue, below DNAME)


class Zone:
    def __init__(self, origin: dns.name.Name, filename: str):
        self.origin = origin
        self.origin_key = name_key(origin)
        self.origin_text = origin.to_text()
        self.filename = filename
        self.nodes: dict[tuple, Node] = {}
        self.dropped = 0  # RRSIG/NSEC/NSEC3/NSEC3PARAM records read and discarded

    def node(self, key: tuple, disp: str) -> Node:
        n = self.nodes.get(key)
        if n is None:
            n = self.nodes[key] = Node(key, disp)
        return n

    @property
    def apex(self) -> Node:
        return self.nodes[self.origin_key]


def name_key(name: dns.name.Name) -> tuple:
    """Canonical sort key of an absolute dnspython name."""
    return tuple(label.lower().decode("latin-1") for label in reversed(name.labels[:-1]))


def key_wire(key: tuple) -> bytes:
    """Canonical (lower-case, uncompressed) wire form of a name key."""
    return ("".join([chr(len(lb)) + lb for lb in reversed(key)]) + "\0").encode("latin-1")


def key_text(key: tuple) -> str:
    if not key:
        return "."
    return dns.name.Name([lb.encode("latin-1") for lb in reversed(key)] + [b""]).to_text()


class _Names:
    """Name tokens -> (key, absolute text), cached per origin."""

    def __init__(self):
        self._cache: dict[tuple[str, str], tuple[tuple, str]] = {}

    def get(self, tok: str, origin: dns.name.Name, okey: tuple, otext: str) -> tuple[tuple, str]:
        ck = (tok, otext)
        r = self._cache.get(ck)
        if r is not None:
            return r
        if tok == "@":
            r = (okey, otext)
        elif "." not in tok and "\\" not in tok and tok.isascii() and 0 < len(tok) < 64 and len(otext) + len(tok) < 254:
            # cheap to build and usually unique (owner names): not cached
            return (okey + (tok.lower(),), tok + "." + otext if otext != "." else tok + ".")
        elif tok.isascii() and "\\" not in tok:
            if tok.endswith("."):
                labels = tok[:-1].split(".") if tok != "." else []
                base, disp = (), tok
            else:
                labels = tok.split(".")
                base, disp = okey, (tok + "." + otext if otext != "." else tok + ".")
            key = base + tuple(lb.lower() for lb in reversed(labels))
            total = 1
            for lb in key:
                if not 0 < len(lb) < 64:
                    raise ValueError(f"bad label in name {tok!r}")
                total += len(lb) + 1
            if total > 255:
                raise ValueError(f"name too long: {tok!r}")
            r = (key, disp)
        else:
            n = dns.name.from_text(tok, origin)
            r = (name_key(n), n.to_text())
        if len(self._cache) > 200000:
            self._cache.clear()
        self._cache[ck] = r
        return r


def _logical_lines(f, fname: str) -> Iterator[tuple[int, str]]:
    """(line number, text) for each logical line: comments cut, parentheses joined."""
    lineno = 0
    pending: list[str] = []
    start = 0
    depth = 0
    for line in f:
        lineno += 1
        if not depth and '"' not in line and "(" not in line and ")" not in line and "\\" not in line:
            i = line.find(";")
            if i >= 0:
                line = line[:i]
            if line.strip():
                yield lineno, line.rstrip()
            continue
        # slow path: quotes, escapes, parentheses
        out = []
        quoted = False
        i, n = 0, len(line)
        while i < n:
            c = line[i]
            if c == "\\":
                out.append(line[i : i + 2])
                i += 2
                continue
            if c == '"':
                quoted = not quoted
            elif not quoted:
                if c == ";" or c == "\n":
                    break
                if c == "(":
                    depth += 1
                    c = " "
                elif c == ")":
                    depth -= 1
                    if depth < 0:
                        raise ZoneError(f"{fname}:{lineno}: unbalanced parentheses")
                    c = " "
            elif c == "\n":
                raise ZoneError(f"{fname}:{lineno}: unterminated quoted string")
            out.append(c)
            i += 1
        if not pending:
            start = lineno
        pending.append("".join(out))
        if depth == 0:
            text = " ".join(pending).rstrip()
            pending = []
            if text.strip():
                yield start, text
    if depth:
        raise ZoneError(f"{fname}:{start}: unbalanced parentheses")


def _ttl(tok: str) -> int:
    if tok.isdigit():
        v = int(tok)
        if v > 0x7FFFFFFF:
            raise dns.ttl.BadTTL(f"TTL {tok} too large")
        return v
    return dns.ttl.from_text(tok)


class _Reader:
    def __init__(self, zone: Zone):
        self.zone = zone
        self.names = _Names()
        self.types: dict[str, int] = {}
        self.default_ttl: int | None = None
        self.last_ttl: int | None = None

    def _type(self, tok: str) -> int | None:
        t = self.types.get(tok)
        if t is None:
            try:
                t = int(dns.rdatatype.from_text(tok))
            except dns.rdatatype.UnknownRdatatype:
                return None
            self.types[tok] = t
        return t

    def read(self, path: str, origin: dns.name.Name, depth: int = 0) -> None:
        if depth > 20:
            raise ZoneError(f"{path}: $INCLUDE nested too deeply")
        zone = self.zone
        okey, otext = name_key(origin), origin.to_text()
        owner: Node | None = None
        names = self.names.get
        try:
            f = open(path, encoding="latin-1", newline=None)
        except OSError as e:
            raise ZoneError(f"{path}: {e.strerror}") from None
        with f:
            for lineno, text in _logical_lines(f, path):
                try:
                    if text[0] == "$":
                        parts = text.split()
                        d = parts[0].upper()
                        if d == "$ORIGIN" and len(parts) >= 2:
                            origin = dns.name.from_text(parts[1], origin)
                            okey, otext = name_key(origin), origin.to_text()
                        elif d == "$TTL" and len(parts) >= 2:
                            self.default_ttl = _ttl(parts[1])
                        elif d == "$INCLUDE" and len(parts) >= 2:
                            inc = parts[1]
                            if not os.path.isabs(inc) and not os.path.exists(inc):
                                inc = os.path.join(os.path.dirname(path), inc)
                            io = dns.name.from_text(parts[2], origin) if len(parts) >= 3 else origin
                            self.read(inc, io, depth + 1)
                        elif d == "$GENERATE":
                            raise _Generate()
                        else:
                            raise ValueError(f"unknown or malformed directive {parts[0]}")
                        continue
                    if text[0] in " \t":
                        if owner is None:
                            raise ValueError("no owner name")
                        rest = text
                    else:
                        parts = text.split(None, 1)
                        tok = parts[0]
                        rest = parts[1] if len(parts) > 1 else ""
                        key, disp = names(tok, origin, okey, otext)
                        if key[: len(zone.origin_key)] != zone.origin_key:
                            raise ValueError(f"{disp} is not a subdomain of {zone.origin_text}")
                        owner = zone.nodes.get(key)
                        if owner is None:
                            owner = zone.nodes[key] = Node(key, disp)
                    ttl = None
                    rdtype = None
                    for _ in range(3):
                        parts = rest.split(None, 1)
                        if not parts:
                            raise ValueError("missing type")
                        tok = parts[0]
                        rest = parts[1] if len(parts) > 1 else ""
                        if tok[0].isdigit() and ttl is None:
                            ttl = _ttl(tok)
                            continue
                        up = tok.upper()
                        if up in _CLASSES:
                            continue
                        if up in _OTHER_CLASSES or up.startswith("CLASS"):
                            raise ValueError(f"class {tok} is not IN")
                        rdtype = self._type(up)
                        if rdtype is None:
                            raise ValueError(f"unknown type or bad TTL {tok!r}")
                        break
                    if rdtype is None:
                        raise ValueError("missing type")
                    if ttl is None:
                        ttl = self.default_ttl if self.default_ttl is not None else self.last_ttl
                    else:
                        self.last_ttl = ttl
                    wire, rtext = self._rdata(rdtype, rest, origin, okey, otext)
                    if rdtype in GENERATED:
                        zone.dropped += 1
                        continue
                    if ttl is None:
                        if rdtype != SOA:
                            raise ValueError("missing TTL and no $TTL before it")
                        ttl = int.from_bytes(wire[-4:], "big")
                        self.last_ttl = ttl
                    rrs = owner.rrsets.get(rdtype)
                    if rrs is None:
                        rrs = owner.rrsets[rdtype] = RRset(ttl, lineno)
                    elif ttl < rrs.ttl:
                        rrs.ttl = ttl
                    rrs.add(wire, rtext)
                except (ZoneError, _Generate):
                    raise
                except (ValueError, dns.exception.DNSException, OSError, IndexError) as e:
                    msg = str(e) or type(e).__name__
                    raise ZoneError(f"{path}:{lineno}: {msg}") from None

    def _rdata(self, rdtype, rest, origin, okey, otext) -> tuple[bytes, str]:
        if rdtype == A or rdtype == AAAA:
            s = rest.strip()
            try:
                w = _inet_pton(_AF4 if rdtype == A else _AF6, s)
            except OSError:
                raise ValueError(f"bad {'IPv4' if rdtype == A else 'IPv6'} address {s!r}") from None
            return w, _inet_ntop(_AF4 if rdtype == A else _AF6, w)
        if rdtype == TXT:
            r = _txt(rest)
            if r is not None:
                return r
        elif rdtype in _NAME_ONLY and "\\" not in rest:
            parts = rest.split()
            if len(parts) == 1:
                key, disp = self.names.get(parts[0], origin, okey, otext)
                return key_wire(key), disp
        elif rdtype == MX and "\\" not in rest:
            parts = rest.split()
            if len(parts) == 2 and parts[0].isdigit() and int(parts[0]) < 65536:
                key, disp = self.names.get(parts[1], origin, okey, otext)
                pref = int(parts[0])
                return pref.to_bytes(2, "big") + key_wire(key), f"{pref} {disp}"
        rd = dns.rdata.from_text(dns.rdataclass.IN, rdtype, rest, origin=origin, relativize=False)
        return rd.to_digestable(origin), rd.to_text()


def _txt(rest: str) -> tuple[bytes, str] | None:
    """TXT made only of quoted, escape-free printable-ASCII strings; None: let dnspython parse it."""
    s = rest.strip()
    if len(s) < 2 or s[0] != '"' or s[-1] != '"' or "\\" in s or not s.isascii():
        return None
    parts = s.split('"')
    strings = parts[1::2]
    seps = parts[2:-1:2]
    for sep in seps:
        if not sep or sep.strip():
            return None
    wire = []
    for x in strings:
        if len(x) > 255 or not x.isprintable():
            return None
        wire.append(len(x).to_bytes(1, "big") + x.encode("ascii"))
    return b"".join(wire), " ".join(['"' + x + '"' for x in strings])


def read_zone(path: str, origin: dns.name.Name) -> Zone:
    """Read a master file; ZoneError on any syntax or content error."""
    zone = Zone(origin, path)
    try:
        _Reader(zone).read(path, origin)
    except _Generate:
        return from_dnspython(path, origin)
    check(zone)
    return zone


def from_dnspython(path: str, origin: dns.name.Name) -> Zone:
    """Read with dnspython's own zone parser (for $GENERATE, and as the reference in tests)."""
    import dns.zone

    try:
        z = dns.zone.from_file(path, origin=origin, relativize=False, check_origin=False)
    except dns.exception.SyntaxError as e:  # already "FILE:LINE: msg"
        raise ZoneError(str(e)) from None
    except (dns.exception.DNSException, ValueError) as e:
        raise ZoneError(f"{path}: {e}") from None
    zone = Zone(origin, path)
    for name, node in z.nodes.items():
        key = name_key(name)
        if key[: len(zone.origin_key)] != zone.origin_key:
            raise ZoneError(f"{path}: {name} is not a subdomain of {zone.origin_text}")
        n = zone.node(key, name.to_text())
        for rds in node.rdatasets:
            if rds.rdtype in GENERATED:
                zone.dropped += len(rds)
                continue
            rrs = n.rrsets[int(rds.rdtype)] = RRset(rds.ttl)
            for rd in rds:
                rrs.add(rd.to_digestable(origin), rd.to_text())
    check(zone)
    return zone


def check(zone: Zone) -> None:
    """What the signer relies on: SOA and NS at the apex, no CNAME beside other data."""
    f = zone.filename
    apex = zone.nodes.get(zone.origin_key)
    if apex is None or SOA not in apex.rrsets:
        raise ZoneError(f"{f}: no SOA record at the zone apex {zone.origin_text}")
    soa = apex.rrsets[SOA]
    if len(soa) != 1:
        raise ZoneError(f"{f}:{soa.line}: more than one SOA record at the apex")
    if NS not in apex.rrsets:
        raise ZoneError(f"{f}: no NS records at the zone apex {zone.origin_text}")
    for node in zone.nodes.values():
        c = node.rrsets.get(CNAME)
        if c is not None and len(node.rrsets) > 1 and any(t not in (CNAME, 25) for t in node.rrsets):
            raise ZoneError(f"{f}:{c.line}: CNAME and other data at {node.disp}")
