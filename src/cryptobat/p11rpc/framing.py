"""p11-kit transport framing, sans-I/O.

A connection starts with one byte each way: the client offers its highest protocol
version, the server answers with min(offer, ours).  After that every message is a
12-byte header (call code, options length, body length; u32 big endian) followed by
the options (the client's module name, ignored) and the body.  The reply carries the
request's call code, which is how a multi-threaded client matches replies.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from .calls import MAX_VERSION
from .codec import RpcError

HEADER = struct.Struct(">III")
MAX_OPTIONS = 4096
MAX_BODY = 8 * 1024 * 1024  # far above any RRset's signing data; bounds buffering


@dataclass
class Frame:
    code: int
    options: bytes
    body: bytes


def negotiate(offered: int) -> int:
    return min(offered, MAX_VERSION)


def encode_frame(code: int, body: bytes, options: bytes = b"") -> bytes:
    if not options:
        return HEADER.pack(code, 0, len(body)) + body
    return HEADER.pack(code, len(options), len(body)) + options + body


class FrameDecoder:
    """Accumulates bytes and yields complete frames; raises RpcError on bad headers."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        if not self.buf and len(data) >= HEADER.size:  # the usual case: exactly one whole frame
            code, olen, blen = HEADER.unpack_from(data)
            if code and olen <= MAX_OPTIONS and blen <= MAX_BODY and len(data) == HEADER.size + olen + blen:
                data = bytes(data)
                return [Frame(code, data[HEADER.size:HEADER.size + olen], data[HEADER.size + olen:])]
        self.buf += data
        frames: list[Frame] = []
        while len(self.buf) >= HEADER.size:
            code, olen, blen = HEADER.unpack_from(self.buf)
            if code == 0:
                raise RpcError("frame with call code 0")
            if olen > MAX_OPTIONS or blen > MAX_BODY:
                raise RpcError("frame too large")
            end = HEADER.size + olen + blen
            if len(self.buf) < end:
                break
            frames.append(Frame(code, bytes(self.buf[HEADER.size:HEADER.size + olen]),
                                bytes(self.buf[HEADER.size + olen:end])))
            del self.buf[:end]
        return frames
