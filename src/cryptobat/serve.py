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
``native.MAX_FRAME`` per native frame (:data:`PRELOGIN_FRAME` before login),
:data:`MAX_CONNECTIONS` at once on each threaded socket; a native connection that stalls
mid-frame (:data:`NATIVE_FRAME_TIMEOUT`) or idles (:data:`NATIVE_IDLE_TIMEOUT`) is closed.

Restarts (``cryptobat serve --replace``, which asks on the owner-only ``control.sock`` in the
home, or SIGHUP): the daemon re-executes itself, new code and all, in the same process, and
its signers never notice. It first starts the new code in a child (``--takeover-check``) and
waits until it is ready; then it stops reading from every client at a message boundary
(PKCS#11 and native calls under way finish first; bytes of a request not yet complete stay
in the state), serialises each connection's state as JSON, closes the token (the store lock
is released) and lets the child open the token and rebuild every connection from that state.
Only when that worked does it ``execve`` the new code (``--takeover FD``: the state in a
memfd), with the listening and client sockets kept open across it; the new code opens the
token and serves on, audited as ``takeover``. If anything fails before the ``execve``, the
old code reopens the token and serves the very same connections on (``restart-failed``).
Console sessions end at a restart: their officers log in again. See docs/deploying.md.
"""
from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import re
import select
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
import tty
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, TextIO

from . import __version__, native, peers
from .api import SignResult
from .console import Console
from .errors import CryptobatError, LimitReached, PinIncorrect, PinLocked, TokenBusy
from .home import close_token, open_engine, open_token
from .workers import Engine
from .release import code_hash
from .token import Token

MAX_LINE = 64 << 10  # bytes in one console line, without its end
MAX_CONNECTIONS = 64  # at once, per console or native socket
LISTEN_BACKLOG = 128  # connects queued on the console and native sockets: a burst is not refused
PRELOGIN_FRAME = 64 << 10  # bytes in a native frame before login (login, info, time, keys need little)
# a native connection is closed when a frame it began does not complete within this many seconds,
# or when it sends nothing for NATIVE_IDLE_TIMEOUT between frames (read at start, from the environment)
NATIVE_FRAME_TIMEOUT = float(os.environ.get("CRYPTOBAT_NATIVE_FRAME_TIMEOUT", "30"))
NATIVE_IDLE_TIMEOUT = float(os.environ.get("CRYPTOBAT_NATIVE_IDLE_TIMEOUT", "600"))
TOO_LONG = b"fail: line too long\n"
RESTART_NOTICE = b"restarting: the daemon restarts, this console session ends; officers log in again\n"
PARK_SECONDS = 30.0  # calls under way must finish within this, or the restart is called off
CHECK_SECONDS = 60.0  # for the new code to start, and then to check the handed-over state
OPEN_SECONDS = 10.0  # for the store lock, when taking over a token another process just closed
HANDOVER_FORMAT = 1
_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


class Service:
    """The token as every transport of the daemon sees it."""

    def __init__(self, token: Token, syslog: str | None = None) -> None:
        self.token = token
        self.lock = threading.RLock()
        self.pin_lock = threading.Lock()
        self._engine: Engine | None = None  # the signing worker processes, started with the first batch
        self._syslog = _syslog_logger(syslog) if syslog else None
        self._logged = token.audit_seq()  # audit entries up to here were looked at for syslog

    def _log_refusals(self) -> None:
        """Send the refusals audited since the last call to syslog, one line an audit entry:
        as bounded as the audit (refused signatures come aggregated, at most one entry a second).
        Called with ``self.lock`` held."""
        if self._syslog is None or self.token.audit_seq() <= self._logged:
            return
        from .auditview import is_refusal, line
        try:
            for seq, text, _ in self.token.store.audit_rows(self._logged):
                self._logged = seq
                entry = json.loads(text)
                if is_refusal(entry):
                    self._syslog.warning("%s", line(entry))
        except (CryptobatError, ValueError) as e:
            self._syslog.error("cannot read the audit log for syslog: %s", e)

    def engine(self) -> Engine:
        """The daemon's worker pool for large batches; called with ``self.lock`` held."""
        if self._engine is not None and self._engine.custody is not self.token.custody:
            old, self._engine = self._engine, None  # custodymigrate: its workers hold the old custody
            old.close()
        if self._engine is None:
            self._engine = open_engine(self.token)
        return self._engine

    def close(self) -> None:
        """Stop the worker processes, then close the token (its store lock is free after this)."""
        engine, self._engine = self._engine, None
        if self._syslog is not None:
            with self.lock, contextlib.suppress(CryptobatError):
                self.token.flush_audit(force=True)
                self._log_refusals()
        close_token(self.token, engine)

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

    def timed_sign(self, items: Sequence[tuple[str, bytes]], spread: bool = False) -> list[SignResult]:
        """Check and sign, the token lock held only around the job and the accounting.
        ``spread``: a small job may go to a free worker process (see :meth:`Engine.run`)."""
        with self.lock:
            job = self.token.sign_job(items)
            engine = self.engine()
        results = engine.run(job, spread=spread)
        with self.lock:
            self.token.account(results, labels=[label for label, _ in items])
        return results

    def call(self, fn: Callable, *args):
        with self.lock:
            return fn(*args)

    def tick(self) -> None:
        with self.lock:
            self.token.flush_audit()
            self.token.now()
            self._log_refusals()


def _syslog_logger(address: str) -> logging.Logger:
    """A logger to syslog/journald on ``address`` (a Unix socket, /dev/log normally), facility daemon."""
    import logging.handlers
    handler = logging.handlers.SysLogHandler(address=address, facility=logging.handlers.SysLogHandler.LOG_DAEMON)
    handler.setFormatter(logging.Formatter(f"cryptobat[{os.getpid()}]: %(message)s"))
    handler.handleError = lambda record: None  # a syslog daemon gone must not stop or flood the daemon:
    # the audit log holds every refusal whatever syslog does
    log = logging.getLogger(f"cryptobat.syslog.{id(handler)}")
    log.propagate = False
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    return log


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
                if self.server.restarting:  # a line that came in as the restart began is not run
                    sock.sendall(RESTART_NOTICE)
                    return
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


class PtyConsole:
    """The console on a pseudo-terminal (link ``console.pty``), as on the original's UART.

    A restart hands the master and slave descriptors on (:meth:`stop`, then ``fds``), so the
    terminal and its link stay the same; only the console session on it starts anew.
    """

    def __init__(self, service: Service, link: Path, fds: tuple[int, int] | None = None) -> None:
        if fds is None:
            master, slave = os.openpty()
            tty.setraw(slave)
            os.fchmod(slave, 0o600)  # no group tty write access: nothing but the officers' terminal types here
            path = os.ttyname(slave)
            try:
                link.unlink()
            except FileNotFoundError:
                pass
            link.symlink_to(path)
        else:
            master, slave = fds
            path = os.ttyname(slave)
        self.master, self.slave, self.path = master, slave, path  # the slave stays open: no EOF between sessions
        self._r, self._w = os.pipe()
        self.thread = threading.Thread(target=self._loop, args=(service,), name="pty", daemon=True)
        self.thread.start()

    def _loop(self, service: Service) -> None:
        line = SerialLine(service, lambda b: os.write(self.master, b), "pty")
        while True:
            r, _, _ = select.select([self.master, self._r], [], [])
            if self._r in r:
                return
            try:
                data = os.read(self.master, 4096)
            except OSError:
                time.sleep(0.2)  # nobody has the terminal open
                continue
            line.feed(data)

    def stop(self) -> tuple[int, int]:
        """End the session (with a notice on the terminal); (master, slave), still open."""
        os.write(self._w, b"!")
        self.thread.join(2)
        if not self.thread.is_alive():
            os.close(self._r)
            os.close(self._w)
        os.set_blocking(self.master, False)  # nobody may be reading the terminal: never wait for it
        try:
            os.write(self.master, b"\r\n" + RESTART_NOTICE.replace(b"\n", b"\r\n"))
        except OSError:
            pass
        finally:
            os.set_blocking(self.master, True)
        return self.master, self.slave


class SerialConsole:
    """The console on a serial device; a restart closes the port and the new daemon opens it again."""

    def __init__(self, service: Service, device: str, baud: int = 115200) -> None:
        import serial  # pyserial
        self.port = serial.Serial(device, baud, timeout=0.5)
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, args=(service,), name="serial", daemon=True)
        self.thread.start()

    def _loop(self, service: Service) -> None:
        line = SerialLine(service, self.port.write, "serial")
        while not self.stopping:
            data = self.port.read(self.port.in_waiting or 1)
            if data and not self.stopping:
                line.feed(data)

    def stop(self) -> None:
        self.stopping = True
        self.thread.join(5)
        try:
            self.port.write(RESTART_NOTICE.replace(b"\n", b"\r\n"))
            self.port.close()
        except Exception:
            pass


# --- native signing API ----------------------------------------------------------------
class Pause:
    """A restart asking a server's connection threads to stop at a message boundary.

    A handler waiting for input polls :attr:`r` beside its socket; after :meth:`begin` it
    offers its connection to :meth:`park` (which, if taken, records it) and ends without
    closing it. :meth:`end` returns what was parked and lets the others carry on.
    """

    def __init__(self) -> None:
        self.r, self._w = os.pipe()
        os.set_blocking(self.r, False)
        os.set_blocking(self._w, False)
        self._lock = threading.Lock()
        self.active = False
        self._parked: list[dict] = []

    def begin(self) -> None:
        with self._lock:
            self.active = True
            self._parked = []
        try:
            os.write(self._w, b"!")
        except BlockingIOError:
            pass

    def park(self, record: Callable[[], dict]) -> bool:
        with self._lock:
            if not self.active:
                return False
            self._parked.append(record())
            return True

    def end(self) -> list[dict]:
        with self._lock:
            self.active = False
            parked, self._parked = self._parked, []
        try:
            while os.read(self.r, 4096):
                pass
        except BlockingIOError:
            pass
        return parked

    def close(self) -> None:
        """Once no handler polls :attr:`r` any more."""
        os.close(self.r)
        os.close(self._w)


class NativeHandler(socketserver.BaseRequestHandler):
    """One native API connection: ``keys`` and ``sign`` only after ``login`` (or for a listed peer).

    A connection a restart handed over arrives with its state as its address (see
    :meth:`_Server.adopt`): whether it logged in, and the bytes of a frame not yet complete.
    """

    service: Service
    busy_reply = native.encode(native.error_response(LimitReached("too many connections")))

    def setup(self) -> None:
        self.logged_in = False
        self.buf = bytearray()
        handed = self.client_address if isinstance(self.client_address, dict) else None
        if handed is not None:
            self.logged_in = bool(handed["logged_in"])
            self.buf = bytearray(base64.b64decode(handed["buffer"]))
        try:
            self.peer: peers.Peer | None = peers.peer_credentials(self.request)
        except OSError:
            self.peer = None
        self._poll = select.poll()
        self._poll.register(self.request.fileno(), select.POLLIN)
        self._poll.register(self.server.pause.r, select.POLLIN)
        self._idle_since = self._started = time.monotonic()  # last answer; first byte of the frame under way

    def handle(self) -> None:
        while True:
            if not self._fill(4):
                return
            try:
                n = native.frame_length(bytes(self.buf[:4]))
            except native.ProtocolError as e:
                self._send(native.error_response(e))
                return
            if n > PRELOGIN_FRAME and not self.authenticated():
                self._send(native.error_response(native.FrameTooLarge(
                    f"frame of {n} bytes is over the {PRELOGIN_FRAME} byte limit before login")))
                return
            if not self._fill(4 + n):
                return
            body = bytes(self.buf[4:4 + n])
            del self.buf[:4 + n]
            try:
                resp = self.dispatch(native.decode(body))
            except native.ProtocolError as e:
                self._send(native.error_response(e))
                if isinstance(e, LimitReached):
                    return
                continue
            except CryptobatError as e:
                resp = native.error_response(e)
            except Exception as e:  # keep serving everyone else
                resp = native.error_response(CryptobatError(f"internal error: {type(e).__name__}"))
            self._send(resp)
            self._idle_since = self._started = time.monotonic()

    def _send(self, obj: dict) -> None:
        self.request.sendall(native.encode(obj))

    def _fill(self, n: int) -> bool:
        """Read until the buffer holds ``n`` bytes: False at end of stream, or when a restart
        took this connection (then it is no longer this thread's, and stays open), or when the
        frame under way stalled (NATIVE_FRAME_TIMEOUT) or the connection idled (NATIVE_IDLE_TIMEOUT)."""
        while len(self.buf) < n:
            if self.buf:
                left = self._started + NATIVE_FRAME_TIMEOUT - time.monotonic()
            else:
                left = self._idle_since + NATIVE_IDLE_TIMEOUT - time.monotonic()
            if left <= 0:
                return False
            events = dict(self._poll.poll(int(left * 1000) + 1))
            if self.server.pause.r in events and self.server.pause.park(self._parked):
                return False
            if self.request.fileno() in events:
                data = self.request.recv(max(65536, min(n - len(self.buf), 1 << 20)))
                if not data:
                    return False
                if not self.buf:
                    self._started = time.monotonic()
                self.buf += data
        return True

    def _parked(self) -> dict:
        return {"fd": self.request.detach(), "logged_in": self.logged_in,
                "buffer": base64.b64encode(bytes(self.buf)).decode()}

    def _peer_gone(self) -> bool:
        """True if the client shut its side (end of file waiting, nothing pipelined after it)."""
        try:
            return self.request.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"" and not self.buf
        except BlockingIOError:
            return False
        except OSError:
            return True

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
                if svc.token.pin_locked():
                    raise PinLocked("PIN locked")
                raise PinIncorrect(native.PIN_INCORRECT)
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
                raise native.NotLoggedIn(native.NOT_LOGGED_IN)
            items = native.parse_sign_items(req)
            if self._peer_gone():  # nobody would read the answer: sign nothing for it
                raise CryptobatError("client closed the connection")
            return native.sign_response(svc.timed_sign(items))
        raise native.ProtocolError(f"unknown op {str(op)[:32]!r}")


class _Server(socketserver.ThreadingUnixStreamServer):
    """A thread per connection, at most ``max_connections`` at once, each peer checked by ``gate``."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = LISTEN_BACKLOG
    gate: peers.Gate | None = None
    max_connections = MAX_CONNECTIONS

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self._count = threading.Lock()
        self.active = 0
        self.turned_away = 0
        self.requests: set[socket.socket] = set()  # the connections being served
        self.pause = Pause()
        self.restarting = False  # console sessions end (with a notice) instead of running lines

    def start(self) -> None:
        threading.Thread(target=self.serve_forever, args=(0.25,), name=Path(str(self.server_address)).name,
                         daemon=True).start()

    def verify_request(self, request, client_address) -> bool:
        return self.gate is None or self.gate(request)

    def process_request(self, request, client_address) -> None:
        with self._count:
            full = self.active >= self.max_connections
            if not full:
                self.active += 1
                self.requests.add(request)
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
            self._release(request)
            raise

    def adopt(self, sock: socket.socket, state: dict) -> None:
        """Serve a connection a restart handed over; its handler gets ``state`` as its address."""
        with self._count:
            self.active += 1
            self.requests.add(sock)
        try:
            super().process_request(sock, state)
        except BaseException:
            self._release(sock)
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(request)

    def _release(self, request) -> None:
        with self._count:
            self.active -= 1
            self.requests.discard(request)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no connection thread runs here; False if one still does after ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.active and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self.active

    def end_connections(self) -> None:
        """Shut every connection's reading side: each thread ends at its next read."""
        with self._count:
            requests = list(self.requests)
        for r in requests:
            try:
                r.shutdown(socket.SHUT_RD)
            except OSError:
                pass

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


# --- the daemon and its restarts --------------------------------------------------------
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
    server.start()
    return server


def _adopted_server(fd: int, path: Path, handler: type, service: Service, gate: peers.Gate | None) -> _Server:
    """A server on a listening socket a restart handed over (already bound, placed and listening)."""
    cls = type(handler.__name__, (handler,), {"service": service})
    server = _Server(str(path), cls, bind_and_activate=False)
    server.socket.close()
    server.socket = socket.socket(fileno=fd)
    server.gate = gate
    server.start()
    return server


def _control_listener(path: Path) -> socket.socket:
    """The owner-only control socket in the home (restart requests), bound 0600 before listen()."""
    _unlink_stale(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(str(path))
        os.chmod(path, 0o600)
        s.listen(16)
        s.setblocking(False)
    except BaseException:
        s.close()
        _unlink_stale(path)
        raise
    return s


def _open_token(home: Path, wait: float = 0.0) -> Token:
    """The token; with ``wait``, the store lock is waited for that long (another process is letting go)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return open_token(home)
        except TokenBusy:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


@dataclass
class Config:
    """What ``cryptobat serve`` was asked to serve; a restart serves the same again."""

    home: Path
    console_sock: Path
    native_sock: Path
    p11_sock: Path | None
    signer_group: str | None
    gid: int | None
    socket_dir: Path | None
    pty: bool = False
    serial_dev: str | None = None
    baud: int = 115200
    syslog: str | None = None  # the syslog socket refusals are logged to (serve --syslog)

    @property
    def signer_mode(self) -> int:
        return 0o660 if self.gid is not None else 0o600

    @property
    def control_sock(self) -> Path:
        return self.home / "control.sock"

    def sockets(self) -> list[Path]:
        return [self.console_sock, self.native_sock] + ([self.p11_sock] if self.p11_sock is not None else [])

    def links(self) -> list[tuple[Path, Path]]:
        """(link in the home, socket) for the sockets in ``socket_dir``."""
        if self.socket_dir is None or self.socket_dir.resolve() == self.home.resolve():
            return []
        return [(self.home / p.name, p) for p in self.sockets() if p.parent == self.socket_dir]

    def paths(self) -> list[Path]:
        """Every file the daemon makes (and removes when it stops)."""
        return (self.sockets() + [link for link, _ in self.links()] + [self.control_sock]
                + ([self.home / "console.pty"] if self.pty else []))

    def argv(self) -> list[str]:
        """The command line that serves this again: the code installed now, from its usual place
        (``-P``: never from the working directory)."""
        a = [sys.executable, "-P", "-m", "cryptobat", "--home", str(self.home), "serve",
             "--console-socket", str(self.console_sock), "--native-socket", str(self.native_sock)]
        a += ["--pkcs11-socket", str(self.p11_sock)] if self.p11_sock is not None else ["--no-pkcs11"]
        if self.signer_group is not None:
            a += ["--signer-group", self.signer_group]
        if self.socket_dir is not None:
            a += ["--socket-dir", str(self.socket_dir)]
        if self.pty:
            a.append("--pty")
        if self.serial_dev:
            a += ["--serial", self.serial_dev, "--baud", str(self.baud)]
        if self.syslog:
            a += ["--syslog-socket", self.syslog]
        return a


class RestartFailed(CryptobatError):
    """A restart that did not happen; the daemon serves on as it was."""


def _say(sock: socket.socket | None, text: str) -> None:
    if sock is None:
        return
    try:
        sock.sendall(text.encode())
    except OSError:
        pass


def _line(fd: int, deadline: float) -> str:
    """The first line a child writes on ``fd`` ('' at end of file or after ``deadline``)."""
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    return buf.split(b"\n", 1)[0].decode(errors="replace").strip()


def _why(err: bytes | str | None, default: str) -> str:
    """The last line of a child's stderr (its error), else ``default``."""
    text = err.decode(errors="replace") if isinstance(err, bytes) else (err or "")
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    return lines[-1][:300] if lines else default


def _handover_file(data: bytes, home: Path) -> int:
    """A descriptor (kept across execve) of an anonymous file holding ``data``, at offset 0."""
    try:
        fd = os.memfd_create("cryptobat-handover", 0)
    except (AttributeError, OSError):
        fd = os.open(home, os.O_TMPFILE | os.O_RDWR, 0o600)  # no memfd: an unnamed file in the home
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_handover(fd: int) -> dict:
    with os.fdopen(fd, "rb") as f:
        f.seek(0)
        return json.loads(f.read())


def _handover_fds(state: dict) -> list[int]:
    """Every descriptor a handover state names."""
    fds = [state["control"], state["console"], state["native"]["listen"]]
    fds += [c["fd"] for c in state["native"]["connections"]]
    if state.get("pkcs11") is not None:
        fds += [state["pkcs11"]["listen"]] + [c["fd"] for c in state["pkcs11"]["connections"]]
    if state.get("pty") is not None:
        fds += [state["pty"]["master"], state["pty"]["slave"]]
    if state.get("requester") is not None:
        fds.append(state["requester"])
    return fds


def _handover_problem(state: dict, cfg: Config) -> str | None:
    """Why this code cannot take over ``state`` for ``cfg``, or None."""
    if state.get("format") != HANDOVER_FORMAT:
        return f"handover format {state.get('format')!r} is not this version's ({HANDOVER_FORMAT})"
    if (state.get("pkcs11") is None) != (cfg.p11_sock is None):
        return "the handover and the options disagree about PKCS#11"
    if (state.get("pty") is None) == cfg.pty:
        return "the handover and the options disagree about --pty"
    return None


class Daemon:
    """The running daemon: the token, every transport, and its restarts (see the module docstring)."""

    def __init__(self, cfg: Config, out: TextIO = sys.stdout) -> None:
        self.cfg = cfg
        self.out = out
        self.service: Service | None = None
        self.control: socket.socket | None = None
        self.console: _Server | None = None
        self.native: _Server | None = None
        self.p11 = None
        self.pty: PtyConsole | None = None
        self.serial: SerialConsole | None = None
        self.stopping = False
        self.hup = False
        self._owns_paths = False  # the socket files are this daemon's to remove when it stops
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.control_gate = peers.Gate(str(cfg.control_sock))  # the daemon's user and root
        self.code = code_hash()  # of the code this process runs (the files may change under it)

    def say(self, text: str) -> None:
        try:
            print(text, file=self.out, flush=True)
        except (OSError, ValueError):
            pass  # a closed terminal must not stop the daemon

    def _signal(self, signum, frame) -> None:
        if signum == signal.SIGHUP:
            self.hup = True
        else:
            self.stopping = True
        try:
            os.write(self._wake_w, b"!")
        except BlockingIOError:
            pass

    # --- running ---------------------------------------------------------------------
    def run(self, handed: dict | None = None) -> int:
        """Serve until SIGTERM or SIGINT; ``handed`` is a restart's state, to serve on."""
        for sig in _SIGNALS:
            signal.signal(sig, self._signal)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)  # a restart blocks them across its execve
        requester = None
        if handed is not None and handed.get("requester") is not None:
            requester = socket.socket(fileno=handed["requester"])
            requester.set_inheritable(False)
        try:
            self.service = Service(_open_token(self.cfg.home, OPEN_SECONDS if handed is not None else 0.0),
                                   syslog=self.cfg.syslog)
            self._owns_paths = True
            self._start(handed)
        except BaseException as e:
            _say(requester, f"fail: the new daemon could not take over: {e}\n")
            if requester is not None:
                requester.close()
            if self.service is not None:
                self._stop()
            raise
        token = self.service.token
        if handed is None:
            self.service.call(lambda: token.audit("serve", pid=os.getpid()))
        else:
            n11 = len(handed["pkcs11"]["connections"]) if handed.get("pkcs11") else 0
            nn = len(handed["native"]["connections"])
            self.service.call(lambda: token.audit("takeover", pid=os.getpid(), old_pid=handed["pid"],
                                                  old_code=handed["code"], code=self.code,
                                                  pkcs11=n11, native=nn))
            msg = (f"ok: restarted: pid {os.getpid()} runs code {self.code} (was {handed['code']}) and "
                   f"took over {n11} PKCS#11 and {nn} native connections")
            self.say(msg)
            _say(requester, msg + "\n")
            if requester is not None:
                requester.close()
        try:
            self._loop()
        finally:
            self._stop()
        return 0

    def _loop(self) -> None:
        while not self.stopping:
            ready = select.select([self._wake_r, self.control], [], [], 1.0)[0]
            if self._wake_r in ready:
                try:
                    while os.read(self._wake_r, 64):
                        pass
                except BlockingIOError:
                    pass
            if self.stopping:
                break
            if self.control in ready:
                self._control_request()
            if self.hup:
                self.hup = False
                self.restart(None)
            if not self.stopping:
                self.service.tick()

    def _control_request(self) -> None:
        try:
            conn, _ = self.control.accept()
        except OSError:
            return
        if not self.control_gate(conn):
            conn.close()
            return
        try:
            conn.settimeout(5)
            data = b""
            while b"\n" not in data and len(data) < 64:
                chunk = conn.recv(64)
                if not chunk:
                    break
                data += chunk
            conn.settimeout(None)
        except OSError:
            conn.close()
            return
        if data.strip() == b"restart":
            self.restart(conn)  # returns only if the restart failed: it has answered
        else:
            _say(conn, "fail: unknown request (known: restart)\n")
        conn.close()

    # --- transports ------------------------------------------------------------------
    def _start(self, handed: dict | None) -> None:
        """Serve every transport: on new sockets, or on those of a restart's ``handed`` state."""
        cfg, svc = self.cfg, self.service
        console_gate = peers.Gate(str(cfg.console_sock))
        native_gate = peers.Gate(str(cfg.native_sock), cfg.gid)
        p11_gate = peers.Gate(str(cfg.p11_sock), cfg.gid) if cfg.p11_sock is not None else None
        if handed is not None:
            for fd in _handover_fds(handed):
                os.set_inheritable(fd, False)
            self.control = socket.socket(fileno=handed["control"])
            self.console = _adopted_server(handed["console"], cfg.console_sock, ConsoleHandler, svc, console_gate)
            self.native = _adopted_server(handed["native"]["listen"], cfg.native_sock, NativeHandler, svc,
                                          native_gate)
            for rec in handed["native"]["connections"]:
                self.native.adopt(socket.socket(fileno=rec["fd"]), rec)
            if cfg.p11_sock is not None:
                from .p11serve import _P11Server
                self.p11 = _P11Server.thaw(svc, cfg.p11_sock, p11_gate, handed["pkcs11"])
            if cfg.pty:
                self.pty = PtyConsole(svc, cfg.home / "console.pty", (handed["pty"]["master"],
                                                                        handed["pty"]["slave"]))
            if cfg.serial_dev:
                self.serial = SerialConsole(svc, cfg.serial_dev, cfg.baud)
            return
        if cfg.socket_dir is not None and not cfg.socket_dir.is_dir():
            cfg.socket_dir.mkdir(parents=True)
            os.chmod(cfg.socket_dir, 0o755)  # signers must reach their sockets; each socket has its own mode
        self.control = _control_listener(cfg.control_sock)
        self.console = _unix_server(cfg.console_sock, ConsoleHandler, svc, mode=0o600, gate=console_gate)
        self.say(f"console on unix:{cfg.console_sock}")
        self.native = _unix_server(cfg.native_sock, NativeHandler, svc, mode=cfg.signer_mode, group=cfg.gid,
                                   gate=native_gate)
        self.say(f"native signing API on unix:{cfg.native_sock}")
        if cfg.p11_sock is not None:
            from .p11serve import start_p11
            self.p11 = start_p11(svc, cfg.p11_sock, mode=cfg.signer_mode, group=cfg.gid, gate=p11_gate)
            self.say(f"PKCS#11 (p11-kit RPC) on unix:path={cfg.p11_sock}")
        for link, target in cfg.links():
            _unlink_stale(link)
            link.symlink_to(target)
        if cfg.pty:
            self.pty = PtyConsole(svc, cfg.home / "console.pty")
            self.say(f"console on pseudo-terminal {self.pty.path} (link {cfg.home / 'console.pty'})")
        if cfg.serial_dev:
            self.serial = SerialConsole(svc, cfg.serial_dev, cfg.baud)
            self.say(f"console on serial {cfg.serial_dev} at {cfg.baud} baud")
        if cfg.gid is not None:
            self.say(f"signer sockets: group {cfg.signer_group} ({cfg.gid}), mode 0660; console: owner only")
        self.say(f"restart (new code, connections kept): cryptobat serve --replace (control unix:{cfg.control_sock})")

    def _stop(self) -> None:
        for s in (self.console, self.native):
            if s is not None:
                s.shutdown()
                s.end_connections()
                s.server_close()
        if self.p11 is not None:
            self.p11.shutdown()
        if self.control is not None:
            self.control.close()
        if self._owns_paths:
            for p in self.cfg.paths():
                if p.exists() or p.is_symlink():
                    p.unlink()
        with self.service.lock:
            token = self.service.token
            try:
                token.audit("stop")
                self.service.close()
            except Exception as e:  # a token a failed restart could not reopen is closed already
                print(f"cryptobat serve: closing the token: {type(e).__name__}: {e}", file=sys.stderr)

    # --- restarting ------------------------------------------------------------------
    def restart(self, requester: socket.socket | None) -> None:
        """Re-execute the daemon with every connection kept; returns only if that failed
        (then everything serves on as before and ``requester`` has been told why)."""
        try:
            check = self._start_check()
        except RestartFailed as e:
            self._failed(requester, str(e))
            return
        try:
            state = self._freeze()
        except RestartFailed as e:
            check.kill()
            check.communicate()
            self._failed(requester, str(e))
            return
        token = self.service.token
        n11 = len(state["pkcs11"]["connections"]) if state.get("pkcs11") else 0
        with self.service.lock:
            try:
                token.audit("restart", pid=os.getpid(), pkcs11=n11, native=len(state["native"]["connections"]))
            except CryptobatError:
                pass
            self.service.close()  # the store lock is free: the check, then the new code, take the token
        try:
            self._finish_check(check, state)
            self._exec(state, requester)
        except RestartFailed as e:
            self._resume(state, str(e), requester)

    def _failed(self, requester: socket.socket | None, why: str) -> None:
        msg = f"fail: not restarted, still serving: {why}"
        print(f"cryptobat serve: {msg}", file=sys.stderr, flush=True)
        _say(requester, msg + "\n")

    def _start_check(self) -> subprocess.Popen:
        """The new code in a child, imported and ready to check a handover (before anything stops)."""
        argv = self.cfg.argv() + ["--takeover-check"]
        try:
            check = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except OSError as e:
            raise RestartFailed(f"cannot run {argv[0]}: {e.strerror}") from None
        if _line(check.stdout.fileno(), time.monotonic() + CHECK_SECONDS) != "ready":
            check.kill()
            _, err = check.communicate()
            raise RestartFailed(f"the new code did not start: {_why(err, 'no answer')}")
        return check

    def _finish_check(self, check: subprocess.Popen, state: dict) -> None:
        """Let the checking child open the token and rebuild every connection from ``state``."""
        try:
            out, err = check.communicate(json.dumps(state).encode(), timeout=CHECK_SECONDS)
        except subprocess.TimeoutExpired:
            check.kill()
            check.communicate()
            raise RestartFailed(f"the new code did not check the handover within {CHECK_SECONDS:.0f} s") from None
        except OSError as e:
            check.kill()
            _, err = check.communicate()
            raise RestartFailed(f"the new code failed: {_why(err, str(e))}") from None
        if check.returncode != 0 or out.decode(errors="replace").split() != ["ok"]:
            raise RestartFailed(f"the new code cannot take over: {_why(err, 'exit status %d' % check.returncode)}")

    def _freeze(self) -> dict:
        """Stop every transport at a message boundary; their state, with every socket detached.

        Raises RestartFailed (with everything serving again) if PKCS#11 or native calls under
        way do not finish within PARK_SECONDS. Console sessions end (with a notice)."""
        svc, cfg = self.service, self.cfg
        deadline = time.monotonic() + PARK_SECONDS
        stoppers = [threading.Thread(target=s.shutdown) for s in (self.console, self.native)]
        for t in stoppers:
            t.start()
        self.native.pause.begin()
        if self.p11 is not None:
            self.p11.pause()
        for t in stoppers:
            t.join()
        native_idle = self.native.wait_idle(max(0.0, deadline - time.monotonic()))
        p11 = self.p11.freeze(max(0.0, deadline - time.monotonic())) if self.p11 is not None else None
        if not native_idle or (self.p11 is not None and p11 is None):
            for rec in self.native.pause.end():
                self.native.adopt(socket.socket(fileno=rec["fd"]), rec)
            if p11 is not None:
                from .p11serve import _P11Server
                self.p11 = _P11Server.thaw(svc, cfg.p11_sock, self.p11_gate(), p11)
            self.console.start()
            self.native.start()
            busy = "native" if not native_idle else "PKCS#11"
            raise RestartFailed(f"{busy} calls under way did not finish within {PARK_SECONDS:.0f} s")
        native_conns = self.native.pause.end()
        self.console.restarting = True
        self.console.end_connections()
        pty = self.pty.stop() if self.pty is not None else None
        if self.serial is not None:
            self.serial.stop()
        self.console.wait_idle(5)  # commands under way finish; a console that does not read is left behind
        state = {
            "format": HANDOVER_FORMAT, "pid": os.getpid(), "code": self.code, "version": __version__,
            "control": self.control.detach(), "console": self.console.socket.detach(),
            "native": {"listen": self.native.socket.detach(), "connections": native_conns},
            "pkcs11": p11, "pty": None if pty is None else {"master": pty[0], "slave": pty[1]},
        }
        self.native.pause.close()  # every native handler has ended (idle); console ones never poll it
        self.console.pause.close()
        self.control = self.console = self.native = self.p11 = self.pty = self.serial = None
        return state

    def p11_gate(self) -> peers.Gate | None:
        cfg = self.cfg
        return peers.Gate(str(cfg.p11_sock), cfg.gid) if cfg.p11_sock is not None else None

    def _exec(self, state: dict, requester: socket.socket | None) -> None:
        """Become the new code, every descriptor of ``state`` kept; raises RestartFailed if not."""
        state = dict(state, requester=requester.fileno() if requester is not None else None)
        try:
            fd = _handover_file(json.dumps(state).encode(), self.cfg.home)
        except OSError as e:
            raise RestartFailed(f"cannot write the handover: {e.strerror}") from None
        keep = _handover_fds(state) + [fd]
        argv = self.cfg.argv() + ["--takeover", str(fd)]
        for f in keep:
            os.set_inheritable(f, True)
        for f in (self.out, sys.stdout, sys.stderr):
            try:
                f.flush()
            except (OSError, ValueError):
                pass
        # SIGTERM from now on stays pending across execve, for the new code to handle
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        why = "asked to stop meanwhile"
        try:
            if not self.stopping:
                os.execv(argv[0], argv)
        except OSError as e:
            why = f"cannot run {argv[0]}: {e.strerror}"
        for f in keep:
            os.set_inheritable(f, False)
        os.close(fd)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
        raise RestartFailed(why)

    def _resume(self, state: dict, why: str, requester: socket.socket | None) -> None:
        """Serve on, in this process, everything ``state`` holds: the restart did not happen."""
        try:
            self.service.token = _open_token(self.cfg.home, OPEN_SECONDS)
        except Exception as e:
            _say(requester, f"fail: {why}; and the token could not be opened again: {e}\n")
            raise
        self._start(state)
        token = self.service.token
        self.service.call(lambda: token.audit("restart-failed", pid=os.getpid(), why=why[:200]))
        self._failed(requester, why)


def _config(home: Path, *, pty: bool = False, serial_dev: str | None = None, baud: int = 115200,
            console_sock: Path | None = None, native_sock: Path | None = None, p11_sock: Path | None = None,
            signer_group: str | None = None, socket_dir: Path | None = None,
            syslog: str | None = None) -> Config:
    gid = None
    if signer_group is not None:
        try:
            gid = peers.group_id(signer_group)
        except KeyError:
            raise CryptobatError(f"no group {signer_group!r} (--signer-group)") from None
    where = socket_dir if socket_dir is not None else home
    return Config(home=home, console_sock=console_sock or where / "console.sock",
                  native_sock=native_sock or where / "native.sock", p11_sock=p11_sock,
                  signer_group=signer_group, gid=gid, socket_dir=socket_dir, pty=pty, serial_dev=serial_dev,
                  baud=baud, syslog=syslog)


def serve(home: Path, *, pty: bool = False, serial_dev: str | None = None, baud: int = 115200,
          console_sock: Path | None = None, native_sock: Path | None = None,
          p11_sock: Path | None = None, signer_group: str | None = None,
          socket_dir: Path | None = None, out=sys.stdout, takeover: int | None = None,
          takeover_check: bool = False, syslog: str | None = None) -> int:
    """Serve ``home``'s token until SIGTERM or SIGINT (SIGHUP restarts it, see the module docstring).

    ``p11_sock`` None serves no PKCS#11. ``signer_group``: the native and PKCS#11 sockets
    become 0660 in that group (the daemon's user must be a member). ``socket_dir``: sockets
    without an explicit path go there instead of the home, with links to them in the home
    (for ``cryptobat console`` and clients that look in the home). ``takeover`` (a descriptor
    of a restart's state) and ``takeover_check`` are for the daemon's own restarts. ``syslog``:
    the Unix socket refusals are logged to (``/dev/log`` for syslog/journald), one line an audit
    entry that records refusals.
    """
    cfg = _config(home, pty=pty, serial_dev=serial_dev, baud=baud, console_sock=console_sock,
                  native_sock=native_sock, p11_sock=p11_sock, signer_group=signer_group, socket_dir=socket_dir,
                  syslog=syslog)
    if takeover_check:
        return check_takeover(cfg)
    handed = _read_handover(takeover) if takeover is not None else None
    if handed is not None:
        problem = _handover_problem(handed, cfg)
        if problem:
            raise CryptobatError(problem)
    return Daemon(cfg, out).run(handed)


def check_takeover(cfg: Config, inp=None, out=None) -> int:
    """``serve --takeover-check``: the new code, before it replaces a running daemon.

    Says ``ready`` once imported; then reads the old daemon's state (JSON, on stdin, after it
    closed the token), opens the token, rebuilds every connection from the state (without
    their sockets), closes the token and says ``ok``. Anything else is a reason not to restart.
    """
    inp = inp or sys.stdin.buffer
    out = out or sys.stdout
    from . import p11serve  # everything the PKCS#11 side needs, imported now
    out.write("ready\n")
    out.flush()
    state = json.loads(inp.read())
    problem = _handover_problem(state, cfg)
    if problem:
        raise CryptobatError(problem)
    token = _open_token(cfg.home, OPEN_SECONDS)
    try:
        svc = Service(token)
        if state.get("pkcs11") is not None:
            p11serve.check_connections(svc, state["pkcs11"])
        for rec in state["native"]["connections"]:
            bool(rec["logged_in"]), base64.b64decode(rec["buffer"], validate=True), int(rec["fd"])
    finally:
        token.close()
    out.write("ok\n")
    out.flush()
    return 0


def replace(home: Path, out=sys.stdout, timeout: float = 300.0) -> int:
    """``cryptobat serve --replace``: restart the daemon serving ``home`` (new code, connections kept).

    Prints the daemon's answer; 0 if it restarted, 1 if not (it then serves on as it was)."""
    path = home / "control.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
    except OSError as e:
        s.close()
        raise CryptobatError(f"no daemon to replace: cannot connect to {path}: {e.strerror}") from None
    try:
        s.sendall(b"restart\n")
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    except OSError as e:
        data = f"fail: no answer from the daemon: {e}\n".encode()
    finally:
        s.close()
    text = data.decode(errors="replace").strip() or "fail: the daemon ended the request without an answer"
    print(text, file=out)
    return 0 if text.splitlines()[-1].startswith("ok") else 1
