"""Types shared by the token and every client of its signing API.

A signer (``signzone``, the PKCS#11 adapter, the native socket) sees keys as
:class:`KeyInfo` and gets one :class:`SignResult` per payload, in order: either
a signature or the token's reason for refusing it.
"""
from __future__ import annotations

from dataclasses import dataclass

import dns.dnssec
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.DNSKEY

ROLES = ("ksk", "zsk", "csk")


@dataclass(frozen=True)
class KeyInfo:
    """Public view of a token key: everything but the private half."""

    label: str
    zone: str  # absolute, lower case, e.g. "testzone."
    algorithm: int
    role: str  # "ksk" | "zsk" | "csk"
    keytag: int
    flags: int  # 257 for ksk/csk, 256 for zsk
    public_key: bytes  # the DNSKEY public key field, wire form
    compat: bool = False  # hash-only (unparsed) signing allowed for PKCS#11 clients
    p11_id: bytes | None = None  # the CKA_ID a PKCS#11 application chose; None: the label's UTF-8

    @property
    def cka_id(self) -> bytes:
        """The PKCS#11 CKA_ID of this key's objects."""
        return self.label.encode() if self.p11_id is None else self.p11_id

    def dnskey(self) -> dns.rdtypes.ANY.DNSKEY.DNSKEY:
        return dns.rdtypes.ANY.DNSKEY.DNSKEY(
            dns.rdataclass.IN, dns.rdatatype.DNSKEY, self.flags, 3, self.algorithm, self.public_key
        )

    def ds(self, digest: int = 2):
        return dns.dnssec.make_ds(dns.name.from_text(self.zone), self.dnskey(), digest)

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["public_key"] = self.public_key.hex()
        if self.p11_id is None:
            del d["p11_id"]  # keys without one read and write as before
        else:
            d["p11_id"] = self.p11_id.hex()
        return d

    @classmethod
    def from_json(cls, d: dict) -> "KeyInfo":
        d = dict(d)
        d["public_key"] = bytes.fromhex(d["public_key"])
        if d.get("p11_id") is not None:
            d["p11_id"] = bytes.fromhex(d["p11_id"])
        return cls(**d)


@dataclass(frozen=True)
class SignResult:
    """A signature, or the reason the token refused to make it."""

    signature: bytes | None = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.signature is not None
