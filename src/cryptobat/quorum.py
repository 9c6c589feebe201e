"""Officer presence and the M-of-N quorum that every state change needs.

Presence is volatile, like the RAM of the original device: it lives in the
running token, is shared by every console attached to it (so officers can log
in from different places: remote M-of-N), expires after an idle timeout and is
cleared by ``coreset``.
"""
from __future__ import annotations

from .errors import ConfigurationDisabled

IDLE_TIMEOUT = 600


class Presence:
    def __init__(self, idle_timeout: int = IDLE_TIMEOUT) -> None:
        self.idle_timeout = idle_timeout
        self._seen: dict[str, int] = {}

    def arrive(self, name: str, now: int) -> None:
        self._seen[name] = now

    def leave(self, name: str) -> None:
        self._seen.pop(name, None)

    def reset(self) -> None:
        self._seen.clear()

    def present(self, now: int) -> set[str]:
        """Officers present at ``now``; idle ones are dropped."""
        for name, seen in list(self._seen.items()):
            if now - seen > self.idle_timeout or now < seen - 5:
                del self._seen[name]
        return set(self._seen)

    def require(self, m: int, now: int, enrolled: set[str]) -> set[str]:
        """Raise ConfigurationDisabled unless ``m`` enrolled officers are present; refresh them."""
        here = self.present(now) & enrolled
        if len(here) < m:
            raise ConfigurationDisabled()
        for name in here:
            self._seen[name] = now
        return here
