"""Officer presence per console session, and operations held for remote approval.

Authority belongs to a console *session* (one connection on the console socket,
the pty, a serial line, the local terminal): officers logged in on a session
count for commands typed on that session only, and presence is refreshed only
by their own successful commands. It is volatile, like the RAM of the original
device, expires after an idle timeout and ``coreset`` ends it.

Remote M-of-N is operation-bound: a quorum command typed where fewer than M
officers are present is held as a :class:`PendingOperation` with an id and its
exact text; officers on their own sessions see it with ``pending`` and run
``approve ID``. It runs once M distinct officers approved that very operation
within :data:`PENDING_WINDOW`. The token accepts a state change only with an
:class:`Approval` that names at least M enrolled officers.
"""
from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass, field
from typing import Callable

from .errors import ConfigurationDisabled, Conflict, LimitReached, NotFound, NotPermitted

IDLE_TIMEOUT = 600
PENDING_WINDOW = 600  # seconds an operation waits for its approvals
MAX_PENDING = 16  # operations held at once: holding is not a way to fill the token's memory
LOCAL_TRANSPORTS = frozenset({"local", "pty", "serial"})  # physically at the token (the original's serial port)


@dataclass(frozen=True)
class Approver:
    name: str
    session: str  # e.g. "pty#1", "socket#4"

    def __str__(self) -> str:
        return f"{self.name}@{self.session}"


@dataclass(frozen=True)
class Approval:
    """The officers (and where each was logged in) who agreed to one operation."""

    approvers: tuple[Approver, ...] = ()
    pending: int | None = None  # the held operation's id, if it waited for remote approvals

    def names(self) -> set[str]:
        return {a.name for a in self.approvers}

    def audit_fields(self) -> dict:
        fields: dict = {"officers": sorted(self.names()), "approvals": sorted(str(a) for a in self.approvers)}
        if self.pending is not None:
            fields["pending"] = self.pending
        return fields


class Session:
    """One console session's logged-in officers: name -> token time of their last own command."""

    def __init__(self, sid: str, transport: str, idle_timeout: int) -> None:
        self.id = sid
        self.transport = transport
        self.idle_timeout = idle_timeout
        self._seen: dict[str, int] = {}
        self.signer = False  # the signer PIN was given on this session (console signing)

    @property
    def local(self) -> bool:
        return self.transport in LOCAL_TRANSPORTS

    def arrive(self, name: str, now: int) -> None:
        self._seen[name] = now

    def leave(self, name: str) -> None:
        self._seen.pop(name, None)

    def reset(self) -> None:
        self._seen.clear()
        self.signer = False

    def present(self, now: int) -> set[str]:
        """Officers present at ``now``; idle ones (or ones 'seen' in the future) are dropped."""
        for name, seen in list(self._seen.items()):
            if now - seen > self.idle_timeout or now < seen - 5:
                del self._seen[name]
        return set(self._seen)

    def refresh(self, names: set[str], now: int) -> None:
        for n in names & set(self._seen):
            self._seen[n] = now

    def approval(self, now: int) -> Approval:
        return Approval(tuple(Approver(n, self.id) for n in sorted(self.present(now))))


@dataclass
class PendingOperation:
    id: int
    text: str  # exactly what was typed (secrets left out), shown by ``pending``
    session: str  # where it was proposed
    expires: int
    run: Callable[[Approval], str]  # performs it with the approval; returns the console's answer
    approvals: dict[str, str] = field(default_factory=dict)  # officer -> session id

    def approval(self) -> Approval:
        return Approval(tuple(Approver(n, s) for n, s in sorted(self.approvals.items())), self.id)


class Quorum:
    """Every live session of a token and the operations held for approval."""

    def __init__(self, idle_timeout: int = IDLE_TIMEOUT) -> None:
        self.idle_timeout = idle_timeout
        self._sessions: "weakref.WeakValueDictionary[str, Session]" = weakref.WeakValueDictionary()
        self._ids = itertools.count(1)
        self._op_ids = itertools.count(1)
        self._pending: dict[int, PendingOperation] = {}

    def open_session(self, transport: str) -> Session:
        """A new session; it ends (and its logins with it) when its owner drops it."""
        s = Session(f"{transport}#{next(self._ids)}", transport, self.idle_timeout)
        self._sessions[s.id] = s
        return s

    def sessions(self) -> list[Session]:
        return list(self._sessions.values())

    def forget(self, name: str) -> None:
        """An officer removed from the token: gone from every session and every approval."""
        for s in self.sessions():
            s.leave(name)
        for op in self._pending.values():
            op.approvals.pop(name, None)

    def pending(self, now: int) -> list[PendingOperation]:
        for i, op in list(self._pending.items()):
            if op.expires <= now:
                del self._pending[i]
        return sorted(self._pending.values(), key=lambda op: op.id)

    def hold(self, session: Session, text: str, run: Callable[[Approval], str], now: int) -> PendingOperation:
        here = session.present(now)
        if not here:
            raise NotPermitted("no officer logged in on this session")
        if len(self.pending(now)) >= MAX_PENDING:
            raise LimitReached(f"{MAX_PENDING} operations are already pending")
        op = PendingOperation(next(self._op_ids), text, session.id, now + PENDING_WINDOW, run,
                              {n: session.id for n in sorted(here)})
        self._pending[op.id] = op
        return op

    def get(self, op_id: int, now: int) -> PendingOperation:
        op = next((o for o in self.pending(now) if o.id == op_id), None)
        if op is None:
            raise NotFound(f"no pending operation {op_id}")
        return op

    def approve(self, session: Session, op_id: int, now: int) -> tuple[PendingOperation, list[str]]:
        """Add the approvals of the officers present on ``session``; return the newly approving names."""
        op = self.get(op_id, now)
        here = session.present(now)
        if not here:
            raise ConfigurationDisabled()
        new = sorted(here - set(op.approvals))
        if not new:
            raise Conflict(f"operation {op_id} is already approved by {', '.join(sorted(here))}")
        for n in new:
            op.approvals[n] = session.id
        session.refresh(set(new), now)
        return op, new

    def drop(self, op_id: int) -> None:
        self._pending.pop(op_id, None)
