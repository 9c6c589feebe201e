"""TPM 2.0 custody: DNSSEC keys created and used inside a TPM (tpm2-pytss, ESAPI over a TCTI).

What lives where:

- The storage primary (ECC P-256, restricted decrypt, AES-128-CFB) is made with
  TPM2_CreatePrimary at every open. The same owner seed and template give the same key,
  so it needs no persistent handle (no NV slot is taken, nothing to evict); a TPM2_Clear
  changes the owner seed and with it every key, as it should. The owner hierarchy's
  authorization is expected empty (the default).
- ``HOME/tpm2-master`` (0600): the 32-byte master secret as a sealed data object under the
  primary (its public and private areas; the private area is encrypted by the TPM, so the
  file is useless with any other TPM). Sealed to PCRs when the token was created with
  ``pcrs``. Seal, unseal, the store's MAC key and the passphrase pepper derive from it
  exactly as the software custody's do (:class:`.envelope.Envelope`).
- ``HOME/tpm2.json``: the TCTI and the PCRs.
- A key blob is ``seal(TPM2B_PUBLIC, TPM2B_PRIVATE, nonce)``: the private area is the TPM's
  own wrapping (fixedTPM|fixedParent for keys made here); the key's authValue is an HMAC of
  the nonce under the master secret, so a stolen blob plus access to the TPM signs nothing
  without the master secret (the TPM answers TPM_RC_AUTH_FAIL).

Imported keys (TPM2_Import of a software key) cannot be fixedTPM/fixedParent (the TPM
refuses those attributes on import); they have an empty authPolicy, so no policy can ever
authorize TPM2_Duplicate: they do not leave this TPM again either.

Keys are created ``noDA``: their authValue is 256 bits, so the dictionary-attack lockout
adds nothing against guessing and would only let a process with TPM access lock the
token out by failing on purpose.

The TPM holds few loaded objects (swtpm: 3); keys stay resident in a least-recently-used
set that fits beside the primary and are reloaded on demand. Every device call holds one
lock: ESAPI contexts are not thread-safe, and a TPM does one command at a time anyway.
"""
from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import struct
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

from cryptography.hazmat.primitives import serialization
# The TSS logs every TPM error to stderr, including those handled here (a full TPM, a refused
# unseal); they are reported as exceptions instead. TSS2_LOG set by the operator still wins.
os.environ.setdefault("TSS2_LOG", "all+none")

from tpm2_pytss import ESAPI, TSS2_Exception
from tpm2_pytss.constants import (ESYS_TR, TPM2_ALG, TPM2_CAP, TPM2_ECC, TPM2_PT, TPM2_PT_FIRMWARE, TPM2_PT_HR,
                                  TPM2_RC, TPM2_RH, TPM2_SE, TPM2_ST, TPMA_OBJECT, TPMA_SESSION)
from tpm2_pytss.types import (TPM2B_DIGEST, TPM2B_PRIVATE, TPM2B_PUBLIC, TPM2B_SENSITIVE, TPM2B_SENSITIVE_CREATE,
                              TPML_PCR_SELECTION, TPMS_CONTEXT, TPMS_SENSITIVE_CREATE, TPMT_PUBLIC, TPMT_PUBLIC_PARMS,
                              TPMT_SIG_SCHEME, TPMT_SYM_DEF, TPMT_SYM_DEF_OBJECT, TPMT_TK_HASHCHECK)
from tpm2_pytss.utils import wrap

from .. import algorithms
from ..errors import CryptobatError, IntegrityError, InvalidArgument
from . import nvcounter
from .envelope import MASTER_LEN, Envelope, Sealing, mixed_random, write_private

DEFAULT_TCTI = "device:/dev/tpmrm0"
MASTER_FILE = "tpm2-master"
CONFIG_FILE = "tpm2.json"
_BLOB_MAGIC = b"CBT2\x01"
_NONCE_LEN = 32
SAVED_CONTEXTS = 256  # contexts of evicted keys kept for a fast reload (about 1-2 KB each)

_SRK_ATTRS = (TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN
              | TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.NODA | TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.DECRYPT)
_KEY_ATTRS = TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.NODA
_MADE_HERE = TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN
_CURVES = {"secp256r1": TPM2_ECC.NIST_P256, "secp384r1": TPM2_ECC.NIST_P384}  # cryptography name -> TPM curve
_AES128CFB = TPMT_SYM_DEF(algorithm=TPM2_ALG.AES)
_AES128CFB.keyBits.aes = 128
_AES128CFB.mode.aes = TPM2_ALG.CFB
_NULL_TICKET = TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL)  # unrestricted keys need none
_KEY_SCHEME = TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)  # the scheme fixed in the key
_SESSION_BITS = TPMA_SESSION.CONTINUESESSION | TPMA_SESSION.DECRYPT | TPMA_SESSION.ENCRYPT


def _rc(e: TSS2_Exception) -> int:
    """The TPM response code without its handle/session/parameter number (TPM2_RC.AUTH_FAIL...)."""
    return int(e.error)


def _hash_alg(name: str) -> TPM2_ALG:
    return getattr(TPM2_ALG, name.upper())


def _key_public(alg: algorithms.DnssecAlgorithm, bits: int, attrs: int) -> TPM2B_PUBLIC:
    """The public template of a DNSSEC signing key: sign-only, unrestricted, the algorithm's
    signature scheme and hash fixed in the key (so it signs nothing else)."""
    pub = TPMT_PUBLIC(nameAlg=TPM2_ALG.SHA256, objectAttributes=attrs)
    h = _hash_alg(alg.hash)
    if alg.kind == "rsa":
        pub.type = TPM2_ALG.RSA
        d = pub.parameters.rsaDetail
        d.symmetric.algorithm = TPM2_ALG.NULL
        d.scheme.scheme = TPM2_ALG.RSASSA
        d.scheme.details.rsassa.hashAlg = h
        d.keyBits = bits
        d.exponent = 0  # 65537
    else:
        pub.type = TPM2_ALG.ECC
        d = pub.parameters.eccDetail
        d.symmetric.algorithm = TPM2_ALG.NULL
        d.scheme.scheme = TPM2_ALG.ECDSA
        d.scheme.details.ecdsa.hashAlg = h
        d.curveID = _CURVES[alg.curve.name]  # type: ignore[union-attr]
        d.kdf.scheme = TPM2_ALG.NULL
    return TPM2B_PUBLIC(publicArea=pub)


def primary_template() -> TPM2B_PUBLIC:
    """The storage primary: ECC P-256, restricted decrypt, AES-128-CFB (the TCG's SRK template)."""
    template = TPM2B_PUBLIC(publicArea=TPMT_PUBLIC(type=TPM2_ALG.ECC, nameAlg=TPM2_ALG.SHA256,
                                                   objectAttributes=_SRK_ATTRS))
    d = template.publicArea.parameters.eccDetail
    d.symmetric.algorithm = TPM2_ALG.AES
    d.symmetric.keyBits.aes = 128
    d.symmetric.mode.aes = TPM2_ALG.CFB
    d.scheme.scheme = TPM2_ALG.NULL
    d.curveID = TPM2_ECC.NIST_P256
    d.kdf.scheme = TPM2_ALG.NULL
    return template


def _pcr_list(pcrs: Any) -> tuple[int, ...]:
    """PCR numbers from a list or ``"0,2,4,7"``; InvalidArgument in one line otherwise."""
    try:
        items = pcrs.split(",") if isinstance(pcrs, str) else list(pcrs or ())
        out = tuple(sorted({int(p) for p in items if str(p).strip()}))
    except (TypeError, ValueError):
        out = (-1,)
    if any(not 0 <= p < 24 for p in out):
        raise InvalidArgument(f"PCRs must be numbers from 0 to 23 (e.g. 0,2,4,7), not {pcrs!r}"[:200])
    return out


def _connect(tcti: str) -> ESAPI:
    try:
        # ESAPI loads the TCTI from the text itself, and so finalizes it in close(): one made
        # here and passed in would keep its connection (a resource manager's slot) until
        # garbage-collected
        return ESAPI(tcti)
    except Exception as e:  # TSS2_Exception or OSError
        raise CryptobatError(f"cannot reach the TPM at {tcti}: {e}") from None


class _TpmKey:
    """A key of this custody: its TPM blobs and authValue, made resident in the TPM on use."""

    __slots__ = ("custody", "alg", "public", "private", "auth", "ident")

    def __init__(self, custody: "Tpm2Custody", alg: algorithms.DnssecAlgorithm, public: TPM2B_PUBLIC,
                 private: TPM2B_PRIVATE, auth: bytes) -> None:
        self.custody, self.alg, self.public, self.private, self.auth = custody, alg, public, private, auth
        self.ident = hashlib.sha256(private.marshal()).digest()

    def sign(self, data: bytes) -> bytes:
        """DNSSEC signature over RRSIG signing data: hashed here, signed in the TPM."""
        return self.custody._sign(self, hashlib.new(self.alg.hash, data).digest())  # type: ignore[arg-type]

    def sign_digest(self, digest: bytes) -> bytes:
        if len(digest) != self.alg.hash_len:
            raise CryptobatError("hash-only signing is not defined for this key type")
        return self.custody._sign(self, digest)

    def resident(self) -> int:
        """Load the key into the TPM (if it is not) and return its transient handle (0x80xxxxxx).

        For display (the console's ``tpmloadkey``): signing still goes through the token's
        policy check and :meth:`sign`; the handle may change once the key is evicted and reloaded."""
        return self.custody._resident_handle(self)

    def handle(self) -> int | None:
        """Its transient handle if it is loaded now (it may have been evicted for another key)."""
        return self.custody._current_handle(self)

    def unload(self) -> None:
        """Flush the key from the TPM now (it is reloaded on the next use)."""
        self.custody._unload(self)


class Tpm2Custody(Sealing):
    """Keys inside a TPM 2.0; the master secret sealed in it (optionally to PCRs)."""

    name = "tpm2"
    parallel = False  # one TPM connection, one process: the token signs in its own
    concurrent = False  # ... one command at a time

    def __init__(self, home: Path, create: bool = False, config: dict[str, Any] | None = None) -> None:
        self.home = Path(home)
        self.tcti, self.pcrs, new = self._settings(create, config or {})
        self._new = new  # made here: discard() may remove what it put in the TPM
        self._lock = threading.RLock()
        self._resident: OrderedDict[bytes, ESYS_TR] = OrderedDict()  # key ident -> loaded handle
        self._saved: OrderedDict[bytes, TPMS_CONTEXT] = OrderedDict()  # key ident -> context of an evicted key
        self._esys: ESAPI | None = _connect(self.tcti)
        try:
            self._slots = max(1, self._property(TPM2_PT_HR.TRANSIENT_AVAIL) - 1)  # beside the primary
            self._device = self._device_text()
            self._primary, self._parent = self._create_primary()
            self._session = self._start_session(TPM2_SE.HMAC)
            master = self._master(create)
            self._envelope = Envelope(master)
            self._auth_key = hmac.new(master, b"cryptobat tpm2 key auth", hashlib.sha256).digest()
            # the rollback counter (see cryptobat.rollback), authorised by the master secret
            self._counter_auth = hmac.new(master, b"cryptobat rollback counter", hashlib.sha256).digest()
            self._counter = nvcounter.attach(self._esys, self.home, self._counter_auth, create=new, lock=self._lock)
            if new:
                write_private(self.home / CONFIG_FILE,
                              json.dumps({"tcti": self.tcti, "pcrs": list(self.pcrs)}).encode())
        except BaseException:
            self.discard()
            raise

    # --- opening -------------------------------------------------------------------
    def _settings(self, create: bool, config: dict[str, Any]) -> tuple[str, tuple[int, ...], bool]:
        """TCTI, PCRs and whether to write them: from ``config`` at creation (HOME/tpm2.json is
        written once the master secret is sealed); when opening, from that file, ``config``
        only naming another TCTI (the PCRs are fixed by the seal)."""
        path = self.home / CONFIG_FILE
        if create and not path.exists():
            return str(config.get("tcti") or DEFAULT_TCTI), _pcr_list(config.get("pcrs")), True
        try:
            saved = json.loads(path.read_text())
            return str(config.get("tcti") or saved["tcti"]), tuple(int(p) for p in saved["pcrs"]), False
        except FileNotFoundError:
            raise CryptobatError(f"no TPM 2.0 token at {self.home} ({path} is missing)") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise IntegrityError(f"{path} is unreadable or damaged: {e}") from None

    def _property(self, prop: int) -> int:
        _, cap = self._esys.get_capability(TPM2_CAP.TPM_PROPERTIES, prop, 1)  # type: ignore[union-attr]
        props = cap.data.tpmProperties
        return int(props.tpmProperty[0].value) if props.count and props.tpmProperty[0].property == prop else 0

    def _device_text(self) -> str:
        maker = self._property(TPM2_PT.MANUFACTURER).to_bytes(4, "big").rstrip(b"\0 ").decode("ascii", "replace")
        v1, v2 = self._property(TPM2_PT_FIRMWARE.VERSION_1), self._property(TPM2_PT_FIRMWARE.VERSION_2)
        # vendors number firmware differently (Infineon 7.85 is 0x00070055, IBM's swtpm a date): both forms
        return f"{maker} firmware {v1 >> 16}.{v1 & 0xFFFF} (0x{v1:08x} 0x{v2:08x})"

    def _create_primary(self) -> tuple[ESYS_TR, TPMT_PUBLIC]:
        template = primary_template()
        try:
            handle, public, *_ = self._esys.create_primary(TPM2B_SENSITIVE_CREATE(), template,  # type: ignore
                                                           primary_handle=ESYS_TR.OWNER)
        except TSS2_Exception as e:
            if _rc(e) == TPM2_RC.OBJECT_MEMORY:
                raise CryptobatError(f"the TPM at {self.tcti} has no free object slot: another program holds them "
                                     f"(without a resource manager, /dev/tpmrm0 or tpm2-abrmd, one program at a "
                                     f"time can use a TPM)") from None
            raise CryptobatError(f"the TPM refused to create the storage primary key: {e}") from None
        return handle, public.publicArea

    def _start_session(self, kind: TPM2_SE) -> ESYS_TR:
        """A session salted with the primary, encrypting the parameters that carry secrets: a new
        key's authValue (TPM2_Create) and the master secret (TPM2_Unseal).

        Signing proves a key's authValue with a password session instead: an HMAC session costs
        the client ~4 ms of CPU per command in ESAPI (measured on swtpm: 100 vs 650 signatures/s).
        A password crosses the TPM's bus in the clear, where only someone with physical access
        to the bus or root on the host could read it, and they would still need the blob."""
        s = self._esys.start_auth_session(tpm_key=self._primary, bind=ESYS_TR.NONE,  # type: ignore
                                          session_type=kind, symmetric=_AES128CFB, auth_hash=TPM2_ALG.SHA256)
        self._esys.trsess_set_attributes(s, TPMA_SESSION.CONTINUESESSION, _SESSION_BITS)  # type: ignore
        return s

    def _pcr_selection(self) -> TPML_PCR_SELECTION:
        return TPML_PCR_SELECTION.parse("sha256:" + ",".join(map(str, self.pcrs)))

    def _master(self, create: bool) -> bytes:
        path = self.home / MASTER_FILE
        if create and not path.exists():
            master = self.random(MASTER_LEN)
            write_private(path, self._seal_master(master), exclusive=True)
            return master
        try:
            sealed = path.read_bytes()
        except FileNotFoundError:
            raise IntegrityError(f"{path} is missing: the token's keys cannot be used without it "
                                 f"(restore it from the token's backup)") from None
        except OSError as e:
            raise IntegrityError(f"cannot read {path}: {e.strerror}") from None
        return self._unseal_master(path, sealed)

    def _seal_master(self, master: bytes) -> bytes:
        attrs = TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.NODA
        pub = TPMT_PUBLIC(type=TPM2_ALG.KEYEDHASH, nameAlg=TPM2_ALG.SHA256,
                          objectAttributes=attrs if self.pcrs else attrs | TPMA_OBJECT.USERWITHAUTH)
        pub.parameters.keyedHashDetail.scheme.scheme = TPM2_ALG.NULL
        if self.pcrs:
            trial = self._esys.start_auth_session(ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.TRIAL,  # type: ignore
                                                  TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL), TPM2_ALG.SHA256)
            try:
                self._esys.policy_pcr(trial, TPM2B_DIGEST(), self._pcr_selection())  # type: ignore
                pub.authPolicy = self._esys.policy_get_digest(trial)  # type: ignore
            finally:
                self._esys.flush_context(trial)  # type: ignore
        with self._lock:
            self._esys.trsess_set_attributes(self._session, TPMA_SESSION.DECRYPT, TPMA_SESSION.DECRYPT)
            try:
                private, public, *_ = self._esys.create(  # type: ignore
                    self._primary, TPM2B_SENSITIVE_CREATE(TPMS_SENSITIVE_CREATE(data=master)),
                    TPM2B_PUBLIC(publicArea=pub), session1=self._session)
            finally:
                self._esys.trsess_set_attributes(self._session, 0, TPMA_SESSION.DECRYPT)
        return public.marshal() + private.marshal()

    def _unseal_master(self, path: Path, sealed: bytes) -> bytes:
        esys = self._esys
        try:
            public, n = TPM2B_PUBLIC.unmarshal(sealed)
            private, m = TPM2B_PRIVATE.unmarshal(sealed[n:])
            if n + m != len(sealed):
                raise ValueError("trailing bytes")
        except Exception:
            raise IntegrityError(f"{path} is damaged (not a sealed TPM object)") from None
        try:
            handle = esys.load(self._primary, private, public)  # type: ignore[union-attr]
        except TSS2_Exception as e:
            raise IntegrityError(f"{path} cannot be loaded into the TPM at {self.tcti} ({e}): it was sealed by "
                                 f"another TPM, or this TPM was cleared since") from None
        policy = None
        try:
            if self.pcrs:
                policy = self._start_session(TPM2_SE.POLICY)
                esys.policy_pcr(policy, TPM2B_DIGEST(), self._pcr_selection())  # type: ignore[union-attr]
            session = policy or self._session
            esys.trsess_set_attributes(session, TPMA_SESSION.ENCRYPT, TPMA_SESSION.ENCRYPT)  # type: ignore
            try:
                master = bytes(esys.unseal(handle, session1=session))  # type: ignore[union-attr]
            finally:
                if policy is None:
                    esys.trsess_set_attributes(session, 0, TPMA_SESSION.ENCRYPT)  # type: ignore[union-attr]
        except TSS2_Exception as e:
            if _rc(e) in (TPM2_RC.POLICY_FAIL, TPM2_RC.VALUE) and self.pcrs:
                raise IntegrityError(f"the TPM will not unseal the master secret: PCRs "
                                     f"{','.join(map(str, self.pcrs))} differ from when the token was created "
                                     f"(boot chain or firmware changed)") from None
            raise IntegrityError(f"the TPM will not unseal the master secret: {e}") from None
        finally:
            esys.flush_context(handle)  # type: ignore[union-attr]
            if policy is not None:
                esys.flush_context(policy)  # type: ignore[union-attr]
        if len(master) != MASTER_LEN:
            raise IntegrityError(f"{path} is damaged (not a {MASTER_LEN}-byte master secret)")
        return master

    # --- the custody interface ------------------------------------------------------
    def _auth(self, nonce: bytes) -> bytes:
        """A key's authValue: only the holder of the master secret can compute it. Trailing
        zero bytes are dropped, as the TPM drops them from a stored authValue."""
        return hmac.new(self._auth_key, nonce, hashlib.sha256).digest().rstrip(b"\0")

    @staticmethod
    def _check(algorithm: int) -> algorithms.DnssecAlgorithm:
        alg = algorithms.by_number(algorithm)
        if not alg.tpm2 or not alg.generate:
            why = " (TPM 2.0 has no Edwards curves)" if alg.kind == "eddsa" else ""
            raise InvalidArgument(f"algorithm {alg.number} ({alg.mnemonic}) cannot be kept in tpm2 custody{why}")
        return alg

    def generate(self, algorithm: int, aad: bytes) -> tuple[bytes, bytes]:
        alg = self._check(algorithm)
        nonce = self.random(_NONCE_LEN)
        template = _key_public(alg, alg.rsa_default_bits or 0, _KEY_ATTRS | _MADE_HERE)
        with self._lock:
            esys = self._esys
            esys.trsess_set_attributes(self._session, TPMA_SESSION.DECRYPT, TPMA_SESSION.DECRYPT)  # type: ignore
            try:
                sensitive = TPM2B_SENSITIVE_CREATE(TPMS_SENSITIVE_CREATE(userAuth=self._auth(nonce)))
                private, public, *_ = self._with_room(lambda: esys.create(  # type: ignore[union-attr]
                    self._primary, sensitive, template, session1=self._session))
            except TSS2_Exception as e:
                raise CryptobatError(f"the TPM could not create a {alg.mnemonic} key: {e}") from None
            finally:
                esys.trsess_set_attributes(self._session, 0, TPMA_SESSION.DECRYPT)  # type: ignore[union-attr]
        return _dnskey_field(alg, public), self.seal(_pack(public, private, nonce), aad)

    def import_key(self, algorithm: int, private_key, aad: bytes) -> tuple[bytes, bytes]:
        """TPM2_Import of a software key: wrapped to the primary's public key here (TPM 2.0
        Part 1 §23.3, duplication), unwrapped inside the TPM; the DNSKEY stays the same."""
        alg = self._check(algorithm)
        if not isinstance(private_key, alg.dnspython.key_cls) or (
                alg.kind == "ecdsa" and private_key.curve.name != alg.curve.name):  # type: ignore[union-attr]
            raise InvalidArgument(f"the key is not an {alg.mnemonic} key")
        pem = private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
        nonce = self.random(_NONCE_LEN)
        bits = private_key.key_size if alg.kind == "rsa" else 0
        try:
            sensitive = TPM2B_SENSITIVE.from_pem(pem)
        except ValueError as e:
            raise InvalidArgument(f"this key cannot be kept in a TPM: {e}") from None
        finally:
            del pem
        sensitive.sensitiveArea.authValue = self._auth(nonce)
        public = _key_public(alg, bits, _KEY_ATTRS)
        cpub = private_key.public_key()
        if alg.kind == "rsa":
            if cpub.public_numbers().e != 65537:
                raise InvalidArgument("only RSA keys with exponent 65537 can be kept in a TPM")
            public.publicArea.unique.rsa = cpub.public_numbers().n.to_bytes(bits // 8, "big")
        else:
            size = alg.signature_len // 2  # type: ignore[operator]
            public.publicArea.unique.ecc.x = cpub.public_numbers().x.to_bytes(size, "big")
            public.publicArea.unique.ecc.y = cpub.public_numbers().y.to_bytes(size, "big")
        with self._lock:
            esys = self._esys
            if alg.kind == "rsa":
                self._check_rsa_size(bits)
            enc_key, duplicate, seed = wrap(self._parent, public, sensitive)
            try:
                private = self._with_room(lambda: esys.import_(  # type: ignore[union-attr]
                    self._primary, enc_key, public, duplicate, seed, TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL)))
            except TSS2_Exception as e:
                raise CryptobatError(f"the TPM refused to import the {alg.mnemonic} key: {e}") from None
        return _dnskey_field(alg, public), self.seal(_pack(public, private, nonce), aad)

    def _check_rsa_size(self, bits: int) -> None:
        parms = TPMT_PUBLIC_PARMS(type=TPM2_ALG.RSA)
        parms.parameters.rsaDetail.keyBits = bits
        parms.parameters.rsaDetail.symmetric.algorithm = TPM2_ALG.NULL
        parms.parameters.rsaDetail.scheme.scheme = TPM2_ALG.NULL
        try:
            self._esys.test_parms(parms)  # type: ignore[union-attr]
        except TSS2_Exception:
            raise InvalidArgument(f"this TPM cannot hold {bits}-bit RSA keys") from None

    def load(self, algorithm: int, blob: bytes, aad: bytes) -> _TpmKey:
        alg = self._check(algorithm)
        public, private, nonce = _unpack(self.unseal(blob, aad))
        key = _TpmKey(self, alg, public, private, self._auth(nonce))
        self._resident_handle(key)  # a blob of another TPM fails here, not at the first signature
        return key

    def destroy(self, blob: bytes, aad: bytes) -> None:
        """Nothing to delete in the TPM (the blob is the key); a resident copy is flushed."""
        try:
            _, private, _ = _unpack(self.unseal(blob, aad))
        except CryptobatError:
            return
        with self._lock:
            ident = hashlib.sha256(private.marshal()).digest()
            self._saved.pop(ident, None)
            handle = self._resident.pop(ident, None)
            if handle is not None:
                self._flush(handle)

    def random(self, n: int) -> bytes:
        """n bytes from the OS generator and TPM2_GetRandom together."""
        def device() -> bytes:
            got = bytearray()
            with self._lock:
                while len(got) < 32:
                    got += bytes(self._esys.get_random(32 - len(got)))  # type: ignore[union-attr]
            return bytes(got)
        return mixed_random(n, device)

    def describe(self) -> dict[str, str]:
        with self._lock:
            loaded = len(self._resident)
        return {"kind": "tpm2", "device": self._device, "tcti": self.tcti,
                "objects loaded": f"{loaded + 1} of {self._slots + 1} (the primary and {loaded} keys)",
                "pcrs": ",".join(map(str, self.pcrs)) or "none"}

    def counter(self) -> nvcounter.NvCounter | nvcounter.MissingCounter:
        return self._counter

    def renew_counter(self) -> nvcounter.NvCounter:
        """A new rollback counter in place of one that cannot be read (a quorum's decision:
        :meth:`cryptobat.token.Token.acceptrollback`)."""
        with self._lock:
            self._counter = nvcounter.attach(self._esys, self.home, self._counter_auth, create=True, lock=self._lock)
            return self._counter

    def kept(self) -> None:
        """A committed token state refers to this custody: :meth:`discard` keeps its counter."""
        self._new = False

    def discard(self) -> None:
        """Close, first removing the rollback counter's NV index if this object defined it: for
        a custody no token state came to refer to (a failed init, a migration that did not
        commit). Keys need nothing: a TPM key is its blob, and no blob is kept."""
        counter = getattr(self, "_counter", None)
        try:
            if getattr(self, "_new", False) and isinstance(counter, nvcounter.NvCounter):
                counter.undefine()
        finally:
            self._new = False
            self.close()

    def close(self) -> None:
        with self._lock:
            esys, self._esys = self._esys, None
            if esys is None:
                return
            # flushed explicitly: without a resource manager (swtpm, a bare /dev/tpm0) they would
            # stay loaded after the connection ends and fill the TPM's few slots
            handles = [*self._resident.values(), *(getattr(self, a, None) for a in ("_session", "_primary"))]
            self._resident.clear()
            self._saved.clear()
            for handle in handles:
                if handle is not None:
                    with contextlib.suppress(TSS2_Exception):
                        esys.flush_context(handle)
            with contextlib.suppress(Exception):
                esys.close()

    # --- resident keys ----------------------------------------------------------------
    def _resident_handle(self, key: _TpmKey) -> int:
        with self._lock:
            return int(self._esys.tr_get_tpm_handle(self._handle(key)))  # type: ignore[union-attr]

    def _current_handle(self, key: _TpmKey) -> int | None:
        with self._lock:
            handle = self._resident.get(key.ident)
            return None if handle is None else int(self._esys.tr_get_tpm_handle(handle))  # type: ignore[union-attr]

    def _handle(self, key: _TpmKey) -> ESYS_TR:
        """``key``'s loaded handle, loading it (the least recently used out first if full); lock held."""
        resident = self._resident
        handle = resident.get(key.ident)
        if handle is not None:
            resident.move_to_end(key.ident)
            return handle
        if self._esys is None:
            raise CryptobatError("the TPM custody is closed")
        while len(resident) >= self._slots:
            self._evict()
        esys = self._esys
        handle = None
        saved = self._saved.get(key.ident)
        if saved is not None:  # TPM2_ContextLoad: 2.5x faster than TPM2_Load for a P-256 key on swtpm
            self._saved.move_to_end(key.ident)
            try:
                handle = self._with_room(lambda: esys.context_load(saved))  # type: ignore[union-attr]
            except TSS2_Exception:  # a context from before a power cycle: load anew
                del self._saved[key.ident]
        if handle is None:
            try:
                handle = self._with_room(lambda: esys.load(self._primary, key.private, key.public))  # type: ignore
            except TSS2_Exception as e:
                if _rc(e) in (TPM2_RC.INTEGRITY, TPM2_RC.BINDING):
                    raise IntegrityError(f"the key cannot be loaded into the TPM at {self.tcti}: it was made by "
                                         f"another TPM, or this TPM was cleared since ({e})") from None
                raise CryptobatError(f"the TPM could not load the key: {e}") from None
        esys.tr_set_auth(handle, key.auth)
        resident[key.ident] = handle
        return handle

    def _with_room(self, command: Callable[[], Any]) -> Any:
        """Run a TPM command that needs a free object slot (TPM2_Create, Load, Import): when the
        TPM has none, flush the least recently used key and try again; lock held."""
        while True:
            try:
                return command()
            except TSS2_Exception as e:
                if _rc(e) != TPM2_RC.OBJECT_MEMORY or not self._resident:
                    raise
                self._evict()

    def _evict(self) -> None:
        """Flush the least recently used key, its context saved first (TPM2_ContextSave: the TPM
        encrypts it under a key of its own, valid until the next power cycle) so that it comes
        back with TPM2_ContextLoad rather than a full TPM2_Load; lock held."""
        ident, handle = self._resident.popitem(last=False)
        if ident not in self._saved:  # an object's saved context loads any number of times
            with contextlib.suppress(TSS2_Exception):
                self._saved[ident] = self._esys.context_save(handle)  # type: ignore[union-attr]
                while len(self._saved) > SAVED_CONTEXTS:
                    self._saved.popitem(last=False)
        self._flush(handle)

    def _flush(self, handle: ESYS_TR) -> None:
        try:
            self._esys.flush_context(handle)  # type: ignore[union-attr]
        except TSS2_Exception:
            pass  # already gone (a power cycle or the resource manager)

    def _unload(self, key: _TpmKey) -> None:
        with self._lock:
            self._saved.pop(key.ident, None)
            handle = self._resident.pop(key.ident, None)
            if handle is not None:
                self._flush(handle)

    def _sign(self, key: _TpmKey, digest: bytes) -> bytes:
        with self._lock:
            handle = self._handle(key)
            try:
                sig = self._esys.sign(handle, TPM2B_DIGEST(digest),  # type: ignore[union-attr]
                                      _KEY_SCHEME, _NULL_TICKET)
            except TSS2_Exception as e:
                raise CryptobatError(f"the TPM refused to sign: {e}") from None
        return _dnssec_signature(key.alg, sig.marshal())


def _dnssec_signature(alg: algorithms.DnssecAlgorithm, wire: bytes) -> bytes:
    """DNSSEC form of a marshalled TPMT_SIGNATURE (TPM 2.0 Part 2 §11.3.4: sigAlg, hash, then the
    RSA signature or ECDSA r and s, each a TPM2B): RSA as is, ECDSA r||s at the curve's width.
    Read from the wire form because tpm2-pytss's attribute access costs over 100 us a signature."""
    size = int.from_bytes(wire[4:6], "big")
    first = wire[6:6 + size]
    if alg.kind == "rsa":
        return first
    n = alg.signature_len // 2  # type: ignore[operator]
    rest = wire[6 + size:]
    second = rest[2:2 + int.from_bytes(rest[:2], "big")]
    return first.rjust(n, b"\0") + second.rjust(n, b"\0")


def _dnskey_field(alg: algorithms.DnssecAlgorithm, public: TPM2B_PUBLIC) -> bytes:
    """The DNSKEY public key field of a TPM public area (dnspython encodes it)."""
    key = serialization.load_pem_public_key(public.publicArea.to_pem())
    return alg.dnspython.public_cls(key=key).encode_key_bytes()


def _pack(public: TPM2B_PUBLIC, private: TPM2B_PRIVATE, nonce: bytes) -> bytes:
    return _BLOB_MAGIC + public.marshal() + private.marshal() + struct.pack("B", len(nonce)) + nonce


def _unpack(content: bytes) -> tuple[TPM2B_PUBLIC, TPM2B_PRIVATE, bytes]:
    try:
        if not content.startswith(_BLOB_MAGIC):
            raise ValueError("not a TPM key")
        rest = content[len(_BLOB_MAGIC):]
        public, n = TPM2B_PUBLIC.unmarshal(rest)
        private, m = TPM2B_PRIVATE.unmarshal(rest[n:])
        nonce = rest[n + m + 1:]
        if len(nonce) != rest[n + m]:
            raise ValueError("bad nonce")
    except Exception:
        raise IntegrityError("the key blob is not a TPM 2.0 custody key (made by another custody?)") from None
    return public, private, nonce


