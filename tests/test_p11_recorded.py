"""The RPC messages the stock p11-kit-client.so really sends, recorded live and replayed.

A relay sits between ``p11-kit-client.so`` (driven by OpenSC's pkcs11-tool) and the
daemon's PKCS#11 socket and keeps every request frame the client sends. Those
recorded messages, whole and mutated, are then sent again on fresh connections:
each gets an answer, nothing signs outside the policy, and the daemon serves on.
The recording is made by each run, so it always matches the installed p11-kit
(no corpus files from outside the repository are needed).
"""
from __future__ import annotations

import os
import random
import socket
import struct
import subprocess
import threading
from pathlib import Path

import pytest

from cryptobat.p11rpc.calls import CALLS
from cryptobat.p11rpc.framing import FrameDecoder, encode_frame
from cryptobat.client import connect
from support import PIN, Daemon, client_module, make_signing_data, setup_home

KEYS = (("8", "k8"), ("13", "k13"))


class RecordingRelay:
    """A Unix socket that forwards to ``target`` and records the client's request frames."""

    def __init__(self, path: Path, target: str) -> None:
        self.path, self.target = path, target
        self.frames: list[tuple[int, bytes]] = []  # (call id, body), in the order sent
        self.lock = threading.Lock()
        self.srv = socket.socket(socket.AF_UNIX)
        self.srv.bind(str(path))
        self.srv.listen(8)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            up = socket.socket(socket.AF_UNIX)
            up.connect(self.target)
            threading.Thread(target=self._pump, args=(c, up, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, c, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        dec, first = FrameDecoder(), True
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                if record:
                    if first:  # the protocol version byte
                        data, first = data[1:], False
                    for f in dec.feed(data):
                        call_id = struct.unpack(">I", f.body[:4])[0] if len(f.body) >= 4 else 0
                        with self.lock:
                            self.frames.append((call_id, f.body))
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.srv.close()


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """(daemon, recorded frames) after pkcs11-tool ran its usual operations through the relay."""
    base = tmp_path_factory.mktemp("p11rec")
    home = base / "token"
    d = Daemon(home, codes=setup_home(home, keys=KEYS, compat=()))
    relay = RecordingRelay(base / "relay.sock", d.address.removeprefix("unix:path="))
    env = dict(os.environ, P11_KIT_SERVER_ADDRESS=f"unix:path={base / 'relay.sock'}")
    data, good = base / "data", base / "good"
    data.write_bytes(b"not RRSIG signing data")
    c = connect(home=home, pin=PIN.decode())
    try:
        now, key = c.time(), next(k for k in c.keys() if k.label == "k8")
    finally:
        c.close()
    good.write_bytes(make_signing_data(key, now + 3600, now - 60))
    sign = ["--login", "--pin", PIN.decode(), "--sign", "--id", b"k8".hex(), "-m", "SHA256-RSA-PKCS", "-i"]
    runs = [["-L"], ["-M"], ["-T"], ["-O"], ["--login", "--pin", PIN.decode(), "-O"],
            sign + [str(good)], sign + [str(data)],  # signed; refused by the policy
            ["--login", "--pin", PIN.decode(), "--keypairgen", "--key-type", "EC:prime256v1",
             "--label", "rec"],  # refused outside a key-management window
            ["--generate-random", "16"],
            ["--login", "--pin", "wrong-pin", "-O"]]
    results = [subprocess.run(["pkcs11-tool", "--module", client_module(), *args], env=env,
                              capture_output=True, timeout=120) for args in runs]
    assert results[5].returncode == 0, results[5].stderr  # the good RRSIG data was signed
    assert results[6].returncode != 0
    relay.close()
    yield d, list(relay.frames)
    d.stop()


def _send(addr: str, version: int, bodies: list[bytes]) -> list[bytes]:
    """Each body on one fresh connection, as its own frame; the replies' bodies."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(addr)
    s.sendall(bytes([version]))
    assert s.recv(1)
    dec, out = FrameDecoder(), []
    for i, body in enumerate(bodies, 1):
        s.sendall(encode_frame(i, body, b"client"))
        frames: list = []
        while not frames:
            chunk = s.recv(65536)
            assert chunk, f"daemon closed the connection on recorded message {i}"
            frames = dec.feed(chunk)
        out.append(frames[0].body)
    s.close()
    return out


def test_recording_covers_what_clients_send(recorded):
    _, frames = recorded
    names = {CALLS[cid].name for cid, _ in frames if 0 < cid < len(CALLS)}
    for want in ("C_Initialize", "C_GetSlotList", "C_GetTokenInfo", "C_OpenSession", "C_Login",
                 "C_FindObjectsInit", "C_GetAttributeValue", "C_SignInit", "C_Sign",
                 "C_GenerateKeyPair", "C_GenerateRandom", "C_GetMechanismList", "C_Finalize"):
        assert want in names, f"{want} not recorded; recorded: {sorted(names)}"
    assert len(frames) > 50


def test_recorded_messages_replayed_get_answers(recorded):
    d, frames = recorded
    addr = d.address.removeprefix("unix:path=")
    replies = _send(addr, 0, [body for _, body in frames])
    assert len(replies) == len(frames)
    for (cid, _), reply in zip(frames, replies):
        rcid = struct.unpack(">I", reply[:4])[0]
        assert rcid in (0, cid), (CALLS[cid].name, rcid)  # the call's own answer or an error reply
    # replayed on a connection of its own (its login and session handles are not ours to reuse),
    # a recorded C_Sign gets an error answer, never a signature
    signs = [i for i, (cid, _) in enumerate(frames) if 0 < cid < len(CALLS) and CALLS[cid].name == "C_Sign"]
    assert len(signs) >= 2
    for i in signs:
        only = _send(addr, 0, [frames[i][1]])[0]
        assert struct.unpack(">I", only[:4])[0] == 0, "a lone replayed C_Sign was answered with a signature"


def test_recorded_messages_mutated(recorded):
    d, frames = recorded
    addr = d.address.removeprefix("unix:path=")
    rng = random.Random(1982)
    bodies = []
    for _, body in frames:
        for _ in range(3):
            b = bytearray(body)
            for _ in range(rng.randint(1, 4)):
                if len(b) > 4:
                    b[rng.randrange(4, len(b))] = rng.randrange(256)  # the call id stays: parsing is tried
            cut = rng.randrange(4, len(b) + 1) if len(b) > 4 and rng.random() < 0.3 else len(b)
            bodies.append(bytes(b[:cut]))
    replies = _send(addr, 0, bodies)
    assert len(replies) == len(bodies) and all(len(r) >= 8 for r in replies)
    init = next(body for cid, body in frames if CALLS[cid].name == "C_Initialize")
    assert struct.unpack(">I", _send(addr, 0, [init])[0][:4])[0] == 1  # a fresh client is served
    d.quorum()  # and the console still answers
    assert d.alive()
