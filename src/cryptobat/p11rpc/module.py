"""PKCS#11 semantics over a :class:`~cryptobat.p11rpc.backend.Backend`, one instance per client.

One slot holding one token.  Every token key appears as a private-key object (visible
after login) and a public-key object.  ``CKA_LABEL`` is the UTF-8 token key label (unique
on the token, whereas key tags can collide); ``CKA_ID`` is the id the application gave
at C_GenerateKeyPair (any bytes), else the label too.  Destroying a public-key object
hides it from this connection only: the key, its private object and its DNSKEY stay
(OpenDNSSEC's ``<SkipPublicKey/>`` destroys it right after generation); destroying the
private-key object deletes the key, inside a quorum's window only.

Signing never bypasses the token: whole-data mechanisms go to ``timed_sign`` (the token
parses and policy-checks the RRSIG signing data); hash-only mechanisms go to
``sign_digest``. Which finished digests may be signed is the token's decision
(``bind_digest``); this module only keeps, per session, what it answered, and hands the
data back once when the very input it named is signed.

As p11-kit's rpc-server.c, this module decodes, calls and encodes: a token refusal
(:class:`cryptobat.errors.CryptobatError`) becomes its PKCS#11 code in :meth:`Module.call`.
"""
from __future__ import annotations

import base64
import hashlib
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Callable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

from .. import algorithms
from ..api import KeyInfo
from ..errors import CryptobatError
from . import constants as C
from .backend import Backend
from .codec import Attribute, Buffer, Mechanism, OutArray, encoded_length

SLOT_ID = 1
HANDSHAKE = b"PRIVATE-GNOME-KEYRING-PKCS11-PROTOCOL-V-1"
MAX_DATA = 8 * 1024 * 1024
MAX_RANDOM = 64 * 1024  # per call (PKCS#11 callers wanting more call again): bounds each reply
MAX_BOUND = 256


def _grouped(pairs: Iterable[tuple[int | None, algorithms.DnssecAlgorithm]]) -> dict[int, tuple[int, ...]]:
    """mechanism -> the algorithm numbers it applies to, in table order."""
    out: dict[int, tuple[int, ...]] = {}
    for mech, alg in pairs:
        if mech is not None:
            out[mech] = out.get(mech, ()) + (alg.number,)
    return out


# Whole-data signing only with the algorithms the token signs with; hash-only signing (and
# verifying) also with the RSASHA1 keys a token may still hold.
FULL_SIGN = _grouped((a.mech_sign, a) for a in algorithms.SIGNING)
HASH_SIGN = _grouped((a.mech_hash_sign, a) for a in algorithms.TABLE.values())
# algorithms whose private-key operation takes long (RSA: about a millisecond, against tens of
# microseconds for ECDSA and EdDSA): a front end may sign these off its event loop
SLOW_KEYS = frozenset(n for n, a in algorithms.TABLE.items() if a.kind == "rsa")
# CKM_RSA_PKCS_KEY_PAIR_GEN names no hash: it makes a key of the first RSA algorithm the token signs with
_RSA_KEYGEN = next(a for a in algorithms.SIGNING if a.kind == "rsa" and a.generate)
DIGESTS = {C.CKM_SHA_1: "sha1", C.CKM_SHA256: "sha256", C.CKM_SHA384: "sha384", C.CKM_SHA512: "sha512"}


def _bits(mech: int) -> tuple[int, int]:
    """CK_MECHANISM_INFO's (min, max) key size: the span of the algorithms ``mech`` serves."""
    rows = [a for a in algorithms.TABLE.values() if mech in (a.mech_keygen, a.mech_sign, a.mech_hash_sign)]
    return min(a.key_bits[0] for a in rows), max(a.key_bits[1] for a in rows)


_PREHASH = {h.digest_size: h for h in (hashes.SHA1(), hashes.SHA256(), hashes.SHA384(), hashes.SHA512())}

_SIGN_VERIFY = C.CKF_SIGN | C.CKF_VERIFY
_EC_FLAGS = _SIGN_VERIFY | C.CKF_EC_F_P | C.CKF_EC_NAMEDCURVE | C.CKF_EC_UNCOMPRESS
MECHANISMS: dict[int, tuple[int, int, int]] = {
    C.CKM_RSA_PKCS_KEY_PAIR_GEN: (*_bits(C.CKM_RSA_PKCS_KEY_PAIR_GEN), C.CKF_GENERATE_KEY_PAIR),
    C.CKM_RSA_PKCS: (*_bits(C.CKM_RSA_PKCS), _SIGN_VERIFY),
    C.CKM_SHA256_RSA_PKCS: (*_bits(C.CKM_SHA256_RSA_PKCS), _SIGN_VERIFY),
    C.CKM_SHA512_RSA_PKCS: (*_bits(C.CKM_SHA512_RSA_PKCS), _SIGN_VERIFY),
    C.CKM_EC_KEY_PAIR_GEN: (*_bits(C.CKM_EC_KEY_PAIR_GEN),
                            C.CKF_GENERATE_KEY_PAIR | C.CKF_EC_F_P | C.CKF_EC_NAMEDCURVE | C.CKF_EC_UNCOMPRESS),
    C.CKM_ECDSA: (*_bits(C.CKM_ECDSA), _EC_FLAGS),
    C.CKM_ECDSA_SHA256: (*_bits(C.CKM_ECDSA_SHA256), _EC_FLAGS),
    C.CKM_ECDSA_SHA384: (*_bits(C.CKM_ECDSA_SHA384), _EC_FLAGS),
    C.CKM_EC_EDWARDS_KEY_PAIR_GEN: (*_bits(C.CKM_EC_EDWARDS_KEY_PAIR_GEN), C.CKF_GENERATE_KEY_PAIR),
    C.CKM_EDDSA: (*_bits(C.CKM_EDDSA), _SIGN_VERIFY),
    C.CKM_SHA_1: (0, 0, C.CKF_DIGEST),
    C.CKM_SHA256: (0, 0, C.CKF_DIGEST),
    C.CKM_SHA384: (0, 0, C.CKF_DIGEST),
    C.CKM_SHA512: (0, 0, C.CKF_DIGEST),
}


def allowed_mechanisms(algorithm: int) -> list[int]:
    """CKA_ALLOWED_MECHANISMS of a key of DNSSEC ``algorithm``: what signs (and verifies) with it."""
    return [m for table in (FULL_SIGN, HASH_SIGN) for m, algs in table.items() if algorithm in algs]


class P11Error(Exception):
    def __init__(self, ckr: int) -> None:
        super().__init__(hex(ckr))
        self.ckr = ckr


@dataclass
class Op:
    mech: int
    key: KeyInfo | None = None
    data: bytearray = field(default_factory=bytearray)
    updated: bool = False
    result: bytes | None = None  # kept so a size query and the real call sign only once
    result_for: bytes | None = None
    hasher: Any = None
    keep: bool = True  # digest input still short enough to be checked for binding


@dataclass
class Session:
    handle: int
    rw: bool
    find: list[int] | None = None
    sign: Op | None = None
    verify: Op | None = None
    digest: Op | None = None
    bound: OrderedDict = field(default_factory=OrderedDict)  # (label, C_Sign input) -> data, from bind_digest


def _pad(s: str, n: int) -> bytes:
    b = s.encode()[:n]
    return b + b" " * (n - len(b))


def rsa_public(pub: bytes) -> tuple[int, int]:
    """(exponent, modulus) from an RFC 3110 DNSKEY public key field."""
    if pub[:1] == b"\0":
        elen, off = int.from_bytes(pub[1:3], "big"), 3
    else:
        elen, off = pub[0], 1
    return int.from_bytes(pub[off:off + elen], "big"), int.from_bytes(pub[off + elen:], "big")


def _der_octets(b: bytes) -> bytes:
    n = len(b)
    if n < 0x80:
        return b"\x04" + bytes([n]) + b
    ln = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return b"\x04" + bytes([0x80 | len(ln)]) + ln + b


def fit(buf: Buffer, data: bytes) -> tuple[OutArray, bool]:
    """Answer a receive buffer: (reply, whether the data was delivered)."""
    if buf.capacity is None or buf.capacity < len(data):
        return OutArray(None, len(data)), False
    return OutArray(data), True


def verify_signature(key: KeyInfo, mech: int, data: bytes, sig: bytes) -> bool:
    """Whether ``sig`` is ``key``'s ``mech`` signature over ``data`` (C_Verify).

    Whole-data mechanisms are DNSSEC signatures: :func:`cryptobat.algorithms.verify`. The
    hash-only ones are checked with ``cryptography`` directly, as dnspython cannot verify
    a signature over a hash it did not compute.
    """
    alg = algorithms.TABLE.get(key.algorithm)
    if alg is None:
        return False
    if mech != alg.mech_hash_sign:
        return algorithms.verify(alg.number, key.public_key, sig, data)
    try:
        if alg.kind == "rsa":
            e, n = rsa_public(key.public_key)
            pk = rsa.RSAPublicNumbers(e, n).public_key()
            return pk.recover_data_from_signature(sig, padding.PKCS1v15(), None) == data
        if alg.kind != "ecdsa" or len(sig) != alg.signature_len:
            return False
        assert isinstance(alg.curve, ec.EllipticCurve)
        half = len(key.public_key) // 2
        pk = ec.EllipticCurvePublicNumbers(int.from_bytes(key.public_key[:half], "big"),
                                           int.from_bytes(key.public_key[half:], "big"),
                                           alg.curve).public_key()
        der = utils.encode_dss_signature(int.from_bytes(sig[:len(sig) // 2], "big"),
                                         int.from_bytes(sig[len(sig) // 2:], "big"))
        algo = _PREHASH.get(len(data))  # CKM_ECDSA signs a hash of any length the client made
        if algo is None:
            return False
        pk.verify(der, data, ec.ECDSA(utils.Prehashed(algo)))
        return True
    except (InvalidSignature, ValueError):
        return False


def _b64(b: bytes | bytearray | None) -> str | None:
    return None if b is None else base64.b64encode(bytes(b)).decode()


def _unb64(s: str | None) -> bytes | None:
    return None if s is None else base64.b64decode(s, validate=True)


def _export_op(op: Op | None) -> dict | None:
    if op is None:
        return None
    return {"mech": op.mech, "key": op.key.label if op.key is not None else None, "data": _b64(op.data),
            "updated": op.updated, "result": _b64(op.result), "result_for": _b64(op.result_for),
            "keep": op.keep}


def _import_op(d: dict | None, keys: dict[str, KeyInfo]) -> Op | None:
    if d is None:
        return None
    key = None
    if d["key"] is not None:
        key = keys.get(d["key"])
        if key is None:
            return None
    op = Op(int(d["mech"]), key, bytearray(_unb64(d["data"]) or b""), bool(d["updated"]),
            _unb64(d["result"]), _unb64(d["result_for"]), keep=bool(d["keep"]))
    if op.mech in DIGESTS:  # a digest in progress: its input so far is kept whole (keep), so hash it again
        op.hasher = hashlib.new(DIGESTS[op.mech], bytes(op.data))
    return op


class Module:
    """PKCS#11 state for one client connection; backend calls go through ``locked``."""

    def __init__(self, backend: Backend, locked: Callable[[Callable[[], Any]], Any] | None = None):
        self.backend = backend
        self.locked = locked or (lambda f: f())
        self._direct = locked is None
        self._seen: tuple[Any, bool, dict[int, tuple[KeyInfo, bool]]] | None = None  # keys(), login, objects
        self._find_index: tuple[dict, dict[tuple[int, Any], dict[int, None]]] | None = None  # objects, index
        self._index_values: dict[tuple[KeyInfo, bool], tuple] = {}  # object -> its INDEXED values
        self.initialized = False
        self.logged_in = False
        self.sessions: dict[int, Session] = {}
        self.next_session = 1
        self.handles: dict[str, int] = {}
        self.next_handle = 1
        self.hidden: set[str] = set()  # labels whose public-key object this client destroyed

    # --- handing the connection to a restarted daemon ------------------------------------

    def export_state(self) -> dict:
        """This client's PKCS#11 state as JSON-able data, for :meth:`from_state` in a restarted daemon.

        Sessions, login, object handles, open find/sign/verify/digest operations and bound
        digests are kept. A digest whose input grew past what is kept for binding
        (MAX_DATA) cannot be resumed (a hash object's state cannot be exported); it is dropped.
        """
        return {
            "initialized": self.initialized, "logged_in": self.logged_in, "hidden": sorted(self.hidden),
            "next_session": self.next_session, "handles": dict(self.handles), "next_handle": self.next_handle,
            "sessions": [{
                "handle": s.handle, "rw": s.rw, "find": s.find,
                "sign": _export_op(s.sign), "verify": _export_op(s.verify),
                "digest": _export_op(s.digest) if s.digest is None or s.digest.result is not None
                or s.digest.keep else None,
                "bound": [[label, _b64(digest), _b64(data)] for (label, digest), data in s.bound.items()],
            } for s in self.sessions.values()],
        }

    @classmethod
    def from_state(cls, backend: Backend, locked: Callable[[Callable[[], Any]], Any] | None,
                   state: dict) -> "Module":
        """A Module that carries on where :meth:`export_state` left off, on ``backend``.

        An operation on a key the token no longer holds is dropped (as if never started)."""
        m = cls(backend, locked)
        m.initialized = bool(state["initialized"])
        m.logged_in = bool(state["logged_in"])
        m.next_session = int(state["next_session"])
        m.handles = {str(k): int(v) for k, v in state["handles"].items()}
        m.next_handle = int(state["next_handle"])
        m.hidden = {str(label) for label in state.get("hidden", ())}  # absent in an older daemon's state
        keys = {k.label: k for k in m._b(backend.keys)} if state["sessions"] else {}
        for d in state["sessions"]:
            s = Session(int(d["handle"]), bool(d["rw"]))
            s.find = None if d["find"] is None else [int(h) for h in d["find"]]
            s.sign = _import_op(d["sign"], keys)
            s.verify = _import_op(d["verify"], keys)
            s.digest = _import_op(d["digest"], keys)
            for label, digest, data in d["bound"]:
                s.bound[(str(label), _unb64(digest))] = _unb64(data)
            m.sessions[s.handle] = s
        return m

    def signs_slowly(self) -> bool:
        """Whether a session has a whole-data signature with a SLOW_KEYS key still to make
        (not one already made for a size query): its C_Sign or C_SignFinal will sign."""
        for s in self.sessions.values():
            op = s.sign
            if op is not None and op.result is None and op.key is not None \
                    and op.key.algorithm in SLOW_KEYS and op.mech in FULL_SIGN:
                return True
        return False

    # --- plumbing -------------------------------------------------------------------

    def call(self, name: str, args: list[Any]) -> list[Any]:
        """Run one PKCS#11 function; raises P11Error with the CKR on failure."""
        if name == "C_Initialize":
            return self.C_Initialize(*args)
        if not self.initialized:
            raise P11Error(C.CKR_CRYPTOKI_NOT_INITIALIZED)
        fn = getattr(self, name, None)
        if fn is None:
            raise P11Error(REFUSALS.get(name, C.CKR_FUNCTION_NOT_SUPPORTED))
        try:
            return fn(*args)
        except CryptobatError as e:
            raise P11Error(e.ckr) from None

    def _b(self, fn: Callable[..., Any], *a: Any) -> Any:
        if self._direct:
            return fn(*a)
        return self.locked(lambda: fn(*a))

    def _session(self, h: int) -> Session:
        s = self.sessions.get(h)
        if s is None:
            raise P11Error(C.CKR_SESSION_HANDLE_INVALID)
        return s

    def _slot(self, slot: int) -> None:
        if slot != SLOT_ID:
            raise P11Error(C.CKR_SLOT_ID_INVALID)

    def _objects(self) -> dict[int, tuple[KeyInfo, bool]]:
        """handle -> (key, is_private) for every object this client may currently see.

        A backend may return the very same list while its keys are unchanged (ServiceBackend
        caches it); the object map is then reused.  Callers must not modify the result.
        """
        keys = self._b(self.backend.keys)
        seen = self._seen
        if seen is not None and seen[0] is keys and seen[1] == self.logged_in:
            return seen[2]
        out: dict[int, tuple[KeyInfo, bool]] = {}
        for k in keys:
            base = self.handles.get(k.label)
            if base is None:
                base = self.handles[k.label] = self.next_handle
                self.next_handle += 2
            if k.label not in self.hidden:
                out[base + 1] = (k, False)
            if self.logged_in:
                out[base] = (k, True)
        self._seen = (keys, self.logged_in, out)
        return out

    def _object(self, h: int) -> tuple[KeyInfo, bool]:
        obj = self._objects().get(h)
        if obj is None:
            raise P11Error(C.CKR_OBJECT_HANDLE_INVALID)
        return obj

    def _key(self, h: int, private: bool) -> KeyInfo:
        obj = self._objects().get(h)
        if obj is None:
            raise P11Error(C.CKR_KEY_HANDLE_INVALID)
        if obj[1] != private:
            raise P11Error(C.CKR_KEY_FUNCTION_NOT_PERMITTED)
        return obj[0]

    # --- general and slot/token -------------------------------------------------------

    def C_Initialize(self, handshake: bytes | None, reserved_present: int, reserved: bytes | None):
        if handshake != HANDSHAKE:
            raise P11Error(C.CKR_GENERAL_ERROR)
        if self.initialized:
            raise P11Error(C.CKR_CRYPTOKI_ALREADY_INITIALIZED)
        self.initialized = True
        return []

    def C_Finalize(self):
        self.sessions.clear()
        self.logged_in = False
        self.initialized = False
        return []

    def C_GetInfo(self):
        return [(2, 40), _pad("Cryptobat", 32), 0, _pad("Cryptobat DNSSEC token", 32), (0, 1)]

    def C_GetSlotList(self, token_present: int, buf: Buffer):
        if buf.capacity is None or buf.capacity < 1:
            return [OutArray(None, 1)]
        return [OutArray([SLOT_ID])]

    def C_GetSlotInfo(self, slot: int):
        self._slot(slot)
        info = self._b(self.backend.info)
        return [_pad("Cryptobat token slot", 64), _pad(info.get("manufacturer", "Cryptobat"), 32),
                C.CKF_TOKEN_PRESENT, (0, 1), (0, 1)]

    def C_GetTokenInfo(self, slot: int):
        self._slot(slot)
        info = self._b(self.backend.info)
        flags = (C.CKF_LOGIN_REQUIRED | C.CKF_RNG | C.CKF_TOKEN_INITIALIZED
                 | C.CKF_USER_PIN_INITIALIZED | C.CKF_CLOCK_ON_TOKEN)
        left = info.get("pin_tries_left")
        if left is not None and info.get("pin_failures"):
            flags |= (C.CKF_USER_PIN_LOCKED if left == 0 else C.CKF_USER_PIN_FINAL_TRY if left == 1
                      else C.CKF_USER_PIN_COUNT_LOW)
        utc = time.strftime("%Y%m%d%H%M%S00", time.gmtime(int(info["time"])))
        rw = sum(1 for s in self.sessions.values() if s.rw)
        na = C.CK_UNAVAILABLE_INFORMATION
        return [_pad(info.get("label", "Cryptobat"), 32), _pad(info.get("manufacturer", "Cryptobat"), 32),
                _pad(info.get("model", "Cryptobat"), 16), _pad(str(info.get("serial", "")), 16), flags,
                C.CK_EFFECTIVELY_INFINITE, len(self.sessions), C.CK_EFFECTIVELY_INFINITE, rw,
                255, 4, na, na, na, na, (0, 1), (0, 1), utc.encode()]

    def C_GetMechanismList(self, slot: int, buf: Buffer):
        self._slot(slot)
        mechs = list(MECHANISMS)
        if buf.capacity is None or buf.capacity < len(mechs):
            return [OutArray(None, len(mechs))]
        return [OutArray(mechs)]

    def C_GetMechanismInfo(self, slot: int, mech: int):
        self._slot(slot)
        if mech not in MECHANISMS:
            raise P11Error(C.CKR_MECHANISM_INVALID)
        return list(MECHANISMS[mech])

    def C_WaitForSlotEvent(self, flags: int):
        raise P11Error(C.CKR_NO_EVENT if flags & C.CKF_DONT_BLOCK else C.CKR_FUNCTION_NOT_SUPPORTED)

    # --- sessions and login -----------------------------------------------------------

    def C_OpenSession(self, slot: int, flags: int):
        self._slot(slot)
        if not flags & C.CKF_SERIAL_SESSION:
            raise P11Error(C.CKR_SESSION_PARALLEL_NOT_SUPPORTED)
        h = self.next_session
        self.next_session += 1
        self.sessions[h] = Session(h, bool(flags & C.CKF_RW_SESSION))
        return [h]

    def C_CloseSession(self, h: int):
        self._session(h)
        del self.sessions[h]
        if not self.sessions:
            self.logged_in = False
        return []

    def C_CloseAllSessions(self, slot: int):
        self._slot(slot)
        self.sessions.clear()
        self.logged_in = False
        return []

    def C_GetSessionInfo(self, h: int):
        s = self._session(h)
        state = (C.CKS_RW_USER_FUNCTIONS if s.rw else C.CKS_RO_USER_FUNCTIONS) if self.logged_in else (
            C.CKS_RW_PUBLIC_SESSION if s.rw else C.CKS_RO_PUBLIC_SESSION)
        return [SLOT_ID, state, C.CKF_SERIAL_SESSION | (C.CKF_RW_SESSION if s.rw else 0), 0]

    def C_Login(self, h: int, user: int, pin: bytes | None):
        self._session(h)
        if user != C.CKU_USER:
            raise P11Error(C.CKR_USER_TYPE_INVALID)  # officers never log in over PKCS#11
        if self.logged_in:
            raise P11Error(C.CKR_USER_ALREADY_LOGGED_IN)
        if pin is None or not self._b(self.backend.check_pin, bytes(pin)):
            locked = self._b(self.backend.info).get("pin_tries_left", 1) == 0
            raise P11Error(C.CKR_PIN_LOCKED if locked else C.CKR_PIN_INCORRECT)
        self.logged_in = True
        return []

    def C_Logout(self, h: int):
        self._session(h)
        if not self.logged_in:
            raise P11Error(C.CKR_USER_NOT_LOGGED_IN)
        self.logged_in = False
        for s in self.sessions.values():
            s.sign = s.find = None
            s.bound.clear()
        return []

    # --- objects ------------------------------------------------------------------------

    def attributes(self, key: KeyInfo, private: bool) -> tuple[dict[int, Any], frozenset[int]]:
        """(public attribute values, sensitive attribute types) of one object."""
        alg = key.algorithm
        label = key.label.encode()
        a: dict[int, Any] = {
            C.CKA_CLASS: C.CKO_PRIVATE_KEY if private else C.CKO_PUBLIC_KEY,
            C.CKA_ID: key.cka_id, C.CKA_LABEL: label, C.CKA_TOKEN: True, C.CKA_PRIVATE: private,
            C.CKA_MODIFIABLE: False, C.CKA_COPYABLE: False, C.CKA_DESTROYABLE: True,
            C.CKA_LOCAL: True, C.CKA_DERIVE: False, C.CKA_SUBJECT: b"",
            C.CKA_ALLOWED_MECHANISMS: allowed_mechanisms(alg),
        }
        if private:
            a.update({C.CKA_SIGN: True, C.CKA_DECRYPT: False, C.CKA_UNWRAP: False,
                      C.CKA_SIGN_RECOVER: False, C.CKA_SENSITIVE: True, C.CKA_EXTRACTABLE: False,
                      C.CKA_ALWAYS_SENSITIVE: True, C.CKA_NEVER_EXTRACTABLE: True,
                      C.CKA_ALWAYS_AUTHENTICATE: False, C.CKA_WRAP_WITH_TRUSTED: False})
        else:
            a.update({C.CKA_VERIFY: True, C.CKA_ENCRYPT: False, C.CKA_WRAP: False,
                      C.CKA_VERIFY_RECOVER: False, C.CKA_TRUSTED: False})
        row = algorithms.TABLE.get(alg)
        if row is not None and row.kind == "rsa":
            e, n = rsa_public(key.public_key)
            a.update({C.CKA_KEY_TYPE: row.p11_key_type, C.CKA_KEY_GEN_MECHANISM: row.mech_keygen,
                      C.CKA_MODULUS: n.to_bytes((n.bit_length() + 7) // 8, "big"),
                      C.CKA_PUBLIC_EXPONENT: e.to_bytes((e.bit_length() + 7) // 8, "big"),
                      C.CKA_MODULUS_BITS: n.bit_length()})
            secret = (C.CKA_PRIVATE_EXPONENT, C.CKA_PRIME_1, C.CKA_PRIME_2, C.CKA_EXPONENT_1,
                      C.CKA_EXPONENT_2, C.CKA_COEFFICIENT)
        elif row is not None and row.ec_params is not None:
            # an ECDSA point is uncompressed (0x04 prefix); an EdDSA one is the key itself
            point = (b"\x04" + key.public_key) if row.kind == "ecdsa" else key.public_key
            a.update({C.CKA_KEY_TYPE: row.p11_key_type, C.CKA_KEY_GEN_MECHANISM: row.mech_keygen,
                      C.CKA_EC_PARAMS: row.ec_params, C.CKA_EC_POINT: _der_octets(point)})
            secret = (C.CKA_VALUE,)
        else:
            secret = (C.CKA_VALUE,)
        return a, frozenset(secret if private else ())

    def C_FindObjectsInit(self, h: int, template: list[Attribute]):
        s = self._session(h)
        if s.find is not None:
            raise P11Error(C.CKR_OPERATION_ACTIVE)
        if any(t.value is None for t in template):
            s.find = []  # an attribute without a value matches no object
            return []
        objects = self._objects()
        index = self._index(objects)
        lookups = [t for t in template if t.type in INDEXED and isinstance(t.value, INDEXED[t.type])]
        rest = [t for t in template if not (t.type in INDEXED and isinstance(t.value, INDEXED[t.type]))]
        if lookups:  # the shortest index entry, kept where the other entries have it too
            entries = sorted((index.get((t.type, _key_value(t.value)), {}) for t in lookups), key=len)
            handles = [h for h in entries[0] if all(h in e for e in entries[1:])]
        else:
            handles = sorted(objects)
        if rest:  # the rest of the template, on those objects only
            kept = []
            for handle in handles:
                attrs, _ = self.attributes(*objects[handle])
                if all(t.type in attrs and _same(attrs[t.type], t.value) for t in rest):
                    kept.append(handle)
            handles = kept
        s.find = list(handles)
        return []

    def _index(self, objects: dict[int, tuple[KeyInfo, bool]]) -> dict[tuple[int, Any], dict[int, None]]:
        """(attribute type, value) -> the visible objects having it, for the INDEXED types (handles
        in order, as dict keys for membership tests): built once per object map (which changes
        only with the token's keys or the login), so a lookup by label or id costs the same with
        2,000 keys as with two.

        Each object's indexed values are kept per key record, so a state change that leaves a
        key as it was (the audit's counters, another key added) does not recompute them."""
        cached = self._find_index
        if cached is not None and cached[0] is objects:
            return cached[1]
        old, values = self._index_values, {}
        index: dict[tuple[int, Any], dict[int, None]] = {}
        for handle in sorted(objects):
            obj = objects[handle]
            vals = old.get(obj)
            if vals is None:
                attrs, _ = self.attributes(*obj)
                vals = tuple((t, _key_value(attrs[t])) for t in INDEXED if t in attrs)
            values[obj] = vals
            for v in vals:
                index.setdefault(v, {})[handle] = None
        self._index_values = values
        self._find_index = (objects, index)
        return index

    def C_FindObjects(self, h: int, buf: Buffer):
        s = self._session(h)
        if s.find is None:
            raise P11Error(C.CKR_OPERATION_NOT_INITIALIZED)
        if buf.capacity is None:
            return [OutArray(None, 0)]
        out, s.find = s.find[:buf.capacity], s.find[buf.capacity:]
        return [OutArray(out)]

    def C_FindObjectsFinal(self, h: int):
        s = self._session(h)
        if s.find is None:
            raise P11Error(C.CKR_OPERATION_NOT_INITIALIZED)
        s.find = None
        return []

    def C_GetAttributeValue(self, h: int, obj: int, wanted: list[tuple[int, int]]):
        self._session(h)
        key, private = self._object(obj)
        attrs, secret = self.attributes(key, private)
        rv = C.CKR_OK
        out = []
        for atype, cap in wanted:
            if atype in secret:
                out.append(Attribute(atype, None))
                rv = C.CKR_ATTRIBUTE_SENSITIVE
            elif atype not in attrs:
                out.append(Attribute(atype, None))
                rv = C.CKR_ATTRIBUTE_TYPE_INVALID
            else:
                a = Attribute(atype, attrs[atype])
                n = encoded_length(a)
                if cap == 0:
                    out.append(Attribute(atype, None, n, size_only=True))
                elif cap < n:
                    out.append(Attribute(atype, None))
                    if rv == C.CKR_OK:
                        rv = C.CKR_BUFFER_TOO_SMALL
                else:
                    out.append(a)
        return [out, rv]

    def C_GetObjectSize(self, h: int, obj: int):
        """The bytes of the attribute values the object shows (sensitive ones are not counted:
        the private half never leaves the custody, so it has no size here)."""
        self._session(h)
        key, private = self._object(obj)
        attrs, _ = self.attributes(key, private)
        return [sum(encoded_length(Attribute(t, v)) for t, v in attrs.items())]

    def C_DestroyObject(self, h: int, obj: int):
        s = self._session(h)
        if not self.logged_in:
            raise P11Error(C.CKR_USER_NOT_LOGGED_IN)
        if not s.rw:
            raise P11Error(C.CKR_SESSION_READ_ONLY)
        key, private = self._object(obj)
        if not private:  # the public half of a token key is its DNSKEY: nothing to delete
            self.hidden.add(key.label)
            self._seen = None
            return []
        self._b(self.backend.delete_key, key.label)
        self.hidden.discard(key.label)
        return []

    def C_GenerateKeyPair(self, h: int, mech: Mechanism | None, pub: list[Attribute],
                          priv: list[Attribute]):
        s = self._session(h)
        if not self.logged_in:
            raise P11Error(C.CKR_USER_NOT_LOGGED_IN)
        if not s.rw:
            raise P11Error(C.CKR_SESSION_READ_ONLY)
        if mech is None or mech.type not in (C.CKM_RSA_PKCS_KEY_PAIR_GEN, C.CKM_EC_KEY_PAIR_GEN,
                                             C.CKM_EC_EDWARDS_KEY_PAIR_GEN):
            raise P11Error(C.CKR_MECHANISM_INVALID)
        tmpl = {a.type: a.value for a in pub + priv if a.value is not None}
        label, p11_id = tmpl.get(C.CKA_LABEL) or b"", tmpl.get(C.CKA_ID) or None
        if not isinstance(label, bytes) or not isinstance(p11_id, (bytes, type(None))):
            raise P11Error(C.CKR_ATTRIBUTE_VALUE_INVALID)
        if mech.type == C.CKM_RSA_PKCS_KEY_PAIR_GEN:
            alg = _RSA_KEYGEN.number
        else:
            params = tmpl.get(C.CKA_EC_PARAMS)
            if params is None:
                raise P11Error(C.CKR_TEMPLATE_INCOMPLETE)
            row = algorithms.by_ec_params(params) if isinstance(params, bytes) else None
            if row is None or row.mech_keygen != mech.type or not row.generate:
                raise P11Error(C.CKR_ATTRIBUTE_VALUE_INVALID)
            alg = row.number
        try:
            label_s = label.decode()
        except UnicodeDecodeError:
            raise P11Error(C.CKR_ATTRIBUTE_VALUE_INVALID) from None
        # the token checks the window first (and audits a refusal), before generating anything
        key = self._b(self.backend.generate_key, alg, "csk", "", label_s, p11_id)
        self.hidden.discard(key.label)
        self._objects()
        base = self.handles[key.label]
        return [base + 1, base]

    # --- signing, verifying, digesting -----------------------------------------------------

    def C_SignInit(self, h: int, mech: Mechanism | None, key_handle: int):
        s = self._session(h)
        if mech is None:
            s.sign = None
            return []
        if s.sign is not None:
            raise P11Error(C.CKR_OPERATION_ACTIVE)
        if not self.logged_in:
            raise P11Error(C.CKR_USER_NOT_LOGGED_IN)
        allowed = FULL_SIGN.get(mech.type) or HASH_SIGN.get(mech.type)
        if allowed is None:
            raise P11Error(C.CKR_MECHANISM_INVALID)
        if mech.param and not isinstance(mech.param, bytes):
            raise P11Error(C.CKR_MECHANISM_PARAM_INVALID)
        if mech.param:  # EdDSA context / prehash variants are not DNSSEC signatures
            raise P11Error(C.CKR_MECHANISM_PARAM_INVALID)
        key = self._key(key_handle, private=True)
        if key.algorithm not in allowed:
            raise P11Error(C.CKR_KEY_TYPE_INCONSISTENT)
        s.sign = Op(mech.type, key)
        return []

    def C_Sign(self, h: int, data: bytes | None, buf: Buffer):
        s = self._session(h)
        op = s.sign
        if op is None:
            raise P11Error(C.CKR_OPERATION_NOT_INITIALIZED)
        if op.updated:
            raise P11Error(C.CKR_OPERATION_ACTIVE)
        return [self._finish_sign(s, op, bytes(data or b""), buf)]

    def C_SignUpdate(self, h: int, data: bytes | None):
        return self._update(self._session(h), "sign", data)

    def C_SignFinal(self, h: int, buf: Buffer):
        s = self._session(h)
        op = s.sign
        if op is None:
            raise P11Error(C.CKR_OPERATION_NOT_INITIALIZED)
        return [self._finish_sign(s, op, bytes(op.data), buf)]

    def _finish_sign(self, s: Session, op: Op, data: bytes, buf: Buffer) -> OutArray:
        if op.result is None or op.result_for != data:
            try:
                op.result, op.result_for = self._sign(s, op, data), data
            except (P11Error, CryptobatError):  # a failed C_Sign ends the operation, as PKCS#11 requires
                s.sign = None
                raise
        out, done = fit(buf, op.result)
        if done:
            s.sign = None
        return out

    def _sign(self, s: Session, op: Op, data: bytes) -> bytes:
        key = op.key
        assert key is not None
        if op.mech in FULL_SIGN:
            res = self._b(self.backend.timed_sign, [(key.label, data)])[0]
        else:
            bound = s.bound.pop((key.label, data), None)  # each binding is handed over once
            mechanism = "ecdsa" if op.mech == C.CKM_ECDSA else "rsa-pkcs"
            res = self._b(self.backend.sign_digest, key.label, data, mechanism, bound)
        if not res.ok:
            raise P11Error(C.CKR_FUNCTION_REJECTED)  # every refusal: the reason is audited (docs/pkcs11.md)
        return res.signature

    def C_VerifyInit(self, h: int, mech: Mechanism | None, key_handle: int):
        s = self._session(h)
        if mech is None:
            s.verify = None
            return []
        if s.verify is not None:
            raise P11Error(C.CKR_OPERATION_ACTIVE)
        allowed = FULL_SIGN.get(mech.type) or HASH_SIGN.get(mech.type)
        if allowed is None:
            raise P11Error(C.CKR_MECHANISM_INVALID)
        key = self._key(key_handle, private=False)
        if key.algorithm not in allowed:
            raise P11Error(C.CKR_KEY_TYPE_INCONSISTENT)
        s.verify = Op(mech.type, key)
        return []

    def C_Verify(self, h: int, data: bytes | None, sig: bytes | None):
        s = self._session(h)
        op = s.verify
        if op is None:
            raise P11Error(C.CKR_OPERATION_NOT_INITIALIZED)
        if op.updated:
            raise P11Error(C.CKR_OPERATION_ACTIVE)
        return self._finish_verify(s, op, bytes(data or b""), sig)

    def C_VerifyUpdate(self, h: int, data: bytes | None):
        return self._update(self._session(h), "verify", data)

    @staticmethod
    def _update(s, kind: str, data: bytes | None) -> list:
        """One part of a multi-part sign or verify: collected (bounded) until the Final call."""
        op = getattr(s, kind)
        if op is None:
            raise P11Error(C.CKR_OPERATION_NOT_INITIALIZED)
        if len(op.data) + len(data or b"") > MAX_DATA:
            setattr(s, kind, None)
            raise P11Error(C.CKR_DATA_LEN_RANGE)
        op.data += data or b""
        op.updated = True
        return []

    def C_VerifyFinal(self, h: int, sig: bytes | None):
        s = self._session(h)
        op = s.verify
        if op is None:
            raise P11Error(C.CKR_OPERATION_NOT_INITIALIZED)
        return self._finish_verify(s, op, bytes(op.data), sig)

    def _finish_verify(self, s: Session, op: Op, data: bytes, sig: bytes | None) -> list:
        """Verify with the public key; either way the operation ends (PKCS#11 §5.11)."""
        s.verify = None
        assert op.key is not None
        if not verify_signature(op.key, op.mech, data, bytes(sig or b"")):
            raise P11Error(C.CKR_SIGNATURE_INVALID)
        return []

    def C_DigestInit(self, h: int, mech: Mechanism | None):
        s = self._session(h)
        if mech is None:
            s.digest = None
            return []
        if s.digest is not None:
            raise P11Error(C.CKR_OPERATION_ACTIVE)
        if mech.type not in DIGESTS:
            raise P11Error(C.CKR_MECHANISM_INVALID)
        s.digest = Op(mech.type, hasher=hashlib.new(DIGESTS[mech.type]))
        return []

    def C_Digest(self, h: int, data: bytes | None, buf: Buffer):
        s = self._session(h)
        op = s.digest
        if op is None:
            raise P11Error(C.CKR_OPERATION_NOT_INITIALIZED)
        if op.updated:
            raise P11Error(C.CKR_OPERATION_ACTIVE)
        if op.result is None:
            op.hasher.update(data or b"")
            op.data = bytearray(data or b"")
            op.result = self._digest_done(s, op)
        out, done = fit(buf, op.result)
        if done:
            s.digest = None
        return [out]

    def C_DigestUpdate(self, h: int, data: bytes | None):
        s = self._session(h)
        op = s.digest
        if op is None:
            raise P11Error(C.CKR_OPERATION_NOT_INITIALIZED)
        op.updated = True
        op.hasher.update(data or b"")
        if op.keep and len(op.data) + len(data or b"") <= MAX_DATA:
            op.data += data or b""
        else:
            op.keep, op.data = False, bytearray()
        return []

    def C_DigestFinal(self, h: int, buf: Buffer):
        s = self._session(h)
        op = s.digest
        if op is None:
            raise P11Error(C.CKR_OPERATION_NOT_INITIALIZED)
        if op.result is None:
            op.result = self._digest_done(s, op)
        out, done = fit(buf, op.result)
        if done:
            s.digest = None
        return [out]

    def _digest_done(self, s: Session, op: Op) -> bytes:
        """Finish a digest and keep what the token binds it to (see ``Backend.bind_digest``).

        A failure ends the operation, as any failed C_Digest/C_DigestFinal does (PKCS#11 §5.10):
        a retry must not hash the data a second time."""
        digest = op.hasher.digest()
        data = bytes(op.data)
        if self.logged_in and op.keep:
            try:
                bound = self._b(self.backend.bind_digest, DIGESTS[op.mech], data, digest)
            except BaseException:
                s.digest = None
                raise
            for label, signable in bound:
                s.bound[(label, signable)] = data
                while len(s.bound) > MAX_BOUND:
                    s.bound.popitem(last=False)
        op.data = bytearray()
        return digest

    # --- randomness ------------------------------------------------------------------

    def C_GenerateRandom(self, h: int, buf: Buffer):
        self._session(h)
        n = buf.capacity or 0
        if n > MAX_RANDOM:
            raise P11Error(C.CKR_ARGUMENTS_BAD)
        return [OutArray(self._b(self.backend.random, n) if n else b"")]  # zero bytes is a valid request

    def C_SeedRandom(self, h: int, seed: bytes | None):
        self._session(h)
        raise P11Error(C.CKR_RANDOM_SEED_NOT_SUPPORTED)  # clients must not steer the token RNG


# Template attributes C_FindObjectsInit looks up in an index (with the value type a template
# gives them) instead of comparing every object's attributes.
INDEXED: dict[int, type] = {C.CKA_LABEL: bytes, C.CKA_ID: bytes, C.CKA_CLASS: int}


def _key_value(v: Any) -> Any:
    """An attribute value as an index key, equal where :func:`_same` holds for the INDEXED types."""
    return int(v) if isinstance(v, (bool, int)) else bytes(v)


def _same(have: Any, want: Any) -> bool:
    if isinstance(have, (bool, int)) and isinstance(want, int):
        return int(have) == want
    return have == want


REFUSALS = {
    "C_InitToken": C.CKR_FUNCTION_NOT_SUPPORTED,
    "C_SetAttributeValue": C.CKR_ATTRIBUTE_READ_ONLY,
    "C_CopyObject": C.CKR_ACTION_PROHIBITED,
    "C_CreateObject": C.CKR_FUNCTION_NOT_SUPPORTED,
}
