"""What a run reports: the progress line on a terminal and ``-t`` statistics as dnssec-signzone prints them."""
from __future__ import annotations

import sys
import time

from .fatal import PROG


class Progress:
    """``done/total signatures`` on stderr, at most five times a second; silent unless enabled."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled, self.last = total, enabled, 0.0

    def update(self, done: int, final: bool = False) -> None:
        if not self.enabled:
            return
        t = time.monotonic()
        if final or t - self.last > 0.2:
            self.last = t
            sys.stderr.write(f"\r{PROG}: {done}/{self.total} signatures ({100 * done // max(self.total, 1)}%)")
            if final:
                sys.stderr.write("\n")
            sys.stderr.flush()


class Stats:
    """One zone's run in figures (a plain class: a dataclass costs about a millisecond at import)."""

    __slots__ = ("t0", "t_prep", "t_signed", "t_end", "nrrsets", "nchain", "nsec3", "nsigs", "verified", "dropped")

    def __init__(self, t0: float) -> None:
        self.t0 = t0  # monotonic times: start, zone prepared, last signature back, end
        self.t_prep = self.t_signed = self.t_end = 0.0
        self.nrrsets = self.nchain = self.nsigs = self.verified = 0
        self.nsec3 = False
        self.dropped = 0  # RRSIG and chain records read from the zone and discarded


def print_stats(s: Stats) -> None:
    sign_t = max(s.t_signed - s.t_prep, 1e-9)
    print(f"RRsets signed:                    {s.nrrsets:10d}")
    print(f"{'NSEC3' if s.nsec3 else 'NSEC'} records:{'':{21 if s.nsec3 else 22}}{s.nchain:10d}")
    print(f"Signatures generated:             {s.nsigs:10d}")
    print(f"Signatures retained:              {0:10d}")
    print(f"Signatures dropped:               {s.dropped:10d}")
    print(f"Signatures successfully verified: {s.verified:10d}")
    print(f"Signatures unsuccessfully verified: {0:8d}")
    print(f"Signing time in seconds:          {sign_t:10.3f}")
    print(f"Signatures per second:            {s.nsigs / sign_t:10.3f}")
    print(f"Runtime in seconds:               {s.t_end - s.t0:10.3f}")
