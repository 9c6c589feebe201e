"""One signing API, in-process on an embedded token or over the daemon's native socket.

``connect()`` picks the transport: ``hsm="unix:/path/native.sock"`` (or
``$CRYPTOBAT_HSM``) talks to a running ``cryptobat serve``; otherwise, if a
daemon serves ``home``, its native socket; otherwise the token in ``home`` is
opened in this process. Tools such as ``signzone`` only ever see
:class:`Client`, so they work either way.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Protocol, Sequence

from . import native
from .api import KeyInfo, SignResult
from .errors import CryptobatError
from .home import resolve_home


class Client(Protocol):
    def keys(self) -> list[KeyInfo]: ...

    def time(self) -> int: ...

    def timed_sign(self, items: Sequence[tuple[str, bytes]]) -> list[SignResult]:
        """Sign each (key label, RFC 4034 §3.1.8.1 signing data) under policy; results in order."""
        ...

    def close(self) -> None: ...


class EmbeddedClient:
    """The token opened in this process (it holds the store's lock while open)."""

    def __init__(self, home: Path) -> None:
        from .token import Token
        self.token = Token(home)

    def keys(self) -> list[KeyInfo]:
        return self.token.keys()

    def time(self) -> int:
        return self.token.now()

    def timed_sign(self, items: Sequence[tuple[str, bytes]]) -> list[SignResult]:
        return self.token.timed_sign(items)

    def close(self) -> None:
        self.token.close()


class SocketClient:
    """The daemon's native API over a Unix socket."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(path)
        except OSError as e:
            self.sock.close()
            raise CryptobatError(f"cannot reach Cryptobat at {path}: {e.strerror}") from None
        self._r = self.sock.makefile("rb")

    def _call(self, req: dict) -> dict:
        self.sock.sendall(native.encode(req))
        header = self._r.read(4)
        if len(header) < 4:
            raise CryptobatError("Cryptobat daemon closed the connection")
        resp = native.decode(self._r.read(native.frame_length(header)))
        if "error" in resp:
            raise CryptobatError(resp["error"])
        return resp

    def info(self) -> dict:
        return self._call({"op": "info"})

    def keys(self) -> list[KeyInfo]:
        return [KeyInfo.from_json(k) for k in self._call({"op": "keys"})["keys"]]

    def time(self) -> int:
        return int(self._call({"op": "time"})["time"])

    def timed_sign(self, items: Sequence[tuple[str, bytes]]) -> list[SignResult]:
        return native.parse_sign_response(self._call(native.sign_request(items)))

    def close(self) -> None:
        self._r.close()
        self.sock.close()


def serving(path: Path) -> bool:
    """True if a daemon answers on the Unix socket ``path`` (a stale socket file does not count)."""
    if not path.exists():
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def connect(hsm: str | None = None, home: str | Path | None = None) -> Client:
    hsm = hsm or os.environ.get("CRYPTOBAT_HSM")
    if hsm:
        if not hsm.startswith("unix:"):
            raise CryptobatError(f"unsupported HSM address {hsm!r} (use unix:PATH)")
        return SocketClient(hsm[5:])
    h = resolve_home(home)
    if serving(h / "native.sock"):
        return SocketClient(str(h / "native.sock"))
    return EmbeddedClient(h)
