"""zarr v3 backend: one sharded, row-chunked array per tensor in a zarr group.

Layout (what this module writes and the only layout its reader accepts):

* The store root is a zarr v3 group (``zarr.json`` with ``node_type: group``),
  so ``zarr.open_group(root)`` lists the arrays; each tensor is the array at
  path ``<tensor name>`` and its manifest location is ``{"array": name}``.
* Arrays are chunked by whole rows of dim 0, about ``chunk_mb`` MiB per inner
  chunk, and stored with the ``sharding_indexed`` codec: a shard file
  (``<name>/c.<s>.0...``: the default chunk key encoding with separator
  ``.``, so an array is one directory) holds up to ``shard_mb`` MiB of
  consecutive row chunks followed by the shard index (``(offset, nbytes)``
  uint64 little-endian pairs, then a CRC-32C of them).  Edge chunks are
  padded to the full chunk shape with the fill value (0), as zarr requires.
* Inner chunks are ``bytes`` (little-endian) optionally followed by one
  compressor (``zstd`` or ``blosc``).  bf16 uses the zarr-extensions
  ``bfloat16`` data type, which tensorstore reads natively; zarr-python reads
  it once :mod:`fisherstore.formats.zarr_bf16` is imported (done here when
  zarr-python is already loaded; else ``fisherstore.register_bfloat16()``).

Why not write through zarr-python: its write path runs at about a quarter of
``cp`` speed.  Here a shard is written sequentially — with no compression
the caller's buffers go straight to the file with ``pwrite``, while
compression runs on a thread pool (numcodecs releases the GIL) — and shard
``fsync`` runs in the background (skipped under ``--no-fsync``).  Tests check that the files are
byte-identical to zarr-python's and that zarr-python and tensorstore read every
array identically.  Local reads ``pread`` the index, then the needed chunks;
on an object store (an fsspec :class:`~fisherstore.storage.Remote`) the same
reads are range requests, a few in flight at once.  An
uncompressed array held in one shard is the tensor's bytes from offset 0
(checked against the index), so it is also offered as a raw byte span:
large lazy reads map it and conversions stream it, as for safetensors.

Atomicity: a group's arrays are written under a temporary directory in the
root, every file fsynced; ``commit`` fsyncs the directories, renames each
array into place (replacing a leftover of an interrupted attempt) and fsyncs
the root.  On an object store there is no rename: each shard is streamed to
its final key as a multipart upload and appears when complete, and only the
manifest the writer PUTs after ``commit`` names the group (docs/FORMAT.md §1.1).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import google_crc32c
import numpy as np

from .._io import (
    TMP_PREFIX,
    fsync,
    fsync_dir,
    pread_bytes,
    pread_into,
    preallocate,
    write_all,
    write_json_atomic,
)
from .._memory import tune_allocator
from ..errors import BadInputError, CorruptDataError
from ..manifest import ITEMSIZES, GroupInfo, TensorInfo, TensorSpec, parse_json
from ..naming import validate_name
from ..storage import Remote
from .base import Backend, Buffer, GroupSink, check_rows, rows_of, rows_shape

if TYPE_CHECKING:
    import torch

__all__ = ["COMPRESSIONS", "ZarrBackend"]

log = logging.getLogger(__name__)

_MIB = 1 << 20
#: The largest inner chunk read (decoded): the writer's chunks are at most ``chunk_mb`` (<= 1 GiB) plus a row.
_MAX_CHUNK_BYTES = 2 << 30
#: The largest array ``zarr.json`` read: fisherstore's are about 1 KB.
_MAX_META_BYTES = 1 << 20
_EMPTY = 2**64 - 1  # shard index entry of a chunk that was never written
_WORKERS = min(8, os.cpu_count() or 1)
_IN_FLIGHT = 2 * _WORKERS  # chunks being compressed while the next one is gathered
_GROUP_META = {"zarr_format": 3, "node_type": "group", "attributes": {}}
_RANGES_AT_ONCE = 8  # object stores: range requests in flight per read (each at most one chunk)


if "zarr" in sys.modules:  # a zarr-python user: let it read what this module writes
    from . import zarr_bf16  # noqa: F401


# -- compression ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Compression:
    """One value of the ``compression`` option: the zarr codec it writes and how to run it."""

    codec: Literal["zstd", "blosc"]
    default_level: int
    max_level: int
    cname: str = ""
    shuffle: Literal["", "shuffle", "bitshuffle"] = ""
    blocksize: int = 0  # blosc block size in bytes (0: blosc chooses)

    def metadata(self, level: int, itemsize: int) -> dict[str, Any]:
        if self.codec == "zstd":
            return {"name": "zstd", "configuration": {"level": level, "checksum": False}}
        return {
            "name": "blosc",
            "configuration": {
                "cname": self.cname,
                "clevel": level,
                "shuffle": self.shuffle,
                "typesize": itemsize,
                "blocksize": self.blocksize,
            },
        }

    def encode(self, data: Buffer, level: int, itemsize: int) -> bytes:
        from numcodecs import Zstd, blosc  # imported when first needed: ~60 ms that uncompressed stores skip

        if self.codec == "zstd":
            return bytes(Zstd(level=level).encode(data))
        shuffle = blosc.BITSHUFFLE if self.shuffle == "bitshuffle" else blosc.SHUFFLE
        return bytes(blosc.compress(data, self.cname.encode(), level, shuffle, self.blocksize, typesize=itemsize))


#: ``compression`` option values.  Measured on the real bf16 Fisher sample (4 MiB chunks, one thread, blosc's
#: own threads off, as the writer runs it): blosc-zstd-shuffle 1.50x at ~0.24 GB/s, blosc-zstd-bitshuffle
#: 1.46x at ~0.43 GB/s (256 KiB blocks: 1.43x with 128 KiB), blosc-lz4-bitshuffle (level 9) 1.43x at
#: ~0.63 GB/s, zstd 1.32x at ~0.38 GB/s.  numcodecs' blosc is built without AVX2, so bitshuffle runs SSE2 code.
COMPRESSIONS: dict[str, _Compression | None] = {
    "none": None,
    "zstd": _Compression("zstd", default_level=1, max_level=22),
    "blosc-zstd-shuffle": _Compression("blosc", 1, 9, "zstd", "shuffle", 256 << 10),
    "blosc-zstd-bitshuffle": _Compression("blosc", 1, 9, "zstd", "bitshuffle", 256 << 10),
    "blosc-lz4-bitshuffle": _Compression("blosc", 9, 9, "lz4", "bitshuffle", 128 << 10),
}
_DEFAULTS: dict[str, Any] = {"compression": "none", "level": None, "chunk_mb": 4, "shard_mb": 256}


def _decoded_size(codec: str, data: Buffer) -> int:
    """The size a zstd frame or blosc buffer says it decodes to, read from its header.

    Checked before decoding, so that a lying header can neither make the
    decoder allocate what it claims nor leave part of the output unwritten.
    """
    if codec == "blosc":  # version, versionlz, flags, typesize, then uint32 nbytes, blocksize, cbytes
        if len(data) < 16 or int.from_bytes(data[12:16], "little") != len(data):
            raise ValueError("blosc header is truncated or its compressed size disagrees with the chunk's")
        return int.from_bytes(data[4:8], "little")
    if len(data) < 6 or data[:4] != b"\x28\xb5\x2f\xfd":
        raise ValueError("not a zstd frame")
    descriptor = data[4]
    single_segment = (descriptor >> 5) & 1
    size_bytes = (single_segment, 2, 4, 8)[descriptor >> 6]
    if size_bytes == 0:
        raise ValueError("zstd frame does not record its content size")
    pos = 5 + (1 - single_segment) + (0, 1, 2, 4)[descriptor & 3]  # skip the window and dictionary-id fields
    return int.from_bytes(data[pos : pos + size_bytes], "little") + (256 if size_bytes == 2 else 0)


def _decode_into(codec: str, data: Buffer, out: memoryview) -> None:
    """Decompress one inner chunk into ``out``, which must be exactly its decoded size."""
    size = _decoded_size(codec, data)
    if size != len(out):
        raise ValueError(f"it decodes to {size} bytes, expected {len(out)}")
    from numcodecs import Zstd, blosc

    if codec == "zstd":
        Zstd().decode(data, out=out)
    else:
        blosc.decompress(data, out)


def _number(options: dict[str, Any], key: str, low: float, high: float) -> float:
    value = options[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value <= high:
        raise BadInputError(f"zarr option {key}={value!r} must be a number > {low} and <= {high}", param=key)
    return value


# -- array layout ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Layout:
    """Where a tensor's bytes go: chunk and shard rows, codec; renders and parses ``zarr.json``."""

    shape: tuple[int, ...]
    dtype: str
    chunk_rows: int
    shard_rows: int
    compression: str = "none"
    level: int | None = None
    #: Chunk key separator: ``.`` keeps each array one directory (``/`` costs two more per array to create
    #: and fsync); ``/``, which fisherstore wrote before, is still read.
    separator: Literal[".", "/"] = "."

    @property
    def itemsize(self) -> int:
        return ITEMSIZES[self.dtype]

    @property
    def row_bytes(self) -> int:
        return rows_of(self.shape)[1] * self.itemsize

    @property
    def chunk_bytes(self) -> int:
        return self.chunk_rows * self.row_bytes

    @property
    def chunks_per_shard(self) -> int:
        return self.shard_rows // self.chunk_rows

    @property
    def num_chunks(self) -> int:
        rows, per_row = rows_of(self.shape)
        return 0 if rows * per_row == 0 else -(-rows // self.chunk_rows)

    @property
    def index_bytes(self) -> int:
        return 16 * self.chunks_per_shard + 4

    def shard_reserve(self, shard: int) -> tuple[int, bool]:
        """Bytes to reserve for shard ``shard``'s file before writing it, and whether that is its exact size.

        Uncompressed shards have a known size; a compressed one gets what its
        chunks would take uncompressed plus codec overhead (an upper bound in
        practice), and is trimmed to what was written when it is finished.
        """
        chunks = min(self.chunks_per_shard, self.num_chunks - shard * self.chunks_per_shard)
        if self.codec is None:
            return chunks * self.chunk_bytes + self.index_bytes, True
        return chunks * (self.chunk_bytes + self.chunk_bytes // 128 + 64) + self.index_bytes, False

    @property
    def codec(self) -> _Compression | None:
        return COMPRESSIONS[self.compression]

    @classmethod
    def plan(cls, spec: TensorSpec, options: dict[str, Any]) -> _Layout:
        """Rows per chunk and per shard for ``spec``: as even as possible, about the option sizes."""
        rows, per_row = rows_of(spec.shape)
        row_bytes = per_row * ITEMSIZES[spec.dtype]
        chunk_rows = shard_rows = 1
        if rows * row_bytes:
            num_chunks = min(rows, math.ceil(rows * row_bytes / (options["chunk_mb"] * _MIB)))
            chunk_rows = -(-rows // num_chunks)
            num_chunks = -(-rows // chunk_rows)
            num_shards = min(num_chunks, math.ceil(rows * row_bytes / (options["shard_mb"] * _MIB)))
            shard_rows = -(-num_chunks // num_shards) * chunk_rows
        return cls(spec.shape, spec.dtype, chunk_rows, shard_rows, options["compression"], options["level"])

    def _grid(self, rows: int) -> list[int]:
        return [] if not self.shape else [rows, *(max(1, d) for d in self.shape[1:])]

    def metadata(self) -> dict[str, Any]:
        """This array's ``zarr.json``."""
        bytes_codec: dict[str, Any] = {"name": "bytes"}
        if self.itemsize > 1:
            bytes_codec["configuration"] = {"endian": "little"}
        inner = [bytes_codec]
        if self.codec is not None:
            inner.append(self.codec.metadata(self.level, self.itemsize))  # type: ignore[arg-type]
        is_float = self.dtype.startswith("float") or self.dtype == "bfloat16"
        return {
            "zarr_format": 3,
            "node_type": "array",
            "shape": list(self.shape),
            "data_type": self.dtype,  # manifest dtype names are the zarr v3 names (bfloat16: zarr-extensions)
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": self._grid(self.shard_rows)}},
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": self.separator}},
            "fill_value": 0.0 if is_float else (False if self.dtype == "bool" else 0),
            "codecs": [
                {
                    "name": "sharding_indexed",
                    "configuration": {
                        "chunk_shape": self._grid(self.chunk_rows),
                        "codecs": inner,
                        "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
                        "index_location": "end",
                    },
                }
            ],
            "attributes": {},
            "storage_transformers": [],
        }

    @classmethod
    def from_metadata(cls, meta: Any, where: str) -> _Layout:
        """Parse a ``zarr.json`` this module wrote; anything else is :class:`CorruptDataError`."""
        data_type = meta.get("data_type") if isinstance(meta, dict) else None
        if isinstance(data_type, str) and data_type not in ITEMSIZES:
            raise CorruptDataError(
                f"{where}: data_type {data_type!r:.50} is not one fisherstore stores ({', '.join(ITEMSIZES)})"
            )
        try:
            shape = tuple(meta["shape"])
            dtype = meta["data_type"]
            sharding = meta["codecs"][0]["configuration"]
            shard_rows = meta["chunk_grid"]["configuration"]["chunk_shape"][:1] or [1]
            chunk_rows = sharding["chunk_shape"][:1] or [1]
            compressors = sharding["codecs"][1:]
            compression, level = "none", None
            if compressors:
                (codec,) = compressors
                config = codec["configuration"]
                level = config.get("level", config.get("clevel"))
                compression = next(
                    name
                    for name, c in COMPRESSIONS.items()
                    if c is not None
                    and c.codec == codec["name"]
                    and c.cname == config.get("cname", "")
                    and c.shuffle == config.get("shuffle", "")
                )
            separator = meta["chunk_key_encoding"]["configuration"]["separator"]
            if separator not in (".", "/"):
                raise ValueError(separator)
            layout = cls(shape, dtype, chunk_rows[0], shard_rows[0], compression, level, separator)
            expected = layout.metadata()
            if compressors and codec["name"] == "blosc":  # the block size only tunes compression: any value decodes
                expected["codecs"][0]["configuration"]["codecs"][1]["configuration"]["blocksize"] = config.get(
                    "blocksize"
                )
            ok = (
                all(isinstance(r, int) and r >= 1 for r in (layout.chunk_rows, layout.shard_rows))
                and layout.shard_rows % layout.chunk_rows == 0
                and layout.chunk_bytes <= _MAX_CHUNK_BYTES  # a reader holds a chunk in memory: refuse before that
                and all(
                    meta.get(k) == v for k, v in expected.items() if k not in ("attributes", "storage_transformers")
                )
            )
        except (
            KeyError,
            IndexError,
            TypeError,
            ValueError,
            AttributeError,
            StopIteration,
            ZeroDivisionError,
            OverflowError,
        ):
            ok = False
        if not ok:
            raise CorruptDataError(
                f"{where}: not an array in the layout fisherstore writes (sharded row chunks, bytes + zstd/blosc); "
                "read it with zarr-python or tensorstore"
            )
        return layout

    def shard_key(self, shard: int) -> str:
        """Path of a shard file relative to the array (default chunk key encoding)."""
        return "c" if not self.shape else self.separator.join(["c", str(shard), *("0" * (len(self.shape) - 1))])


# -- writing ------------------------------------------------------------------------------------------
def _split(pieces: Iterable[Buffer], total: int, step: int, name: str) -> Iterator[tuple[memoryview, bool]]:
    """A byte stream cut at every multiple of ``step``; the flag marks a piece that ends a step or the stream."""
    pos = 0
    for buf in pieces:
        item = memoryview(buf).cast("B")
        done, size = 0, len(item)
        while done < size:
            room = min(step - pos % step, total - pos)
            if room <= 0:
                raise CorruptDataError(f"tensor {name!r}: got more than the {total} bytes its shape and dtype need")
            n = min(room, size - done)
            piece = item[done : done + n]
            done += n
            pos += n
            yield piece, pos % step == 0 or pos == total
    if pos != total:
        raise CorruptDataError(f"tensor {name!r}: got {pos} bytes, expected {total}")


def _fsync_close(fd: int) -> None:
    try:
        fsync(fd)  # honours set_durable(False) (--no-fsync)
    finally:
        os.close(fd)


class _ShardStream:
    """Appends one array's inner chunks, in order, to its shard files, opening and finishing shards as it goes."""

    def __init__(self, sink: _ZarrGroupSink, array_dir: Path, layout: _Layout) -> None:
        self.sink = sink
        self.array_dir = array_dir
        self.layout = layout
        self.chunk = 0  # index of the chunk being written
        self.fd = -1
        self.path = array_dir  # the shard file being written, once one is open
        self.exact = True  # whether its reservation was its exact size
        self.pos = 0
        self.chunk_start = 0
        self.index = np.full((layout.chunks_per_shard, 2), _EMPTY, dtype="<u8")

    def write(self, data: Buffer) -> None:
        """Append bytes to the current chunk."""
        if self.fd < 0:
            shard = self.chunk // self.layout.chunks_per_shard
            path = self.array_dir / self.layout.shard_key(shard)  # "." keys: the array's directory holds it
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            self.path = path
            nbytes, self.exact = self.layout.shard_reserve(shard)
            preallocate(self.fd, nbytes, path, required=self.exact)
            self.pos = 0
            self.index[:] = _EMPTY
        self.pos = write_all(self.fd, data, self.pos, self.path)

    def end_chunk(self, pad_to: int = 0) -> None:
        """Close the current chunk (zero-padded to ``pad_to`` bytes); finish the shard when it is full."""
        if self.pos - self.chunk_start < pad_to:
            self.write(bytes(pad_to - (self.pos - self.chunk_start)))
        self.index[self.chunk % self.layout.chunks_per_shard] = (self.chunk_start, self.pos - self.chunk_start)
        self.chunk += 1
        self.chunk_start = self.pos
        if self.chunk % self.layout.chunks_per_shard == 0 or self.chunk == self.layout.num_chunks:
            raw = self.index.tobytes()
            self.write(raw + google_crc32c.value(raw).to_bytes(4, "little"))
            self.chunk_start = 0
            self._finish_shard()

    def _finish_shard(self) -> None:
        """The shard file is complete: trim its reservation, fsync and close it in the background."""
        if not self.exact:
            os.ftruncate(self.fd, self.pos)  # give back what the reservation held beyond the compressed bytes
        fd, self.fd = self.fd, -1
        self.sink.sync_later(fd)

    def close(self) -> None:
        """Release an unfinished shard (after an error)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _ObjectShardStream(_ShardStream):
    """A :class:`_ShardStream` onto an object store: each shard is one object, uploaded as it is written.

    Writes are sequential, so a shard streams out through the filesystem's
    file object in parts of :data:`~fisherstore.storage.UPLOAD_BLOCK_BYTES`
    (an S3 multipart upload): memory stays one part per shard being written.
    The object exists once its index is written and the file closed; one
    abandoned by an error is never completed.
    """

    def __init__(self, sink: _ZarrGroupSink, remote: Remote, array: str, layout: _Layout) -> None:
        super().__init__(sink, Path(array), layout)
        self.remote = remote
        self.array = array
        self.fh: Any = None

    def write(self, data: Buffer) -> None:
        if self.fh is None:
            key = f"{self.array}/{self.layout.shard_key(self.chunk // self.layout.chunks_per_shard)}"
            self.fh = self.remote.open_write(key)
            self.key = key
            self.pos = 0
            self.index[:] = _EMPTY
        with self.remote.errors(self.key):
            self.fh.write(data)
        self.pos += len(memoryview(data).cast("B"))

    def _finish_shard(self) -> None:
        fh, self.fh = self.fh, None
        with self.remote.errors(self.key):
            fh.close()  # completes the upload: the shard object appears whole, or not at all

    def close(self) -> None:
        fh, self.fh = self.fh, None
        if fh is not None:
            with contextlib.suppress(Exception):
                if hasattr(fh, "discard"):
                    fh.discard()  # abandon the upload (S3: abort the multipart upload); never completed


class _ZarrGroupSink(GroupSink):
    """Writes one group's arrays under a temporary directory; commit renames them into the root."""

    def __init__(self, backend: ZarrBackend, group: GroupInfo) -> None:
        self.backend = backend
        self.group = group
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}zarr-g{group.index:05d}-", dir=backend.root))
        self.arrays: list[str] = []
        self._syncs: list[Future[None]] = []
        self._sync_pool = ThreadPoolExecutor(1, thread_name_prefix="fisherstore-zarr-fsync")
        # Chunks being compressed, oldest first, with the stream they go to and the chunk buffer they own (if
        # any).  They carry over from tensor to tensor, so the pool stays busy while the next tensor is read.
        self._pending: deque[tuple[Future[bytes], _ShardStream, np.ndarray | None]] = deque()

    def sync_later(self, fd: int) -> None:
        """fsync and close ``fd`` in the background (the disk flush overlaps the next writes)."""
        self._syncs.append(self._sync_pool.submit(_fsync_close, fd))

    def pieces(self, spec: TensorSpec) -> tuple[int, int] | None:
        """Compressed: whole inner chunks, kept while up to ``2 * workers`` of them are being compressed."""
        layout = _Layout.plan(spec, self.backend.options)
        return None if layout.codec is None else (max(1, layout.chunk_bytes), _IN_FLIGHT)

    def write_tensor(self, spec: TensorSpec, pieces: Iterable[Buffer], *, held: int = 0) -> dict[str, Any]:
        if spec.name in self.arrays:
            raise BadInputError(f"tensor {spec.name!r} was already written in group {self.group.index}")
        layout = _Layout.plan(spec, self.backend.options)
        self.arrays.append(spec.name)
        stream = self._stream(spec.name, layout)
        try:
            if layout.codec is None:
                # Uncompressed inner chunks are the tensor's bytes in order: pass them straight through.
                for piece, ends in _split(pieces, spec.nbytes, max(1, layout.chunk_bytes), spec.name):
                    stream.write(piece)
                    if ends:
                        stream.end_chunk(pad_to=layout.chunk_bytes)
            else:  # its last chunks may still be compressing on return: the next tensor or commit writes them
                self._write_compressed(stream, layout, spec, pieces, borrow=held >= _IN_FLIGHT)
        except BaseException:
            stream.close()
            raise
        self._put_metadata(spec.name, json.dumps(layout.metadata(), indent=1).encode())
        return {"array": spec.name}

    def _stream(self, array: str, layout: _Layout) -> _ShardStream:
        """The shard writer of a new array (its directory under the group's temporary directory)."""
        array_dir = self.tmp / array
        array_dir.mkdir()
        return _ShardStream(self, array_dir, layout)

    def _put_metadata(self, array: str, data: bytes) -> None:
        """Write an array's ``zarr.json`` (fsynced in the background)."""
        path = self.tmp / array / "zarr.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        write_all(fd, data, 0, path)
        self.sync_later(fd)

    def _write_compressed(
        self, stream: _ShardStream, layout: _Layout, spec: TensorSpec, pieces: Iterable[Buffer], borrow: bool
    ) -> None:
        """Compress whole chunks on the pool, at most :data:`_IN_FLIGHT` at a time, and write them in order.

        With ``borrow`` (the caller keeps pieces valid while that many are in
        flight, across tensors: the writer's read-ahead does), a piece that is
        exactly one whole chunk is compressed where it lies; anything else (a
        short last chunk, pieces cut elsewhere, callers that reuse their buffer
        at once) is first assembled in a chunk buffer of the backend's.  The
        pool and those buffers serve every group, so memory stays a few chunks
        whatever the tensor or file size (a pool per group meant fresh threads,
        and allocator arenas, per group: peak RSS grew 14-25% from 2.2 to 8.4
        GB; with this and the ``"reuse"`` malloc profile of
        :mod:`fisherstore._memory`, -2% to 4%: benchmarks/results/store.md).
        The tensor's last chunks are left in flight on return, so that
        compression does not wait for the next tensor's first bytes; whoever
        comes next writes them.
        """
        pool, free = self.backend._compression()
        codec, level, itemsize, size = layout.codec, layout.level, layout.itemsize, layout.chunk_bytes
        assert codec is not None and level is not None

        def submit(data: Buffer, own: np.ndarray | None) -> None:
            self._pending.append((pool.submit(codec.encode, data, level, itemsize), stream, own))
            if len(self._pending) > _IN_FLIGHT:
                self._write_oldest()

        def take() -> np.ndarray:  # a chunk buffer of whole MiB (so that buffers are reused); [:size] is the chunk
            while free:
                whole = free.pop()
                if len(whole) >= size:
                    return whole
            return np.empty(-(-size // _MIB) * _MIB, dtype=np.uint8)

        buf: np.ndarray | None = None
        fill = 0
        try:
            for piece, ends in _split(pieces, spec.nbytes, max(1, size), spec.name):
                if borrow and buf is None and len(piece) == size:  # a whole chunk, where it lies
                    submit(piece, None)
                    continue
                if buf is None:
                    buf, fill = take(), 0
                buf[fill : fill + len(piece)] = np.frombuffer(piece, dtype=np.uint8)
                fill += len(piece)
                if ends:
                    buf[fill:size] = 0  # edge chunks hold the fill value past the last row
                    submit(buf[:size].data, buf)
                    buf = None
        finally:
            if buf is not None:
                free.append(buf)

    def _write_oldest(self) -> None:
        """Write the oldest chunk in flight to its shard (waiting for its compression)."""
        future, stream, own = self._pending.popleft()
        try:
            stream.write(future.result())
            stream.end_chunk()
        except BaseException:
            stream.close()  # abort() closes only the shards of chunks still in flight, and this one has left
            raise
        if own is not None:
            self.backend._free.append(own)

    def _shutdown(self) -> None:
        self._sync_pool.shutdown(wait=True)

    def commit(self) -> None:
        while self._pending:
            self._write_oldest()
        self._shutdown()
        for future in self._syncs:
            future.result()  # raise the first fsync error
        for dirpath, _, _ in os.walk(self.tmp, topdown=False):
            fsync_dir(Path(dirpath))
        root = self.backend.root
        for name in self.arrays:
            final = root / name
            if final.exists():  # left by an interrupted commit of this group: swap it out, delete below
                os.rename(final, self.tmp / f"{TMP_PREFIX}old-{name}")
            os.rename(self.tmp / name, final)
        if not (root / "zarr.json").exists():  # the root group, so that zarr.open_group(root) lists the arrays
            write_json_atomic(root / "zarr.json", _GROUP_META)
        fsync_dir(root)
        shutil.rmtree(self.tmp)
        log.debug("zarr group %d committed: %d arrays", self.group.index, len(self.arrays))

    def abort(self) -> None:
        pending, self._pending = list(self._pending), deque()
        for future, _, _ in pending:
            future.cancel()
        wait_futures([future for future, _, _ in pending])  # none still reads a buffer that may be reused
        for _, stream, own in pending:
            stream.close()
            if own is not None:
                self.backend._free.append(own)
        self._shutdown()
        if self.tmp.exists():
            shutil.rmtree(self.tmp)


class _ObjectGroupSink(_ZarrGroupSink):
    """A group written onto an object store, where there is no rename: arrays go straight to their final keys.

    Nothing names them until the writer PUTs the manifest after
    :meth:`commit` (objects first, manifest last), so a reader never sees a
    manifest naming objects that are not there; objects of an interrupted
    attempt are overwritten by the next one (``resume``) or removed by
    :meth:`abort`.
    """

    def __init__(self, backend: ZarrBackend, group: GroupInfo, remote: Remote) -> None:
        self.backend = backend
        self.group = group
        self.remote = remote
        self.tmp = Path()  # unused: nothing is renamed
        self.arrays = []
        self._syncs = []
        self._sync_pool = ThreadPoolExecutor(1, thread_name_prefix="fisherstore-zarr-fsync")
        self._pending = deque()

    def _stream(self, array: str, layout: _Layout) -> _ShardStream:
        with self.remote.errors(array):
            self.remote.fs.invalidate_cache(self.remote.key(array))
        return _ObjectShardStream(self, self.remote, array, layout)

    def _put_metadata(self, array: str, data: bytes) -> None:
        self.remote.put(f"{array}/zarr.json", data)

    def commit(self) -> None:
        while self._pending:
            self._write_oldest()
        self._shutdown()
        if not self.remote.exists("zarr.json"):
            self.remote.put("zarr.json", json.dumps(_GROUP_META, indent=1).encode())
        log.debug("zarr group %d uploaded: %d arrays", self.group.index, len(self.arrays))

    def abort(self) -> None:
        pending, self._pending = list(self._pending), deque()
        for future, _, _ in pending:
            future.cancel()
        wait_futures([future for future, _, _ in pending])
        for _, stream, own in pending:
            stream.close()
            if own is not None:
                self.backend._free.append(own)
        self._shutdown()
        for array in self.arrays:
            with contextlib.suppress(OSError, BadInputError):
                self.remote.rm(array, recursive=True)


# -- the backend ---------------------------------------------------------------------------------------
class ZarrBackend(Backend):
    """A store whose tensors are zarr v3 arrays of one group (see the module docstring).

    Options (all optional, stored in the manifest):
    ``compression``: one of :data:`COMPRESSIONS` (default ``"none"``);
    ``level``: compressor level (default per compression: zstd family 1, lz4 9);
    ``chunk_mb``: MiB per inner row chunk (default 4);
    ``shard_mb``: MiB per shard file (default 256: one file per tensor up to ~256 MiB).
    """

    name = "zarr"

    def __init__(self, root: Path, options: dict[str, Any] | None = None) -> None:
        super().__init__(root, options)
        self._layouts: dict[str, _Layout] = {}
        self._spans: dict[str, tuple[Path, int] | None] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._free: list[np.ndarray] = []
        self._indexes: dict[str, tuple[np.ndarray, int]] = {}  # object stores: shard indexes fetched so far

    def _compression(self) -> tuple[ThreadPoolExecutor, list[np.ndarray]]:
        """The compression threads and free chunk buffers shared by this backend's group sinks."""
        if self._pool is None:
            tune_allocator("reuse")  # each compressed chunk is a fresh multi-MiB bytes: keep freed ones for reuse
            self._pool = ThreadPoolExecutor(_WORKERS, thread_name_prefix="fisherstore-zarr-compress")
        return self._pool, self._free

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._free.clear()

    @classmethod
    def parse_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        unknown = set(options) - set(_DEFAULTS)
        if unknown:
            raise BadInputError(
                f"zarr backend options are {sorted(_DEFAULTS)}; got unknown {sorted(unknown)}", param="backend_options"
            )
        opts = {**_DEFAULTS, **options}
        compression = opts["compression"]
        if not isinstance(compression, str) or compression not in COMPRESSIONS:
            raise BadInputError(
                f"zarr compression {compression!r} is not one of {sorted(COMPRESSIONS)}", param="compression"
            )
        codec, level = COMPRESSIONS[compression], opts["level"]
        if codec is None and level is not None:
            raise BadInputError(f"zarr level={level!r} needs a compression; compression is 'none'", param="level")
        if codec is not None:
            level = codec.default_level if level is None else level
            if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= codec.max_level:
                raise BadInputError(
                    f"zarr level={level!r} for {compression!r} must be an integer in 1..{codec.max_level}",
                    param="level",
                )
        chunk_mb = _number(opts, "chunk_mb", 0, 1024)
        shard_mb = _number(opts, "shard_mb", 0, 64 * 1024)
        if shard_mb < chunk_mb:
            raise BadInputError(
                f"zarr shard_mb={shard_mb!r} must be >= chunk_mb={chunk_mb!r} (a shard holds whole chunks)",
                param="shard_mb",
            )
        return {"compression": compression, "level": level, "chunk_mb": chunk_mb, "shard_mb": shard_mb}

    def begin_group(self, group: GroupInfo, num_groups: int) -> GroupSink:
        if self.remote is not None:
            try:
                node = json.loads(self.remote.cat("zarr.json")).get("node_type")
            except FileNotFoundError:
                node = "group"
            except (ValueError, AttributeError):
                node = None
            if node != "group":
                raise BadInputError(
                    f"{self.remote.url_of('zarr.json')} exists but is not a zarr v3 group; write the store elsewhere"
                )
            return _ObjectGroupSink(self, group, self.remote)
        meta_path = self.root / "zarr.json"
        if meta_path.exists():
            try:
                node = json.loads(meta_path.read_bytes()).get("node_type")
            except (OSError, ValueError, AttributeError):
                node = None
            if node != "group":
                raise BadInputError(
                    f"{meta_path} exists but is not a zarr v3 group; write the store to a new directory"
                )
        self.root.mkdir(parents=True, exist_ok=True)
        return _ZarrGroupSink(self, group)

    def _layout(self, info: TensorInfo) -> tuple[Path, _Layout]:
        try:
            array = validate_name(info.location.get("array"))
        except BadInputError:
            raise CorruptDataError(
                f"tensor {info.name!r}: manifest location array {info.location.get('array')!r} is not a safe name"
            ) from None
        array_dir = self.root / array
        layout = self._layouts.get(array)
        if layout is None:
            meta_path: Path | str = array_dir / "zarr.json"
            try:
                if self.remote is not None:
                    meta_path = self.remote.url_of(f"{array}/zarr.json")
                    # one range request: over the cap is seen, the rest is never fetched
                    raw = self.remote.cat(f"{array}/zarr.json", limit=_MAX_META_BYTES + 1)
                else:
                    with open(meta_path, "rb") as fh:
                        raw = fh.read(_MAX_META_BYTES + 1)  # + 1: over the cap is seen, the rest is never read
            except FileNotFoundError:
                raise CorruptDataError(f"tensor {info.name!r}: {meta_path} is missing") from None
            if len(raw) > _MAX_META_BYTES:
                raise CorruptDataError(f"tensor {info.name!r}: {meta_path} is over {_MAX_META_BYTES >> 20} MiB")
            meta = parse_json(raw, f"tensor {info.name!r}: {meta_path}")
            layout = _Layout.from_metadata(meta, f"tensor {info.name!r}: {meta_path}")
            if layout.shape != info.shape or layout.dtype != info.dtype:
                raise CorruptDataError(
                    f"tensor {info.name!r}: {meta_path} says {layout.dtype}{list(layout.shape)}, "
                    f"the manifest says {info.dtype}{list(info.shape)}"
                )
            self._layouts[array] = layout
        return array_dir, layout

    def check_metadata(self, info: TensorInfo) -> None:
        """The array's ``zarr.json`` is fisherstore's layout of the manifest's dtype and shape, every shard is there.

        On an object store the same checks run: ``zarr.json`` through the same
        capped parse, and each shard's existence by a size request.
        """
        array_dir, layout = self._layout(info)
        shards = -(-layout.num_chunks // layout.chunks_per_shard)
        for shard in range(shards):
            if self.remote is not None:
                key = f"{array_dir.name}/{layout.shard_key(shard)}"
                try:
                    self.remote.size(key)
                except FileNotFoundError:
                    raise CorruptDataError(
                        f"tensor {info.name!r}: shard object {self.remote.url_of(key)} is missing; the store is damaged"
                    ) from None
                continue
            path = array_dir / layout.shard_key(shard)
            if not path.is_file():
                raise CorruptDataError(f"tensor {info.name!r}: shard file {path} is missing; the store is damaged")

    def byte_span(self, info: TensorInfo) -> tuple[Path, int] | None:
        """Where an uncompressed tensor held in one shard lies raw: its chunks are the tensor's bytes in order.

        That holds for every such array this module writes; the shard index
        is checked, so a shard laid out otherwise is read chunk by chunk.
        """
        array_dir, layout = self._layout(info)
        if self.remote is not None:  # objects are read by range requests, never mapped
            return None
        if layout.codec is not None or not 0 < layout.num_chunks <= layout.chunks_per_shard:
            return None
        if info.name not in self._spans:
            path = array_dir / layout.shard_key(0)
            where = f"tensor {info.name!r}: shard file {path}"
            with _open_shard(path, where) as fd:
                index, data_end = _read_index(fd, layout, where)
            n = layout.num_chunks
            expected = np.stack(
                [np.arange(n, dtype="<u8") * layout.chunk_bytes, np.full(n, layout.chunk_bytes, dtype="<u8")], axis=1
            )
            contiguous = np.array_equal(index[:n], expected) and n * layout.chunk_bytes <= data_end
            self._spans[info.name] = (path, 0) if contiguous else None
        return self._spans[info.name]

    def read_rows(self, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
        import torch

        out = torch.empty((stop - start) * rows_of(info.shape)[1] * info.itemsize, dtype=torch.uint8)
        self.read_rows_into(info, start, stop, out.numpy().data)
        return out.view(info.torch_dtype).reshape(rows_shape(info.shape, start, stop))

    def read_rows_into(self, info: TensorInfo, start: int, stop: int, out: memoryview) -> None:
        array_dir, layout = self._layout(info)
        check_rows(info.name, start, stop, rows_of(info.shape)[0])
        row_bytes, cr, cps = layout.row_bytes, layout.chunk_rows, layout.chunks_per_shard
        if len(out) != (stop - start) * row_bytes:
            raise BadInputError(
                f"{info.name!r}: a buffer of {len(out)} bytes cannot hold rows [{start}, {stop})", param="out"
            )
        if len(out):
            first, last = start // cr, (stop - 1) // cr
            for shard in range(first // cps, last // cps + 1):
                chunks = range(max(first, shard * cps), min(last, shard * cps + cps - 1) + 1)
                if self.remote is not None:
                    key = f"{array_dir.name}/{layout.shard_key(shard)}"
                    self._read_object_shard(info.name, key, layout, shard, chunks, start, stop, out)
                    continue
                self._read_shard(
                    info.name, array_dir / layout.shard_key(shard), layout, shard, chunks, start, stop, out
                )

    def _object_index(self, key: str, layout: _Layout, where: str) -> tuple[np.ndarray, int]:
        """A shard object's index (one size request, one range request), cached for the backend's lifetime."""
        cached = self._indexes.get(key)
        if cached is None:
            assert self.remote is not None
            try:
                size = self.remote.size(key)
            except FileNotFoundError:
                raise CorruptDataError(f"{where} is missing; the store is damaged: restore or re-create it") from None
            data_end = size - layout.index_bytes
            raw = self.remote.read(key, data_end, size, where) if data_end >= 0 else b""
            if not raw or google_crc32c.value(bytes(raw[:-4])) != int.from_bytes(raw[-4:], "little"):
                raise CorruptDataError(f"{where}: shard index is truncated or its crc32c does not match")
            cached = self._indexes[key] = (np.frombuffer(raw[:-4], dtype="<u8").reshape(-1, 2), data_end)
        return cached

    def _read_object_shard(
        self, name: str, key: str, layout: _Layout, shard: int, chunks: range, start: int, stop: int, out: memoryview
    ) -> None:
        """:meth:`_read_shard` on an object store: the index, then only the byte ranges of the rows asked for.

        Ranges go out :data:`_RANGES_AT_ONCE` at a time (concurrently where the
        filesystem can), so memory stays the rows asked for plus that many
        compressed chunks.
        """
        assert self.remote is not None
        where = f"tensor {name!r}: shard object {self.remote.url_of(key)}"
        index, data_end = self._object_index(key, layout, where)
        codec = layout.codec
        jobs: list[tuple[int, memoryview, int, tuple[int, int]]] = []
        for chunk, dst, skip, offset, nbytes in _chunk_spans(
            index, data_end, layout, shard, chunks, start, stop, out, where
        ):
            if codec is None:  # only the rows' bytes
                jobs.append((chunk, dst, skip, (offset + skip, offset + skip + len(dst))))
            else:
                jobs.append((chunk, dst, skip, (offset, offset + nbytes)))
        for i in range(0, len(jobs), _RANGES_AT_ONCE):
            batch = jobs[i : i + _RANGES_AT_ONCE]
            for (chunk, dst, skip, _), blob in zip(
                batch, self.remote.read_ranges(key, [job[3] for job in batch], where), strict=True
            ):
                if codec is None:
                    dst[:] = blob
                else:
                    _decode_chunk(codec.codec, blob, dst, skip, layout.chunk_bytes, f"{where}: chunk {chunk}")

    @staticmethod
    def _read_shard(
        name: str, path: Path, layout: _Layout, shard: int, chunks: range, start: int, stop: int, out: memoryview
    ) -> None:
        """Copy rows ``[start, stop)`` ∩ ``chunks`` of one shard into ``out`` (whose row 0 is ``start``)."""
        where = f"tensor {name!r}: shard file {path}"
        with _open_shard(path, where) as fd:
            index, data_end = _read_index(fd, layout, where)
            codec = layout.codec
            for chunk, dst, skip, offset, nbytes in _chunk_spans(
                index, data_end, layout, shard, chunks, start, stop, out, where
            ):
                if codec is None:
                    pread_into(fd, dst, offset + skip, where)
                else:
                    blob = np.empty(nbytes, dtype=np.uint8).data  # not zero-filled: pread fills it
                    pread_into(fd, blob, offset, f"{where}: chunk {chunk}")
                    _decode_chunk(codec.codec, blob, dst, skip, layout.chunk_bytes, f"{where}: chunk {chunk}")


def _chunk_spans(
    index: np.ndarray,
    data_end: int,
    layout: _Layout,
    shard: int,
    chunks: range,
    start: int,
    stop: int,
    out: memoryview,
    where: str,
) -> Iterator[tuple[int, memoryview, int, int, int]]:
    """Where rows ``[start, stop)`` of each of ``chunks`` go in ``out`` and where the chunk lies in its shard.

    Never-written chunks are filled here (with the fill value, zeros); a chunk
    whose index entry points outside the shard's data is CorruptDataError.
    Yields ``(chunk, dst, skip, offset, nbytes)``: ``dst`` the slice of ``out``,
    ``skip`` the bytes of the chunk before its first wanted row.
    """
    row_bytes, cr = layout.row_bytes, layout.chunk_rows
    for chunk in chunks:
        offset, nbytes = (int(x) for x in index[chunk - shard * layout.chunks_per_shard])
        lo, hi = max(start, chunk * cr), min(stop, (chunk + 1) * cr)
        dst = out[(lo - start) * row_bytes : (hi - start) * row_bytes]
        skip = (lo - chunk * cr) * row_bytes
        if offset == nbytes == _EMPTY:
            dst[:] = bytes(len(dst))  # never-written chunk: the fill value
        elif offset + nbytes > data_end or (layout.codec is None and nbytes != layout.chunk_bytes):
            raise CorruptDataError(f"{where}: chunk {chunk} at ({offset}, {nbytes}) lies outside the shard's data")
        else:
            yield chunk, dst, skip, offset, nbytes


def _decode_chunk(codec: str, blob: Buffer, dst: memoryview, skip: int, chunk_bytes: int, where: str) -> None:
    """Decompress one chunk into ``dst`` (its rows from byte ``skip``): in place when whole, else via scratch."""
    whole = len(dst) == chunk_bytes
    scratch = dst if whole else memoryview(bytearray(chunk_bytes))
    try:
        _decode_into(codec, blob, scratch)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise CorruptDataError(f"{where} does not decompress ({exc})") from None
    if not whole:
        dst[:] = scratch[skip : skip + len(dst)]


@contextlib.contextmanager
def _open_shard(path: Path, where: str) -> Iterator[int]:
    """A shard file's descriptor; a missing shard is :class:`CorruptDataError`."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise CorruptDataError(f"{where} is missing; the store is damaged: restore or re-create it") from None
    try:
        yield fd
    finally:
        os.close(fd)


def _read_index(fd: int, layout: _Layout, where: str) -> tuple[np.ndarray, int]:
    """A shard's ``(offset, nbytes)`` index rows, checked against their crc32c, and where its data ends."""
    data_end = os.fstat(fd).st_size - layout.index_bytes
    raw = pread_bytes(fd, layout.index_bytes, data_end, where) if data_end >= 0 else b""
    if not raw or google_crc32c.value(bytes(raw[:-4])) != int.from_bytes(raw[-4:], "little"):
        raise CorruptDataError(f"{where}: shard index is truncated or its crc32c does not match")
    return np.frombuffer(raw[:-4], dtype="<u8").reshape(-1, 2), data_end
