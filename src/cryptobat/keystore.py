"""DNSSEC key records: algorithms, roles, labels, and their public views."""
from __future__ import annotations

import dns.dnssec
import dns.name
from dns.dnssectypes import Algorithm

from .api import ROLES, KeyInfo
from .errors import CryptobatError

SUPPORTED = {8: "RSASHA256", 10: "RSASHA512", 13: "ECDSAP256SHA256", 14: "ECDSAP384SHA384",
             15: "ED25519", 16: "ED448"}
FLAGS = {"ksk": 257, "csk": 257, "zsk": 256}


def parse_algorithm(text: str) -> int:
    """``8`` or ``RSASHA256`` (any case) -> 8; only the algorithms the token supports."""
    try:
        alg = int(text) if text.isdigit() else int(Algorithm.from_text(text.upper()))
    except (ValueError, dns.exception.DNSException):
        alg = -1
    if alg not in SUPPORTED:
        names = ", ".join(f"{n} ({m})" for n, m in SUPPORTED.items())
        raise CryptobatError(f"unsupported algorithm {text!r}; use one of {names}")
    return alg


def parse_role(text: str) -> str:
    role = text.lower()
    if role not in ROLES:
        raise CryptobatError(f"role must be one of {', '.join(ROLES)}")
    return role


def parse_zone(text: str) -> str:
    try:
        return dns.name.from_text(text).canonicalize().to_text()
    except dns.exception.DNSException as e:
        raise CryptobatError(f"bad zone name {text!r}: {e}") from None


def make_info(label: str, zone: str, algorithm: int, role: str, public_key: bytes, compat: bool = False) -> KeyInfo:
    flags = FLAGS[role]
    probe = KeyInfo(label, zone, algorithm, role, 0, flags, public_key)
    return KeyInfo(label, zone, algorithm, role, dns.dnssec.key_id(probe.dnskey()), flags, public_key, compat)


def default_label(zone: str, role: str, keytag: int) -> str:
    return f"{zone.rstrip('.') or 'root'}-{role}-{keytag}"


def record(info: KeyInfo, blob: bytes, created: int) -> dict:
    return {**info.to_json(), "blob": blob.hex(), "created": created}


def info_of(rec: dict) -> KeyInfo:
    return KeyInfo.from_json({k: v for k, v in rec.items() if k not in ("blob", "created")})


def zone_wire(zone: str) -> bytes:
    return dns.name.from_text(zone).canonicalize().to_wire()
