"""Checksum and sum of a tensor's bytes as they stream past, in one pass.

The writer never re-reads what it wrote: every chunk goes through a
:class:`Tally` on its way to the backend, which yields the manifest's
``checksum`` and ``sum`` (and so layer importance) for free.

The sum is defined independently of how the bytes were chunked, so the same
tensor gets the same recorded sum whichever path wrote it: values are summed
in fp32 within fixed blocks of :data:`BLOCK` elements counted from the start
of the tensor, and the block sums are accumulated in fp64.  Partial blocks
are carried across chunks.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from ._io import Checksum, FileSpan
from .formats.base import Chunk
from .manifest import ITEMSIZES

__all__ = ["Tally", "TallyFeed", "BLOCK"]

#: Elements per fp32 summing block (even, so bf16 pairs never straddle blocks).
BLOCK = 1 << 16
_SUPER = 64  # blocks whose fp32 sums are added up in fp64 at once (fixes the fp64 rounding: do not change)
_SUB = 4  # blocks widened and summed per step: 512 KiB of scratch, which stays in cache


def _bf16_block_sums(words: np.ndarray) -> float:
    """fp64 total of per-block fp32 sums of bf16 values given as uint16 (whole blocks or one tail).

    Two bf16 values share one uint32 word: its high half already is the fp32
    bit pattern of one value and its low half shifted up is the other's, which
    widens bf16 to fp32 exactly and ~3x faster than torch's bf16 sum.  The
    widened words go through one small reused scratch buffer, so no pass
    leaves the cache and nothing is allocated per step.
    """
    total = 0.0
    if len(words) % 2:  # only in a final partial block
        total += float((words[-1:].astype(np.uint32) << np.uint32(16)).view(np.float32)[0])
        words = words[:-1]
    pairs = words.view(np.uint32)
    half = BLOCK // 2
    rows = max(1, len(pairs) // half) if len(pairs) % half == 0 else 1
    pairs = pairs.reshape(rows, -1)
    scratch = np.empty((min(_SUB, rows), pairs.shape[1]), dtype=np.uint32)
    widened = scratch.view(np.float32)
    hi, lo = np.empty(_SUB, dtype=np.float32), np.empty(_SUB, dtype=np.float32)
    sums = np.empty(min(_SUPER, rows), dtype=np.float32)
    for i in range(0, rows, _SUPER):
        n = min(_SUPER, rows - i)
        for j in range(0, n, _SUB):
            m = min(_SUB, n - j)
            p = pairs[i + j : i + j + m]
            np.bitwise_and(p, 0xFFFF0000, out=scratch[:m])
            widened[:m].sum(axis=1, dtype=np.float32, out=hi[:m])
            np.left_shift(p, 16, out=scratch[:m])
            widened[:m].sum(axis=1, dtype=np.float32, out=lo[:m])
            np.add(hi[:m], lo[:m], out=sums[j : j + m])
        total += float(sums[:n].sum(dtype=np.float64))
    return total


def _block_sums(raw: np.ndarray, dtype: str) -> float:
    if dtype == "bfloat16":
        return _bf16_block_sums(raw.view(np.uint16))
    if dtype == "float32":
        arr = raw.view(np.float32)
        rows = len(arr) // BLOCK if len(arr) % BLOCK == 0 and len(arr) else 1
        return float(arr.reshape(rows, -1).sum(axis=1, dtype=np.float32).sum(dtype=np.float64))
    import torch  # other dtypes are rare in Fisher stores; torch's fp64 sum defines their value

    t = torch.from_numpy(raw.copy()).view(getattr(torch, dtype))
    return float(t.sum(dtype=torch.float64)) if t.numel() else 0.0


class Tally:
    """Running CRC-32C and chunking-independent sum of one tensor's bytes."""

    def __init__(self, dtype: str) -> None:
        self.dtype = dtype
        self.checksum = Checksum()
        self.nbytes = 0
        self._block_bytes = BLOCK * ITEMSIZES[dtype]
        self._total = 0.0
        self._carry = bytearray()

    def update(self, chunk: bytes | bytearray | memoryview) -> None:
        view = memoryview(chunk).cast("B")
        self.checksum.update(view)
        self.nbytes += len(view)
        if self._carry:
            need = self._block_bytes - len(self._carry)
            self._carry += view[:need]
            view = view[need:]
            if len(self._carry) < self._block_bytes:
                return
            self._total += _block_sums(np.frombuffer(self._carry, dtype=np.uint8), self.dtype)
            self._carry = bytearray()
        whole = len(view) - len(view) % self._block_bytes
        if whole:
            self._total += _block_sums(np.frombuffer(view[:whole], dtype=np.uint8), self.dtype)
        self._carry += view[whole:]

    @property
    def sum(self) -> float:
        """The sum of every element seen so far."""
        tail = _block_sums(np.frombuffer(self._carry, dtype=np.uint8), self.dtype) if self._carry else 0.0
        return self._total + tail


class TallyFeed:
    """A tensor's chunks on their way to a sink, tallied (checksum + sum) as they pass.

    With a ``pool`` (the consumer takes file spans) spans pass through unread
    and the pool's single thread reads each one for the tally while the
    consumer copies it in the kernel; the tally lags at most :attr:`LAG` spans behind.
    Without, spans become mapped buffers, tallied here.  Iterating to the end,
    or :meth:`finish`, waits for the tally to catch up.
    """

    LAG = 2

    def __init__(self, chunks: Iterable[Chunk], tally: Tally, pool: ThreadPoolExecutor | None) -> None:
        self._chunks = chunks
        self._tally = tally
        self._pool = pool
        self._pending: deque[Future[None]] = deque()

    def __iter__(self) -> Iterator[Chunk]:
        for chunk in self._chunks:
            if not isinstance(chunk, FileSpan):
                self.finish()  # keep the tally in stream order
                self._tally.update(chunk)
                yield chunk
            elif self._pool is not None:
                self._pending.append(self._pool.submit(_tally_span, self._tally, chunk))
                if len(self._pending) > self.LAG:
                    self._pending.popleft().result()
                yield chunk
            else:
                for view in chunk.views():
                    self._tally.update(view)
                    yield view
        self.finish()

    def finish(self) -> None:
        """Wait until every chunk handed out so far is tallied; re-raise a read error."""
        while self._pending:
            self._pending.popleft().result()


def _tally_span(tally: Tally, span: FileSpan) -> None:
    for view in span.views():
        tally.update(view)
