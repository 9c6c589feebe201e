"""The native signing API's wire format: length-prefixed JSON frames.

A frame is a 4-byte big-endian length and a JSON object. Requests carry an
``op`` (``info``, ``keys``, ``time``, ``sign``); ``sign`` takes ``items``, a
list of ``[label, base64 signing data]``, and answers ``results``, one
``[base64 signature or null, reason or null]`` per item, in order. Errors are
``{"error": "one line"}``. Pure encode/decode; sockets live in the adapters.
"""
from __future__ import annotations

import base64
import json
import struct

from .api import KeyInfo, SignResult
from .errors import CryptobatError

MAX_FRAME = 256 << 20
_LEN = struct.Struct("!I")


class ProtocolError(CryptobatError):
    pass


def encode(obj: dict) -> bytes:
    body = json.dumps(obj, separators=(",", ":")).encode()
    return _LEN.pack(len(body)) + body


def frame_length(header: bytes) -> int:
    (n,) = _LEN.unpack(header)
    if n > MAX_FRAME:
        raise ProtocolError(f"frame of {n} bytes is over the {MAX_FRAME} byte limit")
    return n


def decode(body: bytes) -> dict:
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("frame is not JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError("frame is not a JSON object")
    return obj


def sign_request(items) -> dict:
    return {"op": "sign", "items": [[label, base64.b64encode(data).decode()] for label, data in items]}


def parse_sign_items(req: dict) -> list[tuple[str, bytes]]:
    items = req.get("items")
    if not isinstance(items, list):
        raise ProtocolError("sign needs a list of items")
    out = []
    for it in items:
        if not (isinstance(it, list) and len(it) == 2 and isinstance(it[0], str) and isinstance(it[1], str)):
            raise ProtocolError("each item is [label, base64 data]")
        try:
            out.append((it[0], base64.b64decode(it[1], validate=True)))
        except ValueError:
            raise ProtocolError("item data is not base64") from None
    return out


def sign_response(results: list[SignResult]) -> dict:
    return {"results": [[base64.b64encode(r.signature).decode() if r.ok else None, r.reason] for r in results]}


def parse_sign_response(resp: dict) -> list[SignResult]:
    return [SignResult(base64.b64decode(s) if s is not None else None, why) for s, why in resp["results"]]


def keys_response(keys: list[KeyInfo]) -> dict:
    return {"keys": [k.to_json() for k in keys]}
