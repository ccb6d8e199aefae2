"""The legacy ``fisher.pt``: a ``torch.save`` zip archive whose pickle is a dict name → tensor.

Reading (:class:`LegacyPtSource`) never calls ``torch.load``: the ZIP
directory is parsed here, ``data.pkl`` goes through an unpickler that knows
only the handful of globals ``torch.save`` emits for a dict of tensors (and
builds inert placeholders from them), and tensor bytes are read with
``os.pread`` for exactly the rows asked for.  A hostile file can therefore not
run code, and opening a 58 GB file costs a few kilobytes of memory.

Writing (:func:`write_pt`) streams: the pickle is known from the specs alone,
so it is written first and each tensor's bytes follow as they arrive, one
tensor at a time, in the record layout PyTorch's own writer (miniz) produces:
64-byte aligned data behind an ``FB`` padding extra field, a data descriptor
after each record, ZIP64 fields where offsets or sizes pass 4 GiB, and the
``.format_version``, ``.storage_alignment``, ``byteorder``, ``version`` and
``.data/serialization_id`` records.  ``torch.load(..., weights_only=True)``
(plain or ``mmap=True``) loads the result.  ``torch.load`` does not check the
CRC-32s, but other ZIP tools do, so they are computed as bytes pass (in a
helper thread, overlapping the writes).
"""

from __future__ import annotations

import collections
import concurrent.futures
import io
import logging
import math
import os
import pickle
import pickletools
import re
import stat
import struct
import time
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, ClassVar, NamedTuple

from .._io import atomic_file
from ..errors import (
    BadInputError,
    CorruptDataError,
    FisherStoreError,
    StoreNotFoundError,
    TensorNotFoundError,
    UnsafePickleError,
)
from ..manifest import ITEMSIZES, TensorInfo, TensorSpec
from ..naming import parse_name, validate_name
from .base import Buffer, rows_of

if TYPE_CHECKING:
    import torch

__all__ = ["LegacyPtSource", "write_pt"]

log = logging.getLogger(__name__)

# ZIP structures (APPNOTE 4.3), little-endian.
_LOCAL = struct.Struct("<IHHHHHIIIHH")  # sig, need, flags, method, time, date, crc, csize, usize, nlen, elen
# central: sig, made, need, flags, method, time, date, crc, csize, usize, nlen, elen, clen, disk, iattr, eattr, lho
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_EOCD = struct.Struct("<IHHHHIIH")  # sig, disk, cd disk, entries here, entries, cd size, cd offset, comment len
_EOCD64 = struct.Struct(
    "<IQHHIIQQQQ"
)  # sig, record size, made, need, disk, cd disk, entries here, entries, cd size, cd offset
_LOCATOR = struct.Struct("<IIQI")  # sig, disk of EOCD64, EOCD64 offset, disks
_SIG_LOCAL, _SIG_CENTRAL, _SIG_EOCD = 0x04034B50, 0x02014B50, 0x06054B50
_SIG_EOCD64, _SIG_LOCATOR, _SIG_DESCRIPTOR = 0x06064B50, 0x07064B50, 0x08074B50
_U16, _U32 = 0xFFFF, 0xFFFFFFFF
_FLAG_DESCRIPTOR, _FLAG_UTF8 = 0x0008, 0x0800

#: Storage alignment torch.save uses (``torch.utils.serialization.config.save.storage_alignment``).
ALIGNMENT = 64
#: ``data.pkl`` of a dict of even 100k tensors is a few MB; anything far larger is not a fisher.pt.
_MAX_PICKLE = 64 << 20
_MAX_CENTRAL_DIR = 256 << 20

#: torch's legacy storage class for each storable dtype (what ``torch.save`` names in the pickle).
_STORAGE_CLASS = {
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

# Staging: small pieces are gathered into one buffer; pieces at least this big are written directly.
_STAGE_BYTES = 8 << 20
_DIRECT_BYTES = 256 << 10
# One read() or write() moves at most this much on Linux; larger transfers loop.
_IO_CAP = 1 << 30


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


class _Entry(NamedTuple):
    """A central-directory entry: where its local header is and how big its data is."""

    name: str
    header: int
    size: int
    method: int
    flags: int


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


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """C-order strides exactly as torch computes them (a 0-sized dim counts as 1)."""
    strides, step = [], 1
    for d in reversed(shape):
        strides.append(step)
        step *= max(d, 1)
    return tuple(reversed(strides))


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
    ["PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK", "DUP", "NONE", "NEWTRUE", "NEWFALSE", "BININT", "BININT1", "BININT2", "LONG1", "BINFLOAT", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "SHORT_BINSTRING", "BINSTRING", "SHORT_BINBYTES", "BINBYTES", "EMPTY_DICT", "DICT", "SETITEM", "SETITEMS", "EMPTY_LIST", "LIST", "APPEND", "APPENDS", "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "BINPUT", "LONG_BINPUT", "MEMOIZE", "BINGET", "LONG_BINGET", "GLOBAL", "STACK_GLOBAL", "REDUCE", "BUILD", "BINPERSID"]
)


def _check_opcodes(data: bytes, path: Path) -> None:
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
                    f"{path}: refusing pickle opcode {op.name} at byte {pos} of data.pkl: a dict of tensors never needs it"
                )
            if op.name in ("BINPUT", "LONG_BINPUT"):
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

    def __init__(self, data: bytes, path: Path) -> None:
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
                cls = _STORAGE_CLASS[name]
                self._allowed[(module, cls)] = _StorageType(f"{module}.{cls}", name)

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except (KeyError, TypeError):
            pass
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
    def _pread_into(self, buf: memoryview, offset: int, what: str) -> None:
        if self._fd is None:
            raise BadInputError(f"{self.path}: reader is closed")
        got, n = 0, len(buf)
        while got < n:
            k = os.preadv(self._fd, [buf[got : got + _IO_CAP]], offset + got)
            if k == 0:
                raise CorruptDataError(
                    f"{self.path}: file ends at byte {offset + got} inside {what} (expected {n} bytes from {offset}); the file is truncated"
                )
            got += k

    def _pread(self, offset: int, n: int, what: str) -> bytes:
        buf = bytearray(n)
        self._pread_into(memoryview(buf), offset, what)
        return bytes(buf)

    # -- ZIP directory ---------------------------------------------------------------------
    def _central_directory(self) -> tuple[int, dict[str, _Entry]]:
        """Locate the (ZIP64) end of central directory; return (directory offset, entries by name)."""
        path, size = self.path, self._size
        if size == 0:
            raise CorruptDataError(f"{path}: file is empty")
        head = self._pread(0, min(size, 512), "the file header")
        if not head.startswith(b"PK\x03\x04"):
            if head[:1] == b"\x80" or head[257:262] == b"ustar":
                raise BadInputError(
                    f"{path} is a legacy (pre-1.6, non-zip) torch file, which cannot be read lazily or safely; "
                    "re-save it with a recent torch (torch.save) first"
                )
            raise BadInputError(f"{path}: not a torch.save zip archive (it does not start with a ZIP local header)")
        tail_len = min(size, _EOCD.size + _U16)
        tail_start = size - tail_len
        tail = self._pread(tail_start, tail_len, "the end of central directory")
        pos = tail.rfind(b"PK\x05\x06")
        while pos >= 0 and not (
            pos + _EOCD.size <= tail_len and pos + _EOCD.size + _EOCD.unpack_from(tail, pos)[7] == tail_len
        ):
            pos = tail.rfind(b"PK\x05\x06", 0, pos)
        if pos < 0:
            raise CorruptDataError(
                f"{path}: no ZIP end-of-central-directory record; the file is truncated or not a zip"
            )
        eocd = tail_start + pos
        _, disk, cd_disk, _, entries, cd_size, cd_offset, _ = _EOCD.unpack_from(tail, pos)
        end = eocd  # the central directory must end before this
        if eocd >= _LOCATOR.size:
            sig, _, eocd64, _ = _LOCATOR.unpack(self._pread(eocd - _LOCATOR.size, _LOCATOR.size, "the ZIP64 locator"))
            if sig == _SIG_LOCATOR:
                if eocd64 + _EOCD64.size > eocd - _LOCATOR.size:
                    raise CorruptDataError(
                        f"{path}: ZIP64 end of central directory offset {eocd64} is outside the file"
                    )
                rec = _EOCD64.unpack(self._pread(eocd64, _EOCD64.size, "the ZIP64 end of central directory"))
                if rec[0] != _SIG_EOCD64:
                    raise CorruptDataError(f"{path}: bad ZIP64 end-of-central-directory signature at byte {eocd64}")
                disk, cd_disk, entries, cd_size, cd_offset = rec[4], rec[5], rec[7], rec[8], rec[9]
                end = eocd64
            elif entries == _U16 or _U32 in (cd_size, cd_offset):
                raise CorruptDataError(
                    f"{path}: the end of central directory needs ZIP64 fields but has no ZIP64 locator"
                )
        if disk or cd_disk:
            raise BadInputError(f"{path}: multi-disk zip archives are not supported")
        if cd_size > _MAX_CENTRAL_DIR or cd_offset + cd_size > end or entries > cd_size // _CENTRAL.size:
            raise CorruptDataError(
                f"{path}: central directory ({entries} entries, {cd_size} bytes at {cd_offset}) does not fit before byte {end}"
            )
        cd = self._pread(cd_offset, cd_size, "the central directory")
        out: dict[str, _Entry] = {}
        p = 0
        for i in range(entries):
            if p + _CENTRAL.size > cd_size or _CENTRAL.unpack_from(cd, p)[0] != _SIG_CENTRAL:
                raise CorruptDataError(f"{path}: central directory entry {i} at byte {cd_offset + p} is malformed")
            f = _CENTRAL.unpack_from(cd, p)
            flags, method, csize, usize, nlen, elen, clen, header = f[3], f[4], f[8], f[9], f[10], f[11], f[12], f[16]
            name_end = p + _CENTRAL.size + nlen
            if name_end + elen + clen > cd_size:
                raise CorruptDataError(f"{path}: central directory entry {i} runs past the directory")
            try:
                name = cd[p + _CENTRAL.size : name_end].decode("utf-8" if flags & _FLAG_UTF8 else "cp437")
            except UnicodeDecodeError:
                raise CorruptDataError(f"{path}: central directory entry {i} has an undecodable name") from None
            usize, csize, header = self._zip64_fields(cd[name_end : name_end + elen], usize, csize, header, name)
            if name in out:
                raise CorruptDataError(f"{path}: record {name!r} is listed twice in the central directory")
            if method == 0 and csize != usize:
                raise CorruptDataError(f"{path}: record {name!r} is stored but its sizes differ ({csize} vs {usize})")
            out[name] = _Entry(name, header, usize, method, flags)
            p = name_end + elen + clen
        return cd_offset, out

    def _zip64_fields(self, extra: bytes, usize: int, csize: int, header: int, name: str) -> tuple[int, int, int]:
        """Replace saturated 32-bit fields by the values of the ZIP64 extra field (id 1)."""
        q = 0
        while q + 4 <= len(extra):
            tag, n = struct.unpack_from("<HH", extra, q)
            body = extra[q + 4 : q + 4 + n]
            if tag == 1:
                values = list(struct.unpack_from(f"<{len(body) // 8}Q", body))
                fields = [usize, csize, header]
                for j, v in enumerate(fields):
                    if v == _U32:
                        if not values:
                            raise CorruptDataError(f"{self.path}: record {name!r} has a short ZIP64 extra field")
                        fields[j] = values.pop(0)
                return fields[0], fields[1], fields[2]
            q += 4 + n
        if _U32 in (usize, csize, header):
            raise CorruptDataError(f"{self.path}: record {name!r} needs ZIP64 fields but has none")
        return usize, csize, header

    def _data_offset(self, entry: _Entry, limit: int) -> int:
        """Absolute offset of a record's first data byte, checked to lie inside the file."""
        path = self.path
        if entry.method != 0:
            raise BadInputError(
                f"{path}: record {entry.name!r} is compressed (method {entry.method}); fisherstore reads only stored "
                "(uncompressed) records, as torch.save writes them: re-save the tensors with torch.save"
            )
        if entry.flags & 1:
            raise BadInputError(f"{path}: record {entry.name!r} is encrypted")
        if entry.header + _LOCAL.size > limit:
            raise CorruptDataError(
                f"{path}: record {entry.name!r} has its header at byte {entry.header}, outside the file"
            )
        local = _LOCAL.unpack(self._pread(entry.header, _LOCAL.size, f"the header of {entry.name!r}"))
        if local[0] != _SIG_LOCAL:
            raise CorruptDataError(f"{path}: no ZIP local header at byte {entry.header} for record {entry.name!r}")
        start = entry.header + _LOCAL.size + local[9] + local[10]
        if start + entry.size > limit:
            raise CorruptDataError(
                f"{path}: record {entry.name!r} ({entry.size} bytes at {start}) points outside the file data (which ends at {limit})"
            )
        return start

    def _record(self, entry: _Entry, limit: int, cap: int) -> bytes:
        if entry.size > cap:
            raise BadInputError(
                f"{self.path}: record {entry.name!r} is {entry.size} bytes, over the {cap >> 20} MiB a fisher.pt needs"
            )
        return self._pread(self._data_offset(entry, limit), entry.size, f"record {entry.name!r}")

    # -- the pickle ------------------------------------------------------------------------
    def _load(self) -> dict[str, TensorInfo]:
        limit, entries = self._central_directory()
        obj = self._unpickle(entries, limit)
        if not isinstance(obj, dict):
            raise BadInputError(f"{self.path} holds {_describe(obj)}, expected a dict name -> tensor")
        storages: dict[str, tuple[_StorageRef, int]] = {}
        return {name: self._info(name, value, storages, entries, limit) for name, value in obj.items()}

    def _unpickle(self, entries: dict[str, _Entry], limit: int) -> Any:
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
        entries: dict[str, _Entry],
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
        self, ref: _StorageRef, seen: dict[str, tuple[_StorageRef, int]], entries: dict[str, _Entry], limit: int
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
        if entry.size != ref.numel * ITEMSIZES[ref.dtype]:
            raise CorruptDataError(
                f"{self.path}: record {record!r} holds {entry.size} bytes, but the pickle says "
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
        """
        if info.name not in self.infos:
            raise TensorNotFoundError(f"{self.path}: no tensor {info.name!r}")
        nrows, per_row = rows_of(info.shape)
        if not 0 <= start <= stop <= nrows:
            raise BadInputError(f"{self.path}: rows ({start}, {stop}) out of range for {info.name!r} with {nrows} rows")
        import torch

        dtype = info.torch_dtype
        itemsize = dtype.itemsize
        base = info.location["offset"]
        out_shape = (stop - start, *info.shape[1:]) if info.shape else (() if stop - start == 1 else (0,))
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
        import torch

        out = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            self._pread_into(memoryview(out.numpy()), offset, f"tensor {name!r}")
        return out

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


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


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
_STORAGE_GLOBALS = {dtype: _Global("torch", cls) for dtype, cls in _STORAGE_CLASS.items()}


class _TensorStub:
    """Pickles exactly like a contiguous CPU tensor does under ``torch.save``."""

    __slots__ = ("storage",)

    def __init__(self, storage: _StorageStub) -> None:
        self.storage = storage

    def __reduce__(self) -> tuple[Any, ...]:
        shape = self.storage.spec.shape
        args = (self.storage, 0, shape, _contiguous_strides(shape), False, collections.OrderedDict())
        return (_REBUILD, args)


class _StubPickler(pickle._Pickler):  # the Python pickler: its dispatch table can name a _Global
    dispatch: ClassVar[dict[type, Any]] = dict(pickle._Pickler.dispatch)

    def save_named_global(self, obj: _Global) -> None:
        """Write ``obj`` as a protocol-2 GLOBAL (and memoize it), as ``save_global`` would for the real object."""
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    dispatch[_Global] = save_named_global

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _StorageStub):
            return ("storage", _STORAGE_GLOBALS[obj.spec.dtype], obj.key, "cpu", obj.spec.numel)
        return None


def _pickle_specs(specs: list[TensorSpec]) -> bytes:
    """``data.pkl`` of ``{spec.name: tensor}``, storage keys ``"0".."n-1"`` in spec order (as torch.save numbers them)."""
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
            raise BadInputError(f"write_pt: {self._label} got a buffer that is not C-contiguous ({exc})") from None
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
                f"write_pt: {self._label} got more bytes than the {self._left + self._done} its spec declares"
            )
        self._left -= n
        self._done += n

    def end(self) -> None:
        """Close the open record: data descriptor and central-directory entry."""
        assert self._open is not None
        full, header, size, zip64 = self._open
        if self._left:
            raise BadInputError(f"write_pt: {self._label} got {self._done} bytes, but its spec declares {size}")
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
        import hashlib  # only the writer needs it (its OpenSSL start-up costs every reader ~5 ms)

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
    """
    path = Path(path)
    specs = list(specs)
    seen: set[str] = set()
    for spec in specs:
        if not isinstance(spec, TensorSpec):
            raise BadInputError(f"write_pt: specs must be TensorSpec objects, got {type(spec).__name__}")
        if spec.name in seen:
            raise BadInputError(f"write_pt: tensor {spec.name!r} is listed twice")
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
                    f"write_pt: item {count} is {spec!r}, expected {expected} (items must follow specs)"
                )
            zs.begin(f"data/{count}", spec.nbytes, f"tensor {spec.name!r}")
            for chunk in chunks:
                zs.data(chunk)
            zs.end()
            total += spec.nbytes
            count += 1
        if count != len(specs):
            raise BadInputError(
                f"write_pt: items stopped after {count} of {len(specs)} tensors; next was {specs[count].name!r}"
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
