"""BIND-style key files for token keys: the public half, and a .private that names the token key.

As BIND does for HSM keys, the ``.private`` file holds no key material, only
``Engine:`` and ``Label:`` lines that say where the key lives.
"""
from __future__ import annotations

import os
from pathlib import Path

from . import algorithms
from .api import KeyInfo


def basename(k: KeyInfo) -> str:
    return f"K{k.zone}+{k.algorithm:03d}+{k.keytag:05d}"


def key_text(k: KeyInfo) -> str:
    kind = "key-signing" if k.flags & 1 else "zone-signing"
    return (f"; This is a {kind} key, keyid {k.keytag}, for {k.zone}\n"
            f"; Cryptobat label: {k.label}\n"
            f"{k.zone} IN DNSKEY {k.dnskey().to_text()}\n")


def private_text(k: KeyInfo) -> str:
    return (f"Private-key-format: v1.3\n"
            f"Algorithm: {k.algorithm} ({algorithms.by_number(k.algorithm).mnemonic})\n"
            f"Engine: cryptobat\n"
            f"Label: {k.label}\n")


def write(keys: list[KeyInfo], directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for k in keys:
        for suffix, text in ((".key", key_text(k)), (".private", private_text(k))):
            p = directory / (basename(k) + suffix)
            tmp = p.with_suffix(p.suffix + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, p)
            written.append(p)
    return written

