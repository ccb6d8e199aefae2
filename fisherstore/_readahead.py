"""The read-ahead pipeline: a helper thread reads and sums a tensor's bytes one piece ahead of the writer.

A source hands out a tensor's bytes as :data:`~fisherstore.formats.base.Piece` s
of any size (buffers, or :class:`~fisherstore._io.FileSpan` s: raw bytes still
in a file).  :meth:`ReadAhead.feed` re-cuts them into pieces of the size the
consumer asked for, read or copied into a small ring of buffers on a helper
thread and added to a :class:`~fisherstore._tally.Tally`'s sum there; the
consumer's thread hashes each piece as it takes it.

The handshake with a consumer (the writer and the sinks it feeds) is public
and fixed at :meth:`ReadAhead.feed`: :attr:`Feed.cut` bytes per piece and
:attr:`Feed.held` pieces that stay valid after the current one, counting the
next feeds' pieces too.  That is what lets compressed zarr sinks compress
whole chunks where they lie, without copies.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from ._io import FileSpan
from ._tally import Tally
from .formats.base import Piece

__all__ = ["PIECE_BYTES", "RING", "Feed", "ReadAhead"]

#: Bytes per piece handed from the read-ahead thread to the writer.  Small enough that the tally and the
#: write find the piece in the CPU's caches, and deliberately not a multiple of the page size: on the
#: 2-core benchmark VM, copies whose boundaries all fall on page edges ran 2-4x slower than copies whose
#: boundaries drift (pread / pwrite loops over a 2.2 GB file in 1 MiB against 1 MiB - 64 pieces: reads
#: 1.0-1.5 s against 0.33-0.39 s, writes 1.6-2.3 s against 0.65-0.8 s).  Smaller pieces (256 KiB, 512 KiB)
#: and bigger ones (2 MiB, 4 MiB) both measured slower inside a conversion.
PIECE_BYTES = (1 << 20) - 64
#: Pieces in flight between the read-ahead thread and the writer.
RING = 4


class _Ring:
    """The ring buffers of one :class:`ReadAhead`, lent to one feed at a time, and the pieces still held.

    A buffer is known by its identity (``id`` of the array under a piece's
    view): a buffer under a piece the consumer may still hold is not lent to
    the next feed; it is returned to whichever feed filled it, or kept here
    for later feeds once that feed has ended.
    """

    def __init__(self) -> None:
        self.buffers: list[np.ndarray] = []
        #: Ring buffers of pieces the consumer may still hold, oldest first (shared by successive feeds).
        self.kept: deque[memoryview] = deque()
        #: The feed being iterated, if any.
        self.active: Feed | None = None

    def lend(self, feed: Feed) -> list[memoryview]:
        """Buffers for ``feed``: ``feed.held`` kept by the consumer, plus enough to read ~:data:`RING` pieces ahead.

        Raises ``RuntimeError`` while another feed is active.  Buffers of earlier
        feeds' pieces that the consumer may still hold are left out.
        """
        if self.active is not None:
            raise RuntimeError("a ReadAhead runs one feed at a time; close the previous feed first")
        # Each piece takes a whole buffer of at least PIECE_BYTES, so a tiny cut (a 0-d tensor, a 4 KiB zarr
        # chunk) gets RING buffers ahead, not RING MiB of tiny pieces.
        width = max(feed.cut, PIECE_BYTES)
        size = -(-width // (1 << 20)) << 20  # whole MiB, so that similar cuts reuse buffers
        count = feed.held + max(2, RING * PIECE_BYTES // width)
        busy = {id(view.obj) for view in self.kept}
        held_back = [b for b in self.buffers if id(b) in busy]
        ring = [b for b in self.buffers if len(b) >= size and id(b) not in busy][:count]
        ring += [np.empty(size, dtype=np.uint8) for _ in range(count - len(ring))]
        self.buffers = ring + held_back
        self.active = feed
        return [b.data[:width] for b in ring]

    def release(self, feed: Feed) -> None:
        """``feed`` has ended: the next feed may start."""
        if self.active is feed:
            self.active = None


class ReadAhead:
    """A helper thread that reads and tallies a tensor's bytes one piece ahead of whoever writes them.

    :meth:`feed` turns a tensor's pieces into a stream of pieces of a fixed
    size: the helper thread reads file spans (and copies transient buffers)
    into a small ring of buffers and adds every :data:`PIECE_BYTES` of them to
    the :class:`~fisherstore._tally.Tally`'s sum while they are still in the
    CPU cache; the consumer's thread hashes each piece into the checksum as it
    takes it, then writes it.  Read + sum on one core thus overlap checksum +
    write on the other (hashing on the reading side too left the writer idle:
    2.2 GB took ~1.06 s against ~0.92 s this way), and every byte is read
    once.  The ring is reused from feed to feed (grown when a feed asks for
    bigger or more pieces), so memory stays a few pieces whatever the tensor
    size.  One feed runs at a time; the pieces a consumer may still hold stay
    valid across feeds, so it can finish one tensor's work while the next
    tensor is read (compression keeps its pipeline full from tensor to tensor).
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fisherstore-read-ahead")
        self._ring = _Ring()

    def feed(
        self,
        pieces: Iterable[Piece],
        tally: Tally | None,
        *,
        stable: bool = False,
        cut: int = PIECE_BYTES,
        held: int = 0,
    ) -> Feed:
        """The bytes of ``pieces`` re-cut into pieces of ``cut`` bytes, tallied into ``tally`` (if given) first.

        Args:
            pieces: the tensor's bytes in order: buffers, or file spans read by the helper thread.
            tally: summed on the helper thread and hashed on the consumer's; ``None`` for neither.
            stable: the buffers in ``pieces`` stay valid after the next one is asked for (whole
                tensors): they are then sliced, not copied, each cut from its own start.
            cut: bytes per piece handed out, counted from the start of the stream (the last may be shorter).
            held: each piece stays valid until ``held + 1`` further pieces have been asked for, from
                this feed or the next ones, so a consumer that keeps a few pieces in flight
                (compression) needs no copies of its own, even across tensors.

        Returns:
            A :class:`Feed`; use it as a context manager, so that a consumer that stops early also
            stops the helper thread.
        """
        if cut < 1 or held < 0:
            raise ValueError(f"cut must be >= 1 and held >= 0, got cut={cut}, held={held}")
        return Feed(self._pool, self._ring, pieces, tally, stable=stable, cut=cut, held=held)

    def close(self) -> None:
        """Stop a feed left unfinished (its consumer failed) and the thread."""
        if self._ring.active is not None:
            self._ring.active.close()
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
        self,
        pool: ThreadPoolExecutor,
        ring: _Ring,
        pieces: Iterable[Piece],
        tally: Tally | None,
        *,
        stable: bool,
        cut: int,
        held: int,
    ) -> None:
        #: Bytes per piece handed out (the last may be shorter).
        self.cut = cut
        #: Pieces that stay valid after the current one (counting the next feeds' pieces).
        self.held = held
        self._pool = pool
        self._ring = ring
        self._source = pieces
        self._tally = tally
        self._stable = stable
        self._full: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._free: queue.SimpleQueue[memoryview | None] = queue.SimpleQueue()
        self._cancel = threading.Event()
        self._future: Future[None] | None = None
        self._closed = False

    def __iter__(self) -> Iterator[memoryview]:
        if self._future is not None:
            raise RuntimeError("a Feed is iterated once")
        ring = self._ring.lend(self)
        for buf in ring:
            self._free.put(buf)
        mine = {id(buf) for buf in ring}
        self._future = self._pool.submit(self._produce)
        kept, held = self._ring.kept, self.held
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
                while len(kept) > held:
                    done = kept.popleft()
                    if id(done) in mine:  # else an earlier feed's buffer: back to the ring for later feeds
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
        cut = self.cut
        buf: memoryview | None = None
        fill = 0
        for item in self._source:
            if self._stable and buf is None and not isinstance(item, FileSpan):
                view = memoryview(item).cast("B")  # no copy: the caller's buffer outlives the pieces
                for pos in range(0, len(view), cut):
                    piece = view[pos : pos + cut]
                    for at in range(0, len(piece), PIECE_BYTES):
                        self._count(piece[at : at + PIECE_BYTES])
                    yield piece, None
                continue
            with _filler(item) as (size, fill_from):
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
            self._ring.release(self)

    def __enter__(self) -> Feed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_END = object()


@contextlib.contextmanager
def _filler(item: Piece) -> Iterator[tuple[int, Callable[[memoryview, int], None]]]:
    """``(size, fill)`` of a source piece, ``fill(part, pos)`` copying its bytes from ``pos`` into ``part``."""
    if isinstance(item, FileSpan):
        with open(item.path, "rb") as src:
            yield item.nbytes, lambda part, pos: item.read_into(src.fileno(), part, pos)
        return
    view = memoryview(item).cast("B")

    def copy(part: memoryview, pos: int) -> None:
        part[:] = view[pos : pos + len(part)]

    yield len(view), copy


class _Cancelled(Exception):
    """The consumer closed the feed: the helper thread stops quietly."""
