"""PKCS#11 for the daemon and for ``cryptobat p11-stdio``: the token behind p11-kit's RPC.

:class:`ServiceBackend` gives the RPC layer the token through the daemon's
:class:`~cryptobat.serve.Service`, so PKCS#11 clients share one lock with the
console and the native API, and signatures go through the same timed-signing
path (policy check first) as every other transport.
"""
from __future__ import annotations

import os
import select
import socket
import sys
import threading
from pathlib import Path
from typing import Callable

from .api import KeyInfo, SignResult
from .client import serving
from .p11rpc.unix import listen_unix, serve_unix
from .p11rpc.unix import serve_stdio as _serve_stdio
from .serve import Service, group_refused


class ServiceBackend:
    """The p11rpc Backend protocol, served by the daemon's token."""

    def __init__(self, service: Service) -> None:
        self.s = service
        self.t = service.token
        self._keys: tuple[object, list[KeyInfo]] | None = None  # (token.state it was read from, keys)

    def info(self) -> dict:
        return self.s.call(self.t.info)

    def check_pin(self, pin: bytes) -> bool:
        return self.s.check_pin(pin, "pkcs11")

    def keys(self) -> list[KeyInfo]:
        """The token's keys; the same list object while the token state is unchanged (do not modify).

        Every token state change replaces ``token.state`` with a new dict (Token._change), so
        comparing its identity is an exact invalidation test; the cached entry holds the old
        state alive, so a new one can never reuse its id.
        """
        cached = self._keys
        if cached is not None and cached[0] is self.t.state:
            return cached[1]
        with self.s.lock:
            state = self.t.state
            keys = self.t.keys()
        self._keys = (state, keys)
        return keys

    def timed_sign(self, items: list[tuple[str, bytes]]) -> list[SignResult]:
        return self.s.timed_sign(items)

    def check_signing_data(self, label: str, data: bytes) -> str | None:
        return self.s.call(self.t.check_signing_data, label, data)

    def sign_digest(self, label: str, digest: bytes, mechanism: str, bound: bytes | None) -> SignResult:
        return self.s.call(self.t.sign_digest, label, digest, mechanism, bound)

    def keygen_allowed(self) -> bool:
        return self.s.call(self.t.keygen_allowed)

    def generate_key(self, algorithm: int, role: str, zone: str, label: str) -> KeyInfo:
        return self.s.call(self.t.generate_key, algorithm, role, zone, label)

    def delete_key(self, label: str) -> None:
        self.s.call(self.t.delete_key, label)

    def random(self, n: int) -> bytes:
        return self.t.random(n)


class _P11Server:
    """Runs serve_unix in a thread; shutdown()/server_close() as the daemon's other servers.

    The socket is bound (mode, group) in the caller's thread, so a failure there is the caller's.
    """

    def __init__(self, service: Service, path: Path, mode: int = 0o600, group: int | None = None,
                 gate: Callable[[socket.socket], bool] | None = None) -> None:
        self.stop = threading.Event()
        ready = threading.Event()
        backend = ServiceBackend(service)
        try:
            listener = listen_unix(str(path), mode, group)
        except PermissionError:
            if group is None:
                raise
            raise group_refused(path, group) from None
        self.thread = threading.Thread(target=serve_unix, args=(str(path), backend, None, ready, self.stop),
                                       kwargs={"gate": gate, "listener": listener}, name="pkcs11", daemon=True)
        self.thread.start()
        ready.wait(10)

    def shutdown(self) -> None:
        self.stop.set()
        self.thread.join(5)

    def server_close(self) -> None:
        pass


def start_p11(service: Service, path: Path, mode: int = 0o600, group: int | None = None,
              gate: Callable[[socket.socket], bool] | None = None) -> _P11Server:
    return _P11Server(service, path, mode, group, gate)


def _relay(path: Path) -> int:
    """stdin/stdout <-> the daemon's PKCS#11 socket, for ``remote: |ssh host cryptobat p11-stdio``."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(path))
    inp, out = sys.stdin.buffer.fileno(), sys.stdout.buffer.fileno()
    while True:
        r, _, _ = select.select([inp, s], [], [])
        if inp in r:
            data = os.read(inp, 65536)
            if not data:
                return 0
            s.sendall(data)
        if s in r:
            data = s.recv(65536)
            if not data:
                return 0
            os.write(out, data)


def serve_stdio(home: Path) -> int:
    """One PKCS#11 client on stdin/stdout: through the daemon if one serves ``home``, else embedded."""
    sock = home / "pkcs11.sock"
    if serving(sock):
        return _relay(sock)
    from .token import Token
    token = Token(home)
    try:
        _serve_stdio(ServiceBackend(Service(token)))
    finally:
        token.close()
    return 0
