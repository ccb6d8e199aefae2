"""Conversion between every pair of formats, one bounded buffer at a time.

Sources: a store (safetensors or zarr), a legacy ``fisher.pt``, a bare
``.safetensors`` file.  Targets: a safetensors store, a zarr store, a
``fisher.pt``.  Bytes move in buffers of at most ``buffer_bytes`` (at least one
row), so peak memory does not grow with the file.  (A buffer is a unit of
streaming only; a zarr target's chunks are set by its ``chunk_mb`` option.)  Where the source recorded
checksums they are checked on the way through, for free.  The target appears
under its final name only when complete: a store is built in a temporary
directory beside it and renamed, a ``fisher.pt`` is written to a temporary
file and renamed.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ._io import atomic_dir
from ._readahead import PIECE_BYTES, ReadAhead
from ._tally import Tally
from .errors import BadInputError, ChecksumMismatchError, IncompleteStoreError
from .formats.base import Buffer, Piece
from .manifest import GroupInfo, TensorInfo, now_iso
from .progress import progress
from .store import DEFAULT_PIECE_BYTES, FisherStore, open_store
from .writer import StoreWriter, plan_groups

__all__ = ["DEFAULT_BUFFER_BYTES", "TARGETS", "checked_pieces", "convert", "infer_target"]

log = logging.getLogger(__name__)

TARGETS = ("safetensors", "zarr", "pt")

#: Default size of a conversion's streaming buffer: the store's byte-piece size (large reads, a few in memory).
DEFAULT_BUFFER_BYTES = DEFAULT_PIECE_BYTES


def infer_target(dst: Path) -> str:
    """Target format from a destination name: ``*.pt``/``*.pth`` → pt, ``*.zarr`` → zarr, else safetensors."""
    if dst.suffix in (".pt", ".pth"):
        return "pt"
    if dst.suffix == ".zarr":
        return "zarr"
    return "safetensors"


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    to: str | None = None,
    backend_options: dict[str, Any] | None = None,
    group_size: int = 8,
    overwrite: bool = False,
    buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    chunk_bytes: int | None = None,
) -> Path:
    """Convert ``src`` into a new ``dst`` of format ``to``; the source is only read.

    Store groups are kept as they are; a file source is split into groups of
    ``group_size`` layers.  Checksums the source recorded are checked on the
    way, and ``dst`` appears only once complete.

    Args:
        src: a store directory, a ``fisher.pt`` or a bare ``.safetensors`` file.
        dst: the new store directory or ``.pt`` file.
        to: ``"safetensors"``, ``"zarr"`` or ``"pt"``; inferred from ``dst`` when omitted (:func:`infer_target`).
        backend_options: the target backend's options (zarr: compression, level, chunk_mb, shard_mb).
        group_size: layers per group when ``src`` is a single file.
        overwrite: replace an existing ``dst``, only once the new one is complete.
        buffer_bytes: size of a streaming buffer (at least one row is read at a time); bounds peak memory.
        chunk_bytes: deprecated alias of ``buffer_bytes`` (removed in the next release).

    Returns:
        ``dst``.
    """
    if chunk_bytes is not None:
        warnings.warn("chunk_bytes is renamed buffer_bytes", DeprecationWarning, stacklevel=2)
        buffer_bytes = chunk_bytes
    src, dst = Path(src), Path(dst)
    to = to or infer_target(dst)
    if to not in TARGETS:
        raise BadInputError(f"to={to!r} is not a target format; choose one of {TARGETS}", param="to")
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise BadInputError(f"dst {dst} must not be the source or lie inside it", param="dst")
    if dst.exists() and not overwrite:
        raise BadInputError(f"{dst} already exists; choose a new path or pass overwrite=True", param="overwrite")
    if isinstance(buffer_bytes, bool) or not isinstance(buffer_bytes, int) or buffer_bytes < 1:
        raise BadInputError(f"buffer_bytes must be a positive integer, got {buffer_bytes!r}", param="buffer_bytes")
    with open_store(src) as store:
        if not store.complete:
            raise IncompleteStoreError(
                f"{src}: groups {store.manifest.missing_groups} are not written; resume the store before converting it"
            )
        if backend_options and to == "pt":
            raise BadInputError("fisher.pt takes no backend_options (compression, chunking)", param="backend_options")
        bar: Any  # a tqdm bar, or a NullBar when quiet
        with progress(total=store.nbytes, desc=f"convert → {to}", unit="B", unit_scale=True, unit_divisor=1024) as bar:
            if to == "pt":
                _to_pt(store, dst, buffer_bytes, bar)
            else:
                _to_store(store, dst, to, backend_options or {}, group_size, buffer_bytes, bar)
    log.info("converted %s → %s (%s)", src, dst, to)
    return dst


def _to_pt(store: FisherStore, dst: Path, buffer_bytes: int, bar: Any) -> None:
    """Write a ``fisher.pt``, checking each tensor against the source's recorded checksum on the way."""
    from .formats.legacy_pt_writer import write_pt

    infos = [store.info(n) for n in store.names]
    with ReadAhead() as ahead:
        items = ((i.spec, checked_pieces(ahead, store, i, buffer_bytes, bar)) for i in infos)
        write_pt(dst, [i.spec for i in infos], items)


def checked_pieces(
    ahead: ReadAhead,
    store: FisherStore,
    info: TensorInfo,
    buffer_bytes: int,
    bar: Any,
    *,
    cut: int = PIECE_BYTES,
    where: str = "the source's manifest",
) -> Iterator[Buffer]:
    """A tensor's bytes, read ahead; when the source recorded a checksum they are tallied and must match it.

    The one verify-while-reading path of every command that reads a store to write another (convert,
    merge).  The check fires when the iterator is exhausted, so a consumer that stops early checks nothing.

    Args:
        ahead: the read-ahead whose helper thread reads (and sums) the bytes; one feed at a time.
        store: the source.
        info: the tensor.
        buffer_bytes: the size of the source's pieces (file spans or decoded row blocks).
        bar: a progress bar advanced by the bytes read.
        cut: bytes per piece handed out, from the tensor's start (the last may be shorter): a
            multiple of the item size gives pieces of whole elements at the same offsets in every source.
        where: what recorded the checksum, for the error (e.g. the source's path).

    Returns:
        An iterator of buffers, each valid until the next is asked for; :class:`ChecksumMismatchError`
        naming the tensor once the bytes are exhausted, when they do not match.
    """
    tally = Tally(info.dtype) if info.checksum else None
    with ahead.feed(_stream(store, info, buffer_bytes, bar), tally, cut=cut) as feed:
        yield from feed
    if tally is not None and tally.checksum.hexdigest() != info.checksum:
        raise ChecksumMismatchError.for_tensor(info.name, tally.checksum.hexdigest(), info.checksum, where=where)


def _plan(store: FisherStore, group_size: int) -> tuple[GroupInfo, ...]:
    if store.format in ("safetensors", "zarr"):
        return store.manifest.groups
    return plan_groups([store.info(n).spec for n in store.names], group_size)


def _to_store(
    store: FisherStore, dst: Path, backend: str, options: dict[str, Any], group_size: int, buffer_bytes: int, bar: Any
) -> None:
    source_meta = {"path": str(store.path), "format": store.format, "converted": now_iso()}
    provenance = {**store.manifest.provenance, "converted_from": source_meta}
    if store.manifest.kind == "masks" and backend == "safetensors":
        options = {"prefix": "masks", **options}
    with atomic_dir(dst) as tmp:  # on overwrite, the old store goes only once the new one is complete
        writer = StoreWriter.create(
            tmp,
            _plan(store, group_size),
            backend=backend,
            backend_options=options,
            kind=store.manifest.kind,
            provenance=provenance,
            attrs=store.manifest.attrs,
        )
        with writer:
            for group in writer.manifest.groups:
                infos = [store.info(s.name) for s in group.tensors]
                items: Iterable = ((i.spec, _stream(store, i, buffer_bytes, bar)) for i in infos)
                writer.stream_group(
                    group.index,
                    items,
                    attrs={i.name: i.attrs for i in infos},
                    expect={i.name: i.checksum for i in infos},
                )
            writer.finish()


def _stream(store: FisherStore, info: TensorInfo, buffer_bytes: int, bar: Any) -> Iterator[Piece]:
    """A tensor's bytes for the writer in pieces of ``buffer_bytes``: raw file spans where the source has them
    (read straight into the read-ahead ring)."""
    for piece in store.iter_pieces(info.name, buffer_bytes):
        bar.update(len(piece))
        yield piece
