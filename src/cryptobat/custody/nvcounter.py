"""A TPM 2.0 NV monotonic counter: the device's half of rollback detection.

The token records the counter's value in its (MAC'd) state and moves both on every
security-relevant change (see :mod:`cryptobat.rollback`); a copy of ``state.db`` restored
from before a change is then behind the device and refused. The counter is an ordinary
one, not ``TPMA_NV_ORDERLY``: an orderly counter lives in RAM and may jump forward by
hundreds after an unclean stop (9830 -> 9983 seen in a trial), which would look like a
store from another TPM. Its cost is NV wear (ST33: about 500,000 writes), which is why
signing never moves it.

A counter reads only once written: its first increment (at create) starts it at no less
than the highest value of any counter index deleted from that TPM (TPM 2.0 part 1,
"NV Counters"), so deleting the index and defining it again cannot take it back. The index is authorised by a value the custody derives
from its master secret, so a process that merely reaches ``/dev/tpmrm0`` cannot move it.
"""
from __future__ import annotations

import contextlib
import json
import secrets
import threading
from pathlib import Path

from ..errors import CryptobatError, IntegrityError
from .envelope import write_private

# owner-defined NV indices (TCG "Registry of Reserved TPM 2.0 Handles": 0x01000000-0x013FFFFF);
# a random one, so several tokens sharing a TPM do not collide
OWNER_FIRST = 0x01000000
OWNER_LAST = 0x013FFFFF
_SIZE = 8  # a counter is a 64-bit big-endian value


def _tpm():
    """tpm2-pytss, imported only by custodies that use a TPM."""
    try:
        import tpm2_pytss as t
    except ImportError as e:
        raise CryptobatError(f"the TPM rollback counter needs tpm2-pytss ({e})") from None
    return t


def _attributes():
    t = _tpm()
    return (t.TPMA_NV.AUTHREAD | t.TPMA_NV.AUTHWRITE | t.TPMA_NV.NO_DA
            | (t.TPM2_NT.COUNTER << t.TPMA_NV.TPM2_NT_SHIFT))


def _used_indices(esapi) -> set[int]:
    t = _tpm()
    used: set[int] = set()
    start = t.TPM2_HR.NV_INDEX
    while True:
        more, data = esapi.get_capability(t.TPM2_CAP.HANDLES, start, 256)
        handles = list(data.data.handles)
        used.update(int(h) for h in handles)
        if not more or not handles:
            return used
        start = int(handles[-1]) + 1


class NvCounter:
    """An NV counter index on a TPM; ``read``/``increment`` serialized (the daemon has threads).

    The ESAPI context is the custody's: calls made here must not interleave with the custody's
    own, so a custody sharing its context passes its device lock as ``lock`` (the token calls
    :meth:`read` and :meth:`increment` without holding it)."""

    def __init__(self, esapi, index: int, handle, lock: threading.Lock | None = None) -> None:
        self.index = index
        self._esapi = esapi
        self._handle = handle
        self._lock = lock or threading.Lock()

    @classmethod
    def create(cls, esapi, auth: bytes, lock: threading.Lock | None = None) -> "NvCounter":
        """Define a counter at a free owner index, authorised by ``auth``, and initialise it.

        The caller records :attr:`index` (with the custody's configuration) to :meth:`open` it again."""
        t = _tpm()
        used = _used_indices(esapi)
        for _ in range(64):
            index = OWNER_FIRST + secrets.randbelow(OWNER_LAST - OWNER_FIRST + 1)
            if index not in used:
                break
        else:
            raise CryptobatError("no free NV index on the TPM for the rollback counter")
        public = t.TPM2B_NV_PUBLIC(nvPublic=t.TPMS_NV_PUBLIC(
            nvIndex=index, nameAlg=t.TPM2_ALG.SHA256, attributes=_attributes(), dataSize=_SIZE))
        try:
            handle = esapi.nv_define_space(auth, public)
        except t.TSS2_Exception as e:
            raise CryptobatError(f"cannot define the TPM rollback counter at NV index {index:#010x}: {e}") from None
        counter = cls(esapi, index, handle, lock)
        try:
            counter.increment()  # a counter reads only once written; this sets its starting value
        except BaseException:
            with contextlib.suppress(Exception):  # the index is useless unwritten
                esapi.nv_undefine_space(handle)
            raise
        return counter

    @classmethod
    def open(cls, esapi, index: int, auth: bytes, lock: threading.Lock | None = None) -> "NvCounter":
        """The counter at ``index``, checked to be an ordinary counter index as :meth:`create` makes."""
        t = _tpm()
        try:
            handle = esapi.tr_from_tpmpublic(index)
            public, _ = esapi.nv_read_public(handle)
        except t.TSS2_Exception as e:
            raise IntegrityError(f"the TPM's rollback counter (NV index {index:#010x}) cannot be found ({e}): "
                                 f"another TPM, or the TPM was cleared") from None
        nv = public.nvPublic
        if int(nv.attributes) & ~int(t.TPMA_NV.WRITTEN) != int(_attributes()) or nv.dataSize != _SIZE:
            raise IntegrityError(f"NV index {index:#010x} is not the token's rollback counter "
                                 f"(attributes {int(nv.attributes):#x})")
        esapi.tr_set_auth(handle, auth)
        return cls(esapi, index, handle, lock)

    def read(self) -> int:
        t = _tpm()
        with self._lock:
            try:
                data = self._esapi.nv_read(self._handle, _SIZE)
            except t.TSS2_Exception as e:
                raise IntegrityError(f"cannot read the TPM's rollback counter (NV index {self.index:#010x}): "
                                     f"{e}") from None
        return int.from_bytes(bytes(data), "big")

    def increment(self) -> int:
        """Add one on the device; the new value."""
        t = _tpm()
        with self._lock:
            try:
                self._esapi.nv_increment(self._handle)
            except t.TSS2_Exception as e:
                raise CryptobatError(f"cannot increment the TPM's rollback counter "
                                     f"(NV index {self.index:#010x}): {e}") from None
        return self.read()

    def undefine(self) -> None:
        """Remove the index from the TPM (a counter no token state refers to: a failed init or
        migration); errors are ignored, as the counter is being abandoned anyway."""
        with self._lock, contextlib.suppress(Exception):
            self._esapi.nv_undefine_space(self._handle)



COUNTER_FILE = "nvcounter.json"  # the counter's NV index, in the token's home


class MissingCounter:
    """The token's counter could not be opened (its index undefined or replaced by someone with
    access to the TPM, the TPM cleared, ``nvcounter.json`` lost). Reading it fails, so the token
    is refused, yet it still opens held (``--rollback-hold``): a quorum's ``acceptrollback``
    then makes a new counter. Failing at open instead would let anyone who can reach the TPM
    lock the officers out of their own token for good."""

    def __init__(self, problem: str) -> None:
        self.problem = problem

    def read(self) -> int:
        raise IntegrityError(f"{self.problem}; not serving. Officers decide at the token's console: "
                             f"cryptobat console --rollback-hold, then acceptrollback (quorum) makes a new counter")

    increment = read


def attach(esapi, home: Path | str, auth: bytes, create: bool = False,
           lock: threading.Lock | None = None) -> "NvCounter | MissingCounter":
    """A custody's counter: made at init (its index written to HOME/nvcounter.json, 0600,
    whole or not at all) or opened again from that file (a :class:`MissingCounter` when it
    cannot be)."""
    path = Path(home) / COUNTER_FILE
    if not create:
        try:
            index = int(json.loads(path.read_text())["index"])
            return NvCounter.open(esapi, index, auth, lock)
        except FileNotFoundError:
            return MissingCounter(f"{path} is missing: the token's rollback counter cannot be found")
        except (OSError, ValueError, KeyError, TypeError) as e:
            return MissingCounter(f"{path} is damaged ({type(e).__name__})")
        except IntegrityError as e:
            return MissingCounter(str(e))
    counter = NvCounter.create(esapi, auth, lock)
    try:
        write_private(path, json.dumps({"index": counter.index}).encode() + b"\n")
    except BaseException:
        counter.undefine()  # nothing names it: it would only take one of the TPM's few NV indices
        raise
    return counter
