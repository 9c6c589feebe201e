"""Batches at the token, in order: at most MAX_INFLIGHT at once, each handed on as it comes back.

One worker thread makes the ``timed_sign`` calls, so the walk builds the next batch
while the token signs; a batch's signatures go to ``deliver`` in submission order and
the batch is dropped, so memory stays bounded by the batches in flight. A zone of a batch
or two gains nothing from that overlap: without ``threaded`` each batch is signed and
delivered as it is submitted, and no thread (nor ``concurrent.futures``) is started.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable

from .batch import Batch
from .fatal import Fatal
from .keys import SignKey

MAX_INFLIGHT = 1  # batches at the token once the next is submitted: one signing, the next queued behind it
# while this thread builds the one after (building a batch takes a third of the time signing it does)

Deliver = Callable[[Batch, list[bytes]], None]


class Pipeline:
    def __init__(self, client, keys: list[SignKey], deliver: Deliver, threaded: bool = True) -> None:
        self._sign = client.timed_sign
        self._keys = keys  # by index, to name a key the token refused
        self._deliver = deliver
        self._pool = None
        if threaded:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(1, thread_name_prefix="signzone-sign")
        self._inflight: deque[Batch] = deque()

    def submit(self, batch: Batch) -> None:
        """Send ``batch``; deliver the finished ones, waiting while too many are in flight."""
        if self._pool is None:
            self._deliver(batch, self._checked(batch, self._sign(batch.items)))
            return
        batch.future = self._pool.submit(self._sign, batch.items)
        self._inflight.append(batch)
        inflight = self._inflight
        while len(inflight) > MAX_INFLIGHT or (inflight and inflight[0].future.done()):
            self._finish()

    def drain(self) -> None:
        """Wait for and deliver every batch in flight, then stop the worker thread."""
        while self._inflight:
            self._finish()
        if self._pool is not None:
            self._pool.shutdown()

    def abort(self) -> None:
        """Stop after the call under way; batches not yet sent are dropped."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _finish(self) -> None:
        batch = self._inflight.popleft()
        sigs = self._signatures(batch)
        self._deliver(batch, sigs)

    def _signatures(self, batch: Batch) -> list[bytes]:
        res = batch.future.result()
        batch.future = None
        return self._checked(batch, res)

    def _checked(self, batch: Batch, res: list) -> list[bytes]:
        """The token's signatures for ``batch``; a refusal ends the run with BIND's message."""
        n = len(batch.items)
        if len(res) != n:
            raise Fatal(f"the token returned {len(res)} results for {n} signing requests")
        sigs = [r.signature for r in res]
        for j, sg in enumerate(sigs):
            if sg is None:
                key = self._keys[batch.key_index[j]]
                raise Fatal(f"dnskey '{key.name}' failed to sign data: {res[j].reason or 'refused'}")
        return sigs
