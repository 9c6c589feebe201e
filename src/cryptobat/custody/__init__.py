"""Key custody: where private keys live and how they are used.

The token never handles a private key except through a :class:`Custody`. The
software custody (:mod:`.software`) keeps a master key in a 0600 file and each
private key sealed under it. Other custodies (a TPM 2.0, an existing PKCS#11 HSM)
implement the same protocol; the rest of the token does not change.
"""
from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Protocol, runtime_checkable

from ..errors import CryptobatError, IntegrityError, InvalidArgument
from .envelope import write_private
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
    parallel: bool  # worker processes may each open it (and sign at once)
    concurrent: bool  # threads of one process sign at once (the GIL or a lock is not held meanwhile)

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

    # Optional: close(); discard(), which closes after removing from the device what this object
    # made there (a counter index, HSM objects), for a custody no token state came to refer to;
    # kept(), once a committed state refers to it (discard() then removes nothing).


class RollbackCounter(Protocol):
    """A monotonic counter in the custody's device (see :mod:`cryptobat.rollback`)."""

    def read(self) -> int: ...

    def increment(self) -> int:
        """Add one; the new value."""
        ...


# --- choosing a custody ---------------------------------------------------------------
# kind -> (module in this package, class); imported only when that kind is used, so a host
# without tpm2-pytss or python-pkcs11 still runs the software custody
KINDS = {"software": ("software", "SoftwareCustody"), "tpm2": ("tpm2", "Tpm2Custody"),
         "pkcs11": ("pkcs11", "Pkcs11Custody")}
DEFAULT_TCTI = "device:/dev/tpmrm0"
SPEC_HELP = "software, tpm2[:TCTI] or pkcs11:MODULE"
CONFIG_FILE = "custody.json"  # the kind a token was made with; absent: software (tokens from before)
MAX_PCR = 23


def parse_pcrs(text: str) -> list[int]:
    """``0,2,4,7`` -> [0, 2, 4, 7] (PCRs of the SHA-256 bank a TPM-sealed secret is bound to)."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or int(part) > MAX_PCR:
            raise InvalidArgument(f"--pcrs takes PCR numbers 0-{MAX_PCR} separated by commas, not {text!r}")
        if int(part) not in out:
            out.append(int(part))
    return sorted(out)


def parse_spec(text: str, *, token: str | None = None, pin: str | None = None,
               pcrs: str | None = None) -> tuple[str, dict]:
    """``cryptobat init --custody`` text (with its companion options) -> (kind, config).

    ``software``; ``tpm2[:TCTI]`` (``device:/dev/tpmrm0`` by default; ``swtpm:path=...``,
    ``mssim:...`` or a device path as tpm2-tools take them) with ``pcrs``; ``pkcs11:MODULE``
    with the HSM token's label and its PIN."""
    kind, sep, rest = text.partition(":")
    if kind not in KINDS:
        raise InvalidArgument(f"unknown custody {kind!r}: use {SPEC_HELP}")
    if pcrs is not None and kind != "tpm2":
        raise InvalidArgument("--pcrs is for tpm2 custody only")
    if (token is not None or pin is not None) and kind != "pkcs11":
        raise InvalidArgument("--custody-token and the custody PIN are for pkcs11 custody only")
    if kind == "software":
        if sep:
            raise InvalidArgument(f"software custody takes no parameters (got {text!r})")
        return kind, {}
    if kind == "tpm2":
        if sep and not rest:
            raise InvalidArgument("tpm2: give a TCTI after the colon (e.g. tpm2:device:/dev/tpmrm0) or none")
        tcti = rest or DEFAULT_TCTI
        if tcti.startswith("/"):
            tcti = "device:" + tcti
        return kind, {"tcti": tcti, "pcrs": parse_pcrs(pcrs) if pcrs is not None else []}
    if not rest:
        raise InvalidArgument("pkcs11 custody needs the HSM's module: pkcs11:/path/to/module.so")
    module = Path(rest)
    if not module.is_file():
        raise InvalidArgument(f"PKCS#11 module {rest} not found")
    if not token:
        raise InvalidArgument("pkcs11 custody needs the HSM token's label: --custody-token LABEL")
    if not pin:
        raise InvalidArgument("pkcs11 custody needs the HSM token's PIN: --custody-pin-file FILE "
                              "or $CRYPTOBAT_CUSTODY_PIN")
    return kind, {"module": str(module), "token": token, "pin": pin}


def read_pin_file(path: str) -> str:
    """The first line of a file holding an HSM's PIN (a PIN is never put on a command line).

    A regular file only, opened without blocking and read to at most 4 KiB: a daemon reading a
    path an officer typed must not hang on a FIFO nor fill its memory from /dev/zero."""
    import stat
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise InvalidArgument(f"the PIN file {path} is not a regular file")
            data = os.read(fd, 4096)
        finally:
            os.close(fd)
        return data.decode("utf-8").split("\n", 1)[0].rstrip("\r")
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"cannot read the PIN file {path}: {getattr(e, 'strerror', None) or e}") from None


def spec_from_env(environ=os.environ) -> tuple[str, dict]:
    """The custody a new token gets when its creator names none: ``$CRYPTOBAT_CUSTODY`` (a spec
    as ``init --custody`` takes it; software when unset), with ``$CRYPTOBAT_CUSTODY_TOKEN``,
    ``$CRYPTOBAT_CUSTODY_PIN`` and ``$CRYPTOBAT_CUSTODY_PCRS`` as its companion options.
    A host where every token belongs in its TPM or HSM says so once, in its environment."""
    text = environ.get("CRYPTOBAT_CUSTODY") or "software"
    pkcs11 = text.startswith("pkcs11")
    return parse_spec(text, token=environ.get("CRYPTOBAT_CUSTODY_TOKEN") if pkcs11 else None,
                      pin=environ.get("CRYPTOBAT_CUSTODY_PIN") if pkcs11 else None,
                      pcrs=environ.get("CRYPTOBAT_CUSTODY_PCRS") if text.startswith("tpm2") else None)


def _custody_class(kind: str):
    module, name = KINDS[kind]
    try:
        return getattr(importlib.import_module(f"{__name__}.{module}"), name)
    except (ImportError, AttributeError) as e:
        raise CryptobatError(f"{kind} custody is not available in this installation ({e})") from None


def _where(config: dict | None) -> str:
    """What a device error names: the TCTI or module, never the PIN."""
    c = config or {}
    where = c.get("tcti") or c.get("module")
    return f" ({where})" if where else ""


def _construct(cls, kind: str, home: Path, create: bool, config: dict | None):
    # the software custody has nothing to configure (and tokens' own factories may take no config)
    kwargs = {"config": config} if create and config else {}
    try:
        return cls(home, create=create, **kwargs)
    except CryptobatError:
        raise
    except Exception as e:  # a device library's own errors (TSS2_Exception, PKCS11Error...) as one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CryptobatError(f"{kind} custody cannot be {'created' if create else 'opened'}"
                             f"{_where(config)}: {first}") from None


def _read_kind(home: Path) -> str:
    path = home / CONFIG_FILE
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return "software"  # every token made before custodies could be chosen
    except (OSError, ValueError) as e:
        raise IntegrityError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    kind = doc.get("kind") if isinstance(doc, dict) else None
    if kind not in KINDS:
        raise IntegrityError(f"{path} names no custody this Cryptobat knows ({kind!r})")
    return kind


def release(custody: Custody, *hows: str) -> None:
    """Call the first of ``hows`` the custody has, of its optional methods: ``discard`` (close
    after removing what it made in its device), ``close``, ``kept`` (a committed state refers to
    it: discard no longer removes anything)."""
    for how in hows:
        fn = getattr(custody, how, None)
        if fn is not None:
            fn()
            return


def _write_kind(home: Path, kind: str, name: str = CONFIG_FILE) -> None:
    """HOME/custody.json (or ``name``: a migration's next custody), 0600, written whole or not at
    all, the directory synced."""
    write_private(home / name, json.dumps({"kind": kind}).encode() + b"\n", sync_dir=True)


def open_custody(home: Path | str, create: bool = False, kind: str | None = None,
                 config: dict | None = None) -> Custody:
    """The custody of the token at ``home``: made (``create``, of ``kind`` with ``config``, the kind
    recorded in HOME/custody.json) or opened again as recorded there."""
    home = Path(home)
    if not create:
        kind = _read_kind(home)
        return _construct(_custody_class(kind), kind, home, False, None)
    kind = kind or "software"
    if kind not in KINDS:
        raise InvalidArgument(f"unknown custody {kind!r}: use {SPEC_HELP}")
    cls = _custody_class(kind)
    custody = _construct(cls, kind, home, True, config)
    try:
        _write_kind(home, kind)
    except OSError as e:  # nothing will refer to what the custody made in its device
        release(custody, "discard", "close")
        raise CryptobatError(f"cannot write {home / CONFIG_FILE}: {e.strerror}") from None
    return custody


__all__ = ["Custody", "DeviceKey", "LoadedKey", "RollbackCounter", "SoftwareCustody", "open_custody", "parse_spec", "read_pin_file", "release", "spec_from_env"]
