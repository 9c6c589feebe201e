r"""A fast RFC 1035 master-file reader for the zone signer.

dnspython's ``dns.zone.from_file`` costs ~75 µs per record (10 s for a 135k-record
zone), more than signing the zone.  This reader handles the master-file syntax
itself ($ORIGIN, $TTL, $INCLUDE, parentheses, comments, quoted strings, omitted
owner/TTL/class) and parses the common record types (A, AAAA, NS, CNAME, PTR,
DNAME, MX) directly; every other type goes through dnspython's rdata parser.
dnspython expands each ``$GENERATE`` line (:meth:`_Reader._generate`).

What it produces is exactly what signing needs: per owner name, per type, the
TTL and a dict *canonical wire form* (RFC 4034 §6.2) -> presentation text.
Names are kept as *keys*: tuples of lower-cased labels from the root down
(``("com", "example", "www")``), which sort in RFC 4034 §6.1 canonical order.
Labels are ``str`` holding one character per octet (latin-1), so tuple order
is octet order.

Input is bounded: only regular files are read (a FIFO, device or directory named
by the zone file or an ``$INCLUDE`` is refused before anything is read from it),
a line may hold at most :data:`MAX_LINE` bytes and a record :data:`MAX_RECORD`
characters, all files and ``$GENERATE`` expansions together :data:`MAX_INPUT`
bytes, ``$INCLUDE`` nests at most :data:`MAX_DEPTH` deep and never loops.  A
raw octet outside printable ASCII is the octet itself, as in BIND: it is read
as its ``\DDD`` escape (so ``caf\xe9`` is the label ``caf\233``, never IDNA),
except NUL, which BIND refuses too.  Meta types (TYPE0, OPT, TSIG, TKEY, IXFR,
AXFR, ANY, ... 128-255) and an RR too long for a DNS message are refused.  Every
error is a :class:`ZoneError` ``FILE:LINE: message``.
"""
from __future__ import annotations

import os
import re
from operator import itemgetter
import socket
import stat
from typing import Iterator

import dns.exception
import dns.grange
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.ttl
import dns.zone

A, NS, CNAME, SOA, PTR, MX, TXT, AAAA, DNAME = 1, 2, 5, 6, 12, 15, 16, 28, 39
RRSIG, NSEC, DNSKEY, NSEC3, NSEC3PARAM = 46, 47, 48, 50, 51
# Records the signer regenerates: dropped from the input.
GENERATED = frozenset((RRSIG, NSEC, NSEC3, NSEC3PARAM))
_NAME_ONLY = frozenset((NS, CNAME, PTR, DNAME))
# RRsets whose first line an error names (:func:`check`); the others keep none, as a line
# number over 256 is an int object of its own (4.5 MiB in a 100k-name zone)
_LINE_KEPT = frozenset((SOA, CNAME))
_CLASSES = frozenset(("IN", "CLASS1"))
_OTHER_CLASSES = frozenset(("CH", "HS", "CS", "NONE", "ANY"))
_inet_pton, _inet_ntop = socket.inet_pton, socket.inet_ntop
_AF4, _AF6 = socket.AF_INET, socket.AF_INET6

MAX_LINE = 64 * 1024  # bytes in one line of a file
# characters in one record, its lines joined by parentheses: the longest legal RDATA
# (65535 octets) written as \DDD escapes, or as \# hex, stays well below this
MAX_RECORD = 1024 * 1024
MAX_INPUT = 1 << 30  # bytes read in all: every file, $INCLUDE and $GENERATE expansion
MAX_DEPTH = 20  # $INCLUDE nesting
# An RR must fit in a DNS message (at most 65535 octets): a 12-octet header, its owner
# name, 10 octets of type, class, TTL and RDLENGTH, and the RDATA.
MAX_MESSAGE = 65535
_RDATA_ALWAYS_FITS = MAX_MESSAGE - 12 - 255 - 10  # whatever the owner name
_UNSAFE = re.compile(r"[^\t\n -~]")  # what is read as a \DDD escape
_CHUNK = 1 << 20  # bytes read at once
_first = itemgetter(0)


class ZoneError(Exception):
    """A bad zone; ``str()`` is ``FILE:LINE: message``."""


class RRset:
    """One RRset: its TTL and RRs, compactly (most RRsets hold a single RR).

    ``rd`` is the canonical wire form of the one RR (``text`` its presentation form),
    else a dict canonical wire -> presentation text (``text`` None). A 100k-name zone
    is a few hundred thousand of these: no tuple per RR, no line number but where an
    error names it.
    """

    __slots__ = ("ttl", "rd", "text", "line")

    def __init__(self, ttl: int, line: int = 0):
        self.ttl = ttl
        self.rd: bytes | dict | None = None
        self.text: str | None = None
        self.line = line

    def add(self, wire: bytes, text: str) -> None:
        rd = self.rd
        if rd is None:
            self.rd, self.text = wire, text
        elif type(rd) is bytes:
            if rd != wire:
                self.rd, self.text = {rd: self.text, wire: text}, None
        else:
            rd.setdefault(wire, text)

    def __len__(self) -> int:
        rd = self.rd
        return 0 if rd is None else 1 if type(rd) is bytes else len(rd)

    @property
    def rdatas(self) -> dict[bytes, str]:
        """Canonical wire -> presentation text (a copy for a single RR)."""
        rd = self.rd
        if rd is None:
            return {}
        return {rd: self.text} if type(rd) is bytes else rd

    @rdatas.setter
    def rdatas(self, d: dict[bytes, str]) -> None:
        self.rd = self.text = None
        for w, t in d.items():
            self.add(w, t)

    def items(self) -> list[tuple[bytes, str]]:
        """(wire, text) pairs in canonical (wire) order."""
        rd = self.rd
        if rd is None:
            return []
        return [(rd, self.text)] if type(rd) is bytes else sorted(rd.items())


AUTH, DELEGATION, OCCLUDED = 0, 1, 2


def plain_text(key: tuple) -> str:
    """The labels of ``key`` joined by dots: the presentation form of most names as written."""
    return ".".join(key[::-1]) + "." if key else "."


class Node:
    """A name and its RRsets by type.

    The RRsets are a flat list ``[type, RRset, type, RRset, ...]``: a dict is 224 bytes a
    name, this list 88 for the usual one or two RRsets, and the lookups stay in C
    (an int never equals an RRset, so ``t in list`` finds only types).
    """

    __slots__ = ("key", "_disp", "_rr", "kind")

    def __init__(self, key: tuple, disp: str):
        self.key = key
        # the absolute presentation form as first written, kept only where it is not
        # plain_text(key) (upper case, escapes): most names are, and 8 MiB at 100k names
        self._disp = None if disp == plain_text(key) else disp
        self._rr: list = []
        self.kind = AUTH  # AUTH, DELEGATION (NS below the apex) or OCCLUDED (glue, below DNAME)

    def __contains__(self, rdtype: int) -> bool:
        return rdtype in self._rr

    def get(self, rdtype: int) -> RRset | None:
        rr = self._rr
        return rr[rr.index(rdtype) + 1] if rdtype in rr else None

    def __getitem__(self, rdtype: int) -> RRset:
        rr = self._rr
        return rr[rr.index(rdtype) + 1]

    def put(self, rdtype: int, rrs: RRset) -> RRset:
        """Set the RRset of ``rdtype`` (replacing any); return it."""
        rr = self._rr
        if rdtype in rr:
            rr[rr.index(rdtype) + 1] = rrs
        else:
            rr += (rdtype, rrs)
        return rrs

    @property
    def rrsets(self) -> dict[int, RRset]:
        """The RRsets by type, as a new dict (to look at; the walk uses the methods above)."""
        rr = self._rr
        return dict(zip(rr[::2], rr[1::2]))

    def by_type(self) -> list[tuple[int, RRset]]:
        """(type, RRset) pairs in type order."""
        rr = self._rr
        if len(rr) == 2:  # most names have one RRset: no slicing or sorting
            return [(rr[0], rr[1])]
        return sorted(zip(rr[::2], rr[1::2]), key=_first)

    def types(self) -> list[int]:
        """The types of the name's RRsets, in the order they were added."""
        return self._rr[::2]

    @property
    def disp(self) -> str:
        """The owner's presentation form, as first written."""
        d = self._disp
        return plain_text(self.key) if d is None else d

    @property
    def lower_disp(self) -> str | None:
        """The presentation form in lower case where cheap to tell (None: has escapes)."""
        d = self._disp
        if d is None:
            return plain_text(self.key)
        return None if "\\" in d else d.lower()


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


def _escape_octets(line: str, fname: str, lineno: int) -> str:
    """``line`` with each raw octet outside printable ASCII, space, tab and newline as its
    ``\\DDD`` escape, which means the same octet in names and character-strings alike.

    Zone files are bytes, not text: BIND's ``named-checkzone`` reads ``caf\\xe9`` as the
    label ``caf\\233`` and a raw control octet as itself, and refuses a raw NUL; so
    does this reader (dnspython would turn a non-ASCII name into IDNA, and Python's
    ``str.split`` would take \\x0b, \\x1c-\\x1f, \\x85 and \\xa0 for blanks).  An octet
    after a backslash is escaped as a whole (``\\<0xe9>`` -> ``\\233``).
    """
    if "\0" in line:
        raise ZoneError(f"{fname}:{lineno}: NUL octet in the zone file")
    out = []
    i, n = 0, len(line)
    while i < n:
        c = line[i]
        if c == "\\" and i + 1 < n:
            d = line[i + 1]
            out.append(f"\\{ord(d):03d}" if _UNSAFE.match(d) else c + d)
            i += 2
            continue
        out.append(f"\\{ord(c):03d}" if _UNSAFE.match(c) else c)
        i += 1
    return "".join(out)


def _physical_lines(f, fname: str, budget: list[int]) -> Iterator[str]:
    """The lines of binary file ``f`` as text ending in a newline (but perhaps the last):
    CR LF and a lone CR end a line too, as in BIND; read in large chunks charged to
    ``budget[0]``; a line longer than MAX_LINE bytes is an error."""
    read = f.read
    unsafe = _UNSAFE.search
    lineno = 0
    carry = ""  # a line not yet ended
    while True:
        b = read(_CHUNK)
        if b:
            budget[0] -= len(b)
            if budget[0] < 0:
                raise ZoneError(f"{fname}:{lineno + 1}: the zone input exceeds {MAX_INPUT} bytes "
                                "(all files, $INCLUDEs and $GENERATE expansions together)")
            chunk = carry + b.decode("latin-1")
            lines = chunk.split("\n")
            carry = lines.pop()
            end = "\n"
        elif carry:
            chunk, lines, carry, end = carry, [carry], "", ""
        else:
            return
        if "\r" in chunk:
            split = []
            for line in lines:
                if "\r" in line:
                    parts = (line[:-1] if line[-1:] == "\r" else line).split("\r")
                    split += [x + "\n" for x in parts[:-1]]
                    line = parts[-1]
                split.append(line + end)
            lines = split
        elif end:
            lines = [x + "\n" for x in lines]
        dirty = unsafe(chunk) is not None
        for line in lines:
            lineno += 1
            if len(line) > MAX_LINE + 1:
                raise ZoneError(f"{fname}:{lineno}: line longer than {MAX_LINE} bytes")
            if dirty and unsafe(line):
                line = _escape_octets(line, fname, lineno)
            yield line
        if len(carry) > MAX_LINE:
            raise ZoneError(f"{fname}:{lineno + 1}: line longer than {MAX_LINE} bytes")


def _logical_lines(f, fname: str, budget: list[int]) -> Iterator[tuple[int, str]]:
    """(line number, text) for each logical line: comments cut, parentheses joined."""
    lineno = 0
    pending: list[str] = []
    plen = 0
    start = 0
    depth = 0
    for line in _physical_lines(f, fname, budget):
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
            plen = 0
        pending.append("".join(out))
        plen += len(pending[-1])
        if plen > MAX_RECORD:
            raise ZoneError(f"{fname}:{start}: record longer than {MAX_RECORD} characters"
                            + (" (unbalanced parentheses?)" if depth else ""))
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
        self.budget = [MAX_INPUT]  # bytes still allowed, shared by all files
        self.reading: list[tuple[int, int]] = []  # (device, inode) of the files being read

    def _type(self, tok: str) -> int | None:
        t = self.types.get(tok)
        if t is None:
            try:
                t = int(dns.rdatatype.from_text(tok))
            except dns.rdatatype.UnknownRdatatype:
                return None
            _check_type(t, tok)
            self.types[tok] = t
        return t

    def read(self, path: str, origin: dns.name.Name, where: str | None = None) -> None:
        """Read the file ``path``; ``where`` is ``FILE:LINE`` of the $INCLUDE naming it."""
        what = f"{where}: $INCLUDE {path}" if where else path
        if len(self.reading) > MAX_DEPTH:
            raise ZoneError(f"{what}: $INCLUDE nested more than {MAX_DEPTH} deep")
        try:
            f, ident = _open_regular(path)
        except OSError as e:
            raise ZoneError(f"{what}: {e.strerror or e}") from None
        except ValueError as e:
            raise ZoneError(f"{what}: {e}") from None
        with f:
            if ident in self.reading:
                raise ZoneError(f"{what}: an $INCLUDE loop (the file is already being read)")
            self.reading.append(ident)
            try:
                self._read(f, path, origin)
            finally:
                self.reading.pop()

    def _read(self, f, path: str, origin: dns.name.Name) -> None:
        zone = self.zone
        okey, otext = name_key(origin), origin.to_text()
        owner: Node | None = None
        names = self.names.get
        for lineno, text in _logical_lines(f, path, self.budget):
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
                        inc = _filename(parts[1])
                        if not os.path.isabs(inc) and not os.path.exists(inc):
                            inc = os.path.join(os.path.dirname(path), inc)
                        io = dns.name.from_text(parts[2], origin) if len(parts) >= 3 else origin
                        self.read(inc, io, f"{path}:{lineno}")
                    elif d == "$GENERATE":
                        self._generate(text, path, lineno, origin)
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
                klass = False
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
                    if not klass:  # after the class, ANY and NONE are types (meta types)
                        if up in _CLASSES:
                            klass = True
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
                if len(wire) > _RDATA_ALWAYS_FITS:
                    _check_rdata_length(owner.key, wire)
                if rdtype in GENERATED:
                    zone.dropped += 1
                    continue
                if ttl is None:
                    if rdtype != SOA:
                        raise ValueError("missing TTL and no $TTL before it")
                    ttl = int.from_bytes(wire[-4:], "big")
                    self.last_ttl = ttl
                rrs = owner.get(rdtype)
                if rrs is None:
                    rrs = owner.put(rdtype, RRset(ttl, lineno if rdtype in _LINE_KEPT else 0))
                elif ttl < rrs.ttl:
                    rrs.ttl = ttl
                rrs.add(wire, rtext)
            except ZoneError:
                raise
            except (ValueError, ArithmeticError, IndexError, OSError, dns.exception.DNSException) as e:
                msg = str(e) or type(e).__name__
                raise ZoneError(f"{path}:{lineno}: {msg}") from None

    def _generate(self, text: str, path: str, lineno: int, origin: dns.name.Name) -> None:
        """``$GENERATE range lhs [ttl] [class] type rhs``: dnspython expands this one line
        (its template syntax, ``${offset,width,base}`` and nibble modes included) once the
        expansion has been charged to the input budget; the records are checked as any."""
        parts = text.split()
        if len(parts) < 5:
            raise ValueError("malformed $GENERATE")
        try:
            start, stop, step = dns.grange.from_text(parts[1])
        except (AssertionError, ValueError):  # dnspython asserts a step of at least 1
            raise ValueError(f"bad $GENERATE range {parts[1]!r}") from None
        cost = ((stop - start) // step + 1) * (len(text) + 1)
        self.budget[0] -= cost
        if self.budget[0] < 0:
            raise ValueError(f"the zone input exceeds {MAX_INPUT} bytes (this $GENERATE makes "
                             f"{(stop - start) // step + 1} records)")
        try:
            self.last_ttl = _ttl(parts[3])  # an explicit TTL is the last one stated
        except (ValueError, dns.exception.DNSException):
            pass
        for tok in parts[3:6]:  # [ttl] [class] type: a meta type is refused before expanding
            up = tok.upper()
            if tok[0].isdigit() or up in _CLASSES:
                continue
            try:
                _check_type(int(dns.rdatatype.from_text(up)), up)
            except dns.rdatatype.UnknownRdatatype:
                pass
            break
        ttl = self.default_ttl if self.default_ttl is not None else self.last_ttl
        src = f"$ORIGIN {origin.to_text()}\n" + (f"$TTL {ttl}\n" if ttl is not None else "") + text + "\n"
        try:
            z = dns.zone.from_text(src, origin=dns.name.root, relativize=False, check_origin=False,
                                   allow_include=False, allow_directives=("$ORIGIN", "$TTL", "$GENERATE"))
        except dns.exception.SyntaxError as e:
            raise ValueError(re.sub(r"^<string>:\d+: ", "", str(e)) or "malformed $GENERATE") from None
        zone = self.zone
        zorigin = zone.origin
        for name, node in z.nodes.items():
            key = name_key(name)
            if key[: len(zone.origin_key)] != zone.origin_key:
                raise ValueError(f"{name} is not a subdomain of {zone.origin_text}")
            owner = zone.node(key, name.to_text())
            for rds in node.rdatasets:
                t = int(rds.rdtype)
                _check_type(t)
                if t in GENERATED:
                    zone.dropped += len(rds)
                    continue
                rrs = owner.get(t)
                if rrs is None:
                    rrs = owner.put(t, RRset(rds.ttl, lineno if t in _LINE_KEPT else 0))
                elif rds.ttl < rrs.ttl:
                    rrs.ttl = rds.ttl
                for rd in rds:
                    wire = rd.to_digestable(zorigin)
                    if len(wire) > _RDATA_ALWAYS_FITS:
                        _check_rdata_length(key, wire)
                    rrs.add(wire, rd.to_text())

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


def _check_rdata_length(owner: tuple, wire: bytes) -> None:
    """The RR must fit in a DNS message, or it can be neither served nor transferred (and
    RDLENGTH is 16 bits)."""
    limit = MAX_MESSAGE - 12 - len(key_wire(owner)) - 10
    if len(wire) > limit:
        raise ValueError(f"RDATA of {len(wire)} octets is too long for a DNS message "
                         f"(at most {limit} with this owner name)")


def _check_type(t: int, tok: str | None = None) -> None:
    """Meta types are never data (RFC 6895 §3.1): refused as BIND refuses them."""
    if t == 0 or dns.rdatatype.is_metatype(t):
        raise ValueError(f"invalid use of a meta type: {tok or dns.rdatatype.to_text(t)}")


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _open_regular(path: str):
    """(binary file, (device, inode)) of the regular file ``path``; ValueError for anything else.

    Opened non-blocking, so that a FIFO without a writer does not hang the open, and
    checked with fstat on what was opened (no race with a rename)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = next((k for test, k in _KINDS if test(st.st_mode)), "a special file")
            raise ValueError(f"not a regular file ({kind})")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb"), (st.st_dev, st.st_ino)
    except BaseException:
        os.close(fd)
        raise


def _filename(tok: str) -> str:
    """An $INCLUDE file name token: quotes removed, ``\\DDD`` and ``\\X`` escapes (raw
    non-ASCII octets were turned into ``\\DDD`` on reading) back to the octets."""
    if len(tok) >= 2 and tok[0] == tok[-1] == '"':
        tok = tok[1:-1]
    if "\\" not in tok:
        return tok
    out = bytearray()
    i, n = 0, len(tok)
    while i < n:
        c = tok[i]
        if c == "\\" and i + 1 < n:
            ddd = tok[i + 1 : i + 4]
            if len(ddd) == 3 and ddd.isdigit() and int(ddd) < 256:
                out.append(int(ddd))
                i += 4
                continue
            c = tok[i + 1]
            i += 1
        out += c.encode("latin-1")
        i += 1
    return os.fsdecode(bytes(out))


def _prune(zone: Zone) -> None:
    """Drop names whose records were all dropped (e.g. the hashed owners of an old NSEC3
    chain): they are no names of the zone, and would get an NSEC or clash with NSEC3."""
    if zone.dropped:
        zone.nodes = {k: n for k, n in zone.nodes.items() if n.types()}


def read_zone(path: str, origin: dns.name.Name) -> Zone:
    """Read a master file; ZoneError on any syntax or content error."""
    zone = Zone(origin, path)
    _Reader(zone).read(path, origin)
    _prune(zone)
    check(zone)
    return zone


def from_dnspython(path: str, origin: dns.name.Name) -> Zone:
    """Read with dnspython's own zone parser (the reference in tests; no input bounds)."""
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
            rrs = n.put(int(rds.rdtype), RRset(rds.ttl))
            for rd in rds:
                rrs.add(rd.to_digestable(origin), rd.to_text())
    _prune(zone)
    check(zone)
    return zone


def check(zone: Zone) -> None:
    """What the signer relies on: SOA and NS at the apex, no CNAME beside other data."""
    f = zone.filename
    apex = zone.nodes.get(zone.origin_key)
    if apex is None or SOA not in apex:
        raise ZoneError(f"{f}: no SOA record at the zone apex {zone.origin_text}")
    soa = apex[SOA]
    if len(soa) != 1:
        raise ZoneError(f"{f}:{soa.line}: more than one SOA record at the apex")
    if NS not in apex:
        raise ZoneError(f"{f}: no NS records at the zone apex {zone.origin_text}")
    for node in zone.nodes.values():
        c = node.get(CNAME)
        if c is not None and any(t not in (CNAME, 25) for t in node.types()):
            raise ZoneError(f"{f}:{c.line}: CNAME and other data at {node.disp}")
