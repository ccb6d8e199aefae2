"""Writing stores: planned groups, streamed bytes, atomic commits, a background thread.

A store is written as a sequence of *groups* (layer groups for a Fisher
store) planned up front.  Each group is written by its backend to temporary
files, made durable and renamed into place (``GroupSink.commit``), and only
then is the manifest rewritten — atomically — to mark the group complete.  A
crash at any point therefore leaves a store whose manifest describes exactly
the groups that are really on disk, and ``resume=True`` continues it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._guard import WriterLock, lock_store, remove_stale
from ._io import TMP_PREFIX, write_json_atomic
from ._readahead import PIECE_BYTES, ReadAhead
from ._tally import Tally
from .errors import BadInputError, ChecksumMismatchError, IncompleteStoreError, StoreLockedError
from .formats import get_backend
from .formats.base import Piece
from .manifest import (
    IMPORTANCE_NAME,
    MANIFEST_NAME,
    GroupInfo,
    Manifest,
    TensorInfo,
    TensorSpec,
    importance_document,
    now_iso,
)
from .naming import parse_name
from .storage import Remote, resolve
from .store import load_manifest

if TYPE_CHECKING:
    import torch

__all__ = ["StoreWriter", "plan_groups", "tensor_bytes"]

log = logging.getLogger(__name__)


def plan_groups(specs: Sequence[TensorSpec], group_size: int) -> tuple[GroupInfo, ...]:
    """Split tensors into groups of ``group_size`` consecutive layers, in the given order.

    Tensors outside the decoder layers go into one final group.  Group indices
    are 0-based and dense.

    Args:
        specs: the tensors to write, in the order they are to be written.
        group_size: decoder layers per group (>= 1).

    Returns:
        The groups, each with its tensors' specs.
    """
    if group_size < 1:
        raise BadInputError(f"group size must be >= 1, got {group_size}", param="group_size")
    by_layer: dict[int, list[TensorSpec]] = {}
    other: list[TensorSpec] = []
    for spec in specs:
        layer = parse_name(spec.name)[0]
        (other if layer is None else by_layer.setdefault(layer, [])).append(spec)
    layers = sorted(by_layer)
    groups: list[GroupInfo] = []
    for i in range(0, len(layers), group_size):
        batch = layers[i : i + group_size]
        groups.append(GroupInfo(len(groups), tuple(batch), tuple(s for l in batch for s in by_layer[l])))
    if other:
        groups.append(GroupInfo(len(groups), (), tuple(other)))
    return tuple(groups)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The C-order bytes of a CPU tensor, without a copy when it is already contiguous."""
    import torch

    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().data


class StoreWriter:
    """Writes a store group by group; see the module docstring for the guarantees."""

    def __init__(self, root: Path | Remote, manifest: Manifest) -> None:
        self.root = root
        self.manifest = manifest
        self.backend = get_backend(manifest.backend, root, manifest.backend_options)
        self.blocked_seconds = 0.0
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._slot = threading.Semaphore(1)
        self._futures: list[Future[list[TensorInfo]]] = []
        self._read_ahead: ReadAhead | None = None
        self._store_lock: WriterLock | None = None

    # -- creation ---------------------------------------------------------------------------
    @classmethod
    def create(
        cls, path: str | Path | Remote, plan: Sequence[GroupInfo], *, lock: bool = True, **options: Any
    ) -> StoreWriter:
        """Start a new store at ``path`` (or continue one with ``resume=True``), holding its writer lock.

        The lock (:func:`fisherstore._guard.lock_store`, beside ``path``) is
        held until :meth:`close` (or :meth:`finish`): a second writer of the
        same path gets :class:`~fisherstore.errors.StoreLockedError` naming
        this one.  Once it is held, the debris of dead writers of ``path`` is
        removed.  ``lock=False`` is for a caller that holds the lock of the
        final destination itself (a conversion writing a private temporary
        directory).  ``options`` are :meth:`_create`'s: ``backend,
        backend_options, kind, provenance, attrs, resume, overwrite, storage_options``.
        """
        location = resolve(path, options.get("storage_options"), param="path")
        guard = lock_store(location) if lock else None
        local = location if isinstance(location, Path) else None
        existed = local is not None and local.exists()
        try:
            if guard is not None and local is not None:
                remove_stale(local, guard)
            writer = cls._create(location, plan, **options)
        except BaseException:
            if local is not None and not existed:  # a failed start (a full disk, say) leaves no empty directory
                with contextlib.suppress(OSError):
                    local.rmdir()
            if guard is not None:
                guard.release()
            raise
        writer._store_lock = guard
        return writer

    @classmethod
    def _create(
        cls,
        path: str | Path | Remote,
        plan: Sequence[GroupInfo],
        *,
        backend: str = "safetensors",
        backend_options: dict[str, Any] | None = None,
        kind: str = "fisher",
        provenance: dict[str, Any] | None = None,
        attrs: dict[str, Any] | None = None,
        resume: bool = False,
        overwrite: bool = False,
        storage_options: Mapping[str, Any] | None = None,
    ) -> StoreWriter:
        """Start a new store at ``path`` (or continue one with ``resume=True``).

        ``resume`` requires the existing manifest to have the same backend and
        the same planned groups; its complete groups are kept
        (:attr:`completed_groups`) and leftovers of an interrupted group are
        removed.  Without ``resume`` an existing store is refused unless
        ``overwrite`` is given.  ``path`` may be an fsspec URL
        (``s3://bucket/store``, with ``storage_options`` for its filesystem):
        objects are written to their final names and the manifest last.
        """
        location = resolve(path, storage_options, param="path")
        plan = tuple(replace(g, complete=False) for g in plan)
        if [g.index for g in plan] != list(range(len(plan))):
            raise BadInputError("group indices must be 0..N-1 in order", param="plan")
        names = [s.name for g in plan for s in g.tensors]
        if len(set(names)) != len(names):
            raise BadInputError("the plan names a tensor twice", param="plan")
        if isinstance(location, Remote):
            return cls._create_remote(
                location, plan, backend, backend_options, kind, provenance, attrs, resume, overwrite
            )
        root = location
        manifest_path = root / MANIFEST_NAME
        if resume and manifest_path.exists():
            old = _resumable(root, Manifest.load(manifest_path), plan, backend)
            for leftover in root.glob(f"{TMP_PREFIX}*"):
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
            return cls._resumed(root, old)
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            if not overwrite:
                raise BadInputError(
                    f"{root} already exists; choose a new path, pass resume=True to continue it, or overwrite=True",
                    param="overwrite",
                )
            if root.is_dir() and not manifest_path.exists():
                raise BadInputError(f"{root} is not empty and not a fisherstore store; refusing to overwrite it")
            shutil.rmtree(root) if root.is_dir() else root.unlink()
        root.mkdir(parents=True, exist_ok=True)
        return cls._fresh(root, plan, backend, backend_options, kind, provenance, attrs)

    @classmethod
    def _create_remote(
        cls,
        root: Remote,
        plan: tuple[GroupInfo, ...],
        backend: str,
        backend_options: dict[str, Any] | None,
        kind: str,
        provenance: dict[str, Any] | None,
        attrs: dict[str, Any] | None,
        resume: bool,
        overwrite: bool,
    ) -> StoreWriter:
        """:meth:`create` on an object store: the same checks, with listings and PUTs instead of a directory."""
        existing = root.listing()
        if resume and MANIFEST_NAME in existing:
            return cls._resumed(root, _resumable(root, load_manifest(root), plan, backend))
        if existing or root.is_file():
            if not overwrite:
                raise BadInputError(
                    f"{root} already exists; choose a new path, pass resume=True to continue it, or overwrite=True",
                    param="overwrite",
                )
            if MANIFEST_NAME not in existing:
                raise BadInputError(f"{root} is not empty and not a fisherstore store; refusing to overwrite it")
            root.rm(MANIFEST_NAME)  # first: what is left while the rest goes claims nothing
            root.rm(recursive=True)
        return cls._fresh(root, plan, backend, backend_options, kind, provenance, attrs)

    @classmethod
    def _resumed(cls, root: Path | Remote, old: Manifest) -> StoreWriter:
        writer = cls(root, old)
        log.info("resuming %s: %d of %d groups already complete", root, len(writer.completed_groups), len(old.groups))
        return writer

    @classmethod
    def _fresh(
        cls,
        root: Path | Remote,
        plan: tuple[GroupInfo, ...],
        backend: str,
        backend_options: dict[str, Any] | None,
        kind: str,
        provenance: dict[str, Any] | None,
        attrs: dict[str, Any] | None,
    ) -> StoreWriter:
        """A writer of a new, empty store at ``root``, its manifest (every group incomplete) already saved."""
        backend_obj = get_backend(backend, root, backend_options)
        manifest = Manifest(
            backend=backend,
            groups=plan,
            tensors={},
            kind=kind,
            backend_options=backend_obj.options,
            provenance=dict(provenance or {}),
            attrs=dict(attrs or {}),
            created=now_iso(),
            updated=now_iso(),
        )
        backend_obj.close()
        writer = cls(root, manifest)
        writer._save_manifest()
        return writer

    @property
    def completed_groups(self) -> set[int]:
        """Indices of the groups already written and committed."""
        return {g.index for g in self.manifest.groups if g.complete}

    # -- writing ----------------------------------------------------------------------------
    def _group(self, index: int) -> GroupInfo:
        if not 0 <= index < len(self.manifest.groups):
            raise BadInputError(f"group {index} is not planned (plan has {len(self.manifest.groups)} groups)")
        group = self.manifest.groups[index]
        if group.complete:
            raise BadInputError(f"group {index} is already complete")
        return group

    def stream_group(
        self,
        index: int,
        items: Iterable[tuple[TensorSpec, Iterable[Piece]]],
        attrs: Mapping[str, dict[str, Any]] | None = None,
        expect: Mapping[str, str] | None = None,
        *,
        stable: bool = False,
    ) -> list[TensorInfo]:
        """Write group ``index`` from ``(spec, pieces)`` pairs in plan order, then commit it.

        Pieces are byte buffers or :class:`~fisherstore._io.FileSpan` s (raw
        bytes in a source file), of any sizes.  A helper thread reads them
        ahead of the backend and adds them to the sum on the way; this thread
        hashes each piece as it hands it to the backend
        (:class:`~fisherstore._readahead.ReadAhead`), so reading overlaps
        writing.  A buffer may be reused by its producer once the next piece is
        asked for, unless ``stable`` says they stay valid (whole tensors: no copy).
        ``expect`` maps names to checksums the bytes must have (a conversion
        checks its source this way for free); a mismatch aborts the group.
        """
        group = self._group(index)
        sink = self.backend.begin_group(group, len(self.manifest.groups))
        infos = []
        try:
            planned = iter(group.tensors)
            for spec, pieces in items:
                want = next(planned, None)
                if spec != want:
                    raise BadInputError(f"group {index}: got tensor {spec}, the plan expects {want}")
                tally = Tally(spec.dtype)
                cut, held = sink.pieces(spec) or (PIECE_BYTES, 0)
                with self._reader().feed(pieces, tally, stable=stable, cut=cut, held=held) as feed:
                    location = sink.write_tensor(spec, feed, held=held)
                checksum = tally.checksum.hexdigest()
                if expect and expect.get(spec.name) and expect[spec.name] != checksum:
                    raise ChecksumMismatchError.for_tensor(
                        spec.name, checksum, expect[spec.name], where="the source manifest"
                    )
                if not math.isfinite(tally.sum):
                    raise BadInputError(
                        f"tensor {spec.name!r} holds non-finite values, or values whose fp32 sum overflows "
                        f"(sum {tally.sum}); a Fisher estimate must be finite: check the run that produced it"
                    )
                layer, kind = parse_name(spec.name)
                infos.append(
                    TensorInfo(
                        name=spec.name,
                        shape=spec.shape,
                        dtype=spec.dtype,
                        group=index,
                        location=location,
                        checksum=checksum,
                        sum=tally.sum,
                        layer=layer,
                        kind=kind,
                        attrs=dict((attrs or {}).get(spec.name, {})),
                    )
                )
            missing = [s.name for s in planned]
            if missing:
                raise BadInputError(f"group {index}: tensors {missing} were planned but not given")
            sink.commit()
        except BaseException:
            sink.abort()
            raise
        with self._lock:
            self.manifest = self.manifest.with_group(replace(group, complete=True), infos)
            self.backend.finalize(self.manifest.tensors, self.manifest.groups)
            if not self.manifest.missing_groups:  # before the manifest that says complete: a kill between
                self._save_importance()  # the two leaves an incomplete store, never a complete one without it
            self._save_manifest()
        log.debug("group %d committed (%d tensors)", index, len(infos))
        return infos

    def write_group(
        self, index: int, tensors: Mapping[str, torch.Tensor], attrs: Mapping[str, dict[str, Any]] | None = None
    ) -> list[TensorInfo]:
        """Write group ``index`` from whole tensors (names, shapes and dtypes must equal the plan)."""
        group = self._group(index)
        given = set(tensors)
        planned = {s.name for s in group.tensors}
        if given != planned:
            raise BadInputError(
                f"group {index}: missing {sorted(planned - given)}, unexpected {sorted(given - planned)}"
            )
        items = ((spec, [tensor_bytes(_check(spec, tensors[spec.name]))]) for spec in group.tensors)
        return self.stream_group(index, items, attrs, stable=True)

    def submit_group(
        self, index: int, tensors: Mapping[str, torch.Tensor], attrs: Mapping[str, dict[str, Any]] | None = None
    ) -> Future[list[TensorInfo]]:
        """Write a group on the background thread; blocks only while a previous group is still being written.

        The time spent blocked is added to :attr:`blocked_seconds`.  An error of
        an earlier background write is raised here (and by :meth:`finish`).
        """
        self._raise_failed()
        start = time.perf_counter()
        self._slot.acquire()
        self.blocked_seconds += time.perf_counter() - start
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fisherstore-writer")
        try:
            future = self._executor.submit(self.write_group, index, tensors, attrs)
        except BaseException:
            self._slot.release()
            raise
        future.add_done_callback(lambda _: self._slot.release())
        self._futures.append(future)
        return future

    def _reader(self) -> ReadAhead:
        """The read-ahead thread of this writer (started on first use)."""
        if self._read_ahead is None:
            self._read_ahead = ReadAhead()
        return self._read_ahead

    def _raise_failed(self) -> None:
        for f in self._futures:
            if f.done() and f.exception() is not None:
                raise f.exception()  # type: ignore[misc]

    def wait(self) -> None:
        """Wait for every submitted group; re-raise the first background error."""
        start = time.perf_counter()
        for f in self._futures:
            f.result()
        self.blocked_seconds += time.perf_counter() - start
        self._futures.clear()

    def finish(self) -> Manifest:
        """Wait for background writes and return the final manifest (``layer_importance.json`` is written).

        Raises :class:`IncompleteStoreError` if planned groups were never written.
        """
        self.wait()
        missing = self.manifest.missing_groups
        if missing:
            raise IncompleteStoreError(f"{self.root}: groups {missing} were never written; the store is incomplete")
        self.close()
        return self.manifest

    def close(self) -> None:
        """Stop the background thread (waiting for it), release files and the writer lock."""
        try:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            if self._read_ahead is not None:
                self._read_ahead.close()
                self._read_ahead = None
            self.backend.close()
        finally:
            if self._store_lock is not None:
                self._store_lock.release()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _save_importance(self) -> None:
        """``layer_importance.json`` of a Fisher store whose groups are all written (mask stores have none)."""
        if self.manifest.kind != "fisher":
            return
        if isinstance(self.root, Remote):
            self.root.put_json(IMPORTANCE_NAME, importance_document(self.manifest))
        else:
            write_json_atomic(self.root / IMPORTANCE_NAME, importance_document(self.manifest))

    def _save_manifest(self) -> None:
        """Commit the manifest; refused when this writer's lock was taken over (another writer owns the store)."""
        if self._store_lock is not None and self._store_lock.lost is not None:
            raise StoreLockedError(f"{self.root}: not committed: this writer lost its lock ({self._store_lock.lost})")
        if isinstance(self.root, Remote):  # one PUT, after the group's objects: atomic on S3
            self.root.put_json(MANIFEST_NAME, self.manifest.to_dict())
        else:
            write_json_atomic(self.root / MANIFEST_NAME, self.manifest.to_dict())


def _resumable(root: Path | Remote, old: Manifest, plan: tuple[GroupInfo, ...], backend: str) -> Manifest:
    """``old`` when a store with this manifest can be continued under ``plan`` and ``backend``, else a refusal."""
    if old.backend != backend or [(g.layers, g.tensors) for g in old.groups] != [(g.layers, g.tensors) for g in plan]:
        raise BadInputError(
            f"{root}: cannot resume: the existing store was planned with a different backend, "
            "groups or tensors; write to a new path or pass overwrite=True",
            param="plan",
        )
    return old


def _check(spec: TensorSpec, tensor: torch.Tensor) -> torch.Tensor:
    import torch

    if not isinstance(tensor, torch.Tensor):
        raise BadInputError(f"{spec.name!r}: expected a tensor, got {type(tensor).__name__}")
    if tuple(tensor.shape) != spec.shape or str(tensor.dtype).removeprefix("torch.") != spec.dtype:
        raise BadInputError(
            f"{spec.name!r}: got {str(tensor.dtype).removeprefix('torch.')}{list(tensor.shape)}, "
            f"the plan says {spec.dtype}{list(spec.shape)}"
        )
    return tensor
