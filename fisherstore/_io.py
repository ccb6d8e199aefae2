"""Small I/O primitives: atomic files, checksums, and byte spans copied in the kernel.

Atomicity rule used everywhere: write to a temporary name in the same
directory, flush and ``fsync``, ``rename`` over the final name, then ``fsync``
the directory.  A reader therefore sees either the old file or the new one,
never a torn one.
"""

from __future__ import annotations

import contextlib
import errno
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

__all__ = ["atomic_dir", "Checksum", "FileSpan", "copy_span", "atomic_file", "write_json_atomic", "fsync", "fsync_dir", "set_durable", "pread_tensor", "write_all", "TMP_PREFIX"]

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


#: Largest buffer a :class:`FileSpan` is read through: small enough to stay in the CPU cache between the
#: read and whatever consumes it (checksum, sum, compression); larger buffers measured slower, not faster.
VIEW_BYTES = 4 << 20


@dataclass(frozen=True)
class FileSpan:
    """``nbytes`` raw bytes of the file ``path`` from ``offset``: a chunk that can be copied without reading it.

    Sources whose bytes lie raw and contiguous in a file hand these out instead
    of buffers; a sink that writes raw bytes copies them in the kernel
    (:func:`copy_span`), and whoever needs the bytes themselves (checksums,
    compression) reads them with :meth:`views`.
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
        from .errors import CorruptDataError

        if not self.nbytes:
            return
        buf = memoryview(np.empty(min(self.nbytes, max(1, chunk_bytes)), dtype=np.uint8))  # not zero-filled
        with open(self.path, "rb") as src:
            done = 0
            while done < self.nbytes:
                want = min(len(buf), self.nbytes - done)
                n = os.preadv(src.fileno(), [buf[:want]], self.offset + done)
                if n == 0:
                    raise CorruptDataError(f"{self.path}: file ends {self.nbytes - done} bytes early (truncated?)")
                done += n
                yield buf[:n]


# copy_file_range fails with these where the kernel or filesystem cannot copy between the two files.
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM, errno.EBADF}


def copy_span(span: FileSpan, fd: int, offset: int) -> int:
    """Write ``span``'s bytes to ``fd`` at ``offset`` (``copy_file_range``: no copy through user space).

    Falls back to mapped reads and ``pwrite`` where the kernel cannot copy.
    Returns the offset after the span.  A source shorter than the span is
    :class:`~fisherstore.errors.CorruptDataError`.
    """
    from .errors import CorruptDataError

    done = 0
    if hasattr(os, "copy_file_range"):
        with open(span.path, "rb") as src:
            while done < span.nbytes:
                try:
                    n = os.copy_file_range(src.fileno(), fd, span.nbytes - done, span.offset + done, offset + done)
                except OSError as exc:
                    if exc.errno not in _NO_KERNEL_COPY or done:
                        raise
                    break
                if n == 0:
                    raise CorruptDataError(f"{span.path}: file ends {span.nbytes - done} bytes early (truncated?)")
                done += n
    pos = offset + done
    for view in FileSpan(span.path, span.offset + done, span.nbytes - done).views():
        pos = write_all(fd, view, pos)
    return pos

