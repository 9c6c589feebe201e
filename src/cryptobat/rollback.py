"""Rollback detection: the store's counter value against the device's, and which changes move it.

A custody with a monotonic counter (a TPM NV counter, :mod:`cryptobat.custody.nvcounter`)
lets the token notice a ``state.db`` copied back from an earlier moment: every
security-relevant change first commits the state carrying the counter's next value, then
increments the device. A crash between the two leaves the store exactly one ahead (repaired
at open by incrementing); a store behind the device is an older copy, and a store further
ahead is another device's. Pure decisions here; the I/O is in :mod:`cryptobat.home`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from .state import AuditHead, Counters, TokenState

# Commits that only record what happened (signing counts, refusals, approvals, the clock's
# high-water mark) do not move the counter: real NV wears out (ST33: ~500,000 writes), and a
# signer or a minute timer must not be able to spend it. Every other event does, so a new kind
# of change is protected unless it is named here. A restored store can so undo at most these:
# counters and audit entries after the copy (the audit chain still shows what it holds), and
# a high-water mark at most the copy's age behind (the clock-gap rule still bounds the time).
AUDIT_ONLY = frozenset({
    "sign", "refused-sign", "refused-call", "refused",  # signing batches and refused calls (tally)
    "command",                                          # a console read (status, keylist...)
    "pending", "approve", "cancel", "coreset",          # a quorum command's own change is counted when it runs
    "clock",                                            # high-water mark, persisted every minute
    "store-retry", "accepted-loss", "custody-orphan", "custody-resumed",
    "serve", "stop", "restart", "restart-failed", "takeover",
    "rollback-repaired", "rollback-accepted", "rollback-held",  # these set the value themselves
})

# Held (a store the counter refused, opened for the officers to decide): what may still change.
HELD_EVENTS = frozenset({"rollback-held", "accepted-loss", "command", "stop", "cologin", "coreset", "pending", "approve", "cancel", "refused", "rollback-accepted",
                         "sign", "refused-sign", "refused-call", "clock", "store-retry", "clock-tamper",
                         "custody-resumed"})


def counts(event: str, fields: dict) -> bool:
    """Whether a commit of ``event`` moves the rollback counter.

    Of the signer PIN's checks only the wrong PIN that locks it counts, so a copy cannot undo
    a lockout. The others do not: the signing host knows the PIN, and wrong PINs between right
    ones would otherwise spend NV writes without bound (at scrypt's pace, a real TPM's ~500,000
    writes in hours). A restored copy can so bring back a lower count of wrong PINs short of the
    lockout, which takes write access to the token's files besides the PIN."""
    if event in AUDIT_ONLY:
        return False
    if event == "pin":
        return fields.get("why") == PIN_LOCKED
    return True


PIN_LOCKED = "PIN now locked"  # the audit reason of the wrong PIN that locks the signer PIN


def guarded(state: TokenState) -> TokenState:
    """The part of ``state`` a restored copy must not bring back: all of it but the audit heads,
    the signing and refusal counters and the clock's high-water mark. A commit that leaves this
    unchanged (a login refused while the officer is locked out) does not move the counter."""
    return state.replace(audit=AuditHead(), audit_checked=AuditHead(), counters=Counters(), rollback=0,
                         clock=dataclasses.replace(state.clock, hwm=0))


@dataclass(frozen=True)
class Verdict:
    action: Literal["ok", "repair", "refuse"]
    message: str = ""


def decide(store: int, device: int) -> Verdict:
    """What to do with a store recording ``store`` on a device whose counter reads ``device``."""
    if store == device:
        return Verdict("ok")
    if store == device + 1:  # the commit landed, the increment did not (crash, power loss)
        return Verdict("repair", f"state.db is one change ahead of the TPM's rollback counter "
                                 f"(store {store}, TPM {device}): the last change was committed but the "
                                 f"counter not moved (a crash in between); counter moved to {store}")
    if store < device:
        why = (f"state.db is older than the TPM's rollback counter (store {store}, TPM {device}): "
               f"a copy was restored, or changes were lost")
    else:
        why = (f"state.db is ahead of the TPM's rollback counter (store {store}, TPM {device}): "
               f"a store from another TPM, or the counter was replaced")
    return Verdict("refuse", why + "; not serving. Officers decide at the token's console: "
                   "cryptobat console --rollback-hold, then acceptrollback (quorum)")
