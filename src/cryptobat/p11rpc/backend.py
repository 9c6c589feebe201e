"""What the PKCS#11 adapter needs from the token; ``cryptobat.token.Token`` implements it.

The adapter never sees private keys or policy: every signature and every refusal
comes from these calls, so the token's checks hold no matter what a client sends.
Refusals of state changes raise :class:`cryptobat.errors.CryptobatError`, whose ``ckr``
the adapter answers with.
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

    def bind_digest(self, hashed: str, data: bytes, digest: bytes) -> list[tuple[str, bytes]]:
        """A session finished ``digest``, the ``hashed`` (hashlib name) hash of ``data``.

        Returns (label, mechanism input) for each key that input may be signed by once, as
        bound: ``data`` is signing data for that key that passed the policy. The adapter keeps
        the pairs with ``data`` and hands ``data`` back to :meth:`sign_digest` as ``bound``.
        """
        ...

    def sign_digest(self, label: str, raw: bytes, mechanism: str, bound: bytes | None) -> SignResult:
        """Hash-only signing of the C_Sign input ``raw``: ``mechanism`` "rsa-pkcs" or "ecdsa".

        ``bound`` is the data a :meth:`bind_digest` pair for (``label``, ``raw``) was kept with
        (the token checks it again now); without it only compat keys sign.
        """
        ...

    def keygen_allowed(self) -> bool: ...

    def generate_key(self, algorithm: int, role: str, zone: str, label: str,
                     p11_id: bytes | None = None) -> KeyInfo:
        """A key labelled ``label`` (or one derived from ``p11_id``) whose CKA_ID is ``p11_id`` (or
        the label). Raises KeygenRefused outside a quorum window (or once it made its keys),
        Conflict or InvalidArgument for the label or id."""
        ...

    def delete_key(self, label: str) -> None:
        """Raises NotPermitted outside a quorum window."""
        ...

    def random(self, n: int) -> bytes: ...
