"""The one error ``cryptobat signzone`` ends a run with, shared by its steps."""
from __future__ import annotations

from ..errors import CryptobatError


class Fatal(CryptobatError):
    """Ends the run with one ``fatal:`` line."""
