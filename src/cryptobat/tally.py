"""Signing counts not yet in the audit log.

Signatures and refusals are far too many to audit one by one: the token adds them up
here and writes one audit entry for them at most once a second. Refusals are counted
by reason, at most MAX_REASONS distinct ones an entry, so a client sending refused
requests as fast as it can adds one bounded entry a second, not one per request.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from .api import SignResult

MAX_REASONS = 16  # distinct refusal reasons in one audit entry
OTHER = "other reasons"


@dataclass
class Tally:
    signatures: int = 0
    compat_signatures: int = 0
    batches: int = 0
    refusals: int = 0
    pin_refused: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def add(self, results: Sequence[SignResult], compat: bool = False) -> None:
        ok = sum(1 for r in results if r.ok)
        self.signatures += ok
        self.compat_signatures += ok if compat else 0
        self.batches += 1
        for r in results:
            if not r.ok:
                self.refusals += 1
                why = r.reason or "refused"
                why = why if why in self.reasons or len(self.reasons) < MAX_REASONS else OTHER
                self.reasons[why] = self.reasons.get(why, 0) + 1

    @property
    def empty(self) -> bool:
        return not (self.batches or self.pin_refused)

    def audit_event(self) -> tuple[str, dict]:
        """The audit entry that records this tally: its event name and fields."""
        fields: dict = {"signatures": self.signatures, "batches": self.batches}
        if self.refusals:
            fields.update(refusals=self.refusals, reasons=dict(self.reasons))
        if self.pin_refused:
            fields["pin_refused"] = self.pin_refused
        return ("refused-sign" if self.refusals else "sign"), fields
