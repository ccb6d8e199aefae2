"""Merging Fisher stores of disjoint prompt sets into the store of their union.

A diagonal Fisher estimated over ``n`` prompts is a mean, ``F = (1/n) sum_p g_p**2``,
so the Fisher of the union of disjoint prompt sets is the prompt-weighted mean of
the parts::

    F = sum_i n_i F_i / sum_i n_i

with each ``n_i`` the ``num_prompts`` of input ``i``'s manifest provenance.
Batch arrays on a cluster (one job per prompt shard) produce such stores.

Every tensor is merged in blocks of elements, in fp32: each input's bytes come
through its own :class:`~fisherstore._readahead.ReadAhead`, re-cut at the same
element offsets and checked against the input's recorded checksum on the way
(:func:`fisherstore.conversion.checked_pieces`, the verify-while-reading path
``convert`` uses), accumulated as ``acc += n_i * x_i``, divided by ``sum n_i``,
rounded once to the inputs' storage dtype and streamed into a
:class:`~fisherstore.writer.StoreWriter`.  So memory is a few blocks per input
whatever the store's size, the output commits group by group (a killed merge
leaves a store whose manifest says incomplete, which ``resume=True``
continues given the same inputs in the same order), and a failed merge
removes what it wrote.  The writer tallies the output's checksums and sums, so the
per-tensor sums and ``layer_importance.json`` describe the merged bytes.

Inputs must agree on what was estimated: the model (``config_hash``), the
targets, the estimator, the max length and chat template, the storage dtype
and every tensor's name and shape; they must be complete Fisher stores.
Anything else is refused before anything is written.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import logging
import resource
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from ._readahead import ReadAhead
from .conversion import checked_pieces
from .digests import sha256_of
from .errors import BadInputError, IncompleteStoreError
from .formats import BACKENDS
from .formats.base import Buffer
from .manifest import ITEMSIZES, MANIFEST_NAME, GroupInfo, Manifest, TensorSpec, now_iso
from .progress import NullBar, progress
from .storage import Remote, resolve
from .store import FisherStore, load_manifest, open_store
from .writer import StoreWriter

__all__ = ["DEFAULT_BLOCK_BYTES", "MERGE_KEYS", "MERGE_TARGETS", "MergeSummary", "merge_stores"]

log = logging.getLogger(__name__)

#: Bytes of the fp32 accumulator of one block (each input is read in blocks of the same elements).
DEFAULT_BLOCK_BYTES = 4 << 20

#: Backends a merge writes (a ``fisher.pt`` has no manifest to record the inputs or groups in).
MERGE_TARGETS = ("safetensors", "zarr")

#: Provenance keys on which every input must agree, with the words a refusal uses for them.
MERGE_KEYS: dict[str, str] = {
    "config_hash": "model (config hash)",
    "targets": "targets",
    "estimator": "estimator",
    "max_length": "max length",
    "chat_template": "chat template",
    "chat_template_sha256": "chat template",
}

#: Storage dtypes a merge averages (what extraction and conversion store Fisher values in).
_FLOAT_DTYPES = ("bfloat16", "float16", "float32")

#: numpy dtypes of the storage dtypes (bf16 from ml_dtypes).
_NUMPY_DTYPES: dict[str, Any] = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}

#: Provenance keys that describe one input's prompts or history: listed per input, never copied to the top.
_PER_INPUT = ("num_prompts", "tokens", "prompts", "prompts_sha256", "merged_from", "merged", "converted_from")

#: Each input's pieces (file spans, decoded row blocks) hold this many blocks, so that decoding works on
#: pieces larger than a zarr chunk's share of a block.
_SOURCE_BLOCKS = 4


@dataclass(frozen=True)
class MergeSummary:
    """What :func:`merge_stores` wrote."""

    store: str
    inputs: tuple[str, ...]
    num_prompts: int
    counts: tuple[int, ...]
    weights: tuple[float, ...]
    backend: str
    tensors: int
    nbytes: int
    seconds: float
    peak_rss_bytes: int
    manifest: Manifest = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The summary as a JSON-able dict (the manifest left out: it is the store's ``fisherstore.json``)."""
        return {
            "store": self.store,
            "inputs": list(self.inputs),
            "num_prompts": self.num_prompts,
            "counts": list(self.counts),
            "weights": list(self.weights),
            "backend": self.backend,
            "tensors": self.tensors,
            "nbytes": self.nbytes,
            "seconds": self.seconds,
            "peak_rss_bytes": self.peak_rss_bytes,
        }


def merge_stores(
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    to: str | None = None,
    backend_options: dict[str, Any] | None = None,
    overwrite: bool = False,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    resume: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> MergeSummary:
    """Write the Fisher of the union of the inputs' (disjoint) prompt sets as a new store at ``out``.

    ``F = sum_i n_i F_i / sum_i n_i`` per element, ``n_i`` being each input's
    ``num_prompts``, accumulated in fp32 a block at a time and stored in the
    inputs' dtype.  Inputs are only read, their checksums verified on the way.
    Everything that can be refused (fewer than two inputs, an output that is
    an input, incomplete stores, stores of different models, targets,
    estimators, max lengths, chat templates, storage dtypes or tensors) is
    refused before ``out`` is touched.

    Args:
        inputs: two or more complete Fisher stores (directories or URLs, as ``fisherstore extract`` or
            ``merge`` write them).
        out: the new store (a directory or an URL); must not be an input, lie inside one or contain one.
        to: ``"safetensors"`` or ``"zarr"``; default: zarr for an ``out`` named ``*.zarr``, else the first
            input's backend (with its backend options).
        backend_options: the target backend's options (zarr: compression, level, chunk_mb, shard_mb).
        overwrite: replace an existing store at ``out`` (it is removed when the merge starts).
        block_bytes: bytes of the fp32 accumulator of one block; bounds memory (a few blocks per input).
        resume: continue a killed merge into ``out``: its committed groups are kept and only the missing ones
            are merged.  The inputs must be those, in the same order and with the same tensors, that the
            output's provenance records (``merged_from``); anything else is refused before ``out`` is touched.
            Without an output yet, the merge starts as usual.
        storage_options: keyword arguments of the filesystem of URL inputs and output (``s3://...``).

    Returns:
        The :class:`MergeSummary`, with the output's :class:`~fisherstore.manifest.Manifest`.
    """
    start = time.perf_counter()
    paths = [resolve(p, storage_options, param="inputs") for p in inputs]
    target = resolve(out, storage_options, param="out")
    if isinstance(block_bytes, bool) or not isinstance(block_bytes, int) or block_bytes < 4:
        raise BadInputError(f"block_bytes must be an integer >= 4, got {block_bytes!r}", param="block_bytes")
    if resume and overwrite:
        raise BadInputError("resume=True and overwrite=True contradict each other; pick one", param="resume")
    _check_paths(paths, target)
    with contextlib.ExitStack() as stack:
        stores = [stack.enter_context(open_store(p, storage_options=storage_options)) for p in paths]
        counts = [_check_input(s) for s in stores]
        _check_compatible(stores)
        first = stores[0]
        backend = _target(to, target, first)
        options = _options(backend, backend_options, first)
        total = sum(counts)
        plan = tuple(replace(g, complete=False) for g in first.manifest.groups)
        nbytes = sum(s.nbytes for g in plan for s in g.tensors)
        _warn_same_prompts(stores)
        provenance = _provenance(stores, counts)
        resuming = resume and (
            target.exists(MANIFEST_NAME) if isinstance(target, Remote) else (target / MANIFEST_NAME).is_file()
        )
        if resuming:
            _check_resumable(target, provenance)
        writer = StoreWriter.create(
            target,
            plan,
            backend=backend,
            backend_options=options,
            kind="fisher",
            provenance=provenance,
            attrs=_attrs(stores, counts),
            overwrite=overwrite,
            resume=resume,
            storage_options=storage_options,
        )
        try:
            with writer:
                readers = [stack.enter_context(_read_ahead()) for _ in stores]
                bar: Any  # a tqdm bar, or a NullBar when quiet
                with progress(total=nbytes, desc="merge", unit="B", unit_scale=True, unit_divisor=1024) as bar:
                    done = writer.completed_groups
                    if done:
                        log.info("resuming %s: %d of %d groups already merged", target, len(done), len(plan))
                        bar.update(sum(s.nbytes for g in plan if g.index in done for s in g.tensors))
                    for group in writer.manifest.groups:
                        if group.index in done:
                            continue
                        items = (
                            (spec, _merged(spec, stores, readers, counts, block_bytes, bar)) for spec in group.tensors
                        )
                        writer.stream_group(group.index, items, attrs=_tensor_attrs(stores, group))
                manifest = writer.finish()
        except BaseException:
            if not resuming:  # a store this merge started: nothing half-written stays
                if isinstance(target, Remote):
                    with contextlib.suppress(OSError):
                        target.rm(MANIFEST_NAME)  # first: what is left while the rest goes claims nothing
                        target.rm(recursive=True)
                else:
                    shutil.rmtree(target, ignore_errors=True)
            raise  # a resumed store keeps its committed groups (and says incomplete), for the next --resume
    seconds = time.perf_counter() - start
    summary = MergeSummary(
        store=str(target),
        inputs=tuple(str(p) for p in paths),
        num_prompts=total,
        counts=tuple(counts),
        weights=tuple(n / total for n in counts),
        backend=backend,
        tensors=len(manifest.tensors),
        nbytes=nbytes,
        seconds=seconds,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        manifest=manifest,
    )
    log.info(
        "merged %d stores (%s prompts) into %s: %d tensors, %.1f MiB in %.1f s",
        len(paths),
        " + ".join(map(str, counts)),
        target,
        summary.tensors,
        nbytes / 2**20,
        seconds,
    )
    return summary


# -- refusals -------------------------------------------------------------------------------------


def _check_paths(paths: list[Path | Remote], out: Path | Remote) -> None:
    """At least two distinct inputs; ``out`` is none of them, lies inside none and contains none."""
    if len(paths) < 2:
        raise BadInputError(
            f"merge needs at least two input stores, got {len(paths)}; a single store is already its own merge",
            param="inputs",
        )
    seen: dict[str, Path | Remote] = {}
    dst = _where(out)
    for p in paths:
        r = _where(p)
        if r in seen:
            raise BadInputError(
                f"{p} is given twice (as {seen[r]} too); each prompt set must be counted once", param="inputs"
            )
        seen[r] = p
        if dst == r or dst.startswith(r + "/"):
            raise BadInputError(f"out {out} must not be an input or lie inside one ({p})", param="out")
        if r.startswith(dst + "/"):
            raise BadInputError(f"out {out} contains the input {p}; write the merge elsewhere", param="out")


def _where(location: Path | Remote) -> str:
    """A location's absolute spelling, for comparisons: the resolved path, or the filesystem's URL."""
    if isinstance(location, Remote):
        return f"{location.protocols[0]}://{location.root}"
    return str(location.resolve())


def _check_input(store: FisherStore) -> int:
    """Refuse what is not a complete Fisher store with a prompt count; return its prompt count."""
    where = store.path
    if store.format not in MERGE_TARGETS:
        raise BadInputError(
            f"{where} is a {store.format} file, which records no prompt count to weight it by; "
            "merge takes stores written by fisherstore extract (or merge)"
        )
    if store.manifest.kind != "fisher":
        raise BadInputError(f"{where} is a {store.manifest.kind} store; merge takes Fisher stores")
    if not store.complete:
        raise IncompleteStoreError(
            f"{where}: groups {store.manifest.missing_groups} are not written; "
            "finish (resume) its extraction before merging it"
        )
    n = store.manifest.provenance.get("num_prompts")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise BadInputError(
            f"{where}: its provenance records no prompt count (num_prompts is {n!r}), so it cannot be weighted"
        )
    dtypes = sorted({i.dtype for i in store.manifest.tensors.values()})
    if len(dtypes) != 1 or dtypes[0] not in _FLOAT_DTYPES:
        raise BadInputError(
            f"{where} stores {', '.join(dtypes) or 'no tensors'}; merge takes stores of one floating storage dtype "
            f"({', '.join(_FLOAT_DTYPES)})"
        )
    return n


#: What a resumed merge compares, per input, between the inputs given and the output's ``merged_from``.
_RESUME_KEYS = ("path", "num_prompts", "tensors_sha256")


def _check_resumable(out: Path | Remote, provenance: Mapping[str, Any]) -> None:
    """Refuse to resume ``out`` unless its provenance records these inputs, in this order, with these tensors."""
    old = load_manifest(out) if isinstance(out, Remote) else Manifest.load(out / MANIFEST_NAME)
    recorded = old.provenance.get("merged_from")
    if not isinstance(recorded, list) or not all(isinstance(e, dict) for e in recorded):
        raise BadInputError(f"{out} is not the output of a merge (no merged_from in its provenance); cannot resume it")
    given = [{k: e.get(k) for k in _RESUME_KEYS} for e in provenance["merged_from"]]
    then = [{k: e.get(k) for k in _RESUME_KEYS} for e in recorded]
    if given == then:
        return
    if [g["path"] for g in given] != [t["path"] for t in then]:
        what = f"was merged from {', '.join(str(t['path']) for t in then)}"
        if sorted(map(str, (g["path"] for g in given))) == sorted(map(str, (t["path"] for t in then))):
            what += " in that order"
    else:
        changed = next(g["path"] for g, t in zip(given, then, strict=True) if g != t)
        what = f"was merged from another version of {changed} (its tensors or prompt count differ)"
    raise BadInputError(
        f"cannot resume {out}: it {what}; give the same inputs in the same order, or pass overwrite=True",
        param="resume",
    )


def _storage_dtype(store: FisherStore) -> str:
    return next(iter(store.manifest.tensors.values())).dtype


def _check_compatible(stores: list[FisherStore]) -> None:
    """Refuse inputs that estimated different things, or hold different tensors, than the first."""
    first = stores[0]
    advice = (
        "merge only stores extracted with the same model, targets, estimator, max length, chat template "
        "and storage dtype"
    )
    for other in stores[1:]:
        for key, words in MERGE_KEYS.items():
            mine, theirs = first.manifest.provenance.get(key), other.manifest.provenance.get(key)
            if mine != theirs:
                raise BadInputError(
                    f"cannot merge {other.path} with {first.path}: the {words} differs "
                    f"({key} {theirs!r} against {mine!r}); {advice}"
                )
        if _storage_dtype(other) != _storage_dtype(first):
            raise BadInputError(
                f"cannot merge {other.path} with {first.path}: the storage dtype differs "
                f"({_storage_dtype(other)} against {_storage_dtype(first)}); {advice} "
                "(fisherstore extract --dtype)"
            )
        mine_t, theirs_t = first.manifest.tensors, other.manifest.tensors
        extra, missing = sorted(set(theirs_t) - set(mine_t)), sorted(set(mine_t) - set(theirs_t))
        if extra or missing:
            name, holder, lacker = (extra[0], other.path, first.path) if extra else (missing[0], first.path, other.path)
            count = len(extra) + len(missing)
            raise BadInputError(
                f"cannot merge {other.path} with {first.path}: their tensors differ ({count} in one only, "
                f"e.g. {name!r} is in {holder}, not in {lacker})"
            )
        for name, info in mine_t.items():
            if theirs_t[name].shape != info.shape:
                raise BadInputError(
                    f"cannot merge {other.path} with {first.path}: tensor {name!r} is "
                    f"{list(theirs_t[name].shape)} in one, {list(info.shape)} in the other"
                )


def _target(to: str | None, out: Path | Remote, first: FisherStore) -> str:
    suffix = Path(out.name).suffix
    if to is None:
        if suffix in (".pt", ".pth"):
            raise BadInputError(
                f"out {out}: merge writes a store directory, not a fisher.pt; merge into a store, "
                "then fisherstore convert it",
                param="out",
            )
        return "zarr" if suffix == ".zarr" else first.format
    if to not in MERGE_TARGETS:
        raise BadInputError(
            f"to={to!r} is not a store format a merge writes; choose one of {MERGE_TARGETS}", param="to"
        )
    return to


#: The zarr backend's options, as the CLI's zarr flags name them.
_ZARR_OPTIONS = ("compression", "level", "chunk_mb", "shard_mb")


def _options(backend: str, given: dict[str, Any] | None, first: FisherStore) -> dict[str, Any]:
    """The target's backend options, validated now (before the output exists): given, else the first input's."""
    if given is None:
        return dict(first.manifest.backend_options) if backend == first.format else {}
    zarr_only = [k for k in given if k in _ZARR_OPTIONS]
    if zarr_only and backend != "zarr":
        raise BadInputError(f"{zarr_only[0]} is a zarr option, and the output is {backend}; pass to=zarr", param="to")
    module, cls = BACKENDS[backend]
    return dict(getattr(importlib.import_module(module), cls).parse_options(dict(given)))


def _warn_same_prompts(stores: list[FisherStore]) -> None:
    """Inputs with the same prompt digest may hold the same prompts, which the merge would count twice."""
    by_digest: dict[Any, FisherStore] = {}
    for s in stores:
        digest = s.manifest.provenance.get("prompts_sha256")
        if digest is None:
            continue
        if digest in by_digest:
            log.warning(
                "%s and %s record the same prompt-set digest %s: merge assumes disjoint prompt sets, and prompts "
                "in both are counted twice (the digest is of the prompt file, so different slices of one file "
                "share it)",
                by_digest[digest].path,
                s.path,
                digest,
            )
        by_digest.setdefault(digest, s)


# -- the output's metadata ------------------------------------------------------------------------


def _common(dicts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The items of the first mapping that every mapping has, equal."""
    return {k: v for k, v in dicts[0].items() if all(k in d and d[k] == v for d in dicts[1:])}


def _int_sum(values: list[Any]) -> int | None:
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return sum(values)
    return None


def _tensors_digest(store: FisherStore) -> str:
    """A digest of every tensor's name, dtype, shape and checksum: identifies the input's data exactly."""
    lines = (f"{n}\t{i.dtype}\t{list(i.shape)}\t{i.checksum}" for n, i in store.manifest.tensors.items())
    return sha256_of("\n".join(lines).encode())


def _provenance(stores: list[FisherStore], counts: list[int]) -> dict[str, Any]:
    """The output's provenance: what every input agrees on, the sums, and one entry per input (FORMAT.md §8)."""
    provs = [s.manifest.provenance for s in stores]
    common = {k: v for k, v in _common(provs).items() if k not in _PER_INPUT}
    total = sum(counts)
    inputs = [
        {
            "path": str(s.path.resolve() if isinstance(s.path, Path) else s.path),
            "backend": s.format,
            "num_prompts": n,
            "weight": n / total,
            "created": s.manifest.created,
            "tensors_sha256": _tensors_digest(s),
            **{k: v for k, v in p.items() if k not in common and k != "num_prompts"},
        }
        for s, n, p in zip(stores, counts, provs, strict=True)
    ]
    prov: dict[str, Any] = {**common, "num_prompts": total}
    tokens = _int_sum([p.get("tokens") for p in provs])
    if tokens is not None:
        prov["tokens"] = tokens
    digests = [p.get("prompts_sha256") for p in provs]
    if all(isinstance(d, str) for d in digests):
        prov["prompts_sha256"] = sha256_of("\n".join(sorted(digests)).encode())  # type: ignore[arg-type]
    prov["prompts"] = f"merge of {len(stores)} prompt sets"
    prov["merged_from"] = inputs
    prov["merged"] = {"at": now_iso(), "fisherstore": _version(), "weights": "num_prompts", "accumulate": "float32"}
    return prov


def _version() -> str:
    try:
        return importlib.metadata.version("fisherstore")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _attrs(stores: list[FisherStore], counts: list[int]) -> dict[str, Any]:
    """The output's attrs: those every input agrees on, with the prompt and token counts summed."""
    all_attrs = [s.manifest.attrs for s in stores]
    attrs = _common(all_attrs)
    for key in ("num_samples", "tokens"):
        if all(key in a for a in all_attrs):
            total = _int_sum([a[key] for a in all_attrs])
            if total is not None:
                attrs[key] = total
            else:
                attrs.pop(key, None)
    return attrs


def _tensor_attrs(stores: list[FisherStore], group: GroupInfo) -> dict[str, dict[str, Any]]:
    """Per-tensor attrs every input agrees on (extraction writes none)."""
    return {s.name: _common([store.info(s.name).attrs for store in stores]) for s in group.tensors}


# -- the arithmetic --------------------------------------------------------------------------------


@contextlib.contextmanager
def _read_ahead() -> Iterator[ReadAhead]:
    with ReadAhead() as ahead:
        yield ahead


def _merged(
    spec: TensorSpec,
    stores: list[FisherStore],
    readers: list[ReadAhead],
    counts: list[int],
    block_bytes: int,
    bar: Any,
) -> Iterator[Buffer]:
    """The merged tensor's bytes, a block of elements at a time: ``sum_i n_i x_i / sum_i n_i`` in fp32.

    Each input's bytes are re-cut at the same element offsets (``cut``) by its
    own read-ahead and verified against its manifest; a mismatch surfaces
    when its stream is exhausted, before the group commits.  numpy does the
    arithmetic (bf16 through ml_dtypes, as the tally does), so a merge never
    imports torch; each step rounds to fp32 (``n_i * x_i``, the running sum,
    the division) and the result is rounded once to the storage dtype
    (nearest even, as torch's ``.to``).  The output buffer is reused: the
    writer copies each piece before asking for the next.
    """
    itemsize = ITEMSIZES[spec.dtype]
    block = max(1, block_bytes // 4)
    cut = block * itemsize
    total = sum(counts)
    dtype = _NUMPY_DTYPES[spec.dtype]
    quiet: NullBar[Any] = NullBar()
    streams = [
        checked_pieces(
            reader,
            store,
            store.info(spec.name),
            cut * _SOURCE_BLOCKS,
            quiet,
            cut=cut,
            where=f"the manifest of {store.path}",
        )
        for reader, store in zip(readers, stores, strict=True)
    ]
    size = min(block, max(1, spec.numel))
    acc, term = np.empty(size, dtype=np.float32), np.empty(size, dtype=np.float32)
    out = acc if dtype == np.float32 else np.empty(size, dtype=dtype)
    for pieces in zip(*streams, strict=True):
        n = len(pieces[0]) // itemsize
        a, t = acc[:n], term[:n]
        for i, (piece, count) in enumerate(zip(pieces, counts, strict=True)):
            x = np.frombuffer(piece, dtype=dtype, count=n)
            into = a if i == 0 else t
            np.copyto(into, x, casting="unsafe")  # widening to fp32 is exact
            np.multiply(into, np.float32(count), out=into)
            if i:
                np.add(a, t, out=a)
        np.divide(a, np.float32(total), out=a)
        o = out[:n]
        if o is not a:
            np.copyto(o, a, casting="unsafe")
        bar.update(n * itemsize)
        yield o.view(np.uint8).data
