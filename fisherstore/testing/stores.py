"""Stores written from in-memory tensors, and the check that a store holds them: for tests and benchmarks.

Importable without pytest (the benchmarks' child processes use :func:`write_store`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, cast

import torch

from ..manifest import TensorSpec
from ..storage import is_url
from ..writer import StoreWriter, plan_groups

__all__ = ["assert_same_tensors", "write_store"]


def write_store(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor],
    *,
    backend: str = "safetensors",
    group_size: int = 2,
    groups: Iterable[int] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    **options: Any,
) -> Path:
    """Write ``tensors`` as a store at ``path``, planned in groups of ``group_size`` layers.

    Args:
        path: the store's directory (created), or an URL (``memory://x``, ``s3://bucket/x``).
        tensors: the tensors by name.
        backend: the storage backend's name.
        group_size: layers per group, as :func:`~fisherstore.writer.plan_groups` takes it.
        groups: the indices of the groups to write, leaving the store incomplete (as a crash would);
            ``None`` writes every group and finishes the store.
        storage_options: keyword arguments of the URL's filesystem.
        **options: the backend's options (none: its defaults).

    Returns:
        ``path``, as a :class:`~pathlib.Path` (an URL stays as given, typed as a path for the callers' sake).
    """
    if not is_url(path):
        path = Path(path)
    plan = plan_groups([TensorSpec.of(n, t) for n, t in tensors.items()], group_size)
    with StoreWriter.create(
        path, plan, backend=backend, backend_options=options or None, storage_options=storage_options
    ) as w:
        for g in plan if groups is None else [plan[i] for i in groups]:
            w.write_group(g.index, {s.name: tensors[s.name] for s in g.tensors})
        if groups is None:
            w.finish()
    return cast(Path, path)


def assert_same_tensors(store: Any, tensors: Mapping[str, torch.Tensor]) -> None:
    """Assert that ``store`` (anything with ``names`` and ``store[name]``) holds exactly ``tensors``, bit for bit.

    Args:
        store: an open store (or a mapping-like object with a ``names`` attribute).
        tensors: the expected tensors by name: every one present, same dtype and shape, bit-identical.
    """
    assert sorted(store.names) == sorted(tensors)
    for name, expected in tensors.items():
        got = store[name]
        assert got.dtype == expected.dtype and got.shape == expected.shape, name
        assert torch.equal(
            got.view(torch.uint8) if got.dim() else got, expected.view(torch.uint8) if expected.dim() else expected
        ), name
