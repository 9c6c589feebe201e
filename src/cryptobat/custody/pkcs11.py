"""PKCS#11 custody: the token's policy in front of an HSM the operator already has.

Private keys are made (or imported, or adopted) inside the HSM as sensitive,
non-extractable token objects and sign there; the store keeps only a sealed reference
(the key's CKA_ID). The master secret that seals those references, the officers' TOTP
secrets and the store's MAC is never in a file: it is an HMAC-SHA256 the HSM computes
with a non-extractable secret key object made at ``init``, so a copy of the home
without the HSM opens nothing.

The HSM's user PIN (the "backing PIN") is kept in ``HOME/pkcs11-pin`` (0600), the rest
of the configuration in ``HOME/pkcs11.json``: whoever can read the home can log in to
the HSM directly, as with any software that fronts an HSM unattended; the keys still
never leave it.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any, Callable

import pkcs11
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11e

from .. import algorithms
from ..errors import CryptobatError, IntegrityError, InvalidArgument, NotFound
from .envelope import Envelope, Sealing, mixed_random, write_private

NAME = "pkcs11"
CONFIG = "pkcs11.json"
PIN_FILE = "pkcs11-pin"
_MASTER_INPUT = b"cryptobat pkcs11 master secret v1"  # what the HSM's secret key HMACs into the master
_KEY_PREFIX = "cryptobat-key-"
_MASTER_PREFIX = "cryptobat-master-"
_BLOB_VERSION = 1

# One loaded module per path and process: C_Initialize may run once per process, and a
# second C_Finalize would end every other user's sessions. Modules initialised without
# locking callbacks may assume one thread, so every call into a module holds its lock.
_MODULES: dict[str, tuple[Any, threading.Lock]] = {}
# a session the HSM no longer knows (a network HSM restarted, failed over, closed it): open another
_LOST = (p11e.SessionHandleInvalid, p11e.SessionClosed, p11e.UserNotLoggedIn, p11e.ObjectHandleInvalid,
         p11e.KeyHandleInvalid, p11e.DeviceRemoved, p11e.TokenNotPresent)
_MODULES_LOCK = threading.Lock()


def _module(path: str) -> tuple[Any, threading.Lock]:
    with _MODULES_LOCK:
        got = _MODULES.get(path)
        if got is None:
            if not os.path.exists(path):
                raise CryptobatError(f"pkcs11 custody: no PKCS#11 module at {path}")
            try:
                got = (pkcs11.lib(path), threading.Lock())
            except p11e.PKCS11Error as e:
                raise CryptobatError(f"pkcs11 custody: cannot load the PKCS#11 module {path}: {_why(e)}") from None
            _MODULES[path] = got
        return got


def _why(e: Exception) -> str:
    """A PKCS#11 failure in one line: python-pkcs11's exceptions often carry no text."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}{': ' + text if text else ''}"


def _der_octets(value: bytes) -> bytes:
    """DER OCTET STRING around ``value`` (CKA_EC_POINT's encoding, PKCS#11 3.0 §2.3.3);
    written here because it is two length forms, not worth an ASN.1 library's object model."""
    n = len(value)
    if n < 0x80:
        return bytes([0x04, n]) + value
    if n < 0x100:
        return bytes([0x04, 0x81, n]) + value
    return bytes([0x04, 0x82]) + n.to_bytes(2, "big") + value


def _ec_point(value: bytes, raw_len: int) -> bytes:
    """The raw point of a CKA_EC_POINT: DER-wrapped (as the standard says) or raw (as some HSMs give it)."""
    if len(value) == raw_len:
        return value
    if len(value) >= 2 and value[0] == 0x04:
        if value[1] < 0x80:
            body = value[2:]
        elif value[1] == 0x81:
            body = value[3:]
        else:
            body = value[4:]
        if len(body) == raw_len:
            return body
    raise IntegrityError(f"pkcs11 custody: unexpected CKA_EC_POINT ({len(value)} bytes)")


def _bytes(n: int) -> bytes:
    return n.to_bytes((n.bit_length() + 7) // 8 or 1, "big")


class _HsmKey:
    """A private key object in the HSM that signs RRSIG signing data per its DNSSEC algorithm."""

    __slots__ = ("_key", "_ref", "_alg", "_lock", "_mech", "_hash", "_half", "_custody")

    def __init__(self, key, ref: dict, alg: algorithms.DnssecAlgorithm, custody: "Pkcs11Custody") -> None:
        self._key = key
        self._ref = ref  # how to find the object again in a new session
        self._alg = alg
        self._lock = custody._lock
        self._custody = custody
        self._hash = None
        if alg.kind == "rsa":
            self._mech = Mechanism(alg.mech_sign)  # CKM_SHA256_RSA_PKCS / CKM_SHA512_RSA_PKCS: the HSM hashes
        elif alg.kind == "ecdsa":
            self._mech = Mechanism.ECDSA  # over our hash: most HSMs lack CKM_ECDSA_SHA384, all have CKM_ECDSA
            self._hash = getattr(hashlib, alg.hash)
            self._half = alg.signature_len // 2
        else:
            self._mech = Mechanism.EDDSA

    def sign(self, data: bytes) -> bytes:
        if self._hash is not None:
            return self._ecdsa(self._hash(data).digest())
        return self._sign(data, self._mech)

    def _sign(self, payload: bytes, mech: Mechanism) -> bytes:
        key = self._key
        try:
            with self._lock:
                return key.sign(payload, mechanism=mech)
        except _LOST:
            pass
        except p11e.PKCS11Error as e:
            raise CryptobatError(f"pkcs11 custody: signing failed: {_why(e)}") from None
        try:  # once more, in a new session
            self._custody._recover(key.session)
            self._key = key = self._custody._private(self._ref)
            with self._lock:
                return key.sign(payload, mechanism=mech)
        except p11e.PKCS11Error as e:
            raise CryptobatError(f"pkcs11 custody: signing failed: {_why(e)}") from None

    def _ecdsa(self, digest: bytes) -> bytes:
        sig = self._sign(digest, Mechanism.ECDSA)
        n = self._half
        if len(sig) != 2 * n:  # r || s, each as long as the order: RFC 6605's form already
            raise CryptobatError(f"pkcs11 custody: the HSM returned a {len(sig)}-byte ECDSA signature")
        return sig

    def sign_digest(self, digest: bytes) -> bytes:
        alg = self._alg
        if alg.hash is None or len(digest) != alg.hash_len:
            raise CryptobatError("hash-only signing is not defined for this key type")
        if alg.kind == "ecdsa":
            return self._ecdsa(digest)
        return self._sign(alg.digest_info + digest, Mechanism.RSA_PKCS)


class Pkcs11Custody(Sealing):
    """Keys and the master secret in a PKCS#11 token; configuration in ``HOME/pkcs11.json``,
    the backing PIN in ``HOME/pkcs11-pin``. ``config`` (at create): ``module`` (path of the
    PKCS#11 library), ``token`` (its label), ``pin`` (the user PIN)."""

    name = NAME
    # The Engine's worker processes each open the module and log in afresh (a new process,
    # not a fork: no PKCS#11 state is inherited); with SoftHSM that spreads signing over the
    # cores (measured: docs/custody.md).
    parallel = True
    concurrent = False  # in this process every call into the module holds its lock

    def __init__(self, home: Path, create: bool = False, config: dict | None = None) -> None:
        self.home = Path(home)
        # CKA_IDs of the objects this object created, until a committed state refers to them (discard)
        self._made: list[bytes] | None = [] if create else None
        cfg_path, pin_path = self.home / CONFIG, self.home / PIN_FILE
        if create and not cfg_path.exists():
            self._create(config or {}, cfg_path, pin_path)
            return
        try:
            cfg = json.loads(cfg_path.read_text())
            self._module_path, self._token_label = str(cfg["module"]), str(cfg["token"])
            master_id = bytes.fromhex(cfg["master_id"])
        except FileNotFoundError:
            if (self.home / "state.db").exists():
                raise IntegrityError(f"{cfg_path} is missing: the token's keys in the HSM cannot be found "
                                     f"without it (restore it from the token's backup)") from None
            raise CryptobatError(f"no token at {self.home} (run: cryptobat init)") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise IntegrityError(f"{cfg_path} is damaged ({type(e).__name__}: {e})") from None
        try:
            pin = pin_path.read_text().rstrip("\n")
        except OSError as e:
            raise IntegrityError(f"cannot read the backing PIN in {pin_path}: {e.strerror}") from None
        self._open(pin)
        try:
            secret = self._find_one(ObjectClass.SECRET_KEY, master_id, None)
            if secret is None:
                raise IntegrityError(f"pkcs11 custody: the master secret object (CKA_ID {master_id.hex()}) is "
                                     f"not on token {self._token_label!r}; the token's keys cannot be opened")
            self._master_id = master_id
            self._start(secret)
        except BaseException:
            self.close()
            raise

    # --- opening --------------------------------------------------------------------
    def _create(self, config: dict, cfg_path: Path, pin_path: Path) -> None:
        missing = [k for k in ("module", "token", "pin") if not config.get(k)]
        if missing:
            raise InvalidArgument(f"pkcs11 custody needs {', '.join(missing)} (module path, token label, user PIN)")
        self._module_path, self._token_label = str(config["module"]), str(config["token"])
        pin = str(config["pin"])
        self._open(pin)
        master_id = os.urandom(16)
        try:
            try:
                with self._lock:
                    secret = self._session.generate_key(
                        KeyType.GENERIC_SECRET, 256, id=master_id, label=_MASTER_PREFIX + master_id.hex(),
                        store=True, capabilities=MechanismFlag.SIGN,
                        template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.PRIVATE: True,
                                  Attribute.VERIFY: False, Attribute.DERIVE: False, Attribute.WRAP: False,
                                  Attribute.ENCRYPT: False, Attribute.DECRYPT: False, Attribute.UNWRAP: False})
            except p11e.PKCS11Error as e:
                raise CryptobatError(f"pkcs11 custody: cannot create the master secret object on token "
                                     f"{self._token_label!r}: {_why(e)}") from None
            self._made_one(master_id)
            self._master_id = master_id
            self._start(secret)
            write_private(pin_path, (pin + "\n").encode())
            write_private(cfg_path, json.dumps({"module": self._module_path, "token": self._token_label,
                                                 "master_id": master_id.hex()}, indent=1).encode() + b"\n")
        except BaseException:
            self.discard()
            raise

    def _open(self, pin: str) -> None:
        self._lib, self._lock = _module(self._module_path)
        self._pin = pin  # to log in again in a new session (it is in HOME already)
        if not hasattr(self, "_recovering"):
            self._recovering = threading.Lock()
        try:
            with self._lock:
                self._token = self._lib.get_token(token_label=self._token_label)
        except p11e.NoSuchToken:
            with self._lock:
                have = sorted({t.label for t in self._lib.get_tokens()})
            raise NotFound(f"pkcs11 custody: no token labelled {self._token_label!r} in {self._module_path} "
                           f"(tokens: {', '.join(map(repr, have)) or 'none'})") from None
        except p11e.MultipleObjectsReturned:
            raise InvalidArgument(f"pkcs11 custody: more than one token labelled {self._token_label!r} "
                                  f"in {self._module_path}") from None
        except p11e.PKCS11Error as e:
            raise CryptobatError(f"pkcs11 custody: cannot list the tokens of {self._module_path}: {_why(e)}") from None
        try:
            with self._lock:
                self._session = self._token.open(rw=True, user_pin=pin)
        except p11e.UserAlreadyLoggedIn:
            # PKCS#11 logs in per application: another custody of this process already did
            with self._lock:
                self._session = self._token.open(rw=True)
        except p11e.PinIncorrect:
            raise CryptobatError(f"pkcs11 custody: token {self._token_label!r} refused the backing PIN "
                                 f"(HOME/{PIN_FILE})") from None
        except p11e.PinLocked:
            raise CryptobatError(f"pkcs11 custody: the user PIN of token {self._token_label!r} is locked; "
                                 f"its security officer must unlock it") from None
        except p11e.PKCS11Error as e:
            raise CryptobatError(f"pkcs11 custody: cannot log in to token {self._token_label!r}: {_why(e)}") from None
        with self._lock:
            self._mechanisms = set(self._token.slot.get_mechanisms())

    def _start(self, secret) -> None:
        try:
            with self._lock:
                master = secret.sign(_MASTER_INPUT, mechanism=Mechanism.SHA256_HMAC)
        except p11e.PKCS11Error as e:
            raise CryptobatError(f"pkcs11 custody: the HSM cannot compute the master secret: {_why(e)}") from None
        self._envelope = Envelope(master)

    def _recover(self, stale) -> None:
        """A new session, logged in again, after the HSM lost ``stale`` (unless another thread
        already replaced it)."""
        with self._recovering:
            if self._session is not stale:
                return
            try:
                with self._lock:
                    stale.close()
            except p11e.PKCS11Error:
                pass
            self._open(self._pin)

    def _in_session(self, fn: Callable[[Any], Any]) -> Any:
        """``fn(session)`` under the module's lock; once more in a new session if the HSM lost this one."""
        s = self._session
        try:
            with self._lock:
                return fn(s)
        except _LOST:
            self._recover(s)
        with self._lock:
            return fn(self._session)

    def _find_one(self, cls: ObjectClass, ckid: bytes | None, label: str | None):
        attrs: dict = {Attribute.CLASS: cls}
        if ckid:
            attrs[Attribute.ID] = ckid
        if label is not None:
            attrs[Attribute.LABEL] = label
        found = self._in_session(lambda s: list(s.get_objects(attrs)))
        if len(found) > 1:
            what = f"CKA_ID {ckid.hex()}" if ckid else f"label {label!r}"
            raise InvalidArgument(f"pkcs11 custody: {len(found)} {cls.name.lower().replace('_', ' ')} objects "
                                  f"with {what} on token {self._token_label!r}")
        return found[0] if found else None

    # --- keys -------------------------------------------------------------------------
    def _algorithm(self, algorithm: int) -> algorithms.DnssecAlgorithm:
        alg = algorithms.by_number(algorithm)
        if not alg.generate:
            raise InvalidArgument(f"algorithm {algorithm} is not supported by the token")
        need = {alg.mech_keygen, alg.mech_sign if alg.kind != "ecdsa" else algorithms.CKM_ECDSA}
        lacking = [m for m in need if m not in self._mechanisms]
        if lacking:
            names = ", ".join(Mechanism(m).name for m in lacking)
            raise InvalidArgument(f"algorithm {algorithm} ({alg.mnemonic}) cannot be kept in pkcs11 custody: "
                                  f"token {self._token_label!r} lacks {names}")
        return alg

    def _pack(self, alg: int, ckid: bytes, label: str | None = None, adopted: bool = False) -> bytes:
        d: dict = {"v": _BLOB_VERSION, "alg": alg, "id": ckid.hex()}
        if label is not None:
            d["label"] = label
        if adopted:
            d["adopted"] = True
        return json.dumps(d, separators=(",", ":")).encode()

    def _unpack(self, blob: bytes, aad: bytes) -> dict:
        try:
            d = json.loads(self.unseal(blob, aad))
            bytes.fromhex(d["id"]), int(d["alg"])
        except (ValueError, KeyError, TypeError):
            raise IntegrityError("pkcs11 custody: a key blob is not a PKCS#11 key reference") from None
        return d

    def generate(self, algorithm: int, aad: bytes) -> tuple[bytes, bytes]:
        alg = self._algorithm(algorithm)
        ckid = os.urandom(16)
        private = {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.PRIVATE: True,
                   Attribute.SIGN: True, Attribute.DECRYPT: False, Attribute.UNWRAP: False, Attribute.DERIVE: False}
        public = {Attribute.VERIFY: True, Attribute.ENCRYPT: False, Attribute.WRAP: False}
        kw = dict(id=ckid, label=_KEY_PREFIX + ckid.hex(), store=True,
                  capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY, private_template=private)
        try:
            if alg.kind == "rsa":
                pub, _ = self._in_session(lambda s: s.generate_keypair(KeyType.RSA, alg.rsa_default_bits,
                                                                       public_template=public, **kw))
            else:
                kt = KeyType.EC if alg.kind == "ecdsa" else KeyType.EC_EDWARDS
                pub, _ = self._in_session(lambda s: s.generate_keypair(
                    kt, public_template={**public, Attribute.EC_PARAMS: alg.ec_params}, **kw))
        except p11e.PKCS11Error as e:
            raise CryptobatError(f"pkcs11 custody: token {self._token_label!r} could not generate a key of "
                                 f"algorithm {algorithm}: {_why(e)}") from None
        self._made_one(ckid)
        return self._public_field(alg, pub), self.seal(self._pack(algorithm, ckid), aad)

    def _public_field(self, alg: algorithms.DnssecAlgorithm, obj) -> bytes:
        """The DNSKEY public key field (RFC 3110 / 6605 / 8080) from a key object's attributes."""
        with self._lock:
            if alg.kind == "rsa":
                n, e = obj[Attribute.MODULUS], obj[Attribute.PUBLIC_EXPONENT]
            else:
                point = obj[Attribute.EC_POINT]
        if alg.kind == "rsa":
            key = rsa.RSAPublicNumbers(int.from_bytes(e, "big"), int.from_bytes(n, "big")).public_key()
        elif alg.kind == "ecdsa":
            key = ec.EllipticCurvePublicKey.from_encoded_point(alg.curve, _ec_point(point, alg.public_key_len + 1))
        else:  # dnspython's public key class names cryptography's (Ed25519PublicKey, Ed448PublicKey)
            key = alg.dnspython.public_cls.key_cls.from_public_bytes(_ec_point(point, alg.public_key_len))
        return alg.dnspython.public_cls(key=key).encode_key_bytes()

    def import_key(self, algorithm: int, private_key, aad: bytes) -> tuple[bytes, bytes]:
        alg = self._algorithm(algorithm)
        public = alg.dnspython(key=private_key).public_key().encode_key_bytes()  # as the software custody's
        ckid = os.urandom(16)
        common = {Attribute.TOKEN: True, Attribute.ID: ckid, Attribute.LABEL: _KEY_PREFIX + ckid.hex()}
        priv = {**common, Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.PRIVATE: True,
                Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.SIGN: True,
                Attribute.DECRYPT: False, Attribute.UNWRAP: False, Attribute.DERIVE: False}
        pub = {**common, Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.VERIFY: True,
               Attribute.ENCRYPT: False, Attribute.WRAP: False}
        if alg.kind == "rsa":
            nums = private_key.private_numbers()
            pn = nums.public_numbers
            priv.update({Attribute.KEY_TYPE: KeyType.RSA, Attribute.MODULUS: _bytes(pn.n),
                         Attribute.PUBLIC_EXPONENT: _bytes(pn.e), Attribute.PRIVATE_EXPONENT: _bytes(nums.d),
                         Attribute.PRIME_1: _bytes(nums.p), Attribute.PRIME_2: _bytes(nums.q),
                         Attribute.EXPONENT_1: _bytes(nums.dmp1), Attribute.EXPONENT_2: _bytes(nums.dmq1),
                         Attribute.COEFFICIENT: _bytes(nums.iqmp)})
            pub.update({Attribute.KEY_TYPE: KeyType.RSA, Attribute.MODULUS: _bytes(pn.n),
                        Attribute.PUBLIC_EXPONENT: _bytes(pn.e)})
        elif alg.kind == "ecdsa":
            size = alg.signature_len // 2
            point = private_key.public_key().public_bytes(serialization.Encoding.X962,
                                                          serialization.PublicFormat.UncompressedPoint)
            priv.update({Attribute.KEY_TYPE: KeyType.EC, Attribute.EC_PARAMS: alg.ec_params,
                         Attribute.VALUE: private_key.private_numbers().private_value.to_bytes(size, "big")})
            pub.update({Attribute.KEY_TYPE: KeyType.EC, Attribute.EC_PARAMS: alg.ec_params,
                        Attribute.EC_POINT: _der_octets(point)})
        else:
            raw = serialization.Encoding.Raw
            value = private_key.private_bytes(raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
            point = private_key.public_key().public_bytes(raw, serialization.PublicFormat.Raw)
            priv.update({Attribute.KEY_TYPE: KeyType.EC_EDWARDS, Attribute.EC_PARAMS: alg.ec_params,
                         Attribute.VALUE: value})
            pub.update({Attribute.KEY_TYPE: KeyType.EC_EDWARDS, Attribute.EC_PARAMS: alg.ec_params,
                        Attribute.EC_POINT: _der_octets(point)})
        try:
            def create(s):
                made = s.create_object(priv)
                try:
                    s.create_object(pub)
                except BaseException:
                    made.destroy()
                    raise
            self._in_session(create)
        except p11e.PKCS11Error as e:
            raise CryptobatError(f"pkcs11 custody: token {self._token_label!r} could not import a key of "
                                 f"algorithm {algorithm}: {_why(e)}") from None
        self._made_one(ckid)
        return public, self.seal(self._pack(algorithm, ckid), aad)

    def adopt(self, label: str, algorithm: int | None = None, aad: bytes | None = None) -> tuple[bytes, bytes]:
        """Take a key pair already in the HSM (found by its CKA_LABEL) into custody: (DNSKEY public
        key field, blob sealed under ``aad``, by default the label). ``algorithm`` defaults to what
        the key implies (RSA: 8, RSASHA256). Its objects stay in the HSM when the token deletes it."""
        key = self._find_one(ObjectClass.PRIVATE_KEY, None, label)
        if key is None:
            raise NotFound(f"pkcs11 custody: no private key labelled {label!r} on token {self._token_label!r}")
        with self._lock:
            a = key.get_attributes([Attribute.KEY_TYPE, Attribute.ID, Attribute.SENSITIVE, Attribute.SIGN])
            params = key[Attribute.EC_PARAMS] if a[Attribute.KEY_TYPE] != KeyType.RSA else None
        if not a[Attribute.SENSITIVE]:
            raise InvalidArgument(f"pkcs11 custody: key {label!r} is not sensitive (its private value can be "
                                  f"read out of the HSM); not adopted")
        if not a[Attribute.SIGN]:
            raise InvalidArgument(f"pkcs11 custody: key {label!r} cannot sign (CKA_SIGN is false)")
        implied = (next(a.number for a in algorithms.SIGNING if a.kind == "rsa") if params is None  # RSASHA256
                   else getattr(algorithms.by_ec_params(params), "number", None))
        if implied is None:
            raise InvalidArgument(f"pkcs11 custody: key {label!r} is on a curve DNSSEC has no algorithm for")
        algorithm = implied if algorithm is None else algorithm
        alg = self._algorithm(algorithm)
        if (alg.kind == "rsa") != (params is None) or (params is not None and algorithm != implied):
            raise InvalidArgument(f"pkcs11 custody: key {label!r} is not a key of algorithm {algorithm} "
                                  f"({alg.mnemonic})")
        ckid = bytes(a[Attribute.ID] or b"")
        pub = self._find_one(ObjectClass.PUBLIC_KEY, ckid, None if ckid else label) if ckid or label else None
        if pub is None:
            if alg.kind != "rsa":
                raise NotFound(f"pkcs11 custody: key {label!r} has no public key object (CKA_ID {ckid.hex()})")
            pub = key  # an RSA private key object carries the modulus and public exponent
        public = self._public_field(alg, pub)
        blob = self._pack(algorithm, ckid, label=label, adopted=True)
        return public, self.seal(blob, label.encode() if aad is None else aad)

    def _private(self, d: dict):
        ckid = bytes.fromhex(d["id"])
        key = self._find_one(ObjectClass.PRIVATE_KEY, ckid, d.get("label"))
        if key is None:
            raise NotFound(f"pkcs11 custody: key object CKA_ID {ckid.hex()} is not on token {self._token_label!r}")
        return key

    def load(self, algorithm: int, blob: bytes, aad: bytes) -> _HsmKey:
        d = self._unpack(blob, aad)
        if d["alg"] != algorithm:
            raise IntegrityError(f"pkcs11 custody: the key blob is of algorithm {d['alg']}, not {algorithm}")
        return _HsmKey(self._private(d), d, algorithms.by_number(algorithm), self)

    def destroy(self, blob: bytes, aad: bytes) -> None:
        """Remove the key's HSM objects; an adopted key's stay (they were made outside the token)."""
        d = self._unpack(blob, aad)
        if d.get("adopted"):
            return
        ckid = bytes.fromhex(d["id"])
        try:
            def remove(s):
                for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
                    for obj in list(s.get_objects({Attribute.CLASS: cls, Attribute.ID: ckid})):
                        obj.destroy()
            self._in_session(remove)
        except p11e.PKCS11Error as e:
            raise CryptobatError(f"pkcs11 custody: cannot destroy key objects CKA_ID {ckid.hex()}: {_why(e)}") from None

    # --- the rest of the protocol -----------------------------------------------------------
    def random(self, n: int) -> bytes:
        """OS randomness and the HSM's (C_GenerateRandom) together: never the HSM's alone."""
        def device() -> bytes:
            try:
                return self._in_session(lambda s: s.generate_random(256))
            except p11e.PKCS11Error as e:
                raise CryptobatError(f"pkcs11 custody: C_GenerateRandom failed: {_why(e)}") from None
        return mixed_random(n, device)

    def describe(self) -> dict[str, str]:
        keys = self._in_session(lambda s: sum(1 for _ in s.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY})))
        with self._lock:
            lib, tok = self._lib, self._token
            d = {"kind": NAME, "module": self._module_path,
                 "library": f"{lib.manufacturer_id} {lib.library_description} "
                            f"{'.'.join(map(str, lib.library_version))}",
                 "manufacturer": tok.manufacturer_id, "model": tok.model, "token": tok.label,
                 "serial": tok.serial.decode(errors="replace") if isinstance(tok.serial, bytes) else str(tok.serial),
                 "firmware": ".".join(map(str, tok.firmware_version)),
                 "objects": f"{keys} private keys; master secret CKA_ID {self._master_id.hex()}"}
        return d

    def counter(self) -> None:
        return None

    def _made_one(self, ckid: bytes) -> None:
        if self._made is not None:
            self._made.append(ckid)

    def kept(self) -> None:
        """A committed token state refers to this custody's objects: :meth:`discard` keeps them."""
        self._made = None

    def discard(self) -> None:
        """Close, first destroying every HSM object this object created (its master secret, keys
        it generated or imported): for a custody no token state came to refer to (a failed init,
        a migration that did not commit). Best effort, object by object: an HSM that is gone or
        refuses leaves them, and the close still happens."""
        made, self._made = self._made or [], None
        try:
            if made and getattr(self, "_session", None) is not None:
                def remove(s) -> None:
                    for ckid in made:
                        for obj in list(s.get_objects({Attribute.ID: ckid})):
                            try:
                                obj.destroy()
                            except p11e.PKCS11Error:
                                pass
                try:
                    self._in_session(remove)
                except (p11e.PKCS11Error, CryptobatError):
                    pass
        finally:
            self.close()

    def close(self) -> None:
        s = getattr(self, "_session", None)
        if s is not None:
            self._session = None
            try:
                with self._lock:
                    s.close()
            except p11e.PKCS11Error:
                pass


