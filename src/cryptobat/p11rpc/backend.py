"""What the PKCS#11 adapter needs from the token; ``cryptobat.token.Token`` implements it.

The adapter never sees private keys or policy: every signature and every refusal
comes from these calls, so the token's checks hold no matter what a client sends.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from ..api import KeyInfo, SignResult


@runtime_checkable
class Backend(Protocol):
    def info(self) -> dict:
        """Keys label, serial, manufacturer, model (str) and time (int epoch seconds, trusted)."""
        ...

    def check_pin(self, pin: bytes) -> bool:
        """True if ``pin`` is the signer PIN (officers never log in through PKCS#11)."""
        ...

    def keys(self) -> list[KeyInfo]: ...

    def timed_sign(self, items: list[tuple[str, bytes]]) -> list[SignResult]:
        """Policy-check each RFC 4034 §3.1.8.1 signing data for key ``label``, then sign."""
        ...

    def check_signing_data(self, label: str, data: bytes) -> str | None:
        """The same policy check without signing: refusal reason, or None if acceptable."""
        ...

    def sign_digest(self, label: str, digest: bytes, mechanism: str, bound: bytes | None) -> SignResult:
        """Hash-only signing: ``mechanism`` "rsa-pkcs" (digest is a DigestInfo) or "ecdsa".

        ``bound`` is the signing data this session hashed to exactly ``digest`` after it
        passed check_signing_data for ``label`` (the token checks it again now); without
        it only compat keys sign.
        """
        ...

    def keygen_allowed(self) -> bool: ...

    def generate_key(self, algorithm: int, role: str, zone: str, label: str) -> KeyInfo: ...

    def delete_key(self, label: str) -> None:
        """Raises PermissionError outside a quorum window."""
        ...

    def random(self, n: int) -> bytes: ...
