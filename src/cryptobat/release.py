"""What code this is: the version and the hash of the running package (the "firmware" id).

The console's ``version`` shows it, and a daemon restarting in place checks the new code
by it before handing its sockets over.
"""
from __future__ import annotations

import hashlib
from pathlib import Path


def code_hash() -> str:
    """Eight hex digits of SHA-256 over the running package's source."""
    h = hashlib.sha256()
    pkg = Path(__file__).parent
    for p in sorted(pkg.rglob("*.py")):
        h.update(p.relative_to(pkg).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:8].upper()
