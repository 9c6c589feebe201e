"""Sans-I/O codec for p11-kit RPC message bodies.

A body is ``call id (u32) | signature (byte array) | arguments``.  Integers are big
endian; a PKCS#11 ulong travels as 8 bytes, a byte-array length as 4 bytes with
0xffffffff meaning NULL.  Every decoding failure raises :class:`RpcError` (and nothing
else); lengths are checked against the bytes actually present before anything is
sliced, so a hostile length field never causes a large allocation.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from . import constants as C
from .calls import CALLS, Call, lookup

NULL_LEN = 0xFFFFFFFF
MAX_ATTR_DEPTH = 8


class RpcError(Exception):
    """A message that cannot be decoded; ``ckr`` is the PKCS#11 code to answer with."""

    def __init__(self, msg: str, ckr: int = C.CKR_DEVICE_ERROR) -> None:
        super().__init__(msg)
        self.ckr = ckr


@dataclass
class Attribute:
    """One CK_ATTRIBUTE.  ``value`` None means the length is CK_UNAVAILABLE_INFORMATION.

    ``value`` is an int for byte/ulong typed attributes, bytes for byte arrays and
    dates, a list of Attribute for templates, a list of int for mechanism arrays.
    """

    type: int
    value: Any = None
    length: int | None = None  # declared wire length; None = len of the encoded value
    size_only: bool = False  # answer to a size query: length present, value NULL


@dataclass
class Mechanism:
    type: int
    param: Any = None  # bytes, tuple of ints (PSS/OAEP) or None


@dataclass
class Buffer:
    """An ``fy``/``fu`` receive buffer: ``None`` capacity means "only tell me the size"."""

    capacity: int | None


@dataclass
class OutArray:
    """A ``ay``/``au`` result: ``data`` None sends just ``length`` (size query / too small)."""

    data: Any
    length: int = 0


def value_kind(attr_type: int, version: int) -> str:
    if attr_type in C.BYTE_ATTRS:
        return "byte"
    if attr_type in C.ULONG_ATTRS:
        return "ulong"
    if attr_type in C.ATTR_ARRAY_ATTRS and (version >= 1 or attr_type != C.CKA_DERIVE_TEMPLATE):
        return "attrs"
    if attr_type in C.MECH_ARRAY_ATTRS:
        return "mechs"
    if attr_type in C.DATE_ATTRS:
        return "date"
    return "bytes"


_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_unpack32 = _U32.unpack_from
_unpack64 = _U64.unpack_from
_pack32 = _U32.pack
_pack64 = _U64.pack


class Reader:
    __slots__ = ("data", "pos", "end", "version")

    def __init__(self, data: bytes, version: int = 0) -> None:
        self.data = bytes(data)  # no copy when already bytes; slices below are the only copies
        self.pos = 0
        self.end = len(self.data)
        self.version = version

    def remaining(self) -> int:
        return self.end - self.pos

    def take(self, n: int) -> bytes:
        p = self.pos
        if n < 0 or p + n > self.end:
            raise RpcError("message too short")
        self.pos = p + n
        return self.data[p:p + n]

    def byte(self) -> int:
        p = self.pos
        if p >= self.end:
            raise RpcError("message too short")
        self.pos = p + 1
        return self.data[p]

    def u32(self) -> int:
        p = self.pos
        if p + 4 > self.end:
            raise RpcError("message too short")
        self.pos = p + 4
        return _unpack32(self.data, p)[0]

    def u64(self) -> int:
        p = self.pos
        if p + 8 > self.end:
            raise RpcError("message too short")
        self.pos = p + 8
        return _unpack64(self.data, p)[0]

    def raw_array(self) -> bytes | None:
        n = self.u32()
        if n == NULL_LEN:
            return None
        if n >= 0x7FFFFFFF:
            raise RpcError("byte array too long")
        return self.take(n)

    def byte_array(self) -> bytes | None:
        """``ay``: a presence byte, then either data or just a length (NULL buffer)."""
        if self.byte():
            return self.raw_array() or b""
        self.u32()
        return None

    def buffer(self) -> Buffer:
        n = self.u32()
        if n == 0:
            return Buffer(None)
        return Buffer(0 if n == NULL_LEN else n)

    def attribute(self, depth: int = 0) -> Attribute:
        if depth > MAX_ATTR_DEPTH:
            raise RpcError("attribute nesting too deep")
        atype = self.u32()
        if not self.byte():
            return Attribute(atype, None)
        length = self.u32()
        kind = value_kind(atype, self.version)
        value: Any
        if kind == "byte":
            value = self.byte()
        elif kind == "ulong":
            value = self.u64()
        elif kind == "attrs":
            count = self.u32()
            if count > self.remaining() // 5:
                raise RpcError("attribute count exceeds message")
            value = [self.attribute(depth + 1) for _ in range(count)]
        elif kind == "mechs":
            count = self.u32()
            if count > self.remaining() // 8:
                raise RpcError("mechanism count exceeds message")
            value = [self.u64() for _ in range(count)]
        else:
            value = self.raw_array() or b""
            if kind == "date" and len(value) not in (0, 8):
                raise RpcError("bad date")
            if len(value) > length:
                raise RpcError("attribute value longer than its length")
        return Attribute(atype, value, length)

    def attributes(self) -> list[Attribute]:
        count = self.u32()
        if count > self.remaining() // 5:
            raise RpcError("attribute count exceeds message")
        return [self.attribute() for _ in range(count)]

    def attribute_buffer(self) -> list[tuple[int, int]]:
        count = self.u32()
        if count > self.remaining() // 8:
            raise RpcError("attribute count exceeds message")
        return [(self.u32(), self.u32()) for _ in range(count)]

    def mechanism(self) -> Mechanism | None:
        mtype = self.u32()
        if self.version >= 2:
            if mtype == C.CKM_NULL_MARKER:
                return None
            if mtype in C.V2_NO_PARAM_MECHANISMS or not self.byte():
                return Mechanism(mtype)
        return Mechanism(mtype, self._mech_param(mtype))

    def _mech_param(self, mtype: int) -> Any:
        if mtype in C.PSS_MECHANISMS:
            return (self.u64(), self.u64(), self.u64())
        if mtype == C.CKM_RSA_PKCS_OAEP:
            return (self.u64(), self.u64(), self.u64(), self.raw_array())
        if self.version >= 2 and mtype not in (C.CKM_EDDSA, C.CKM_EC_EDWARDS_KEY_PAIR_GEN):
            # v2 gives each parameter type its own layout; unknown ones cannot be skipped.
            raise RpcError("mechanism parameters not understood", C.CKR_MECHANISM_INVALID)
        return self.raw_array()

    def read(self, sig: str) -> list[Any]:
        """Decode arguments following a call signature string."""
        plan = _READ_PLANS.get(sig)
        if plan is None:
            plan = _READ_PLANS[sig] = _read_plan(sig)
        return [f(self) for f in plan]


_READ_PARTS = {"ay": Reader.byte_array, "aA": Reader.attributes, "fy": Reader.buffer, "fu": Reader.buffer,
               "fA": Reader.attribute_buffer, "y": Reader.byte, "u": Reader.u64,
               "z": lambda r: r.raw_array() or b"", "s": lambda r: r.raw_array() or b"",
               "v": lambda r: (r.byte(), r.byte()), "M": Reader.mechanism}
_READ_PLANS: dict[str, tuple] = {}


def _read_plan(sig: str) -> tuple:
    """The decoding steps of a signature, or a plan that raises at the first unsupported part."""
    plan: list = []
    i = 0
    while i < len(sig):
        part = sig[i:i + 2] if sig[i] in "af" else sig[i]
        i += len(part)
        f = _READ_PARTS.get(part)
        if f is None:
            def bad(r: Reader, part: str = part) -> Any:
                raise RpcError(f"unsupported signature part {part}")
            plan.append(bad)
            break
        plan.append(f)
    return tuple(plan)


_BYTES = tuple(bytes([i]) for i in range(256))


class Writer:
    __slots__ = ("parts", "version")

    def __init__(self, version: int = 0) -> None:
        self.parts: list[bytes] = []
        self.version = version

    def getvalue(self) -> bytes:
        return b"".join(self.parts)

    def byte(self, v: int) -> None:
        self.parts.append(_BYTES[v & 0xFF])

    def u32(self, v: int) -> None:
        self.parts.append(_pack32(v & 0xFFFFFFFF))

    def u64(self, v: int) -> None:
        self.parts.append(_pack64(v & 0xFFFFFFFFFFFFFFFF))

    def raw_array(self, b: bytes | None) -> None:
        if b is None:
            self.u32(NULL_LEN)
        else:
            self.u32(len(b))
            self.parts.append(bytes(b))

    def out_array(self, out: OutArray, ulongs: bool) -> None:
        if out.data is None:
            self.byte(0)
            self.u32(out.length)
        elif ulongs:
            self.byte(1)
            self.u32(len(out.data))
            for v in out.data:
                self.u64(v)
        else:
            self.byte(1)
            self.raw_array(out.data)

    def attribute(self, a: Attribute) -> None:
        self.u32(a.type)
        if a.value is None and not a.size_only:
            self.byte(0)
            return
        self.byte(1)
        kind = value_kind(a.type, self.version)
        length = a.length if a.length is not None else encoded_length(a, self.version)
        self.u32(length)
        if kind == "byte":
            self.byte(0 if a.size_only else int(a.value))
        elif kind == "ulong":
            self.u64(0 if a.size_only else int(a.value))
        elif kind == "attrs":
            items = [] if a.size_only else a.value
            self.u32(len(items))
            for sub in items:
                self.attribute(sub)
        elif kind == "mechs":
            items = [] if a.size_only else a.value
            self.u32(len(items))
            for m in items:
                self.u64(m)
        else:
            self.raw_array(None if a.size_only else _raw(a.value))

    def attributes(self, attrs: list[Attribute]) -> None:
        self.u32(len(attrs))
        for a in attrs:
            self.attribute(a)

    def mechanism(self, m: Mechanism | None) -> None:
        if m is None:
            self.u32(C.CKM_NULL_MARKER)
            return
        self.u32(m.type)
        if self.version >= 2:
            if m.type in C.V2_NO_PARAM_MECHANISMS:
                return
            if m.param is None:
                self.byte(0)
                return
            self.byte(1)
        if m.type in C.PSS_MECHANISMS or m.type == C.CKM_RSA_PKCS_OAEP:
            for v in m.param[:3]:
                self.u64(v)
            if m.type == C.CKM_RSA_PKCS_OAEP:
                self.raw_array(m.param[3])
        else:
            self.raw_array(m.param)

    def write(self, sig: str, values: list[Any]) -> None:
        """Encode values following a signature; ``ay``/``au`` take OutArray, ``fy`` an int."""
        vals = iter(values)
        i = 0
        while i < len(sig):
            c = sig[i]
            if c in "af":
                pair = sig[i:i + 2]
                i += 2
                v = next(vals)
                if pair == "ay":
                    out = v if isinstance(v, OutArray) else OutArray(v, 0 if v is None else len(v))
                    self.out_array(out, ulongs=False)
                elif pair == "au":
                    out = v if isinstance(v, OutArray) else OutArray(v, 0 if v is None else len(v))
                    self.out_array(out, ulongs=True)
                elif pair == "aA":
                    self.attributes(v)
                elif pair in ("fy", "fu"):
                    self.u32(NULL_LEN if v == 0 else (v or 0))
                elif pair == "fA":
                    self.u32(len(v))
                    for t, n in v:
                        self.u32(t)
                        self.u32(n)
                continue
            i += 1
            v = next(vals)
            if c == "y":
                self.byte(v)
            elif c == "u":
                self.u64(v)
            elif c in "zs":
                self.raw_array(v)
            elif c == "v":
                self.byte(v[0])
                self.byte(v[1])
            elif c == "M":
                self.mechanism(v)
            else:
                raise ValueError(f"cannot encode signature part {c}")


def encoded_length(a: Attribute, version: int = 0) -> int:
    """The CK_ATTRIBUTE ulValueLen a 64-bit PKCS#11 library would report."""
    kind = value_kind(a.type, version)
    if kind == "byte":
        return 1
    if kind == "ulong":
        return 8
    if kind == "attrs":
        return 24 * len(a.value)
    if kind == "mechs":
        return 8 * len(a.value)
    return len(_raw(a.value))


def _raw(value: Any) -> bytes:
    """A byte-array attribute's bytes; a CK_BBOOL p11-kit does not know as one (CKA_DESTROYABLE
    in p11-kit 0.24/0.25) travels as a one-byte array."""
    return bytes([int(value)]) if isinstance(value, bool) else bytes(value)


@dataclass
class Request:
    call: Call
    args: list[Any] = field(default_factory=list)


_REQUEST_SIGS = {c.id: c.request.encode() for c in CALLS}
# what follows the call id in a well-formed request of each call: its signature as an array
_SIG_ARRAYS = {cid: _pack32(len(sig)) + sig for cid, sig in _REQUEST_SIGS.items()}
_U, _AY, _FY = 0, 1, 2  # argument parts read inline by _read_args: u, ay, fy/fu


def _args_plan(sig: str) -> tuple:
    """The parts of ``sig`` for :func:`_read_args`: the common ones as codes, any other as its
    Reader function (from :func:`_read_plan`, which also ends the plan at an unsupported part)."""
    inline = {Reader.u64: _U, Reader.byte_array: _AY, Reader.buffer: _FY}
    return tuple(inline.get(f, f) for f in _read_plan(sig))


_ARGS_PLANS = {c.id: _args_plan(c.request) for c in CALLS}


def _read_args(r: Reader, plan: tuple) -> list[Any]:
    """``Reader.read`` of a request's arguments with u, ay and fy read inline: these make up
    nearly every call a signer sends per signature, and a method call per part was most of the
    decoding time. The same values and the same errors as the Reader methods."""
    data, pos, end = r.data, r.pos, r.end
    out: list[Any] = []
    for part in plan:
        if part == _U:
            if pos + 8 > end:
                raise RpcError("message too short")
            out.append(_unpack64(data, pos)[0])
            pos += 8
        elif part == _AY:
            if pos + 5 > end:
                raise RpcError("message too short")
            present = data[pos]
            n = _unpack32(data, pos + 1)[0]
            pos += 5
            if not present:
                out.append(None)
            elif n == NULL_LEN:
                out.append(b"")
            elif n >= 0x7FFFFFFF:
                raise RpcError("byte array too long")
            elif pos + n > end:
                raise RpcError("message too short")
            else:
                out.append(data[pos:pos + n])
                pos += n
        elif part == _FY:
            if pos + 4 > end:
                raise RpcError("message too short")
            n = _unpack32(data, pos)[0]
            pos += 4
            out.append(Buffer(None if n == 0 else 0 if n == NULL_LEN else n))
        else:
            r.pos = pos
            out.append(part(r))
            pos = r.pos
    r.pos = pos
    return out


def parse_request(body: bytes, version: int = 0) -> Request:
    """Decode a request body; the signature must match the call table exactly."""
    r = Reader(body, version)
    call = lookup(r.u32(), version)
    if call is None:
        raise RpcError("unknown call id")
    expect = _SIG_ARRAYS[call.id]
    if r.data.startswith(expect, 4):  # the usual case: one comparison for the signature
        r.pos = 4 + len(expect)
    else:
        sig = r.raw_array()
        if sig is None or sig != _REQUEST_SIGS[call.id]:
            raise RpcError("signature mismatch")
    args = _read_args(r, _ARGS_PLANS[call.id])
    if r.pos != r.end:
        raise RpcError("trailing bytes after arguments")
    return Request(call, args)


_PREFIXES: dict[tuple[int, str], bytes] = {}


def encode_message(call: Call, sig: str, values: list[Any], version: int = 0) -> bytes:
    prefix = _PREFIXES.get((call.id, sig))
    if prefix is None:
        b = sig.encode()
        prefix = _PREFIXES[(call.id, sig)] = _pack32(call.id) + _pack32(len(b)) + b
    if not sig:
        return prefix
    w = Writer(version)
    w.parts.append(prefix)
    w.write(sig, values)
    return w.getvalue()


def encode_request(name: str, values: list[Any], version: int = 0) -> bytes:
    from .calls import BY_NAME
    call = BY_NAME[name]
    return encode_message(call, call.request, values, version)


def encode_response(call: Call, values: list[Any], version: int = 0) -> bytes:
    return encode_message(call, call.response, values, version)


_ERROR_PREFIX = _pack32(0) + _pack32(1) + b"u"


def encode_error(ckr: int) -> bytes:
    return _ERROR_PREFIX + _pack64(ckr & 0xFFFFFFFFFFFFFFFF)


def parse_response(body: bytes, call: Call, version: int = 0) -> tuple[int, list[Any]]:
    """Client-side decode (used by tests): (ckr, values); ckr != 0 for error replies.

    ``ay``/``au`` come back as OutArray (data None = length only).
    """
    r = Reader(body, version)
    cid = r.u32()
    sig = r.raw_array()
    if cid == 0:
        if sig != b"u":
            raise RpcError("bad error reply")
        return r.u64(), []
    if cid != call.id or sig != call.response.encode():
        raise RpcError("reply does not match call")
    out: list[Any] = []
    s = call.response
    i = 0
    while i < len(s):
        if s[i] == "a":
            pair = s[i:i + 2]
            i += 2
            if pair == "aA":
                out.append(r.attributes())
                continue
            valid = r.byte()
            if pair == "ay":
                out.append(OutArray(r.raw_array(), 0) if valid else OutArray(None, r.u32()))
            else:
                n = r.u32()
                if valid and n > r.remaining() // 8:
                    raise RpcError("ulong array exceeds message")
                out.append(OutArray([r.u64() for _ in range(n)] if valid else None, n))
            continue
        out.extend(r.read(s[i]))
        i += 1
    if r.remaining():
        raise RpcError("trailing bytes in reply")
    return 0, out
