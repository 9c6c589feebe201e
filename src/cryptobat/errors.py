"""The one exception family of the token core, and what each transport makes of it.

As in h11's ``ProtocolError.error_status_hint``, an error carries the hints each
transport needs instead of each transport guessing from the message text:

- ``str(e)`` is the one-line answer (console line, native ``error``, CLI message);
- ``ckr`` is the PKCS#11 return code the RPC layer answers with;
- ``code`` is a short stable word the native API sends beside the message, so a
  client can decide without parsing English.

Each transport translates at one boundary: ``console.Console.handle``,
``serve``'s native dispatcher and ``p11rpc.module.Module.call``. The PKCS#11 codes
are plain numbers here so the core does not import the RPC layer.
"""
from __future__ import annotations

# PKCS#11 v2.40 return codes (pkcs11t.h); the RPC layer's constants module has the same values.
CKR_GENERAL_ERROR = 0x05
CKR_FUNCTION_FAILED = 0x06
CKR_ATTRIBUTE_VALUE_INVALID = 0x13
CKR_ACTION_PROHIBITED = 0x1B
CKR_DEVICE_ERROR = 0x30
CKR_DEVICE_MEMORY = 0x31
CKR_FUNCTION_REJECTED = 0x200
CKR_KEY_HANDLE_INVALID = 0x60
CKR_PIN_INCORRECT = 0xA0
CKR_PIN_LOCKED = 0xA4
CKR_TEMPLATE_INCONSISTENT = 0xD1


class CryptobatError(Exception):
    """Anything the token refuses or cannot do; ``str()`` is the one-line answer."""

    ckr: int = CKR_FUNCTION_FAILED
    code: str = "error"


class InvalidArgument(CryptobatError):
    """A request the token understood but whose values it does not accept (bad label, range, name)."""

    ckr = CKR_ATTRIBUTE_VALUE_INVALID
    code = "invalid"


class Conflict(InvalidArgument):
    """The request clashes with what the token holds: a taken label, a key tag in use, an enrolled name."""

    ckr = CKR_TEMPLATE_INCONSISTENT
    code = "conflict"


class NotFound(CryptobatError):
    """No such key, officer or pending operation."""

    ckr = CKR_KEY_HANDLE_INVALID
    code = "not-found"


class Refusal(CryptobatError):
    """A signing request the policy does not allow; the reason goes back as ``fail: <reason>``."""

    ckr = CKR_FUNCTION_REJECTED
    code = "refused"

    @property
    def reason(self) -> str:
        return str(self)


class NotPermitted(CryptobatError):
    """An action the token allows only inside a quorum-opened window (PKCS#11 key management)."""

    ckr = CKR_ACTION_PROHIBITED
    code = "not-permitted"


class KeygenRefused(NotPermitted):
    """Key generation outside the window or for another zone; PKCS#11 has a distinct code for it."""

    ckr = CKR_FUNCTION_REJECTED


class ConfigurationDisabled(CryptobatError):
    """A state change attempted without a quorum of officers present."""

    ckr = CKR_FUNCTION_REJECTED
    code = "no-quorum"

    def __init__(self) -> None:
        super().__init__("Configuration disabled")


class PinIncorrect(CryptobatError):
    ckr = CKR_PIN_INCORRECT
    code = "pin-incorrect"


class PinLocked(CryptobatError):
    ckr = CKR_PIN_LOCKED
    code = "pin-locked"


class LimitReached(CryptobatError):
    """A bounded resource is full (pending operations, frame size, request items)."""

    ckr = CKR_DEVICE_MEMORY
    code = "limit"


class StoreError(CryptobatError):
    """The state store cannot be written (full disk, lost file): nothing was acknowledged."""

    ckr = CKR_DEVICE_ERROR
    code = "store"


class IntegrityError(StoreError):
    """The state store or audit log was changed outside Cryptobat."""

    code = "integrity"


class TokenBusy(StoreError):
    """Another process holds this token's store."""

    code = "busy"
