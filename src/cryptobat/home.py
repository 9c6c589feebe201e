"""Where a token lives: ``--home``, else ``$CRYPTOBAT_HOME``, else a per-user default."""
from __future__ import annotations

import os
from pathlib import Path


def resolve_home(home: str | Path | None = None) -> Path:
    if home:
        return Path(home).expanduser()
    env = os.environ.get("CRYPTOBAT_HOME")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "cryptobat"
