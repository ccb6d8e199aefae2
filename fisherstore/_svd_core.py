"""The numerical core of the SVD: pure torch math on fp32 row blocks, no stores, no files.

:mod:`fisherstore.svd` plans and runs decompositions over stores on top of
it; :mod:`fisherstore.masks` uses it to measure ‖T(F)‖²_F of a source tensor
when masks are written without an SVD.  The algorithms, their numerics and
their costs are described in :mod:`fisherstore.svd`.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterable, Iterator

import torch

from ._memory import prefer_huge_pages
from .errors import BadInputError
from .formats.base import rows_of

__all__ = [
    "BLOCK_BYTES",
    "TRANSFORMS",
    "Blocks",
    "Modes",
    "NonFinite",
    "RowReader",
    "canonical_signs",
    "check_transform",
    "chunk_rows",
    "empty_fp32",
    "exact_svd",
    "frobenius_sq",
    "randomized_svd",
    "seed_for",
    "sq_norm",
    "widened",
]

#: Element-wise maps applied (in fp32) before decomposing: ``sqrt`` and ``log1p`` compress
#: the Fisher's ~20 decades of dynamic range so more than the top mode matters.
TRANSFORMS: dict[str, Callable[..., torch.Tensor] | None] = {
    "none": None,
    "sqrt": torch.sqrt,
    "log1p": torch.log1p,
}

#: Largest row block (as fp32) read at once when memory allows more: bigger blocks do not make
#: the products faster and only grow the transient read buffer.
BLOCK_BYTES = 16 << 20


def chunk_rows(n: int) -> int:
    """Rows of ``n`` columns in one :data:`BLOCK_BYTES` fp32 block (at least 1)."""
    return max(1, BLOCK_BYTES // max(1, 4 * n))


def empty_fp32(m: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """An uninitialised m×n fp32 tensor on ``device``; on the CPU, hinted to transparent huge pages."""
    a = torch.empty(m, n, dtype=torch.float32, device=device)
    if a.device.type == "cpu":
        prefer_huge_pages(a.data_ptr(), a.nbytes)
    return a


RowReader = Callable[[int], Iterable[tuple[int, torch.Tensor]]]
"""``read(block_rows)`` → ``(start, rows)`` blocks of a tensor in its stored dtype, on the CPU."""

Blocks = Callable[[], Iterable[tuple[int, torch.Tensor]]]
"""One pass over a matrix: ``(start row, fp32 block on the compute device)``."""

Modes = tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]
"""``(U, S, V, ‖A‖²_F)`` of a decomposition, in fp32 on the compute device."""


def check_transform(transform: str, param: str = "transform") -> str:
    """``transform`` if it names one of :data:`TRANSFORMS`, else a :class:`BadInputError` naming ``param``."""
    if transform not in TRANSFORMS:
        raise BadInputError(f"{param} must be one of {sorted(TRANSFORMS)}, got {transform!r}", param=param)
    return transform


def widened(
    read: RowReader, block_rows: int, transform: str, out: torch.Tensor, in_place: bool
) -> Iterator[tuple[int, torch.Tensor]]:
    """Row blocks of a stored tensor, widened to fp32 and transformed, written into ``out``.

    With ``in_place`` each block lands at its own rows of ``out`` (the whole
    matrix, loaded once); otherwise at the top of ``out``, a one-block buffer
    every block reuses, so a yielded block is valid only until the next.
    ``copy_`` widens and moves in one pass into memory that is reused, where
    a fresh fp32 temporary per block would cost more in page faults than the
    conversion itself.  What ``read`` returns is never modified.
    """
    fn = TRANSFORMS[transform]
    n = out.shape[1]
    for start, rows in read(block_rows):
        offset = start if in_place else 0
        a = out[offset : offset + rows.shape[0]]
        a.copy_(rows.reshape(rows.shape[0], n))
        del rows  # before the next block is read: one block alive at a time
        if fn is not None:
            fn(a, out=a)
        yield start, a


def sq_norm(a: torch.Tensor) -> float:
    """‖a‖²_F: row norms in fp32, their squares summed in fp64.

    A single fp32 norm over a whole heavy-tailed Fisher drifts by ~1e-4
    relative, which the residual sqrt(‖A‖² − ‖S‖²) amplifies by 1/(1 − energy);
    per-row norms stay at ~1e-7 at the same speed.
    """
    return float(torch.linalg.vector_norm(a, dim=1).double().square().sum())


def frobenius_sq(read: RowReader, shape: tuple[int, ...], transform: str = "none") -> float:
    """‖T(F)‖²_F of a tensor read in bounded row blocks (T = ``transform``; dims after the first flattened).

    Args:
        read: the tensor's row blocks (:data:`RowReader`).
        shape: the tensor's shape.
        transform: a key of :data:`TRANSFORMS`.

    Returns:
        The squared Frobenius norm, from fp32 row norms summed in fp64 (:func:`sq_norm`).
    """
    check_transform(transform)
    m, n = rows_of(shape)
    buffer = empty_fp32(min(m, chunk_rows(n)), n)
    return sum(sq_norm(a) for _, a in widened(read, buffer.shape[0], transform, buffer, in_place=False))


def _product(blocks: Blocks, omega: torch.Tensor, out: torch.Tensor, with_norm: bool = False) -> float:
    """``out = A Ω`` block by block; returns ‖A‖²_F when ``with_norm`` (else 0)."""
    total = 0.0
    for start, a in blocks():
        torch.mm(a, omega, out=out[start : start + a.shape[0]])
        if with_norm:
            total += sq_norm(a)
        del a
    return total


def _adjoint_product(blocks: Blocks, q: torch.Tensor) -> torch.Tensor:
    """``Aᵀ Q = Σ_i A_iᵀ Q_i`` block by block."""
    z = None
    for start, a in blocks():
        qi = q[start : start + a.shape[0]]
        z = a.T @ qi if z is None else z.addmm_(a.T, qi)
        del a
    assert z is not None, "a matrix has at least one row block"
    return z


def _orth(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(x).Q


def randomized_svd(
    blocks: Blocks, m: int, n: int, k: int, l: int, power_iters: int, generator: torch.Generator, device: torch.device
) -> Modes:
    """Randomized truncated SVD (:mod:`fisherstore.svd`'s docstring) of the m×n matrix ``blocks`` reads.

    Args:
        blocks: one pass over the matrix (called ``2 * power_iters + 2`` times).
        m: rows.
        n: columns.
        k: modes kept.
        l: random directions sampled (``k`` plus oversampling).
        power_iters: subspace iterations.
        generator: the CPU generator of the test matrix.
        device: where the products run.

    Returns:
        ``(U, S, V, ‖A‖²_F)`` in fp32; raises :class:`NonFinite` if ‖A‖²_F is not finite.
    """
    omega = torch.randn(n, l, generator=generator, dtype=torch.float32).to(device)
    y = torch.empty(m, l, dtype=torch.float32, device=device)
    total = _product(blocks, omega, y, with_norm=True)
    _check_finite(total)
    q = _orth(y)
    for _ in range(power_iters):
        omega = _orth(_adjoint_product(blocks, q))
        _product(blocks, omega, y)
        q = _orth(y)
    del omega, y
    b = _adjoint_product(blocks, q)
    w, s, zh = torch.linalg.svd(b, full_matrices=False, driver=_svd_driver(b))  # Bᵀ = W S Zᴴ
    return q @ zh[:k].T, s[:k], w[:, :k], total


def exact_svd(a: torch.Tensor, k: int) -> Modes:
    """LAPACK SVD of an in-memory fp32 matrix, truncated to k; returns ``(U, S, V, ‖A‖²_F)``.

    Raises :class:`NonFinite` if ‖A‖²_F is not finite.
    """
    total = sq_norm(a)
    _check_finite(total)
    u, s, vh = torch.linalg.svd(a, full_matrices=False, driver=_svd_driver(a))
    return u[:, :k], s[:k], vh[:k].T, total


def _svd_driver(a: torch.Tensor) -> str | None:
    """``gesvd`` on CUDA: the default there (Jacobi-like) measured singular vectors orthonormal to only ~1e-4
    in fp32 on an H200, against ~1e-6 for ``gesvd`` at no measured cost (tests/test_gpu.py); CPU takes LAPACK's."""
    return "gesvd" if a.is_cuda else None


class NonFinite(Exception):
    """Raised inside the core; the caller turns it into a BadInputError naming the tensor."""


def _check_finite(total: float) -> None:
    if not math.isfinite(total):
        raise NonFinite


def canonical_signs(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each mode so that its left vector sums to >= 0 (exact and randomized, CPU and GPU then agree)."""
    sign = torch.where(u.sum(dim=0) < 0, -1.0, 1.0).to(u.dtype)
    return u * sign, v * sign


def seed_for(seed: int, name: str) -> int:
    """The test matrix's seed for tensor ``name``: the same in every process and rank."""
    return (seed * 0x9E3779B1 + zlib.crc32(name.encode())) % (1 << 63)
