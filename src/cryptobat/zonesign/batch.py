"""A batch of signing inputs and everything needed to turn its signatures into zone text."""
from __future__ import annotations

import base64
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from concurrent.futures import Future


class Sample:
    """An RRset kept for re-validation by dnspython from its presentation form.

    This and :class:`Batch` are plain classes: a dataclass costs about a millisecond to make
    at import, and a small zone's whole run is a few tens of them."""

    __slots__ = ("disp", "rtype", "ttl", "texts", "rrsig_parts", "rrsigs")

    def __init__(self, disp: str, rtype: int, ttl: int, texts: list[str]) -> None:
        self.disp = disp  # owner, as written
        self.rtype, self.ttl = rtype, ttl
        self.texts = texts  # RDATA texts
        self.rrsig_parts: list[tuple[int, str]] = []  # (item in batch, RRSIG text before the signature)
        self.rrsigs: list[str] = []  # RRSIG RDATA texts, once signed


class Batch:
    """Signing inputs sent to the token in one ``timed_sign`` call, with their names' zone text.

    ``text`` is the output for every name of the batch in order: a ``str`` is written as
    is, a pair (item index, RRSIG line before the signature) is completed with that
    item's signature in base64.
    """

    __slots__ = ("first", "items", "key_index", "text", "samples", "future")

    def __init__(self, first: int) -> None:
        self.first = first  # index of the batch's first signature in the run
        self.items: list[tuple[str, bytes]] = []  # (key label, RFC 4034 §3.1.8.1 signing data)
        self.key_index = bytearray()  # per item, its key's index in the run's key list
        self.text: list = []
        self.samples: list[Sample] = []
        self.future: Future | None = None  # the token's answer while in flight

    def __len__(self) -> int:
        return len(self.items)


def render(batch: Batch, sigs: list[bytes]) -> bytes:
    """The batch's zone text, RRSIGs completed with ``sigs`` (one per item)."""
    b64 = base64.b64encode
    text = "".join([x if type(x) is str else x[1] + b64(sigs[x[0]]).decode() + "\n" for x in batch.text])
    return text.encode("latin-1")


def complete_samples(batch: Batch, sigs: list[bytes]) -> None:
    """Give the batch's samples their RRSIG texts."""
    b64 = base64.b64encode
    for sm in batch.samples:
        sm.rrsigs = [p + b64(sigs[j]).decode() for j, p in sm.rrsig_parts]
        sm.rrsig_parts = []
