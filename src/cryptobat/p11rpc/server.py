"""Sans-I/O p11-kit RPC server connection: bytes in, bytes out.

``feed`` never raises.  A body that fails to decode gets an error reply
(CKR_DEVICE_ERROR, or the code the decoder chose) and the connection carries on;
only a broken frame header or handshake sets ``closed``, since after that the byte
stream can no longer be split into messages.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from . import constants as C
from .backend import Backend
from .codec import RpcError, encode_error, encode_response, parse_request
from .framing import FrameDecoder, encode_frame, negotiate
from .module import Module, P11Error

log = logging.getLogger(__name__)


class Connection:
    def __init__(self, backend: Backend, locked: Callable[[Callable[[], Any]], Any] | None = None):
        self.module = Module(backend, locked)
        self.version: int | None = None
        self.frames = FrameDecoder()
        self.closed = False

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

    def close(self) -> None:
        self.closed = True
