"""Times as operators type them (BIND's syntax), for ``signzone -s/-e`` and the console's ``settime``."""
from __future__ import annotations

import calendar
import time

import dns.exception
import dns.ttl

from .errors import CryptobatError


def parse_duration(s: str) -> int:
    """Seconds, or a TTL-style duration such as ``1w2d``."""
    if s.isdigit():
        return int(s)
    try:
        return dns.ttl.from_text(s)
    except dns.exception.DNSException:
        raise CryptobatError(f"invalid time offset {s!r}") from None


def parse_time(s: str, base: int, now: int) -> int:
    """YYYYMMDDHHMMSS (UTC), epoch seconds, +N (from ``base``), now, now+N."""
    s = s.strip()
    if s == "now":
        return now
    if s.startswith("now+"):
        return now + parse_duration(s[4:])
    if s.startswith("+"):
        return base + parse_duration(s[1:])
    if len(s) == 14 and s.isdigit():
        try:
            return calendar.timegm(time.strptime(s, "%Y%m%d%H%M%S"))
        except ValueError:
            raise CryptobatError(f"invalid time {s!r}") from None
    if s.isdigit():
        return int(s)
    raise CryptobatError(f"invalid time {s!r} (YYYYMMDDHHMMSS, epoch, +N, now or now+N)")
