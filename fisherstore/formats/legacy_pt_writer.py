"""Writing the legacy ``fisher.pt``: a ``torch.save`` zip archive streamed front to back.

:func:`write_pt` knows the pickle from the specs alone, so it writes it first
and each tensor's bytes follow as they arrive, one tensor at a time, in the
record layout PyTorch's own writer (miniz) produces: 64-byte aligned data
behind an ``FB`` padding extra field, a data descriptor after each record,
ZIP64 fields where offsets or sizes pass 4 GiB, and the ``.format_version``,
``.storage_alignment``, ``byteorder``, ``version`` and
``.data/serialization_id`` records.  ``torch.load(..., weights_only=True)``
(plain or ``mmap=True``) loads the result.  ``torch.load`` does not check the
CRC-32s, but other ZIP tools do, so they are computed as bytes pass (in a
helper thread, overlapping the writes).  The pickle names torch's globals
without importing torch.  Reading is :mod:`fisherstore.formats.legacy_pt`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import io
import logging
import pickle
import struct
import time
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO, ClassVar, NamedTuple

from .._io import atomic_file
from ..errors import BadInputError
from ..manifest import TensorSpec
from .base import Buffer
from .legacy_pt import STORAGE_CLASS

__all__ = ["write_pt"]

log = logging.getLogger(__name__)

# ZIP structures (APPNOTE 4.3), little-endian.
_LOCAL = struct.Struct("<IHHHHHIIIHH")  # sig, need, flags, method, time, date, crc, csize, usize, nlen, elen
# central: sig, made, need, flags, method, time, date, crc, csize, usize, nlen, elen, clen, disk, iattr, eattr, lho
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_EOCD = struct.Struct("<IHHHHIIH")  # sig, disk, cd disk, entries here, entries, cd size, cd offset, comment len
# sig, record size, made, need, disk, cd disk, entries here, entries, cd size, cd offset
_EOCD64 = struct.Struct("<IQHHIIQQQQ")
_LOCATOR = struct.Struct("<IIQI")  # sig, disk of EOCD64, EOCD64 offset, disks
_SIG_LOCAL, _SIG_CENTRAL, _SIG_EOCD = 0x04034B50, 0x02014B50, 0x06054B50
_SIG_EOCD64, _SIG_LOCATOR, _SIG_DESCRIPTOR = 0x06064B50, 0x07064B50, 0x08074B50
_U16, _U32 = 0xFFFF, 0xFFFFFFFF
_FLAG_DESCRIPTOR, _FLAG_UTF8 = 0x0008, 0x0800

#: Storage alignment torch.save uses (``torch.utils.serialization.config.save.storage_alignment``).
ALIGNMENT = 64

# Staging: small pieces are gathered into one buffer; pieces at least this big are written directly.
_STAGE_BYTES = 8 << 20
_DIRECT_BYTES = 256 << 10


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """C-order strides exactly as torch computes them (a 0-sized dim counts as 1)."""
    strides, step = [], 1
    for d in reversed(shape):
        strides.append(step)
        step *= max(d, 1)
    return tuple(reversed(strides))


class _StorageStub:
    """Stands for a tensor's storage while pickling; becomes a ``("storage", ...)`` persistent id."""

    __slots__ = ("key", "spec")

    def __init__(self, key: str, spec: TensorSpec) -> None:
        self.key, self.spec = key, spec


class _Global(NamedTuple):
    """A global (``module.name``) that the pickle names without this process importing it.

    torch.save's pickle names torch functions and storage classes; writing
    their names directly keeps ``convert → fisher.pt`` free of the torch
    import (seconds), while the bytes stay exactly what pickling the real
    objects gives.
    """

    module: str
    name: str

    def __call__(self, *args: Any) -> Any:  # pickle requires a reduce function to be callable; this one never runs
        raise TypeError(f"{self.module}.{self.name} is only named in a pickle here, never called")


_REBUILD = _Global("torch._utils", "_rebuild_tensor_v2")
_STORAGE_GLOBALS = {dtype: _Global("torch", cls) for dtype, cls in STORAGE_CLASS.items()}


class _TensorStub:
    """Pickles exactly like a contiguous CPU tensor does under ``torch.save``."""

    __slots__ = ("storage",)

    def __init__(self, storage: _StorageStub) -> None:
        self.storage = storage

    def __reduce__(self) -> tuple[Any, ...]:
        shape = self.storage.spec.shape
        args: tuple[Any, ...] = (self.storage, 0, shape, _contiguous_strides(shape), False, collections.OrderedDict())
        return (_REBUILD, args)


class _StubPickler(pickle._Pickler):  # the Python pickler: its dispatch table can name a _Global
    dispatch: ClassVar[dict[type, Any]] = dict(pickle._Pickler.dispatch)

    def save_named_global(self, obj: _Global) -> None:
        """Write ``obj`` as a protocol-2 GLOBAL (and memoize it), as ``save_global`` would for the real object."""
        # typeshed declares only pickle._Pickler's public API; write and memoize are set by its __init__
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())  # type: ignore[attr-defined]
        self.memoize(obj)  # type: ignore[attr-defined]

    dispatch[_Global] = save_named_global

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _StorageStub):
            return ("storage", _STORAGE_GLOBALS[obj.spec.dtype], obj.key, "cpu", obj.spec.numel)
        return None


def _pickle_specs(specs: list[TensorSpec]) -> bytes:
    """``data.pkl`` of ``{spec.name: tensor}``; storage keys ``"0".."n-1"`` in spec order, as torch.save has them."""
    buf = io.BytesIO()
    _StubPickler(buf, protocol=2).dump({s.name: _TensorStub(_StorageStub(str(i), s)) for i, s in enumerate(specs)})
    return buf.getvalue()


def _zip64_extra(size: int, header: int) -> bytes:
    """The ZIP64 extra field miniz writes (local and central alike): sizes if >= 4 GiB, header offset if past 4 GiB."""
    values = ([size, size] if size >= _U32 else []) + ([header] if header >= _U32 else [])
    return struct.pack(f"<HH{len(values)}Q", 1, 8 * len(values), *values) if values else b""


class _ZipStream:
    """Writes a torch-style ZIP64 archive front to back, one record at a time, without seeking.

    Small pieces (headers, small chunks) are gathered in a staging buffer;
    large chunks are written straight from the caller's buffer while a helper
    thread computes their CRC-32 (``zlib.crc32`` releases the GIL), so
    checksumming overlaps the I/O instead of adding to it.
    """

    def __init__(self, fh: BinaryIO, prefix: str, crc_pool: concurrent.futures.Executor) -> None:
        self._fh = fh
        self._prefix = prefix
        self._pool = crc_pool
        self._stage = bytearray()
        self._pos = 0  # bytes of the archive produced so far (written + staged)
        self._central: list[bytes] = []
        self._names: list[str] = []
        self._crcs: list[int] = []
        self._open: tuple[bytes, int, int, bool] | None = None  # name, header offset, size, zip64 extra
        self._label = ""  # what error messages call the open record
        self._crc = 0
        self._left = self._done = 0  # bytes of the open record still due / received

    # -- raw output ------------------------------------------------------------------------
    def _put(self, data: Buffer) -> None:
        self._stage += data
        self._pos += len(data)
        if len(self._stage) >= _STAGE_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._stage:
            self._fh.write(self._stage)
            self._stage = bytearray()

    # -- records ---------------------------------------------------------------------------
    def begin(self, name: str, size: int, label: str | None = None) -> None:
        """Write a record's local header so that its data starts 64-byte aligned, as miniz does for torch."""
        full = (self._prefix + name).encode("utf-8")
        header = self._pos
        z64 = _zip64_extra(size, header)
        start = header + _LOCAL.size + len(full) + len(z64) + 4
        pad = -start % ALIGNMENT
        flags = _FLAG_UTF8 | (_FLAG_DESCRIPTOR if size else 0)
        self._put(_LOCAL.pack(_SIG_LOCAL, 0, flags, 0, 0, 0, 0, 0, 0, len(full), len(z64) + 4 + pad))
        self._put(full + z64 + b"FB" + struct.pack("<H", pad) + b"Z" * pad)
        self._open = (full, header, size, bool(z64))
        self._label = label or f"record {name!r}"
        self._names.append(name)
        self._crc, self._left, self._done = 0, size, 0

    def data(self, chunk: Buffer) -> None:
        """Append bytes of the open record."""
        try:
            mv = memoryview(chunk).cast("B")
        except TypeError as exc:
            raise BadInputError(
                f"write_pt: {self._label} got a buffer that is not C-contiguous ({exc})", param="items"
            ) from None
        n = mv.nbytes
        self._take(n)
        if n < _DIRECT_BYTES:
            self._crc = zlib.crc32(mv, self._crc)
            self._put(mv)
            return
        crc = self._pool.submit(zlib.crc32, mv, self._crc)
        self._flush()
        self._fh.write(mv)
        self._pos += n
        self._crc = crc.result()

    def _take(self, n: int) -> None:
        """Count ``n`` more bytes of the open record, refusing more than it declared."""
        if n > self._left:
            raise BadInputError(
                f"write_pt: {self._label} got more bytes than the {self._left + self._done} its spec declares",
                param="items",
            )
        self._left -= n
        self._done += n

    def end(self) -> None:
        """Close the open record: data descriptor and central-directory entry."""
        assert self._open is not None
        full, header, size, zip64 = self._open
        if self._left:
            raise BadInputError(
                f"write_pt: {self._label} got {self._done} bytes, but its spec declares {size}", param="items"
            )
        if size:
            sizes = struct.pack("<QQ", size, size) if zip64 else struct.pack("<II", size, size)
            self._put(struct.pack("<II", _SIG_DESCRIPTOR, self._crc) + sizes)
        flags = _FLAG_UTF8 | (_FLAG_DESCRIPTOR if size else 0)
        extra = _zip64_extra(size, header)
        small = min(size, _U32)
        fields = (
            _SIG_CENTRAL,
            0,
            0,
            flags,
            0,
            0,
            0,
            self._crc,
            small,
            small,
            len(full),
            len(extra),
            0,
            0,
            0,
            0,
            min(header, _U32),
        )
        self._central.append(_CENTRAL.pack(*fields) + full + extra)
        self._crcs.append(self._crc)
        self._open = None

    def record(self, name: str, data: bytes) -> None:
        self.begin(name, len(data))
        self.data(data)
        self.end()

    def finish(self) -> None:
        """Write ``.data/serialization_id``, the central directory and the ZIP64 + classic end records."""
        names = hashlib.blake2b("\0".join(self._names).encode(), digest_size=8).digest()
        crcs = hashlib.blake2b(struct.pack(f"<{len(self._crcs)}I", *self._crcs), digest_size=8).digest()
        sid = f"{int.from_bytes(names, 'little'):020d}{int.from_bytes(crcs, 'little'):020d}"
        self.record(".data/serialization_id", sid.encode())
        cd_offset = self._pos
        for entry in self._central:
            self._put(entry)
        cd_size = self._pos - cd_offset
        n = len(self._central)
        eocd64 = self._pos
        self._put(_EOCD64.pack(_SIG_EOCD64, _EOCD64.size - 12, 0x031E, 45, 0, 0, n, n, cd_size, cd_offset))
        self._put(_LOCATOR.pack(_SIG_LOCATOR, 0, eocd64, 1))
        self._put(_EOCD.pack(_SIG_EOCD, 0, 0, min(n, _U16), min(n, _U16), min(cd_size, _U32), min(cd_offset, _U32), 0))
        self._flush()


def write_pt(path: str | Path, specs: list[TensorSpec], items: Iterable[tuple[TensorSpec, Iterable[Buffer]]]) -> None:
    """Stream a ``fisher.pt`` that stock ``torch.load(path, weights_only=True)`` (and ``mmap=True``) loads.

    ``specs`` fixes the names, shapes and dtypes (and the pickle, written
    first); ``items`` then yields ``(spec, chunks)`` in the same order, where
    ``chunks`` are C-order little-endian byte buffers of any sizes summing to
    the tensor's size.  Only the chunk in hand is held, so a 58 GB export
    needs no 58 GB of RAM; chunks of ``_DIRECT_BYTES`` or more are written
    without copying.
    The file appears atomically (temporary file beside ``path``, fsync,
    rename); on any error the temporary file is removed and ``path`` is
    untouched.

    Args:
        path: the file to write; its stem names the archive's folder, as torch.save does.
        specs: every tensor, in the order of the file.
        items: ``(spec, chunks)`` for each of ``specs``, in that order.

    Raises:
        BadInputError: ``specs`` repeat a name, or ``items`` do not follow ``specs`` or their sizes.
    """
    path = Path(path)
    specs = list(specs)
    seen: set[str] = set()
    for spec in specs:
        if not isinstance(spec, TensorSpec):
            raise BadInputError(f"write_pt: specs must be TensorSpec objects, got {type(spec).__name__}", param="specs")
        if spec.name in seen:
            raise BadInputError(f"write_pt: tensor {spec.name!r} is listed twice", param="specs")
        seen.add(spec.name)
    prefix = (path.stem or "archive") + "/"  # torch.save names the folder after the file, without extension
    t0 = time.perf_counter()
    total = 0
    with (
        concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fisherstore-crc") as pool,
        atomic_file(path) as fh,
    ):
        zs = _ZipStream(fh, prefix, pool)
        zs.record("data.pkl", _pickle_specs(specs))
        zs.record(".format_version", b"1")
        zs.record(".storage_alignment", str(ALIGNMENT).encode())
        zs.record("byteorder", b"little")
        count = 0
        for spec, chunks in items:
            if count >= len(specs) or spec != specs[count]:
                expected = repr(specs[count]) if count < len(specs) else "nothing more"
                raise BadInputError(
                    f"write_pt: item {count} is {spec!r}, expected {expected} (items must follow specs)",
                    param="items",
                )
            zs.begin(f"data/{count}", spec.nbytes, f"tensor {spec.name!r}")
            for chunk in chunks:
                zs.data(chunk)
            zs.end()
            total += spec.nbytes
            count += 1
        if count != len(specs):
            raise BadInputError(
                f"write_pt: items stopped after {count} of {len(specs)} tensors; next was {specs[count].name!r}",
                param="items",
            )
        zs.record("version", b"3\n")
        zs.finish()
    dt = time.perf_counter() - t0
    log.info(
        "wrote %s: %d tensors, %.1f MB in %.2f s (%.0f MB/s)",
        path,
        len(specs),
        total / 1e6,
        dt,
        total / 1e6 / max(dt, 1e-9),
    )
