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
from .framing import FrameDecoder, encode_frame, negotiate
from .module import Module, P11Error

log = logging.getLogger(__name__)

# Calls that may take long (scrypt, key generation, store writes, big random requests):
# socket front ends run these off their event loop.
SLOW_CALLS = frozenset(c.id for c in CALLS if c.name in (
    "C_Login", "C_LoginUser", "C_InitToken", "C_InitToken2", "C_InitPIN", "C_SetPIN", "C_GenerateKey",
    "C_GenerateKeyPair", "C_DestroyObject", "C_GenerateRandom", "C_CreateObject", "C_CopyObject"))


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

    def feed(self, data: bytes) -> bytes:
        """Consume received bytes; return the bytes to send back."""
        if self.closed:
            return b""
        out = bytearray()
        if self.version is None and data:
            self.version = negotiate(data[0])
            out.append(self.version)
            data = data[1:]
        if not data:
            return bytes(out)
        try:
            frames = self.frames.feed(data)
        except RpcError as e:
            log.warning("closing p11rpc connection: %s", e)
            self.closed = True
            return bytes(out)
        if len(frames) == 1 and not out:
            f = frames[0]
            return encode_frame(f.code, self.handle(f.body))
        for f in frames:
            out += encode_frame(f.code, self.handle(f.body))
        return bytes(out)

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

    def slow(self, data: bytes) -> bool:
        """Whether the first call starting in ``self.frames`` buffer + ``data`` is in SLOW_CALLS."""
        if self.closed:
            return False
        buf = self.frames.buf
        head = bytes(buf[:4112]) + bytes(data[:4113]) if buf else data
        if self.version is None:
            head = head[1:]
        if len(head) < 16:
            return False
        olen = int.from_bytes(head[4:8], "big")
        if len(head) < 16 + olen:
            return False
        return int.from_bytes(head[12 + olen:16 + olen], "big") in SLOW_CALLS

    def close(self) -> None:
        self.closed = True
