"""Every fact about the DNSSEC algorithms the token knows, in one declarative table.

As Knot's libdnssec keeps one row per algorithm (``key/algorithm.c``), each DNSSEC
algorithm here is one frozen :class:`DnssecAlgorithm`: its number and mnemonic, key
kind, hash, curve, key sizes, wire lengths, PKCS#11 encodings and what the token does
with it. Code that needs a fact looks it up here instead of keeping its own
``{8: ..., 13: ...}`` dictionary, so adding or withdrawing an algorithm is one row.

The cryptography itself stays with dnspython (``dns.dnssecalgs``) and ``cryptography``;
the table only says which of their classes and parameters an algorithm uses. PKCS#11
numbers are plain values from pkcs11t.h (v3.0) so the core does not import the RPC layer.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

import dns.dnssec  # noqa: F401  (registers dnspython's DNSSEC algorithm classes)
import dns.dnssecalgs
import dns.exception
import dns.rdataclass
import dns.rdatatype
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from dns.dnssecalgs.base import GenericPrivateKey, GenericPublicKey
from dns.dnssectypes import Algorithm as _Mnemonic
from dns.rdtypes.ANY.DNSKEY import DNSKEY

from .errors import InvalidArgument

Kind = Literal["rsa", "ecdsa", "eddsa"]

# PKCS#11 mechanisms and key types (pkcs11t.h)
CKM_RSA_PKCS_KEY_PAIR_GEN = 0x0
CKM_RSA_PKCS = 0x1
CKM_SHA1_RSA_PKCS = 0x6
CKM_SHA256_RSA_PKCS = 0x40
CKM_SHA512_RSA_PKCS = 0x42
CKM_EC_KEY_PAIR_GEN = 0x1040
CKM_ECDSA = 0x1041
CKM_ECDSA_SHA256 = 0x1044
CKM_ECDSA_SHA384 = 0x1045
CKM_EC_EDWARDS_KEY_PAIR_GEN = 0x1055
CKM_EDDSA = 0x1057
CKK_RSA = 0x0
CKK_EC = 0x3
CKK_EC_EDWARDS = 0x40

# DER DigestInfo prefixes, RFC 8017 §9.2 note 1: what PKCS#1 v1.5 puts before the hash.
_DIGEST_INFO = {
    "sha1": bytes.fromhex("3021300906052b0e03021a05000414"),
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}
_HASHES = {"sha1": hashes.SHA1, "sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}


@dataclass(frozen=True, slots=True)
class DnssecAlgorithm:
    """One DNSSEC algorithm (RFC 8624 numbering) and everything the token needs to know of it.

    ``key_bits`` is (min, max) as PKCS#11 ``CK_MECHANISM_INFO`` states it: the RSA modulus
    sizes advertised (the token generates ``rsa_default_bits``, as Knot does; imported keys
    are taken as they are: RFC 5702 has a 512-bit example), or the curve's size. ``public_key_len`` and ``signature_len`` are
    the DNSKEY public key field and RRSIG signature lengths of fixed-size algorithms (None
    for RSA). ``curve`` is cryptography's curve object for ECDSA and the curve's name for
    EdDSA (cryptography has no curve objects for Edwards curves).
    """

    number: int
    kind: Kind
    hash: str | None  # hashlib name of the hash over the signing data; EdDSA hashes inside
    curve: ec.EllipticCurve | str | None
    key_bits: tuple[int, int]
    rsa_default_bits: int | None = None
    public_key_len: int | None = None
    signature_len: int | None = None
    ec_params: bytes | None = None  # DER CKA_EC_PARAMS: the curve's OID
    ec_params_aliases: tuple[bytes, ...] = ()  # other CKA_EC_PARAMS clients send for the curve
    mech_keygen: int = CKM_RSA_PKCS_KEY_PAIR_GEN
    mech_sign: int | None = None  # full-data signing: the token hashes
    mech_hash_sign: int | None = None  # hash-only signing: the client hashes
    p11_key_type: int = CKK_RSA
    generate: bool = True  # the token creates and imports keys of it
    sign: bool = True  # the token signs with it
    tpm2: bool = False  # a TPM 2.0 custody can hold its keys

    @property
    def mnemonic(self) -> str:
        """``RSASHA256``, ``ECDSAP256SHA256``...: dnspython's (IANA's) name."""
        return _Mnemonic(self.number).name

    @property
    def hash_len(self) -> int | None:
        return hashlib.new(self.hash).digest_size if self.hash else None

    @property
    def hash_algorithm(self) -> hashes.HashAlgorithm | None:
        """cryptography's hash object, for prehashed (hash-only) signing."""
        return _HASHES[self.hash]() if self.hash else None

    @property
    def digest_info(self) -> bytes | None:
        """RSA only: the DER DigestInfo prefix of a PKCS#1 v1.5 signature's hash."""
        return _DIGEST_INFO[self.hash] if self.kind == "rsa" and self.hash else None

    @property
    def dnspython(self) -> type[GenericPrivateKey]:
        """dnspython's private key class; ``.public_cls`` is the public one."""
        return dns.dnssecalgs.get_algorithm_cls(self.number)


def _rsa(number: int, hash: str, mech_sign: int, *, current: bool) -> DnssecAlgorithm:
    return DnssecAlgorithm(number, "rsa", hash, None, (1024, 4096), rsa_default_bits=2048,
                           mech_sign=mech_sign, mech_hash_sign=CKM_RSA_PKCS,
                           generate=current, sign=current, tpm2=current)


def _ecdsa(number: int, hash: str, curve: ec.EllipticCurve, params: str, mech_sign: int) -> DnssecAlgorithm:
    n = (curve.key_size + 7) // 8
    return DnssecAlgorithm(number, "ecdsa", hash, curve, (curve.key_size, curve.key_size),
                           public_key_len=2 * n, signature_len=2 * n, ec_params=bytes.fromhex(params),
                           mech_keygen=CKM_EC_KEY_PAIR_GEN, mech_sign=mech_sign, mech_hash_sign=CKM_ECDSA,
                           p11_key_type=CKK_EC, tpm2=True)


def _eddsa(number: int, curve: str, bits: int, key_len: int, params: str) -> DnssecAlgorithm:
    alias = curve.encode()  # PKCS#11 3.0 §2.3.5: the curve name as a PrintableString
    return DnssecAlgorithm(number, "eddsa", None, curve, (bits, bits), public_key_len=key_len,
                           signature_len=2 * key_len, ec_params=bytes.fromhex(params),
                           ec_params_aliases=(bytes([0x13, len(alias)]) + alias,),
                           mech_keygen=CKM_EC_EDWARDS_KEY_PAIR_GEN, mech_sign=CKM_EDDSA,
                           p11_key_type=CKK_EC_EDWARDS, tpm2=False)


# RSASHA1 and RSASHA1-NSEC3-SHA1 (RFC 8624 §3.1: MUST NOT sign) are known so their keys and
# signatures can be read and verified; the token neither creates, imports nor signs with them.
_ROWS = (
    _rsa(5, "sha1", CKM_SHA1_RSA_PKCS, current=False),
    _rsa(7, "sha1", CKM_SHA1_RSA_PKCS, current=False),
    _rsa(8, "sha256", CKM_SHA256_RSA_PKCS, current=True),  # RFC 5702
    _rsa(10, "sha512", CKM_SHA512_RSA_PKCS, current=True),  # RFC 5702
    _ecdsa(13, "sha256", ec.SECP256R1(), "06082a8648ce3d030107", CKM_ECDSA_SHA256),  # RFC 6605, prime256v1
    _ecdsa(14, "sha384", ec.SECP384R1(), "06052b81040022", CKM_ECDSA_SHA384),  # RFC 6605, secp384r1
    _eddsa(15, "edwards25519", 255, 32, "06032b6570"),  # RFC 8080, id-Ed25519
    _eddsa(16, "edwards448", 448, 57, "06032b6571"),  # RFC 8080, id-Ed448
)

TABLE: MappingProxyType[int, DnssecAlgorithm] = MappingProxyType({a.number: a for a in _ROWS})
"""Every algorithm the token knows, by number, in number order."""

SIGNING: tuple[DnssecAlgorithm, ...] = tuple(a for a in _ROWS if a.sign)
"""The algorithms the token holds keys of and signs with."""

_BY_PARAMS = {p: a for a in _ROWS for p in (a.ec_params, *a.ec_params_aliases) if p}


def by_number(number: int) -> DnssecAlgorithm:
    """The row of algorithm ``number``; InvalidArgument for one the token does not know."""
    try:
        return TABLE[number]
    except (KeyError, TypeError):
        raise InvalidArgument(f"unknown DNSSEC algorithm {number!r}") from None


def by_name(text: str) -> DnssecAlgorithm:
    """``8`` or ``RSASHA256`` (any case) -> its row; only algorithms the token generates."""
    try:
        number = int(text) if text.isdigit() else int(_Mnemonic.from_text(text.upper()))
    except (ValueError, dns.exception.DNSException):
        number = -1
    alg = TABLE.get(number)
    if alg is None or not alg.generate:
        names = ", ".join(f"{a.number} ({a.mnemonic})" for a in _ROWS if a.generate)
        raise InvalidArgument(f"unsupported algorithm {text!r}; use one of {names}")
    return alg


def by_ec_params(der: bytes) -> DnssecAlgorithm | None:
    """The algorithm whose curve a PKCS#11 CKA_EC_PARAMS names (OID or alias), or None."""
    return _BY_PARAMS.get(bytes(der))


def by_private_key(key) -> DnssecAlgorithm | None:
    """The signing algorithm a bare private key (PEM) implies: an RSA key is RSASHA256,
    the first RSA row the token signs with; None for a key of no such algorithm."""
    for a in SIGNING:
        if isinstance(key, a.dnspython.key_cls) and (
                a.kind != "ecdsa" or key.curve.name == a.curve.name):  # type: ignore[union-attr]
            return a
    return None


def public_key_of(dnskey: DNSKEY) -> GenericPublicKey:
    """dnspython's public key for a DNSKEY: ``.verify(signature, data)`` raises InvalidSignature.

    ValueError for an algorithm not in the table or a key field of the wrong length
    (dnspython reads only the first bytes of an over-long ECDSA key)."""
    alg = TABLE.get(int(dnskey.algorithm))
    if alg is None:
        raise ValueError(f"unknown DNSSEC algorithm {int(dnskey.algorithm)}")
    if alg.public_key_len is not None and len(dnskey.key) != alg.public_key_len:
        raise ValueError(f"{alg.mnemonic} public key is {len(dnskey.key)} bytes, not {alg.public_key_len}")
    return alg.dnspython.public_cls.from_dnskey(dnskey)


def public_key_from(algorithm: int, key: bytes) -> GenericPublicKey:
    """dnspython's public key for a DNSKEY public key field of ``algorithm``; ValueError if bad."""
    return public_key_of(DNSKEY(dns.rdataclass.IN, dns.rdatatype.DNSKEY, 256, 3, algorithm, key))


def verify(algorithm: int, public_key: bytes, signature: bytes, data: bytes) -> bool:
    """Whether ``signature`` is ``algorithm``'s DNSSEC signature over ``data`` by the key whose
    DNSKEY public key field is ``public_key``; False for anything malformed."""
    try:
        public_key_from(algorithm, public_key).verify(signature, data)
    except (InvalidSignature, ValueError, TypeError, dns.exception.DNSException):
        return False
    return True
