"""Conversion between every pair of formats, one bounded buffer at a time.

Sources: a store (safetensors or zarr), a legacy ``fisher.pt``, a bare
``.safetensors`` file.  Targets: a safetensors store, a zarr store, a
``fisher.pt``.  Bytes move in buffers of at most ``buffer_bytes`` (at least one
row), so peak memory does not grow with the file.  (A buffer is a unit of
streaming only; a zarr target's chunks are set by its ``chunk_mb`` option.)  Where the source recorded
checksums they are checked on the way through, for free.  The target appears
under its final name only when complete: a store is built in a temporary
directory beside it and renamed, a ``fisher.pt`` is written to a temporary
file and renamed.  On an object store (an fsspec URL, where nothing can be
renamed) the target is written in place, group by group, each group's
objects before the manifest that names them; ``resume=True`` continues an
interrupted conversion from its last complete group.  The whole run holds
``dst``'s writer lock (:mod:`fisherstore._guard`; local destinations), and
first removes what a killed earlier run left beside ``dst`` (temporaries of
dead processes).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ._guard import lock_store, remove_stale
from ._io import atomic_dir
from ._readahead import PIECE_BYTES, ReadAhead
from ._tally import Tally
from .errors import BadInputError, ChecksumMismatchError, IncompleteStoreError
from .formats.base import Buffer, Piece
from .manifest import GroupInfo, TensorInfo, now_iso
from .progress import progress
from .storage import Remote, resolve
from .store import DEFAULT_PIECE_BYTES, FisherStore, open_store
from .writer import StoreWriter, plan_groups

__all__ = ["DEFAULT_BUFFER_BYTES", "TARGETS", "checked_pieces", "convert", "infer_target"]

log = logging.getLogger(__name__)

TARGETS = ("safetensors", "zarr", "pt")

#: Default size of a conversion's streaming buffer: the store's byte-piece size (large reads, a few in memory).
DEFAULT_BUFFER_BYTES = DEFAULT_PIECE_BYTES


def infer_target(dst: str | Path | Remote) -> str:
    """Target format from a destination name: ``*.pt``/``*.pth`` → pt, ``*.zarr`` → zarr, else safetensors."""
    suffix = Path(dst.name if isinstance(dst, Remote) else str(dst).rstrip("/")).suffix
    if suffix in (".pt", ".pth"):
        return "pt"
    if suffix == ".zarr":
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
    resume: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> Path | Remote:
    """Convert ``src`` into a new ``dst`` of format ``to``; the source is only read.

    Store groups are kept as they are; a file source is split into groups of
    ``group_size`` layers.  Checksums the source recorded are checked on the
    way, and ``dst`` appears only once complete.

    Args:
        src: a store directory, a ``fisher.pt`` or a bare ``.safetensors`` file (or an URL of a store or file).
        dst: the new store directory or ``.pt`` file, or an URL of a new store (``s3://bucket/store``).
        to: ``"safetensors"``, ``"zarr"`` or ``"pt"``; inferred from ``dst`` when omitted (:func:`infer_target`).
        backend_options: the target backend's options (zarr: compression, level, chunk_mb, shard_mb).
        group_size: layers per group when ``src`` is a single file.
        overwrite: replace an existing ``dst``, only once the new one is complete.
        buffer_bytes: size of a streaming buffer (at least one row is read at a time); bounds peak memory.
        chunk_bytes: deprecated alias of ``buffer_bytes`` (removed in the next release).
        resume: continue an interrupted conversion into ``dst`` (written in place, group by group).
        storage_options: keyword arguments of the URLs' filesystem (credentials, ``endpoint_url``, ...).

    Returns:
        ``dst`` (a :class:`~fisherstore.storage.Remote` for an URL).
    """
    if chunk_bytes is not None:
        warnings.warn("chunk_bytes is renamed buffer_bytes", DeprecationWarning, stacklevel=2)
        buffer_bytes = chunk_bytes
    source, target = resolve(src, storage_options, param="src"), resolve(dst, storage_options, param="dst")
    to = to or infer_target(target)
    if to not in TARGETS:
        raise BadInputError(f"to={to!r} is not a target format; choose one of {TARGETS}", param="to")
    if isinstance(target, Remote):
        if to == "pt":
            raise BadInputError(f"dst {target}: fisher.pt files are written to local paths only", param="dst")
        if isinstance(source, Remote) and (
            source == target or (source.fs is target.fs and target.root.startswith(source.root + "/"))
        ):
            raise BadInputError(f"dst {target} must not be the source or lie inside it", param="dst")
    elif isinstance(source, Path) and (
        target.resolve() == source.resolve() or source.resolve() in target.resolve().parents
    ):
        raise BadInputError(f"dst {target} must not be the source or lie inside it", param="dst")
    if resume and to == "pt":
        raise BadInputError("resume=True continues a store; a fisher.pt is written whole", param="resume")
    if isinstance(buffer_bytes, bool) or not isinstance(buffer_bytes, int) or buffer_bytes < 1:
        raise BadInputError(f"buffer_bytes must be a positive integer, got {buffer_bytes!r}", param="buffer_bytes")
    with open_store(source) as store, lock_store(target) as guard:
        if isinstance(target, Path):  # one writer of dst at a time, for the whole run
            remove_stale(target, guard)  # a killed earlier run's temporary directory or file beside dst
            exists = target.exists()
        else:
            exists = bool(target.listing()) or target.is_file()
        if exists and not overwrite and not resume:  # checked under the lock: no other writer can be making it
            raise BadInputError(f"{target} already exists; choose a new path or pass overwrite=True", param="overwrite")
        if not store.complete:
            raise IncompleteStoreError(
                f"{source}: groups {store.manifest.missing_groups} are not written; "
                "resume the store before converting it"
            )
        if backend_options and to == "pt":
            raise BadInputError("fisher.pt takes no backend_options (compression, chunking)", param="backend_options")
        bar: Any  # a tqdm bar, or a NullBar when quiet
        with progress(total=store.nbytes, desc=f"convert → {to}", unit="B", unit_scale=True, unit_divisor=1024) as bar:
            if to == "pt":
                assert isinstance(target, Path)
                _to_pt(store, target, buffer_bytes, bar)
            else:
                _to_store(store, target, to, backend_options or {}, group_size, buffer_bytes, bar, resume, overwrite)
    log.info("converted %s → %s (%s)", source, target, to)
    return target


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
    store: FisherStore,
    dst: Path | Remote,
    backend: str,
    options: dict[str, Any],
    group_size: int,
    buffer_bytes: int,
    bar: Any,
    resume: bool = False,
    overwrite: bool = False,
) -> None:
    source_meta = {"path": str(store.path), "format": store.format, "converted": now_iso()}
    provenance = {**store.manifest.provenance, "converted_from": source_meta}
    if store.manifest.kind == "masks" and backend == "safetensors":
        options = {"prefix": "masks", **options}
    if isinstance(dst, Remote) or resume:  # in place: no rename on object stores; resume continues what is there
        _write_store(store, dst, backend, options, group_size, buffer_bytes, bar, provenance, resume, overwrite)
        return
    with atomic_dir(dst) as tmp:  # on overwrite, the old store goes only once the new one is complete
        _write_store(store, tmp, backend, options, group_size, buffer_bytes, bar, provenance, False, False)


def _write_store(
    store: FisherStore,
    dst: Path | Remote,
    backend: str,
    options: dict[str, Any],
    group_size: int,
    buffer_bytes: int,
    bar: Any,
    provenance: dict[str, Any],
    resume: bool,
    overwrite: bool,
) -> None:
    """Stream every group of ``store`` into a store at ``dst`` (skipping groups a resumed one already holds).

    The writer takes no lock of its own: :func:`convert` holds the final destination's for the whole run.
    """
    plan = _plan(store, group_size)
    writer = StoreWriter.create(
        dst,
        plan,
        lock=False,
        backend=backend,
        backend_options=options,
        kind=store.manifest.kind,
        provenance=provenance,
        attrs=store.manifest.attrs,
        resume=resume,
        overwrite=overwrite and not resume,
    )
    with writer:
        done = writer.completed_groups
        if done:
            bar.update(sum(store.info(s.name).nbytes for g in plan if g.index in done for s in g.tensors))
        for group in writer.manifest.groups:
            if group.index in done:
                continue
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
