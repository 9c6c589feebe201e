"""DNSSEC key records: algorithms, roles, labels, and their public views."""
from __future__ import annotations

import dns.dnssec
import dns.exception
import dns.name

from . import algorithms
from .api import ROLES, KeyInfo
from .errors import InvalidArgument

FLAGS = {"ksk": 257, "csk": 257, "zsk": 256}


def parse_algorithm(text: str) -> int:
    """``8`` or ``RSASHA256`` (any case) -> 8; only the algorithms the token supports."""
    return algorithms.by_name(text).number


def parse_role(text: str) -> str:
    role = text.lower()
    if role not in ROLES:
        raise InvalidArgument(f"role must be one of {', '.join(ROLES)}")
    return role


def parse_zone(text: str) -> str:
    try:
        return dns.name.from_text(text).canonicalize().to_text()
    except dns.exception.DNSException as e:
        raise InvalidArgument(f"bad zone name {text!r}: {e}") from None


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
