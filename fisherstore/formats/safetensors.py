"""safetensors backend: one shard file per layer group plus an HF-style index.

Shards are ordinary safetensors files (``fisher-00001-of-00008.safetensors``)
and ``<prefix>.safetensors.index.json`` holds ``{"metadata": {"total_size"},
"weight_map"}``, so ``safetensors.safe_open`` and HF tooling read a store
without fisherstore.  Headers are written first (every group's specs are
planned), then tensor bytes stream in with ``pwrite``; the shard appears
under its final name only on commit.

This module also parses and validates headers for bare ``.safetensors``
files (:class:`SafetensorsFileSource`), refusing the header lies the
safetensors spec forbids: oversize headers, holes, overlaps, offsets past the
end, sizes that disagree with dtype × shape.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._io import TMP_PREFIX, fsync, fsync_dir, pread_bytes, pread_tensor, preallocate, write_all, write_json_atomic
from ..errors import BadInputError, CorruptDataError
from ..manifest import DTYPES, ITEMSIZES, GroupInfo, TensorInfo, TensorSpec, parse_json
from ..naming import parse_name, validate_name
from ..storage import RemoteFile
from .base import Backend, Buffer, GroupSink, check_rows, rows_of, rows_shape

if TYPE_CHECKING:
    import torch

__all__ = ["SHARD_METADATA", "ST_DTYPES", "SafetensorsBackend", "SafetensorsFileSource", "read_header"]

#: safetensors dtype codes ↔ manifest dtype names.
ST_DTYPES: dict[str, str] = {
    "BF16": "bfloat16",
    "F16": "float16",
    "F32": "float32",
    "F64": "float64",
    "I8": "int8",
    "U8": "uint8",
    "I16": "int16",
    "I32": "int32",
    "I64": "int64",
    "BOOL": "bool",
}
_CODES = {v: k for k, v in ST_DTYPES.items()}
_HEADER_CAP = 100_000_000  # the safetensors spec's cap on the JSON header
#: The ``__metadata__`` of every shard this backend writes (``fisherstore verify`` expects exactly this).
SHARD_METADATA = {"format": "pt", "producer": "fisherstore"}
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")


def _uint(value: Any) -> bool:
    """Whether a header value is a u64, as the spec types shapes and offsets (JSON ``true`` is no integer)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 64


def _size(fd: int | RemoteFile) -> int:
    return fd.size if isinstance(fd, RemoteFile) else os.fstat(fd).st_size


def _pread(fd: int | RemoteFile, nbytes: int, offset: int, where: str) -> bytes | bytearray:
    """``pread_bytes`` of a file descriptor, or a range read of an object (its header: one or two requests)."""
    return fd.pread(nbytes, offset, where) if isinstance(fd, RemoteFile) else pread_bytes(fd, nbytes, offset, where)


def read_header(
    fd: int | RemoteFile, where: str
) -> tuple[int, dict[str, tuple[str, tuple[int, ...], int, int]], dict[str, str]]:
    """Parse and validate a safetensors header (of a file descriptor, or of an object read by ranges).

    Returns ``(data_start, entries, metadata)`` where ``entries`` maps a name to
    ``(dtype name, shape, absolute begin, absolute end)``.  Raises
    :class:`CorruptDataError` for anything the spec forbids.
    """
    size = _size(fd)
    if size < 8:
        raise CorruptDataError(f"{where}: {size} bytes is too short for a safetensors file")
    n = int.from_bytes(_pread(fd, 8, 0, where), "little", signed=True)
    if n <= 0 or n > _HEADER_CAP or 8 + n > size:
        raise CorruptDataError(
            f"{where}: header length {n} is invalid for a {size}-byte file (truncated or not safetensors)"
        )
    header = parse_json(_pread(fd, n, 8, where), f"{where}: header")
    if not isinstance(header, dict):
        raise CorruptDataError(f"{where}: header must be a JSON object")
    metadata = header.pop("__metadata__", {}) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CorruptDataError(f"{where}: __metadata__ must map strings to strings")
    start = 8 + n
    entries = {}
    spans = []
    for name, e in header.items():
        try:
            validate_name(name)
        except BadInputError as exc:
            raise CorruptDataError(f"{where}: {exc}") from None
        if not isinstance(e, dict):
            raise CorruptDataError(f"{where}: tensor {name!r} has entry {e!r:.100}, expected an object")
        code = e.get("dtype")
        if not isinstance(code, str) or code not in ST_DTYPES:  # a list or object is no dict key
            raise CorruptDataError(
                f"{where}: tensor {name!r} has an unknown dtype {code!r:.50}: fisherstore stores only "
                f"{', '.join(ST_DTYPES)}"
            )
        shape, offs = e.get("shape"), e.get("data_offsets")
        if not isinstance(shape, list) or not all(_uint(d) for d in shape):
            raise CorruptDataError(f"{where}: tensor {name!r} has a bad shape {shape!r:.200}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(_uint(o) for o in offs) and offs[0] <= offs[1]):
            raise CorruptDataError(f"{where}: tensor {name!r} has bad data_offsets {offs!r:.200}")
        dtype = ST_DTYPES[e["dtype"]]
        expected = math.prod(shape) * ITEMSIZES[dtype]
        if offs[1] - offs[0] != expected:
            raise CorruptDataError(
                f"{where}: tensor {name!r} spans {offs[1] - offs[0]} bytes but {e['dtype']}{shape} needs {expected}"
            )
        entries[name] = (dtype, tuple(shape), start + offs[0], start + offs[1])
        spans.append((offs[0], offs[1], name))
    pos = 0
    for begin, end, name in sorted(spans):
        if begin != pos:
            kind = "overlaps the previous tensor" if begin < pos else f"leaves a hole of {begin - pos} bytes"
            raise CorruptDataError(f"{where}: tensor {name!r} {kind}")
        pos = end
    if start + pos != size:
        raise CorruptDataError(
            f"{where}: header describes {start + pos} bytes but the file has {size} (truncated or padded)"
        )
    return start, entries, metadata


class _ShardSink(GroupSink):
    """Writes one shard: header first, then each tensor's bytes at its offset.

    On an object store the shard is one object streamed out in order (a
    multipart upload) under its final name, complete when :meth:`commit`
    closes it; only the manifest, PUT afterwards, names it.
    """

    def __init__(self, backend: SafetensorsBackend, group: GroupInfo, num_groups: int) -> None:
        self.remote = backend.remote
        self.fh: Any = None
        self.final = backend.root / backend.shard_name(group.index, num_groups)
        self.tmp = backend.root / f"{TMP_PREFIX}{self.final.name}"
        header: dict[str, Any] = {"__metadata__": dict(SHARD_METADATA)}
        pos = 0
        for spec in group.tensors:
            header[spec.name] = {
                "dtype": _CODES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [pos, pos + spec.nbytes],
            }
            pos += spec.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned, as safetensors itself does
        self.data_start = 8 + len(blob)
        self.offsets = {s.name: self.data_start + header[s.name]["data_offsets"][0] for s in group.tensors}
        self.pending = {s.name for s in group.tensors}
        if self.remote is not None:
            self.fd = -1
            self.pos = 0
            self.fh = self.remote.open_write(self.final.name)
            self._write(len(blob).to_bytes(8, "little") + blob, 0)
            return
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            preallocate(self.fd, self.data_start + pos, self.final)
            write_all(self.fd, len(blob).to_bytes(8, "little") + blob, 0, self.final)
        except BaseException:  # a full disk: the writer never gets this sink to abort, so remove it here
            self.abort()
            raise

    def _write(self, data: Buffer, pos: int) -> int:
        """Write ``data`` at ``pos`` (an object: appended, tensors come in header order); the position after."""
        if self.remote is None:
            return write_all(self.fd, data, pos, self.final)
        if pos != self.pos:
            raise CorruptDataError(f"{self.final.name}: objects are written in order; got offset {pos}, at {self.pos}")
        with self.remote.errors(self.final.name):
            self.fh.write(data)
        self.pos += len(memoryview(data).cast("B"))
        return self.pos

    def write_tensor(self, spec: TensorSpec, pieces: Iterable[Buffer], *, held: int = 0) -> dict[str, Any]:
        begin = self.offsets[spec.name]
        pos = begin
        for piece in pieces:
            pos = self._write(piece, pos)
        if pos - begin != spec.nbytes:
            raise CorruptDataError(f"tensor {spec.name!r}: got {pos - begin} bytes, expected {spec.nbytes}")
        self.pending.discard(spec.name)
        return {"file": self.final.name, "offsets": [begin, pos]}

    def commit(self) -> None:
        if self.pending:
            raise CorruptDataError(f"{self.final.name}: tensors never written: {sorted(self.pending)}")
        if self.remote is not None:
            fh, self.fh = self.fh, None
            with self.remote.errors(self.final.name):
                fh.close()  # completes the upload
            return
        fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        os.replace(self.tmp, self.final)
        fsync_dir(self.final.parent)

    def abort(self) -> None:
        if self.remote is not None:
            fh, self.fh = self.fh, None
            if fh is not None and hasattr(fh, "discard"):
                fh.discard()  # the upload is never completed: no object appears
            return
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.tmp.unlink(missing_ok=True)


class _ShardReader:
    """Open shard files, validated once against their own headers (thread-safe)."""

    def __init__(self) -> None:
        self._fds: dict[Path, tuple[int, dict[str, tuple[str, tuple[int, ...], int, int]]]] = {}
        self._objects: dict[str, tuple[RemoteFile, dict[str, tuple[str, tuple[int, ...], int, int]]]] = {}
        self._lock = threading.Lock()

    def object_entries(self, obj: RemoteFile) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
        """An object's header entries: its size, then its header by range requests (once per object)."""
        with self._lock:
            key = str(obj)
            if key not in self._objects:
                try:
                    self._objects[key] = (obj, read_header(obj, key)[1])
                except FileNotFoundError:
                    raise CorruptDataError(f"{key}: shard object is missing") from None
            return self._objects[key][1]

    def object_entry(self, obj: RemoteFile, name: str, dtype: str, shape: tuple[int, ...]) -> int:
        """A tensor's absolute data offset in an object, after checking its header agrees with the manifest."""
        entry = self.object_entries(obj).get(name)
        if entry is None or entry[0] != dtype or entry[1] != shape:
            raise CorruptDataError(
                f"{obj}: header entry for {name!r} is {entry and entry[:2]}, manifest says {(dtype, shape)}"
            )
        return entry[2]

    def read_object(
        self, obj: RemoteFile, name: str, dtype: str, shape: tuple[int, ...], start: int, stop: int
    ) -> torch.Tensor:
        """Rows of a tensor in an object: one range request for exactly their bytes."""
        import torch

        nrows, per_row = rows_of(shape)
        check_rows(name, start, stop, nrows)
        row_bytes = per_row * ITEMSIZES[dtype]
        begin = self.object_entry(obj, name, dtype, shape) + start * row_bytes
        data = bytearray(obj.remote.read(obj.rel, begin, begin + (stop - start) * row_bytes, f"{obj} tensor {name!r}"))
        raw = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        return raw.view(DTYPES[dtype]).reshape(rows_shape(shape, start, stop))

    def entries(self, path: Path) -> tuple[int, dict[str, tuple[str, tuple[int, ...], int, int]]]:
        with self._lock:
            if path not in self._fds:
                try:
                    fd = os.open(path, os.O_RDONLY)
                except FileNotFoundError:
                    raise CorruptDataError(f"{path}: shard file is missing") from None
                try:
                    self._fds[path] = (fd, read_header(fd, str(path))[1])
                except BaseException:
                    os.close(fd)
                    raise
            return self._fds[path]

    def entry(self, path: Path, name: str, dtype: str, shape: tuple[int, ...]) -> tuple[int, int]:
        """``(fd, absolute data offset)`` of a tensor, after checking the shard's header agrees with the manifest."""
        fd, entries = self.entries(path)
        entry = entries.get(name)
        if entry is None or entry[0] != dtype or entry[1] != shape:
            raise CorruptDataError(
                f"{path}: header entry for {name!r} is {entry and entry[:2]}, manifest says {(dtype, shape)}"
            )
        return fd, entry[2]

    def read(self, path: Path, name: str, dtype: str, shape: tuple[int, ...], start: int, stop: int) -> torch.Tensor:
        fd, offset = self.entry(path, name, dtype, shape)
        nrows, per_row = rows_of(shape)
        check_rows(name, start, stop, nrows)
        itemsize = ITEMSIZES[dtype]
        raw = pread_tensor(
            fd, (stop - start) * per_row * itemsize, offset + start * per_row * itemsize, f"{path} tensor {name!r}"
        )
        out = raw.view(DTYPES[dtype])
        return out.reshape(rows_shape(shape, start, stop))

    def close(self) -> None:
        with self._lock:
            for fd, _ in self._fds.values():
                os.close(fd)
            self._fds.clear()


class SafetensorsBackend(Backend):
    """A store whose groups are safetensors shards (see module docstring)."""

    name = "safetensors"

    def __init__(self, root: Path, options: dict[str, Any] | None = None) -> None:
        super().__init__(root, options)
        self._reader = _ShardReader()

    @classmethod
    def parse_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        unknown = set(options) - {"prefix"}
        if unknown:
            raise BadInputError(
                f"safetensors backend options are 'prefix'; got unknown {sorted(unknown)}", param="backend_options"
            )
        prefix = options.get("prefix", "fisher")
        if not isinstance(prefix, str) or not _PREFIX_RE.match(prefix):
            raise BadInputError(
                f"safetensors shard prefix {prefix!r} must be 1-64 letters, digits, '_' or '-'", param="prefix"
            )
        return {"prefix": prefix}

    def shard_name(self, index: int, num_groups: int) -> str:
        return f"{self.options['prefix']}-{index + 1:05d}-of-{num_groups:05d}.safetensors"

    @property
    def index_name(self) -> str:
        return f"{self.options['prefix']}.safetensors.index.json"

    def begin_group(self, group: GroupInfo, num_groups: int) -> GroupSink:
        return _ShardSink(self, group, num_groups)

    def _file(self, info: TensorInfo) -> Path:
        name = info.location.get("file")
        if (
            not isinstance(name, str)
            or "/" in name
            or "\\" in name
            or not name.endswith(".safetensors")
            or name.startswith(".")
        ):
            raise CorruptDataError(f"tensor {info.name!r}: manifest location file {name!r} is not a shard name")
        return self.root / name

    def read_rows(self, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
        if self.remote is not None:
            obj = RemoteFile(self.remote, self._file(info).name)
            return self._reader.read_object(obj, info.name, info.dtype, info.shape, start, stop)
        return self._reader.read(self._file(info), info.name, info.dtype, info.shape, start, stop)

    def check_metadata(self, info: TensorInfo) -> None:
        """The tensor's shard (file or object) exists and its header entry has the manifest's dtype and shape."""
        if self.remote is not None:
            self._reader.object_entry(RemoteFile(self.remote, self._file(info).name), info.name, info.dtype, info.shape)
            return
        self._reader.entry(self._file(info), info.name, info.dtype, info.shape)

    def byte_span(self, info: TensorInfo) -> tuple[Path, int] | None:
        if self.remote is not None:  # objects are read by range requests, never mapped
            return None
        path = self._file(info)
        return path, self._reader.entry(path, info.name, info.dtype, info.shape)[1]

    def finalize(self, tensors: dict[str, TensorInfo], groups: tuple[GroupInfo, ...]) -> None:
        index = {
            "metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
            "weight_map": {n: t.location["file"] for n, t in tensors.items()},
        }
        if self.remote is not None:
            self.remote.put_json(self.index_name, index)
            return
        write_json_atomic(self.root / self.index_name, index)

    def close(self) -> None:
        self._reader.close()


class SafetensorsFileSource:
    """A bare ``.safetensors`` file read lazily as a tensor source (no manifest, no checksums)."""

    #: Its bytes always lie raw in the file (:meth:`byte_span`), so nothing is decoded into buffers.
    read_rows_into = None

    def __init__(self, path: Path | RemoteFile) -> None:
        #: An object read by ranges (an URL), else a local file.
        self.object = path if isinstance(path, RemoteFile) else None
        self.path = Path(path.rel if isinstance(path, RemoteFile) else path)
        self._reader = _ShardReader()
        entries = (
            self._reader.object_entries(path) if isinstance(path, RemoteFile) else self._reader.entries(self.path)[1]
        )
        self.infos: dict[str, TensorInfo] = {}
        for name, (dtype, shape, begin, end) in sorted(entries.items(), key=lambda kv: kv[1][2]):
            layer, kind = parse_name(name)
            self.infos[name] = TensorInfo(
                name=name,
                shape=shape,
                dtype=dtype,
                group=0,
                layer=layer,
                kind=kind,
                location={"file": self.path.name, "offsets": [begin, end]},
                checksum="",
                sum=float("nan"),
            )

    def read_rows(self, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
        if self.object is not None:
            return self._reader.read_object(self.object, info.name, info.dtype, info.shape, start, stop)
        return self._reader.read(self.path, info.name, info.dtype, info.shape, start, stop)

    def byte_span(self, info: TensorInfo) -> tuple[Path, int] | None:
        if self.object is not None:
            return None
        return self.path, self._reader.entry(self.path, info.name, info.dtype, info.shape)[1]

    def close(self) -> None:
        self._reader.close()
