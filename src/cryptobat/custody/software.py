"""Software custody: a 256-bit master key in a 0600 file, private keys sealed under it
(AES-256-GCM, the key's label as associated data) and unsealed only to sign."""
from __future__ import annotations

import os
from pathlib import Path

import dns.dnssec  # noqa: F401  (registers dnspython's DNSSEC algorithms)
import dns.dnssecalgs
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature

from .. import algorithms
from ..errors import CryptobatError, IntegrityError
from .envelope import Envelope, Sealing, write_private


class _DnssecKey:
    """A private key that signs RRSIG signing data per its DNSSEC algorithm (hash inside)."""

    __slots__ = ("_key", "_alg", "_ecdsa", "_half")

    def __init__(self, key: dns.dnssecalgs.GenericPrivateKey, algorithm: algorithms.DnssecAlgorithm) -> None:
        self._key = key
        self._alg = algorithm
        # dnspython's ECDSA signing (RFC 6605, RFC 6979 deterministic) with its parameters made
        # once per key, not per signature: a fifth of the time of a P-256 signature otherwise
        self._ecdsa = None
        if algorithm.kind == "ecdsa":
            pub = key.public_cls
            self._ecdsa = ec.ECDSA(pub.chosen_hash, deterministic_signing=True)  # type: ignore[attr-defined]
            self._half = pub.octets  # type: ignore[attr-defined]

    def sign(self, data: bytes) -> bytes:
        a = self._ecdsa
        if a is None:
            return self._key.sign(data)
        r, s = decode_dss_signature(self._key.key.sign(data, a))
        n = self._half
        return r.to_bytes(n, "big") + s.to_bytes(n, "big")

    def sign_digest(self, digest: bytes) -> bytes:
        k, alg = self._key.key, self._alg
        h = alg.hash_algorithm
        if h is None or len(digest) != h.digest_size:
            raise CryptobatError("hash-only signing is not defined for this key type")
        if alg.kind == "rsa":
            return k.sign(digest, padding.PKCS1v15(), Prehashed(h))
        r, s = decode_dss_signature(k.sign(digest, ec.ECDSA(Prehashed(h))))
        n = alg.signature_len // 2
        return r.to_bytes(n, "big") + s.to_bytes(n, "big")


class SoftwareCustody(Sealing):
    """Master key in ``HOME/master.key`` (0600); private keys sealed under it."""

    name = "software"
    # Threads sign at once here: cryptography releases the GIL while it signs (measured with
    # 50.0: RSA-2048, one thread 1,038 sig/s, two 1,931 on two cores).
    concurrent = True

    def __init__(self, home: Path, create: bool = False) -> None:
        path = Path(home) / "master.key"
        if create and not path.exists():
            write_private(path, os.urandom(32), exclusive=True)
        try:
            master = path.read_bytes()
        except FileNotFoundError:
            if (Path(home) / "state.db").exists():
                raise IntegrityError(f"{path} is missing: the token's keys cannot be opened without it "
                                     f"(restore it from the token's backup)") from None
            raise CryptobatError(f"no token at {home} (run: cryptobat init)") from None
        except OSError as e:
            raise IntegrityError(f"cannot read {path}: {e.strerror}") from None
        if len(master) != 32:
            raise IntegrityError(f"{path} is damaged (not a 32-byte master key)")
        self._envelope = Envelope(master)

    def generate(self, algorithm: int, aad: bytes) -> tuple[bytes, bytes]:
        alg = algorithms.by_number(algorithm)
        key = alg.dnspython.generate(alg.rsa_default_bits) if alg.kind == "rsa" else alg.dnspython.generate()
        return self.import_key(algorithm, key.key, aad)

    def import_key(self, algorithm: int, private_key, aad: bytes) -> tuple[bytes, bytes]:
        key = algorithms.by_number(algorithm).dnspython(key=private_key)
        der = private_key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
        return key.public_key().encode_key_bytes(), self.seal(der, aad)

    def load(self, algorithm: int, blob: bytes, aad: bytes) -> _DnssecKey:
        der = self.unseal(blob, aad)
        private = serialization.load_der_private_key(der, password=None)
        alg = algorithms.by_number(algorithm)
        return _DnssecKey(alg.dnspython(key=private), alg)

    def random(self, n: int) -> bytes:
        return os.urandom(n)
