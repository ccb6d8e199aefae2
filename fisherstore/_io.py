"""Small I/O primitives: atomic files and checksums.

Atomicity rule used everywhere: write to a temporary name in the same
directory, flush and ``fsync``, ``rename`` over the final name, then ``fsync``
the directory.  A reader therefore sees either the old file or the new one,
never a torn one.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    import torch

import google_crc32c
import numpy as np

__all__ = ["Checksum", "mapped_chunks", "atomic_file", "write_json_atomic", "fsync", "fsync_dir", "set_durable", "pread_tensor", "write_all", "TMP_PREFIX"]

#: Prefix of every temporary file or directory fisherstore creates inside a store.
TMP_PREFIX = ".fstmp-"

# Durability: on by default.  ``--no-fsync`` (or FISHERSTORE_NO_FSYNC=1) keeps the
# temp-file + rename atomicity, which protects against a crashed *process*, but
# skips the flush to disk, which protects against a crashed *machine*: for
# scratch outputs where page-cache speed matters more than power-loss safety.
_durable = os.environ.get("FISHERSTORE_NO_FSYNC", "") in ("", "0")


def set_durable(durable: bool) -> None:
    """Turn fsync on (default) or off for every write of this process."""
    global _durable
    _durable = durable


def fsync(fd: int) -> None:
    """``os.fsync`` unless durability was turned off (see :func:`set_durable`)."""
    if _durable:
        os.fsync(fd)


class Checksum:
    """Incremental CRC-32C (hardware accelerated, ~9 GB/s) of a byte stream.

    CRC-32C detects torn or bit-flipped data, which is what a manifest
    checksum is for; it is not a cryptographic digest.
    """

    __slots__ = ("_crc",)

    def __init__(self) -> None:
        self._crc = google_crc32c.Checksum()

    def update(self, data: bytes | bytearray | memoryview) -> None:
        # The C extension takes only read-only buffers: a read-only numpy view avoids a copy.
        view = np.frombuffer(data, dtype=np.uint8)
        view.flags.writeable = False
        self._crc.update(view)

    def hexdigest(self) -> str:
        return "crc32c:" + self._crc.digest().hex()


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (after a rename) to disk."""
    if not _durable:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "wb") -> Iterator[BinaryIO]:
    """Open a temporary file beside ``path``; on clean exit fsync and rename it onto ``path``.

    On an exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
    os.fchmod(fd, 0o644)  # mkstemp creates 0600; published files are as readable as any other output
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    data = (json.dumps(obj, indent=1, sort_keys=False, allow_nan=False) + "\n").encode()
    with atomic_file(path) as fh:
        fh.write(data)


def pread_tensor(fd: int, nbytes: int, offset: int, where: str) -> torch.Tensor:
    """Read exactly ``nbytes`` at ``offset`` into a fresh uint8 tensor (one copy, no mmap).

    A short read means the file is shorter than its metadata claims, which is
    reported as :class:`~fisherstore.errors.CorruptDataError` naming ``where``.
    """
    import torch

    from .errors import CorruptDataError

    out = torch.empty(nbytes, dtype=torch.uint8)
    view = memoryview(out.numpy())
    done = 0
    while done < nbytes:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise CorruptDataError(f"{where}: file ends {nbytes - done} bytes early (truncated?)")
        done += n
    return out


def write_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
    """``pwrite`` all of ``data`` at ``offset``; return the offset after it."""
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n
    return offset


def mapped_chunks(path: Path, offset: int, nbytes: int, chunk_bytes: int) -> Iterator[memoryview]:
    """Yield ``nbytes`` of ``path`` from ``offset`` as read-only views of successive mmap windows.

    Each window of about ``chunk_bytes`` is mapped (prefaulted), handed out and
    unmapped before the next one, so a whole file is never resident at once
    (peak RSS counts mapped pages) while the bytes reach the consumer without
    the copy a ``read`` into a buffer costs.  Consumers must not keep a view
    past the next iteration.
    """
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    step = max(mmap.ALLOCATIONGRANULARITY, chunk_bytes - chunk_bytes % mmap.ALLOCATIONGRANULARITY)
    with open(path, "rb") as fh:
        pos, end = offset, offset + nbytes
        while pos < end:
            base = pos - pos % mmap.ALLOCATIONGRANULARITY
            stop = min(end, base + step)
            window = mmap.mmap(fh.fileno(), stop - base, flags=flags, prot=mmap.PROT_READ, offset=base)
            view = memoryview(window)[pos - base : stop - base]
            try:
                yield view
            finally:
                view.release()
                with contextlib.suppress(BufferError):  # a consumer kept a view: the GC unmaps it later
                    window.close()
            pos = stop
