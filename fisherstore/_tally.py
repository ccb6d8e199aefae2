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

import numpy as np
import torch

from ._io import Checksum
from .manifest import DTYPES

__all__ = ["Tally", "BLOCK"]

#: Elements per fp32 summing block (even, so bf16 pairs never straddle blocks).
BLOCK = 1 << 16
_SUPER = 64  # blocks processed per vectorised step, to keep temporaries in cache


def _bf16_block_sums(words: np.ndarray) -> float:
    """fp64 total of per-block fp32 sums of bf16 values given as uint16 (whole blocks or one tail).

    Two bf16 values share one uint32 word: its high half already is the fp32
    bit pattern of one value and its low half shifted up is the other's, which
    widens bf16 to fp32 exactly and ~3x faster than torch's bf16 sum.
    """
    total = 0.0
    if len(words) % 2:  # only in a final partial block
        total += float((words[-1:].astype(np.uint32) << np.uint32(16)).view(np.float32)[0])
        words = words[:-1]
    pairs = words.view(np.uint32)
    half = BLOCK // 2
    rows = max(1, len(pairs) // half) if len(pairs) % half == 0 else 1
    pairs = pairs.reshape(rows, -1)
    for i in range(0, rows, _SUPER):
        p = pairs[i : i + _SUPER]
        hi = (p & np.uint32(0xFFFF0000)).view(np.float32).sum(axis=1, dtype=np.float32)
        lo = (p << np.uint32(16)).view(np.float32).sum(axis=1, dtype=np.float32)
        total += float((hi + lo).sum(dtype=np.float64))
    return total


def _block_sums(raw: np.ndarray, dtype: str) -> float:
    if dtype == "bfloat16":
        return _bf16_block_sums(raw.view(np.uint16))
    if dtype == "float32":
        arr = raw.view(np.float32)
        rows = len(arr) // BLOCK if len(arr) % BLOCK == 0 and len(arr) else 1
        return float(arr.reshape(rows, -1).sum(axis=1, dtype=np.float32).sum(dtype=np.float64))
    t = torch.from_numpy(raw.copy()).view(DTYPES[dtype])
    return float(t.sum(dtype=torch.float64)) if t.numel() else 0.0


class Tally:
    """Running CRC-32C and chunking-independent sum of one tensor's bytes."""

    def __init__(self, dtype: str) -> None:
        self.dtype = dtype
        self.checksum = Checksum()
        self.nbytes = 0
        self._block_bytes = BLOCK * DTYPES[dtype].itemsize
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
