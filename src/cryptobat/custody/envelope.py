"""The sealing every custody does with its master secret, in one place.

A custody differs in where its 32-byte master secret lives (a 0600 file, sealed in a TPM,
derived inside an HSM); what it derives from it does not: an AES-256-GCM key that seals
data with associated data (a key's label), and the state store's MAC key. Sharing this
keeps a blob resealed by the token (``seal(unseal(blob, tmp), final)``) and the store's
MAC the same construction under every custody.
"""
from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import tempfile
from pathlib import Path
from typing import Callable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import IntegrityError

MASTER_LEN = 32


class Envelope:
    """AES-256-GCM sealing and the state MAC key, both derived from a custody's master secret."""

    __slots__ = ("_aead", "_mac")

    def __init__(self, master: bytes) -> None:
        if len(master) != MASTER_LEN:
            raise IntegrityError(f"the master secret is {len(master)} bytes, not {MASTER_LEN}")
        self._aead = AESGCM(hashlib.sha256(b"cryptobat seal" + master).digest())
        self._mac = hmac.new(master, b"cryptobat state mac", hashlib.sha256).digest()

    def seal(self, data: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, data, aad)

    def unseal(self, blob: bytes, aad: bytes) -> bytes:
        try:
            return self._aead.decrypt(blob[:12], blob[12:], aad)
        except Exception:
            raise IntegrityError("sealed data failed authentication") from None

    def mac_key(self) -> bytes:
        return self._mac


class Sealing:
    """The custody protocol's ``seal``, ``unseal`` and ``mac_key``: the same in every custody,
    from the :class:`Envelope` it keeps as ``_envelope``."""

    _envelope: Envelope

    def seal(self, data: bytes, aad: bytes) -> bytes:
        return self._envelope.seal(data, aad)

    def unseal(self, blob: bytes, aad: bytes) -> bytes:
        return self._envelope.unseal(blob, aad)

    def mac_key(self) -> bytes:
        return self._envelope.mac_key()


def mixed_random(n: int, device: Callable[[], bytes]) -> bytes:
    """``n`` bytes from the OS generator and a device's (``device()``: a TPM's or an HSM's
    random bytes) together, HKDF-SHA256 over both: as strong as the better of the two, never
    the device's alone."""
    out = bytearray()
    while len(out) < n:
        k = min(n - len(out), 255 * 32)  # HKDF's output limit
        out += HKDF(hashes.SHA256(), k, salt=device(), info=b"cryptobat random").derive(os.urandom(32))
    return bytes(out)


def write_private(path: Path, data: bytes, *, exclusive: bool = False, sync_dir: bool = False) -> None:
    """Write a custody's small file (0600) whole or not at all: a temporary file of its own
    (``mkstemp``: a new name, O_EXCL, so no other writer can open it), fsynced, then renamed over
    ``path``; with ``exclusive``, linked instead, so an existing file (a master secret) is never
    replaced (FileExistsError). ``sync_dir``: the directory fsynced after."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if exclusive:
            os.link(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    if sync_dir:
        fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make the directory's entries (a file created, renamed or removed in it) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
