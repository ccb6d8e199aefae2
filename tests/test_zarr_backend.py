"""The zarr v3 backend: bit-exact round trips, what zarr-python and tensorstore see, hostile files."""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import google_crc32c
import ml_dtypes
import numpy as np
import pytest
import tensorstore
import torch
import zarr
from safetensors import safe_open
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.core.dtype import data_type_registry

from fisherstore._io import TMP_PREFIX, FileSpan
from fisherstore.errors import BadInputError, CorruptDataError
from fisherstore.formats.zarr import COMPRESSIONS, ZarrBackend
from fisherstore.formats.zarr_bf16 import BFloat16, register_bfloat16
from fisherstore.manifest import GroupInfo, TensorInfo, TensorSpec
from fisherstore.naming import parse_name
from fisherstore.store import open_store
from fisherstore.testing import fisher_like, fisher_like_tensors
from fisherstore.writer import StoreWriter, tensor_bytes

from .conftest import SHARED_SAMPLE, write_store

#: Tiny chunks and shards, so the tiny Gemma's tensors span many chunks and a few shards.
SMALL = {"chunk_mb": 1000 / 2**20, "shard_mb": 6000 / 2**20}


def odd_pieces(tensor: torch.Tensor, sizes: tuple[int, ...] = (7, 1, 1013, 64, 3)) -> Iterator[bytes]:
    """The tensor's bytes cut at sizes that split elements and rows."""
    data = bytes(tensor_bytes(tensor.reshape(-1)))
    pos, i = 0, 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        yield data[pos : pos + n]
        pos, i = pos + n, i + 1


def write(root: Path, tensors: dict[str, torch.Tensor], **options) -> tuple[ZarrBackend, dict[str, TensorInfo]]:
    """Write ``tensors`` as one group straight through the backend; return it and the tensors' infos."""
    backend = ZarrBackend(root, options)
    specs = tuple(TensorSpec.of(n, t) for n, t in tensors.items())
    sink = backend.begin_group(GroupInfo(0, (), specs), 1)
    infos = {}
    for spec in specs:
        location = sink.write_tensor(spec, odd_pieces(tensors[spec.name]))
        infos[spec.name] = TensorInfo(spec.name, spec.shape, spec.dtype, 0, location, "crc32c:00000000", 0.0)
    sink.commit()
    return backend, infos


def same_bits(a: np.ndarray | torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes and bit-identical C-order bytes (a torch tensor, or a numpy array from zarr / tensorstore)."""
    raw = bytes(tensor_bytes(a)) if isinstance(a, torch.Tensor) else np.ascontiguousarray(a).tobytes()
    return tuple(a.shape) == tuple(b.shape) and raw == bytes(tensor_bytes(b))


def shard_files(root: Path, name: str) -> list[Path]:
    return sorted(p for p in (root / name).rglob("*") if p.is_file() and p.name != "zarr.json")


@pytest.fixture(scope="module")
def sample() -> dict[str, torch.Tensor]:
    with safe_open(SHARED_SAMPLE, "pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


# -- round trips ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_layers(gemma_config) -> Callable[[torch.dtype], dict[str, torch.Tensor]]:
    """Fisher-like tensors of the tiny Gemma's layers 0 (sliding) and 1 (full attention, no v_proj), by dtype."""

    @functools.cache
    def make(dtype: torch.dtype) -> dict[str, torch.Tensor]:
        tensors = fisher_like_tensors(gemma_config, dtype=dtype)
        return {n: t for n, t in tensors.items() if parse_name(n)[0] in (0, 1)}

    return make


ROUND_TRIPS = [(torch.bfloat16, c) for c in sorted(COMPRESSIONS)] + [
    (torch.float32, "none"),
    (torch.float32, "blosc-zstd-bitshuffle"),
    (torch.float16, "none"),
    (torch.float16, "zstd"),
]


@pytest.mark.parametrize("dtype, compression", ROUND_TRIPS, ids=lambda v: str(v).removeprefix("torch."))
def test_round_trip_is_bit_exact_and_readable_by_zarr_python(tmp_path, two_layers, dtype, compression):
    tensors = two_layers(dtype)
    assert len({t.shape for t in tensors.values()}) >= 4  # gemma-like: shapes vary layer to layer
    backend, infos = write(tmp_path, tensors, compression=compression, **SMALL)
    group = zarr.open_group(tmp_path, mode="r")
    assert sorted(group.array_keys()) == sorted(tensors)
    assert max(len(shard_files(tmp_path, name)) for name in tensors) > 2  # several shards of several chunks
    rng = np.random.default_rng(0)
    for name, t in tensors.items():
        info = infos[name]
        assert info.location == {"array": name}
        assert same_bits(backend.read_rows(info, 0, t.shape[0]), t)
        for start, stop in [(0, 1), (5, 9), (t.shape[0] - 1, t.shape[0]), (3, 3)] + [
            tuple(sorted(rng.integers(0, t.shape[0] + 1, 2))) for _ in range(4)
        ]:
            assert same_bits(backend.read_rows(info, start, stop), t[start:stop]), (name, start, stop)
        array = group[name]
        assert array.dtype == (np.dtype(ml_dtypes.bfloat16) if dtype == torch.bfloat16 else t.numpy().dtype)
        assert same_bits(array[...], t)


@pytest.mark.parametrize("compression", sorted(COMPRESSIONS))
def test_tensorstore_reads_bfloat16_natively(tmp_path, two_layers, compression):
    tensors = two_layers(torch.bfloat16)
    write(tmp_path, tensors, compression=compression, **SMALL)
    for name, t in tensors.items():
        array = tensorstore.open(
            {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp_path / name)}}
        ).result()
        assert array.dtype == tensorstore.bfloat16 and array.shape == tuple(t.shape)
        assert same_bits(array.read().result(), t), name


@pytest.mark.parametrize(
    "tensor",
    [
        torch.tensor(2.5),
        torch.arange(11, dtype=torch.float32),
        torch.arange(2 * 3 * 5, dtype=torch.float16).reshape(2, 3, 5),
        torch.zeros(0, 4),
        torch.zeros(4, 0, dtype=torch.bfloat16),
        torch.tensor([True, False, True]),
        torch.arange(-40, 40, dtype=torch.int8).reshape(8, 10),
        torch.arange(12, dtype=torch.int64).reshape(3, 4) * (2**40),
        torch.arange(300, dtype=torch.float64).reshape(100, 3) / 7,
    ],
    ids=lambda t: f"{str(t.dtype)[6:]}{list(t.shape)}",
)
@pytest.mark.parametrize("compression", ["none", "blosc-lz4-bitshuffle"])
def test_odd_shapes_and_dtypes(tmp_path, tensor, compression):
    backend, infos = write(tmp_path, {"t": tensor}, compression=compression, chunk_mb=64 / 2**20, shard_mb=200 / 2**20)
    rows = tensor.shape[0] if tensor.dim() else 1
    got = backend.read_rows(infos["t"], 0, rows)
    assert got.dtype == tensor.dtype and same_bits(got, tensor)
    assert same_bits(zarr.open_array(tmp_path / "t", mode="r")[...], tensor)
    ts_array = tensorstore.open(
        {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp_path / "t")}}
    ).result()
    assert ts_array.shape == tuple(tensor.shape) and same_bits(ts_array.read().result(), tensor)
    if rows > 2:
        assert same_bits(backend.read_rows(infos["t"], 1, rows - 1), tensor[1:-1])


@pytest.mark.parametrize("compression", ["none", "zstd", "blosc-zstd-bitshuffle"])
def test_files_are_byte_identical_to_zarr_pythons(tmp_path, compression):
    """Our hand-written shards and metadata equal what zarr-python writes for the same array."""
    t = (torch.rand(37, 11, generator=torch.Generator().manual_seed(1)) + 0.1).to(torch.bfloat16)
    write(tmp_path / "ours", {"x": t}, compression=compression, chunk_mb=100 / 2**20, shard_mb=300 / 2**20)
    meta = json.loads((tmp_path / "ours" / "x" / "zarr.json").read_text())
    inner = meta["codecs"][0]["configuration"]
    assert inner["chunk_shape"] == [5, 11] and meta["chunk_grid"]["configuration"]["chunk_shape"] == [15, 11]
    compressors = {
        "none": None,
        "zstd": ZstdCodec(level=1),
        "blosc-zstd-bitshuffle": BloscCodec(
            cname="zstd", clevel=1, shuffle="bitshuffle", typesize=2, blocksize=256 << 10
        ),
    }[compression]
    theirs = zarr.open_group(tmp_path / "theirs", mode="w").create_array(
        "x",
        shape=(37, 11),
        dtype=ml_dtypes.bfloat16,
        chunks=(5, 11),
        shards=(15, 11),
        compressors=compressors,
        fill_value=0,
        chunk_key_encoding={"name": "default", "separator": "."},
    )
    theirs[...] = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    assert json.loads((tmp_path / "theirs" / "x" / "zarr.json").read_text()) == meta
    ours = shard_files(tmp_path / "ours", "x")
    assert [p.relative_to(tmp_path / "ours") for p in ours] == [Path("x/c.0.0"), Path("x/c.1.0"), Path("x/c.2.0")]
    for p in ours:
        assert p.read_bytes() == (tmp_path / "theirs" / p.relative_to(tmp_path / "ours")).read_bytes(), p


@pytest.mark.parametrize("compression", ["none", "blosc-lz4-bitshuffle"])
def test_arrays_with_slash_chunk_keys_are_read(tmp_path, compression):
    """Arrays whose shards lie at ``c/<s>/0`` (zarr's default separator, which fisherstore wrote before) read
    bit-exact, and an uncompressed one-shard array is still offered as a raw byte span."""
    t = (torch.rand(40, 12, generator=torch.Generator().manual_seed(4)) + 0.1).to(torch.bfloat16)
    shards = (40, 12) if compression == "none" else (24, 12)
    compressors = (
        None
        if compression == "none"
        else BloscCodec(cname="lz4", clevel=9, shuffle="bitshuffle", typesize=2, blocksize=128 << 10)
    )
    theirs = zarr.open_group(tmp_path, mode="w").create_array(
        "model.layers.0.mlp.up_proj.weight",
        shape=(40, 12),
        dtype=ml_dtypes.bfloat16,
        chunks=(8, 12),
        shards=shards,
        compressors=compressors,
        fill_value=0,
    )
    theirs[...] = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    assert (tmp_path / theirs.basename / "c" / "0" / "0").is_file()
    backend = ZarrBackend(tmp_path, {"compression": compression})
    info = TensorInfo(theirs.basename, (40, 12), "bfloat16", 0, {"array": theirs.basename}, "", float("nan"))
    assert same_bits(backend.read_rows(info, 0, 40), t)
    assert same_bits(backend.read_rows(info, 13, 29), t[13:29])
    span = backend.byte_span(info)
    assert (span is not None) == (compression == "none")
    if span is not None:
        assert span == (tmp_path / theirs.basename / "c" / "0" / "0", 0)


def test_reused_input_buffer_is_copied_before_compression(tmp_path, gemma_bf16):
    """A source that refills one buffer (like a file reader) must not corrupt chunks still being compressed."""
    name, t = "model.layers.0.mlp.down_proj.weight", gemma_bf16["model.layers.0.mlp.down_proj.weight"]
    data = bytes(tensor_bytes(t))
    buf = bytearray(333)

    def refilled() -> Iterator[memoryview]:
        for pos in range(0, len(data), len(buf)):
            n = len(data[pos : pos + len(buf)])
            buf[:n] = data[pos : pos + n]
            yield memoryview(buf)[:n]

    backend = ZarrBackend(tmp_path, {"compression": "blosc-zstd-bitshuffle", **SMALL})
    spec = TensorSpec.of(name, t)
    sink = backend.begin_group(GroupInfo(0, (0,), (spec,)), 1)
    location = sink.write_tensor(spec, refilled())
    sink.commit()
    assert same_bits(
        backend.read_rows(TensorInfo(name, spec.shape, spec.dtype, 0, location, "", 0.0), 0, t.shape[0]), t
    )


def test_default_layout_is_4mib_chunks_in_one_shard(tmp_path):
    t = torch.zeros(3000, 2048, dtype=torch.bfloat16)  # 12 MiB
    write(tmp_path, {"t": t})
    meta = json.loads((tmp_path / "t" / "zarr.json").read_text())
    assert meta["data_type"] == "bfloat16" and meta["fill_value"] == 0.0
    assert meta["codecs"][0]["configuration"]["chunk_shape"] == [1000, 2048]  # 3 even chunks of ~4 MiB
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [3000, 2048]
    assert [p.name for p in shard_files(tmp_path, "t")] == ["c.0.0"]


# -- compression -------------------------------------------------------------------------------------
def test_compression_ratio_on_real_fisher(tmp_path, sample):
    sizes = {}
    for compression in ("none", "blosc-zstd-bitshuffle"):
        backend, infos = write(tmp_path / compression, sample, compression=compression)
        sizes[compression] = sum(p.stat().st_size for n in sample for p in shard_files(tmp_path / compression, n))
        for name, t in sample.items():
            assert same_bits(backend.read_rows(infos[name], 0, t.shape[0]), t)
    raw = sum(t.numel() * 2 for t in sample.values())
    assert raw <= sizes["none"] < raw * 1.001  # only the shard indexes on top
    assert raw / sizes["blosc-zstd-bitshuffle"] >= 1.4


# -- atomicity and resume ----------------------------------------------------------------------------
def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def fds_under(path: Path) -> list[str]:
    """Targets of this process's open file descriptors that lie under ``path`` (deleted files included)."""
    targets = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the descriptor listdir itself used, closed by now
            targets.append(os.readlink(f"/proc/self/fd/{fd}"))
    return [t for t in targets if t.startswith(str(path))]


def test_abort_leaves_no_trace(tmp_path, gemma_bf16):
    """An abort with chunks still compressing (a tensor's last chunks stay in flight when it returns) removes
    every file and closes every shard."""
    backend = ZarrBackend(tmp_path, {"compression": "zstd", **SMALL})
    specs = tuple(TensorSpec.of(n, t) for n, t in gemma_bf16.items())
    before = open_fds()
    sink = backend.begin_group(GroupInfo(0, (), specs), 1)
    for spec in specs[:3]:
        sink.write_tensor(spec, odd_pieces(gemma_bf16[spec.name]))
    assert sink._pending, "the last tensor's final chunks should still be in flight"
    assert any(p.name.startswith(TMP_PREFIX) for p in tmp_path.iterdir())
    sink.abort()
    assert list(tmp_path.iterdir()) == []
    assert open_fds() <= before
    backend.close()


def test_a_failed_shard_write_is_closed_by_abort(tmp_path):
    """A write that fails on the last chunk left in flight (past the file size limit) is raised by commit, and
    abort still closes that shard, although no chunk in flight refers to it any more."""
    import resource

    raw = torch.from_numpy(np.random.default_rng(5).integers(0, 2**15, size=(40, 50), dtype=np.int16))
    t = raw.view(torch.bfloat16)  # random bits: incompressible, so the shard's size is known before it is written
    spec = TensorSpec.of("model.layers.0.mlp.up_proj.weight", t)
    backend = ZarrBackend(tmp_path, {"compression": "zstd", **SMALL})  # 4 chunks of 1000 bytes, one shard
    sink = backend.begin_group(GroupInfo(0, (0,), (spec,)), 1)
    sink.write_tensor(spec, [bytes(tensor_bytes(t))])
    assert len(sink._pending) == 4  # every chunk still in flight: commit writes them
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4000, hard))  # 3 chunks of 1010 bytes fit, the 4th does not
    try:
        with pytest.raises(OSError, match="File too large"):
            sink.commit()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert not sink._pending
    sink.abort()
    assert list(tmp_path.iterdir()) == []
    assert fds_under(tmp_path) == []  # the failed shard's fd is closed
    backend.close()


def test_error_mid_tensor_is_aborted_cleanly(tmp_path, gemma_bf16):
    name, t = next(iter(gemma_bf16.items()))
    backend = ZarrBackend(tmp_path, {"compression": "blosc-zstd-bitshuffle", **SMALL})
    spec = TensorSpec.of(name, t)
    sink = backend.begin_group(GroupInfo(0, (0,), (spec,)), 1)
    with pytest.raises(CorruptDataError, match=r"got \d+ bytes, expected"):
        sink.write_tensor(spec, [bytes(tensor_bytes(t))[:-3]])
    sink.abort()
    assert list(tmp_path.iterdir()) == []
    sink = backend.begin_group(GroupInfo(0, (0,), (spec,)), 1)
    with pytest.raises(CorruptDataError, match="got more than"):
        sink.write_tensor(spec, [bytes(tensor_bytes(t)) + b"x"])
    sink.abort()
    assert list(tmp_path.iterdir()) == []


def test_rewriting_a_group_replaces_arrays_of_an_interrupted_attempt(tmp_path, two_layers):
    write(tmp_path, two_layers(torch.bfloat16), **SMALL)
    doubled = {n: t * 2 for n, t in two_layers(torch.bfloat16).items()}
    backend, infos = write(tmp_path, doubled, compression="zstd", **SMALL)  # e.g. a resume after a crash mid-commit
    for name, t in doubled.items():
        assert same_bits(backend.read_rows(infos[name], 0, t.shape[0]), t)
        assert same_bits(zarr.open_array(tmp_path / name, mode="r")[...], t)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(TMP_PREFIX)]


def test_store_writer_records_the_normalised_backend_options(tmp_path, gemma_bf16):
    """The manifest holds the options filled in (the codec's default level); round trip and resume with
    compressed small chunks are the contract's (tests/test_backends.py::TestZarrCompressedSmallChunks)."""
    path = write_store(tmp_path / "s.zarr", gemma_bf16, backend="zarr", compression="blosc-zstd-bitshuffle", **SMALL)
    with open_store(path) as store:
        assert store.manifest.backend_options == {"compression": "blosc-zstd-bitshuffle", "level": 1, **SMALL}
    assert sorted(zarr.open_group(path, mode="r").array_keys()) == sorted(gemma_bf16)


# -- hostile files -------------------------------------------------------------------------------------
NAME = "model.layers.2.mlp.up_proj.weight"


@pytest.fixture(params=["none", "blosc-zstd-bitshuffle"])
def victim(request, tmp_path, gemma_bf16) -> tuple[ZarrBackend, TensorInfo, list[Path]]:
    backend, infos = write(tmp_path, {NAME: gemma_bf16[NAME]}, compression=request.param, **SMALL)
    return backend, infos[NAME], shard_files(tmp_path, NAME)


def read_all(backend: ZarrBackend, info: TensorInfo) -> torch.Tensor:
    return backend.read_rows(info, 0, info.shape[0])


def test_deleted_shard_is_corrupt(victim, gemma_bf16):
    backend, info, shards = victim
    shards[1].unlink()
    with pytest.raises(CorruptDataError, match=rf"tensor '{NAME}': shard file \S*/{NAME}/c\.1\.0 is missing"):
        read_all(backend, info)
    assert same_bits(backend.read_rows(info, 0, 2), gemma_bf16[NAME][:2])  # rows in other shards still read


@pytest.mark.parametrize("keep", [0, 5, -1, -21])
def test_truncated_shard_is_corrupt(victim, keep):
    backend, info, shards = victim
    raw = shards[0].read_bytes()
    shards[0].write_bytes(raw[:keep])
    with pytest.raises(CorruptDataError, match=rf"tensor '{NAME}': shard file \S*/{NAME}/c\.0\.0:"):
        read_all(backend, info)


def test_bad_index_crc_is_corrupt(victim):
    backend, info, shards = victim
    raw = bytearray(shards[0].read_bytes())
    raw[-10] ^= 0x40  # an index offset
    shards[0].write_bytes(bytes(raw))
    with pytest.raises(CorruptDataError, match="crc32c does not match"):
        read_all(backend, info)


def test_index_pointing_outside_the_data_is_corrupt(victim):
    backend, info, shards = victim
    meta = json.loads((shards[0].parent / "zarr.json").read_text())
    shard_rows = meta["chunk_grid"]["configuration"]["chunk_shape"][0]
    chunk_rows = meta["codecs"][0]["configuration"]["chunk_shape"][0]
    size = 16 * (shard_rows // chunk_rows) + 4  # the index: (offset, nbytes) per chunk, then a crc32c
    raw = bytearray(shards[0].read_bytes())
    index = np.frombuffer(bytes(raw[-size:-4]), dtype="<u8").copy()
    index[0] = len(raw)  # chunk 0 now starts past the end of the file
    raw[-size:] = index.tobytes() + google_crc32c.value(index.tobytes()).to_bytes(4, "little")
    shards[0].write_bytes(bytes(raw))
    with pytest.raises(CorruptDataError, match="outside the shard's data"):
        read_all(backend, info)


@pytest.mark.parametrize(
    "compression, header, match",
    [
        ("blosc-zstd-bitshuffle", bytes(16), "compressed size disagrees"),
        ("blosc-lz4-bitshuffle", b"\x02\x01\x01\x02" + (1 << 31).to_bytes(4, "little"), "decodes to 2147483648 bytes"),
        ("zstd", b"\x28\xb5\x2f\xfd\x00", "does not record its content size"),
        ("zstd", bytes(8), "not a zstd frame"),
    ],
)
def test_lying_or_garbled_chunk_header_is_corrupt(tmp_path, gemma_bf16, compression, header, match):
    backend, infos = write(tmp_path, {NAME: gemma_bf16[NAME]}, compression=compression, **SMALL)
    shard = shard_files(tmp_path, NAME)[0]
    raw = bytearray(shard.read_bytes())
    raw[: len(header)] = header  # the first chunk's header
    shard.write_bytes(bytes(raw))
    with pytest.raises(CorruptDataError, match=f"chunk 0 does not decompress.*{match}"):
        read_all(backend, infos[NAME])
    assert same_bits(backend.read_rows(infos[NAME], 20, 30), gemma_bf16[NAME][20:30])  # other chunks still read


def test_metadata_lies_are_corrupt(tmp_path, gemma_bf16):
    backend, infos = write(tmp_path, {NAME: gemma_bf16[NAME]}, **SMALL)
    meta_path = tmp_path / NAME / "zarr.json"
    meta = json.loads(meta_path.read_text())
    foreign = f"tensor '{NAME}': .*not an array in the layout fisherstore writes"
    for lie, match in [
        ({**meta, "shape": [200, 64]}, r"says bfloat16\[200, 64\], the manifest says bfloat16\[128, 64\]"),
        ({**meta, "data_type": "float16"}, "says float16.*manifest says bfloat16"),
        ({**meta, "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}]}, foreign),
        ({**meta, "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [7, 64]}}}, foreign),
        ("not json", "not valid JSON"),
    ]:
        meta_path.write_text(lie if isinstance(lie, str) else json.dumps(lie))
        with pytest.raises(CorruptDataError, match=match):
            read_all(ZarrBackend(tmp_path), infos[NAME])
    meta_path.unlink()
    with pytest.raises(CorruptDataError, match="zarr.json is missing"):
        read_all(ZarrBackend(tmp_path), infos[NAME])


def test_reader_accepts_any_blosc_block_size(tmp_path, gemma_bf16):
    """The block size only tunes compression, so retuning it must not orphan stores already written."""
    backend, infos = write(tmp_path, {NAME: gemma_bf16[NAME]}, compression="blosc-lz4-bitshuffle", **SMALL)
    meta_path = tmp_path / NAME / "zarr.json"
    meta = json.loads(meta_path.read_text())
    blosc_config = meta["codecs"][0]["configuration"]["codecs"][1]["configuration"]
    assert blosc_config["blocksize"] == 128 << 10
    blosc_config["blocksize"] = 12345
    meta_path.write_text(json.dumps(meta))
    assert same_bits(read_all(ZarrBackend(tmp_path), infos[NAME]), gemma_bf16[NAME])


def test_unsafe_location_and_bad_rows_are_refused(tmp_path, gemma_bf16):
    backend, infos = write(tmp_path, {NAME: gemma_bf16[NAME]}, **SMALL)
    info = infos[NAME]
    with pytest.raises(CorruptDataError, match="is not a safe name"):
        backend.read_rows(TensorInfo(NAME, info.shape, info.dtype, 0, {"array": "../x"}, "", 0.0), 0, 1)
    with pytest.raises(BadInputError, match="out of range"):
        backend.read_rows(info, 0, info.shape[0] + 1)


def test_root_that_is_not_a_group_is_refused(tmp_path):
    (tmp_path / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "array"}))
    spec = TensorSpec("t", (2,), "float32")
    with pytest.raises(BadInputError, match="not a zarr v3 group"):
        ZarrBackend(tmp_path).begin_group(GroupInfo(0, (), (spec,)), 1)


# -- options ---------------------------------------------------------------------------------------------
def test_options_defaults_and_idempotence():
    defaults = ZarrBackend.parse_options({})
    assert defaults == {"compression": "none", "level": None, "chunk_mb": 4, "shard_mb": 256}
    assert ZarrBackend.parse_options({"compression": "blosc-lz4-bitshuffle"})["level"] == 9
    assert ZarrBackend.parse_options({"compression": "zstd", "level": 9})["level"] == 9
    for options in (defaults, ZarrBackend.parse_options({"compression": "zstd", "chunk_mb": 0.5})):
        assert ZarrBackend.parse_options(options) == options


@pytest.mark.parametrize(
    "options, match",
    [
        ({"compresion": "zstd"}, "unknown \\['compresion'\\]"),
        ({"compression": "gzip"}, "compression 'gzip' is not one of"),
        ({"compression": "zstd", "level": 23}, "level=23 for 'zstd' must be an integer in 1..22"),
        ({"compression": "blosc-zstd-bitshuffle", "level": 0}, "level=0"),
        ({"compression": "blosc-zstd-shuffle", "level": "3"}, "level='3'"),
        ({"level": 3}, "level=3 needs a compression"),
        ({"chunk_mb": 0}, "chunk_mb=0 must be a number > 0"),
        ({"chunk_mb": True}, "chunk_mb=True"),
        ({"shard_mb": "big"}, "shard_mb='big'"),
        ({"chunk_mb": 8, "shard_mb": 4}, "shard_mb=4 must be >= chunk_mb=8"),
    ],
)
def test_bad_options_are_rejected(options, match):
    with pytest.raises(BadInputError, match=match):
        ZarrBackend(Path("."), options)


# -- the bfloat16 data type in zarr-python -----------------------------------------------------------------
def test_bfloat16_registration_is_idempotent_and_lets_zarr_python_write_it(tmp_path):
    register_bfloat16()
    register_bfloat16()
    assert data_type_registry.get("bfloat16") is BFloat16
    values = np.array([[0.5, -3.0, 1e-20], [np.inf, 2.0**100, 7.0]], dtype=ml_dtypes.bfloat16)
    array = zarr.create_array(tmp_path / "a", shape=values.shape, dtype=ml_dtypes.bfloat16, chunks=(1, 3), fill_value=0)
    array[...] = values
    meta = json.loads((tmp_path / "a" / "zarr.json").read_text())
    assert meta["data_type"] == "bfloat16" and meta["codecs"][0] == {
        "name": "bytes",
        "configuration": {"endian": "little"},
    }
    back = tensorstore.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp_path / "a")}}).result()
    assert back.dtype == tensorstore.bfloat16
    assert np.array_equal(np.asarray(back.read().result()).view(np.uint16), values.view(np.uint16))
    assert BFloat16().from_json_scalar("0x3f80", zarr_format=3) == 1.0  # hex fill values are bf16 bits
    assert np.isnan(float(BFloat16().from_json_scalar("NaN", zarr_format=3)))
    with pytest.raises(ValueError, match="big-endian"):
        BFloat16(endianness="big").to_native_dtype()


# -- raw spans of uncompressed arrays --------------------------------------------------------------------
def test_uncompressed_single_shard_array_lies_raw_and_others_do_not(tmp_path, gemma_bf16):
    """An uncompressed array in one shard is the tensor's bytes from offset 0: lazy reads map it, conversions
    stream it."""
    t = gemma_bf16[NAME]
    backend, infos = write(tmp_path / "raw", {NAME: t}, chunk_mb=1000 / 2**20)  # many chunks, one shard
    (shard,) = shard_files(tmp_path / "raw", NAME)
    assert backend.byte_span(infos[NAME]) == (shard, 0)
    assert shard.read_bytes()[: t.numel() * 2] == bytes(tensor_bytes(t))
    for options in ({"compression": "zstd"}, SMALL):  # encoded chunks; a tensor split over several shards
        other, other_infos = write(tmp_path / str(len(options)), {NAME: t}, **options)
        assert other.byte_span(other_infos[NAME]) is None


def test_uncompressed_shard_with_chunks_out_of_order_is_read_chunk_by_chunk(tmp_path, gemma_bf16):
    """The index decides: a shard whose chunks are not in order (another writer's) gets no raw span, and reads
    stay right."""
    t = gemma_bf16[NAME]
    backend, infos = write(tmp_path, {NAME: t}, chunk_mb=1000 / 2**20)
    (shard,) = shard_files(tmp_path, NAME)
    meta = json.loads((tmp_path / NAME / "zarr.json").read_text())
    nchunks = (
        meta["chunk_grid"]["configuration"]["chunk_shape"][0] // meta["codecs"][0]["configuration"]["chunk_shape"][0]
    )
    size = 16 * nchunks + 4  # after the data: (offset, nbytes) per chunk, then a crc32c
    raw = bytearray(shard.read_bytes())
    index = np.frombuffer(bytes(raw[-size:-4]), dtype="<u8").reshape(-1, 2).copy()
    (o0, n0), (o1, n1) = index[0], index[1]
    chunk0, chunk1 = bytes(raw[o0 : o0 + n0]), bytes(raw[o1 : o1 + n1])
    raw[o0 : o0 + n1], raw[o0 + n1 : o0 + n1 + n0] = chunk1, chunk0  # swap the two chunks' bytes...
    index[0], index[1] = (o0 + n1, n0), (o0, n1)  # ...and point the index at their new places
    raw[-size:] = index.tobytes() + google_crc32c.value(index.tobytes()).to_bytes(4, "little")
    shard.write_bytes(bytes(raw))
    fresh = ZarrBackend(tmp_path, backend.options)
    assert fresh.byte_span(infos[NAME]) is None
    assert same_bits(fresh.read_rows(infos[NAME], 0, t.shape[0]), t)


@pytest.mark.parametrize("source", ["whole tensors", "file spans"])
def test_writer_compresses_whole_chunks_where_they_lie(tmp_path, source):
    """Through the writer, whole chunks are compressed in the read-ahead's own pieces: no chunk buffer is
    ever taken (every tensor here is whole chunks), and every tensor still reads back bit-exact."""
    g = torch.Generator().manual_seed(3)
    tensors = {
        f"model.layers.{i}.mlp.up_proj.weight": fisher_like((rows, 256), g) for i, rows in enumerate((64, 128, 96))
    }
    specs = tuple(TensorSpec.of(n, t) for n, t in tensors.items())
    options = {"compression": "blosc-lz4-bitshuffle", "chunk_mb": 16 * 512 / 2**20}  # 16 rows of 512 bytes
    raw = tmp_path / "raw.bin"
    raw.write_bytes(b"".join(bytes(tensor_bytes(t)) for t in tensors.values()))
    offsets = dict(zip(tensors, np.cumsum([0] + [s.nbytes for s in specs]).tolist()))
    with StoreWriter.create(tmp_path / "s", (GroupInfo(0, (), specs),), backend="zarr", backend_options=options) as w:
        if source == "whole tensors":
            w.write_group(0, tensors)
        else:
            w.stream_group(0, ((s, [FileSpan(raw, offsets[s.name], s.nbytes)]) for s in specs))
        assert w.backend._free == [], "whole chunks were copied into the backend's chunk buffers"
        w.finish()
    store = open_store(tmp_path / "s")
    for name, t in tensors.items():
        assert same_bits(store[name], t)
