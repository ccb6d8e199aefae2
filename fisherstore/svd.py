"""Top-k SVD of Fisher tensors read in row blocks: randomized for large tensors, exact for small ones.

The largest Fisher tensors of a 31B model are 5376×21504; a whole store is
tens of GB.  A mask needs only the top k singular modes, so each tensor is
decomposed with the randomized range finder of Halko, Martinsson & Tropp
(2011, algorithms 4.4 and 5.1) that touches the tensor only through products
with thin matrices.  Those products are computed block by block as the
tensor's rows stream from the store (:meth:`FisherStore.iter_rows`)::

    Y = A Ω           Y_i = A_i Ω                 (one read of A)
    Q = orth(Y)
    repeat q times:   Z = Aᵀ Q = Σ_i A_iᵀ Q_i     (one read)
                      Ω = orth(Z);  Y = A Ω;  Q = orth(Y)   (one read)
    Bᵀ = Aᵀ Q = Σ_i A_iᵀ Q_i                      (one read)
    Bᵀ = W Σ Zᵀ  ⇒  A ≈ (Q Z_k) Σ_k W_kᵀ

so memory is O((m + n)(k + p)) plus one row block, and a decomposition costs
2q + 2 reads.  Re-orthonormalising after every product (instead of forming
(AAᵀ)^q A Ω) keeps singular values below √ε·σ₁ from being lost in fp32.
When the whole fp32 tensor fits in ``max_memory`` it is read once and kept,
so the passes cost only arithmetic; otherwise every pass re-reads it.  Tensors
whose oversampled rank is a quarter of their short side or more are cheaper
to decompose exactly (LAPACK ``gesdd``) and are, when they fit.

Numerics: everything is decomposed in fp32.  There are no bf16 (or fp16) QR
or SVD kernels (LAPACK has none, nor does cuSOLVER), bf16's 8-bit mantissa
would cap orthogonality at ~1e-2, and fp64 would double memory and time for
precision a bf16 input does not have.  ‖A‖²_F is accumulated per row in
fp32 and across rows in fp64.

Signs are canonical: each mode is flipped so that its left vector sums to
>= 0 (a non-negative Fisher's leading vectors are then non-negative), so
exact and randomized, CPU and GPU results agree up to rounding.

The math on fp32 row blocks lives in :mod:`fisherstore._svd_core`, which
:mod:`fisherstore.masks` shares; this module plans each decomposition, streams
it from a store and spreads tensors over processes and torchrun ranks.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import _svd_core as core
from ._dist import Ranks, local_device
from ._memory import tune_allocator
from ._svd_core import TRANSFORMS, Blocks, RowReader
from .dtypes import canonical_dtype
from .errors import BadInputError, check_int
from .formats.base import rows_of
from .manifest import DTYPES, MANIFEST_NAME, Manifest
from .masks import (
    MASK_KIND,
    energy_and_residual,
    frobenius_sq,
    mask_attrs,
    mask_backend_options,
    mask_names,
    mask_triples,
    plan_mask_groups,
    source_identity,
)
from .progress import NullBar, progress
from .storage import Remote, resolve
from .store import FisherStore, load_manifest, open_store
from .writer import StoreWriter

if TYPE_CHECKING:
    from tqdm import tqdm

__all__ = [
    "DEFAULT_MAX_MEMORY",
    "OUTPUT_DTYPES",
    "TRANSFORMS",
    "Plan",
    "SVDConfig",
    "SVDResult",
    "decompose",
    "decompose_tensor",
    "frobenius_sq",
    "plan_decomposition",
    "svd_store",
]

log = logging.getLogger(__name__)

#: Dtypes the modes may be stored in (computed in fp32 regardless).
OUTPUT_DTYPES = ("float32", "bfloat16", "float16")

#: Default bound on one decomposition's working set.
DEFAULT_MAX_MEMORY = 2 << 30


@dataclass(frozen=True)
class SVDConfig:
    """How to decompose: rank, accuracy knobs, numerics and resources.

    ``rank`` modes are kept (``min(rank, m, n)`` for an m×n tensor).
    ``oversample`` extra random directions (default ``max(10, rank // 4)``:
    measured on real Fisher tensors, a fixed 10 lets the residual drift past
    1.02x the optimum once k approaches a fifth of the short side) and
    ``power_iters`` subspace iterations trade reads for accuracy.
    ``transform`` is applied element-wise before decomposing.  ``dtype`` is
    the stored dtype of U, S, V (an alias such as ``bf16`` or a
    ``torch.dtype`` is kept as its canonical name, see
    :func:`fisherstore.dtypes.canonical_dtype`).  ``max_memory`` bounds the
    bytes one decomposition allocates (host, or device when ``device`` is a GPU),
    excluding the interpreter and torch themselves.  ``exact`` forces
    LAPACK SVD (the tensor must then fit in ``max_memory``).  ``seed`` and the
    tensor's name seed the test matrix, so results do not depend on which
    process or rank computed them.
    """

    rank: int
    oversample: int | None = None
    power_iters: int = 2
    transform: str = "none"
    dtype: str = "float32"
    device: str = "cpu"
    max_memory: int = DEFAULT_MAX_MEMORY
    exact: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("rank", self.rank, 1)
        if self.oversample is not None:
            check_int("oversample", self.oversample, 0)
        check_int("power_iters", self.power_iters, 0)
        check_int("max_memory", self.max_memory, 1)
        check_int("seed", self.seed, 0)
        core.check_transform(self.transform)
        # frozen: the canonical name replaces the alias given (``bf16`` -> ``bfloat16``)
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype, param="dtype", allowed=OUTPUT_DTYPES))
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            raise BadInputError(
                f"device={self.device!r} is not one torch knows (try 'cpu', 'cuda', 'cuda:1')", param="device"
            ) from None

    def modes(self, m: int, n: int) -> tuple[int, int]:
        """``(k, l)`` for an m×n tensor: modes kept and random directions sampled."""
        k = min(self.rank, m, n)
        p = max(10, k // 4) if self.oversample is None else self.oversample
        return k, min(k + p, m, n)

    def params(self) -> dict[str, Any]:
        """The settings that determine the result (recorded in the mask store, checked on resume)."""
        d = asdict(self)
        for resource in ("device", "max_memory", "rank"):
            del d[resource]
        return d


@dataclass(frozen=True)
class Plan:
    """How one tensor will be decomposed, decided from its shape and ``max_memory``.

    ``in_memory``: the whole fp32 tensor is held (always for ``exact``);
    otherwise every pass re-reads it in blocks of ``block_rows`` rows.
    ``working_bytes`` is the estimated peak of what the decomposition allocates.
    """

    method: str
    rank: int
    samples: int
    block_rows: int
    in_memory: bool
    working_bytes: int


def plan_decomposition(shape: tuple[int, int], itemsize: int, cfg: SVDConfig, name: str = "tensor") -> Plan:
    """Choose exact or randomized, in memory or streamed, and the row block size.

    Byte estimates (fp32 = 4 bytes; p = min(m, n)): reading a row block holds
    its stored bytes, an fp32 copy and a transformed copy; exact SVD holds A,
    gesdd's copy of it, U, Vᵀ and its workspace; the randomized method holds Ω
    or Z (n×l), Y and Q (m×l), QR and SVD workspaces and Bᵀ.
    """
    m, n = shape
    k, l = cfg.modes(m, n)
    p = min(m, n)
    row_bytes = n * (itemsize + 8)
    chunk_rows = core.chunk_rows(n)
    budget = cfg.max_memory

    def rows_left(used: int) -> int:
        return min(m, chunk_rows, max(1, (budget - used) // row_bytes))

    exact_bytes = 4 * (2 * m * n + p * (m + n) + 7 * p * p + max(m, n))
    if cfg.exact or 4 * l >= p:
        if exact_bytes + row_bytes <= budget:
            rows = rows_left(exact_bytes)
            return Plan("exact", k, p, rows, True, exact_bytes + rows * row_bytes)
        if cfg.exact:
            raise BadInputError(
                f"tensor {name!r}: exact SVD of a {m}x{n} tensor needs about {exact_bytes + row_bytes:,} bytes, over "
                f"max_memory {budget:,}; raise max_memory or drop exact=True",
                param="max_memory",
            )
    fixed = 4 * l * (4 * m + 5 * n + 10 * l)
    dense = 4 * m * n
    if fixed + dense + row_bytes <= budget:
        rows = rows_left(fixed + dense)
        return Plan("randomized", k, l, rows, True, fixed + dense + rows * row_bytes)
    if fixed + row_bytes <= budget:
        rows = rows_left(fixed)
        return Plan("randomized", k, l, rows, False, fixed + rows * row_bytes)
    raise BadInputError(
        f"tensor {name!r}: a rank-{k} decomposition (+{l - k} oversampling) of a {m}x{n} tensor needs at least "
        f"{fixed + row_bytes:,} bytes, over max_memory {budget:,}; raise max_memory, or lower the rank or oversampling",
        param="max_memory",
    )


@dataclass(frozen=True)
class SVDResult:
    """Top modes of one tensor: U (m×k), S (k), V (n×k) on the CPU in the configured dtype.

    ``total_energy`` is ‖A‖²_F and ``captured`` ‖S‖² (both of the
    transformed tensor, from fp32 values); ``passes`` counts reads of the
    tensor from its store.
    """

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    method: str
    captured: float
    total_energy: float
    passes: int
    in_memory: bool
    seconds: float

    @property
    def energy(self) -> float:
        """Fraction of ‖A‖²_F captured by the k modes."""
        return energy_and_residual(self.captured, self.total_energy)[0]

    @property
    def residual(self) -> float:
        """‖A − U S Vᵀ‖_F."""
        return energy_and_residual(self.captured, self.total_energy)[1]


# -- one tensor ------------------------------------------------------------------------------
def _decompose(read: RowReader, shape: tuple[int, ...], itemsize: int, cfg: SVDConfig, name: str) -> SVDResult:
    m, n = rows_of(shape)
    if len(shape) < 2 or m == 0 or n == 0:
        raise BadInputError(
            f"tensor {name!r}: shape {list(shape)} is not a non-empty matrix; "
            "only tensors with 2 or more dims decompose"
        )
    plan = plan_decomposition((m, n), itemsize, cfg, name)
    device = torch.device(cfg.device)
    start = time.perf_counter()
    if plan.in_memory:
        a = core.empty_fp32(m, n, device)
        for _ in core.widened(read, plan.block_rows, cfg.transform, a, in_place=True):
            pass
        blocks: Blocks = lambda: ((0, a),)  # noqa: E731 - one block: the whole matrix
    else:
        if device.type == "cpu":  # the caller asked for bounded memory: freed row blocks must leave RSS
            tune_allocator("bounded")
        buffer = core.empty_fp32(plan.block_rows, n, device)
        blocks = lambda: core.widened(read, plan.block_rows, cfg.transform, buffer, in_place=False)  # noqa: E731
    try:
        if plan.method == "exact":
            u, s, v, total = core.exact_svd(a, plan.rank)
            passes = 1
        else:
            generator = torch.Generator().manual_seed(core.seed_for(cfg.seed, name))
            u, s, v, total = core.randomized_svd(
                blocks, m, n, plan.rank, plan.samples, cfg.power_iters, generator, device
            )
            passes = 1 if plan.in_memory else 2 * cfg.power_iters + 2
    except core.NonFinite:
        after = "" if cfg.transform == "none" else f" after transform={cfg.transform}"
        raise BadInputError(
            f"tensor {name!r} holds NaN or infinite values{after}; it cannot be decomposed "
            "(check the source with fisherstore verify)",
            param=None if cfg.transform == "none" else "transform",
        ) from None
    u, v = core.canonical_signs(u, v)
    out = DTYPES[cfg.dtype]
    return SVDResult(
        U=u.to("cpu", out).contiguous(),
        S=s.to("cpu", out).contiguous(),
        V=v.to("cpu", out).contiguous(),
        method=plan.method,
        captured=float(s.double().square().sum()),
        total_energy=total,
        passes=passes,
        in_memory=plan.in_memory,
        seconds=time.perf_counter() - start,
    )


def decompose(matrix: torch.Tensor, cfg: SVDConfig, name: str = "tensor") -> SVDResult:
    """Top ``cfg.rank`` modes of an in-memory tensor (dims after the first are flattened).

    The same code path as :func:`decompose_tensor` (row blocks are views of
    ``matrix``, which is never modified); ``name`` seeds the test matrix.

    Args:
        matrix: the tensor to decompose (any dtype; read as fp32 row blocks).
        cfg: rank, sampling, transform and device.
        name: seeds the random test matrix, as a store tensor's name does.

    Returns:
        The top modes with their captured energy.
    """
    if matrix.ndim < 2:
        raise BadInputError(f"tensor {name!r}: shape {list(matrix.shape)} is not a matrix")
    rows = matrix.detach().reshape(matrix.shape[0], -1)

    def read(block_rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        for start in range(0, rows.shape[0], block_rows):
            yield start, rows[start : start + block_rows]

    return _decompose(read, tuple(matrix.shape), matrix.element_size(), cfg, name)


def decompose_tensor(store: FisherStore, name: str, cfg: SVDConfig) -> SVDResult:
    """Top ``cfg.rank`` modes of one store tensor, read in row blocks (never whole unless it fits ``max_memory``).

    Args:
        store: an open Fisher store.
        name: the tensor to decompose (2 or more dims).
        cfg: rank, sampling, transform, device and memory bound.

    Returns:
        The top modes with their captured energy and how many passes over the rows they took.
    """
    info = store.info(name)
    return _decompose(functools.partial(store.iter_rows, name), info.shape, info.torch_dtype.itemsize, cfg, name)


# -- whole stores: processes and ranks --------------------------------------------------------

_WORKER: tuple[FisherStore, SVDConfig] | None = None


def _worker_init(path: str, cfg: SVDConfig, threads: int, storage_options: dict[str, Any] | None = None) -> None:
    global _WORKER
    torch.set_num_threads(threads)
    _WORKER = (open_store(path, storage_options=storage_options), cfg)


def _worker_decompose(name: str) -> SVDResult:
    assert _WORKER is not None, "worker not initialised"
    return decompose_tensor(_WORKER[0], name, _WORKER[1])


def _balance(costs: dict[str, int], world: int) -> dict[str, int]:
    """Longest-processing-time assignment of tensors to ranks (deterministic)."""
    loads = [0] * world
    owner = {}
    for name in sorted(costs, key=lambda x: (-costs[x], x)):
        rank = loads.index(min(loads))
        owner[name] = rank
        loads[rank] += costs[name]
    return owner


def _normalised(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def _check_resumable(out: Path | Remote, attrs: dict[str, Any]) -> None:
    """Refuse to resume a mask store made from another source or with other settings."""
    if isinstance(out, Remote):
        if not out.exists(MANIFEST_NAME):
            return
        old = load_manifest(out)
    else:
        manifest_path = out / MANIFEST_NAME
        if not manifest_path.exists():
            return
        old = Manifest.load(manifest_path)
    if old.kind != MASK_KIND:
        raise BadInputError(f"{out} is a {old.kind!r} store, not a mask store; write the masks elsewhere")
    if old.attrs.get("source", {}).get("tensors_sha256") != attrs["source"]["tensors_sha256"]:
        raise BadInputError(
            f"{out}: cannot resume: it was computed from another source ({old.attrs.get('source', {}).get('path')})"
        )
    for key in ("rank", "params"):
        if _normalised(old.attrs.get(key)) != _normalised(attrs[key]):
            raise BadInputError(
                f"{out}: cannot resume: it was made with {key} {old.attrs.get(key)!r}, "
                f"this run asks for {attrs[key]!r}; use the same options, a new out, or pass overwrite=True"
            )


def svd_store(
    source: str | Path,
    out: str | Path,
    cfg: SVDConfig,
    *,
    tensors: str | None = None,
    workers: int = 1,
    resume: bool = False,
    overwrite: bool = False,
    backend: str = "safetensors",
    backend_options: dict[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Manifest:
    """Decompose the matrices of a Fisher store and write them as a mask store at ``out``.

    ``tensors`` is a regex searched in names (default: every tensor with 2 or
    more dims).  Tensors are independent: ``workers`` processes decompose
    them in parallel on this machine (``cfg.max_memory`` is shared: each gets
    an equal part), and under ``torchrun`` the ranks split each group's
    tensors (largest first, to balance), gathering the group's results to
    rank 0, which alone writes.  The mask store is
    committed group by group (groups mirror the source's), so ``resume=True``
    continues an interrupted run, redoing at most the groups not committed;
    the output is bit-identical to an uninterrupted run with the same
    options, workers and device.  Returns the final manifest (on every rank).

    Args:
        source: the Fisher store (path or URL) to decompose.
        out: the mask store directory to write, or its URL (``s3://bucket/masks``).
        cfg: rank, sampling, transform, output dtype, device and memory bound.
        tensors: regex of the tensor names to decompose (default: every matrix).
        workers: local worker processes.
        resume: continue an interrupted run into ``out`` with the same options.
        overwrite: replace an existing ``out`` once the new one is complete.
        backend: the mask store's container format.
        backend_options: that backend's options (zarr: compression, level, chunk_mb, shard_mb).
        storage_options: keyword arguments of the filesystem of ``source`` or ``out`` when they are URLs.

    Returns:
        The mask store's final manifest.
    """
    check_int("workers", workers, 1)
    target = resolve(out, storage_options, param="out")
    ranks = Ranks()
    try:
        with open_store(source, storage_options=storage_options) as store:
            return _run(
                store,
                target,
                cfg,
                tensors,
                workers,
                resume,
                overwrite,
                backend,
                backend_options,
                ranks,
                storage_options,
            )
    finally:
        ranks.close()


def _select(store: FisherStore, tensors: str | None) -> list[str]:
    try:
        pattern = re.compile(tensors) if tensors else None
    except re.error as exc:
        raise BadInputError(f"tensors={tensors!r} is not a valid regular expression: {exc}", param="tensors") from None
    chosen = [n for n in store.names if pattern is None or pattern.search(n)]
    matrices = [n for n in chosen if len(store.shape(n)) >= 2 and 0 not in store.shape(n)]
    skipped = sorted(set(chosen) - set(matrices))
    if skipped:
        log.warning("skipping %d tensors that are not non-empty matrices: %s", len(skipped), ", ".join(skipped[:5]))
    if not matrices:
        if tensors:
            raise BadInputError(
                f"{store.path}: tensors={tensors!r} matches no matrix to decompose (the store holds {len(store)})",
                param="tensors",
            )
        raise BadInputError(
            f"{store.path}: no tensors with 2 or more dims to decompose (it holds {len(store)} tensors)"
        )
    return matrices


def _run(
    store: FisherStore,
    out: Path | Remote,
    cfg: SVDConfig,
    tensors: str | None,
    workers: int,
    resume: bool,
    overwrite: bool,
    backend: str,
    backend_options: dict[str, Any] | None,
    ranks: Ranks,
    storage_options: dict[str, Any] | None = None,
) -> Manifest:
    names = _select(store, tensors)
    shapes = {n: rows_of(store.shape(n)) for n in names}
    per_worker = SVDConfig(**{**asdict(cfg), "max_memory": cfg.max_memory // workers})
    for n in names:  # refuse an impossible budget before anything is written
        plan_decomposition(shapes[n], store.info(n).torch_dtype.itemsize, per_worker, n)
    plan = plan_mask_groups([(n, *shapes[n], cfg.modes(*shapes[n])[0], store.info(n).group) for n in names], cfg.dtype)
    attrs = {
        "rank": cfg.rank,
        "method": "exact" if cfg.exact else "randomized",
        "params": {**cfg.params(), "tensors": tensors},
        "source": source_identity(store),
    }
    writer = None
    failure: Exception | None = None
    if ranks.rank == 0:
        try:
            if resume:
                _check_resumable(out, attrs)
            options = mask_backend_options(backend, backend_options)
            writer = StoreWriter.create(
                out,
                plan,
                backend=backend,
                backend_options=options,
                kind=MASK_KIND,
                attrs=attrs,
                resume=resume,
                overwrite=overwrite,
            )
        except Exception as exc:
            failure = exc
    ranks.agree(failure, [str(failure)] if failure else [], "svd")
    completed = ranks.broadcast(writer.completed_groups if writer else None)
    pending = [g for g in plan if g.index not in completed]
    members = {g.index: [t.name for t in mask_triples(g)] for g in pending}
    owner: dict[str, int] = {}
    for group in pending:
        owner.update(_balance({n: shapes[n][0] * shapes[n][1] for n in members[group.index]}, ranks.world))
    mine = [n for n in owner if owner[n] == ranks.rank]
    device = cfg.device
    if ranks.world > 1:
        device = local_device(device) or device
    workers = max(1, min(workers, len(mine)))
    local_cfg = SVDConfig(**{**asdict(cfg), "device": device, "max_memory": cfg.max_memory // workers})
    log.info(
        "svd %s -> %s: %d tensors in %d groups, %d groups to do; rank %d of %d decomposes %d of them with %d worker(s)",
        store.path,
        out,
        len(names),
        len(plan),
        len(pending),
        ranks.rank,
        ranks.world,
        len(mine),
        workers,
    )
    # rank 0 alone reports progress
    bar: tqdm | NullBar[Any] = progress(total=len(owner), desc="svd", unit="tensor") if ranks.rank == 0 else NullBar()
    try:
        with _decomposer(store, local_cfg, mine, workers, storage_options) as compute:
            for group in pending:
                part: dict[str, SVDResult] | str = {}
                failure = None
                try:
                    part = {n: compute(n) for n in members[group.index] if owner[n] == ranks.rank}
                except Exception as exc:
                    failure, part = exc, f"rank {ranks.rank}: {exc}"
                gathered = ranks.gather(part)
                errors = [p for p in gathered or [] if isinstance(p, str)]
                if ranks.rank == 0 and gathered is not None and writer is not None and not errors:
                    try:
                        results = {n: r for p in gathered for n, r in p.items()}
                        _write_group(writer, group.index, members[group.index], results, shapes, store)
                        bar.update(len(members[group.index]))
                    except Exception as exc:
                        failure = exc
                        errors = [f"rank 0: {exc}"]
                ranks.agree(failure, errors, "svd")
        manifest = writer.finish() if writer else None
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    return ranks.broadcast(manifest)


@contextlib.contextmanager
def _decomposer(
    store: FisherStore, cfg: SVDConfig, names: list[str], workers: int, storage_options: dict[str, Any] | None = None
) -> Iterator[Callable[[str], SVDResult]]:
    """``name → SVDResult``: computed in this process, or by ``workers`` processes started on all ``names`` at once.

    Workers are spawned (not forked: torch's thread pools and CUDA do not
    survive a fork) and split this process's torch threads between them.
    """
    if workers == 1:
        yield lambda name: decompose_tensor(store, name, cfg)
        return
    threads = max(1, torch.get_num_threads() // workers)
    pool = ProcessPoolExecutor(
        workers,
        mp_context=torch.multiprocessing.get_context("spawn"),
        initializer=_worker_init,
        initargs=(str(store.path), cfg, threads, storage_options),
    )
    try:
        futures = {name: pool.submit(_worker_decompose, name) for name in names}
        yield lambda name: futures[name].result()
    finally:
        pool.shutdown(cancel_futures=True)


def _write_group(
    writer: StoreWriter,
    index: int,
    members: list[str],
    results: dict[str, SVDResult],
    shapes: dict[str, tuple[int, int]],
    store: FisherStore,
) -> None:
    tensors: dict[str, torch.Tensor] = {}
    attrs: dict[str, dict[str, Any]] = {}
    for name in members:
        r = results[name]
        u, s, v = mask_names(name)
        tensors.update({u: r.U, s: r.S, v: r.V})
        attrs[s] = mask_attrs(
            name,
            shapes[name],
            captured=r.captured,
            total_energy=r.total_energy,
            method=r.method,
            fisher_sum=store.info(name).sum,
        )
        log.info(
            "%s: %s rank %d of %dx%d, energy %.6f, residual %.4g, %.2fs (%s, %d passes)",
            name,
            r.method,
            r.S.shape[0],
            *shapes[name],
            r.energy,
            r.residual,
            r.seconds,
            "in memory" if r.in_memory else "streamed",
            r.passes,
        )
    writer.write_group(index, tensors, attrs)
