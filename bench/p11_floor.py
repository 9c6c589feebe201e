#!/usr/bin/env python3
"""The floor of a PKCS#11 server written in Python: canned replies, no token work, same clients.

    python3 bench/p11_floor.py [--seconds 4] [--clients 1,2,8,32]

Why: ``bench/p11_bench.py`` compares Cryptobat's daemon with SoftHSMv2 behind ``p11-kit
server``.  This asks how fast *any* Python server of the p11-kit protocol can answer the same
clients on this machine, whatever it does per call.  A recording proxy sits between one
python-pkcs11 client and a real ``cryptobat serve`` for an ECDSA digest+ECDSA session and keeps
every reply by its request bytes.  Two replay servers then answer the same bench clients from
that record, doing nothing else per message (one dictionary lookup):

* ``floor-epoll``: one process, one epoll loop over every client (the daemon's design);
* ``floor-fork``: a process forked per client that blocks in ``recv`` (``p11-kit server``'s
  design, which uses every core).

SoftHSMv2 behind ``p11-kit server`` (the same calls) and the real daemon are measured in the
same run.  A replay server is an upper bound: a real server does the same I/O plus its work.
"""
from __future__ import annotations

import argparse
import os
import select
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import p11_bench as pb  # noqa: E402

HEADER = struct.Struct(">III")


def _read_frame(sock: socket.socket) -> tuple[int, bytes, bytes] | None:
    head = _exactly(sock, HEADER.size)
    if head is None:
        return None
    code, olen, blen = HEADER.unpack(head)
    rest = _exactly(sock, olen + blen)
    if rest is None:
        return None
    return code, rest[:olen], rest[olen:]


def _exactly(sock: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        got = sock.recv(n - len(buf))
        if not got:
            return None
        buf += got
    return buf


def record(upstream: str, listen: Path, record: dict[bytes, list[bytes]], frames: list[bytes]) -> threading.Thread:
    """A proxy for one client: each request body -> the reply bodies the daemon gave, in order
    (the same request can get a different answer: C_FindObjects until it is empty)."""
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(listen))
    srv.listen(1)

    def run() -> None:
        c, _ = srv.accept()
        u = socket.socket(socket.AF_UNIX)
        u.connect(upstream)
        hello = _exactly(c, 1)
        frames.append(hello)
        u.sendall(hello)
        c.sendall(_exactly(u, 1))
        while (f := _read_frame(c)) is not None:
            code, opts, body = f
            frames.append(HEADER.pack(code, len(opts), len(body)) + opts + body)
            u.sendall(frames[-1])
            r = _read_frame(u)
            if r is None:
                break
            record.setdefault(body, []).append(r[2])
            c.sendall(HEADER.pack(code, 0, len(r[2])) + r[2])
        c.close()
        u.close()
        srv.close()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _answer(canned: dict[bytes, list[bytes]], seen: dict[bytes, int], buf: bytearray) -> bytes:
    """The replies to the whole frames in ``buf`` (taken out of it): the k-th time a request
    comes, its k-th recorded reply (the last one once they run out).  The client writes a
    frame's header and body separately, so a read can hold part of one."""
    out = []
    while len(buf) >= HEADER.size:
        code, olen, blen = HEADER.unpack_from(buf)
        end = HEADER.size + olen + blen
        if len(buf) < end:
            break
        body = bytes(buf[HEADER.size + olen:end])
        del buf[:end]
        replies = canned.get(body)
        if replies is None:
            sys.stderr.write(f"floor: no recorded reply for call {body[:4].hex()}\n")
            replies = [b""]
        k = seen.get(body, 0)
        seen[body] = k + 1
        reply = replies[min(k, len(replies) - 1)]
        out.append(HEADER.pack(code, 0, len(reply)) + reply)
    return b"".join(out)


def serve_epoll(path: Path, canned: dict[bytes, list[bytes]]) -> None:
    lst = socket.socket(socket.AF_UNIX)
    lst.bind(str(path))
    lst.listen(1024)
    lst.setblocking(False)
    ep = select.epoll()
    ep.register(lst.fileno(), select.EPOLLIN)
    peers: dict[int, tuple[socket.socket, list[bool], dict[bytes, int], bytearray]] = {}
    while True:
        for fd, _ in ep.poll():
            if fd == lst.fileno():
                c, _ = lst.accept()
                c.setblocking(True)
                peers[c.fileno()] = (c, [False], {}, bytearray())
                ep.register(c.fileno(), select.EPOLLIN)
                continue
            c, hello, seen, buf = peers[fd]
            data = c.recv(65536)
            if not data:
                ep.unregister(fd)
                c.close()
                del peers[fd]
                continue
            if not hello[0]:
                hello[0] = True
                c.sendall(data[:1])
                data = data[1:]
                if not data:
                    continue
            buf += data
            if out := _answer(canned, seen, buf):
                c.sendall(out)


def _reap(*_) -> None:
    """Wait for ended per-client processes, so their CPU time counts in ours (as p11-kit server's)."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass


def serve_fork(path: Path, canned: dict[bytes, list[bytes]]) -> None:
    signal.signal(signal.SIGCHLD, _reap)
    lst = socket.socket(socket.AF_UNIX)
    lst.bind(str(path))
    lst.listen(1024)
    while True:
        c, _ = lst.accept()
        if os.fork():
            c.close()
            continue
        lst.close()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        c.sendall(c.recv(1))
        seen: dict[bytes, int] = {}
        buf = bytearray()
        while data := c.recv(65536):
            buf += data
            if out := _answer(canned, seen, buf):
                c.sendall(out)
        os._exit(0)


def start(kind: str, path: Path, canned: dict[bytes, list[bytes]]) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            (serve_epoll if kind == "epoll" else serve_fork)(path, canned)
        finally:
            os._exit(0)
    deadline = time.time() + 10
    while not path.exists() and time.time() < deadline:
        time.sleep(0.02)
    return pid


def sans_io(home: Path, frames: list[bytes]) -> str:
    """The daemon's own cost of the recorded flow without sockets: the frames fed to a
    :class:`Connection` on the token opened here, the signing loop's six frames repeated."""
    import statistics
    from cryptobat.home import open_token
    from cryptobat.p11rpc.server import Connection
    from cryptobat.p11serve import ServiceBackend
    from cryptobat.serve import Service

    def call(f: bytes) -> int:
        olen = HEADER.unpack_from(f)[1]
        return struct.unpack_from(">I", f, HEADER.size + olen)[0]
    body = frames[1:]
    first = next(i for i in range(len(body) - 7, 0, -1) if call(body[i]) == 42)  # the last whole C_DigestInit..C_Sign
    period = body[first:first + 6]
    tok = open_token(home)
    try:
        conn = Connection(ServiceBackend(Service(tok)))
        conn.feed(frames[0])
        for f in body[:first]:
            conn.feed(f)
        per: list[list[int]] = [[] for _ in period]
        best = float("inf")
        for _ in range(5):
            t0 = time.thread_time()
            for _ in range(1000):
                for f in period:
                    conn.feed(f)
            best = min(best, (time.thread_time() - t0) / 1000)
        for _ in range(1000):
            for i, f in enumerate(period):
                t = time.perf_counter_ns()
                conn.feed(f)
                per[i].append(time.perf_counter_ns() - t)
        from cryptobat.p11rpc.calls import CALLS
        names = {c.id: c.name for c in CALLS}
        detail = ", ".join(f"{names.get(call(f), call(f))} {statistics.median(p) / 1000:.0f}"
                           for f, p in zip(period, per))
        return f"sans-I/O: {best * 1e6:.0f} us of CPU per signature (best of 5 x 1000); median us per call: {detail}"
    finally:
        tok.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--clients", default="1,2,8,32")
    a = ap.parse_args(argv)
    module = pb.client_module()
    work = Path(tempfile.mkdtemp(prefix="p11floor-"))
    pids: list[int] = []
    daemon = server = None
    try:
        home, keys, now = pb.setup_cryptobat(work)
        daemon = pb.Daemon(home, timeout=30)
        data = pb.rrsig_data(keys["ec"], now)
        canned: dict[bytes, list[bytes]] = {}
        frames: list[bytes] = []
        t = record(str(daemon.p11), work / "rec.sock", canned, frames)
        r = pb.run_row(module, f"unix:path={work / 'rec.sock'}", "ec", "bound", data, 1, 0.5)
        t.join(10)
        if r["errors"] or not canned:
            sys.exit(f"recording failed: {r}")
        targets = {"cryptobat": (daemon.address, daemon.pid)}
        for kind in ("epoll", "fork"):
            pids.append(start(kind, work / f"{kind}.sock", canned))
            targets[f"floor-{kind}"] = (f"unix:path={work / f'{kind}.sock'}", pids[-1])
        server = pb.p11kit_server(work / "softhsm.sock", "bench", pb.setup_softhsm(work, "bench"))
        targets["softhsm"] = (f"unix:path={work / 'softhsm.sock'}", server.pid)
        names = list(targets)
        print("| clients | " + " | ".join(f"{n} sig/s" for n in names)
              + " | floor-epoll / softhsm | floor-fork / softhsm | server CPU ms/1000 (" + " / ".join(names) + ") |")
        print("|---:|" + "---:|" * (len(names) + 2) + "---|")
        for n in (int(x) for x in a.clients.split(",")):
            res = {name: pb.run_row(module, addr, "ec", "bound", data, n, a.seconds, pid)
                   for name, (addr, pid) in targets.items()}
            sh = res["softhsm"]["rate"] or 1
            print(f"| {n} | " + " | ".join(f"{res[x]['rate']:.0f}" for x in names)
                  + f" | {res['floor-epoll']['rate'] / sh:.2f} | {res['floor-fork']['rate'] / sh:.2f} | "
                  + " / ".join(f"{res[x]['cpu_ms_per_1000']:.0f}" for x in names) + " |", flush=True)
            bad = {x: res[x]["first"] for x in names if res[x]["errors"]}
            if bad:
                print(f"|   failures: {bad} |")
        daemon.stop()
        daemon = None
        print("\n" + sans_io(home, frames))
        return 0
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if daemon:
            daemon.stop()
        if server:
            pb.stop_process(server)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
