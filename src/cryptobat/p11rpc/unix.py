"""Socket and stdio front ends: one :class:`Connection` per client, threads for concurrency."""
from __future__ import annotations

import errno
import os
import select
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
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
        while True:  # a batch at a time: each is sent (the send waits for the client) before the next
            if out:
                send(out)
            if not conn.ready():
                break
            out = conn.feed(b"")


def _client(sock: socket.socket, src: BackendSource, lock: Any) -> None:
    with sock:
        try:
            conn = Connection(_backend(src), _locker(lock))
            serve_connection(conn, lambda: sock.recv(65536), sock.sendall)
        except OSError:
            pass


BACKLOG = 1024  # listen() queue: a burst of clients connecting at once must not be refused
MAX_PEERS = int(os.environ.get("CRYPTOBAT_P11_MAX_CONNECTIONS", "256"))  # beyond: accepted, closed at once
ACCEPT_PAUSE = 0.1  # out of descriptors: the listener is not polled for this long (it would stay readable)
# after the last message, poll this long before sleeping (see serve_unix); off by default
SPIN_SECONDS = float(os.environ.get("CRYPTOBAT_P11_SPIN_US", "0")) / 1e6
# helper threads that make slow-key signatures (RSA) while other clients sign too; 0 (env
# CRYPTOBAT_P11_SIGNING_THREADS) signs them all on the loop, as one client's always are
SIGNING_THREADS = int(os.environ.get("CRYPTOBAT_P11_SIGNING_THREADS", str(max(2, os.cpu_count() or 1))))
_helper = threading.local()


def in_helper() -> bool:
    """Whether this thread is one of :func:`serve_unix`'s helpers, not its event loop: work done
    here stalls no other client, unless it holds the GIL (a backend may sign elsewhere)."""
    return getattr(_helper, "on", False)


class _Peer:
    __slots__ = ("sock", "fd", "conn", "out", "busy")

    def __init__(self, sock: socket.socket, conn: Connection) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.conn = conn
        self.out = b""  # reply bytes the socket has not taken yet
        self.busy = False  # a slow call is running in a helper thread


class Handover:
    """Asks a :func:`serve_unix` loop to stop at a message boundary and give up its clients.

    :meth:`request` makes the loop stop accepting and reading, wait for the slow calls still
    running in helper threads, and return without closing anything: :attr:`listener` and
    :attr:`peers` (each ``(socket, Connection, reply bytes not yet sent)``; a partly received
    frame stays in the Connection) are then set and :attr:`done` is set. :meth:`cancel`
    before that makes the loop serve on as before. Each client's replies to every request
    it sent before the stop are in its Connection's answers or in the unsent bytes.
    """

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self.requested = False
        self.cancelled = False
        self.done = threading.Event()
        self.resumed = threading.Event()
        self.listener: socket.socket | None = None
        self.peers: list[tuple[socket.socket, Connection, bytes]] = []

    def request(self) -> None:
        self.done.clear()
        self.resumed.clear()
        self.cancelled = False
        self.requested = True
        self._poke()

    def cancel(self) -> None:
        self.cancelled = True
        self._poke()

    def wait(self, timeout: float) -> bool:
        """True once the loop has handed over; False if it did not within ``timeout`` and was
        cancelled (it serves on). A loop that handed over just as it was cancelled still counts."""
        if self.done.wait(timeout):
            return True
        self.cancel()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.done.wait(0.05):
                return True
            if self.resumed.is_set():
                return False
        return self.done.is_set()

    def _poke(self) -> None:
        try:
            os.write(self._w, b"!")
        except BlockingIOError:
            pass

    def _drain(self) -> None:
        try:
            while os.read(self._r, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass


def listen_unix(path: str, mode: int = 0o600, group: int | None = None) -> socket.socket:
    """A listening Unix socket at ``path`` with ``mode`` and ``group`` set before listen(),
    so no client connects while it still has the umask's mode."""
    if os.path.exists(path) or os.path.islink(path):
        os.unlink(path)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        srv.bind(path)
        os.chmod(path, mode)
        if group is not None:
            os.chown(path, -1, group)
        srv.listen(BACKLOG)
    except BaseException:
        srv.close()
        if os.path.exists(path):
            os.unlink(path)
        raise
    return srv


def serve_unix(path: str, backend: BackendSource, lock: Any = None,
               ready: threading.Event | None = None, stop: threading.Event | None = None,
               spin: float = SPIN_SECONDS, *, mode: int = 0o600, group: int | None = None,
               gate: Callable[[socket.socket], bool] | None = None,
               listener: socket.socket | None = None, handover: Handover | None = None,
               adopt: list[tuple[socket.socket, Connection, bytes]] = ()) -> None:
    """Serve p11-kit clients on a Unix socket at ``path`` until ``stop`` is set.

    ``backend`` is a Backend or a factory called once per client; ``lock`` (e.g. a
    threading.Lock) serializes backend calls across clients. The socket gets ``mode``
    and ``group`` (or ``listener``, from :func:`listen_unix`, is used as it is);
    ``gate(sock)`` decides for each accepted client whether it is served or closed at once.

    One thread runs an epoll loop over every client: with the GIL, one thread handling
    ready sockets in turn beats a thread per client (no GIL hand-offs, no thread wake-ups).
    Calls that can take long (C_Login's scrypt, key generation, store writes for key
    deletion, large random requests; :meth:`Connection.slow`) run in a helper thread while
    that client's socket is out of the loop, so they never stall other clients.  Sockets
    are non-blocking: a client that does not read its replies only stops being read from.
    A C_Sign that makes an RSA signature (:meth:`Connection.signs_slowly`) runs in one of
    :data:`SIGNING_THREADS` helper threads when another client is connected (alone, the
    hand-off would only add latency): the loop serves the others meanwhile, and the backend
    signs there (the GIL released) or in another process (:func:`in_helper`).  Waiting until
    another client had a signature under way, as before, let two clients' signatures take
    turns on the loop: 660 against 858 sig/s at 2 clients.
    A client that pipelines many requests is answered a bounded batch at a time
    (``server.BATCH`` frames, about ``server.TURN_BYTES`` of replies): its further frames
    wait, unread and unanswered, until the replies so far are sent, so its unsent replies
    never exceed one batch. Batches of more than one frame run in a helper thread.
    At most :data:`MAX_PEERS` clients at once; more are closed as soon as accepted.
    When no socket is ready the loop may poll for up to ``spin`` seconds before it sleeps
    (default 0, env CRYPTOBAT_P11_SPIN_US): on an idle 2-vCPU VM a sleeping thread's wake-up
    costs ~25 us per round trip, but on a loaded machine the spinning steals CPU from the
    clients and measured slower, so it is off unless asked for.

    ``handover`` lets another thread stop the loop at a message boundary and take its clients
    (see :class:`Handover`); ``adopt`` are clients such a handover gave, served on from where
    they were (their unsent reply bytes are sent first).
    """
    srv = listener if listener is not None else listen_unix(path, mode, group)
    srv.setblocking(False)
    ep = select.epoll()
    ep.register(srv.fileno(), select.EPOLLIN)
    peers: dict[int, _Peer] = {}
    todo: set[int] = set()  # peers with complete frames buffered and nothing unsent: a batch each loop turn
    listening = True
    resume_at = 0.0  # when to poll the listener again after running out of descriptors
    IN, OUT = select.EPOLLIN, select.EPOLLOUT
    poll = ep.poll
    clock = time.perf_counter

    def close(p: _Peer) -> None:
        peers.pop(p.fd, None)
        todo.discard(p.fd)
        try:
            ep.unregister(p.fd)
        except (OSError, ValueError):
            pass
        p.sock.close()

    def send(p: _Peer, out: bytes) -> None:
        """Send what the socket takes now; keep the rest and wait for EPOLLOUT (not reading meanwhile)."""
        try:
            n = p.sock.send(out)
        except BlockingIOError:
            n = 0
        except OSError:
            close(p)
            return
        if n < len(out):
            p.out = out[n:]
            ep.modify(p.fd, OUT)
        elif p.conn.closed:
            close(p)

    signers: list[ThreadPoolExecutor] = []  # the helpers for slow-key signatures, made when first needed

    def turn(p: _Peer, data: bytes = b"") -> None:
        """Answer one batch of what ``p`` sent (``data`` and its buffer): here, or in a helper thread."""
        todo.discard(p.fd)
        if p.conn.slow(data):
            ep.unregister(p.fd)
            p.busy = True
            threading.Thread(target=slow, args=(p, data), name="pkcs11-slow", daemon=True).start()
            return
        if SIGNING_THREADS > 0 and len(peers) > 1 and data and p.conn.signs_slowly(data):
            if not signers:
                signers.append(ThreadPoolExecutor(SIGNING_THREADS, thread_name_prefix="pkcs11-sign"))
            ep.unregister(p.fd)
            p.busy = True
            signers[0].submit(slow, p, data)
            return
        out = p.conn.feed(data)
        if out:
            send(p, out)
        elif p.conn.closed:
            close(p)
        if p.fd in peers and not p.out and p.conn.ready():
            todo.add(p.fd)  # more frames buffered: the next batch in the next loop turn

    def listen_off() -> None:
        nonlocal listening
        if listening:
            listening = False
            try:
                ep.unregister(srv.fileno())
            except (OSError, ValueError):
                pass

    def listen_on() -> None:
        nonlocal listening, resume_at
        resume_at = 0.0
        if not listening:
            listening = True
            try:
                ep.register(srv.fileno(), IN)
            except FileExistsError:
                pass

    def slow(p: _Peer, data: bytes) -> None:
        _helper.on = True
        mask = OUT
        try:
            p.out = p.conn.feed(data)
            if p.out and not p.conn.closed and (handover is None or not handover.requested):
                try:  # the reply at once, if the socket takes it: no loop turn just to send it
                    p.out = p.out[p.sock.send(p.out):]
                except BlockingIOError:
                    pass
                except OSError:
                    pass  # the loop finds the socket broken
                if not p.out and not p.conn.ready():
                    mask = IN
        finally:
            try:
                ep.register(p.fd, mask)  # OUT: the loop sends the reply (or answers buffered frames), then reads
            except (OSError, ValueError):
                p.sock.close()
            p.busy = False  # only now: a handover waits for this, and the reply is in p.out
            if handover is not None and handover.requested:
                handover._poke()

    for sock, conn, unsent in adopt:
        sock.setblocking(False)
        p = _Peer(sock, conn)
        p.out = unsent
        peers[p.fd] = p
        ep.register(p.fd, OUT if unsent else IN)
        if not unsent and conn.ready():
            todo.add(p.fd)
    wake = -1
    if handover is not None:
        wake = handover._r
        ep.register(wake, IN)
    pausing = False
    handed = False

    def pause() -> None:
        """Stop accepting and reading; replies of slow calls still to come wait in p.out."""
        listen_off()
        for p in peers.values():
            if not p.busy:
                try:
                    ep.unregister(p.fd)
                except (OSError, ValueError):
                    pass

    def unpause() -> None:
        listen_on()
        for p in list(peers.values()):
            if not p.busy:
                try:
                    ep.register(p.fd, OUT if p.out else IN)
                except FileExistsError:
                    ep.modify(p.fd, OUT if p.out else IN)

    if ready is not None:
        ready.set()
    try:
        while stop is None or not stop.is_set():
            if handover is not None and (pausing or handover.requested):
                if handover.cancelled:
                    handover.requested = handover.cancelled = False
                    if pausing:
                        pausing = False
                        unpause()
                    handover.resumed.set()
                elif not pausing:
                    pausing = True
                    pause()
                if pausing and not any(p.busy for p in peers.values()):
                    for p in list(peers.values()):
                        if p.conn.closed and not p.out:
                            close(p)
                    handover.listener = srv
                    handover.peers = [(p.sock, p.conn, p.out) for p in peers.values()]
                    handed = True
                    return
            if resume_at and not pausing and clock() >= resume_at:
                listen_on()
            if todo and not pausing:  # buffered frames to answer: only look, do not wait
                events = poll(0)
            else:  # one epoll_wait per wake-up (no non-blocking look first: a system call per message)
                events = []
                if spin > 0 and peers:
                    until = clock() + spin
                    while not events and clock() < until:
                        events = poll(0)
                if not events:
                    events = poll(min(0.2, max(0.0, resume_at - clock())) if resume_at else 0.2)
            for fd, ev in events:
                if fd == wake:
                    handover._drain()
                    continue
                p = peers.get(fd)
                if pausing:  # only a slow call's reply can be due: it stays in p.out for the handover
                    if p is not None:
                        try:
                            ep.unregister(fd)
                        except (OSError, ValueError):
                            pass
                    continue
                if p is None:
                    if fd == srv.fileno():
                        while True:
                            try:
                                sock, _ = srv.accept()
                            except (BlockingIOError, InterruptedError):
                                break
                            except OSError as e:
                                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                                    # out of descriptors: leave it queued, serve the others, and do
                                    # not poll the (still readable) listener for a while
                                    listen_off()
                                    resume_at = clock() + ACCEPT_PAUSE
                                break
                            if len(peers) >= MAX_PEERS or (gate is not None and not gate(sock)):
                                sock.close()
                                continue
                            sock.setblocking(False)
                            try:
                                p = _Peer(sock, Connection(_backend(backend), _locker(lock)))
                            except Exception:
                                sock.close()
                                raise
                            peers[p.fd] = p
                            ep.register(p.fd, IN)
                    continue
                if ev & OUT:  # registered for writing: flush, then read again (or close)
                    if p.out:
                        out, p.out = p.out, b""
                        send(p, out)
                    if not p.out and p.fd in peers:
                        if p.conn.closed:
                            close(p)
                        else:
                            ep.modify(p.fd, IN)
                            if p.conn.ready():
                                todo.add(p.fd)
                    continue
                if p.out:
                    if ev & (select.EPOLLHUP | select.EPOLLERR):
                        close(p)
                    continue
                if fd in todo:  # its buffered frames first: not read from meanwhile
                    continue
                try:
                    data = p.sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    close(p)
                    continue
                if not data:
                    close(p)
                    continue
                turn(p, data)
            if todo and not pausing:
                for fd in list(todo):
                    p = peers.get(fd)
                    if p is None or p.out:
                        todo.discard(fd)
                    elif not p.busy:  # busy: its helper thread is just finishing (see slow)
                        turn(p)
    finally:
        for pool in signers:
            pool.shutdown(wait=False)
        if handed:
            ep.close()
            handover.done.set()
        else:
            for p in list(peers.values()):
                if not p.busy:
                    close(p)
            ep.close()
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
