"""Conformance suite: every store backend (and option set) passes the same tests.

A new backend adds one entry to ``BACKENDS`` below and must pass everything here.
"""

import pytest
import torch

from fisherstore import CorruptDataError, StoreWriter, TensorSpec, open_store, plan_groups
from fisherstore._io import FileSpan
from fisherstore.formats import get_backend
from fisherstore.manifest import Manifest

from .conftest import assert_same_tensors

BACKENDS = {
    "safetensors": ("safetensors", {}),
    "zarr": ("zarr", {}),
    "zarr-small-chunks": ("zarr", {"chunk_mb": 0.004, "shard_mb": 0.01}),
    "zarr-zstd": ("zarr", {"compression": "zstd"}),
    "zarr-bitshuffle": ("zarr", {"compression": "blosc-zstd-bitshuffle"}),
}


@pytest.fixture(params=list(BACKENDS))
def backend(request):
    return BACKENDS[request.param]


def _write(path, tensors, backend, groups_to_write=None):
    name, options = backend
    plan = plan_groups([TensorSpec.of(n, t) for n, t in tensors.items()], 2)
    w = StoreWriter.create(path, plan, backend=name, backend_options=options or None)
    for g in plan if groups_to_write is None else [plan[i] for i in groups_to_write]:
        w.write_group(g.index, {s.name: tensors[s.name] for s in g.tensors})
    return w, plan


def test_round_trip_and_rows(tmp_path, gemma_tensors, backend):
    w, _ = _write(tmp_path / "s", gemma_tensors, backend)
    w.finish()
    with open_store(tmp_path / "s") as store:
        assert_same_tensors(store, gemma_tensors)
        for name, t in gemma_tensors.items():
            n = t.shape[0]
            for start, stop in [(0, 1), (n // 3, n // 2), (n - 1, n), (5, 5)]:
                assert torch.equal(store.read(name, rows=(start, stop)), t[start:stop]), (name, start, stop)


def test_chunks_carry_exactly_the_tensor_bytes(tmp_path, gemma_bf16, backend):
    """iter_chunks: buffers or file spans, either way the C-order bytes, bounded in size."""
    w, _ = _write(tmp_path / "s", gemma_bf16, backend)
    w.finish()
    with open_store(tmp_path / "s") as store:
        for name, t in gemma_bf16.items():
            data = b""
            for chunk in store.iter_chunks(name, chunk_bytes=4096):
                assert len(chunk) <= max(4096, t[0].numel() * 2)
                parts = chunk.views() if isinstance(chunk, FileSpan) else [chunk]
                data += b"".join(bytes(p) for p in parts)
            assert data == t.view(torch.uint8).numpy().tobytes(), name


def test_resume_keeps_committed_groups(tmp_path, gemma_bf16, backend):
    w, plan = _write(tmp_path / "s", gemma_bf16, backend, groups_to_write=[0])
    w.close()
    w = StoreWriter.create(tmp_path / "s", plan, backend=backend[0], backend_options=backend[1] or None, resume=True)
    assert w.completed_groups == {0}
    w.write_group(1, {s.name: gemma_bf16[s.name] for s in plan[1].tensors})
    assert w.finish().complete
    with open_store(tmp_path / "s") as store:
        assert_same_tensors(store, gemma_bf16)


def test_abort_leaves_no_trace(tmp_path, gemma_bf16, backend):
    name, options = backend
    plan = plan_groups([TensorSpec.of(n, t) for n, t in gemma_bf16.items()], 2)
    root = tmp_path / "s"
    root.mkdir()
    be = get_backend(name, root, options or None)
    sink = be.begin_group(plan[0], len(plan))
    first = plan[0].tensors[0]
    sink.write_tensor(first, [gemma_bf16[first.name].view(torch.uint8).numpy().tobytes()])
    sink.abort()
    be.close()
    assert [p.name for p in root.iterdir() if p.name != "zarr.json"] == []


def test_missing_data_is_reported_as_corruption(tmp_path, gemma_bf16, backend):
    w, _ = _write(tmp_path / "s", gemma_bf16, backend)
    w.finish()
    manifest = Manifest.load(tmp_path / "s" / "fisherstore.json")
    victim = "model.layers.2.mlp.up_proj.weight"
    location = manifest.tensors[victim].location
    data_files = [
        p
        for p in (tmp_path / "s").rglob("*")
        if p.is_file()
        and p.name not in ("zarr.json", "fisherstore.json")
        and (location.get("file") == p.name or location.get("array") in p.parts)
    ]
    assert data_files
    for p in data_files:
        p.unlink()
    with open_store(tmp_path / "s") as store, pytest.raises(CorruptDataError, match="missing|truncated|no such"):
        store[victim]
