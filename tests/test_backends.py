"""Conformance suite: every store backend and option set runs :class:`fisherstore.testing.BackendTests`.

A new option set (or backend) is one more subclass here; what the tests check
is documented on :class:`~fisherstore.testing.BackendTests`.
"""

from typing import Any, ClassVar

from fisherstore.testing import BackendTests


class TestSafetensors(BackendTests):
    backend = "safetensors"
    byte_spans = True


class TestZarr(BackendTests):
    backend = "zarr"
    side_files = frozenset({"zarr.json"})
    byte_spans = True


class TestZarrSmallChunks(TestZarr):
    """Tiny chunks and shards: tensors span many chunks and several shards (so no byte spans)."""

    backend_options: ClassVar[dict[str, Any] | None] = {"chunk_mb": 0.004, "shard_mb": 0.01}
    byte_spans = False


class TestZarrZstd(TestZarr):
    backend_options: ClassVar[dict[str, Any] | None] = {"compression": "zstd"}
    byte_spans = False


class TestZarrBitshuffle(TestZarr):
    backend_options: ClassVar[dict[str, Any] | None] = {"compression": "blosc-zstd-bitshuffle"}
    byte_spans = False


class TestZarrCompressedSmallChunks(TestZarr):
    """Compressed chunks, many to a shard: the compressed write path's chunk and shard bookkeeping."""

    backend_options: ClassVar[dict[str, Any] | None] = {
        "compression": "blosc-zstd-bitshuffle",
        "chunk_mb": 0.004,
        "shard_mb": 0.01,
    }
    byte_spans = False
