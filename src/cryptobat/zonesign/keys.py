"""BIND key files (``K<zone>.+<alg>+<tag>[.key|.private]``) -> token keys."""
from __future__ import annotations

import os
import re
from urllib.parse import unquote

import dns.exception
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype

from .. import algorithms
from ..api import KeyInfo

_KEYNAME = re.compile(r"^K(.+?)\.?\+(\d{1,3})\+(\d{1,5})$")


class KeyFileError(Exception):
    pass


class SignKey:
    """A token key as the signer uses it (this and :class:`KeyFile` are plain classes: a
    dataclass costs about a millisecond to make at import, a small zone's run a few tens)."""

    __slots__ = ("info", "sep", "signer_wire")

    def __init__(self, info: KeyInfo, sep: bool, signer_wire: bytes) -> None:
        self.info = info
        self.sep = sep  # named with -k (BIND's KSK marker); what it signs follows info.role
        self.signer_wire = signer_wire  # the zone's canonical wire name

    @property
    def name(self) -> str:
        """``zone/ALGNAME/tag`` as dnssec-signzone prints it."""
        zone = self.info.zone.rstrip(".") or "."
        return f"{zone}/{algorithms.by_number(self.info.algorithm).mnemonic}/{self.info.keytag}"


class KeyFile:
    __slots__ = ("path", "zone", "algorithm", "keytag", "label", "dnskey", "ttl")

    def __init__(self, path: str, zone: str, algorithm: int, keytag: int, label: str | None,
                 dnskey: dns.rdata.Rdata | None, ttl: int | None) -> None:
        self.path = path
        self.zone = zone  # absolute, lower case
        self.algorithm, self.keytag = algorithm, keytag
        self.label, self.dnskey, self.ttl = label, dnskey, ttl


def _label(value: str) -> str:
    """The token label in a ``Label:`` line; PKCS#11 URIs name it by ``object=``."""
    value = value.strip()
    if value.startswith("pkcs11:"):
        for attr in value[7:].split(";"):
            k, _, v = attr.partition("=")
            if k.strip() == "object":
                return unquote(v)
    return value


def read_keyfile(path: str) -> KeyFile:
    base = path
    for suffix in (".key", ".private"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    m = _KEYNAME.match(os.path.basename(base))
    if not m:
        raise KeyFileError(f"{path}: not a key file name K<zone>.+<alg>+<tag>")
    zone = dns.name.from_text(m.group(1)).to_text().lower()
    kf = KeyFile(path, zone, int(m.group(2)), int(m.group(3)), None, None, None)
    found = False
    try:
        with open(base + ".private", encoding="utf-8", errors="replace") as f:
            found = True
            for line in f:
                k, _, v = line.partition(":")
                if k.strip().lower() == "label" and v.strip():
                    kf.label = _label(v)
    except FileNotFoundError:
        pass
    try:
        with open(base + ".key", encoding="utf-8", errors="replace") as f:
            found = True
            for line in f:
                line = line.split(";", 1)[0]
                toks = line.split()
                up = [t.upper() for t in toks]
                if "DNSKEY" not in up:
                    continue
                i = up.index("DNSKEY")
                kf.dnskey = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.DNSKEY, " ".join(toks[i + 1 :]))
                for t in toks[1:i]:
                    if t.isdigit():
                        kf.ttl = int(t)
                break
    except FileNotFoundError:
        pass
    except (ValueError, dns.exception.DNSException) as e:
        raise KeyFileError(f"{base}.key: bad DNSKEY record: {e}") from None
    if not found:
        raise KeyFileError(f"{base}: neither {base}.key nor {base}.private can be read")
    return kf


def make_signkey(info: KeyInfo, sep: bool) -> SignKey:
    algorithms.public_key_of(info.dnskey())  # raises on an algorithm or key we cannot verify
    return SignKey(info, sep, dns.name.from_text(info.zone).canonicalize().to_wire())


def match(kf: KeyFile, token_keys: list[KeyInfo], origin: str) -> KeyInfo:
    """The token key a key file names: by label, else by zone+algorithm+key tag."""
    if kf.zone != origin:
        raise KeyFileError(f"{kf.path}: key is for zone {kf.zone}, not {origin}")
    cands = [k for k in token_keys if kf.label is not None and k.label == kf.label]
    if not cands:
        cands = [
            k
            for k in token_keys
            if k.zone.lower() == kf.zone and k.algorithm == kf.algorithm and k.keytag == kf.keytag
        ]
    if not cands:
        how = f"label {kf.label!r} or " if kf.label else ""
        raise KeyFileError(f"{kf.path}: no key with {how}zone/algorithm/tag {kf.zone}/{kf.algorithm}/{kf.keytag} in the token")
    if len(cands) > 1:
        raise KeyFileError(f"{kf.path}: ambiguous: {len(cands)} token keys match")
    info = cands[0]
    if info.algorithm != kf.algorithm or info.keytag != kf.keytag:
        raise KeyFileError(
            f"{kf.path}: token key {info.label!r} is {info.algorithm}/{info.keytag}, "
            f"the file name says {kf.algorithm}/{kf.keytag}"
        )
    if kf.dnskey is not None and (kf.dnskey.key != info.public_key or kf.dnskey.algorithm != info.algorithm):
        raise KeyFileError(f"{kf.path}: DNSKEY in the .key file is not the token key {info.label!r}")
    return info
