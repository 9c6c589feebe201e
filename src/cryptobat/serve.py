"""``cryptobat serve``: one daemon holds the token and serves every transport at once.

The token is a plain object; this module only moves bytes. A single lock
serialises access to the token's state; the heavy part of signing (policy
check and signature over a batch) runs outside it, spread over the token's
worker processes, so clients do not queue behind each other's batches.

Who may connect: every socket is 0600 unless ``signer_group`` is given, which
makes the signer sockets (native API, PKCS#11) 0660 in that group; the console
socket stays 0600. Each accepted connection's peer is checked again
(:mod:`cryptobat.peers`): the console admits the daemon's user and root, the
signer sockets also the signer group. Signers still authenticate: the signer
PIN (PKCS#11 ``C_Login``, native ``login``) or a uid/gid a quorum listed.

Bounds: :data:`MAX_LINE` bytes per console line (on every console transport),
``native.MAX_FRAME`` per native frame, :data:`MAX_CONNECTIONS` at once on each
threaded socket.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import socketserver
import sys
import threading
import time
import tty
from pathlib import Path
from typing import Callable, Sequence

from . import native, peers
from .api import SignResult
from .console import Console
from .errors import CryptobatError
from .token import Token

MAX_LINE = 64 << 10  # bytes in one console line, without its end
MAX_CONNECTIONS = 64  # at once, per console or native socket
TOO_LONG = b"fail: line too long\n"


class Service:
    """The token as every transport of the daemon sees it."""

    def __init__(self, token: Token) -> None:
        self.token = token
        self.lock = threading.RLock()
        self.pin_lock = threading.Lock()

    def console(self, transport: str) -> Console:
        """A console session on this token; it takes ``self.lock`` itself, around each command."""
        return Console(self.token, transport=transport, lock=self.lock)

    def console_line(self, console: Console, line: str) -> str:
        return console.handle(line)

    def check_pin(self, pin: bytes | str, source: str) -> bool:
        """The signer PIN. Not under the token lock for the scrypt (~50 ms: a login must not stall
        signing), but one at a time: each scrypt needs 16 MiB, and twenty at once would bloat the
        daemon for good. The token audits failures."""
        with self.pin_lock:
            return self.token.check_pin(pin, lock=self.lock, source=source)

    def peer_allowed(self, peer: peers.Peer) -> bool:
        """Whether a quorum listed this peer's uid or gid as a signer that needs no PIN."""
        with self.lock:
            return self.token.peer_allowed(peer.uid, peer.gid)

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
_EOL = re.compile(rb"[\r\n]")


class LineReader:
    """Console lines from a byte stream, bounded before anything is decoded.

    LF, CR or CR LF ends a line. :meth:`line` gives the line's bytes (without its
    end), :data:`TOO_LONG` for a line over ``limit`` bytes (read and dropped as it
    arrives, never held whole), or None at end of stream: a last line without its
    end (a client cut off mid-line) is dropped, never run.
    """

    TOO_LONG = object()

    def __init__(self, recv: Callable[[int], bytes], limit: int = MAX_LINE) -> None:
        self.recv = recv
        self.limit = limit
        self.buf = bytearray()
        self.scanned = 0  # bytes of buf known to hold no line end
        self.after_cr = False  # the last line ended in CR: an LF right after it belongs to it
        self.dropping = False  # inside a line already over the limit

    def line(self) -> bytes | object | None:
        while True:
            if self.after_cr and self.buf:
                if self.buf[0] == 10:
                    del self.buf[0]
                self.after_cr = False
            m = _EOL.search(self.buf, self.scanned)
            if m is not None:
                i = m.start()
                line = bytes(self.buf[:i])
                self.after_cr = self.buf[i] == 13
                del self.buf[:i + 1]
                self.scanned = 0
                if self.dropping or i > self.limit:
                    self.dropping = False
                    return self.TOO_LONG
                return line
            if len(self.buf) > self.limit:
                self.buf.clear()
                self.dropping = True
            self.scanned = len(self.buf)
            data = self.recv(65536)
            if not data:
                return None
            self.buf += data


class ConsoleHandler(socketserver.BaseRequestHandler):
    service: Service
    transport = "socket"
    busy_reply = b"fail: too many connections\n"

    def handle(self) -> None:
        sock: socket.socket = self.request
        console = self.service.console(self.transport)
        reader = LineReader(sock.recv)
        try:
            while not console.closed:
                sock.sendall(console.prompt.encode())
                line = reader.line()
                if line is None:
                    return
                if line is LineReader.TOO_LONG:
                    sock.sendall(TOO_LONG)
                    continue
                text = line.decode("utf-8", errors="replace")
                sock.sendall(self.service.console_line(console, text).encode())
        finally:
            console.close()  # the session ends with its connection: its officers are logged out


# --- console on a serial line: pseudo-terminal or real device ----------------------
class SerialLine:
    """A byte-at-a-time line editor, as the original device ran on its UART: echo, backspace, CR."""

    def __init__(self, service: Service, write: Callable[[bytes], None], transport: str = "pty") -> None:
        self.service = service
        self.console = service.console(transport)
        self.write = write
        self.buf = bytearray()
        self._after_cr = False
        self._too_long = False  # bytes were dropped from this line: it is refused, not run cut short
        self.write(self.console.prompt.encode())

    def feed(self, data: bytes) -> None:
        for b in data:
            if b in (13, 10):
                if b == 10 and not self.buf and self._after_cr:  # CR LF is one line end
                    self._after_cr = False
                    continue
                self._after_cr = b == 13
                self.write(b"\r\n")
                if self._too_long:
                    out = TOO_LONG.decode()
                else:
                    out = self.service.console_line(self.console, self.buf.decode("utf-8", errors="replace"))
                self.buf.clear()
                self._too_long = False
                self.write(out.replace("\n", "\r\n").encode() + self.console.prompt.encode())
            elif b in (8, 127):
                if self.buf and not self._too_long:
                    self.buf.pop()
                    if not self.console.secret_input:
                        self.write(b"\b \b")
            elif b == 3:  # ^C drops the line
                self.buf.clear()
                self._too_long = False
                self.write(b"^C\r\n" + self.console.prompt.encode())
            elif b >= 32:
                if len(self.buf) >= MAX_LINE:
                    self._too_long = True
                    continue
                self.buf.append(b)
                if not self.console.secret_input:
                    self.write(bytes([b]))


def run_pty(service: Service, link: Path) -> tuple[str, threading.Thread]:
    master, slave = os.openpty()
    tty.setraw(slave)
    os.fchmod(slave, 0o600)  # no group tty write access: nothing but the officers' terminal types here
    path = os.ttyname(slave)
    try:
        link.unlink()
    except FileNotFoundError:
        pass
    link.symlink_to(path)

    def loop() -> None:
        line = SerialLine(service, lambda b: os.write(master, b), "pty")
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
        line = SerialLine(service, port.write, "serial")
        while True:
            data = port.read(port.in_waiting or 1)
            if data:
                line.feed(data)

    t = threading.Thread(target=loop, name="serial", daemon=True)
    t.start()
    return t


# --- native signing API ----------------------------------------------------------------
class NativeHandler(socketserver.StreamRequestHandler):
    """One native API connection: ``keys`` and ``sign`` only after ``login`` (or for a listed peer)."""

    service: Service
    busy_reply = native.encode({"error": "too many connections"})

    def setup(self) -> None:
        super().setup()
        self.logged_in = False
        try:
            self.peer: peers.Peer | None = peers.peer_credentials(self.request)
        except OSError:
            self.peer = None

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

    def authenticated(self) -> bool:
        """Logged in with the PIN on this connection, or a peer a quorum listed (asked each time,
        so a quorum's change applies to open connections too)."""
        return self.logged_in or (self.peer is not None and self.service.peer_allowed(self.peer))

    def dispatch(self, req: dict) -> dict:
        svc, op = self.service, req.get("op")
        if op == "login":
            pin = native.parse_pin(req)
            self.logged_in = False
            if not svc.check_pin(pin, "native"):
                return {"error": native.PIN_INCORRECT}
            self.logged_in = True
            return {"ok": True}
        if op == "time":
            return {"time": svc.call(svc.token.now)}
        if op == "info":
            return svc.call(svc.token.info)
        if op == "keys":  # public keys, as PKCS#11 shows its public-key objects before C_Login
            return native.keys_response(svc.call(svc.token.keys))
        if op == "sign":
            if not self.authenticated():
                return {"error": native.NOT_LOGGED_IN}
            return native.sign_response(svc.timed_sign(native.parse_sign_items(req)))
        raise native.ProtocolError(f"unknown op {str(op)[:32]!r}")


class _Server(socketserver.ThreadingUnixStreamServer):
    """A thread per connection, at most ``max_connections`` at once, each peer checked by ``gate``."""

    daemon_threads = True
    allow_reuse_address = True
    gate: peers.Gate | None = None
    max_connections = MAX_CONNECTIONS

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self._count = threading.Lock()
        self.active = 0
        self.turned_away = 0

    def verify_request(self, request, client_address) -> bool:
        return self.gate is None or self.gate(request)

    def process_request(self, request, client_address) -> None:
        with self._count:
            full = self.active >= self.max_connections
            if not full:
                self.active += 1
        if full:
            self.turned_away += 1
            try:
                request.setblocking(False)
                request.send(self.RequestHandlerClass.busy_reply)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release()

    def _release(self) -> None:
        with self._count:
            self.active -= 1

    def handle_error(self, request, client_address) -> None:
        """A client that vanished is routine; anything else gets one line, and serving goes on."""
        e = sys.exc_info()[1]
        if not isinstance(e, (BrokenPipeError, ConnectionResetError)):
            print(f"cryptobat serve: connection error: {type(e).__name__}: {e}", file=sys.stderr)


def group_refused(path: Path | str, group: int) -> CryptobatError:
    return CryptobatError(f"cannot give {path} to group {group}: the daemon's user must be a member "
                          "of the signer group (systemd: SupplementaryGroups=)")


def place_socket(path: Path, mode: int, group: int | None) -> None:
    """Give a freshly bound (not yet listening) socket its mode and group, whatever the umask."""
    os.chmod(path, mode)
    if group is not None:
        try:
            os.chown(path, -1, group)
        except PermissionError:
            raise group_refused(path, group) from None


def _unlink_stale(path: Path) -> None:
    if path.exists() or path.is_symlink():
        path.unlink()


def _unix_server(path: Path, handler: type, service: Service, *, mode: int = 0o600,
                 group: int | None = None, gate: peers.Gate | None = None) -> _Server:
    """Bind, set mode and group, then listen: nobody can connect before the socket has its final mode."""
    _unlink_stale(path)
    cls = type(handler.__name__, (handler,), {"service": service})
    server = _Server(str(path), cls, bind_and_activate=False)
    server.gate = gate
    try:
        server.server_bind()
        place_socket(path, mode, group)
        server.server_activate()
    except BaseException:
        server.server_close()
        _unlink_stale(path)
        raise
    threading.Thread(target=server.serve_forever, name=path.name, daemon=True).start()
    return server


def serve(home: Path, *, pty: bool = False, serial_dev: str | None = None, baud: int = 115200,
          console_sock: Path | None = None, native_sock: Path | None = None,
          p11_sock: Path | None = None, signer_group: str | None = None,
          socket_dir: Path | None = None, out=sys.stdout) -> int:
    """Serve ``home``'s token until SIGTERM, SIGINT or SIGHUP.

    ``p11_sock`` None serves no PKCS#11. ``signer_group``: the native and PKCS#11 sockets
    become 0660 in that group (the daemon's user must be a member). ``socket_dir``: sockets
    without an explicit path go there instead of the home, with links to them in the home
    (for ``cryptobat console`` and clients that look in the home).
    """
    gid = None
    if signer_group is not None:
        try:
            gid = peers.group_id(signer_group)
        except KeyError:
            raise CryptobatError(f"no group {signer_group!r} (--signer-group)") from None
    signer_mode = 0o660 if gid is not None else 0o600
    where = home
    if socket_dir is not None:
        where = socket_dir
        if not socket_dir.is_dir():
            socket_dir.mkdir(parents=True)
            os.chmod(socket_dir, 0o755)  # signers must reach their sockets; each socket has its own mode
    console_sock = console_sock or where / "console.sock"
    native_sock = native_sock or where / "native.sock"
    token = Token(home)
    service = Service(token)
    servers: list = []
    made: list[Path] = []
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    try:
        servers.append(_unix_server(console_sock, ConsoleHandler, service, mode=0o600,
                                    gate=peers.Gate(str(console_sock))))
        made.append(console_sock)
        print(f"console on unix:{console_sock}", file=out)
        servers.append(_unix_server(native_sock, NativeHandler, service, mode=signer_mode, group=gid,
                                    gate=peers.Gate(str(native_sock), gid)))
        made.append(native_sock)
        print(f"native signing API on unix:{native_sock}", file=out)
        if p11_sock is not None:
            from .p11serve import start_p11
            servers.append(start_p11(service, p11_sock, mode=signer_mode, group=gid,
                                     gate=peers.Gate(str(p11_sock), gid)))
            made.append(p11_sock)
            print(f"PKCS#11 (p11-kit RPC) on unix:path={p11_sock}", file=out)
        if socket_dir is not None and socket_dir.resolve() != home.resolve():
            for target in [p for p in made if p.parent == socket_dir]:
                link = home / target.name
                _unlink_stale(link)
                link.symlink_to(target)
                made.append(link)
        if pty:
            path, _ = run_pty(service, home / "console.pty")
            made.append(home / "console.pty")
            print(f"console on pseudo-terminal {path} (link {home / 'console.pty'})", file=out)
        if serial_dev:
            run_serial(service, serial_dev, baud)
            print(f"console on serial {serial_dev} at {baud} baud", file=out)
        if gid is not None:
            print(f"signer sockets: group {signer_group} ({gid}), mode 0660; console: owner only", file=out)
        out.flush()
        service.call(lambda: token.audit("serve", pid=os.getpid()))
        while not stop.wait(1.0):
            service.tick()
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()
        for p in made:
            if p.exists() or p.is_symlink():
                p.unlink()
        with service.lock:
            token.audit("stop")
            token.close()
    return 0
