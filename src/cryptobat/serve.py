"""``cryptobat serve``: one daemon holds the token and serves every transport at once.

The token is a plain object; this module only moves bytes. A single lock
serialises access to the token's state; the heavy part of signing (policy
check and signature over a batch) runs outside it, spread over the token's
worker processes, so clients do not queue behind each other's batches.
"""
from __future__ import annotations

import os
import signal
import socketserver
import sys
import threading
import time
import tty
from pathlib import Path
from typing import Callable, Sequence

from . import native
from .api import SignResult
from .console import Console
from .errors import CryptobatError
from .token import Token

MAX_LINE = 1 << 20


class Service:
    """The token as every transport of the daemon sees it."""

    def __init__(self, token: Token) -> None:
        self.token = token
        self.lock = threading.RLock()
        self.pin_lock = threading.Lock()

    def console_line(self, console: Console, line: str) -> str:
        with self.lock:
            return console.handle(line)

    def timed_sign(self, items: Sequence[tuple[str, bytes]]) -> list[SignResult]:
        with self.lock:
            job = self.token.sign_job(items)
        results = self.token.engine.run(job)
        with self.lock:
            self.token.account(results)
        return results

    def call(self, fn: Callable, *args):
        with self.lock:
            return fn(*args)

    def tick(self) -> None:
        with self.lock:
            self.token.flush_audit()
            self.token.now()


# --- console over a stream socket -----------------------------------------------
class ConsoleHandler(socketserver.StreamRequestHandler):
    service: Service

    def handle(self) -> None:
        console = Console(self.service.token)
        while not console.closed:
            self.wfile.write(console.prompt.encode())
            self.wfile.flush()
            line = self.rfile.readline(MAX_LINE)
            if not line:
                return
            if not line.endswith(b"\n") and len(line) >= MAX_LINE:
                while line and not line.endswith(b"\n"):
                    line = self.rfile.readline(MAX_LINE)
                self.wfile.write(b"fail: line too long\n")
                continue
            text = line.decode("utf-8", errors="replace")
            self.wfile.write(self.service.console_line(console, text).encode())


# --- console on a serial line: pseudo-terminal or real device ----------------------
class SerialLine:
    """A byte-at-a-time line editor, as the original device ran on its UART: echo, backspace, CR."""

    def __init__(self, service: Service, write: Callable[[bytes], None]) -> None:
        self.service = service
        self.console = Console(service.token)
        self.write = write
        self.buf = bytearray()
        self._after_cr = False
        self.write(self.console.prompt.encode())

    def feed(self, data: bytes) -> None:
        for b in data:
            if b in (13, 10):
                if b == 10 and not self.buf and self._after_cr:  # CR LF is one line end
                    self._after_cr = False
                    continue
                self._after_cr = b == 13
                self.write(b"\r\n")
                line = self.buf.decode("utf-8", errors="replace")
                self.buf.clear()
                out = self.service.console_line(self.console, line)
                self.write(out.replace("\n", "\r\n").encode() + self.console.prompt.encode())
            elif b in (8, 127):
                if self.buf:
                    self.buf.pop()
                    if not self.console.secret_input:
                        self.write(b"\b \b")
            elif b == 3:  # ^C drops the line
                self.buf.clear()
                self.write(b"^C\r\n" + self.console.prompt.encode())
            elif b >= 32 and len(self.buf) < MAX_LINE:
                self.buf.append(b)
                if not self.console.secret_input:
                    self.write(bytes([b]))


def run_pty(service: Service, link: Path) -> tuple[str, threading.Thread]:
    master, slave = os.openpty()
    tty.setraw(slave)
    path = os.ttyname(slave)
    try:
        link.unlink()
    except FileNotFoundError:
        pass
    link.symlink_to(path)

    def loop() -> None:
        line = SerialLine(service, lambda b: os.write(master, b))
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:
                time.sleep(0.2)  # nobody has the terminal open
                continue
            line.feed(data)

    t = threading.Thread(target=loop, name="pty", daemon=True)
    t.slave_fd = slave  # keep the slave open so the master never sees EOF between sessions
    t.start()
    return path, t


def run_serial(service: Service, device: str, baud: int = 115200) -> threading.Thread:
    import serial  # pyserial
    port = serial.Serial(device, baud, timeout=0.5)

    def loop() -> None:
        line = SerialLine(service, port.write)
        while True:
            data = port.read(port.in_waiting or 1)
            if data:
                line.feed(data)

    t = threading.Thread(target=loop, name="serial", daemon=True)
    t.start()
    return t


# --- native signing API ----------------------------------------------------------------
class NativeHandler(socketserver.StreamRequestHandler):
    service: Service

    def handle(self) -> None:
        while True:
            header = self.rfile.read(4)
            if len(header) < 4:
                return
            try:
                body = self.rfile.read(native.frame_length(header))
                resp = self.dispatch(native.decode(body))
            except native.ProtocolError as e:
                self.wfile.write(native.encode({"error": str(e)}))
                if "limit" in str(e):
                    return
                continue
            except CryptobatError as e:
                resp = {"error": str(e)}
            except Exception as e:  # keep serving everyone else
                resp = {"error": f"internal error: {type(e).__name__}"}
            self.wfile.write(native.encode(resp))

    def dispatch(self, req: dict) -> dict:
        svc, op = self.service, req.get("op")
        if op == "sign":
            return native.sign_response(svc.timed_sign(native.parse_sign_items(req)))
        if op == "keys":
            return native.keys_response(svc.call(svc.token.keys))
        if op == "time":
            return {"time": svc.call(svc.token.now)}
        if op == "info":
            return svc.call(svc.token.info)
        raise native.ProtocolError(f"unknown op {op!r}")


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address) -> None:
        """A client that vanished is routine; anything else gets one line, and serving goes on."""
        e = sys.exc_info()[1]
        if not isinstance(e, (BrokenPipeError, ConnectionResetError)):
            print(f"cryptobat serve: connection error: {type(e).__name__}: {e}", file=sys.stderr)


def _unix_server(path: Path, handler: type, service: Service) -> _Server:
    if path.exists() or path.is_symlink():
        path.unlink()
    cls = type(handler.__name__, (handler,), {"service": service})
    old = os.umask(0o077)
    try:
        server = _Server(str(path), cls)
    finally:
        os.umask(old)
    threading.Thread(target=server.serve_forever, name=path.name, daemon=True).start()
    return server


def serve(home: Path, *, pty: bool = False, serial_dev: str | None = None, baud: int = 115200,
          console_sock: Path | None = None, native_sock: Path | None = None,
          p11_sock: Path | None = None, out=sys.stdout) -> int:
    token = Token(home)
    service = Service(token)
    console_sock = console_sock or home / "console.sock"
    native_sock = native_sock or home / "native.sock"
    servers: list = []
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    try:
        servers.append(_unix_server(console_sock, ConsoleHandler, service))
        print(f"console on unix:{console_sock}", file=out)
        servers.append(_unix_server(native_sock, NativeHandler, service))
        print(f"native signing API on unix:{native_sock}", file=out)
        if p11_sock is not None:
            from .p11serve import start_p11
            servers.append(start_p11(service, p11_sock))
            print(f"PKCS#11 (p11-kit RPC) on unix:path={p11_sock}", file=out)
        if pty:
            path, _ = run_pty(service, home / "console.pty")
            print(f"console on pseudo-terminal {path} (link {home / 'console.pty'})", file=out)
        if serial_dev:
            run_serial(service, serial_dev, baud)
            print(f"console on serial {serial_dev} at {baud} baud", file=out)
        out.flush()
        service.call(lambda: token.audit("serve", pid=os.getpid()))
        while not stop.wait(1.0):
            service.tick()
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()
        for p in (console_sock, native_sock, p11_sock, home / "console.pty"):
            if p is not None and (p.exists() or p.is_symlink()):
                p.unlink()
        with service.lock:
            token.audit("stop")
            token.close()
    return 0
