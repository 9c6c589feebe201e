"""A hash-chained audit log: each entry commits to the one before it.

The chain head (sequence number and hash) lives in the integrity-protected
state, so an edited, reordered or deleted entry, including a truncated tail,
is found by :func:`verify`. Entries record events and counts, never key
material, PINs, passphrases or TOTP secrets.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Iterable

GENESIS = "0" * 64
MAX_TEXT = 200  # characters of any one string field: entries are never sized by a client
MAX_ITEMS = 32  # entries of any one list or mapping field


def bounded(value):
    """``value`` with every string, list and mapping cut to a bounded size, recursively.

    Labels, officer names, reasons and commands can come from a client; cut here, once,
    an audit entry cannot be used to fill the disk.
    """
    if isinstance(value, str):
        return value if len(value) <= MAX_TEXT else value[:MAX_TEXT] + f"...(+{len(value) - MAX_TEXT})"
    if isinstance(value, dict):
        items = list(value.items())
        out = {bounded(str(k)): bounded(v) for k, v in items[:MAX_ITEMS]}
        if len(items) > MAX_ITEMS:
            out["..."] = len(items) - MAX_ITEMS
        return out
    if isinstance(value, (list, tuple)):
        out = [bounded(v) for v in value[:MAX_ITEMS]]
        return out + [f"...(+{len(value) - MAX_ITEMS})"] if len(value) > MAX_ITEMS else out
    return value


def canonical(entry: dict) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()


def link(prev_hash: str, entry: dict) -> str:
    return hashlib.sha256(bytes.fromhex(prev_hash) + canonical(entry)).hexdigest()


@dataclass
class Head:
    seq: int = 0
    hash: str = GENESIS


class Chain:
    """Builds new entries on top of a head; the store persists them."""

    def __init__(self, head: Head) -> None:
        self.head = head

    def append(self, time: int, event: str, fields: dict) -> tuple[int, str, str]:
        """Return (seq, entry JSON, hash) for a new entry and advance the head."""
        seq = self.head.seq + 1
        entry = {"seq": seq, "time": time, "event": event, **fields}
        h = link(self.head.hash, entry)
        self.head = Head(seq, h)
        return seq, canonical(entry).decode(), h


def verify(rows: Iterable[tuple[int, str, str]], head: Head, start: Head = Head()) -> tuple[int, str | None]:
    """Walk stored (seq, entry, hash) rows after ``start``; return (entries checked, first problem or None)."""
    prev = start.hash
    expected = start.seq + 1
    n = start.seq
    for seq, text, h in rows:
        try:
            entry = json.loads(text)
        except ValueError:
            return n, f"entry {seq}: not valid JSON"
        if seq != expected or entry.get("seq") != seq:
            return n, f"entry {seq}: out of sequence (expected {expected})"
        if link(prev, entry) != h:
            return n, f"entry {seq}: hash mismatch (edited or reordered)"
        prev, expected, n = h, expected + 1, n + 1
    if n != head.seq or prev != head.hash:
        return n, f"log ends at entry {n}, state says {head.seq} (entries deleted)"
    return n, None
