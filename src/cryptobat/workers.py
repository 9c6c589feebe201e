"""Signing worker processes: an adapter's way to spread large batches over every core.

The token signs in-process (:func:`cryptobat.signing.run`); the daemon and the embedded
client start an :class:`Engine` (``home.open_engine``) whose workers run that same
function, so each payload still passes :func:`cryptobat.policy.check` first.
Worker processes hold unsealed keys, so they live no longer than they must:

- They die with the token's process, however it ends (``kill -9`` included):
  each asks the kernel for SIGKILL when its parent dies (``PR_SET_PDEATHSIG``)
  and also leaves when its request pipe, whose other end only the token's
  process holds, reaches end of file. The parent-death signal follows the
  *thread* that started the process, so one thread of the engine's own
  (:class:`_Keeper`), which lives as long as the workers, starts them all;
  never a caller's thread (a daemon connection's thread ends with the
  connection). They are plain ``python -P -c`` children of the token's process
  (nothing imported from the current directory): no fork server, no resource
  tracker, nothing else that could outlive it. Start-up costs about what the
  fork server's did (an interpreter and the imports, once per worker).
- They hold little: at most :data:`WORKER_KEYS` unsealed keys, each dropped
  after :data:`KEY_IDLE` seconds unused; with the last one they drop the
  custody too (it is opened again, from the home, for the next batch).
- They stop after :data:`WORKER_IDLE` seconds without a batch.

One large batch at a time runs on the workers (each uses them all); small
ones, and the token's own single signatures, are signed in-process, unless the
caller asks to ``spread`` them: then each goes to a worker free at that moment
(signing in a caller's thread holds the GIL, so it stalls the caller's process;
the PKCS#11 loop asks for this for RSA while several clients sign at once).
"""
from __future__ import annotations

import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable, Sequence

from .api import SignResult
from .custody import Custody
from .errors import CryptobatError
from .signing import KEY_IDLE, PARALLEL_MIN, Job, KeyCache, narrowed, results, run, signatures  # noqa: F401  (PARALLEL_MIN re-exported)
WORKER_KEYS = 8  # unsealed keys a worker process keeps at most
WORKER_IDLE = 600.0  # seconds without a batch after which the worker processes stop


# --- frames between the token's process and its workers ----------------------------
_LEN = struct.Struct("!Q")
PIPE_SIZE = 1 << 20  # bytes a pipe to or from a worker holds (Linux's default limit for a user)
QUEUED_FRAME = PIPE_SIZE // 4  # a part this small may wait in a busy worker's pipe


def _frame(obj) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def _write_body(fd: int, body: bytes) -> None:
    for data in (memoryview(_LEN.pack(len(body))), memoryview(body)):
        while data:
            data = data[os.write(fd, data):]


def _write_frame(fd: int, obj) -> None:
    _write_body(fd, _frame(obj))


def _grow_pipe(fd: int) -> bool:
    """Give the pipe of ``fd`` :data:`PIPE_SIZE` bytes; False where the system refuses (or is not Linux)."""
    try:
        import fcntl
        return fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE) >= PIPE_SIZE
    except (ImportError, AttributeError, OSError):
        return False


def _read_exact(fd: int, n: int) -> bytearray | None:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = os.readv(fd, [view[got:]])
        if not k:
            return None
        got += k
    return buf


def _read_frame(fd: int):
    """The next object from ``fd``, or None at end of file (also inside a frame)."""
    head = _read_exact(fd, _LEN.size)
    if head is None:
        return None
    body = _read_exact(fd, _LEN.unpack(head)[0])
    return None if body is None else pickle.loads(body)


def _wait_readable(fds, timeout: float | None) -> list[int]:
    p = select.poll()
    for fd in fds:
        p.register(fd, select.POLLIN)
    return [fd for fd, _ in p.poll(None if timeout is None else int(timeout * 1000))]


# --- worker processes -------------------------------------------------------
_PR_SET_PDEATHSIG = 1


def die_with_parent(ppid: int) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux); exit now if it already has."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except Exception:
            pass  # the request pipe's end of file still ends the worker
    if os.getppid() != ppid:  # the parent died before the signal was armed
        os._exit(0)


def _worker_run(cache: KeyCache, job: Job) -> tuple[list[bytes | None], dict[int, str]]:
    """Results in a compact, fast-to-pickle form: the signatures (None where refused)
    and the refusal reasons by position; :func:`cryptobat.signing.results` rebuilds the SignResults."""
    return signatures(cache, job)


def _worker_main(rfd: int, wfd: int, ppid: int) -> None:
    """A worker: read the custody factory and home, then jobs; answer each; leave at end of file."""
    die_with_parent(ppid)  # (SIGINT is ignored from the first line: a terminal's ^C is for the token)
    try:
        init = _read_frame(rfd)
        if init is None:
            return
        factory, home = init
        cache = KeyCache(None, size=WORKER_KEYS, opener=lambda: factory(Path(home)))
        _write_frame(wfd, ("ready", None))
        while True:
            if not _wait_readable([rfd], KEY_IDLE / 2):
                cache.expire()  # idle: unsealed keys (and then the custody) go after KEY_IDLE
                continue
            job = _read_frame(rfd)
            if job is None:
                return
            try:
                answer = ("ok", _worker_run(cache, job))
            except CryptobatError as e:
                answer = ("error", str(e))
            except Exception as e:  # reported by the token as a failed batch
                answer = ("failed", f"{type(e).__name__}: {e}")
            del job
            _write_frame(wfd, answer)
    except (BrokenPipeError, ConnectionResetError):
        return  # the token's process is gone


# run with -P: nothing is imported from the current directory; the package from where the token's is
_BOOT = ("import signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
         "{root!r} in sys.path or sys.path.insert(0, {root!r}); "
         "from cryptobat.workers import _worker_main; _worker_main(*map(int, sys.argv[1:4])); "
         "import os; os._exit(0)")


class _WorkerFailed(Exception):
    pass


class _Worker:
    """One worker process and its two pipes (the token's ends)."""

    def __init__(self, factory, home: str) -> None:
        to_child, from_parent = os.pipe()
        to_parent, from_child = os.pipe()
        root = str(Path(__file__).resolve().parents[1])
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-P", "-c", _BOOT.format(root=root), str(to_child), str(from_child), str(os.getpid())],
                pass_fds=(to_child, from_child), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                close_fds=True)
        except BaseException:
            for fd in (to_child, from_parent, to_parent, from_child):
                os.close(fd)
            raise
        os.close(to_child)
        os.close(from_child)
        self.w, self.r = from_parent, to_parent
        self.ready = False
        # with room for two parts in its request pipe, a worker finds its next part waiting
        # when it finishes one, instead of waiting for this process to read the answer and
        # send another (this process is busy too: a zone's walk holds the GIL)
        self.roomy = _grow_pipe(from_parent) and _grow_pipe(to_parent)
        try:
            _write_frame(self.w, (factory, home))
        except OSError:
            pass  # seen as a failed worker at its first batch

    def send(self, body: bytes) -> None:
        """Send a pickled job (:func:`_frame`)."""
        try:
            _write_body(self.w, body)
        except OSError as e:
            raise _WorkerFailed(self._why(e)) from None

    def recv(self):
        while True:
            try:
                msg = _read_frame(self.r)
            except OSError as e:
                raise _WorkerFailed(self._why(e)) from None
            except Exception as e:
                raise _WorkerFailed(f"bad answer from worker {self.proc.pid}: {e}") from None
            if msg is None:
                raise _WorkerFailed(self._why(None))
            if msg[0] == "ready":
                self.ready = True
                continue
            if msg[0] == "error":
                raise CryptobatError(msg[1])
            if msg[0] == "failed":
                raise _WorkerFailed(f"worker process {self.proc.pid}: {msg[1]}")
            return msg[1]

    def wait_ready(self) -> None:
        if not self.ready:
            msg = _read_frame(self.r)
            if msg is None or msg[0] != "ready":
                raise _WorkerFailed(self._why(None))
            self.ready = True

    def _why(self, e: OSError | None) -> str:
        try:
            code = self.proc.wait(timeout=1)
        except subprocess.TimeoutExpired:
            code = None
        what = f"exited with status {code}" if code is not None and code >= 0 else \
            f"killed by signal {-code}" if code is not None else f"stopped answering ({e})"
        return f"worker process {self.proc.pid} {what}"

    def close(self) -> None:
        """Close the pipes: at end of file the worker leaves (a busy one when its batch is done)."""
        for fd in (self.w, self.r):
            try:
                os.close(fd)
            except OSError:
                pass

    def reap(self, timeout: float) -> None:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _split(n: int, workers: int) -> list[tuple[int, int]]:
    """[start, end) of the parts of an ``n``-item batch: four a worker, the last ones a quarter
    of that, so that the workers finish the batch close together."""
    big = -(-n // (workers * 4))
    small = max(1, big // 4)
    tail = max(0, n - workers * big)
    out = [(i, min(i + big, tail)) for i in range(0, tail, big)]
    return out + [(i, min(i + small, n)) for i in range(tail, n, small)]


def _stop_workers(workers: Sequence[_Worker], timeout: float = 2.0) -> None:
    for w in workers:
        w.close()
    deadline = time.monotonic() + timeout
    for w in workers:
        w.reap(max(0.0, deadline - time.monotonic()))


class _Keeper:
    """The one thread that starts the worker processes, and stops them once idle.

    A worker's parent-death signal fires when the *thread* that started it ends, so every
    worker is started here, by a thread that lives until :meth:`stop`, whichever thread
    asked for the workers."""

    def __init__(self, engine: "Engine") -> None:
        self._engine = engine
        self._cond = threading.Condition()
        self._calls: list = []
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="cryptobat-workers", daemon=True)
        self._thread.start()

    def call(self, fn: Callable):
        """Run ``fn`` on the keeper thread; its result, or its exception raised here."""
        box: list = []
        done = threading.Event()
        with self._cond:
            self._calls.append((fn, box, done))
            self._cond.notify()
        done.wait()
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._calls and not self._stopping:
                    if not self._cond.wait(timeout=min(KEY_IDLE, WORKER_IDLE) / 2):
                        break
                if self._stopping and not self._calls:
                    return
                calls, self._calls = self._calls, []
            for fn, box, done in calls:
                try:
                    box.append((True, fn()))
                except BaseException as e:
                    box.append((False, e))
                done.set()
            self._engine._idle_check()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join()


class Engine:
    """Signs batches, in-process for small ones and across worker processes for large ones."""

    def __init__(self, custody: Custody, custody_factory, home: Path, workers: int | None = None,
                 cache: KeyCache | None = None, parallel: bool | None = None) -> None:
        self.cache = cache if cache is not None else KeyCache(custody)  # a token's own: keys unsealed once
        self.custody = custody  # the custody its workers open again (a migration replaces the engine)
        self._factory = custody_factory
        self._home = str(home)
        self.workers = (os.cpu_count() or 1) if workers is None else workers
        # a custody holding one device session (a TPM, an HSM login) is not opened again in
        # worker processes: its device does the work, so the token signs in its own process
        if not (getattr(custody, "parallel", True) if parallel is None else parallel):
            self.workers = 1
        self._pool: list[_Worker] | None = None
        self._keeper: _Keeper | None = None
        self._lock = threading.Lock()  # one batch at a time on the workers; guards the pool
        self._returned = threading.Condition(self._lock)  # a lent worker came back
        self._lent: set[_Worker] = set()  # workers signing a spread job now (see run)
        self._batch_waiting = False  # a batch waits for the lent workers: lend no more
        self._last_used = time.monotonic()

    def _start(self) -> list[_Worker]:
        """The worker processes (started on the keeper thread); called with ``_lock`` held."""
        if self._pool is not None and not self._lent and (
                len(self._pool) < self.workers or any(w.proc.poll() is not None for w in self._pool)):
            self._stop_pool()  # a worker died while idle (the OOM killer, an operator): start afresh
        if self._pool is None:
            if self._keeper is None:
                self._keeper = _Keeper(self)

            def start() -> list[_Worker]:
                started: list[_Worker] = []
                try:
                    for _ in range(self.workers):
                        started.append(_Worker(self._factory, self._home))
                except BaseException:
                    _stop_workers(started)
                    raise
                return started

            self._pool = self._keeper.call(start)
        self._last_used = time.monotonic()
        return self._pool

    def _stop_pool(self) -> None:
        pool, self._pool = self._pool, None
        _stop_workers(pool or ())

    def _idle_check(self) -> None:
        """On the keeper thread: stop idle workers, drop idle keys."""
        self.cache.expire()
        if self._lock.acquire(blocking=False):
            try:
                if self._pool is not None and not self._lent and time.monotonic() - self._last_used > WORKER_IDLE:
                    self._stop_pool()
            finally:
                self._lock.release()

    def run(self, job: Job, spread: bool = False) -> list[SignResult]:
        """Sign ``job``: across the workers if large; a small one here, or with ``spread`` in a
        worker free now (here if none is: a batch has them all, or every one is lent)."""
        n = len(job.items)
        if self.workers <= 1 or n < PARALLEL_MIN:
            if spread and self.workers > 1 and n:
                out = self._run_lent(job)
                if out is not None:
                    return out
            return run(self.cache, job)
        parts = [_frame(Job(job.policy, job.now, job.keys, job.items[i:j])) for i, j in _split(n, self.workers)]
        with self._lock:
            if self._lent:  # lent workers finish their job first: their pipes are theirs till then
                self._batch_waiting = True
                try:
                    self._returned.wait_for(lambda: not self._lent)
                finally:
                    self._batch_waiting = False
            try:
                pool = self._start()
            except OSError as e:  # no worker processes to be had: sign here
                print(f"cryptobat: cannot start signing workers ({e.strerror or e}); signing in-process",
                      file=sys.stderr)
                return run(self.cache, job)
            try:
                answers = self._map(pool, parts)
            except _WorkerFailed as e:  # a broken worker must not take the token down
                self._stop_pool()
                raise CryptobatError(f"signing worker failed: {e}") from None
            except BaseException:
                self._stop_pool()  # the workers' pipes may hold half a frame
                raise
            finally:
                self._last_used = time.monotonic()
        out: list[SignResult] = []
        for part in answers:
            out.extend(results(part))
        return out

    def _run_lent(self, job: Job) -> list[SignResult] | None:
        """``job`` signed by one worker not busy now, or None if there is none to have."""
        if not self._lock.acquire(blocking=False):  # a batch is running (or starting workers)
            return None
        try:
            if self._batch_waiting:
                return None
            pool = self._pool  # (a worker that died is found by its pipes, and the pool restarted)
            if pool is None:
                try:
                    pool = self._start()
                except OSError:
                    return None
            self._last_used = time.monotonic()
            w = next((w for w in pool if w not in self._lent), None)
            if w is None:
                return None
            self._lent.add(w)
        finally:
            self._lock.release()
        ok = False
        try:
            w.send(_frame(narrowed(job)))
            part = w.recv()
            ok = True
        except _WorkerFailed as e:
            raise CryptobatError(f"signing worker failed: {e}") from None
        except CryptobatError:
            ok = True  # the worker answered with a refusal of the whole job: it is fine
            raise
        finally:
            with self._lock:
                self._lent.discard(w)
                self._last_used = time.monotonic()
                if not ok and self._pool is not None and w in self._pool:  # its pipes may hold half a frame
                    self._pool.remove(w)  # the pool is started afresh once nothing is lent
                self._returned.notify_all()
            if not ok:
                _stop_workers([w])
        return results(part)

    @staticmethod
    def _map(pool: list[_Worker], parts: list[bytes]) -> list:
        """Each part to a free worker, the answers in order.

        A worker whose pipes could be enlarged has a second part queued behind the one it
        signs, if that part is small enough that writing it never blocks: this thread then
        never waits on a worker while another waits on it."""
        results: list = [None] * len(parts)
        todo = deque(range(len(parts)))
        queues = {w.r: (w, deque()) for w in pool}

        def feed(w: _Worker, queue: deque, depth: int) -> None:
            while todo and len(queue) < depth:
                i = todo[0]
                if queue and not (w.roomy and len(parts[i]) <= QUEUED_FRAME):
                    return
                todo.popleft()
                w.send(parts[i])
                queue.append(i)

        for depth in (1, 2):  # every worker starts on a part before any has a second one
            for w, queue in queues.values():
                feed(w, queue, depth)
        busy = {fd: wq for fd, wq in queues.items() if wq[1]}
        while busy:
            for fd in _wait_readable(busy, None):
                w, queue = busy[fd]
                results[queue.popleft()] = w.recv()
                feed(w, queue, 2)
                if not queue:
                    del busy[fd]
        return results

    def warm(self) -> None:
        """Start the worker processes now (e.g. while a caller prepares its first batch)."""
        if self.workers > 1:
            with self._lock:
                try:
                    for w in self._start():
                        w.wait_ready()
                except Exception:  # the first real batch reports any failure
                    self._stop_pool()

    def close(self) -> None:
        with self._lock:
            self._stop_pool()
            keeper, self._keeper = self._keeper, None
        if keeper is not None:
            keeper.stop()
        self.cache.clear()
