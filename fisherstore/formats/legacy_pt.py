"""Reading the legacy ``fisher.pt``: a ``torch.save`` zip archive whose pickle is a dict name → tensor.

:class:`LegacyPtSource` never calls ``torch.load``: the standard library's
:mod:`zipfile` reads the ZIP central directory (ZIP64 included) and nothing
else; the checks a hostile file needs sit on top of it (a capped directory,
stored records only, sizes that agree, records inside the file and not
overlapping each other).  ``data.pkl`` goes through an unpickler that knows
only the handful of globals ``torch.save`` emits for a dict of tensors (and
builds inert placeholders from them), and tensor bytes are read with
``os.pread`` for exactly the rows asked for: each record's data offset comes
from one small read of its local header.  A hostile file can therefore not
run code, and opening a 58 GB file costs a few kilobytes of memory.
Writing is :mod:`fisherstore.formats.legacy_pt_writer`.
"""

from __future__ import annotations

import collections
import io
import itertools
import logging
import math
import os
import pickle
import pickletools
import re
import stat
import struct
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from .._io import pread_bytes, pread_tensor
from ..errors import (
    BadInputError,
    CorruptDataError,
    FisherStoreError,
    StoreNotFoundError,
    TensorNotFoundError,
    UnsafePickleError,
)
from ..manifest import ITEMSIZES, TensorInfo
from ..naming import parse_name, validate_name
from .base import check_rows, rows_of, rows_shape

if TYPE_CHECKING:
    import torch

__all__ = ["STORAGE_CLASS", "LegacyPtSource"]

log = logging.getLogger(__name__)

#: The fields of a ZIP local header (APPNOTE 4.3.7) a reader needs: signature, name and extra-field lengths.
_LOCAL_HEADER = struct.Struct("<I22xHH")
_SIG_LOCAL = 0x04034B50

#: ``data.pkl`` of a dict of even 100k tensors is a few MB; anything far larger is not a fisher.pt.
_MAX_PICKLE = 64 << 20
_MAX_CENTRAL_DIR = 256 << 20

#: torch's legacy storage class for each storable dtype (what ``torch.save`` names in the pickle).
STORAGE_CLASS = {
    "bfloat16": "BFloat16Storage",
    "float16": "HalfStorage",
    "float32": "FloatStorage",
    "float64": "DoubleStorage",
    "int8": "CharStorage",
    "uint8": "ByteStorage",
    "int16": "ShortStorage",
    "int32": "IntStorage",
    "int64": "LongStorage",
    "bool": "BoolStorage",
}
_STORAGE_NAME_RE = re.compile(r"[A-Za-z0-9]+Storage")


class _DirectoryFile(io.FileIO):
    """The archive as :class:`zipfile.ZipFile` reads it, refusing a central directory over the cap.

    ``zipfile`` reads the whole directory with one ``read`` of the size the
    end record declares; a forged size would make it read gigabytes of a big
    file into memory, so a read over :data:`_MAX_CENTRAL_DIR` is refused
    before anything is allocated.  Its other reads are the end records
    (at most 64 KiB).  It shares the reader's descriptor, whose file
    position no other read uses (those are ``pread``).
    """

    def __init__(self, fd: int, path: Path) -> None:
        super().__init__(fd, "rb", closefd=False)
        self.path = path

    def read(self, size: int | None = -1) -> bytes:
        want = os.fstat(self.fileno()).st_size - self.tell() if size is None or size < 0 else size
        if want > _MAX_CENTRAL_DIR:
            raise CorruptDataError(
                f"{self.path}: the ZIP central directory is {want} bytes, over the "
                f"{_MAX_CENTRAL_DIR >> 20} MiB a fisher.pt needs"
            )
        return super().read(size)


class _StorageType(NamedTuple):
    """Inert stand-in for a ``torch.*Storage`` class named in the pickle."""

    qualname: str
    dtype: str  # manifest dtype name


class _Dtype(NamedTuple):
    """Inert stand-in for a ``torch.<dtype>`` global named in the pickle."""

    name: str


class _StorageRef(NamedTuple):
    """A storage the pickle refers to: ``data/<key>`` in the archive, ``numel`` elements of ``dtype``."""

    key: str
    dtype: str  # manifest dtype name
    numel: int


class _TensorRef(NamedTuple):
    """What the pickle rebuilds a tensor into: a view (offset, shape, stride) of a storage."""

    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _describe(value: Any) -> str:
    """How a pickled value is named in error messages."""
    if isinstance(value, _TensorRef):
        return "tensor"
    if isinstance(value, _StorageRef):
        return "a bare storage"
    if isinstance(value, _Dtype):
        return "a dtype"
    return type(value).__name__


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise CorruptDataError(f"{what} must be a tuple of non-negative integers, got {value!r}")
    return tuple(value)


def _is_contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    if 0 in shape:
        return True
    expected = 1
    for d, s in zip(reversed(shape), reversed(stride)):
        if d != 1 and s != expected:
            return False
        expected *= d
    return True


#: Pickle opcodes torch.save's protocol-2 pickles of a dict of tensors use, plus harmless plain-data ones.
#: Everything else (object construction, extension codes, out-of-band buffers, text opcodes) is refused.
_OPCODES = frozenset(
    [
        "PROTO",
        "FRAME",
        "STOP",
        "MARK",
        "POP",
        "POP_MARK",
        "DUP",
        "NONE",
        "NEWTRUE",
        "NEWFALSE",
        "BININT",
        "BININT1",
        "BININT2",
        "LONG1",
        "BINFLOAT",
        "BINUNICODE",
        "SHORT_BINUNICODE",
        "BINUNICODE8",
        "SHORT_BINSTRING",
        "BINSTRING",
        "SHORT_BINBYTES",
        "BINBYTES",
        "EMPTY_DICT",
        "DICT",
        "SETITEM",
        "SETITEMS",
        "EMPTY_LIST",
        "LIST",
        "APPEND",
        "APPENDS",
        "EMPTY_TUPLE",
        "TUPLE",
        "TUPLE1",
        "TUPLE2",
        "TUPLE3",
        "BINPUT",
        "LONG_BINPUT",
        "MEMOIZE",
        "BINGET",
        "LONG_BINGET",
        "GLOBAL",
        "STACK_GLOBAL",
        "REDUCE",
        "BUILD",
        "BINPERSID",
    ]
)


def _check_opcodes(data: bytes | bytearray, path: Path) -> None:
    """Scan the pickle without running it: only :data:`_OPCODES`, memo indices in sequence.

    The C unpickler sizes its memo table by the largest index it is given, so
    one forged ``LONG_BINPUT 4000000000`` would allocate gigabytes; Python's
    pickler numbers memo entries 0, 1, 2, ... so anything else is refused.
    """
    puts = 0
    try:
        for op, arg, pos in pickletools.genops(data):
            if op.name not in _OPCODES:
                raise UnsafePickleError(
                    f"{path}: refusing pickle opcode {op.name} at byte {pos} of data.pkl: "
                    "a dict of tensors never needs it"
                )
            if op.name in ("BINPUT", "LONG_BINPUT") and isinstance(arg, int):
                if arg > puts:
                    raise CorruptDataError(f"{path}: data.pkl stores memo entry {arg} out of sequence (next is {puts})")
                puts += arg == puts
            elif op.name == "MEMOIZE":
                puts += 1
    except FisherStoreError:
        raise
    except Exception as exc:  # truncated argument, unknown opcode byte, missing STOP
        raise CorruptDataError(f"{path}: data.pkl is not a valid pickle ({exc})") from None


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles ``data.pkl`` of a dict of tensors into inert placeholders, refusing any other global.

    ``find_class`` is the only way a pickle reaches a callable, so answering it
    from a fixed table of our own functions means nothing outside this module
    ever runs; the rebuild functions only validate and record their arguments.
    """

    def __init__(self, data: bytes | bytearray, path: Path) -> None:
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self._path = path
        self._allowed: dict[tuple[str, str], Any] = {
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor_v2,
            ("torch._utils", "_rebuild_tensor"): self._rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): self._rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): self._rebuild_parameter,
            ("torch", "Size"): self._size,
            ("torch", "UntypedStorage"): _StorageType("torch.UntypedStorage", "uint8"),
            ("torch.storage", "UntypedStorage"): _StorageType("torch.storage.UntypedStorage", "uint8"),
        }
        for name in ITEMSIZES:
            self._allowed[("torch", name)] = _Dtype(name)
            for module in ("torch", "torch.cuda"):  # torch < 1.12 named CUDA tensors' storages torch.cuda.*
                cls = STORAGE_CLASS[name]
                self._allowed[(module, cls)] = _StorageType(f"{module}.{cls}", name)

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except (KeyError, TypeError):
            pass
        if (module, name) == ("torch._utils", "_rebuild_tensor_v3"):  # torch's rebuild for dtypes without a storage
            raise BadInputError(  # class (uint16/32/64, float8, ...), none of which fisherstore stores
                f"{self._path}: holds a tensor of a dtype fisherstore cannot store (it needs _rebuild_tensor_v3; "
                f"supported: {', '.join(ITEMSIZES)}); convert the tensors before saving"
            )
        if module in ("torch", "torch.cuda") and isinstance(name, str) and _STORAGE_NAME_RE.fullmatch(name):
            raise BadInputError(
                f"{self._path}: holds a tensor of storage type {module}.{name}, whose dtype fisherstore cannot store "
                f"(supported: {', '.join(ITEMSIZES)}); convert the tensors before saving"
            )
        raise UnsafePickleError(
            f"{self._path}: refusing to unpickle global '{module}.{name}': a fisher.pt may only hold a dict of "
            "plain tensors; if you trust the file, load it with torch.load and re-save {name: tensor} with torch.save"
        )

    def persistent_load(self, pid: Any) -> _StorageRef:
        if isinstance(pid, tuple) and pid and isinstance(pid[0], bytes):
            pid = (pid[0].decode("ascii", "replace"), *pid[1:])
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CorruptDataError(f"{self._path}: unexpected persistent id {pid!r:.200} in data.pkl")
        _, storage_type, key, location, numel = pid
        if isinstance(key, bytes):
            key = key.decode("ascii", "replace")
        if not isinstance(storage_type, _StorageType):
            raise CorruptDataError(
                f"{self._path}: storage {key!r} has type {storage_type!r:.100}, expected a torch storage class"
            )
        if not isinstance(key, str) or not isinstance(location, (str, bytes)):
            raise CorruptDataError(f"{self._path}: malformed storage reference {pid!r:.200}")
        if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
            raise CorruptDataError(f"{self._path}: storage {key!r} has element count {numel!r}")
        return _StorageRef(key, storage_type.dtype, numel)

    # The callables the pickle may reach.  Their signatures mirror torch._utils.
    def _rebuild_tensor_v2(
        self,
        storage: Any,
        storage_offset: Any,
        size: Any,
        stride: Any,
        requires_grad: Any = False,
        backward_hooks: Any = None,
        metadata: Any = None,
    ) -> _TensorRef:
        return self._rebuild_tensor(storage, storage_offset, size, stride)

    def _rebuild_tensor(self, storage: Any, storage_offset: Any, size: Any, stride: Any) -> _TensorRef:
        if not isinstance(storage, _StorageRef):
            raise CorruptDataError(
                f"{self._path}: a tensor is rebuilt from {_describe(storage)}, expected a storage reference"
            )
        (offset,) = _ints((storage_offset,), f"{self._path}: storage offset")
        shape = _ints(size, f"{self._path}: tensor size")
        strides = _ints(stride, f"{self._path}: tensor stride")
        if len(strides) != len(shape):
            raise CorruptDataError(f"{self._path}: tensor size {shape} and stride {strides} differ in length")
        return _TensorRef(storage, offset, shape, strides)

    def _rebuild_parameter(
        self, data: Any, requires_grad: Any = False, backward_hooks: Any = None, state: Any = None
    ) -> Any:
        return data  # a Parameter is its tensor; the wrapper carries nothing fisherstore keeps

    def _size(self, values: Any = ()) -> tuple[int, ...]:
        return _ints(values, f"{self._path}: torch.Size")


class LegacyPtSource:
    """Read-only, lazy, safe reader of a ``torch.save`` zip whose pickle is a flat dict name → tensor.

    ``infos`` maps each name, in pickle order, to a
    :class:`~fisherstore.manifest.TensorInfo` whose ``location`` is
    ``{"record": <zip entry>, "offset": <absolute offset of the tensor's first byte>}``;
    ``checksum`` is ``""`` and ``sum`` NaN because the format records neither.
    Tensors may share storages and may be views with a storage offset or
    non-contiguous strides; :meth:`read_rows` reads only the bytes the rows span.

    Args:
        path: the ``fisher.pt`` file.

    Raises:
        StoreNotFoundError: no such file.
        UnsafePickleError: the pickle names a global or opcode a dict of tensors never needs.
        CorruptDataError: the archive is damaged or lies about its records.
        BadInputError: the file is not a flat dict of tensors fisherstore can store.
    """

    #: Optional capability of a tensor source (fisherstore.store.TensorSource): none, torch gathers strided views.
    read_rows_into = None

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._fd: int | None = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            raise StoreNotFoundError(f"{self.path}: no such file") from None
        self._strides: dict[str, tuple[int, ...]] = {}
        try:
            st = os.fstat(self._fd)
            if not stat.S_ISREG(st.st_mode):
                raise BadInputError(f"{self.path} is not a regular file, expected a torch.save zip file (fisher.pt)")
            self._size = st.st_size
            self.infos: dict[str, TensorInfo] = self._load()
        except BaseException:
            self.close()
            raise
        log.debug("%s: %d tensors (prefix %r)", self.path, len(self.infos), self.prefix)

    # -- low-level reads -------------------------------------------------------------------
    def _pread(self, offset: int, n: int, what: str) -> bytearray:
        return pread_bytes(self._open_fd(), n, offset, f"{self.path}, {what}")  # no copy: data.pkl may be 64 MiB

    def _open_fd(self) -> int:
        if self._fd is None:
            raise BadInputError(f"{self.path}: reader is closed")
        return self._fd

    # -- ZIP directory ---------------------------------------------------------------------
    def _central_directory(self) -> tuple[int, dict[str, zipfile.ZipInfo]]:
        """Read the ZIP (ZIP64) central directory with :mod:`zipfile`: (directory offset, entries by name).

        The directory offset bounds every record's data.  Stored records must
        say the same size twice; a name listed twice is refused.
        """
        path = self.path
        if self._size == 0:
            raise CorruptDataError(f"{path}: file is empty")
        head = self._pread(0, min(self._size, 512), "the file header")
        if not head.startswith(b"PK\x03\x04"):
            if head[:1] == b"\x80" or head[257:262] == b"ustar":
                raise BadInputError(
                    f"{path} is a legacy (pre-1.6, non-zip) torch file, which cannot be read lazily or safely; "
                    "re-save it with a recent torch (torch.save) first"
                )
            raise BadInputError(f"{path}: not a torch.save zip archive (it does not start with a ZIP local header)")
        try:
            with (
                _DirectoryFile(self._open_fd(), path) as fh,
                zipfile.ZipFile(fh) as zf,
            ):
                limit, listed = zf.start_dir, zf.infolist()
        except (FisherStoreError, OSError):
            raise
        except Exception as exc:  # BadZipFile, or what zipfile lets escape on damaged bytes (UnicodeDecodeError, ...)
            raise CorruptDataError(
                f"{path}: the ZIP central directory is damaged or missing ({type(exc).__name__}: {exc}); "
                "the file is truncated or not a zip"
            ) from None
        out: dict[str, zipfile.ZipInfo] = {}
        for entry in listed:
            name = entry.filename
            if entry.volume:
                raise BadInputError(f"{path}: multi-disk zip archives are not supported")
            if name in out:
                raise CorruptDataError(f"{path}: record {name!r} is listed twice in the central directory")
            if entry.compress_type == zipfile.ZIP_STORED and entry.compress_size != entry.file_size:
                raise CorruptDataError(
                    f"{path}: record {name!r} is stored but its sizes differ "
                    f"({entry.compress_size} vs {entry.file_size})"
                )
            out[name] = entry
        return limit, out

    def _data_offset(self, entry: zipfile.ZipInfo, limit: int) -> int:
        """Absolute offset of a record's first data byte (one read of its local header), checked to lie in the file."""
        path, name = self.path, entry.filename
        if entry.compress_type != zipfile.ZIP_STORED:
            raise BadInputError(
                f"{path}: record {name!r} is compressed (method {entry.compress_type}); fisherstore reads only stored "
                "(uncompressed) records, as torch.save writes them: re-save the tensors with torch.save"
            )
        if entry.flag_bits & 1:
            raise BadInputError(f"{path}: record {name!r} is encrypted")
        if not 0 <= entry.header_offset <= limit - _LOCAL_HEADER.size:
            raise CorruptDataError(
                f"{path}: record {name!r} has its header at byte {entry.header_offset}, outside the file"
            )
        sig, nlen, elen = _LOCAL_HEADER.unpack(
            self._pread(entry.header_offset, _LOCAL_HEADER.size, f"the header of {name!r}")
        )
        if sig != _SIG_LOCAL:
            raise CorruptDataError(f"{path}: no ZIP local header at byte {entry.header_offset} for record {name!r}")
        start = entry.header_offset + _LOCAL_HEADER.size + nlen + elen
        if start + entry.file_size > limit:
            raise CorruptDataError(
                f"{path}: record {name!r} ({entry.file_size} bytes at {start}) points outside the file data "
                f"(which ends at {limit})"
            )
        return start

    def _record(self, entry: zipfile.ZipInfo, limit: int, cap: int) -> bytearray:
        if entry.file_size > cap:
            raise BadInputError(
                f"{self.path}: record {entry.filename!r} is {entry.file_size} bytes, "
                f"over the {cap >> 20} MiB a fisher.pt needs"
            )
        return self._pread(self._data_offset(entry, limit), entry.file_size, f"record {entry.filename!r}")

    # -- the pickle ------------------------------------------------------------------------
    def _load(self) -> dict[str, TensorInfo]:
        limit, entries = self._central_directory()
        obj = self._unpickle(entries, limit)
        if not isinstance(obj, dict):
            raise BadInputError(f"{self.path} holds {_describe(obj)}, expected a dict name -> tensor")
        storages: dict[str, tuple[_StorageRef, int]] = {}
        infos = {name: self._info(name, value, storages, entries, limit) for name, value in obj.items()}
        self._check_disjoint(storages)
        return infos

    def _check_disjoint(self, storages: dict[str, tuple[_StorageRef, int]]) -> None:
        """Refuse storages whose bytes overlap: entries sharing data would let a small file claim huge tensors."""
        spans = sorted((base, base + ref.numel * ITEMSIZES[ref.dtype], key) for key, (ref, base) in storages.items())
        for (_, end, key), (start, _, other) in itertools.pairwise(spans):
            if start < end:
                raise CorruptDataError(
                    f"{self.path}: the bytes of storages {key!r} and {other!r} overlap (at byte {start}); "
                    "torch.save never shares a record's bytes"
                )

    def _unpickle(self, entries: dict[str, zipfile.ZipInfo], limit: int) -> Any:
        """Find ``<prefix>/data.pkl``, check the archive is a little-endian tensor archive, unpickle it safely."""
        path = self.path
        pickles = [n for n in entries if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise BadInputError(
                f"{path}: expected one data.pkl in the archive, found {len(pickles)}; not a torch.save file"
            )
        self.prefix = pickles[0][: -len("data.pkl")]
        if self.prefix + "constants.pkl" in entries:
            raise BadInputError(f"{path} is a TorchScript archive (torch.jit.save), not a dict of tensors")
        byteorder = entries.get(self.prefix + "byteorder")
        if byteorder is not None and self._record(byteorder, limit, 16) != b"little":
            raise BadInputError(f"{path} was saved on a big-endian machine; re-save it on a little-endian one")
        data = self._record(entries[pickles[0]], limit, _MAX_PICKLE)
        _check_opcodes(data, path)
        try:
            return _RestrictedUnpickler(data, path).load()
        except FisherStoreError:
            raise
        except Exception as exc:  # any failure to parse untrusted bytes means the pickle is damaged
            raise CorruptDataError(
                f"{path}: {pickles[0]} is not a valid tensor pickle ({type(exc).__name__}: {exc})"
            ) from None

    def _info(
        self,
        name: Any,
        value: Any,
        storages: dict[str, tuple[_StorageRef, int]],
        entries: dict[str, zipfile.ZipInfo],
        limit: int,
    ) -> TensorInfo:
        """Check one dict item of the pickle and describe where its bytes are."""
        path = self.path
        if not isinstance(name, str):
            raise BadInputError(
                f"{path} holds a dict with key {name!r} ({type(name).__name__}), expected tensor names (strings)"
            )
        if not isinstance(value, _TensorRef):
            raise BadInputError(f"{path} holds a dict whose value for {name!r} is {_describe(value)}, expected tensors")
        try:
            validate_name(name)
        except BadInputError as exc:
            raise BadInputError(f"{path}: {exc}") from None
        ref = value.storage
        record, base = self._storage(ref, storages, entries, limit)
        numel = math.prod(value.shape)
        if numel and value.offset + sum((d - 1) * s for d, s in zip(value.shape, value.stride)) >= ref.numel:
            raise CorruptDataError(
                f"{path}: tensor {name!r} (offset {value.offset}, size {value.shape}, stride {value.stride}) "
                f"reaches past its storage of {ref.numel} elements"
            )
        if numel > ref.numel:  # stride-0 views (expand) would let a small file claim huge tensors
            raise BadInputError(
                f"{path}: tensor {name!r} has {numel} elements but its storage only {ref.numel} (an expanded view); "
                "save it with .contiguous() first"
            )
        if not _is_contiguous(value.shape, value.stride):
            self._strides[name] = value.stride
        layer, kind = parse_name(name)
        return TensorInfo(
            name=name,
            shape=value.shape,
            dtype=ref.dtype,
            group=0,
            location={"record": record, "offset": base + value.offset * ITEMSIZES[ref.dtype]},
            checksum="",
            sum=float("nan"),
            layer=layer,
            kind=kind,
        )

    def _storage(
        self,
        ref: _StorageRef,
        seen: dict[str, tuple[_StorageRef, int]],
        entries: dict[str, zipfile.ZipInfo],
        limit: int,
    ) -> tuple[str, int]:
        """(record name, data offset) of a storage, checking its size once."""
        record = f"{self.prefix}data/{ref.key}"
        if ref.key in seen:
            first, base = seen[ref.key]
            if first != ref:
                raise CorruptDataError(f"{self.path}: storage {ref.key!r} is referenced as both {first} and {ref}")
            return record, base
        entry = entries.get(record)
        if entry is None:
            raise CorruptDataError(f"{self.path}: record {record!r} (a tensor's bytes) is missing from the archive")
        if entry.file_size != ref.numel * ITEMSIZES[ref.dtype]:
            raise CorruptDataError(
                f"{self.path}: record {record!r} holds {entry.file_size} bytes, but the pickle says "
                f"{ref.numel} x {ref.dtype} ({ref.numel * ITEMSIZES[ref.dtype]} bytes)"
            )
        base = self._data_offset(entry, limit)
        seen[ref.key] = (ref, base)
        return record, base

    # -- public reads ----------------------------------------------------------------------
    def read_rows(self, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of dim 0 as a fresh CPU tensor of the stored dtype.

        Reads only the bytes of those rows (for a non-contiguous tensor: the
        span they cover).  0-d and 1-d tensors have one element per row; a 0-d
        tensor read as rows ``(0, 1)`` comes back 0-d.

        Args:
            info: one of :attr:`infos`.
            start: first row.
            stop: row after the last; ``0 <= start <= stop <= rows``.

        Returns:
            A tensor of shape ``(stop - start, *info.shape[1:])``.
        """
        if info.name not in self.infos:
            raise TensorNotFoundError(f"{self.path}: no tensor {info.name!r}")
        nrows, per_row = rows_of(info.shape)
        check_rows(info.name, start, stop, nrows)
        import torch

        dtype = info.torch_dtype
        itemsize = dtype.itemsize
        base = info.location["offset"]
        out_shape = rows_shape(info.shape, start, stop)
        stride = self._strides.get(info.name)
        if stride is None or stop == start:
            raw = self._read_span(base + start * per_row * itemsize, (stop - start) * per_row * itemsize, info.name)
            return raw.view(dtype).reshape(out_shape)
        span = 1 + (stop - 1 - start) * stride[0] + sum((d - 1) * s for d, s in zip(info.shape[1:], stride[1:]))
        raw = self._read_span(base + start * stride[0] * itemsize, span * itemsize, info.name)
        return torch.as_strided(raw.view(dtype), out_shape, stride).contiguous()

    def byte_span(self, info: TensorInfo) -> tuple[Path, int] | None:
        """``(file, offset)`` of a contiguous tensor's bytes (validated at open); ``None`` for strided views."""
        return None if info.name in self._strides else (self.path, info.location["offset"])

    def _read_span(self, offset: int, nbytes: int, name: str) -> torch.Tensor:
        return pread_tensor(self._open_fd(), nbytes, offset, f"{self.path}, tensor {name!r}")

    def close(self) -> None:
        """Close the file; later reads raise."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> LegacyPtSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LegacyPtSource({str(self.path)!r}, {len(getattr(self, 'infos', {}))} tensors)"
