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

    def dnskey(self) -> dns.rdtypes.ANY.DNSKEY.DNSKEY:
        return dns.rdtypes.ANY.DNSKEY.DNSKEY(
            dns.rdataclass.IN, dns.rdatatype.DNSKEY, self.flags, 3, self.algorithm, self.public_key
        )

    def ds(self, digest: int = 2):
        return dns.dnssec.make_ds(dns.name.from_text(self.zone), self.dnskey(), digest)

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["public_key"] = self.public_key.hex()
        return d

    @classmethod
    def from_json(cls, d: dict) -> "KeyInfo":
        d = dict(d)
        d["public_key"] = bytes.fromhex(d["public_key"])
        return cls(**d)


@dataclass(frozen=True)
class SignResult:
    """A signature, or the reason the token refused to make it."""

    signature: bytes | None = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.signature is not None
