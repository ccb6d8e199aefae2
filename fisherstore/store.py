"""Reading stores lazily: ``open_store`` and :class:`FisherStore`.

A :class:`FisherStore` sits over a *tensor source*: a store directory (its
manifest plus a backend), a legacy ``fisher.pt`` or a bare ``.safetensors``
file.  Every read goes to the source for exactly the rows asked for; nothing
loads a whole store or a whole file.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ._io import VIEW_BYTES, Checksum, FileSpan
from ._tally import Tally
from .errors import BadInputError, ChecksumMismatchError, CorruptDataError, StoreNotFoundError, TensorNotFoundError
from .formats import get_backend
from .formats.base import Backend, RowsInto, check_rows, rows_of
from .manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    GroupInfo,
    Manifest,
    TensorInfo,
    importance_document,
    layer_sums,
)
from .storage import Remote, RemoteFile, resolve

if TYPE_CHECKING:
    import torch

__all__ = ["CHECK_PIECE_BYTES", "DEFAULT_PIECE_BYTES", "FisherStore", "TensorSource", "load_manifest", "open_store"]

log = logging.getLogger(__name__)

#: Bounded buffer used when streaming a tensor's bytes (conversion, verify).
DEFAULT_PIECE_BYTES = 64 << 20
#: Buffer in which verify-on-read streams a tensor it must check before serving rows of it (bounded RSS).
CHECK_PIECE_BYTES = 4 << 20


class TensorSource(Protocol):
    """What :class:`FisherStore` reads through: a store directory, a ``fisher.pt``, a ``.safetensors`` file.

    Required: :attr:`infos`, :meth:`read_rows`, :meth:`byte_span`, :meth:`close`.
    Optional capabilities are declared, not probed: a source without one says
    ``None`` (a class attribute ``read_rows_into = None`` will do).
    """

    infos: dict[str, TensorInfo]

    def read_rows(self, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of a tensor as a CPU tensor of the stored dtype."""
        ...

    def byte_span(self, info: TensorInfo) -> tuple[Path, int] | None:
        """``(file, offset)`` where the tensor's C-order bytes lie contiguous and raw, else ``None``."""
        ...

    @property
    def read_rows_into(self) -> RowsInto | None:
        """Decoding rows straight into a caller's buffer (no tensor, no torch import), or ``None`` where the source
        cannot; byte streaming (:meth:`FisherStore.iter_pieces`) then goes through :meth:`read_rows`."""
        ...

    def close(self) -> None:
        """Release open files."""
        ...


class _BackendSource:
    """A store directory: tensors from its manifest, bytes from its backend."""

    def __init__(self, manifest: Manifest, backend: Backend) -> None:
        self.infos = manifest.tensors
        self.backend = backend

    def read_rows(self, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
        return self.backend.read_rows(info, start, stop)

    def byte_span(self, info: TensorInfo) -> tuple[Path, int] | None:
        return self.backend.byte_span(info)

    @property
    def read_rows_into(self) -> RowsInto:
        """Every backend decodes into a buffer (:meth:`~fisherstore.formats.base.Backend.read_rows_into`)."""
        return self.backend.read_rows_into

    def close(self) -> None:
        self.backend.close()


def _sniff(path: Path | RemoteFile) -> str:
    if isinstance(path, RemoteFile):
        head = path.pread(min(16, path.size), 0, str(path))
    else:
        with open(path, "rb") as fh:
            head = fh.read(16)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "legacy_pt"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors-file"
    if head[:1] == b"\x80":  # a raw pickle: torch.save before the zip format (1.6)
        return "old-pickle"
    raise BadInputError(f"{path}: not a fisherstore store, a torch zip fisher.pt or a safetensors file")


def load_manifest(root: Remote) -> Manifest:
    """Read and validate the manifest of a store on an object store (:meth:`Manifest.load` reads local ones).

    Args:
        root: the store's :class:`~fisherstore.storage.Remote`.

    Returns:
        The validated manifest; a missing one is :class:`StoreNotFoundError`.
    """
    where = root.url_of(MANIFEST_NAME)
    try:
        raw = root.cat(MANIFEST_NAME, limit=MAX_MANIFEST_BYTES + 1)  # Manifest.parse refuses over the cap
    except FileNotFoundError:
        raise StoreNotFoundError(f"{where}: manifest missing") from None
    return Manifest.parse(raw, where)


def open_store(
    path: str | Path | Remote, *, storage_options: Mapping[str, Any] | None = None, verify: bool = False
) -> FisherStore:
    """Open a store directory, a legacy ``fisher.pt`` or a ``.safetensors`` file for lazy reading.

    Raises :class:`StoreNotFoundError` when nothing is there and
    :class:`~fisherstore.errors.BadInputError` (or its child
    ``CorruptDataError``) when what is there cannot be read safely.  On an
    object store only the manifest is read here; a tensor's read then fetches
    its array's metadata, its shard index and the byte ranges of its rows.

    With ``verify=True`` each tensor's bytes are checked against the CRC-32C
    its manifest records the first time the tensor is read, and a mismatch
    raises :class:`~fisherstore.errors.ChecksumMismatchError` instead of
    returning the bytes (see :meth:`FisherStore.check` for what that costs).
    Off by default: the readers that stream whole stores (conversion,
    ``verify``) check checksums themselves, and a row read of an unchecked
    tensor pays one extra pass over the whole tensor (README, "Integrity on read").

    Args:
        path: a store directory (its ``fisherstore.json``), a ``fisher.pt`` or a bare ``.safetensors`` file;
            or an fsspec URL of a store or a ``.safetensors`` file (``s3://bucket/store``, ``memory://x``).
        storage_options: keyword arguments of the URL's filesystem (credentials, ``endpoint_url``, ...).
        verify: check each tensor's checksum on its first read (sources without checksums, a ``fisher.pt``
            or a bare ``.safetensors`` file, have nothing to check: a warning says so).

    Returns:
        A :class:`FisherStore`; nothing but metadata is read until a tensor is asked for.
    """
    location = resolve(path, storage_options, param="path")
    if isinstance(location, Remote):
        return _open_remote(location, verify)
    path = location
    if path.is_dir():
        manifest_path = path / MANIFEST_NAME
        if not manifest_path.is_file():
            raise StoreNotFoundError(f"{path} is a directory without {MANIFEST_NAME}: not a fisherstore store")
        manifest = Manifest.load(manifest_path)
        backend = get_backend(manifest.backend, path, manifest.backend_options)
        return FisherStore(path, manifest, _BackendSource(manifest, backend), verify=verify)
    if not path.is_file():
        raise StoreNotFoundError(f"{path}: no such store or file")
    kind = _sniff(path)
    if kind == "old-pickle":
        raise BadInputError(
            f"{path} is a pre-1.6 (non-zip) torch file, which cannot be read lazily or safely; "
            "re-save it with a recent torch (torch.save) first"
        )
    source: TensorSource
    if kind == "legacy_pt":
        from .formats.legacy_pt import LegacyPtSource

        source = LegacyPtSource(path)
    else:
        from .formats.safetensors import SafetensorsFileSource

        source = SafetensorsFileSource(path)
    layers = tuple(sorted({i.layer for i in source.infos.values() if i.layer is not None}))
    manifest = Manifest(
        backend=kind,
        groups=(GroupInfo(0, layers, tuple(i.spec for i in source.infos.values()), complete=True),),
        tensors=source.infos,
        provenance={"source_file": str(path)},
    )
    if verify and not any(i.checksum for i in source.infos.values()):
        log.warning("%s records no checksums: verify=True has nothing to check its tensors against", path)
    return FisherStore(path, manifest, source, verify=verify)


def _open_remote(root: Remote, verify: bool) -> FisherStore:
    """:func:`open_store` for an URL: a store (its manifest) or a bare ``.safetensors`` object."""
    try:
        manifest = load_manifest(root)
    except StoreNotFoundError:
        if not root.is_file():
            raise StoreNotFoundError(f"{root}: no such store or file") from None
        head = RemoteFile(root.parent, root.name)
        kind = _sniff(head)
        if kind != "safetensors-file":
            raise BadInputError(
                f"{root}: only stores and bare .safetensors files are read from URLs; copy a fisher.pt "
                "locally first (or convert it into a store)"
            ) from None
        from .formats.safetensors import SafetensorsFileSource

        source: TensorSource = SafetensorsFileSource(head)
        layers = tuple(sorted({i.layer for i in source.infos.values() if i.layer is not None}))
        file_manifest = Manifest(
            backend=kind,
            groups=(GroupInfo(0, layers, tuple(i.spec for i in source.infos.values()), complete=True),),
            tensors=source.infos,
            provenance={"source_file": str(root)},
        )
        if verify:
            log.warning("%s records no checksums: verify=True has nothing to check its tensors against", root)
        return FisherStore(root, file_manifest, source, verify=verify)
    backend = get_backend(manifest.backend, root, manifest.backend_options)
    return FisherStore(root, manifest, _BackendSource(manifest, backend), verify=verify)


#: Reads at least this large are memory-mapped instead of copied (see :meth:`FisherStore.read`).
MAP_MIN_BYTES = 1 << 20


def _mapped_tensor(path: Path, offset: int, nbytes: int, info: TensorInfo, start: int, stop: int) -> torch.Tensor:
    """A copy-on-write mmap of ``nbytes`` at ``offset`` as rows ``[start, stop)`` of ``info``'s tensor."""
    import mmap

    import torch

    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if offset + nbytes > size:  # mapping past the end would SIGBUS on access instead of raising
            raise CorruptDataError(
                f"{path}: tensor {info.name!r} needs bytes up to {offset + nbytes}, the file has {size} (truncated?)"
            )
        base = offset - offset % mmap.ALLOCATIONGRANULARITY
        window = mmap.mmap(fh.fileno(), offset + nbytes - base, access=mmap.ACCESS_COPY, offset=base)
    flat = torch.frombuffer(window, dtype=torch.uint8, count=nbytes, offset=offset - base)  # keeps the map alive
    return flat.view(info.torch_dtype).reshape(info.shape if not info.shape else (stop - start, *info.shape[1:]))


class FisherStore:
    """Lazy, read-only access to the tensors of a store (see :func:`open_store`).

    With ``verify`` (``open_store(..., verify=True)``) the first read of each
    tensor checks its CRC-32C (:meth:`check`); :attr:`verified` lists the
    tensors checked so far.
    """

    def __init__(self, path: Path | Remote, manifest: Manifest, source: TensorSource, *, verify: bool = False) -> None:
        #: The store's local path, or its :class:`~fisherstore.storage.Remote` (``str()`` is the URL).
        self.path = path
        self.manifest = manifest
        self._source = source
        #: Whether reads check each tensor's checksum the first time it is read.
        self.verify = verify
        self._verified: set[str] = set()
        self._verify_lock = threading.Lock()

    # -- what is there --------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Tensor names in store order."""
        return list(self._source.infos)

    @property
    def format(self) -> str:
        """``safetensors``, ``zarr``, ``legacy_pt`` or ``safetensors-file``."""
        return self.manifest.backend

    @property
    def complete(self) -> bool:
        """Whether every planned group is written (a file source is always complete)."""
        return self.manifest.complete

    @property
    def layers(self) -> list[int]:
        """The decoder layers that hold tensors, ascending."""
        return sorted({i.layer for i in self._source.infos.values() if i.layer is not None})

    @property
    def nbytes(self) -> int:
        """Bytes of all tensors as stored."""
        return sum(i.nbytes for i in self._source.infos.values())

    def info(self, name: str) -> TensorInfo:
        """The manifest entry of ``name``; suggests close names when it is absent."""
        try:
            return self._source.infos[name]
        except KeyError:
            import difflib

            close = difflib.get_close_matches(name, self._source.infos, n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise TensorNotFoundError(f"{self.path}: no tensor {name!r}{hint}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape of tensor ``name`` (metadata only)."""
        return self.info(name).shape

    def __contains__(self, name: object) -> bool:
        return name in self._source.infos

    def __len__(self) -> int:
        return len(self._source.infos)

    def __iter__(self) -> Iterator[str]:
        return iter(self._source.infos)

    # -- reading --------------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        return self.read(name)

    def read(
        self,
        name: str,
        rows: slice | tuple[int, int] | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> torch.Tensor:
        """Read a tensor, or rows ``[start, stop)`` of it, touching only those bytes.

        Rows lying raw in a file (safetensors, ``fisher.pt``) and at least
        :data:`MAP_MIN_BYTES` long come back as a copy-on-write memory map of
        exactly those bytes, as ``safe_open`` does: no read up front, pages
        fault in as they are used, and writes stay private to the tensor.
        Encoded rows (zarr) and small reads are read into a fresh buffer.

        ``dtype``/``device`` convert after reading (e.g. ``dtype=torch.float32``
        for numerics: bf16 has no SVD kernels).

        With :attr:`verify`, the first read of a tensor checks its checksum:
        a whole-tensor read hashes the bytes it returns (a memory-mapped read
        thereby faults every page in), a row read first streams the whole
        tensor through :meth:`check`.
        """
        info = self.info(name)
        nrows = rows_of(info.shape)[0]
        if rows is None:
            start, stop = 0, nrows
        elif isinstance(rows, slice):
            if rows.step not in (None, 1):
                raise BadInputError(f"row slices must have step 1, got {rows.step}", param="rows")
            start, stop, _ = rows.indices(nrows)
            stop = max(start, stop)
        else:
            start, stop = rows
            check_rows(name, start, stop, nrows)
        whole = start == 0 and stop == nrows
        if self.verify and not whole:
            self.check(name)  # rows cannot be checked alone: stream the whole tensor once, then serve the rows
        per_row = rows_of(info.shape)[1] * info.itemsize
        span = self._source.byte_span(info) if (stop - start) * per_row >= MAP_MIN_BYTES else None
        if span is not None:
            out = _mapped_tensor(span[0], span[1] + start * per_row, (stop - start) * per_row, info, start, stop)
        else:
            out = self._source.read_rows(info, start, stop)
        if self.verify and whole and name not in self._verified:
            import torch

            checksum = Checksum()  # the bytes are here already: hash them where they lie, no second read
            checksum.update(out.reshape(-1).view(torch.uint8).numpy().data if out.numel() else b"")
            self._settle(info, checksum, info.nbytes)
        if dtype is not None or device is not None:
            out = out.to(device=device, dtype=dtype)
        return out

    def iter_rows(
        self, name: str, block_rows: int, *, dtype: torch.dtype | None = None
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(start, rows)`` blocks of ``block_rows`` rows, one block in memory at a time.

        On an object store the next block is fetched while the caller works on
        this one (a read-ahead of one block: two in memory at most), so the
        round trips overlap the caller's work.

        With :attr:`verify`, the first block of a tensor not checked yet waits
        for :meth:`check` to stream the whole tensor once (a row block cannot
        be checked on its own), so no unchecked byte is ever served.
        """
        if block_rows < 1:
            raise BadInputError(f"block_rows must be >= 1, got {block_rows}", param="block_rows")
        nrows = rows_of(self.info(name).shape)[0]
        blocks = [(start, min(nrows, start + block_rows)) for start in range(0, nrows, block_rows)]
        if not isinstance(self.path, Remote) or len(blocks) < 2:
            for start, stop in blocks:
                yield start, self.read(name, (start, stop), dtype=dtype)
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1, thread_name_prefix="fisherstore-read-ahead") as pool:
            ahead = pool.submit(self.read, name, blocks[0], dtype=dtype)
            for i, (start, _) in enumerate(blocks):
                rows = ahead.result()
                if i + 1 < len(blocks):
                    ahead = pool.submit(self.read, name, blocks[i + 1], dtype=dtype)
                yield start, rows

    def iter_bytes(self, name: str, piece_bytes: int = DEFAULT_PIECE_BYTES) -> Iterator[memoryview]:
        """Yield a tensor's C-order bytes in buffers of about ``piece_bytes`` (at least one row).

        Where the bytes lie raw and contiguous in a file (safetensors shards, a
        ``fisher.pt``) they are read into one reused buffer; otherwise they are
        decoded row blocks.  A view is valid until the next item is requested.

        Args:
            name: the tensor.
            piece_bytes: the size each buffer aims at (a buffer holds at least one row).

        Returns:
            An iterator of ``memoryview`` s of the bytes, in order.
        """
        for piece in self.iter_pieces(name, piece_bytes):
            if isinstance(piece, FileSpan):
                yield from piece.views(min(piece_bytes, VIEW_BYTES))
            else:
                yield piece

    def iter_pieces(self, name: str, piece_bytes: int = DEFAULT_PIECE_BYTES) -> Iterator[memoryview | FileSpan]:
        """Like :meth:`iter_bytes`, but raw contiguous bytes come as :class:`~fisherstore._io.FileSpan` s.

        A conversion's read-ahead thread reads a span straight into its own
        ring of buffers (:class:`~fisherstore._readahead.ReadAhead`), so bytes
        that lie raw in the source are copied out of the page cache once, with
        no intermediate buffer.

        Args:
            name: the tensor.
            piece_bytes: the size each piece aims at (a decoded piece holds at least one row).

        Returns:
            An iterator of buffers (valid until the next item) and file spans, in order.
        """
        if self.verify:
            self.check(name)  # before the first piece: a consumer may act on pieces before the last one
        return self._pieces(name, piece_bytes)

    def _pieces(self, name: str, piece_bytes: int) -> Iterator[memoryview | FileSpan]:
        """:meth:`iter_pieces` without the verify-on-read check (what :meth:`check` streams)."""
        info = self.info(name)
        if info.nbytes == 0:
            return
        span = self._source.byte_span(info)
        if span is not None:
            path, offset = span
            step = max(1, piece_bytes)
            for pos in range(0, info.nbytes, step):
                yield FileSpan(path, offset + pos, min(step, info.nbytes - pos))
            return
        row_bytes = rows_of(info.shape)[1] * info.itemsize
        block = max(1, piece_bytes // max(1, row_bytes))
        nrows = rows_of(info.shape)[0]
        read_into = self._source.read_rows_into
        if read_into is not None:  # decoded into one reused buffer, no tensors
            buf = memoryview(bytearray(min(nrows, block) * row_bytes))
            for start in range(0, nrows, block):
                stop = min(nrows, start + block)
                view = buf[: (stop - start) * row_bytes]
                read_into(info, start, stop, view)
                yield view
            return
        import torch  # strided fisher.pt views are gathered by torch

        for start in range(0, nrows, block):
            rows = self._source.read_rows(info, start, min(nrows, start + block))
            yield rows.reshape(-1).view(torch.uint8).numpy().data

    # -- integrity on read ----------------------------------------------------------------
    @property
    def verified(self) -> frozenset[str]:
        """Tensors whose bytes were checked against their recorded checksum (:meth:`check`) so far."""
        with self._verify_lock:
            return frozenset(self._verified)

    def check(self, name: str, piece_bytes: int = CHECK_PIECE_BYTES) -> None:
        """Check tensor ``name``'s bytes against its recorded CRC-32C, once; later calls return at once.

        The tensor is streamed once in buffers of ``piece_bytes`` (peak
        memory stays bounded whatever its size), so a row read that triggers
        it costs one extra pass over the whole tensor the first time.  A
        tensor whose source records no checksum (``fisher.pt``) only has its
        size checked.  Raises :class:`~fisherstore.errors.ChecksumMismatchError`
        on a mismatch and :class:`~fisherstore.errors.CorruptDataError` when
        the bytes cannot be read; a failed tensor is checked again next time.

        Args:
            name: the tensor.
            piece_bytes: the streaming buffer's size.

        Returns:
            ``None``; the tensor is in :attr:`verified` afterwards.
        """
        info = self.info(name)
        with self._verify_lock:
            if name in self._verified:
                return
        checksum, nbytes = Checksum(), 0
        for piece in self._pieces(name, piece_bytes):
            for view in piece.views(min(piece_bytes, VIEW_BYTES)) if isinstance(piece, FileSpan) else (piece,):
                checksum.update(view)
                nbytes += len(view)
        self._settle(info, checksum, nbytes)

    def _settle(self, info: TensorInfo, checksum: Checksum, nbytes: int) -> None:
        """Compare what a tensor's bytes hashed to with its manifest entry; remember it when they agree."""
        if nbytes != info.nbytes:
            raise CorruptDataError(f"{self.path}: tensor {info.name!r}: {nbytes} bytes read, {info.nbytes} expected")
        if info.checksum and checksum.hexdigest() != info.checksum:
            raise ChecksumMismatchError.for_tensor(info.name, checksum.hexdigest(), info.checksum)
        with self._verify_lock:
            self._verified.add(info.name)

    def iter_chunks(self, name: str, chunk_bytes: int = DEFAULT_PIECE_BYTES) -> Iterator[memoryview | FileSpan]:
        """Deprecated alias of :meth:`iter_pieces` (kept for one release: "chunk" now means only a zarr chunk)."""
        import warnings

        warnings.warn("FisherStore.iter_chunks is renamed iter_pieces", DeprecationWarning, stacklevel=2)
        return self.iter_pieces(name, chunk_bytes)

    def _missing_sums(self) -> dict[str, float] | None:
        """Per-tensor sums streamed from the bytes when the source recorded none (``fisher.pt``)."""
        if not any(math.isnan(i.sum) for i in self._source.infos.values() if i.layer is not None):
            return None
        sums = {}
        for name, info in self._source.infos.items():
            if info.layer is not None:
                tally = Tally(info.dtype)
                for piece in self.iter_bytes(name):
                    tally.add(piece)  # only the sum is missing; no checksum is recorded here
                sums[name] = tally.sum
        return sums

    def layer_importance(self) -> dict[int, float]:
        """Per-layer Fisher sums: from the manifest, or one streaming pass when sums are unknown."""
        return layer_sums(self._source.infos, self._missing_sums())[0]

    def importance_document(self) -> dict[str, Any]:
        """The full ``layer_importance.json`` document (with the per-kind split)."""
        return importance_document(self.manifest, self._missing_sums())

    # -- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        """Release the source's open files; reads after this fail."""
        self._source.close()

    def __enter__(self) -> FisherStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "complete" if self.complete else "INCOMPLETE"
        return f"FisherStore({str(self.path)!r}, {self.format}, {len(self)} tensors, {state})"
