"""Signing counts and refusals not yet in the audit log.

Signatures and refusals are far too many to audit one by one: the token adds them up
here and writes one audit entry for them at most once a second. Refusals are counted
by reason and by (key, reason), at most MAX_REASONS and MAX_KEYED distinct ones an
entry (the rest under OTHER), so a client sending refused requests as fast as it can
adds one bounded entry a second, not one per request, whatever labels it invents.

:func:`merge` folds an entry's (key, reason) counts into the token's cumulative
counters, bounded the same way (MAX_TOTAL pairs), so ``status`` shows them without
reading the audit log back.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from .api import SignResult

MAX_REASONS = 16  # distinct refusal reasons in one audit entry
MAX_KEYED = 24  # distinct (key, reason) pairs in one audit entry (audit.MAX_ITEMS bounds a list at 32)
MAX_TOTAL = 256  # distinct (key, reason) pairs in the token's cumulative counters
MAX_KEY = 64  # characters of a key label kept (token labels are at most 64)
OTHER = "other reasons"
ANY_KEY = "*"  # the key of pairs past a bound
NO_KEY = "-"  # the key of refusals that name none (PIN, a window for a zone)


_VARYING = re.compile(r"'[^']*'|(?<![#\w])\d+\b")  # what a client chooses inside a reason: quoted labels, numbers


def reason_kind(why: str) -> str:
    """``why`` with the parts a client chooses (quoted labels, key tags, algorithm and type
    numbers) blanked: the key under which a refusal is counted per key, so a client varying
    them cannot fill the bounded counters and push the real keys' refusals out."""
    return _VARYING.sub(lambda m: "'…'" if m.group(0)[0] == "'" else "#", why)


def _bounded_add(counts: dict, key, n: int, limit: int, other) -> None:
    """Add ``n`` to ``counts[key]``; a new key past ``limit`` entries counts under ``other``."""
    if key not in counts and len(counts) >= limit:
        key = other
    counts[key] = counts.get(key, 0) + n


@dataclass
class Tally:
    signatures: int = 0
    compat_signatures: int = 0
    batches: int = 0
    refusals: int = 0  # refused signatures
    pin_refused: int = 0  # PIN checks refused without checking (locked, none set)
    calls_refused: int = 0  # other refused calls: key management outside a window, wrong PINs
    reasons: dict[str, int] = field(default_factory=dict)  # refused signatures by reason
    keyed: dict[tuple[str, str], int] = field(default_factory=dict)  # every refusal by (key, reason)

    def add(self, results: Sequence[SignResult], compat: bool = False,
            labels: Sequence[str] | None = None) -> None:
        """Count one batch; ``labels`` (one per result) names the key each was asked of."""
        ok = sum(1 for r in results if r.ok)
        self.signatures += ok
        self.compat_signatures += ok if compat else 0
        self.batches += 1
        if ok == len(results):
            return
        for i, r in enumerate(results):
            if not r.ok:
                self.refusals += 1
                why = r.reason or "refused"
                _bounded_add(self.reasons, why, 1, MAX_REASONS, OTHER)
                self._keyed(labels[i] if labels is not None and i < len(labels) else NO_KEY, why)

    def refuse(self, key: str, reason: str, pin: bool = False) -> None:
        """Count a refused call that is not a signature (``pin``: a PIN refused unchecked)."""
        if pin:
            self.pin_refused += 1
        else:
            self.calls_refused += 1
        self._keyed(key or NO_KEY, reason)

    def _keyed(self, key: str, reason: str) -> None:
        # the token counts a label no key has under NO_KEY; the reason is counted by its kind
        _bounded_add(self.keyed, (key[:MAX_KEY], reason_kind(reason)), 1, MAX_KEYED, (ANY_KEY, OTHER))

    @property
    def empty(self) -> bool:
        return not (self.batches or self.pin_refused or self.calls_refused)

    def audit_event(self) -> tuple[str, dict]:
        """The audit entry that records this tally: its event name and fields."""
        fields: dict = {"signatures": self.signatures, "batches": self.batches}
        if self.refusals:
            fields.update(refusals=self.refusals, reasons=dict(self.reasons))
        if self.pin_refused:
            fields["pin_refused"] = self.pin_refused
        if self.calls_refused:
            fields["calls_refused"] = self.calls_refused
        if self.keyed:
            fields["refused"] = [[k, why, n] for (k, why), n in self.keyed.items()]
        event = ("refused-sign" if self.refusals else
                 "refused-call" if self.calls_refused or self.pin_refused else "sign")
        return event, fields


def merge(total: Mapping[str, Mapping[str, int]], keyed: Mapping[tuple[str, str], int]
          ) -> dict[str, dict[str, int]]:
    """``total`` (key -> reason -> count) plus ``keyed``, at most MAX_TOTAL pairs in all."""
    out = {k: dict(v) for k, v in total.items()}
    pairs = sum(len(v) for v in out.values())
    for (key, why), n in keyed.items():
        if why not in out.get(key, {}) and pairs >= MAX_TOTAL:
            key, why = ANY_KEY, OTHER
        row = out.setdefault(key, {})
        pairs += why not in row
        row[why] = row.get(why, 0) + n
    return out


def rows(total: Mapping[str, Mapping[str, int]]) -> list[tuple[str, str, int]]:
    """(key, reason, count) of cumulative counters, most refused first."""
    return sorted(((k, why, n) for k, v in total.items() for why, n in v.items()), key=lambda r: (-r[2], r[0], r[1]))
