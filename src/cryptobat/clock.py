"""The token's trusted clock: system time under guard.

Token time is the system's wall clock plus an offset a quorum may set with
``settime``. It must never run backwards past the high-water mark stored in the
state, and while the token runs, wall time must keep pace with the boot-time
clock (which also counts suspend); a disagreement beyond the tolerance means
someone moved the clock, so the token enters the tamper state and refuses to
sign until a quorum sets the time again. Across a restart the boot-time clock
says nothing, so the high-water mark (persisted while running) bounds the
jump instead: a clock found more than an allowed gap past it is distrusted. Time sources are injected, so the
core has no hidden I/O.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

DEFAULT_TOLERANCE = 30
DEFAULT_GAP = 86400  # how far past the last trusted time the clock may be found at start
HWM_STEP = 60  # persist the high-water mark when it has advanced this far


def _boottime() -> float:
    return time.clock_gettime(getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC))


@dataclass
class Reading:
    now: int
    tamper: str | None = None  # why the clock is now distrusted, first time only
    persist_hwm: bool = False


class TrustedClock:
    def __init__(self, offset: int, hwm: int, tampered: bool, tolerance: int = DEFAULT_TOLERANCE,
                 wall: Callable[[], float] = time.time, mono: Callable[[], float] = _boottime,
                 gap: int = DEFAULT_GAP) -> None:
        self.offset = offset
        self.hwm = hwm
        self.tampered = tampered
        self.tolerance = tolerance
        self._wall = wall
        self._mono = mono
        self.gap = gap
        self._ref: tuple[float, float] | None = None

    def read(self) -> Reading:
        t = self._wall() + self.offset
        m = self._mono()
        tamper = None
        first = self._ref is None
        if first:
            self._ref = (t, m)
        if not self.tampered and first and t > self.hwm + self.gap:
            tamper = (f"clock is {int(t - self.hwm)} s past the last trusted time "
                      f"(allowed {self.gap} s across a restart)")
            self.tampered = True
        if not self.tampered:
            expected = self._ref[0] + (m - self._ref[1])
            if t < self.hwm - self.tolerance:
                tamper = f"clock rolled back {int(self.hwm - t)} s behind the high-water mark"
            elif abs(t - expected) > self.tolerance:
                tamper = f"clock jumped {int(t - expected):+d} s against the monotonic clock"
            if tamper:
                self.tampered = True
        now = int(t)
        persist = False
        if not self.tampered and now >= self.hwm + HWM_STEP:
            self.hwm = now
            persist = True
        return Reading(now, tamper, persist)

    def set(self, offset: int, hwm: int) -> None:
        """A quorum's ``settime``: adopt the new offset and trust the clock again."""
        self.offset = offset
        self.hwm = hwm
        self.tampered = False
        self._ref = None
