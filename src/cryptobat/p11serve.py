"""PKCS#11 for the daemon and for ``cryptobat p11-stdio``: the token behind p11-kit's RPC.

:class:`ServiceBackend` gives the RPC layer the token through the daemon's
:class:`~cryptobat.serve.Service`, so PKCS#11 clients share one lock with the
console and the native API, and signatures go through the same timed-signing
path (policy check first) as every other transport.
"""
from __future__ import annotations

import base64
import os
import select
import socket
import sys
import threading
from pathlib import Path
from typing import Callable

from .api import KeyInfo, SignResult
from .client import serving
from .p11rpc.server import Connection
from .p11rpc.unix import Handover, in_helper, listen_unix, serve_unix
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
        """In a helper thread of the socket loop a slow signature is made right here when the
        custody signs from several threads at once (software: the GIL is released meanwhile);
        otherwise in a worker process if one is free, so that it holds neither the loop nor the
        custody's lock."""
        spread = in_helper() and not getattr(self.t.custody, "concurrent", False)
        return self.s.timed_sign(items, spread=spread)

    def check_signing_data(self, label: str, data: bytes) -> str | None:
        return self.s.call(self.t.check_signing_data, label, data)

    def bind_digest(self, hashed: str, data: bytes, digest: bytes) -> list[tuple[str, bytes]]:
        return self.s.call(self.t.bind_digest, hashed, data, digest)

    def sign_digest(self, label: str, raw: bytes, mechanism: str, bound: bytes | None) -> SignResult:
        return self.s.call(self.t.sign_digest, label, raw, mechanism, bound)

    def keygen_allowed(self) -> bool:
        return self.s.call(self.t.keygen_allowed)

    def generate_key(self, algorithm: int, role: str, zone: str, label: str,
                     p11_id: bytes | None = None) -> KeyInfo:
        return self.s.call(self.t.generate_key, algorithm, role, zone, label, p11_id)

    def delete_key(self, label: str) -> None:
        self.s.call(self.t.delete_key, label)

    def random(self, n: int) -> bytes:
        return self.t.random(n)


class _P11Server:
    """Runs serve_unix in a thread; shutdown()/server_close() as the daemon's other servers.

    The socket is bound (mode, group) in the caller's thread, so a failure there is the caller's.
    A restart takes the listener and the clients with :meth:`freeze` (file descriptors and
    JSON-able state) and serves them on with :meth:`thaw`, in this process or a new one.
    """

    def __init__(self, service: Service, path: Path, mode: int = 0o600, group: int | None = None,
                 gate: Callable[[socket.socket], bool] | None = None, *,
                 listener: socket.socket | None = None,
                 adopt: list[tuple[socket.socket, Connection, bytes]] = ()) -> None:
        self.stop = threading.Event()
        self.handover = Handover()
        ready = threading.Event()
        backend = ServiceBackend(service)
        if listener is None:
            try:
                listener = listen_unix(str(path), mode, group)
            except PermissionError:
                if group is None:
                    raise
                raise group_refused(path, group) from None
        self.thread = threading.Thread(target=serve_unix, args=(str(path), backend, None, ready, self.stop),
                                       kwargs={"gate": gate, "listener": listener, "handover": self.handover,
                                               "adopt": list(adopt)}, name="pkcs11", daemon=True)
        self.thread.start()
        ready.wait(10)

    def pause(self) -> None:
        """Ask the loop to stop reading (see :meth:`freeze`) without waiting for it."""
        self.handover.request()

    def freeze(self, timeout: float) -> dict | None:
        """Stop reading at a message boundary once the slow calls running now are done; then
        ``{"listen": fd, "connections": [{"fd", "state", "unsent"}]}`` with every socket
        detached (its descriptor stays open, owned by the caller), or None if the calls did not
        finish within ``timeout`` (serving then goes on as before)."""
        if not self.handover.requested:
            self.handover.request()
        if not self.handover.wait(timeout):
            return None
        self.thread.join(10)
        h = self.handover
        conns = [{"fd": sock.detach(), "state": conn.export_state(), "unsent": base64.b64encode(unsent).decode()}
                 for sock, conn, unsent in h.peers]
        assert h.listener is not None
        out = {"listen": h.listener.detach(), "connections": conns}
        h.listener, h.peers = None, []
        h.close()
        return out

    @classmethod
    def thaw(cls, service: Service, path: Path, gate: Callable[[socket.socket], bool] | None,
             state: dict) -> "_P11Server":
        """Serve on the listener and clients of a :meth:`freeze` (descriptors in ``state``)."""
        backend = ServiceBackend(service)
        adopt = []
        for c in state["connections"]:
            sock = socket.socket(fileno=c["fd"])
            try:
                conn = Connection.from_state(backend, None, c["state"])
            except Exception:  # a connection whose state cannot be read is closed, the others go on
                sock.close()
                continue
            adopt.append((sock, conn, base64.b64decode(c["unsent"])))
        return cls(service, path, gate=gate, listener=socket.socket(fileno=state["listen"]), adopt=adopt)

    def shutdown(self) -> None:
        self.stop.set()
        self.thread.join(5)

    def server_close(self) -> None:
        pass


def start_p11(service: Service, path: Path, mode: int = 0o600, group: int | None = None,
              gate: Callable[[socket.socket], bool] | None = None) -> _P11Server:
    return _P11Server(service, path, mode, group, gate)


def check_connections(service: Service, state: dict) -> int:
    """Rebuild (and drop) the PKCS#11 connections of a :meth:`_P11Server.freeze` state without
    their sockets: how a restart checks that new code reads the state before it takes over."""
    backend = ServiceBackend(service)
    for c in state["connections"]:
        Connection.from_state(backend, None, c["state"])
        base64.b64decode(c["unsent"], validate=True)
    return len(state["connections"])


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
    from .home import open_token
    service = Service(open_token(home))
    try:
        _serve_stdio(ServiceBackend(service))
    finally:
        service.close()  # its worker processes first, then the token
    return 0
