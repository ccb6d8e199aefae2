"""Small I/O primitives: atomic files, checksums, and raw byte spans of files.

Atomicity rule used everywhere: write to a temporary name in the same
directory, flush and ``fsync``, ``rename`` over the final name, then ``fsync``
the directory.  A reader therefore sees either the old file or the new one,
never a torn one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import itertools
import json
import os
import re
import shutil
import signal
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

if TYPE_CHECKING:
    import torch

import google_crc32c
import numpy as np

__all__ = [
    "TMP_PREFIX",
    "Checksum",
    "FileSpan",
    "Owner",
    "atomic_dir",
    "atomic_file",
    "c_function",
    "fsync",
    "fsync_dir",
    "parse_tmp_name",
    "pread_bytes",
    "pread_into",
    "pread_tensor",
    "preallocate",
    "set_durable",
    "start_token",
    "this_owner",
    "tmp_name",
    "write_all",
    "write_json_atomic",
]

#: Prefix of every temporary file or directory fisherstore creates inside a store or beside a destination.
TMP_PREFIX = ".fstmp-"

# -- who wrote a temporary name ------------------------------------------------------------------
# A temporary name made by :func:`tmp_name` says which process made it:
# ``.fstmp-<pid>-<token>@<host>~<label>`` (see docs/FORMAT.md).  The token is the boot id's first 8 hex
# digits and the process's start time in clock ticks (Linux ``/proc``), so that a pid reused after the
# writer died, or after a reboot, is not mistaken for it; elsewhere it is ``0`` (only the pid is checked).
# ``_guard`` uses the owner to remove the debris of dead writers and to leave a live one's alone.
_TMP_NAME = re.compile(r"\.fstmp-(?P<pid>[0-9]+)-(?P<token>[0-9a-f]+)@(?P<host>[A-Za-z0-9.-]+)~(?P<label>.*)", re.S)
_LABEL_CHARS = 96


@dataclass(frozen=True)
class Owner:
    """The process that made a temporary name or holds a lock: pid, start token and (sanitised) host name."""

    pid: int
    token: str
    host: str

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host}"


def _host() -> str:
    """This machine's name in the characters a temporary name allows (others become ``-``)."""
    return re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:64] or "localhost"


def start_token(pid: int) -> str:
    """``pid``'s start token (boot id prefix + start time in ticks, hex); ``""`` where unreadable or exited."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:8]
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()  # after the parenthesised name: field 3 (state) onwards
        state, ticks = fields[0], int(fields[19])  # field 22: starttime
    except (OSError, ValueError, IndexError):
        return ""
    return "" if state in ("Z", "X") else f"{boot}{ticks:x}"  # a zombie has exited (its files are closed)


_owner: tuple[int, Owner] | None = None


def this_owner() -> Owner:
    """The :class:`Owner` of this process (recomputed in a forked child)."""
    global _owner
    pid = os.getpid()
    if _owner is None or _owner[0] != pid:
        _owner = (pid, Owner(pid, start_token(pid) or "0", _host()))
    return _owner[1]


def tmp_name(label: str) -> str:
    """A temporary name for ``label`` (a final file or directory name) that records this process as its owner."""
    me = this_owner()
    return f"{TMP_PREFIX}{me.pid}-{me.token}@{me.host}~{label[:_LABEL_CHARS]}"


def parse_tmp_name(name: str) -> tuple[Owner, str] | None:
    """``(owner, label)`` of a name made by :func:`tmp_name`; ``None`` for any other name (old or foreign)."""
    m = _TMP_NAME.fullmatch(name)
    if m is None:
        return None
    return Owner(int(m["pid"]), m["token"], m["host"]), m["label"]


# -- fault points for the reliability tests ------------------------------------------------------
# Every write (write_all), file fsync and directory fsync (the step after a rename) passes through
# _fault_point, so a test can kill the process after the N-th of them (FISHERSTORE_TEST_KILL_AFTER=N,
# SIGKILL: no cleanup runs), make the N-th and later writes fail as on a full disk
# (FISHERSTORE_TEST_ENOSPC_AFTER=N) and learn how many there are in a run (FISHERSTORE_TEST_COUNT_FILE:
# the count is written there at exit).  Unset, this costs one boolean test per write.
_KILL_AFTER = int(os.environ.get("FISHERSTORE_TEST_KILL_AFTER", "0") or 0)
_ENOSPC_AFTER = int(os.environ.get("FISHERSTORE_TEST_ENOSPC_AFTER", "0") or 0)
_COUNT_FILE = os.environ.get("FISHERSTORE_TEST_COUNT_FILE", "")
_FAULTS = bool(_KILL_AFTER or _ENOSPC_AFTER or _COUNT_FILE)
_events = itertools.count(1)
_last_event = 0


def _write_count() -> None:
    Path(_COUNT_FILE).write_text(f"{_last_event}\n")


if _COUNT_FILE:
    import atexit

    atexit.register(_write_count)


def _fault_point(where: str | Path, *, before: bool) -> None:
    """Count a durable write at ``where``; kill or fail it when a test asked for that (see above)."""
    global _last_event
    if before:
        if _ENOSPC_AFTER and _last_event + 1 >= _ENOSPC_AFTER:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(where))
        return
    _last_event = n = next(_events)
    if n == _KILL_AFTER:
        os.kill(os.getpid(), signal.SIGKILL)


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
    if _FAULTS:
        _fault_point("fsync", before=False)


def c_function(library: str | None, name: str, argtypes: list[Any], restype: Any, *, use_errno: bool = False) -> Any:
    """``name`` of the shared library ``library`` (None: the C library) as a ctypes function; None where missing."""
    try:
        fn = getattr(ctypes.CDLL(library, use_errno=use_errno), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = argtypes
    fn.restype = restype
    return fn


@functools.cache
def _crc32c_extend() -> Any:
    """``crc32c_extend`` of the C library inside google-crc32c, called through ctypes; None where unreachable.

    google-crc32c's own ``extend`` keeps the GIL for anything but ``bytes`` of
    1 MiB or more, so hashing a piece stalled the thread that reads and sums
    the next one; a ctypes call releases the GIL for its duration.
    """
    try:
        from google_crc32c import _crc32c  # the C extension; its library holds the public C API
    except ImportError:
        return None
    return c_function(
        _crc32c.__file__, "crc32c_extend", [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t], ctypes.c_uint32
    )


class Checksum:
    """Incremental CRC-32C (hardware accelerated, ~9 GB/s) of a byte stream.

    CRC-32C detects torn or bit-flipped data, which is what a manifest
    checksum is for; it is not a cryptographic digest.  Updates of
    :data:`_GIL_FREE_BYTES` or more run without the GIL, so that a thread
    hashing one piece does not stall a thread reading the next.
    """

    __slots__ = ("_crc",)

    def __init__(self) -> None:
        self._crc = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        view = np.frombuffer(data, dtype=np.uint8)  # a view, never a copy
        extend = _crc32c_extend() if len(view) >= _GIL_FREE_BYTES else None
        if extend is not None:
            self._crc = extend(self._crc, view.ctypes.data, len(view))
        else:
            view.flags.writeable = False  # the extension takes only read-only buffers
            self._crc = google_crc32c.extend(self._crc, view)

    def hexdigest(self) -> str:
        return f"crc32c:{self._crc:08x}"


#: Updates at least this long go through :func:`_crc32c_extend` (a ctypes call costs ~1 us).
_GIL_FREE_BYTES = 64 << 10


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (after a rename) to disk."""
    if _durable:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if _FAULTS:
        _fault_point(path, before=False)


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "wb") -> Iterator[BinaryIO]:
    """Open a temporary file beside ``path``; on clean exit fsync and rename it onto ``path``.

    On an exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    fd, tmp = _named_os_error(path, tempfile.mkstemp, prefix=tmp_name(path.name) + ".", dir=path.parent)
    os.fchmod(fd, 0o644)  # mkstemp creates 0600; published files are as readable as any other output
    try:
        with os.fdopen(fd, mode) as fh:
            try:
                yield cast(BinaryIO, fh)  # binary modes only
                if _FAULTS:
                    _fault_point(path, before=True)
                fh.flush()
            except OSError as exc:  # a full disk: name the file, as write_all does
                if exc.filename:
                    raise
                raise OSError(exc.errno, exc.strerror, str(path)) from exc
            fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def _named_os_error(path: Path, fn: Any, **kwargs: Any) -> Any:
    """``fn(**kwargs)``; an ``OSError`` without a file name gets ``path`` (the one-line CLI error names it)."""
    try:
        return fn(**kwargs)
    except OSError as exc:
        if exc.filename:
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from exc


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Build a directory in a temporary sibling; on clean exit it replaces ``path`` by a rename.

    Whatever was at ``path`` goes only once the new directory is complete.  On
    an exception the temporary directory is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=tmp_name(path.name) + ".", dir=path.parent))
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


def pread_bytes(fd: int, nbytes: int, offset: int, where: str) -> bytearray:
    """Read exactly ``nbytes`` at ``offset`` into a fresh ``bytearray`` (headers, indexes); see :func:`pread_into`."""
    out = bytearray(nbytes)
    pread_into(fd, memoryview(out), offset, where)
    return out


def pread_tensor(fd: int, nbytes: int, offset: int, where: str) -> torch.Tensor:
    """Read exactly ``nbytes`` at ``offset`` into a fresh uint8 tensor (one copy, no mmap); see :func:`pread_into`."""
    import torch

    out = torch.empty(nbytes, dtype=torch.uint8)
    pread_into(fd, out.numpy().data, offset, where)
    return out


def write_all(fd: int, data: bytes | bytearray | memoryview, offset: int, where: str | Path) -> int:
    """``pwrite`` all of ``data`` at ``offset``; return the offset after it.

    A failed write (a full disk, say) is an ``OSError`` naming ``where``, the
    file being written, so the one-line CLI error says which.
    """
    view = memoryview(data).cast("B")
    try:
        if _FAULTS:
            _fault_point(where, before=True)
        while view:
            n = os.pwrite(fd, view, offset)
            view = view[n:]
            offset += n
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(where)) from exc
    if _FAULTS:
        _fault_point(where, before=False)
    return offset


@functools.cache
def _fallocate() -> Any:
    """The C library's ``fallocate`` (Linux), or None where there is none."""
    return c_function(
        None, "fallocate", [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64], ctypes.c_int, use_errno=True
    )


def preallocate(fd: int, nbytes: int, where: str | Path, *, required: bool = True) -> None:
    """Reserve ``nbytes`` of disk for the empty file ``fd`` before writing it (the file's size becomes ``nbytes``).

    The filesystem then allocates the extents once instead of write by
    write: on ext4 here, pwriting 2.2 GB in ~1 MiB pieces took 0.50 s into a
    reserved file against 0.76 s into a growing one, and a disk too small
    fails here (an ``OSError`` naming ``where``), before anything is
    written.  A reservation that is only an estimate (``required=False``:
    compressed output, truncated to what was written afterwards) is skipped
    where it cannot be had.  Where the platform or filesystem cannot (no
    ``fallocate``, ``EOPNOTSUPP``) it does nothing: glibc's
    ``posix_fallocate`` would emulate it by writing every block.
    """
    fn = _fallocate()
    if fn is None or nbytes <= 0:
        return
    if fn(fd, 0, 0, nbytes) != 0:
        err = ctypes.get_errno()
        if required and err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV, errno.ESPIPE):
            raise OSError(err, f"cannot reserve {nbytes} bytes to write: {os.strerror(err)}", str(where))


#: Largest buffer a :class:`FileSpan` is read through: small enough to stay in the CPU cache between the
#: read and whatever consumes it (checksum, sum, compression); larger buffers measured slower, not faster.
VIEW_BYTES = 4 << 20


@dataclass(frozen=True)
class FileSpan:
    """``nbytes`` raw bytes of the file ``path`` from ``offset``: a piece of a tensor not read yet.

    Sources whose bytes lie raw and contiguous in a file hand these out instead
    of buffers, so that the consumer reads them straight into buffers of its
    own choosing (:meth:`read_into`, :meth:`views`) with no copy in between.
    """

    path: Path
    offset: int
    nbytes: int

    def __len__(self) -> int:
        return self.nbytes

    def views(self, piece_bytes: int = VIEW_BYTES) -> Iterator[memoryview]:
        """The span's bytes, ``preadv`` into one reused buffer of ``piece_bytes``; a view is valid until the next.

        One copy out of the page cache into a buffer small enough to stay in
        the CPU cache for whatever reads it next (checksum, sum, compression);
        measured as fast as mmap windows and without their page faults or RSS.
        """
        if not self.nbytes:
            return
        buf = np.empty(min(self.nbytes, max(1, piece_bytes)), dtype=np.uint8).data  # not zero-filled
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
