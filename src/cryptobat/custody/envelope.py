"""The sealing every custody shares, made from one 32-byte master secret.

A custody differs only in where its master secret comes from (a 0600 file, a TPM-sealed
object, an HMAC computed inside an HSM); from it, the same derivations give the AES-256-GCM
key that seals key blobs and secrets (their label as associated data) and the state
store's MAC key, so the token treats every custody's blobs alike.
"""
from __future__ import annotations

import hashlib
import hmac
import os

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import IntegrityError


class Envelope:
    """seal/unseal (AES-256-GCM, 12-byte random nonce in front) and the store's MAC key."""

    __slots__ = ("_aead", "mac_key")

    def __init__(self, master: bytes) -> None:
        self._aead = AESGCM(hashlib.sha256(b"cryptobat seal" + master).digest())
        self.mac_key = hmac.new(master, b"cryptobat state mac", hashlib.sha256).digest()

    def seal(self, data: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aead.encrypt(nonce, data, aad)

    def unseal(self, blob: bytes, aad: bytes) -> bytes:
        try:
            return self._aead.decrypt(blob[:12], blob[12:], aad)
        except Exception:
            raise IntegrityError("sealed data failed authentication") from None
