"""``cryptobat signzone --zones LIST``: many zones signed in one process, the token opened once.

A hoster's thousands of small zones each cost a dnssec-signzone run its start-up
(interpreter, imports, opening the token, reading its keys); here they pay it once.
Each zone is still one :func:`cryptobat.signzone.sign_zone` run with its own options,
its signatures checked by the token's policy one by one (``client.timed_sign``), its
output written atomically (:class:`~.output.Output`); what one zone does wrong (its
file, its keys, a refusal, its output) fails that zone alone, with one ``ZONE: error``
line. A failure of the token itself (its store, its integrity, the daemon gone) ends
the run, as it would end every zone after it.

LIST is a directory (every zone file in it, by name) or a list file, one zone per line
as dnssec-signzone's arguments (:func:`read_list`).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass

from ..errors import CryptobatError
from . import output
from .fatal import PROG, Fatal
from .reader import ZoneError

MAX_STATUS = 100  # the exit status is the number of zones that failed, at most this
STOPPED = 101  # the exit status of a run the token's failure (or absence) ended
IN_FLIGHT = 48  # zones being signed at once (their requests go to the token together) ...
BYTES_IN_FLIGHT = 16 << 20  # ... while their files add up to at most this (or it is one zone)
GROUP = 4096  # signing requests a call to the token waits for, unless every zone in flight has asked
GROUP_WAIT = 0.05  # seconds the oldest request waits at most for the others
POOL_ZONES = 8  # zones to verify (without -P) from which the run starts verification processes
ZONE_SUFFIX = ".zone"
# names in a zone directory that are not zone files: outputs, BIND's own files, editors' and ours
_SKIP_SUFFIXES = (".signed", ".jnl", ".key", ".private", ".tmp", ".swp", ".bak", "~")
_SKIP_PREFIXES = (".", "#", "dsset-", "keyset-")
# options that name one zone's files, or the token: per zone in a list file / once on the command line
_PER_ZONE = (("-o", "origin"), ("-f", "output"), ("-k", "ksk"))
_PER_RUN = ("hsm", "home", "pin_file")
_TEMP = re.compile(r"\.(.+)\.[a-z0-9_]{8}\.tmp\Z")  # output.create_temp's names


class LineError(Exception):
    """A list file line that is not a valid argument list."""


class _LineParser(argparse.ArgumentParser):
    """The single-zone parser, raising instead of printing usage and exiting."""

    def error(self, message: str):
        raise LineError(message)

    def exit(self, status: int = 0, message: str | None = None):
        raise LineError((message or "").strip() or "no zone here")


@dataclass
class Zone:
    """One zone of the run: where it was listed, and its options or why it has none."""

    where: str  # LIST:LINE, or the file in a directory
    args: argparse.Namespace | None
    error: str | None = None

    @property
    def name(self) -> str:
        """The zone as its error line names it: its origin, else its file, else its line."""
        if self.args is None:
            return self.where
        if self.args.origin:
            return self.args.origin.rstrip(".") or "."
        return _origin_of(self.args.zonefile)


def _origin_of(path: str) -> str:
    base = os.path.basename(path)
    return base[: -len(ZONE_SUFFIX)] if base.endswith(ZONE_SUFFIX) and len(base) > len(ZONE_SUFFIX) else base


def is_zone_file(name: str) -> bool:
    """Whether a directory entry's name is a zone's (not an output, key, journal, hidden or temporary file)."""
    return not (name.startswith(_SKIP_PREFIXES) or name.endswith(_SKIP_SUFFIXES)
                or (name.startswith("K") and "+" in name))


def _zone_defaults(common: argparse.Namespace) -> dict:
    skip = {"zones", "outdir", *_PER_RUN}
    return {k: v for k, v in vars(common).items() if k not in skip}


def _complete(args: argparse.Namespace, common: argparse.Namespace, base: str | None) -> None:
    """Paths relative to ``base`` (a list file's directory), the origin and the output file."""
    if base is not None:
        def rel(p: str) -> str:
            return p if os.path.isabs(p) else os.path.join(base, p)
        args.zonefile = rel(args.zonefile)
        args.zsk = [rel(p) for p in args.zsk]
        args.ksk = [rel(p) for p in args.ksk]
        if args.output and args.output != "-":
            args.output = rel(args.output)
    if args.output == "-":
        raise LineError("-f -: many zones cannot share standard output")
    if not args.origin:
        args.origin = _origin_of(args.zonefile)
    if not args.output:
        d = common.outdir or os.path.dirname(args.zonefile)
        args.output = os.path.join(d, os.path.basename(args.zonefile) + ".signed")
    for k in _PER_RUN:
        setattr(args, k, getattr(common, k))
    args.stats = False


def read_dir(path: str, common: argparse.Namespace) -> list[Zone]:
    """Every zone file in the directory ``path``, by name: ``ORIGIN.zone`` or ``ORIGIN``."""
    from ..signzone import _parser

    parser = _parser(_LineParser)
    parser.set_defaults(**_zone_defaults(common))
    zones = []
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if not is_zone_file(name) or not os.path.isfile(full):
            continue
        args = parser.parse_args(["--", full])
        _complete(args, common, None)
        zones.append(Zone(full, args))
    return zones


def read_list(path: str, common: argparse.Namespace) -> list[Zone]:
    """The zones of a list file: one per line, dnssec-signzone's arguments for it (``-o ORIGIN
    -f OUT -3 SALT -N increment ... ZONEFILE [KEYFILES]``) over the command line's options;
    blank lines and ``#`` comments are skipped, relative paths are the list file's directory's."""
    from ..signzone import _parser

    parser = _parser(_LineParser)
    parser.set_defaults(**_zone_defaults(common))
    base = os.path.dirname(os.path.abspath(path))
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    zones = []
    for n, line in enumerate(lines, 1):
        where = f"{path}:{n}"
        try:
            argv = shlex.split(line, comments=True)
            if not argv:
                continue
            if any(a.split("=", 1)[0] in ("--hsm", "--home", "--pin-file", "--zones", "--outdir") for a in argv):
                raise LineError("--hsm, --home, --pin-file, --zones and --outdir belong on the command line")
            args = parser.parse_args(argv)
            _complete(args, common, base)
        except (LineError, ValueError) as e:
            zones.append(Zone(where, None, str(e)))
            continue
        zones.append(Zone(where, args))
    return zones


class _Inline(Executor):
    """Runs each call at once in the caller's thread: a small zone's verification costs less
    done in place than handed to a thread that takes turns with this one for the GIL."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        f: Future = Future()
        try:
            f.set_result(fn(*args, **kwargs))
        except BaseException as e:
            f.set_exception(e)
        return f

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        pass  # shared by every zone of the run


class _SharedPool(Executor):
    """Verification processes every zone of the run uses; a zone's ``shutdown`` leaves them be.

    The run has them because a zone's verification costs more than its signing (ECDSA
    P-256 verifies at a third of its signing speed) and holds the GIL: in processes it
    runs on the other core beside the zones being read and written. They are spawned
    (clean interpreters: nothing of the token's process, unsealed keys included, is
    copied into them) from the main thread, which lives as long as the run, and each asks
    the kernel to kill it when the run's process dies (``workers.die_with_parent``)."""

    def __init__(self) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        from ..workers import die_with_parent
        from .verify import warm_pool

        self._pool = ProcessPoolExecutor(os.cpu_count() or 2, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=die_with_parent, initargs=(os.getpid(),))
        warm_pool(self._pool)  # every process started now, by this thread

    def submit(self, fn, /, *args, **kwargs) -> Future:
        return self._pool.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        pass  # one zone's end; :meth:`close` ends the run's

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def clean_stale_temps(zones: list[Zone]) -> None:
    """Remove the temporary files killed runs left for the zones' outputs: one listing per
    output directory, where each zone's :class:`~.output.Output` would list it again (10,000
    zones in one directory: 10,000 listings of 20,000 names)."""
    by_dir: dict[str, set[str]] = {}
    for z in zones:
        if z.args is not None:
            out = os.path.abspath(z.args.output)
            by_dir.setdefault(os.path.dirname(out), set()).add(os.path.basename(out))
    for d, names in by_dir.items():
        try:
            found = {m.group(1) for m in map(_TEMP.match, os.listdir(d)) if m and m.group(1) in names}
        except OSError:
            continue  # the zone's own run reports it
        for base in found:
            output.clean_stale_temps(os.path.join(d, base))


def _verifier(zones: list[Zone]) -> Executor:
    """Processes for a run with enough zones to verify, else in place."""
    if sum(1 for z in zones if z.args is not None and not z.args.noverify) < POOL_ZONES:
        return _Inline()
    return _SharedPool()


class Report:
    """What the run says on stderr: error lines, the progress line on a terminal, the summary."""

    def __init__(self, total: int, verbose: int, tty: bool) -> None:
        self.total, self.verbose, self.tty = total, verbose, tty
        self.signed = self.failed = self.nsigs = 0
        self.t0 = time.monotonic()
        self._last = 0.0
        self._shown = False
        self._lock = threading.Lock()

    def line(self, text: str) -> None:
        with self._lock:
            self._line(text)

    def _line(self, text: str) -> None:
        if self._shown:
            sys.stderr.write("\r\033[K")
            self._shown = False
        sys.stderr.write(text + "\n")

    def ok(self, zone: Zone, nsigs: int, seconds: float) -> None:
        with self._lock:
            self.signed += 1
            self.nsigs += nsigs
            if self.verbose:
                self._line(f"{zone.name}: signed, {nsigs} signatures, {seconds:.3f} s, {zone.args.output}")
            self._progress()

    def fail(self, zone: Zone, why: str) -> None:
        with self._lock:
            self.failed += 1
            self._line(f"{zone.name}: {why}")
            self._progress()

    def _progress(self, final: bool = False) -> None:
        if not self.tty:
            return
        t = time.monotonic()
        if final or t - self._last >= 0.2:
            self._last = t
            sys.stderr.write(f"\r\033[Kzones {self.signed + self.failed}/{self.total}, {self.failed} failed, "
                             f"{self.nsigs} signatures")
            self._shown = True
            sys.stderr.flush()

    def summary(self) -> None:
        with self._lock:
            self._summary()

    def _summary(self) -> None:
        self._progress(final=True)
        self._line(f"signzone: {self.signed} zones signed, {self.failed} failed, {self.nsigs} signatures, "
                   f"{time.monotonic() - self.t0:.1f} s")
        sys.stderr.flush()


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


class Coalescer:
    """The client the zones in flight share: their signing requests go to the token together.

    A zone's requests are small (a 50-name zone is one call of about 130 signatures); one
    call for several zones pays the token's per-call costs once (its audit entry, written
    before the signatures are handed out, and its job set-up) and is large enough for the
    token's signing workers (``workers.PARALLEL_MIN``), which sign on the other cores while
    this process reads and writes zones. Each item is still checked by the token's policy
    (``client.timed_sign``); an answer goes back only to the zone that asked for it. One
    call at a time reaches the client, from whichever zone's thread gets there first while
    none is under way (group commit), so calls grow by themselves when the token is busy.
    """

    def __init__(self, client) -> None:
        self._client = client
        self._cond = threading.Condition()
        self._queue: list[_Request] = []
        self._queued = 0  # items in the queue
        self._busy = False
        self._active = 0  # zones being signed: a call waits for each to ask, or for GROUP items
        # token time, read once: a zone only takes its default inception and expiration from
        # it (the token checks every signature against its own clock), and a read per zone
        # would wait behind the signing call under way
        self._t0, self._m0 = int(client.time()), time.monotonic()
        self.calls = 0

    def time(self) -> int:
        return self._t0 + int(time.monotonic() - self._m0)

    @contextlib.contextmanager
    def zone(self):
        """Around one zone's run: while it runs, a call may wait for its request."""
        with self._cond:
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()

    def _ready(self, now: float) -> bool:
        q = self._queue
        return bool(q) and (self._queued >= GROUP or len(q) >= self._active or now - q[0].t >= GROUP_WAIT)

    def timed_sign(self, items):
        req = _Request(items)
        with self._cond:
            self._queue.append(req)
            self._queued += len(items)
            self._cond.notify_all()
            while not req.done:
                now = time.monotonic()
                if not self._busy and self._ready(now):
                    self._busy = True
                    group, self._queue, self._queued = self._queue, [], 0
                    break
                self._cond.wait(None if self._busy else max(0.001, self._queue[0].t + GROUP_WAIT - now))
            else:
                return req.answer()
        try:
            flat = [it for r in group for it in r.items]
            results = self._client.timed_sign(flat)
            self.calls += 1
            if len(results) != len(flat):
                raise CryptobatError(f"the token returned {len(results)} results for {len(flat)} signing requests")
            at = 0
            for r in group:
                r.results = results[at:at + len(r.items)]
                at += len(r.items)
        except BaseException as e:
            for r in group:
                r.error = e
        finally:
            with self._cond:
                for r in group:
                    r.done = True
                self._busy = False
                self._cond.notify_all()
        return req.answer()


class _Request:
    def __init__(self, items) -> None:
        self.items = items
        self.t = time.monotonic()
        self.results = None
        self.error: BaseException | None = None
        self.done = False

    def answer(self):
        if self.error is not None:
            raise self.error
        return self.results


def sign_all(zones: list[Zone], report: Report, sign: Callable, enter: Callable = contextlib.nullcontext,
             threads: int = IN_FLIGHT) -> bool:
    """Sign ``zones``, ``threads`` at a time (``enter()`` around each); False if the token failed
    and the run stopped."""
    for zone in zones:  # the list file's bad lines first, in order
        if zone.error is not None:
            report.fail(zone, zone.error)
    todo = iter([z for z in zones if z.error is None])
    room = threading.Condition()  # guards todo and held
    held = 0  # bytes of the zone files being signed
    stopped = threading.Event()

    def one(zone: Zone) -> None:
        t = time.monotonic()
        try:
            stats = sign(zone.args)
        except (Fatal, ZoneError, OSError) as e:
            report.fail(zone, _one_line(e))
        except CryptobatError as e:  # the token's own failure: every zone after this one would fail too
            report.fail(zone, _one_line(e))
            if not stopped.is_set():
                stopped.set()
                report.line(f"{PROG}: fatal: {_one_line(e)}; the run stops")
        except Exception as e:  # a zone this program cannot handle must not stop the others
            report.fail(zone, f"{type(e).__name__}: {_one_line(e)}")
        else:
            report.ok(zone, stats.nsigs, time.monotonic() - t)

    def size(zone: Zone) -> int:
        try:
            return os.path.getsize(zone.args.zonefile) if zone.args is not None else 0
        except OSError:
            return 0

    def loop() -> None:
        nonlocal held
        while not stopped.is_set():
            with room:
                zone = next(todo, None)
                if zone is None:
                    return
                n = size(zone)
                while held and held + n > BYTES_IN_FLIGHT:  # a big zone waits for room
                    room.wait()
                if stopped.is_set():  # the token failed while this zone waited: it is not started
                    return
                held += n
            try:
                with enter():
                    one(zone)
            finally:
                with room:
                    held -= n
                    room.notify_all()

    pool = [threading.Thread(target=loop, name=f"signzone-zone{i}") for i in range(max(1, threads))]
    for th in pool:
        th.start()
    try:
        for th in pool:
            th.join()
    except BaseException:  # ^C: the zones under way finish (or fail), no other starts
        stopped.set()
        for th in pool:
            th.join()
        raise
    return not stopped.is_set()


def _usage(parser: argparse.ArgumentParser, common: argparse.Namespace) -> list[Zone]:
    """The zones LIST names; a command line that cannot be run is a usage error (exit 2)."""
    given = [o for o, k in _PER_ZONE if getattr(common, k)]
    if given:
        parser.error(f"{', '.join(given)} name one zone's files: give them per zone in a list file")
    if common.outdir is not None and not os.path.isdir(common.outdir):
        parser.error(f"--outdir {common.outdir}: not a directory")
    try:
        if os.path.isdir(common.zones):
            return read_dir(common.zones, common)
        return read_list(common.zones, common)
    except (OSError, UnicodeDecodeError) as e:
        parser.error(f"--zones {common.zones}: cannot read it: {getattr(e, 'strerror', None) or e}")


def main(argv: list[str], client=None) -> int:
    """Run ``signzone --zones``; ``client`` is the token to use (default: opened here, once)."""
    from .. import signzone

    parser = signzone._parser(zones=True)
    common = parser.parse_args(argv)
    zones = _usage(parser, common)
    report = Report(len(zones), common.verbose, sys.stderr.isatty())
    own = client is None
    pool: Executor | None = None
    try:
        if own:
            from ..client import connect

            client = connect(common.hsm, common.home, signzone._pin(common.pin_file))
        keys = client.keys()
        by_zone: dict[str, list] = {}
        for k in keys:
            by_zone.setdefault(k.zone.lower(), []).append(k)
        together = Coalescer(client)
        clean_stale_temps(zones)
        pool = _verifier(zones)
        shared = signzone.Shared(lambda origin: by_zone.get(origin, []), pool)
        # the zones' file names are not printed (dnssec-signzone prints its one): -v says them
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
            whole = sign_all(zones, report, lambda args: signzone.sign_zone(args, together, shared), together.zone)
    except CryptobatError as e:
        report.line(f"{PROG}: fatal: {_one_line(e)}")
        whole = False
    finally:
        try:
            if isinstance(pool, _SharedPool):
                pool.close()
        finally:
            if own and client is not None:
                client.close()
    report.summary()
    if not whole:
        return STOPPED
    return min(report.failed, MAX_STATUS)
