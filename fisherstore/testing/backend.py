"""The storage-backend contract as a pytest class: :class:`BackendTests`.

A backend only moves bytes (:mod:`fisherstore.formats.base`); these tests
check that it moves them right, both through the paths the library takes
(:class:`~fisherstore.writer.StoreWriter` writes, :func:`~fisherstore.store.open_store`
reads) and straight on the backend's own methods (``read_rows``,
``read_rows_into``, ``byte_span``, a sink's ``abort``).  fisherstore runs
them for each of its backends and option sets (``tests/test_backends.py``);
a third-party backend runs them the same way.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from .._io import FileSpan
from ..errors import BadInputError, CorruptDataError
from ..formats import get_backend
from ..formats.base import Backend, rows_of
from ..manifest import ITEMSIZES, MANIFEST_NAME, Manifest, TensorInfo, TensorSpec
from ..store import open_store
from ..writer import StoreWriter, plan_groups, tensor_bytes
from .stores import assert_same_tensors, write_store
from .synthetic import fisher_like_tensors, tiny_gemma4_config

__all__ = ["BackendTests", "row_ranges", "sample_tensor"]

#: Shapes that trip layout arithmetic, each with a dtype: rows are dim 0, and 0-d / 1-d tensors have 1-element rows.
ODD_SHAPES: dict[str, tuple[tuple[int, ...], str]] = {
    "0-d": ((), "float32"),
    "no-rows": ((0, 16), "bfloat16"),
    "empty-rows": ((8, 0), "float32"),
    "empty-3-d": ((3, 0, 4), "bfloat16"),
    "1-d": ((37,), "bfloat16"),
    "one-element": ((1,), "float32"),
    "3-d": ((5, 3, 7), "float32"),
}


@functools.cache
def _gemma(dtype: str) -> dict[str, torch.Tensor]:
    """Fisher-like tensors for every target of the tiny Gemma-4 (shared between tests: never modified)."""
    return fisher_like_tensors(tiny_gemma4_config(), dtype=getattr(torch, dtype))


def sample_tensor(shape: tuple[int, ...], dtype: str, seed: int = 0) -> torch.Tensor:
    """Random values of a storable dtype: signed floats, integers over half the type's range, or booleans.

    Args:
        shape: the tensor's shape (``()`` for 0-d).
        dtype: a manifest dtype name (``"bool"``, ``"int64"``, ``"bfloat16"``, ...).
        seed: seeds the values, so the same arguments give the same tensor.

    Returns:
        A CPU tensor of that shape and dtype; int64 values reach about ±2**62, beyond float64's exact integers.
    """
    g = torch.Generator().manual_seed(seed)
    if dtype == "bool":
        return torch.rand(shape, generator=g) < 0.5
    t = getattr(torch, dtype)
    if t.is_floating_point:
        return torch.randn(shape, generator=g, dtype=torch.float64).to(t)
    info = torch.iinfo(t)
    return torch.randint(info.min // 2, info.max // 2 + 1, shape, generator=g, dtype=t)


def row_ranges(nrows: int) -> list[tuple[int, int]]:
    """Row ranges ``[start, stop)`` worth reading from a tensor of ``nrows`` rows: whole, ends, middle, empty."""
    n = nrows
    candidates = [(0, n), (0, 1), (n // 3, n // 2), (n - 1, n), (1, n - 1), (5, 5), (0, 0), (n, n)]
    return sorted({(a, b) for a, b in candidates if 0 <= a <= b <= n})


def _rows(tensor: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows ``[start, stop)`` of a tensor as the contract defines them (a 0-d tensor is one 1-element row)."""
    return tensor.reshape(1)[start:stop] if tensor.dim() == 0 else tensor[start:stop]


def _assert_rows(got: torch.Tensor, tensor: torch.Tensor, start: int, stop: int, what: object) -> None:
    """``got`` holds exactly rows ``[start, stop)`` of ``tensor``: dtype, shape and bytes."""
    expected = _rows(tensor, start, stop)
    assert got.dtype == tensor.dtype, what
    if tensor.dim() == 0 and stop > start:
        assert tuple(got.shape) == (), what
    elif tensor.dim():
        assert tuple(got.shape) == tuple(expected.shape), what
    assert bytes(tensor_bytes(got)) == bytes(tensor_bytes(expected)), what


class BackendTests:
    """The conformance tests of a storage backend and one set of its options; subclass it once per option set.

    pytest collects a subclass named ``Test...`` in any test module.  A
    backend is found by its registered name, so a third-party backend first
    adds itself to :data:`fisherstore.formats.BACKENDS` (``name -> (module,
    class name)``), e.g. in a ``conftest.py``::

        from fisherstore.formats import BACKENDS
        from fisherstore.testing import BackendTests

        BACKENDS["mine"] = ("my_package.backend", "MyBackend")

        class TestMine(BackendTests):
            backend = "mine"
            backend_options = {"level": 3}

    Class attributes a subclass sets (Args):
        backend: the registered name, as passed to ``StoreWriter.create(backend=...)``.
        backend_options: the options under test, or ``None`` for the backend's defaults.
        refused_dtypes: storable dtypes the format cannot hold; writing one must raise
            :class:`~fisherstore.errors.BadInputError` naming the dtype (a clear refusal, not bad bytes).
        side_files: names a backend may leave in the store's root when a group is aborted
            (zarr's root ``zarr.json``).
        byte_spans: ``True`` if every tensor of the tiny Gemma-4 set is expected to lie raw in one
            file, so that ``byte_span`` must return a span for each (not ``None``).

    Methods a subclass may override: :meth:`data_files` (the files holding a
    tensor's bytes, deleted to check that missing data reads as corruption).

    Returns:
        Nothing: the test methods assert.  Today they check round trips of
        bfloat16 and float32 tensors, row reads, byte chunks, resume, abort,
        missing data, ``read_rows_into`` against ``read_rows``, ``byte_span``
        against the bytes, odd shapes (:data:`ODD_SHAPES`) and every storable
        dtype (``manifest.ITEMSIZES``).
    """

    backend: ClassVar[str]
    backend_options: ClassVar[dict[str, Any] | None] = None
    refused_dtypes: ClassVar[frozenset[str]] = frozenset()
    side_files: ClassVar[frozenset[str]] = frozenset()
    byte_spans: ClassVar[bool] = False

    # -- what a subclass may override ---------------------------------------------------------------
    def data_files(self, root: Path, info: TensorInfo) -> list[Path]:
        """The files under ``root`` that hold ``info``'s bytes.

        By default those its location names: ``file`` (a file name) or
        ``array`` (a directory holding the tensor's files).
        """
        return [
            p
            for p in root.rglob("*")
            if p.is_file()
            and p.name not in (*self.side_files, MANIFEST_NAME)
            and (info.location.get("file") == p.name or info.location.get("array") in p.parts)
        ]

    # -- helpers ------------------------------------------------------------------------------------
    def write(
        self, path: Path, tensors: dict[str, torch.Tensor], groups: list[int] | None = None, group_size: int = 2
    ) -> Path:
        """:func:`~fisherstore.testing.write_store` with this backend and options: every group, or only ``groups``."""
        options = self.backend_options or {}
        return write_store(path, tensors, backend=self.backend, group_size=group_size, groups=groups, **options)

    @contextlib.contextmanager
    def opened(self, root: Path) -> Iterator[tuple[Backend, dict[str, TensorInfo]]]:
        """The backend of a written store, opened as :func:`~fisherstore.store.open_store` does, and its tensors."""
        manifest = Manifest.load(root / MANIFEST_NAME)
        backend = get_backend(manifest.backend, root, manifest.backend_options)
        try:
            yield backend, dict(manifest.tensors)
        finally:
            backend.close()

    @staticmethod
    def check_rows_into(backend: Backend, info: TensorInfo, tensor: torch.Tensor) -> None:
        """``read_rows_into`` fills a buffer with exactly the bytes ``read_rows`` returns, for several ranges."""
        row_bytes = rows_of(info.shape)[1] * info.itemsize
        for start, stop in row_ranges(rows_of(info.shape)[0]):
            rows = backend.read_rows(info, start, stop)
            _assert_rows(rows, tensor, start, stop, (info.name, start, stop))
            buf = bytearray((stop - start) * row_bytes)
            backend.read_rows_into(info, start, stop, memoryview(buf))
            assert bytes(buf) == bytes(tensor_bytes(rows)), (info.name, start, stop)

    @staticmethod
    def check_byte_span(backend: Backend, info: TensorInfo, tensor: torch.Tensor) -> bool:
        """Where ``byte_span`` gives ``(file, offset)``, the file holds the tensor's bytes there; says if it did."""
        span = backend.byte_span(info)
        if span is None:
            return False
        path, offset = span
        with open(path, "rb") as f:
            f.seek(offset)
            assert f.read(info.nbytes) == bytes(tensor_bytes(tensor)), info.name
        return True

    # -- fixtures -----------------------------------------------------------------------------------
    @pytest.fixture(params=["bfloat16", "float32"])
    def tensors(self, request: pytest.FixtureRequest) -> dict[str, torch.Tensor]:
        """Fisher-like tensors for every target of the tiny Gemma-4 (layers 1 and 3 have no v_proj)."""
        return _gemma(request.param)

    @pytest.fixture
    def tensors_bf16(self) -> dict[str, torch.Tensor]:
        return _gemma("bfloat16")

    # -- the tiny Gemma-4 set -----------------------------------------------------------------------
    def test_round_trip_and_rows(self, tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
        self.write(tmp_path / "s", tensors)
        with open_store(tmp_path / "s") as store:
            assert_same_tensors(store, tensors)
            for name, t in tensors.items():
                for start, stop in row_ranges(t.shape[0]):
                    assert torch.equal(store.read(name, rows=(start, stop)), t[start:stop]), (name, start, stop)

    def test_chunks_carry_exactly_the_tensor_bytes(self, tmp_path: Path, tensors_bf16: dict[str, torch.Tensor]) -> None:
        """iter_pieces: buffers or file spans, either way the C-order bytes, bounded in size."""
        self.write(tmp_path / "s", tensors_bf16)
        with open_store(tmp_path / "s") as store:
            for name, t in tensors_bf16.items():
                data = b""
                for chunk in store.iter_pieces(name, piece_bytes=4096):
                    assert len(chunk) <= max(4096, t[0].numel() * 2)
                    parts = chunk.views() if isinstance(chunk, FileSpan) else [chunk]
                    data += b"".join(bytes(p) for p in parts)
                assert data == t.view(torch.uint8).numpy().tobytes(), name

    def test_resume_keeps_committed_groups(self, tmp_path: Path, tensors_bf16: dict[str, torch.Tensor]) -> None:
        self.write(tmp_path / "s", tensors_bf16, groups=[0])
        plan = plan_groups([TensorSpec.of(n, t) for n, t in tensors_bf16.items()], 2)
        w = StoreWriter.create(
            tmp_path / "s", plan, backend=self.backend, backend_options=self.backend_options, resume=True
        )
        assert w.completed_groups == {0}
        w.write_group(1, {s.name: tensors_bf16[s.name] for s in plan[1].tensors})
        assert w.finish().complete
        with open_store(tmp_path / "s") as store:
            assert_same_tensors(store, tensors_bf16)

    def test_abort_leaves_no_trace(self, tmp_path: Path, tensors_bf16: dict[str, torch.Tensor]) -> None:
        plan = plan_groups([TensorSpec.of(n, t) for n, t in tensors_bf16.items()], 2)
        root = tmp_path / "s"
        root.mkdir()
        be = get_backend(self.backend, root, self.backend_options)
        sink = be.begin_group(plan[0], len(plan))
        first = plan[0].tensors[0]
        sink.write_tensor(first, [tensors_bf16[first.name].view(torch.uint8).numpy().tobytes()])
        sink.abort()
        be.close()
        assert [p.name for p in root.iterdir() if p.name not in self.side_files] == []

    def test_missing_data_is_reported_as_corruption(
        self, tmp_path: Path, tensors_bf16: dict[str, torch.Tensor]
    ) -> None:
        self.write(tmp_path / "s", tensors_bf16)
        victim = "model.layers.2.mlp.up_proj.weight"
        data_files = self.data_files(tmp_path / "s", Manifest.load(tmp_path / "s" / MANIFEST_NAME).tensors[victim])
        assert data_files
        for p in data_files:
            p.unlink()
        with open_store(tmp_path / "s") as store, pytest.raises(CorruptDataError, match=r"missing|truncated|no such"):
            store[victim]

    def test_read_rows_into_equals_read_rows(self, tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
        self.write(tmp_path / "s", tensors)
        with self.opened(tmp_path / "s") as (backend, infos):
            for name, t in tensors.items():
                self.check_rows_into(backend, infos[name], t)

    def test_byte_span_is_the_tensor_bytes(self, tmp_path: Path, tensors: dict[str, torch.Tensor]) -> None:
        self.write(tmp_path / "s", tensors)
        with self.opened(tmp_path / "s") as (backend, infos):
            spans = {name: self.check_byte_span(backend, infos[name], t) for name, t in tensors.items()}
        if self.byte_spans:
            assert [name for name, has in spans.items() if not has] == []

    # -- odd shapes and dtypes ----------------------------------------------------------------------
    def check_odd(self, root: Path, shape: tuple[int, ...], dtype: str) -> None:
        """A tensor of ``shape`` and ``dtype`` in each of two groups, a plain one between: every read agrees."""
        tensors = {
            "model.layers.0.self_attn.q_proj.weight": sample_tensor(shape, dtype, 0),
            "model.layers.0.mlp.up_proj.weight": sample_tensor((6, 5), "float32", 1),
            "model.layers.1.self_attn.q_proj.weight": sample_tensor(shape, dtype, 2),
        }
        self.write(root, tensors, group_size=1)
        with open_store(root) as store:
            assert sorted(store.names) == sorted(tensors)
            for name, t in tensors.items():
                _assert_rows(store[name], t, 0, rows_of(t.shape)[0], name)
                for start, stop in row_ranges(rows_of(t.shape)[0]):
                    _assert_rows(store.read(name, rows=(start, stop)), t, start, stop, (name, start, stop))
                chunks = store.iter_pieces(name, piece_bytes=64)
                data = b"".join(bytes(p) for c in chunks for p in (c.views() if isinstance(c, FileSpan) else [c]))
                assert data == bytes(tensor_bytes(t)), name
        with self.opened(root) as (backend, infos):
            for name, t in tensors.items():
                self.check_rows_into(backend, infos[name], t)
                self.check_byte_span(backend, infos[name], t)

    @pytest.mark.parametrize("case", list(ODD_SHAPES))
    def test_odd_shape(self, tmp_path: Path, case: str) -> None:
        shape, dtype = ODD_SHAPES[case]
        self.check_odd(tmp_path / "s", shape, dtype)

    @pytest.mark.parametrize("dtype", list(ITEMSIZES))
    def test_dtype(self, tmp_path: Path, dtype: str) -> None:
        """Every storable dtype round-trips bit for bit, or is refused up front with its name in the message."""
        if dtype in self.refused_dtypes:
            with pytest.raises(BadInputError, match=rf"\b{dtype}\b"):
                self.check_odd(tmp_path / "s", (7, 3), dtype)
        else:
            self.check_odd(tmp_path / "s", (7, 3), dtype)
