"""Key custody: where private keys live and how they are used.

The token never handles a private key except through a :class:`Custody`. The
software custody (:mod:`.software`) keeps a master key in a 0600 file and each
private key sealed under it. Other custodies (a TPM 2.0, an existing PKCS#11 HSM)
implement the same protocol; the rest of the token does not change.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from .software import SoftwareCustody


class LoadedKey(Protocol):
    def sign(self, data: bytes) -> bytes: ...

    def sign_digest(self, digest: bytes) -> bytes:
        """Sign a bare hash (PKCS#11 hash-only mechanisms); DNSSEC signature format."""
        ...


@runtime_checkable
class DeviceKey(LoadedKey, Protocol):
    """A loaded key a device holds by handle (a TPM 2.0 transient object), as the console's
    ``tpmloadkey``/``tpmflush`` show and unload it. The handle is for display and unloading
    only: a signature always goes through the token's policy check and :meth:`LoadedKey.sign`."""

    def resident(self) -> int:
        """Load the key into the device if it is not; its handle there."""
        ...

    def handle(self) -> int | None:
        """Its handle if the device holds it now (it may have been evicted), else None."""
        ...

    def unload(self) -> None:
        """Flush it from the device now; it is reloaded on its next use."""
        ...


class Custody(Protocol):
    name: str

    def generate(self, algorithm: int, aad: bytes) -> tuple[bytes, bytes]:
        """Create a key inside custody; return (DNSKEY public key field, opaque blob to store)."""
        ...

    def load(self, algorithm: int, blob: bytes, aad: bytes) -> LoadedKey: ...

    def import_key(self, algorithm: int, private_key, aad: bytes) -> tuple[bytes, bytes]:
        """Take an existing private key into custody; return (public key field, blob)."""
        ...

    def seal(self, data: bytes, aad: bytes) -> bytes: ...

    def unseal(self, blob: bytes, aad: bytes) -> bytes: ...

    def mac_key(self) -> bytes:
        """Key for the state store's integrity MAC."""
        ...


__all__ = ["Custody", "DeviceKey", "LoadedKey", "SoftwareCustody"]
