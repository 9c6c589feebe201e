"""One signing API, in-process on an embedded token or over the daemon's native socket.

``connect()`` picks the transport: ``hsm="unix:/path/native.sock"`` (or
``$CRYPTOBAT_HSM``) talks to a running ``cryptobat serve``; otherwise, if a
daemon serves ``home``, its native socket; otherwise the token in ``home`` is
opened in this process. Over the socket the client logs in with the signer PIN
(``pin=`` or ``$CRYPTOBAT_PIN``) unless a quorum listed its uid/gid as a signer.
Tools such as ``signzone`` only ever see :class:`Client`, so they work either way.
"""
from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import Protocol, Sequence

from . import errors, native
from .api import KeyInfo, SignResult
from .errors import CryptobatError
from .home import close_token, resolve_home
from .signing import PARALLEL_MIN


class Client(Protocol):
    def keys(self) -> list[KeyInfo]: ...

    def time(self) -> int: ...

    def timed_sign(self, items: Sequence[tuple[str, bytes]]) -> list[SignResult]:
        """Sign each (key label, RFC 4034 §3.1.8.1 signing data) under policy; results in order."""
        ...

    def close(self) -> None: ...


class EmbeddedClient:
    """The token opened in this process (it holds the store's lock while open).

    Large batches (a zone) are spread over worker processes this client starts on
    first use, or early with :meth:`warm`, and stops on :meth:`close`.
    """

    def __init__(self, home: Path) -> None:
        from .home import open_token
        self.token = open_token(home)
        self._engine = None
        self._engine_lock = threading.Lock()

    def _pool(self):
        with self._engine_lock:
            if self._engine is None:
                from .home import open_engine
                self._engine = open_engine(self.token)
            return self._engine

    def warm(self, items: int | None = None) -> None:
        """Start the worker processes now, so the first batch does not wait for them; not for
        a job of ``items`` signatures too small to use them (it is signed in this process)."""
        if items is not None and items < PARALLEL_MIN:
            return
        self._pool().warm()

    def keys(self) -> list[KeyInfo]:
        return self.token.keys()

    def time(self) -> int:
        return self.token.now()

    def timed_sign(self, items: Sequence[tuple[str, bytes]]) -> list[SignResult]:
        if self._engine is None and len(items) < PARALLEL_MIN:  # signed here in any case: a small
            return self.token.timed_sign(items)  # zone starts (and imports) no worker machinery
        return self.token.timed_sign(items, run=self._pool().run)

    def close(self) -> None:
        with self._engine_lock:
            engine, self._engine = self._engine, None
        close_token(self.token, engine)


class SocketClient:
    """The daemon's native API over a Unix socket; logs in with ``pin`` when one is given."""

    def __init__(self, path: str, pin: str | None = None) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(path)
        except OSError as e:
            self.sock.close()
            raise CryptobatError(f"cannot reach Cryptobat at {path}: {e.strerror or e}") from None
        self._r = self.sock.makefile("rb")
        self._answered = False
        if pin is not None:
            try:
                self.login(pin)
            except BaseException:
                self.close()
                raise

    def _call(self, req: dict) -> dict:
        # any socket error (EPIPE, ECONNRESET, ...) or a frame cut short is the daemon going away
        # mid-request: one CryptobatError, never a bare OSError (a BrokenPipeError would pass for
        # a closed stdout)
        body = None
        try:
            self.sock.sendall(native.encode(req))
            header = self._r.read(4)
            if len(header) == 4:
                n = native.frame_length(header)
                body = self._r.read(n)
                if len(body) < n:
                    body = None
        except OSError as e:
            header, why = b"", e.strerror or type(e).__name__
        else:
            why = None
        if len(header) < 4:
            if not self._answered:  # closed before any answer: the daemon turned this peer away
                raise CryptobatError(f"Cryptobat at {self.path} closed the connection"
                                     f"{f' ({why})' if why else ''}: is this user allowed on the "
                                     "signer socket (cryptobat serve --signer-group)?")
        self._answered = True
        if body is None:
            raise CryptobatError(f"Cryptobat daemon at {self.path} closed the connection mid-request"
                                 f"{f' ({why})' if why else ''}")
        resp = native.decode(body)
        if "error" in resp:
            raise _error(resp)
        return resp

    def login(self, pin: str) -> None:
        """Authenticate this connection with the signer PIN (CryptobatError 'PIN incorrect' if not)."""
        self._call(native.login_request(pin))

    def info(self) -> dict:
        return self._call({"op": "info"})

    def keys(self) -> list[KeyInfo]:
        return [KeyInfo.from_json(k) for k in self._call({"op": "keys"})["keys"]]

    def time(self) -> int:
        return int(self._call({"op": "time"})["time"])

    def timed_sign(self, items: Sequence[tuple[str, bytes]]) -> list[SignResult]:
        """Sign in requests that fit the daemon's frame and item limits; results in order."""
        results: list[SignResult] = []
        for chunk in _chunks(items):
            if len(chunk) == 1 and native.item_size(*chunk[0]) > _REQUEST_BUDGET:
                results.append(SignResult(reason="signing data is over the native API's frame limit"))
                continue
            results += native.parse_sign_response(self._call(native.sign_request(chunk)))
        return results

    def close(self) -> None:
        self._r.close()
        self.sock.close()


_BY_CODE = {c.code: c for c in (errors.CryptobatError, errors.InvalidArgument, errors.Conflict, errors.NotFound,
                                 errors.Refusal, errors.NotPermitted, errors.PinIncorrect, errors.PinLocked,
                                 errors.LimitReached, errors.StoreError, errors.IntegrityError, errors.TokenBusy,
                                 native.ProtocolError, native.NotLoggedIn)}


def _error(resp: dict) -> CryptobatError:
    """The exception of the class the daemon named in ``code`` (a daemon without codes: the base class)."""
    cls = _BY_CODE.get(resp.get("code"), CryptobatError)
    if cls is native.NotLoggedIn:
        return cls("not logged in: the daemon wants the signer PIN ($CRYPTOBAT_PIN, or signzone --pin-file)")
    return cls(str(resp["error"]))


_REQUEST_BUDGET = native.MAX_FRAME - 4096  # room for the request's own JSON


def _chunks(items: Sequence[tuple[str, bytes]]):
    """``items`` split so that each sign request stays under the frame and item limits."""
    chunk: list[tuple[str, bytes]] = []
    size = 0
    for it in items:
        n = native.item_size(*it)
        if chunk and (size + n > _REQUEST_BUDGET or len(chunk) >= native.MAX_ITEMS):
            yield chunk
            chunk, size = [], 0
        chunk.append(it)
        size += n
    if chunk or not items:
        yield chunk


def serving(path: Path) -> bool:
    """True if a daemon answers on the Unix socket ``path`` (a stale socket file does not count)."""
    try:  # a home this user may not search is no daemon of theirs either
        if not path.exists():
            return False
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError:
        return False
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def connect(hsm: str | None = None, home: str | Path | None = None, pin: str | None = None) -> Client:
    """The token at ``hsm`` (or ``$CRYPTOBAT_HSM``), else the daemon serving ``home``, else ``home``
    opened here. Over a socket, ``pin`` (or ``$CRYPTOBAT_PIN``) logs the connection in."""
    hsm = hsm or os.environ.get("CRYPTOBAT_HSM")
    pin = pin if pin is not None else os.environ.get("CRYPTOBAT_PIN") or None
    if hsm:
        if not hsm.startswith("unix:"):
            raise CryptobatError(f"unsupported HSM address {hsm!r} (use unix:PATH)")
        return SocketClient(hsm[5:], pin)
    h = resolve_home(home)
    if serving(h / "native.sock"):
        return SocketClient(str(h / "native.sock"), pin)
    return EmbeddedClient(h)
