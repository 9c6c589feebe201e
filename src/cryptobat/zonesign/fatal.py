"""How ``cryptobat signzone`` names itself in its messages, and the one error that ends a run."""
from __future__ import annotations

from ..errors import CryptobatError

PROG = "cryptobat signzone"  # the prefix of every message line


class Fatal(CryptobatError):
    """Ends the run with one ``fatal:`` line."""
