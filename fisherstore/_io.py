"""Small I/O primitives: atomic files, checksums, and raw byte spans of files.

Atomicity rule used everywhere: write to a temporary name in the same
directory, flush and ``fsync``, ``rename`` over the final name, then ``fsync``
the directory.  A reader therefore sees either the old file or the new one,
never a torn one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    import torch

import google_crc32c
import numpy as np

__all__ = ["atomic_dir", "Checksum", "FileSpan", "atomic_file", "write_json_atomic", "fsync", "fsync_dir", "set_durable", "pread_into", "pread_tensor", "write_all", "TMP_PREFIX"]

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


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Build a directory in a temporary sibling; on clean exit it replaces ``path`` by a rename.

    Whatever was at ``path`` goes only once the new directory is complete.  On
    an exception the temporary directory is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=path.parent))
    os.chmod(tmp, 0o755)  # mkdtemp creates 0700; published directories are as readable as any other output
    try:
        yield tmp
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    data = (json.dumps(obj, indent=1, sort_keys=False, allow_nan=False) + "\n").encode()
    with atomic_file(path) as fh:
        fh.write(data)


def pread_into(fd: int, view: memoryview, offset: int, where: str, *, beyond: int = 0) -> None:
    """Fill ``view`` from ``fd`` at ``offset``.

    A short read means the file is shorter than its metadata claims:
    :class:`~fisherstore.errors.CorruptDataError` naming ``where`` and how many
    bytes are missing (``beyond``: more that were expected after ``view``).
    """
    from .errors import CorruptDataError

    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise CorruptDataError(f"{where}: file ends {len(view) - done + beyond} bytes early (truncated?)")
        done += n


def pread_tensor(fd: int, nbytes: int, offset: int, where: str) -> torch.Tensor:
    """Read exactly ``nbytes`` at ``offset`` into a fresh uint8 tensor (one copy, no mmap); see :func:`pread_into`."""
    import torch

    out = torch.empty(nbytes, dtype=torch.uint8)
    pread_into(fd, memoryview(out.numpy()), offset, where)
    return out


def write_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
    """``pwrite`` all of ``data`` at ``offset``; return the offset after it."""
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n
    return offset


#: Largest buffer a :class:`FileSpan` is read through: small enough to stay in the CPU cache between the
#: read and whatever consumes it (checksum, sum, compression); larger buffers measured slower, not faster.
VIEW_BYTES = 4 << 20


@dataclass(frozen=True)
class FileSpan:
    """``nbytes`` raw bytes of the file ``path`` from ``offset``: a chunk not read yet.

    Sources whose bytes lie raw and contiguous in a file hand these out instead
    of buffers, so that the consumer reads them straight into buffers of its
    own choosing (:meth:`read_into`, :meth:`views`) with no copy in between.
    """

    path: Path
    offset: int
    nbytes: int

    def __len__(self) -> int:
        return self.nbytes

    def views(self, chunk_bytes: int = VIEW_BYTES) -> Iterator[memoryview]:
        """The span's bytes, ``preadv`` into one reused buffer of ``chunk_bytes``; a view is valid until the next.

        One copy out of the page cache into a buffer small enough to stay in
        the CPU cache for whatever reads it next (checksum, sum, compression);
        measured as fast as mmap windows and without their page faults or RSS.
        """
        if not self.nbytes:
            return
        buf = memoryview(np.empty(min(self.nbytes, max(1, chunk_bytes)), dtype=np.uint8))  # not zero-filled
        with open(self.path, "rb") as src:
            for pos in range(0, self.nbytes, len(buf)):
                view = buf[: min(len(buf), self.nbytes - pos)]
                self.read_into(src.fileno(), view, pos)
                yield view

    def read_into(self, fd: int, view: memoryview, pos: int) -> None:
        """Fill ``view`` with the span's bytes from ``pos`` (relative to the span), read from ``fd`` (this file).

        A file shorter than the span is :class:`~fisherstore.errors.CorruptDataError`.
        """
        pread_into(fd, view, self.offset + pos, str(self.path), beyond=self.nbytes - pos - len(view))
