"""Socket and stdio front ends: one :class:`Connection` per client, threads for concurrency."""
from __future__ import annotations

import os
import socket
import sys
import threading
from typing import Any, BinaryIO, Callable

from .backend import Backend
from .server import Connection

BackendSource = Backend | Callable[[], Backend]


def _locker(lock: Any) -> Callable[[Callable[[], Any]], Any] | None:
    if lock is None:
        return None

    def locked(fn: Callable[[], Any]) -> Any:
        with lock:
            return fn()
    return locked


def _backend(src: BackendSource) -> Backend:
    return src() if callable(src) and not hasattr(src, "timed_sign") else src  # type: ignore[return-value]


def serve_connection(conn: Connection, recv: Callable[[], bytes], send: Callable[[bytes], None]) -> None:
    while not conn.closed:
        data = recv()
        if not data:
            break
        out = conn.feed(data)
        if out:
            send(out)


def _client(sock: socket.socket, src: BackendSource, lock: Any) -> None:
    with sock:
        try:
            conn = Connection(_backend(src), _locker(lock))
            serve_connection(conn, lambda: sock.recv(65536), sock.sendall)
        except OSError:
            pass


def serve_unix(path: str, backend: BackendSource, lock: Any = None,
               ready: threading.Event | None = None, stop: threading.Event | None = None) -> None:
    """Serve p11-kit clients on a Unix socket at ``path`` until ``stop`` is set.

    ``backend`` is a Backend or a factory called once per client; ``lock`` (e.g. a
    threading.Lock) serializes backend calls across clients.
    """
    if os.path.exists(path):
        os.unlink(path)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    os.chmod(path, 0o600)
    srv.listen(16)
    srv.settimeout(0.2)
    if ready is not None:
        ready.set()
    try:
        while stop is None or not stop.is_set():
            try:
                sock, _ = srv.accept()
            except socket.timeout:
                continue
            sock.settimeout(None)
            threading.Thread(target=_client, args=(sock, backend, lock), daemon=True).start()
    finally:
        srv.close()
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def serve_stdio(backend: Backend, stdin: BinaryIO | None = None, stdout: BinaryIO | None = None) -> None:
    """Serve one client over stdin/stdout (``cryptobat p11-stdio``, p11-kit's ``unix:`` exec style)."""
    inp = stdin or sys.stdin.buffer
    out = stdout or sys.stdout.buffer
    conn = Connection(backend)

    def send(b: bytes) -> None:
        out.write(b)
        out.flush()
    serve_connection(conn, lambda: inp.read1(65536) if hasattr(inp, "read1") else inp.read(1), send)
