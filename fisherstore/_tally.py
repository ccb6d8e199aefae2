"""Checksum and sum of a tensor's bytes as they stream past, in one pass.

The writer never re-reads what it wrote: every piece of a tensor's bytes
goes through a :class:`Tally` on its way to the backend (fed by
:mod:`fisherstore._readahead`), which yields the manifest's ``checksum`` and
``sum`` (and so layer importance) for free.

The sum is defined independently of how the bytes were cut, so the same
tensor gets the same recorded sum whichever path wrote it: values are summed
in fp32 within fixed blocks of :data:`BLOCK` elements counted from the start
of the tensor, and the block sums are added up in fp64 in fixed groups.
Partial blocks are carried across pieces.
"""

from __future__ import annotations

import threading

import ml_dtypes
import numpy as np

from ._io import Checksum
from .manifest import ITEMSIZES

__all__ = ["BLOCK", "Tally"]

#: Elements per fp32 summing block (even, so bf16 pairs never straddle blocks).
BLOCK = 1 << 16
#: Block sums are added up in fp64 in groups of this many blocks, counted from the start of the tensor.
_GROUP = 64
#: Values per fp32 run inside a whole block: runs are summed by ``np.einsum`` (SIMD lanes, ~2x numpy's
#: pairwise ``sum``), the run sums of a block pairwise; as accurate as a pairwise sum of the whole block.
_RUN = 1024
_SUB = 8  # bf16 blocks widened and summed per step (2 MiB of scratch): one einsum per ~1 MiB piece
#: dtypes summed blockwise; others are rare in Fisher stores and get torch's fp64 sum per update.
_BLOCKWISE = ("bfloat16", "float32")


_local = threading.local()


def _scratch() -> np.ndarray:
    """This thread's scratch for :func:`_bf16_block_sums`: :data:`_SUB` blocks widened to fp32."""
    buf = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = np.empty((_SUB, BLOCK), dtype=np.float32)
    return buf


def _run_sums(values: np.ndarray) -> np.ndarray:
    """fp32 sum of each row of ``values`` (the last axis, a multiple of :data:`_RUN`): runs by einsum, then pairwise."""
    runs = np.einsum("...j->...", values.reshape(*values.shape[:-1], -1, _RUN))
    return runs.sum(axis=-1, dtype=np.float32)


def _bf16_block_sums(parts: list[np.ndarray]) -> np.ndarray:
    """fp32 sum of each whole block of bf16 values, in order, given as byte arrays of whole blocks.

    ml_dtypes' cast widens bf16 to fp32 exactly in one pass (measured ~1.5x
    faster than masking and shifting the two halves of each 32-bit word)
    into one small scratch buffer per thread, reused from call to call, so
    no pass leaves the cache and nothing big is allocated (a fresh buffer
    per call cost a third of the time in page faults); blocks from several
    parts (a carried block and the blocks after it) share one einsum, which
    is most of the per-call cost.
    """
    scratch = _scratch()
    rows = [part.view(ml_dtypes.bfloat16).reshape(-1, BLOCK) for part in parts]
    out = np.empty(sum(len(r) for r in rows), dtype=np.float32)
    done = filled = 0

    def flush() -> None:  # sum the blocks widened into the scratch so far
        nonlocal done, filled
        out[done : done + filled] = _run_sums(scratch[:filled])
        done, filled = done + filled, 0

    for r in rows:
        j = 0
        while j < len(r):
            m = min(_SUB - filled, len(r) - j)
            np.copyto(scratch[filled : filled + m], r[j : j + m], casting="unsafe")  # bf16 -> fp32 is exact
            filled, j = filled + m, j + m
            if filled == _SUB:
                flush()
    if filled:
        flush()
    return out


def _block_sums(parts: list[np.ndarray], dtype: str) -> np.ndarray:
    """fp32 sum of each whole block of a blockwise dtype, in order, given as byte arrays of whole blocks."""
    if dtype == "bfloat16":
        return _bf16_block_sums(parts)
    return np.concatenate([_run_sums(part.view(np.float32).reshape(-1, BLOCK)) for part in parts])


def _torch_sum(raw: np.ndarray, dtype: str) -> float:
    import torch  # only for dtypes that are not summed blockwise

    t = torch.from_numpy(raw.copy()).view(getattr(torch, dtype))
    return float(t.sum(dtype=torch.float64)) if t.numel() else 0.0


class Tally:
    """Running CRC-32C and sum of one tensor's bytes, both independent of how the bytes were cut.

    The sum follows ``docs/FORMAT.md``: fp32 sums of blocks of :data:`BLOCK`
    elements, added up in fp64 :data:`_GROUP` blocks at a time, groups counted
    from the tensor's start, then the final partial block (a bf16 tensor's odd
    last element on its own, then the fp32 sum of the rest).  Grouping by the
    tensor, not by the calls, makes even the fp64 rounding the same whatever
    the pieces (~1 MiB for raw writes, whole zarr chunks when compressing).
    """

    def __init__(self, dtype: str) -> None:
        self.dtype = dtype
        self.checksum = Checksum()
        self.nbytes = 0
        self._block_bytes = BLOCK * ITEMSIZES[dtype]
        self._total = 0.0
        self._group = np.empty(_GROUP, dtype=np.float32)  # block sums of the group being filled
        self._grouped = 0
        self._carry: np.ndarray | None = None  # one block, allocated when an update ends inside a block
        self._carried = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        """Add the next bytes to both the checksum and the sum."""
        view = memoryview(data).cast("B")
        self.checksum.update(view)
        self.add(view)

    def add(self, data: bytes | bytearray | memoryview) -> None:
        """Add the next bytes to the sum only (whoever calls this hashes them into :attr:`checksum`, in order)."""
        view = memoryview(data).cast("B")
        self.nbytes += len(view)
        raw = np.frombuffer(view, dtype=np.uint8)
        blocks = []
        if self._carried:  # complete the block the previous update ended in
            assert self._carry is not None
            n = min(self._block_bytes - self._carried, len(raw))
            self._carry[self._carried : self._carried + n] = raw[:n]
            self._carried += n
            raw = raw[n:]
            if self._carried < self._block_bytes:
                return
            blocks.append(self._carry)
            self._carried = 0
        whole = len(raw) - len(raw) % self._block_bytes
        if whole:
            blocks.append(raw[:whole])
        if blocks:
            self._add_blocks(blocks)  # before the carry buffer takes this update's tail
        if whole < len(raw):
            if self._carry is None:
                self._carry = np.empty(self._block_bytes, dtype=np.uint8)
            self._carried = len(raw) - whole
            self._carry[: self._carried] = raw[whole:]

    def _add_blocks(self, blocks: list[np.ndarray]) -> None:
        if self.dtype not in _BLOCKWISE:
            for part in blocks:
                self._total += _torch_sum(part, self.dtype)
            return
        with np.errstate(over="ignore", invalid="ignore"):  # an overflowing sum is inf, which the writer reports
            sums = _block_sums(blocks, self.dtype)
        while len(sums):
            n = min(_GROUP - self._grouped, len(sums))
            self._group[self._grouped : self._grouped + n] = sums[:n]
            self._grouped += n
            sums = sums[n:]
            if self._grouped == _GROUP:
                self._total += float(self._group.sum(dtype=np.float64))
                self._grouped = 0

    @property
    def sum(self) -> float:
        """The sum of every element seen so far."""
        total = self._total
        if self._grouped:
            total += float(self._group[: self._grouped].sum(dtype=np.float64))
        if self._carried:
            assert self._carry is not None
            total += self._partial(self._carry[: self._carried])
        return total

    @np.errstate(over="ignore", invalid="ignore")
    def _partial(self, raw: np.ndarray) -> float:
        """The final partial block's sum."""
        if self.dtype not in _BLOCKWISE:
            return _torch_sum(raw, self.dtype)
        if self.dtype == "float32":
            return float(raw.view(np.float32).sum(dtype=np.float32))
        values = raw.view(ml_dtypes.bfloat16).astype(np.float32)
        odd = float(values[-1]) if len(values) % 2 else 0.0  # an odd number of bf16 values: the last one on its own
        return odd + float(values[: len(values) - len(values) % 2].sum(dtype=np.float32))
