"""The native signing API's wire format: length-prefixed JSON frames.

A frame is a 4-byte big-endian length and a JSON object of at most
:data:`MAX_FRAME` bytes (the length is checked before the body is read).
Requests carry an ``op`` (``info``, ``time``, ``login``, ``keys``, ``sign``).
``login`` takes the signer ``pin`` and answers ``{"ok": true}``; until a login
succeeds on the connection (or the token lists the peer's uid/gid as a signer),
``keys`` and ``sign`` answer ``{"error": "not logged in"}``. ``sign`` takes
``items``, a list of at most :data:`MAX_ITEMS` ``[label, base64 signing data]``,
and answers ``results``, one ``[base64 signature or null, reason or null]`` per
item, in order. Errors are ``{"error": "one line", "code": "word"}``: ``code`` is
the :class:`cryptobat.errors.CryptobatError` class's ``code``, so a client decides
by it, never by the text. Pure encode/decode; sockets live in the adapters.
"""
from __future__ import annotations

import base64
import json
import struct

from .api import KeyInfo, SignResult
from .errors import CryptobatError, InvalidArgument, LimitReached, NotPermitted

MAX_FRAME = 32 << 20  # signzone's 8192-RRset batches are a few MiB; clients split larger ones
MAX_ITEMS = 32768  # per sign request: its answer (a signature per item) stays under MAX_FRAME too
NOT_LOGGED_IN = "not logged in"
PIN_INCORRECT = "PIN incorrect"
_LEN = struct.Struct("!I")


class ProtocolError(InvalidArgument):
    """A frame or request that is not this API's."""

    code = "protocol"


class FrameTooLarge(ProtocolError, LimitReached):
    """A frame over a size limit: the rest of the stream cannot be trusted, the connection ends."""

    code = "limit"


class NotLoggedIn(NotPermitted):
    code = "not-logged-in"


def error_response(e: CryptobatError) -> dict:
    """The answer for a refused request: its one line, and its code for programs."""
    return {"error": str(e), "code": e.code}


def encode(obj: dict) -> bytes:
    body = json.dumps(obj, separators=(",", ":")).encode()
    return _LEN.pack(len(body)) + body


def frame_length(header: bytes) -> int:
    (n,) = _LEN.unpack(header)
    if n > MAX_FRAME:
        raise FrameTooLarge(f"frame of {n} bytes is over the {MAX_FRAME} byte limit")
    return n


def decode(body: bytes) -> dict:
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("frame is not JSON") from None
    except RecursionError:  # a deeply nested frame: no request of ours nests more than three deep
        raise ProtocolError("frame is nested too deeply") from None
    if not isinstance(obj, dict):
        raise ProtocolError("frame is not a JSON object")
    return obj


def login_request(pin: str) -> dict:
    return {"op": "login", "pin": pin}


def parse_pin(req: dict) -> str:
    pin = req.get("pin")
    if not isinstance(pin, str):
        raise ProtocolError("login needs a pin")
    return pin


def item_size(label: str, data: bytes) -> int:
    """Bytes one item adds to an encoded sign request (an upper bound)."""
    return len(json.dumps(label)) + 4 * ((len(data) + 2) // 3) + 6


def sign_request(items) -> dict:
    return {"op": "sign", "items": [[label, base64.b64encode(data).decode()] for label, data in items]}


def parse_sign_items(req: dict) -> list[tuple[str, bytes]]:
    items = req.get("items")
    if not isinstance(items, list):
        raise ProtocolError("sign needs a list of items")
    if len(items) > MAX_ITEMS:
        raise ProtocolError(f"at most {MAX_ITEMS} items per sign request")
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
