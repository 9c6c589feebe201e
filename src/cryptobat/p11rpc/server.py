"""Sans-I/O p11-kit RPC server connection: bytes in, bytes out.

``feed`` never raises.  A body that fails to decode gets an error reply
(CKR_DEVICE_ERROR, or the code the decoder chose) and the connection carries on;
only a broken frame header or handshake sets ``closed``, since after that the byte
stream can no longer be split into messages.
"""
from __future__ import annotations

import base64
import logging
from typing import Any, Callable

from . import constants as C
from .calls import CALLS
from .backend import Backend
from .codec import RpcError, encode_error, encode_response, parse_request
from .framing import HEADER, MAX_BODY, MAX_OPTIONS, Frame, FrameDecoder, encode_frame, negotiate
from .module import Module, P11Error

log = logging.getLogger(__name__)

# Calls that may take long (scrypt, key generation, store writes, big random requests):
# socket front ends run these off their event loop.
SLOW_CALLS = frozenset(c.id for c in CALLS if c.name in (
    "C_Login", "C_LoginUser", "C_InitToken", "C_InitToken2", "C_InitPIN", "C_SetPIN", "C_GenerateKey",
    "C_GenerateKeyPair", "C_DestroyObject", "C_GenerateRandom", "C_CreateObject", "C_CopyObject"))

SIGN_CALLS = frozenset(c.id for c in CALLS if c.name in ("C_Sign", "C_SignFinal"))

# One :meth:`Connection.feed` answers at most BATCH frames and stops early once its replies
# reach TURN_BYTES; frames beyond stay buffered (:meth:`Connection.ready`) for the next turn,
# so a client that pipelines thousands of requests never makes one huge reply in memory.
BATCH = 64
TURN_BYTES = 1 << 20


class Connection:
    def __init__(self, backend: Backend, locked: Callable[[Callable[[], Any]], Any] | None = None):
        self.module = Module(backend, locked)
        self.version: int | None = None
        self.frames = FrameDecoder()
        self.closed = False

    def export_state(self) -> dict:
        """The connection as JSON-able data: protocol version, whether it is closed (broken
        framing), received bytes of a frame not yet complete, and the PKCS#11 state
        (:meth:`Module.export_state`)."""
        return {"version": self.version, "closed": self.closed,
                "pending": base64.b64encode(bytes(self.frames.buf)).decode(), "module": self.module.export_state()}

    @classmethod
    def from_state(cls, backend: Backend, locked: Callable[[Callable[[], Any]], Any] | None,
                   state: dict) -> "Connection":
        """The connection :meth:`export_state` described, carrying on over ``backend``."""
        c = cls(backend, locked)
        c.version = None if state["version"] is None else int(state["version"])
        c.closed = bool(state["closed"])
        c.frames.buf = bytearray(base64.b64decode(state["pending"], validate=True))
        c.module = Module.from_state(backend, locked, state["module"])
        return c

    def feed(self, data: bytes, limit: int = BATCH) -> bytes:
        """Consume received bytes; return the bytes to send back.

        Answers at most ``limit`` complete frames (fewer once the replies reach TURN_BYTES);
        the rest stay buffered: while :meth:`ready`, call ``feed(b"")`` again for them."""
        if self.closed:
            return b""
        out = bytearray()
        if self.version is None and data:
            self.version = negotiate(data[0])
            out.append(self.version)
            data = data[1:]
        buf = self.frames.buf
        try:
            if data and not buf and len(data) >= HEADER.size:  # the usual case: exactly one whole frame
                code, olen, blen = HEADER.unpack_from(data)
                if len(data) == HEADER.size + olen + blen and code and olen <= MAX_OPTIONS and blen <= MAX_BODY:
                    reply = encode_frame(code, self.handle(bytes(data[HEADER.size + olen:])))
                    return bytes(out) + reply if out else reply
            buf += data
            n = 0
            while n < limit and len(out) < TURN_BYTES:
                f = self._next()
                if f is None:
                    break
                out += encode_frame(f.code, self.handle(f.body))
                n += 1
        except RpcError as e:
            log.warning("closing p11rpc connection: %s", e)
            self.closed = True
        return bytes(out)

    def _next(self) -> Frame | None:
        """The first complete frame in the buffer, taken out of it (RpcError on a bad header)."""
        buf = self.frames.buf
        if len(buf) < HEADER.size:
            return None
        code, olen, blen = HEADER.unpack_from(buf)
        if code == 0:
            raise RpcError("frame with call code 0")
        if olen > MAX_OPTIONS or blen > MAX_BODY:
            raise RpcError("frame too large")
        end = HEADER.size + olen + blen
        if len(buf) < end:
            return None
        f = Frame(code, bytes(buf[HEADER.size:HEADER.size + olen]), bytes(buf[HEADER.size + olen:end]))
        del buf[:end]
        return f

    def ready(self) -> bool:
        """Whether a complete frame (or a broken header, which closes) waits in the buffer."""
        if self.closed:
            return False
        buf = self.frames.buf
        if len(buf) < HEADER.size:
            return False
        code, olen, blen = HEADER.unpack_from(buf)
        return code == 0 or olen > MAX_OPTIONS or blen > MAX_BODY or len(buf) >= HEADER.size + olen + blen

    def handle(self, body: bytes) -> bytes:
        """Answer one request body (framing removed)."""
        version = self.version or 0
        try:
            req = parse_request(body, version)
        except RpcError as e:
            return encode_error(e.ckr)
        try:
            values = self.module.call(req.call.name, req.args)
            return encode_response(req.call, values, version)
        except P11Error as e:
            return encode_error(e.ckr)
        except Exception:  # a backend failure must not take the connection down
            log.exception("p11rpc %s failed", req.call.name)
            return encode_error(C.CKR_GENERAL_ERROR)

    def signs_slowly(self, data: bytes | None = None) -> bool:
        """Whether this client has a slow-key signature under way (:meth:`Module.signs_slowly`);
        with ``data``, also that ``data`` is exactly one whole C_Sign or C_SignFinal frame, the
        call that will make it (a front end may run it off its loop while others sign too)."""
        if self.closed or not self.module.signs_slowly():
            return False
        if data is not None:
            if self.frames.buf or self.version is None or len(data) < HEADER.size + 4:
                return False
            code, olen, blen = HEADER.unpack_from(data)
            return len(data) == HEADER.size + olen + blen and blen >= 4 and \
                int.from_bytes(data[HEADER.size + olen:HEADER.size + olen + 4], "big") in SIGN_CALLS
        return True

    def slow(self, data: bytes) -> bool:
        """Whether the next :meth:`feed` of ``data`` should run off the event loop: the first
        complete frame in the buffer + ``data`` is in SLOW_CALLS, or more than one frame is
        complete (a pipelined batch: it may hide slow calls such as C_Login behind a fast one)."""
        if self.closed:
            return False
        buf = self.frames.buf
        if not buf and self.version is not None and len(data) >= HEADER.size + 4:  # one whole frame, usually
            code, olen, blen = HEADER.unpack_from(data)
            if len(data) == HEADER.size + olen + blen and code and olen <= MAX_OPTIONS and blen >= 4:
                return int.from_bytes(data[HEADER.size + olen:HEADER.size + olen + 4], "big") in SLOW_CALLS
        view = memoryview(data)
        if self.version is None and len(view):
            view = view[1:]
        nb = len(buf)
        total = nb + len(view)

        def peek(off: int, n: int) -> bytes:
            if off >= nb:
                return bytes(view[off - nb:off - nb + n])
            if off + n <= nb:
                return bytes(buf[off:off + n])
            return bytes(buf[off:]) + bytes(view[:off + n - nb])

        off = 0
        for i in range(2):
            if total - off < HEADER.size:
                return False
            code, olen, blen = HEADER.unpack(peek(off, HEADER.size))
            if code == 0 or olen > MAX_OPTIONS or blen > MAX_BODY:
                return False  # feed closes the connection, quickly
            end = off + HEADER.size + olen + blen
            if end > total:
                return False
            if i == 0 and blen >= 4 and int.from_bytes(peek(off + HEADER.size + olen, 4), "big") in SLOW_CALLS:
                return True
            off = end
        return True

    def close(self) -> None:
        self.closed = True
