"""Checksum and sum of a tensor's bytes as they stream past, in one pass.

The writer never re-reads what it wrote: every chunk goes through a
:class:`Tally` on its way to the backend, which yields the manifest's
``checksum`` and ``sum`` (and so layer importance) for free.

The sum is defined independently of how the bytes were chunked, so the same
tensor gets the same recorded sum whichever path wrote it: values are summed
in fp32 within fixed blocks of :data:`BLOCK` elements counted from the start
of the tensor, and the block sums are added up in fp64 in fixed groups.
Partial blocks are carried across chunks.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import ml_dtypes
import numpy as np

from ._io import Checksum, FileSpan
from .formats.base import Chunk
from .manifest import ITEMSIZES

__all__ = ["BLOCK", "PIECE_BYTES", "Feed", "ReadAhead", "Tally"]

#: Bytes per piece handed from the read-ahead thread to the writer.  Small enough that the tally and the
#: write find the piece in the CPU's caches, and deliberately not a multiple of the page size: on the
#: 2-core benchmark VM, copies whose boundaries all fall on page edges ran 2-4x slower than copies whose
#: boundaries drift (pread / pwrite loops over a 2.2 GB file in 1 MiB against 1 MiB - 64 pieces: reads
#: 1.0-1.5 s against 0.33-0.39 s, writes 1.6-2.3 s against 0.65-0.8 s).  Smaller pieces (256 KiB, 512 KiB)
#: and bigger ones (2 MiB, 4 MiB) both measured slower inside a conversion.
PIECE_BYTES = (1 << 20) - 64
#: Pieces in flight between the read-ahead thread and the writer.
RING = 4

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
    """Running CRC-32C and sum of one tensor's bytes, both independent of how the bytes were chunked.

    The sum follows ``docs/FORMAT.md``: fp32 sums of blocks of :data:`BLOCK`
    elements, added up in fp64 :data:`_GROUP` blocks at a time, groups counted
    from the tensor's start, then the final partial block (a bf16 tensor's odd
    last element on its own, then the fp32 sum of the rest).  Grouping by the
    tensor, not by the calls, makes even the fp64 rounding the same whatever
    the pieces (1 MiB for raw writes, whole chunks when compressing).
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

    def update(self, chunk: bytes | bytearray | memoryview) -> None:
        """Add the next bytes to both the checksum and the sum."""
        view = memoryview(chunk).cast("B")
        self.checksum.update(view)
        self.add(view)

    def add(self, chunk: bytes | bytearray | memoryview) -> None:
        """Add the next bytes to the sum only (whoever calls this hashes them into :attr:`checksum`, in order)."""
        view = memoryview(chunk).cast("B")
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


class ReadAhead:
    """A helper thread that reads and tallies a tensor's bytes one piece ahead of whoever writes them.

    :meth:`feed` turns a tensor's chunks into a stream of byte pieces: the
    helper thread reads file spans (and copies transient buffers) into a
    small ring of buffers and adds every :data:`PIECE_BYTES` of them to the
    :class:`Tally`'s sum while they are still in the CPU cache; the
    consumer's thread hashes each piece into the checksum as it takes it,
    then writes it.  Read + sum on one core thus overlap checksum + write on
    the other (hashing on the reading side too left the writer idle: 2.2 GB
    took ~1.06 s against ~0.92 s this way), and every byte is read once.
    The ring is reused from feed to feed (grown when a feed asks for bigger
    or more pieces), so memory stays a few pieces whatever the tensor size.
    One feed runs at a time; the pieces a consumer may still hold stay valid
    across feeds, so it can finish one tensor's work while the next tensor is
    read (compression keeps its pipeline full from tensor to tensor).
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fisherstore-read-ahead")
        self._buffers: list[np.ndarray] = []
        self._kept: deque[memoryview] = deque()  # ring buffers of pieces the consumer may still hold, oldest first
        self._active: Feed | None = None

    def feed(
        self,
        chunks: Iterable[Chunk],
        tally: Tally | None,
        *,
        stable: bool = False,
        cut: int = PIECE_BYTES,
        held: int = 0,
    ) -> Feed:
        """The pieces of ``chunks``, tallied into ``tally`` (if given) before they are handed out.

        Pieces are ``cut`` bytes, counted from the start of the stream (the
        last may be shorter), and each stays valid until ``held + 1`` further
        pieces have been asked for, from this feed or the next ones: a
        consumer that keeps a few pieces in flight (compression) needs no
        copies of its own, even across tensors.  ``stable`` says
        buffers stay valid after the next chunk is asked for (whole tensors):
        they are then sliced, not copied, each cut from its own start.  Use the
        feed as a context manager, so that a consumer that stops early also
        stops the helper thread.
        """
        if cut < 1 or held < 0:
            raise ValueError(f"cut must be >= 1 and held >= 0, got cut={cut}, held={held}")
        return Feed(self, chunks, tally, stable, cut, held)

    def _ring(self, cut: int, held: int) -> list[memoryview]:
        """Buffers for one feed: ``held`` kept by the consumer, plus enough to read ~RING pieces' worth ahead.

        Buffers of earlier feeds' pieces that the consumer may still hold are
        left out; they are kept for later feeds.
        """
        size = -(-max(cut, PIECE_BYTES) // (1 << 20)) << 20  # whole MiB, so that similar cuts reuse buffers
        count = held + max(2, RING * PIECE_BYTES // max(cut, PIECE_BYTES))  # each piece takes a whole buffer
        busy = {id(view.obj) for view in self._kept}
        held_back = [b for b in self._buffers if id(b) in busy]
        ring = [b for b in self._buffers if len(b) >= size and id(b) not in busy][:count]
        ring += [np.empty(size, dtype=np.uint8) for _ in range(count - len(ring))]
        self._buffers = ring + held_back
        return [memoryview(b)[: max(cut, PIECE_BYTES)] for b in ring]

    def close(self) -> None:
        """Stop a feed left unfinished (its consumer failed) and the thread."""
        if self._active is not None:
            self._active.close()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Feed:
    """One tensor's pieces from a :class:`ReadAhead`; iterate once, then :meth:`close` (or use ``with``).

    An error of the reading thread (a truncated source, say) is raised here,
    in the consumer.
    """

    def __init__(
        self, ahead: ReadAhead, chunks: Iterable[Chunk], tally: Tally | None, stable: bool, cut: int, held: int
    ) -> None:
        self._ahead = ahead
        self._chunks = chunks
        self._tally = tally
        self._stable = stable
        self._cut = cut
        self._held = held
        self._full: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._free: queue.SimpleQueue[memoryview | None] = queue.SimpleQueue()
        self._cancel = threading.Event()
        self._future: Future[None] | None = None
        self._closed = False

    def __iter__(self) -> Iterator[memoryview]:
        if self._future is not None:
            raise RuntimeError("a Feed is iterated once")
        if self._ahead._active is not None:
            raise RuntimeError("a ReadAhead runs one feed at a time; close the previous feed first")
        self._ahead._active = self
        ring = self._ahead._ring(self._cut, self._held)
        for buf in ring:
            self._free.put(buf)
        mine = {id(buf) for buf in ring}
        self._future = self._ahead._pool.submit(self._produce)
        kept = self._ahead._kept
        try:
            while True:
                item = self._full.get()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                piece, base = item
                if self._tally is not None:  # hashed here, so that the two threads share the work
                    self._tally.checksum.update(piece)
                yield piece
                if base is not None:
                    kept.append(base)
                while len(kept) > self._held:
                    done = kept.popleft()
                    if id(done) in mine:  # else an earlier feed's buffer: back to the ReadAhead for later feeds
                        self._free.put(done)
        finally:
            self.close()

    def _produce(self) -> None:
        """The helper thread: cut, read or copy, tally, hand over; stop when cancelled."""
        try:
            for piece, base in self._pieces():
                if self._cancel.is_set():
                    return
                self._full.put((piece, base))
            self._full.put(_END)
        except _Cancelled:
            pass
        except BaseException as exc:  # handed to the consumer, which raises it
            self._full.put(exc)

    def _take(self) -> memoryview:
        """A free ring buffer, waiting for the consumer to return one; :class:`_Cancelled` once closed."""
        buf = self._free.get()
        if buf is None:
            self._free.put(None)
            raise _Cancelled
        return buf

    def _count(self, part: memoryview) -> None:
        if self._tally is not None:
            self._tally.add(part)

    def _pieces(self) -> Iterator[tuple[memoryview, memoryview | None]]:
        """``(piece, its ring buffer or None)`` of ``cut`` bytes each; every byte is tallied right after it is read."""
        cut = self._cut
        buf: memoryview | None = None
        fill = 0
        for chunk in self._chunks:
            if self._stable and buf is None and not isinstance(chunk, FileSpan):
                view = memoryview(chunk).cast("B")  # no copy: the caller's buffer outlives the pieces
                for pos in range(0, len(view), cut):
                    piece = view[pos : pos + cut]
                    for at in range(0, len(piece), PIECE_BYTES):
                        self._count(piece[at : at + PIECE_BYTES])
                    yield piece, None
                continue
            with _filler(chunk) as (size, fill_from):
                pos = 0
                while pos < size:
                    if buf is None:
                        buf, fill = self._take(), 0
                    part = buf[fill : fill + min(PIECE_BYTES, cut - fill, size - pos)]
                    fill_from(part, pos)
                    self._count(part)
                    fill, pos = fill + len(part), pos + len(part)
                    if fill == cut:
                        yield buf[:fill], buf
                        buf = None
        if buf is not None:
            yield buf[:fill], buf

    def close(self) -> None:
        """Stop the helper thread (if the consumer stopped early) and wait for it."""
        if self._future is None or self._closed:
            return
        self._closed = True
        self._cancel.set()
        self._free.put(None)  # wakes a helper waiting for a buffer
        try:
            self._future.result()
        finally:
            self._ahead._active = None

    def __enter__(self) -> Feed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_END = object()


@contextlib.contextmanager
def _filler(chunk: Chunk) -> Iterator[tuple[int, Callable[[memoryview, int], None]]]:
    """``(size, fill)`` of a chunk, ``fill(part, pos)`` copying its bytes from ``pos`` into ``part``."""
    if isinstance(chunk, FileSpan):
        with open(chunk.path, "rb") as src:
            yield chunk.nbytes, lambda part, pos: chunk.read_into(src.fileno(), part, pos)
        return
    view = memoryview(chunk).cast("B")

    def copy(part: memoryview, pos: int) -> None:
        part[:] = view[pos : pos + len(part)]

    yield len(view), copy


class _Cancelled(Exception):
    """The consumer closed the feed: the helper thread stops quietly."""
